//! The C ABI between the prefix-rft host and its plugins (trainer, reward), with a safe side
//! for each: [`Plugin`] + [`export_plugin!`] for plugin authors, `host::PluginHost` (feature
//! `host`, on by default) for the server.
//!
//! # The contract (ABI version 1)
//!
//! **Entry.** A plugin is a shared library (`cdylib`) exporting one C symbol,
//! `prefix_rft_plugin` ([`ffi::ENTRY_SYMBOL`]), of type `extern "C" fn() -> *const
//! PluginHeader` ([`ffi::EntryFn`]). It returns a pointer to a static table whose first field
//! is `abi_version: u32`. The entry must do nothing but return the table: no plugin code
//! (constructors, threads) runs before the host has checked the version.
//!
//! **Versioning.** [`ABI_VERSION`] is bumped (a major bump, there are no minor ones) on *any*
//! change to the layout or meaning of a type in [`ffi`] or of a JSON envelope. The entry's name
//! and signature and the header's position at offset 0 never change, so the host can always
//! read the version. The host refuses a library whose version differs, naming both versions,
//! and calls nothing else in it. A library without the symbol is refused as "not a plugin".
//!
//! **Table ([`ffi::PluginV1`]).** `name` and `kind` (`trainer` | `reward`) are static
//! NUL-terminated UTF-8 strings. `describe()`, `validate_config(json)` and `run(json, ctx)`
//! take JSON as `(ptr, len)` and return JSON as an [`ffi::OwnedBuffer`].
//!
//! **Buffers.** Input buffers belong to the host and are valid only during the call; a plugin
//! copies what it keeps. Returned buffers are allocated by the plugin and belong to it: the host
//! copies the bytes and hands the buffer back through the same table's `free_buffer`, exactly
//! once. Neither side frees the other's memory (they may have different allocators).
//!
//! **Messages.** Every reply is an envelope: `{"ok": <value>}` or `{"error": {"message": str,
//! "code": str|null}}`. `describe` answers `{"ok": {"name", "kind", "abi_version", "version",
//! "summary", "config_schema"}}`; `validate_config` answers `{"ok": null}` or an error with
//! code `invalid_config`; `run`'s result is the plugin kind's own document (for a reward
//! plugin: `{"scores": [f64 in [0, 1]], "details": [...]}`, one score per completion).
//! Anything else is reported by the host as an invalid reply.
//!
//! **Call context ([`ffi::RawCallContext`]).** `run` gets a progress callback
//! `extern "C" fn(user, fraction: f64, json_ptr, json_len)` (optional) with the host's opaque
//! `user` pointer, and `cancel`, a pointer to an `AtomicBool` (a byte that is 0 or 1) that the
//! host sets when the caller gives up. A long call polls it and returns early (code
//! `cancelled`). The context, like the input, is valid only during the call and only on the
//! calling thread.
//!
//! **Panics.** Nothing may unwind across the boundary. [`export_plugin!`] wraps every export
//! in `catch_unwind`, turning a panic into an error with code `panic`. Plugins must be built
//! with `panic = "unwind"` (the default); with `panic = "abort"` a panic ends the server.
//!
//! **Threading.** The host calls one loaded plugin from its own worker thread, one call at a
//! time, and never unloads the library. The same library may back several `[[plugins]]`
//! entries, each with its own worker, so a plugin's state must be `Sync`.
//!
//! # Writing a plugin
//!
//! ```
//! use prefix_rft_plugin_abi::{export_plugin, CallContext, Description, Plugin, PluginError, PluginKind};
//! use serde_json::{json, Value};
//!
//! #[derive(Default)]
//! struct Constant;
//!
//! impl Plugin for Constant {
//!     const NAME: &'static str = "constant";
//!     const KIND: PluginKind = PluginKind::Reward;
//!     fn describe(&self) -> Description {
//!         Description {
//!             version: "0.1.0".into(),
//!             summary: "Scores every completion 0.5".into(),
//!             config_schema: json!({"type": "null"}),
//!         }
//!     }
//!     fn validate_config(&self, _config: &Value) -> Result<(), PluginError> {
//!         Ok(())
//!     }
//!     fn run(&self, request: Value, ctx: &CallContext<'_>) -> Result<Value, PluginError> {
//!         let n = request["completions"].as_array().map_or(0, Vec::len);
//!         if ctx.is_cancelled() {
//!             return Err(PluginError::cancelled());
//!         }
//!         Ok(json!({"scores": vec![0.5; n], "details": vec![Value::Null; n]}))
//!     }
//! }
//!
//! export_plugin!(Constant);
//! ```
//!
//! with `crate-type = ["cdylib", "rlib"]` and `prefix-rft-plugin-abi` as a dependency (default
//! features off: plugins do not need the host).
//!
//! # Configuring plugins (`[[plugins]]`)
//!
//! ```toml
//! [[plugins]]
//! name = "rules"                              # what adapters refer to
//! path = "libprefix_rft_reward_rules.so"      # relative to the plugin directory
//! kind = "reward"                             # must match what the plugin declares
//! timeout_secs = 30                           # per call; default 30 (reward), 21600 (trainer)
//! config = { rules = [{ kind = "max_words", max = 200 }] }  # optional; validated at load
//! ```
//!
//! `path` is resolved inside the plugin directory; `..`, absolute paths elsewhere and symlinks
//! leading out are refused. See `host::PluginConfig`.
//!
//! # Hosting plugins
//!
//! `host::PluginHost::new(dir)` then `load_configured(&entry)` (or `load(path)`) gives a
//! `host::PluginHandle`; `handle.run(&request, CallOptions { .. })` runs a call on the
//! plugin's thread with a timeout, cancellation and progress. A call that times out returns
//! `HostError::Timeout` and sets the cancel flag; until the stuck call returns, further calls
//! fail fast with `HostError::Stalled` rather than queue behind it.

pub mod export;
pub mod ffi;
mod plugin;

#[cfg(feature = "host")]
pub mod host;

pub use ffi::ABI_VERSION;
pub use plugin::{
    describe_reply, CallContext, DescribeReply, Description, Method, NativeHost, NativeProgress,
    Plugin, PluginError, PluginKind,
};
