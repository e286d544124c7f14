//! The PHI vault: the one object the FHIR layer seals, opens and indexes PHI through. It pairs
//! the field cipher (active key for sealing, any keyring key for opening) with the blind index
//! under the key id the database recorded (see [`super::blind_index`]).

use zeroize::Zeroizing;

use super::{field_aad, BlindIndex, CryptoError, FieldCipher, KeyId, Keyring};

/// The name under which the store records the blind index key id.
pub const BLIND_INDEX_KEY_SETTING: &str = "blind_index_key_id";
/// The name under which the store records [`PhiVault::key_check`].
pub const BLIND_INDEX_CHECK_SETTING: &str = "blind_index_key_check";

/// Where a sealed resource version lives; bound into its ciphertext as associated data, so a
/// ciphertext moved to another practice, resource or version no longer opens.
#[derive(Debug, Clone, Copy)]
pub struct VersionRef<'a> {
    pub practice_id: &'a str,
    pub resource_type: &'a str,
    pub id: &'a str,
    pub version_id: i64,
}

impl VersionRef<'_> {
    fn aad(&self) -> String {
        field_aad(
            "resource_versions.content",
            &format!(
                "{}/{}/{}/{}",
                self.practice_id, self.resource_type, self.id, self.version_id
            ),
        )
    }
}

/// Where a sealed chunk of a bulk export file lives; bound into its ciphertext as associated
/// data, so a chunk moved to another practice, job, file or position no longer opens.
#[derive(Debug, Clone, Copy)]
pub struct ExportChunkRef<'a> {
    pub practice_id: &'a str,
    pub job_id: &'a str,
    pub file_no: i64,
    pub chunk_no: i64,
}

impl ExportChunkRef<'_> {
    fn aad(&self) -> String {
        field_aad(
            "export_chunks.content",
            &format!(
                "{}/{}/{}/{}",
                self.practice_id, self.job_id, self.file_no, self.chunk_no
            ),
        )
    }
}

#[derive(Clone)]
pub struct PhiVault {
    cipher: FieldCipher,
    index: BlindIndex,
}

/// Everything a vault can be made of, before the store has said which key its blind indexes
/// were computed under: the cipher and a blind index under each key of the keyring. Lets the
/// gateway start while migrations are pending and open its vault on first use.
pub struct PhiKeys {
    cipher: FieldCipher,
    indexes: Vec<BlindIndex>,
}

impl PhiKeys {
    pub fn new(keyring: &Keyring) -> Self {
        let indexes = keyring
            .entries()
            .filter_map(|(id, _)| BlindIndex::new(keyring, id).ok())
            .collect();
        Self {
            cipher: FieldCipher::new(keyring),
            indexes,
        }
    }

    /// The key new contents are sealed under.
    pub fn active_key_id(&self) -> &KeyId {
        self.cipher.active_key_id()
    }

    /// The vault whose blind indexes are under `blind_index_key` (the id the store recorded);
    /// refused when the keyring no longer holds that key.
    pub fn vault(&self, blind_index_key: &KeyId) -> Result<PhiVault, CryptoError> {
        let index = self
            .indexes
            .iter()
            .find(|i| i.key_id() == blind_index_key)
            .ok_or_else(|| CryptoError::BlindIndexKeyMissing(blind_index_key.clone()))?;
        Ok(PhiVault {
            cipher: self.cipher.clone(),
            index: index.clone(),
        })
    }
}

impl std::fmt::Debug for PhiVault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PhiVault")
            .field("cipher", &self.cipher)
            .field("index", &self.index)
            .finish()
    }
}

impl PhiVault {
    /// `blind_index_key` is the id the store recorded for its indexes.
    pub fn new(keyring: &Keyring, blind_index_key: &KeyId) -> Result<Self, CryptoError> {
        Ok(Self {
            cipher: FieldCipher::new(keyring),
            index: BlindIndex::new(keyring, blind_index_key)?,
        })
    }

    /// The key new contents are sealed under.
    pub fn active_key_id(&self) -> &KeyId {
        self.cipher.active_key_id()
    }

    /// Seals a resource version's JSON under the active key: (key id, envelope).
    pub fn seal(&self, at: VersionRef<'_>, json: &[u8]) -> (String, Vec<u8>) {
        let sealed = self.cipher.encrypt(json, at.aad().as_bytes());
        (self.cipher.active_key_id().as_str().to_owned(), sealed)
    }

    /// Opens a sealed version (under whichever keyring key sealed it). Zeroed when dropped.
    pub fn open(
        &self,
        at: VersionRef<'_>,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        self.cipher.decrypt(sealed, at.aad().as_bytes())
    }

    /// Seals a chunk of a bulk export file under the active key: (key id, envelope).
    pub fn seal_chunk(&self, at: ExportChunkRef<'_>, ndjson: &[u8]) -> (String, Vec<u8>) {
        let sealed = self.cipher.encrypt(ndjson, at.aad().as_bytes());
        (self.cipher.active_key_id().as_str().to_owned(), sealed)
    }

