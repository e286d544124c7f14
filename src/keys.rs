//! Where the master key comes from: `master_key` (FHIRGATE_MASTER_KEY), else `master_key_file`,
//! else, outside production only, a development key generated once and kept beside the
//! embedded database. Keys never come from the database and are never logged.

use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::config::{Environment, Settings};
use crate::crypto::{CryptoError, Keyring, MasterKey};

#[derive(Debug, thiserror::Error)]
pub enum MasterKeyError {
    #[error("FHIRGATE_ENV=production requires FHIRGATE_MASTER_KEY or master_key_file")]
    MissingInProduction,
    #[error("cannot write the development key {path}: {reason}")]
    DevKey { path: String, reason: String },
    #[error(transparent)]
    Spec(CryptoError),
}

/// The configured keyring: the master keys, never stored in the database.
pub struct MasterSecret {
    keyring: Keyring,
}

/// Where a development key is kept when none is configured.
pub const DEV_KEY_FILE: &str = "data/dev-master.key";

impl MasterSecret {
    pub fn from_settings(settings: &Settings) -> Result<Self, MasterKeyError> {
        let keyring = if !settings.master_key.is_empty() {
            Keyring::parse(settings.master_key.expose())
        } else if !settings.master_key_file.is_empty() {
            load_file(Path::new(&settings.master_key_file))
        } else if settings.env == Environment::Production {
            return Err(MasterKeyError::MissingInProduction);
        } else {
            ensure_dev_key(Path::new(DEV_KEY_FILE))?;
            load_file(Path::new(DEV_KEY_FILE))
        };
        Ok(Self {
            keyring: keyring.map_err(MasterKeyError::Spec)?,
        })
    }

    /// Parses `KEYID:BASE64[,KEYID:BASE64...]`; the first key is the active one.
    pub fn parse(spec: &str) -> Result<Self, MasterKeyError> {
        Ok(Self {
            keyring: Keyring::parse(spec).map_err(MasterKeyError::Spec)?,
        })
    }

    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// The HMAC key for the gateway's access tokens: an HKDF subkey of the active master key
    /// (its own info string, so the master key itself is never used for two purposes).
    pub fn derive_token_secret(&self) -> Zeroizing<[u8; 32]> {
        self.keyring.active().derive(b"fhirgate access token v1")
    }
}

/// Why a rotation stopped. Names key ids and counts, never content.
#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    #[error("storage: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error(
        "a stored version does not open ({0}); rows already re-encrypted stay so, run again \
         once the key spec holds every key in use"
    )]
    Crypto(#[from] CryptoError),
}

/// Re-encrypts every stored resource version that is not under the vault's active key, `batch`
/// rows per transaction, and returns how many were re-encrypted. Safe while the gateway serves
/// (each row is replaced only if still under the key it was read with; old keys keep decrypting
/// until the end) and resumable: stopped at any point, a new run continues with what is left.
/// `progress` is told the running total after each batch.
pub async fn rotate_sealed(
    store: &dyn crate::store::Store,
    vault: &crate::crypto::PhiVault,
    batch: i64,
    mut progress: impl FnMut(u64),
) -> Result<u64, RotationError> {
    use crate::crypto::VersionRef;
    let active = vault.active_key_id().as_str().to_owned();
    let mut done = 0;
    loop {
        let rows = store.sealed_not_under(&active, batch.max(1)).await?;
        if rows.is_empty() {
            return Ok(done);
        }
        let mut resealed = Vec::with_capacity(rows.len());
        for row in rows {
            let at = VersionRef {
                practice_id: &row.practice_id,
                resource_type: &row.resource_type,
                id: &row.id,
                version_id: row.version_id,
            };
            let plain = vault.open(at, &row.content)?;
            let (key_id, sealed) = vault.seal(at, &plain);
            resealed.push((row, key_id, sealed));
        }
        done += store.reseal(&resealed).await?;
        progress(done);
    }
}

/// Reads a key file, warning when others than its owner may read it.
fn load_file(path: &Path) -> Result<Keyring, CryptoError> {
    if let Some(loose) = crate::crypto::key_file_permission_warning(path) {
        tracing::warn!("{loose}");
    }
    Keyring::from_file(path)
}

/// Creates the development key (mode 0600) on first use, and says so loudly every time.
fn ensure_dev_key(path: &Path) -> Result<(), MasterKeyError> {
    if path.exists() {
        tracing::warn!(file = %path.display(), "using the DEVELOPMENT master key; never use it for real PHI");
        return Ok(());
    }
    let err = |reason: String| MasterKeyError::DevKey {
        path: path.display().to_string(),
        reason,
    };
    let spec = Zeroizing::new(format!(
        "dev1:{}",
        MasterKey::generate().to_base64().as_str()
    ));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| err(e.kind().to_string()))?;
    }
    match write_private(&PathBuf::from(path), spec.as_bytes()) {
        Ok(()) => {}
        // Another process created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(err(e.kind().to_string())),
    }
    tracing::warn!(file = %path.display(), "GENERATED a DEVELOPMENT master key; set FHIRGATE_MASTER_KEY before storing real PHI");
    eprintln!(
        "fhirgate: WARNING: no master key configured; generated a development key in {}",
        path.display()
    );
    Ok(())
}

#[cfg(unix)]
fn write_private(path: &PathBuf, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

#[cfg(not(unix))]
fn write_private(path: &PathBuf, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn production_without_a_key_is_refused() {
        let s = Settings::from_toml("env = 'production'").unwrap();
        assert!(matches!(
            MasterSecret::from_settings(&s),
            Err(MasterKeyError::MissingInProduction)
        ));
    }

    #[test]
    fn a_configured_key_derives_a_stable_token_secret() {
        let spec = format!(
            "k1:{}",
            MasterKey::from_bytes([9u8; 32]).to_base64().as_str()
        );
        let a = MasterSecret::parse(&spec).unwrap().derive_token_secret();
        let b = MasterSecret::parse(&spec).unwrap().derive_token_secret();
        assert_eq!(*a, *b);
        assert_ne!(a.as_slice(), [9u8; 32].as_slice());
    }

    #[test]
    fn a_short_key_is_refused_without_echoing_it() {
        let err = MasterSecret::parse("k1:c2hvcnQ=")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("32 bytes"));
        assert!(!err.contains("c2hvcnQ"));
    }
}
