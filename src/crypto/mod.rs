//! Field-level protection of PHI at rest: AES-256-GCM with a key id in every ciphertext (so rows
//! written under a retired key still decrypt during rotation), and keyed blind indexes
//! (HMAC-SHA256) so equality search works without decrypting. Keys come from the master key spec
//! (`KEYID:BASE64[,KEYID:BASE64...]`, first active), never from the database; each purpose uses
//! its own HKDF-SHA256 subkey. Never logs, formats or returns key material or plaintext in errors.

use std::collections::HashMap;

use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::aead::{Aead, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::{Zeroize, Zeroizing};

/// Envelope format version (first byte of every ciphertext).
const VERSION: u8 = 1;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("master key spec: {0}")]
    Spec(&'static str),
    #[error("ciphertext is malformed")]
    Malformed,
    #[error("ciphertext names a key that is not configured")]
    UnknownKey,
    #[error("ciphertext does not authenticate (tampered, or moved to another row or column)")]
    Authentication,
    #[error("{0}")]
    Normalise(&'static str),
}

/// A 32-byte master key, zeroed on drop and never shown.
pub struct MasterKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(***)")
    }
}

impl MasterKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// Base64 (standard or URL-safe, padded or not) of exactly 32 bytes.
    pub fn parse(text: &str) -> Result<Self, CryptoError> {
        use base64::engine::general_purpose::{
            STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD,
        };
        let text = text.trim();
        let decoded = [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
            .iter()
            .find_map(|engine| engine.decode(text).ok())
            .ok_or(CryptoError::Spec("a key is not base64"))?;
        let decoded = Zeroizing::new(decoded);
        let bytes: [u8; 32] = decoded
            .as_slice()
            .try_into()
            .map_err(|_| CryptoError::Spec("a key must be 32 bytes"))?;
        Ok(Self::from_bytes(bytes))
    }

    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        OsRng.fill_bytes(&mut bytes);
        let key = Self::from_bytes(bytes);
        bytes.zeroize();
        key
    }

    /// A subkey for one purpose (HKDF-SHA256, `info` names the purpose).
    pub fn derive(&self, info: &[u8]) -> Zeroizing<[u8; 32]> {
        let hk = Hkdf::<Sha256>::new(None, self.0.as_slice());
        let mut out = Zeroizing::new([0u8; 32]);
        hk.expand(info, out.as_mut_slice())
            .expect("32 bytes is a valid HKDF-SHA256 length");
        out
    }

    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(self.0.as_slice()))
    }
}

/// The configured master keys: the active one (new ciphertexts) and retired ones (still read).
#[derive(Debug)]
pub struct Keyring {
    active: String,
    keys: Vec<(String, MasterKey)>,
}

fn valid_key_id(id: &str) -> bool {
    (1..=32).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Keyring {
    /// Parses `KEYID:BASE64[,KEYID:BASE64...]`; the first key is active.
    pub fn parse(spec: &str) -> Result<Self, CryptoError> {
        let mut keys: Vec<(String, MasterKey)> = Vec::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (id, key) = part
                .split_once(':')
                .ok_or(CryptoError::Spec("expected KEYID:BASE64[,KEYID:BASE64...]"))?;
            if !valid_key_id(id) {
                return Err(CryptoError::Spec(
                    "a key id must be 1-32 of A-Z a-z 0-9 - _",
                ));
            }
            if keys.iter().any(|(k, _)| k == id) {
                return Err(CryptoError::Spec("a key id appears twice"));
            }
            keys.push((id.to_owned(), MasterKey::parse(key)?));
        }
        let active = keys
            .first()
            .map(|(id, _)| id.clone())
            .ok_or(CryptoError::Spec("no key given"))?;
        Ok(Self { active, keys })
    }

    pub fn active_id(&self) -> &str {
        &self.active
    }

    pub fn active(&self) -> &MasterKey {
        &self.keys[0].1
    }

    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|(id, _)| id.as_str())
    }
}

/// AES-256-GCM over PHI fields. Envelope: `version | key id length | key id | nonce | ciphertext+tag`.
/// The AAD binds a ciphertext to its place (`table.column:row id`), so a value copied to another
/// row or column does not decrypt.
pub struct FieldCipher {
    active: String,
    ciphers: HashMap<String, Aes256Gcm>,
}

impl FieldCipher {
    pub fn new(keyring: &Keyring) -> Self {
        let ciphers = keyring
            .keys
            .iter()
            .map(|(id, key)| {
                let sub = key.derive(b"fhirgate field encryption v1");
                (
                    id.clone(),
                    Aes256Gcm::new_from_slice(sub.as_slice()).expect("32-byte key"),
                )
            })
            .collect();
        Self {
            active: keyring.active.clone(),
            ciphers,
        }
    }

