//! The host side: load plugins from the configured plugin directory, check their ABI, and call
//! them on a dedicated thread per plugin with a timeout, cancellation and progress. The server
//! uses [`PluginHost`] and [`PluginHandle`] and nothing below them; tests of host logic use
//! [`PluginHandle::in_process`], which runs the same worker without a dylib.
//!
//! Nothing here sandboxes a plugin: confinement to the plugin directory protects against a
//! wrong or injected path, not against the code in a library the operator put there. A plugin
//! that segfaults or calls `abort` takes the process with it; one that panics or hangs does not.

mod config;
mod dylib;
mod error;
mod handle;
mod path;
mod worker;

pub use config::{PluginConfig, DEFAULT_REWARD_TIMEOUT_SECS, DEFAULT_TRAINER_TIMEOUT_SECS};
pub use error::HostError;
pub use handle::{CallOptions, PluginHandle, PluginHost, PluginInfo, PluginSource};
pub use path::confine;
pub use worker::{HostService, Progress, ProgressSink};

#[cfg(test)]
mod tests;
