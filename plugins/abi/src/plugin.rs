//! The safe side a plugin author writes against: the [`Plugin`] trait, its error type, the
//! call context (progress and cancellation) and the JSON message shapes shared with the host.
//! No raw pointers escape this module's public API.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ffi::{RawCallContext, ABI_VERSION};

/// What a plugin is for; the host checks it against the `kind` of its `[[plugins]]` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PluginKind {
    /// Folds feedback into a new adapter version.
    Trainer,
    /// Scores completions in `[0, 1]`.
    Reward,
}

impl PluginKind {
    /// The wire name (`trainer`, `reward`).
    pub fn as_str(self) -> &'static str {
        match self {
            PluginKind::Trainer => "trainer",
            PluginKind::Reward => "reward",
        }
    }

    /// Parses the wire name.
    pub fn parse(s: &str) -> Option<PluginKind> {
        match s {
            "trainer" => Some(PluginKind::Trainer),
            "reward" => Some(PluginKind::Reward),
            _ => None,
        }
    }
}

impl fmt::Display for PluginKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The three calls of the ABI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// `describe()`.
    Describe,
    /// `validate_config(config)`.
    ValidateConfig,
    /// `run(request, ctx)`.
    Run,
}

impl Method {
    /// The wire name, used in error messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Describe => "describe",
            Method::ValidateConfig => "validate_config",
            Method::Run => "run",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a plugin says about itself beyond its name and kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Description {
    /// The plugin's own version (usually its crate version).
    pub version: String,
    /// One sentence for listings.
    pub summary: String,
    /// A JSON Schema (informative) of the config `validate_config` accepts.
    pub config_schema: Value,
}

/// The full `describe` answer as it crosses the ABI.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DescribeReply {
    /// The plugin's name, equal to the table's.
    pub name: String,
    /// The plugin's kind, equal to the table's.
    pub kind: PluginKind,
    /// The ABI version the plugin was built against.
    pub abi_version: u32,
    /// The plugin's own version.
    pub version: String,
    /// One sentence for listings.
    pub summary: String,
    /// JSON Schema of the config.
    pub config_schema: Value,
}

/// A plugin's error: a message for humans and an optional machine-readable code.
///
/// On the wire: `{"error": {"message": "...", "code": "invalid_config" | null}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginError {
    /// What went wrong, for the job's failure reason or the HTTP error body.
    pub message: String,
    /// A stable code (`invalid_request`, `invalid_config`, `cancelled`, `panic`, ...), if any.
    #[serde(default)]
    pub code: Option<String>,
}

impl PluginError {
    /// Code of errors caused by a malformed request.
    pub const INVALID_REQUEST: &'static str = "invalid_request";
    /// Code of errors caused by a bad config.
    pub const INVALID_CONFIG: &'static str = "invalid_config";
    /// Code of a call that stopped because the host set the cancel flag.
    pub const CANCELLED: &'static str = "cancelled";
    /// Code of a call whose plugin code panicked (set by the export shims).
    pub const PANIC: &'static str = "panic";

    /// An error without a code.
    pub fn new(message: impl Into<String>) -> PluginError {
        PluginError {
            message: message.into(),
            code: None,
        }
    }

    /// An error with a code.
    pub fn with_code(code: &str, message: impl Into<String>) -> PluginError {
        PluginError {
            message: message.into(),
            code: Some(code.to_string()),
        }
    }

    /// The request was malformed.
    pub fn invalid_request(message: impl Into<String>) -> PluginError {
        PluginError::with_code(Self::INVALID_REQUEST, message)
    }

    /// The config was rejected.
    pub fn invalid_config(message: impl Into<String>) -> PluginError {
        PluginError::with_code(Self::INVALID_CONFIG, message)
    }

