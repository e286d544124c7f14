//! The configured master keys: one active key (new ciphertexts) and any retired keys still
//! needed to read older rows during a rotation. Loaded from the master key spec
//! (`FHIRGATE_MASTER_KEY`) or a file holding it; never from the database. Errors name the entry
//! and the rule, never the key.

use std::fmt;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::{CryptoError, KeyId, MasterKey};

/// The active key first, then the retired ones in the order given.
pub struct Keyring {
    keys: Vec<(KeyId, MasterKey)>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("active", self.active_id())
            .field(
                "retired",
                &self.keys[1..].iter().map(|(id, _)| id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Keyring {
    pub fn new(active: (KeyId, MasterKey)) -> Self {
        Self { keys: vec![active] }
    }

    /// Adds a key that still decrypts but no longer encrypts. Refuses an id already present, and
    /// the same key under a second id (a rotation to the old key is no rotation at all).
    pub fn with_retired(mut self, retired: (KeyId, MasterKey)) -> Result<Self, CryptoError> {
        for (id, key) in &self.keys {
            if *id == retired.0 {
                return Err(CryptoError::DuplicateKeyId(retired.0));
            }
            if key.same_key_as(&retired.1) {
                return Err(CryptoError::DuplicateKey(id.clone(), retired.0));
            }
        }
        self.keys.push(retired);
        Ok(self)
    }

    /// Parses the master key spec: `KEYID:KEY[,KEYID:KEY...]`, the first entry active, the rest
    /// retired. `KEY` is base64 or hex of 32 bytes (see [`MasterKey::parse`]); white space around
    /// entries and empty entries are ignored. An entry without `KEYID:` gets
    /// [`KeyId::derived_from`] its key, so a lone key (`FHIRGATE_MASTER_KEY=BASE64`) works too;
    /// name keys explicitly once rotation starts, since the ids end up in every ciphertext.
    pub fn parse(spec: &str) -> Result<Self, CryptoError> {
        let mut ring: Option<Self> = None;
        let entries = spec.split(',').map(str::trim).filter(|e| !e.is_empty());
        for (index, entry) in entries.enumerate() {
            let at = |err: CryptoError| match err {
                CryptoError::InvalidKey(reason) | CryptoError::InvalidKeyId(reason) => {
                    CryptoError::InvalidSpec {
                        entry: index + 1,
                        reason,
                    }
                }
                other => other,
            };
            let pair = match entry.split_once(':') {
                Some((id, key)) => {
                    let key = MasterKey::parse(key).map_err(at)?;
                    (KeyId::parse(id.trim()).map_err(at)?, key)
                }
                None => {
                    let key = MasterKey::parse(entry).map_err(at)?;
                    (KeyId::derived_from(&key), key)
                }
            };
            ring = Some(match ring {
                None => Self::new(pair),
                Some(ring) => ring.with_retired(pair)?,
            });
        }
        ring.ok_or(CryptoError::EmptySpec)
    }

    /// Reads a file holding the spec (surrounding white space ignored). Call
    /// [`key_file_permission_warning`] too and log what it returns.
    pub fn from_file(path: &Path) -> Result<Self, CryptoError> {
        let text = std::fs::read_to_string(path)
            .map(Zeroizing::new)
            .map_err(|e| CryptoError::KeyFile {
                path: path.display().to_string(),
                reason: e.kind().to_string(),
            })?;
        Self::parse(text.trim())
    }

    pub fn active_id(&self) -> &KeyId {
        &self.keys[0].0
    }

    pub fn active(&self) -> &MasterKey {
        &self.keys[0].1
    }

    /// The key named `id`, active or retired.
    pub fn get(&self, id: &str) -> Option<&MasterKey> {
        self.keys
            .iter()
            .find(|(k, _)| k.as_str() == id)
            .map(|(_, key)| key)
    }

    /// Every key id, the active one first.
    pub fn key_ids(&self) -> impl Iterator<Item = &KeyId> {
        self.keys.iter().map(|(id, _)| id)
    }

    pub(crate) fn entries(&self) -> impl Iterator<Item = (&KeyId, &MasterKey)> {
        self.keys.iter().map(|(id, key)| (id, key))
    }
}

/// A key file that users other than its owner can access.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LooseKeyFile {
    pub path: PathBuf,
    /// The permission bits, e.g. `0o644`.
    pub mode: u32,
}

impl fmt::Display for LooseKeyFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "master key file {} is accessible to group or others (mode {:04o}); chmod 600 it",
            self.path.display(),
            self.mode
        )
    }
}

