//! Keyed blind indexes: equality search over encrypted PHI without decrypting. The index of a
//! value is HMAC-SHA256 under the HKDF subkey `fhirgate blind index v1` of one master key,
//! over the column label (length-prefixed, so columns never collide) and the normalised value
//! (see [`super::normalise`]).
//!
//! Which key: the one whose id the store recorded when it first wrote indexes, given explicitly
//! to [`BlindIndex::new`], never "the active key" nor "the oldest key". An index must not change
//! when the encryption key rotates (every stored index would stop matching, and searches would
//! quietly find nothing), so the two rotations are separate: the encryption key rotates by
//! putting a new key first in the spec; the index key changes only by a re-index that recomputes
//! every index under the new key and then records the new id. Until then the recorded key must
//! stay in the spec, and a spec without it is refused at start-up rather than searched wrongly.
//!
//! What it leaks to a reader of the database: which rows share a value within a column (and so
//! value frequencies), never the value itself without the key. Low-entropy columns (birth dates)
//! are only as safe as the master key. Only exact matches of the normalised value are possible;
//! the FHIR layer indexes name prefixes separately for FHIR's default starts-with match.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{constant_time_eq, CryptoError, KeyId, Keyring};

const BLIND_INDEX_INFO: &[u8] = b"fhirgate blind index v1";

/// Computes blind indexes under one recorded key.
#[derive(Clone)]
pub struct BlindIndex {
    key_id: KeyId,
    /// HMAC already keyed, cloned per value (saves re-hashing the key each time).
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for BlindIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlindIndex")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl BlindIndex {
    /// The index under `key_id`: the id the store recorded with its indexes (for a new store,
    /// record `keyring.active_id()`). Refuses a keyring that no longer holds that key.
    pub fn new(keyring: &Keyring, key_id: &KeyId) -> Result<Self, CryptoError> {
        let key = keyring
            .get(key_id.as_str())
            .ok_or_else(|| CryptoError::BlindIndexKeyMissing(key_id.clone()))?;
        let subkey = key.derive(BLIND_INDEX_INFO);
        let mac = <Hmac<Sha256> as Mac>::new_from_slice(subkey.as_slice())
            .expect("HMAC accepts keys of any length");
        Ok(Self {
            key_id: key_id.clone(),
            mac,
        })
    }

    /// The key these indexes are computed under, to record beside them.
    pub fn key_id(&self) -> &KeyId {
        &self.key_id
    }

    /// The index of `normalised_value` in `column` (a stable label such as `patients.family_name`;
    /// changing a label invalidates that column's indexes).
    pub fn compute(&self, column: &str, normalised_value: &str) -> [u8; 32] {
        let mut mac = self.mac.clone();
        // Column names are code constants far below 4 GiB; the cast cannot truncate.
        mac.update(&(column.len() as u32).to_be_bytes());
        mac.update(column.as_bytes());
        mac.update(normalised_value.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// Whether `stored` is the index of `normalised_value` in `column`, compared in constant time.
    pub fn matches(&self, column: &str, normalised_value: &str, stored: &[u8]) -> bool {
        constant_time_eq(&self.compute(column, normalised_value), stored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{normalise, MasterKey};

    fn id(text: &str) -> KeyId {
        KeyId::parse(text).unwrap()
    }

    fn spec(ids: &[&str]) -> Vec<String> {
        ids.iter()
            .map(|id| format!("{id}:{}", MasterKey::generate().to_base64().as_str()))
            .collect()
    }

    #[test]
    fn the_blind_index_is_equal_for_equal_normalised_values() {
        let ring = Keyring::parse(&spec(&["k1"]).join(",")).unwrap();
        let bi = BlindIndex::new(&ring, ring.active_id()).unwrap();
        let a = normalise::search_string("  Van \t Der BERG ").unwrap();
        let b = normalise::search_string("van der berg").unwrap();
        let stored = bi.compute("patients.family_name", &a);
        assert!(bi.matches("patients.family_name", &b, &stored));
        assert!(!bi.matches("patients.family_name", "van der burg", &stored));
        assert!(!bi.matches("patients.family_name", &b, &stored[..31]));
    }

    #[test]
    fn the_blind_index_differs_per_column() {
        let ring = Keyring::parse(&spec(&["k1"]).join(",")).unwrap();
        let bi = BlindIndex::new(&ring, ring.active_id()).unwrap();
        assert_ne!(
            bi.compute("patients.family_name", "smith"),
            bi.compute("patients.given_name", "smith")
        );
        // The length prefix keeps the column/value boundary unambiguous.
        assert_ne!(bi.compute("ab", "c"), bi.compute("a", "bc"));
    }

    #[test]
    fn the_blind_index_survives_a_rotation_of_the_encryption_key() {
        let keys = spec(&["k2", "k1"]);
        let before = Keyring::parse(&keys[1]).unwrap();
        let stored = BlindIndex::new(&before, &id("k1"))
            .unwrap()
            .compute("patients.mrn", "123");
        let rotated = Keyring::parse(&keys.join(",")).unwrap();
        assert_eq!(*rotated.active_id(), "k2");
        let after = BlindIndex::new(&rotated, &id("k1")).unwrap();
        assert_eq!(after.compute("patients.mrn", "123"), stored);
        let reindexed = BlindIndex::new(&rotated, &id("k2")).unwrap();
        assert_ne!(reindexed.compute("patients.mrn", "123"), stored);
    }

    #[test]
    fn dropping_the_recorded_index_key_is_refused_not_searched_wrongly() {
        let ring = Keyring::parse(&spec(&["k2"]).join(",")).unwrap();
        assert_eq!(
            BlindIndex::new(&ring, &id("k1")).err(),
            Some(CryptoError::BlindIndexKeyMissing(id("k1")))
        );
    }

    #[test]
    fn the_blind_index_key_is_not_the_encryption_key() {
        // Same master key, two purposes: the subkeys (and so the outputs) are unrelated.
        let key = MasterKey::generate();
        assert_ne!(
            *key.derive(BLIND_INDEX_INFO),
            *key.derive(b"fhirgate field encryption v1")
        );
    }
}
