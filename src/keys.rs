//! Where the master key comes from: `master_key` (FHIRGATE_MASTER_KEY), else `master_key_file`,
//! else, outside production only, a development key generated once and kept beside the
//! embedded database. Keys never come from the database and are never logged.

use std::path::{Path, PathBuf};

use base64::Engine;
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::config::{Environment, Settings};

#[derive(Debug, thiserror::Error)]
pub enum MasterKeyError {
    #[error("FHIRGATE_ENV=production requires FHIRGATE_MASTER_KEY or master_key_file")]
    MissingInProduction,
    #[error("cannot read master_key_file {path}: {reason}")]
    File { path: String, reason: String },
    #[error("cannot write the development key {path}: {reason}")]
    DevKey { path: String, reason: String },
    #[error("master key spec is malformed: {0}")]
    Spec(&'static str),
}

/// The active master key (32 bytes), zeroed on drop.
pub struct MasterSecret {
    key: Zeroizing<[u8; 32]>,
}

/// Where a development key is kept when none is configured.
pub const DEV_KEY_FILE: &str = "data/dev-master.key";

impl MasterSecret {
    pub fn from_settings(settings: &Settings) -> Result<Self, MasterKeyError> {
        let spec: Zeroizing<String> = if !settings.master_key.is_empty() {
            Zeroizing::new(settings.master_key.expose().to_owned())
        } else if !settings.master_key_file.is_empty() {
            read_spec(Path::new(&settings.master_key_file))?
        } else if settings.env == Environment::Production {
            return Err(MasterKeyError::MissingInProduction);
        } else {
            dev_key(Path::new(DEV_KEY_FILE))?
        };
        Self::parse(&spec)
    }

    /// Parses `KEYID:BASE64[,KEYID:BASE64...]`; the first key is the active one.
    pub fn parse(spec: &str) -> Result<Self, MasterKeyError> {
        let first = spec.split(',').next().unwrap_or_default().trim();
        let (_id, b64) = first
            .split_once(':')
            .ok_or(MasterKeyError::Spec("expected KEYID:BASE64"))?;
        let bytes = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|_| MasterKeyError::Spec("the key is not base64"))?,
        );
        let key: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| MasterKeyError::Spec("the key must be 32 bytes"))?;
        Ok(Self {
            key: Zeroizing::new(key),
        })
    }

    /// The HMAC key for the gateway's access tokens (HKDF-SHA256, its own info string, so the
    /// master key itself is never used for two purposes).
    pub fn derive_token_secret(&self) -> Zeroizing<[u8; 32]> {
        let hk = Hkdf::<Sha256>::new(None, self.key.as_slice());
        let mut out = Zeroizing::new([0u8; 32]);
        hk.expand(b"fhirgate access token v1", out.as_mut_slice())
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        out
    }
}

fn read_spec(path: &Path) -> Result<Zeroizing<String>, MasterKeyError> {
    std::fs::read_to_string(path)
        .map(|s| Zeroizing::new(s.trim().to_owned()))
        .map_err(|e| MasterKeyError::File {
            path: path.display().to_string(),
            reason: e.kind().to_string(),
        })
}

/// Loads the development key, creating it (mode 0600) on first use, and says so loudly.
fn dev_key(path: &Path) -> Result<Zeroizing<String>, MasterKeyError> {
    if path.exists() {
        tracing::warn!(file = %path.display(), "using the DEVELOPMENT master key; never use it for real PHI");
        return read_spec(path);
    }
    let err = |reason: String| MasterKeyError::DevKey {
        path: path.display().to_string(),
        reason,
    };
    let mut key = Zeroizing::new([0u8; 32]);
    getrandom_fill(key.as_mut_slice());
    let spec = Zeroizing::new(format!(
        "dev1:{}",
        base64::engine::general_purpose::STANDARD.encode(key.as_slice())
    ));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| err(e.kind().to_string()))?;
    }
    match write_private(&PathBuf::from(path), spec.as_bytes()) {
        Ok(()) => {}
        // Another process created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return read_spec(path),
        Err(e) => return Err(err(e.kind().to_string())),
    }
    tracing::warn!(file = %path.display(), "GENERATED a DEVELOPMENT master key; set FHIRGATE_MASTER_KEY before storing real PHI");
    eprintln!(
        "fhirgate: WARNING: no master key configured; generated a development key in {}",
        path.display()
    );
    Ok(spec)
}

fn getrandom_fill(buf: &mut [u8]) {
    use aes_gcm::aead::rand_core::RngCore;
    aes_gcm::aead::OsRng.fill_bytes(buf);
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
            base64::engine::general_purpose::STANDARD.encode([9u8; 32])
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
