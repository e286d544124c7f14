//! Master keys and their ids. A `MasterKey` is 32 random bytes kept in one heap box (so moving
//! the value never leaves copies behind) and zeroed on drop; it is never formatted, and parse
//! errors say what shape was expected, never what was given.

use std::fmt;

use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::aead::OsRng;
use base64::Engine;
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use super::CryptoError;

/// The longest key id; it is written into every ciphertext behind a one-byte length.
pub const MAX_KEY_ID_LEN: usize = 32;

const KEY_LEN: usize = 32;
const KEY_RULE: &str =
    "a master key must be 32 bytes, as base64 (standard or URL-safe, padding optional) \
                        or 64 hex digits";

/// The name of a master key (`k1`, `2025-q3`): 1-32 of `A-Z a-z 0-9 - _`. Not secret.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(String);

impl KeyId {
    pub fn parse(id: &str) -> Result<Self, CryptoError> {
        if Self::is_valid(id) {
            Ok(Self(id.to_owned()))
        } else {
            Err(CryptoError::InvalidKeyId(
                "a key id must be 1-32 of A-Z a-z 0-9 - _",
            ))
        }
    }

    /// The id a key gets when the spec names none: `fp` and eight hex digits of an HKDF subkey,
    /// stable for the key and revealing nothing usable about it.
    pub fn derived_from(key: &MasterKey) -> Self {
        let fingerprint = key.derive(b"fhirgate key id v1");
        let mut id = String::with_capacity(10);
        id.push_str("fp");
        for byte in &fingerprint[..4] {
            id.push(char::from(HEX[usize::from(byte >> 4)]));
            id.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
        Self(id)
    }

    pub(crate) fn is_valid(id: &str) -> bool {
        (1..=MAX_KEY_ID_LEN).contains(&id.len())
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for KeyId {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for KeyId {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// A 32-byte master key, zeroed on drop and never shown. Used only through `derive`, one subkey
/// per purpose, never directly.
pub struct MasterKey(Box<Zeroizing<[u8; KEY_LEN]>>);

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(***)")
    }
}

impl MasterKey {
    fn zeroed() -> Self {
        Self(Box::new(Zeroizing::new([0u8; KEY_LEN])))
    }

    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        let mut key = Self::zeroed();
        key.0.copy_from_slice(&bytes);
        key
    }

    /// 64 hex digits, or base64 of exactly 32 bytes (standard or URL-safe, padded or not).
    /// Surrounding white space is ignored.
    pub fn parse(text: &str) -> Result<Self, CryptoError> {
        let text = text.trim();
        let mut key = Self::zeroed();
        // 64 hex digits are also valid base64 (of 48 bytes), so hex is tried first.
        if text.len() == 2 * KEY_LEN && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            for (out, pair) in key.0.iter_mut().zip(text.as_bytes().chunks_exact(2)) {
                *out = (hex_value(pair[0]) << 4) | hex_value(pair[1]);
            }
            return Ok(key);
        }
        use base64::engine::general_purpose::{
            STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD,
        };
        // 32 bytes are 43 characters unpadded, 44 padded; the check keeps decoding bounded.
        if !(43..=44).contains(&text.len()) {
            return Err(CryptoError::InvalidKey(KEY_RULE));
        }
        // Room for the decoder's estimate (up to 33 bytes for 44 characters); zeroed on drop.
        let mut buffer = Zeroizing::new([0u8; KEY_LEN + 3]);
        let decoded = [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
            .iter()
            .find_map(|engine| engine.decode_slice(text, buffer.as_mut_slice()).ok());
        match decoded {
            Some(KEY_LEN) => {
                key.0.copy_from_slice(&buffer[..KEY_LEN]);
                Ok(key)
            }
            _ => Err(CryptoError::InvalidKey(KEY_RULE)),
        }
    }

    /// A fresh key from the operating system's generator (development and tests).
    pub fn generate() -> Self {
        let mut key = Self::zeroed();
        OsRng.fill_bytes(key.0.as_mut_slice());
        key
    }

    /// A subkey for one purpose (HKDF-SHA256; `info` names the purpose and its version).
    pub fn derive(&self, info: &[u8]) -> Zeroizing<[u8; 32]> {
        let hk = Hkdf::<Sha256>::new(None, self.0.as_slice());
        let mut out = Zeroizing::new([0u8; 32]);
        hk.expand(info, out.as_mut_slice())
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        out
    }

    /// Standard padded base64, for writing a generated key into a spec.
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(self.0.as_slice()))
    }