    pub fn active_key_id(&self) -> &str {
        &self.active
    }

    pub fn encrypt(&self, plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
        let cipher = &self.ciphers[&self.active];
        let mut nonce = [0u8; NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        let sealed = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .expect("AES-GCM encryption of an in-memory buffer cannot fail");
        let id = self.active.as_bytes();
        let mut out = Vec::with_capacity(2 + id.len() + NONCE_LEN + sealed.len());
        out.push(VERSION);
        out.push(id.len() as u8);
        out.extend_from_slice(id);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    pub fn encrypt_str(&self, plaintext: &str, aad: &str) -> Vec<u8> {
        self.encrypt(plaintext.as_bytes(), aad.as_bytes())
    }

    /// The key id an envelope was written under (to find rows still under a retired key).
    pub fn key_id_of(envelope: &[u8]) -> Result<&str, CryptoError> {
        let (id, _, _) = split(envelope)?;
        Ok(id)
    }

    pub fn decrypt(&self, envelope: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let (id, nonce, sealed) = split(envelope)?;
        let cipher = self.ciphers.get(id).ok_or(CryptoError::UnknownKey)?;
        cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: sealed, aad })
            .map(Zeroizing::new)
            .map_err(|_| CryptoError::Authentication)
    }

    pub fn decrypt_str(
        &self,
        envelope: &[u8],
        aad: &str,
    ) -> Result<Zeroizing<String>, CryptoError> {
        let bytes = self.decrypt(envelope, aad.as_bytes())?;
        String::from_utf8(bytes.to_vec())
            .map(Zeroizing::new)
            .map_err(|_| CryptoError::Malformed)
    }
}

fn split(envelope: &[u8]) -> Result<(&str, &[u8], &[u8]), CryptoError> {
    let (&version, rest) = envelope.split_first().ok_or(CryptoError::Malformed)?;
    if version != VERSION {
        return Err(CryptoError::Malformed);
    }
    let (&id_len, rest) = rest.split_first().ok_or(CryptoError::Malformed)?;
    let id_len = usize::from(id_len);
    if rest.len() < id_len + NONCE_LEN + TAG_LEN {
        return Err(CryptoError::Malformed);
    }
    let (id, rest) = rest.split_at(id_len);
    let (nonce, sealed) = rest.split_at(NONCE_LEN);
    let id = std::str::from_utf8(id).map_err(|_| CryptoError::Malformed)?;
    Ok((id, nonce, sealed))
}

/// Keyed blind index for equality search over encrypted PHI: HMAC-SHA256 of the normalised
/// value, domain-separated by column. Its key is derived from the *oldest* configured master key
/// (the last in the spec), so rotating the encryption key (adding a new first key) leaves every
/// index valid; retiring that oldest key requires re-indexing, done by `keys rotate`.
pub struct BlindIndex {
    key: Zeroizing<[u8; 32]>,
}

impl BlindIndex {
    pub fn new(keyring: &Keyring) -> Self {
        let oldest = &keyring.keys[keyring.keys.len() - 1].1;
        Self {
            key: oldest.derive(b"fhirgate blind index v1"),
        }
    }

    pub fn compute(&self, column: &str, normalised: &str) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.key.as_slice())
            .expect("HMAC takes any key length");
        mac.update(&(column.len() as u32).to_be_bytes());
        mac.update(column.as_bytes());
        mac.update(normalised.as_bytes());
        mac.finalize().into_bytes().into()
    }
}

/// Normalisations applied before blind indexing, so equal values index equally.
pub mod normalise {
    use super::CryptoError;

    pub fn identifier(value: &str) -> String {
        value.trim().to_owned()
    }

    /// Lower case (Unicode), trimmed, inner white space collapsed to one space.
    pub fn family_name(value: &str) -> String {
        value
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase()
    }

    /// A full date, `YYYY-MM-DD`.
    pub fn birth_date(value: &str) -> Result<String, CryptoError> {
        let format = time::macros::format_description!("[year]-[month]-[day]");
        time::Date::parse(value.trim(), &format)
            .map(|d| d.format(&format).unwrap_or_default())
            .map_err(|_| CryptoError::Normalise("birth date must be YYYY-MM-DD"))
    }
}

