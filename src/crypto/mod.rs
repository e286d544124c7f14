//! Field-level protection of PHI at rest: AES-256-GCM with the key id in every ciphertext (so rows
//! written under a retired key still decrypt during rotation), and keyed blind indexes
//! (HMAC-SHA256) so equality search works without decrypting. Keys come from the master key spec
//! (`KEYID:KEY[,KEYID:KEY...]`, first active), never from the database; each purpose uses its own
//! HKDF-SHA256 subkey, never the master key itself. Never logs, formats or returns key material
//! or plaintext, in `Debug` output or in errors.

mod blind_index;
mod field;
mod key;
mod keyring;
pub mod normalise;
mod vault;

pub use blind_index::BlindIndex;

/// Lower-case hex of `bytes`, appended to `out` (digests, MACs, check values: never secrets).
pub fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    out.reserve(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
}

/// Lower-case hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    push_hex(&mut out, bytes);
    out
}
pub use field::{field_aad, FieldCipher, ENVELOPE_VERSION};
pub use key::{KeyId, MasterKey, MAX_KEY_ID_LEN};
pub use keyring::{key_file_permission_warning, Keyring, LooseKeyFile};
pub use vault::{
    ExportChunkRef, PhiKeys, PhiVault, VersionRef, BLIND_INDEX_CHECK_SETTING,
    BLIND_INDEX_KEY_SETTING,
};

/// What went wrong, in words an operator can act on. Key ids (not secret) may appear; keys,
/// plaintext and ciphertext never do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("master key: {0}")]
    InvalidKey(&'static str),
    #[error("key id: {0}")]
    InvalidKeyId(&'static str),
    /// `entry` counts from 1.
    #[error("master key spec, entry {entry}: {reason}")]
    InvalidSpec { entry: usize, reason: &'static str },
    #[error("master key spec: no key given (expected KEYID:KEY[,KEYID:KEY...])")]
    EmptySpec,
    #[error("master key spec: key id `{0}` appears twice")]
    DuplicateKeyId(KeyId),
    #[error("master key spec: `{0}` and `{1}` are the same key; a rotation needs a new key")]
    DuplicateKey(KeyId, KeyId),
    #[error("master key file {path}: {reason}")]
    KeyFile { path: String, reason: String },
    #[error("ciphertext is malformed")]
    Malformed,
    #[error("ciphertext envelope version {0} is not supported")]
    UnsupportedVersion(u8),
    #[error("ciphertext was written under key `{0}`, which is not in the master key spec")]
    UnknownKey(KeyId),
    #[error("ciphertext does not authenticate (tampered, or moved to another row or column)")]
    Authentication,
    #[error("decrypted value is not UTF-8 text")]
    NotText,
    #[error(
        "blind index key `{0}` is not in the master key spec; keep it there until a re-index \
         under the new key has finished"
    )]
    BlindIndexKeyMissing(KeyId),
    #[error(
        "key `{0}` in the master key spec is not the key this database's blind indexes were \
         computed with (same id, different key)"
    )]
    BlindIndexKeyMismatch(KeyId),
    #[error("{0}")]
    NotIndexable(&'static str),
}

/// Equality of two tags or indexes in time independent of where they differ (lengths are not
/// secret).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lower_case_two_digits_a_byte() {
        assert_eq!(to_hex(&[0x00, 0x0f, 0xab, 0xff]), "000fabff");
        let mut out = String::from("sha256:");
        push_hex(&mut out, &[0x10]);
        assert_eq!(out, "sha256:10");
    }

    #[test]
    fn a_key_never_appears_in_debug_output_or_errors() {
        let key = MasterKey::generate();
        let b64 = key.to_base64();
        let hex: String =
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64.as_str())
                .unwrap()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
        let spec = format!("k1:{}", b64.as_str());
        let ring = Keyring::parse(&spec).unwrap();
        let cipher = FieldCipher::new(&ring);
        let index = BlindIndex::new(&ring, ring.active_id()).unwrap();
        let shown = format!("{key:?} {ring:?} {cipher:?} {index:?}");
        assert_eq!(format!("{key:?}"), "MasterKey(***)");
        for secret in [b64.as_str(), &b64[..12], &hex[..12]] {
            assert!(!shown.contains(secret), "{shown}");
        }

        // A near-miss key (one character short) must not be echoed by any error.
        let near_miss = &b64[..40];
        let errors = [
            MasterKey::parse(near_miss).unwrap_err(),
            Keyring::parse(&format!("k1:{near_miss}")).unwrap_err(),
            Keyring::parse(near_miss).unwrap_err(),
            Keyring::parse(&format!("{spec},k2:{}", b64.as_str())).unwrap_err(),
        ];
        for err in errors {
            let text = format!("{err} {err:?}");
            assert!(!text.contains(&near_miss[..12]), "{text}");
        }
    }

    #[test]
    fn constant_time_eq_is_plain_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn the_cipher_and_index_can_be_shared_across_workers() {
        fn shareable<T: Send + Sync + 'static>() {}
        shareable::<FieldCipher>();
        shareable::<BlindIndex>();
        shareable::<Keyring>();
    }
}
