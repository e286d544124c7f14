//! Why the claim rules could not be loaded at start: always names the file and the key (or line).

use std::path::{Path, PathBuf};

/// A configuration file under the rules directory is missing, unreadable or breaks the schema.
/// The gateway refuses to start with it; the message says where to look.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {key}: {reason}", path.display())]
pub struct LoadError {
    /// The file (or directory) at fault.
    pub path: PathBuf,
    /// Where in it: a YAML key path such as `rules[0].when.cpt[1]`, or `line 12`.
    pub key: String,
    pub reason: String,
}

impl LoadError {
    pub(crate) fn new(path: &Path, key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            path: path.to_path_buf(),
            key: key.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn read(path: &Path, err: &std::io::Error) -> Self {
        Self::new(path, "(file)", format!("cannot be read: {err}"))
    }
}
