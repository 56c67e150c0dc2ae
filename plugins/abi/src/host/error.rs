//! The host's one error enum. Every variant names the plugin (or path) it is about, so a
//! failed job or a refused `[[plugins]]` entry explains itself without a log dive.

use std::path::PathBuf;
use std::time::Duration;

use crate::plugin::{Method, PluginKind};

/// Why loading or calling a plugin failed.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The configured plugin directory is missing or unreadable.
    #[error("plugin directory {dir} is not usable: {source}")]
    PluginDir {
        /// The directory as configured.
        dir: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The path resolves outside the plugin directory (absolute path elsewhere, `..`, or a
    /// symlink leading out).
    #[error("plugin path {path} is refused: {reason} (plugins load only from {dir})")]
    OutsidePluginDir {
        /// The path as given.
        path: PathBuf,
        /// The canonical plugin directory.
        dir: PathBuf,
        /// What about the path is wrong.
        reason: String,
    },
    /// The path does not name a readable file.
    #[error("plugin file {path} not found: {source}")]
    NotFound {
        /// The path as given.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The dynamic loader refused the file (not a shared library, missing dependency, ...).
    #[error("cannot load plugin {path}: {message}")]
    Open {
        /// The canonical path.
        path: PathBuf,
        /// The loader's message.
        message: String,
    },
    /// The library loads but does not export the entry symbol.
    #[error("{path} is not a prefix-rft plugin: it does not export `{symbol}`")]
    NotAPlugin {
        /// The canonical path.
        path: PathBuf,
        /// The symbol looked for.
        symbol: String,
    },
    /// The plugin was built against another ABI version.
    #[error(
        "plugin {path} speaks ABI version {plugin_abi} but this host speaks ABI version {host_abi}; rebuild the plugin against prefix-rft-plugin-abi {host_abi}"
    )]
    AbiMismatch {
        /// The canonical path.
        path: PathBuf,
        /// The version in the plugin's table.
        plugin_abi: u32,
        /// [`crate::ABI_VERSION`].
        host_abi: u32,
    },
    /// The entry symbol returned something unusable (null table, bad name or kind).
    #[error("plugin {path} exports a broken table: {reason}")]
    BadTable {
        /// The canonical path.
        path: PathBuf,
        /// What is broken.
        reason: String,
    },
    /// A `[[plugins]]` entry is malformed (name, timeout).
    #[error("invalid [[plugins]] entry {plugin:?}: {message}")]
    Config {
        /// The entry's name.
        plugin: String,
        /// What is wrong.
        message: String,
    },
    /// The plugin is not of the kind its config entry says.
    #[error("plugin {plugin} is a {actual} plugin, but its config entry says {expected}")]
    KindMismatch {
        /// The plugin's name.
        plugin: String,
        /// The kind in the config.
        expected: PluginKind,
        /// The kind the plugin declares.
        actual: PluginKind,
    },
    /// The plugin answered with an error (including a caught panic, code `panic`).
    #[error("plugin {plugin} failed in {method}: {message}")]
    Plugin {
        /// The plugin's name.
        plugin: String,
        /// The call that failed.
        method: Method,
        /// The plugin's message.
        message: String,
        /// The plugin's error code (`invalid_config`, `panic`, ...), if any.
        code: Option<String>,
    },
    /// The plugin answered with something that is not the JSON envelope.
    #[error("plugin {plugin} returned an invalid reply from {method}: {reason}")]
    InvalidReply {
        /// The plugin's name.
        plugin: String,
        /// The call.
        method: Method,
        /// What is wrong with the reply.
        reason: String,
    },
    /// The call did not finish within its timeout; the cancel flag was set.
    #[error("plugin {plugin} did not finish {method} within {timeout:?}; it was asked to cancel")]
    Timeout {
        /// The plugin's name.
        plugin: String,
        /// The call.
        method: Method,
        /// The timeout that elapsed.
        timeout: Duration,
    },
    /// An earlier call timed out and is still running, so this call was refused at once.
    #[error(
        "plugin {plugin} is busy: a {method} call timed out {since:?} ago and has not returned yet"
    )]
    Stalled {
        /// The plugin's name.
        plugin: String,
        /// The call that is stuck.
        method: Method,
        /// How long ago it timed out.
        since: Duration,
    },
    /// The request could not be encoded as JSON.
    #[error("cannot encode the request for plugin {plugin}: {source}")]
    Encode {
        /// The plugin's name.
        plugin: String,
        /// The underlying error.
        source: serde_json::Error,
    },
    /// The plugin's worker thread is gone (it cannot normally die; this is a host bug).
    #[error("plugin {plugin}'s worker thread has stopped")]
    WorkerGone {
        /// The plugin's name.
        plugin: String,
    },
    /// The worker thread could not be started.
    #[error("cannot start a worker thread for plugin {plugin}: {source}")]
    Spawn {
        /// The plugin's name.
        plugin: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl HostError {
    /// True for errors that say "this plugin took too long" (timeout or still stuck), which
    /// the server reports as 504/503 rather than a plugin failure.
    pub fn is_timeout(&self) -> bool {
        matches!(self, HostError::Timeout { .. } | HostError::Stalled { .. })
    }
}