    /// Constant-time comparison, to refuse one key configured under two ids.
    pub(crate) fn same_key_as(&self, other: &MasterKey) -> bool {
        super::constant_time_eq(self.0.as_slice(), other.0.as_slice())
    }
}

/// The value of an ASCII hex digit (the caller has checked it is one).
fn hex_value(digit: u8) -> u8 {
    match digit {
        b'0'..=b'9' => digit - b'0',
        b'a'..=b'f' => digit - b'a' + 10,
        _ => digit - b'A' + 10,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};

    /// Bytes whose base64 uses both `+` and `/` (so standard and URL-safe spellings differ).
    const BYTES: [u8; 32] = [
        0xfb, 0xff, 0xbf, 0x3e, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xa0, 0xb0,
        0xc0, 0xd0, 0xe0, 0xf0, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b,
        0x0c, 0xfe,
    ];

    fn same(a: &MasterKey, b: &MasterKey) -> bool {
        a.same_key_as(b)
    }

    #[test]
    fn a_key_parses_from_every_base64_spelling_and_from_hex() {
        let expected = MasterKey::from_bytes(BYTES);
        for engine in [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD] {
            let text = engine.encode(BYTES);
            assert!(same(&MasterKey::parse(&text).unwrap(), &expected), "{text}");
        }
        let hex: String = BYTES.iter().map(|b| format!("{b:02x}")).collect();
        assert!(same(&MasterKey::parse(&hex).unwrap(), &expected));
        assert!(same(
            &MasterKey::parse(&format!(" {}\n", hex.to_uppercase())).unwrap(),
            &expected
        ));
    }

    #[test]
    fn a_key_that_is_not_32_bytes_is_refused() {
        for bad in [
            String::new(),
            STANDARD.encode([7u8; 31]),
            STANDARD.encode([7u8; 33]),
            STANDARD.encode([7u8; 48]),
            "0".repeat(63),
            "0".repeat(65),
            "g".repeat(64),
            "!".repeat(44),
        ] {
            assert_eq!(
                MasterKey::parse(&bad).err(),
                Some(CryptoError::InvalidKey(KEY_RULE)),
                "{bad}"
            );
        }
    }

    #[test]
    fn generated_keys_differ_and_subkeys_differ_per_purpose() {
        let (a, b) = (MasterKey::generate(), MasterKey::generate());
        assert!(!same(&a, &b));
        assert_ne!(*a.derive(b"one"), *a.derive(b"two"));
        assert_eq!(*a.derive(b"one"), *a.derive(b"one"));
        let reparsed = MasterKey::parse(a.to_base64().as_str()).unwrap();
        assert!(same(&a, &reparsed));
    }

    #[test]
    fn a_key_id_is_short_and_plain() {
        assert_eq!(KeyId::parse("k1").unwrap(), "k1");
        assert_eq!(KeyId::parse("2025-q3_b").unwrap().as_str(), "2025-q3_b");
        for bad in ["", "k 1", "k:1", "ké", &"k".repeat(33)] {
            assert!(KeyId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_derived_key_id_is_stable_and_differs_per_key() {
        let key = MasterKey::from_bytes(BYTES);
        let id = KeyId::derived_from(&key);
        assert_eq!(id, KeyId::derived_from(&MasterKey::from_bytes(BYTES)));
        assert_ne!(id, KeyId::derived_from(&MasterKey::generate()));
        assert!(KeyId::is_valid(id.as_str()) && id.as_str().starts_with("fp"));
    }
}
