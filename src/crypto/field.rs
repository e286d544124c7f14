//! AES-256-GCM over single PHI fields, in a self-describing envelope:
//!
//! ```text
//! version (1 byte, = 1) | key id length (1) | key id (1-32, ASCII) | nonce (12) | ciphertext | tag (16)
//! ```
//!
//! The key is the HKDF subkey `fhirgate field encryption v1` of the master key named in the
//! envelope, so rows written under a retired key still decrypt. The associated data binds a
//! ciphertext to its place, [`field_aad`] (`table.column:row id`): a ciphertext copied to another
//! row or column fails to authenticate. Nonces are 96 random bits, so one key should encrypt
//! well under 2^32 values (NIST SP 800-38D 8.3); rotate long before that.
//! Never panics on stored input, and never puts plaintext or key material in an error.

use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::aead::{AeadInPlace, KeyInit, OsRng};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use zeroize::{Zeroize, Zeroizing};

use super::{CryptoError, KeyId, Keyring, MAX_KEY_ID_LEN};

/// The envelope format written by [`FieldCipher::encrypt`].
pub const ENVELOPE_VERSION: u8 = 1;
const FIELD_ENCRYPTION_INFO: &[u8] = b"fhirgate field encryption v1";
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// The associated data for a field: `table.column:row id` (e.g. `patients.family_name:<uuid>`).
/// Use it for every encrypted column so writers and readers agree byte for byte.
pub fn field_aad(table_column: &str, row_id: &str) -> String {
    let mut aad = String::with_capacity(table_column.len() + 1 + row_id.len());
    aad.push_str(table_column);
    aad.push(':');
    aad.push_str(row_id);
    aad
}

/// Encrypts under the keyring's active key; decrypts under whichever key the envelope names.
#[derive(Clone)]
pub struct FieldCipher {
    /// The active key first, as in the keyring.
    ciphers: Vec<(KeyId, Aes256Gcm)>,
}

impl std::fmt::Debug for FieldCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FieldCipher")
            .field("active", self.active_key_id())
            .finish_non_exhaustive()
    }
}

impl FieldCipher {
    pub fn new(keyring: &Keyring) -> Self {
        let ciphers = keyring
            .entries()
            .map(|(id, key)| {
                let subkey = key.derive(FIELD_ENCRYPTION_INFO);
                let cipher = Aes256Gcm::new_from_slice(subkey.as_slice())
                    .expect("an HKDF subkey is 32 bytes, the AES-256 key size");
                (id.clone(), cipher)
            })
            .collect();
        Self { ciphers }
    }

    pub fn active_key_id(&self) -> &KeyId {
        &self.ciphers[0].0
    }

    /// Seals `plaintext` under the active key, bound to `aad` (see [`field_aad`]). One allocation,
    /// sized up front; encryption happens in place.
    pub fn encrypt(&self, plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
        let (id, cipher) = &self.ciphers[0];
        let id = id.as_str().as_bytes();
        let header_len = 2 + id.len() + NONCE_LEN;
        let mut out = Vec::with_capacity(header_len + plaintext.len() + TAG_LEN);
        out.push(ENVELOPE_VERSION);
        out.push(u8::try_from(id.len()).expect("key ids are at most 32 bytes"));
        out.extend_from_slice(id);
        let mut nonce = [0u8; NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let tag = cipher
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), aad, &mut out[header_len..])
            .expect("AES-GCM refuses only inputs over 64 GiB");
        out.extend_from_slice(&tag);
        out
    }

    pub fn encrypt_str(&self, plaintext: &str, aad: &str) -> Vec<u8> {
        self.encrypt(plaintext.as_bytes(), aad.as_bytes())
    }

    /// Opens an envelope under the key it names, checking it against `aad`. The plaintext is
    /// zeroed when dropped.
    pub fn decrypt(&self, envelope: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let parts = Envelope::split(envelope)?;
        let cipher = self
            .ciphers
            .iter()
            .find(|(id, _)| id.as_str() == parts.key_id)
            .map(|(_, cipher)| cipher)
            .ok_or_else(|| {
                KeyId::parse(parts.key_id).map_or(CryptoError::Malformed, CryptoError::UnknownKey)
            })?;
        let mut plaintext = Zeroizing::new(parts.sealed.to_vec());
        cipher
            .decrypt_in_place_detached(
                Nonce::from_slice(parts.nonce),
                aad,
                &mut plaintext,
                Tag::from_slice(parts.tag),
            )
            .map_err(|_| CryptoError::Authentication)?;
        Ok(plaintext)
    }

    pub fn decrypt_str(
        &self,
        envelope: &[u8],
        aad: &str,
    ) -> Result<Zeroizing<String>, CryptoError> {
        let mut bytes = self.decrypt(envelope, aad.as_bytes())?;
        match String::from_utf8(std::mem::take(&mut *bytes)) {
            Ok(text) => Ok(Zeroizing::new(text)),
            Err(err) => {
                err.into_bytes().zeroize();
                Err(CryptoError::NotText)
            }
        }
    }

    /// The key id an envelope was written under, without decrypting: rotation looks for rows
    /// whose id is not [`Self::active_key_id`].
    pub fn key_id_of(envelope: &[u8]) -> Result<&str, CryptoError> {
        Envelope::split(envelope).map(|parts| parts.key_id)
    }

    /// Whether an envelope was written under a key other than the active one.
    pub fn needs_reencryption(&self, envelope: &[u8]) -> Result<bool, CryptoError> {
        Ok(Self::key_id_of(envelope)? != self.active_key_id().as_str())
    }
}