    /// The call noticed the cancel flag and stopped.
    pub fn cancelled() -> PluginError {
        PluginError::with_code(Self::CANCELLED, "cancelled by the host")
    }
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.code {
            Some(code) => write!(f, "{} ({code})", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for PluginError {}

/// The safe interface a plugin implements; [`export_plugin!`](crate::export_plugin) turns it
/// into the C ABI, and the host's in-process variant calls it directly.
///
/// The host serialises calls on one loaded plugin, but the same library may be loaded under two
/// `[[plugins]]` entries, so implementations must be `Sync` and must not keep per-call state in
/// `self` without a lock.
pub trait Plugin: Send + Sync + 'static {
    /// The plugin's name (`[a-z0-9_-]+`), shown in listings and error messages.
    const NAME: &'static str;
    /// Trainer or reward.
    const KIND: PluginKind;

    /// Version, summary and config schema.
    fn describe(&self) -> Description;

    /// Accepts or rejects a config, with a message naming the offending field.
    fn validate_config(&self, config: &Value) -> Result<(), PluginError>;

    /// Does the work. Long calls report progress and poll [`CallContext::is_cancelled`].
    fn run(&self, request: Value, ctx: &CallContext<'_>) -> Result<Value, PluginError>;
}

/// Builds the `describe` reply from a plugin's constants and description.
pub fn describe_reply<P: Plugin>(plugin: &P) -> DescribeReply {
    let d = plugin.describe();
    DescribeReply {
        name: P::NAME.to_string(),
        kind: P::KIND,
        abi_version: ABI_VERSION,
        version: d.version,
        summary: d.summary,
        config_schema: d.config_schema,
    }
}

/// A progress listener the in-process host passes to a plugin: `(fraction, json detail)`.
pub type NativeProgress<'a> = &'a (dyn Fn(f64, &[u8]) + Sync);

/// Services the in-process host offers a running plugin: `(service, request) → reply`, e.g.
/// `reward` for a trainer scoring rollouts with the adapter's reward plugin.
pub type NativeHost<'a> = &'a (dyn Fn(&str, &Value) -> Result<Value, String> + Sync);

/// What a running call can do besides compute: report progress and notice cancellation.
pub struct CallContext<'a> {
    inner: ContextInner<'a>,
}

enum ContextInner<'a> {
    Raw(&'a RawCallContext),
    Native {
        cancel: &'a AtomicBool,
        progress: Option<NativeProgress<'a>>,
        host: Option<NativeHost<'a>>,
    },
}

static NEVER_CANCELLED: AtomicBool = AtomicBool::new(false);

impl<'a> CallContext<'a> {
    /// A context that is never cancelled and drops progress: for a plugin's own unit tests.
    pub fn detached() -> CallContext<'static> {
        CallContext {
            inner: ContextInner::Native {
                cancel: &NEVER_CANCELLED,
                progress: None,
                host: None,
            },
        }
    }

    /// A context backed by Rust values, used by the host's in-process variant.
    pub fn native(
        cancel: &'a AtomicBool,
        progress: Option<NativeProgress<'a>>,
        host: Option<NativeHost<'a>>,
    ) -> CallContext<'a> {
        CallContext {
            inner: ContextInner::Native {
                cancel,
                progress,
                host,
            },
        }
    }

    /// Asks the host for `service` (e.g. `reward`). Only the in-process host offers services:
    /// ABI 1 has no way back into a host from a library, so a loaded plugin gets an error.
    pub fn host_call(&self, service: &str, request: &Value) -> Result<Value, PluginError> {
        match &self.inner {
            ContextInner::Raw(_) => Err(PluginError::new(format!(
                "the host offers no `{service}` service to library plugins (ABI {})",
                crate::ABI_VERSION
            ))),
            ContextInner::Native { host: None, .. } => Err(PluginError::new(format!(
                "the host offers no `{service}` service to this call"
            ))),
            ContextInner::Native { host: Some(f), .. } => {
                f(service, request).map_err(PluginError::new)
            }
        }
    }

    /// A context backed by the host's C struct.
    ///
    /// # Safety
    /// `raw.cancel` must be a valid pointer and `raw.progress`, if set, callable with
    /// `raw.user`, for `'a`.
    pub(crate) unsafe fn from_raw(raw: &'a RawCallContext) -> CallContext<'a> {
        CallContext {
            inner: ContextInner::Raw(raw),
        }
    }

    /// True once the host has given up on this call; return early (with
    /// [`PluginError::cancelled`]) when it is.
    pub fn is_cancelled(&self) -> bool {
        match &self.inner {
            ContextInner::Raw(raw) => {
                if raw.cancel.is_null() {
                    return false;
                }
                // Safety: the host guarantees the flag outlives the call.
                unsafe { &*raw.cancel }.load(Ordering::Acquire)
            }
            ContextInner::Native { cancel, .. } => cancel.load(Ordering::Acquire),
        }
    }

    /// Reports progress: `fraction` is clamped to `[0, 1]`, `detail` is any JSON (step, loss,
    /// ...). Cheap enough to call once per training step, not once per token.
    pub fn progress(&self, fraction: f64, detail: &Value) {
        let fraction = if fraction.is_finite() {
            fraction.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let Ok(bytes) = serde_json::to_vec(detail) else {
            return;
        };
        match &self.inner {
            ContextInner::Raw(raw) => {
                if let Some(f) = raw.progress {
                    // Safety: the host guarantees `user` and `f` are valid during the call; the
                    // bytes outlive the callback.
                    unsafe { f(raw.user, fraction, bytes.as_ptr(), bytes.len()) }
                }
            }
            ContextInner::Native { progress, .. } => {
                if let Some(f) = progress {
                    f(fraction, &bytes)
                }
            }
        }
    }
}