/// Constant-time equality of two tags or indexes.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(ids: &[&str]) -> String {
        ids.iter()
            .map(|id| format!("{id}:{}", MasterKey::generate().to_base64().as_str()))
            .collect::<Vec<_>>()
            .join(",")
    }

    #[test]
    fn a_ciphertext_decrypts_under_its_own_key_after_rotation() {
        let old_spec = spec(&["k1"]);
        let old = FieldCipher::new(&Keyring::parse(&old_spec).unwrap());
        let sealed = old.encrypt_str("Zebediah", "patients.given:p1");
        let rotated_spec = format!("{},{old_spec}", spec(&["k2"]));
        let rotated = FieldCipher::new(&Keyring::parse(&rotated_spec).unwrap());
        assert_eq!(rotated.active_key_id(), "k2");
        assert_eq!(FieldCipher::key_id_of(&sealed).unwrap(), "k1");
        assert_eq!(
            rotated
                .decrypt_str(&sealed, "patients.given:p1")
                .unwrap()
                .as_str(),
            "Zebediah"
        );
        assert_eq!(
            FieldCipher::key_id_of(&rotated.encrypt_str("x", "a")).unwrap(),
            "k2"
        );
    }

    #[test]
    fn a_tampered_ciphertext_is_refused() {
        let c = FieldCipher::new(&Keyring::parse(&spec(&["k1"])).unwrap());
        let mut sealed = c.encrypt_str("1961-07-04", "patients.birth_date:p1");
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        assert_eq!(
            c.decrypt(&sealed, b"patients.birth_date:p1"),
            Err(CryptoError::Authentication)
        );
    }

    #[test]
    fn a_ciphertext_moved_to_another_row_is_refused() {
        let c = FieldCipher::new(&Keyring::parse(&spec(&["k1"])).unwrap());
        let sealed = c.encrypt_str("Quackenbush", "patients.family:p1");
        assert!(c.decrypt(&sealed, b"patients.family:p2").is_err());
        assert!(c.decrypt(&sealed, b"patients.given:p1").is_err());
    }

    #[test]
    fn two_encryptions_of_the_same_value_differ() {
        let c = FieldCipher::new(&Keyring::parse(&spec(&["k1"])).unwrap());
        assert_ne!(c.encrypt_str("same", "a"), c.encrypt_str("same", "a"));
    }

    #[test]
    fn garbage_input_is_an_error_not_a_panic() {
        let c = FieldCipher::new(&Keyring::parse(&spec(&["k1"])).unwrap());
        for garbage in [
            &b""[..],
            b"\x01",
            b"\x01\x05k1",
            b"\x02\x02k1aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            &[1, 255, 0],
        ] {
            assert!(c.decrypt(garbage, b"a").is_err());
        }
        let other = FieldCipher::new(&Keyring::parse(&spec(&["zz"])).unwrap());
        assert_eq!(
            other.decrypt(&c.encrypt_str("x", "a"), b"a"),
            Err(CryptoError::UnknownKey)
        );
    }

    #[test]
    fn the_blind_index_is_equal_for_equal_normalised_values_and_differs_per_column() {
        let ring = Keyring::parse(&spec(&["k1"])).unwrap();
        let bi = BlindIndex::new(&ring);
        let a = bi.compute("family", &normalise::family_name("  Van   Der BERG "));
        let b = bi.compute("family", &normalise::family_name("van der berg"));
        assert!(constant_time_eq(&a, &b));
        assert_ne!(
            a,
            bi.compute("given", &normalise::family_name("van der berg"))
        );
        assert!(normalise::birth_date("1961-7-4").is_err());
        assert_eq!(normalise::birth_date(" 1961-07-04 ").unwrap(), "1961-07-04");
    }

    #[test]
    fn the_blind_index_survives_a_rotation_of_the_encryption_key() {
        let old_spec = spec(&["k1"]);
        let before = BlindIndex::new(&Keyring::parse(&old_spec).unwrap()).compute("mrn", "123");
        let rotated = format!("{},{old_spec}", spec(&["k2"]));
        let after = BlindIndex::new(&Keyring::parse(&rotated).unwrap()).compute("mrn", "123");
        assert_eq!(before, after);
    }

    #[test]
    fn a_key_never_appears_in_debug_output_or_errors() {
        let key = MasterKey::generate();
        let b64 = key.to_base64();
        let ring = Keyring::parse(&format!("k1:{}", b64.as_str())).unwrap();
        let shown = format!("{ring:?} {key:?}");
        assert!(!shown.contains(b64.as_str()));
        let err = Keyring::parse("k1:c2hvcnQ=").unwrap_err().to_string();
        assert!(!err.contains("c2hvcnQ"));
    }

    #[test]
    fn malformed_specs_are_refused() {
        assert!(Keyring::parse("").is_err());
        assert!(Keyring::parse("nocolon").is_err());
        assert!(Keyring::parse("bad id:AAAA").is_err());
        let k = MasterKey::generate();
        let dup = format!("k1:{0},k1:{0}", k.to_base64().as_str());
        assert!(Keyring::parse(&dup).is_err());
    }
}