    /// Opens a sealed export chunk (under whichever keyring key sealed it). Zeroed when dropped.
    pub fn open_chunk(
        &self,
        at: ExportChunkRef<'_>,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        self.cipher.decrypt(sealed, at.aad().as_bytes())
    }

    /// Seals a value stored outside `resources` (a quarantined record...) under the active key,
    /// bound to `aad` (see [`crate::crypto::field_aad`]).
    pub fn seal_field(&self, aad: &str, plaintext: &[u8]) -> Vec<u8> {
        self.cipher.encrypt(plaintext, aad.as_bytes())
    }

    /// Opens what [`PhiVault::seal_field`] sealed. Zeroed when dropped.
    pub fn open_field(&self, aad: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        self.cipher.decrypt(sealed, aad.as_bytes())
    }

    /// Whether a sealed content should be re-sealed under the active key.
    pub fn needs_reseal(&self, sealed: &[u8]) -> Result<bool, CryptoError> {
        self.cipher.needs_reencryption(sealed)
    }

    /// A check value of the blind index key (its index of a fixed label, hex): recorded beside
    /// the key id, it tells a different key under the same id apart before any search runs.
    /// Reveals nothing of the key (an HMAC output).
    pub fn key_check(&self) -> String {
        super::to_hex(&self.index.compute("fhirgate.key-check", ""))
    }

    /// The key id of the blind indexes.
    pub fn blind_index_key_id(&self) -> &KeyId {
        self.index.key_id()
    }

    /// The blind index of an already normalised value in a column label.
    pub fn blind(&self, column: &str, normalised: &str) -> [u8; 32] {
        self.index.compute(column, normalised)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vault(spec: &str, index_key: &str) -> PhiVault {
        let keyring = Keyring::parse(spec).unwrap();
        PhiVault::new(&keyring, &KeyId::parse(index_key).unwrap()).unwrap()
    }

    const K1: &str = "k1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const K2: &str = "k2:HxAREhMUFRYXGBkaGxwdHgABAgMEBQYHCAkKCwwNDg8=";

    fn at(version_id: i64) -> VersionRef<'static> {
        VersionRef {
            practice_id: "p1",
            resource_type: "Patient",
            id: "a",
            version_id,
        }
    }

    #[test]
    fn a_sealed_version_opens_only_in_its_place_and_after_rotation() {
        let old = vault(K1, "k1");
        let (key, sealed) = old.seal(at(1), br#"{"resourceType":"Patient"}"#);
        assert_eq!(key, "k1");
        assert!(
            old.open(at(2), &sealed).is_err(),
            "moved to another version"
        );
        let rotated = vault(&format!("{K2},{K1}"), "k1");
        assert_eq!(
            &**rotated.open(at(1), &sealed).unwrap(),
            br#"{"resourceType":"Patient"}"#
        );
        assert!(rotated.needs_reseal(&sealed).unwrap());
        assert_eq!(rotated.active_key_id().as_str(), "k2");
    }

    #[test]
    fn an_export_chunk_opens_only_at_its_own_job_file_and_position() {
        let v = vault(K1, "k1");
        let at = |job: &'static str, file_no, chunk_no| ExportChunkRef {
            practice_id: "p1",
            job_id: job,
            file_no,
            chunk_no,
        };
        let (key, sealed) = v.seal_chunk(at("j1", 2, 0), b"{\"resourceType\":\"Patient\"}\n");
        assert_eq!(key, "k1");
        assert!(!sealed.windows(7).any(|w| w == b"Patient"));
        assert_eq!(
            &**v.open_chunk(at("j1", 2, 0), &sealed).unwrap(),
            b"{\"resourceType\":\"Patient\"}\n"
        );
        for elsewhere in [at("j2", 2, 0), at("j1", 3, 0), at("j1", 2, 1)] {
            assert!(v.open_chunk(elsewhere, &sealed).is_err());
        }
        // Not interchangeable with a resource version's envelope either.
        assert!(v.open(super::tests::at(1), &sealed).is_err());
    }

    #[test]
    fn blind_indexes_stay_put_when_the_encryption_key_rotates() {
        let before = vault(K1, "k1").blind("Patient.family", "smith");
        let after = vault(&format!("{K2},{K1}"), "k1").blind("Patient.family", "smith");
        assert_eq!(before, after);
        assert!(PhiVault::new(&Keyring::parse(K2).unwrap(), &KeyId::parse("k1").unwrap()).is_err());
        let keys = PhiKeys::new(&Keyring::parse(&format!("{K2},{K1}")).unwrap());
        let from_keys = keys.vault(&KeyId::parse("k1").unwrap()).unwrap();
        assert_eq!(from_keys.blind("Patient.family", "smith"), before);
        assert!(keys.vault(&KeyId::parse("k3").unwrap()).is_err());
    }
}