/// The parts of an envelope, borrowed; every length checked before slicing.
struct Envelope<'a> {
    key_id: &'a str,
    nonce: &'a [u8],
    sealed: &'a [u8],
    tag: &'a [u8],
}

impl<'a> Envelope<'a> {
    fn split(envelope: &'a [u8]) -> Result<Self, CryptoError> {
        let (&version, rest) = envelope.split_first().ok_or(CryptoError::Malformed)?;
        if version != ENVELOPE_VERSION {
            return Err(CryptoError::UnsupportedVersion(version));
        }
        let (&id_len, rest) = rest.split_first().ok_or(CryptoError::Malformed)?;
        let id_len = usize::from(id_len);
        if id_len > MAX_KEY_ID_LEN || rest.len() < id_len + NONCE_LEN + TAG_LEN {
            return Err(CryptoError::Malformed);
        }
        let (key_id, rest) = rest.split_at(id_len);
        let key_id = std::str::from_utf8(key_id)
            .ok()
            .filter(|id| KeyId::is_valid(id))
            .ok_or(CryptoError::Malformed)?;
        let (nonce, rest) = rest.split_at(NONCE_LEN);
        let (sealed, tag) = rest.split_at(rest.len() - TAG_LEN);
        Ok(Self {
            key_id,
            nonce,
            sealed,
            tag,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::MasterKey;

    fn ring(ids: &[&str]) -> Keyring {
        let mut keys = ids
            .iter()
            .map(|id| (KeyId::parse(id).unwrap(), MasterKey::generate()));
        let ring = Keyring::new(keys.next().unwrap());
        keys.fold(ring, |ring, key| ring.with_retired(key).unwrap())
    }

    #[test]
    fn a_ciphertext_decrypts_under_its_own_key_after_rotation() {
        let old_b64 = MasterKey::generate().to_base64();
        let old_spec = format!("k1:{}", old_b64.as_str());
        let old = FieldCipher::new(&Keyring::parse(&old_spec).unwrap());
        let aad = field_aad("patients.given_name", "p1");
        let sealed = old.encrypt_str("Zebediah", &aad);

        let new_b64 = MasterKey::generate().to_base64();
        let rotated_spec = format!("k2:{},{old_spec}", new_b64.as_str());
        let rotated = FieldCipher::new(&Keyring::parse(&rotated_spec).unwrap());
        assert_eq!(*rotated.active_key_id(), "k2");
        assert_eq!(FieldCipher::key_id_of(&sealed).unwrap(), "k1");
        assert!(rotated.needs_reencryption(&sealed).unwrap());
        assert_eq!(
            rotated.decrypt_str(&sealed, &aad).unwrap().as_str(),
            "Zebediah"
        );
        let resealed = rotated.encrypt_str("Zebediah", &aad);
        assert_eq!(FieldCipher::key_id_of(&resealed).unwrap(), "k2");
        assert!(!rotated.needs_reencryption(&resealed).unwrap());
    }

    #[test]
    fn a_ciphertext_under_a_dropped_key_names_that_key() {
        let sealed = FieldCipher::new(&ring(&["k1"])).encrypt(b"x", b"a");
        let err = FieldCipher::new(&ring(&["k2"]))
            .decrypt(&sealed, b"a")
            .unwrap_err();
        assert_eq!(err, CryptoError::UnknownKey(KeyId::parse("k1").unwrap()));
    }

    #[test]
    fn a_tampered_ciphertext_is_refused() {
        let c = FieldCipher::new(&ring(&["k1"]));
        let sealed = c.encrypt_str("1961-07-04", "patients.birth_date:p1");
        // Every byte after the key id: nonce, ciphertext and tag.
        for i in 4..sealed.len() {
            let mut tampered = sealed.clone();
            tampered[i] ^= 0x01;
            assert_eq!(
                c.decrypt(&tampered, b"patients.birth_date:p1"),
                Err(CryptoError::Authentication),
                "byte {i}"
            );
        }
        let mut longer = sealed.clone();
        longer.push(0);
        assert!(c.decrypt(&longer, b"patients.birth_date:p1").is_err());
    }

    #[test]
    fn a_ciphertext_moved_to_another_row_is_refused() {
        let c = FieldCipher::new(&ring(&["k1"]));
        let sealed = c.encrypt_str("Quackenbush", &field_aad("patients.family_name", "p1"));
        for elsewhere in [
            field_aad("patients.family_name", "p2"),
            field_aad("patients.given_name", "p1"),
            String::new(),
        ] {
            assert_eq!(
                c.decrypt_str(&sealed, &elsewhere),
                Err(CryptoError::Authentication)
            );
        }
    }

    #[test]
    fn two_encryptions_of_the_same_value_differ() {
        let c = FieldCipher::new(&ring(&["k1"]));
        let (a, b) = (c.encrypt_str("same", "a"), c.encrypt_str("same", "a"));
        assert_ne!(a, b);
        assert_ne!(a[4..16], b[4..16], "nonces differ");
    }

    #[test]
    fn the_envelope_is_sized_exactly_and_names_its_version_and_key() {
        let c = FieldCipher::new(&ring(&["key-7"]));
        let sealed = c.encrypt(b"12345", b"");
        assert_eq!(sealed.len(), 2 + 5 + NONCE_LEN + 5 + TAG_LEN);
        assert_eq!(sealed.capacity(), sealed.len());
        assert_eq!(&sealed[..7], b"\x01\x05key-7");
        assert_eq!(c.decrypt(&sealed, b"").unwrap().as_slice(), b"12345");
        let empty = c.encrypt(b"", b"");
        assert_eq!(c.decrypt(&empty, b"").unwrap().as_slice(), b"");
    }

    #[test]
    fn garbage_input_is_an_error_not_a_panic() {
        let c = FieldCipher::new(&ring(&["k1"]));
        let sealed = c.encrypt_str("x", "a");
        let mut cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![1],
            vec![1, 2, b'k'],
            vec![1, 255, 0],
            vec![1, 0, 0, 0],
            b"\x01\x02k1short".to_vec(),
            b"\x01\x02k:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".to_vec(),
            vec![
                1, 2, 0xff, 0xfe, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                0, 0, 0,
            ],
        ];
        cases.extend((0..sealed.len()).map(|n| sealed[..n].to_vec()));
        for garbage in &cases {
            assert!(c.decrypt(garbage, b"a").is_err(), "{garbage:?}");
            let _ = FieldCipher::key_id_of(garbage);
        }
        let mut future = sealed.clone();
        future[0] = 2;
        assert_eq!(
            c.decrypt(&future, b"a"),
            Err(CryptoError::UnsupportedVersion(2))
        );
    }

    #[test]
    fn binary_plaintext_is_not_returned_as_text() {
        let c = FieldCipher::new(&ring(&["k1"]));
        let sealed = c.encrypt(&[0xff, 0xfe], b"a");
        assert_eq!(c.decrypt_str(&sealed, "a"), Err(CryptoError::NotText));
    }
}
