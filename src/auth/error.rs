//! Errors and warnings about password and ACL files: always `FILE:LINE: why`.

use std::fmt;
use std::path::PathBuf;

/// Why a password or ACL file cannot be used. Display gives the complete operator message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthFileError {
    /// The file could not be read.
    #[error("{}: cannot read {what}: {source}", path.display())]
    Read {
        path: PathBuf,
        /// "password file" or "ACL file".
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A line is malformed.
    #[error("{}:{line}: {message}", path.display())]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

impl AuthFileError {
    pub(crate) fn line(path: &std::path::Path, line: usize, message: impl Into<String>) -> Self {
        AuthFileError::Line {
            path: path.to_path_buf(),
            line,
            message: message.into(),
        }
    }
}

/// A line that loads but probably does not do what its author meant (mosquitto logs the same
/// warnings, e.g. a `pattern` without `%u` or `%c`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileWarning {
    pub path: PathBuf,
    pub line: usize,
    pub message: String,
}

impl fmt::Display for FileWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.path.display(), self.line, self.message)
    }
}