/// Whether the key file's mode lets group or others in (unix; elsewhere always `None`, as is a
/// file that cannot be inspected: [`Keyring::from_file`] reports that). A warning, not a
/// refusal: orchestrators commonly mount secrets 0644 inside a single-user container (the
/// Kubernetes `defaultMode`), where the mode protects nothing and refusing would only break the
/// deployment. Symbolic links are followed, since such mounts are links.
pub fn key_file_permission_warning(path: &Path) -> Option<LooseKeyFile> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o7777;
        (mode & 0o077 != 0).then(|| LooseKeyFile {
            path: path.to_owned(),
            mode,
        })
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str) -> String {
        format!("{id}:{}", MasterKey::generate().to_base64().as_str())
    }

    #[test]
    fn the_first_key_of_the_spec_is_active_and_the_rest_retired() {
        let ring = Keyring::parse(&format!(" {} , {},", entry("k2"), entry("k1"))).unwrap();
        assert_eq!(*ring.active_id(), "k2");
        let ids: Vec<_> = ring.key_ids().map(KeyId::as_str).collect();
        assert_eq!(ids, ["k2", "k1"]);
        assert!(ring.get("k1").is_some() && ring.get("k3").is_none());
    }

    #[test]
    fn a_key_without_an_id_gets_a_derived_one() {
        let key = MasterKey::generate();
        let ring = Keyring::parse(key.to_base64().as_str()).unwrap();
        assert_eq!(*ring.active_id(), KeyId::derived_from(&key));
    }

    #[test]
    fn malformed_specs_are_refused_naming_the_entry() {
        assert_eq!(Keyring::parse(" , ").err(), Some(CryptoError::EmptySpec));
        let bad_id = Keyring::parse(&format!("{},bad id:{}", entry("k1"), "x")).unwrap_err();
        assert!(
            matches!(bad_id, CryptoError::InvalidSpec { entry: 2, .. }),
            "{bad_id}"
        );
        let bad_key = Keyring::parse("k1:c2hvcnQ=").unwrap_err().to_string();
        assert!(
            bad_key.contains("entry 1") && bad_key.contains("32 bytes"),
            "{bad_key}"
        );
        let bad_id = Keyring::parse(&entry("bad id")).unwrap_err().to_string();
        assert!(bad_id.contains("key id must be"), "{bad_id}");
    }

    #[test]
    fn a_key_id_or_a_key_given_twice_is_refused() {
        let dup_id = format!("{},{}", entry("k1"), entry("k1"));
        assert!(matches!(
            Keyring::parse(&dup_id),
            Err(CryptoError::DuplicateKeyId(id)) if id == "k1"
        ));
        let key = MasterKey::generate();
        let b64 = key.to_base64();
        let dup_key = format!("k2:{0},k1:{0}", b64.as_str());
        assert!(matches!(
            Keyring::parse(&dup_key),
            Err(CryptoError::DuplicateKey(..))
        ));
        let ring = Keyring::new((KeyId::parse("k2").unwrap(), MasterKey::generate()));
        assert!(ring
            .with_retired((KeyId::parse("k2").unwrap(), MasterKey::generate()))
            .is_err());
    }

    #[test]
    fn a_key_file_is_read_trimmed_and_a_loose_mode_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        std::fs::write(&path, format!("\n  {}\n", entry("k7"))).unwrap();
        assert_eq!(*Keyring::from_file(&path).unwrap().active_id(), "k7");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let set = |mode| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode));
            set(0o644).unwrap();
            let warning = key_file_permission_warning(&path).unwrap();
            assert_eq!(warning.mode, 0o644);
            assert!(warning.to_string().contains("chmod 600"));
            set(0o600).unwrap();
            assert_eq!(key_file_permission_warning(&path), None);
        }
        let missing = Keyring::from_file(&dir.path().join("absent")).unwrap_err();
        assert!(matches!(missing, CryptoError::KeyFile { .. }), "{missing}");
    }
}
