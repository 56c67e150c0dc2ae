//! The one error type of the adapters crate; the server maps each variant to one HTTP status.

use std::path::PathBuf;

/// Why an adapter operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// The files do not describe an adapter this model can serve (422; nothing changed).
    #[error("invalid adapter: {0}")]
    Invalid(String),
    /// A request named something unusable: a bad adapter name, a path outside the store (400).
    #[error("{0}")]
    BadRequest(String),
    /// No such adapter or version for this tenant (404).
    #[error("{0}")]
    NotFound(String),
    /// An adapter of that name already exists (409).
    #[error("adapter {0:?} already exists")]
    Exists(String),
    /// Compare-and-swap failed: the current version is not the expected one (409).
    #[error("expected current version {expected}, but the current version is {current}")]
    Conflict {
        /// What the caller expected.
        expected: u32,
        /// What is current.
        current: u32,
    },
    /// A limit of the configuration was exceeded (413 for bytes, 422 otherwise).
    #[error("{0}")]
    TooLarge(String),
    /// The store on disk could not be read or written (500).
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A store file exists but is not what we wrote (500; the store needs attention).
    #[error("corrupt store: {0}")]
    Corrupt(String),
}

impl AdapterError {
    /// An I/O error at `path`.
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> AdapterError {
        let path = path.into();
        move |source| AdapterError::Io { path, source }
    }
}
