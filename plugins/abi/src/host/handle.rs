//! [`PluginHost`] (the plugin directory and the libraries loaded from it) and [`PluginHandle`]
//! (one usable plugin: its description, its worker thread, its timeout and default config).
//! A dylib plugin and an in-process plugin are the same `PluginHandle`; only the executor
//! behind the worker differs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use super::config::PluginConfig;
use super::dylib::{self, DylibExecutor};
use super::worker::{Executor, Worker};
use super::{confine, HostError};
use crate::export::dispatch;
use crate::ffi::PluginV1;
use crate::plugin::{
    CallContext, DescribeReply, Method, NativeHost, NativeProgress, Plugin, PluginError, PluginKind,
};

use super::worker::{HostService, ProgressSink};

/// How long `describe` may take when a plugin is loaded.
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a plugin's code lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PluginSource {
    /// A library loaded from the plugin directory (canonical path).
    Dylib {
        /// The canonical path of the library.
        path: PathBuf,
    },
    /// A [`Plugin`] compiled into the host.
    InProcess,
}

/// What the host knows about a loaded plugin: its table and its `describe` answer. Serialises
/// to the shape `GET /v1/plugins` lists.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PluginInfo {
    /// The plugin's own name.
    pub name: String,
    /// Trainer or reward.
    pub kind: PluginKind,
    /// The ABI version it was built against (equal to the host's, or it would not load).
    pub abi_version: u32,
    /// The plugin's own version.
    pub version: String,
    /// One sentence.
    pub summary: String,
    /// JSON Schema of its config.
    pub config_schema: Value,
    /// Dylib path or in-process.
    pub source: PluginSource,
}

/// Per-call settings; `CallOptions::default()` uses the handle's timeout, a fresh cancel flag
/// and no progress listener.
#[derive(Clone, Default)]
pub struct CallOptions {
    /// Overrides the handle's timeout for this call.
    pub timeout: Option<Duration>,
    /// A flag the caller may set to ask the plugin to stop (a cancelled training job). The
    /// host also sets it when the call times out.
    pub cancel: Option<Arc<AtomicBool>>,
    /// Receives the call's progress reports.
    pub progress: Option<ProgressSink>,
    /// Services the plugin may ask of the host during the call (in-process plugins only).
    pub host: Option<HostService>,
}

impl std::fmt::Debug for CallOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallOptions")
            .field("timeout", &self.timeout)
            .field("cancel", &self.cancel)
            .field("progress", &self.progress.as_ref().map(|_| "<sink>"))
            .field("host", &self.host.as_ref().map(|_| "<service>"))
            .finish()
    }
}

struct Inner {
    info: PluginInfo,
    /// The `[[plugins]]` name, when loaded from config.
    config_name: Option<String>,
    timeout: Duration,
    default_config: Value,
    worker: Worker,
}

/// One loaded plugin, ready to call. Cheap to clone and `Send + Sync`; every call runs on the
/// plugin's own worker thread and blocks the caller until it returns or times out (from async
/// code, call it inside `tokio::task::spawn_blocking`).
#[derive(Clone)]
pub struct PluginHandle {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PluginHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginHandle")
            .field("info", &self.inner.info)
            .field("config_name", &self.inner.config_name)
            .field("timeout", &self.inner.timeout)
            .finish()
    }
}

struct InProcessExecutor<P: Plugin> {
    plugin: P,
}

impl<P: Plugin> Executor for InProcessExecutor<P> {
    fn execute(
        &self,
        method: Method,
        input: &[u8],
        cancel: &AtomicBool,
        progress: Option<NativeProgress<'_>>,
        host: Option<NativeHost<'_>>,
    ) -> Result<Vec<u8>, String> {
        let ctx = CallContext::native(cancel, progress, host);
        Ok(dispatch(|| &self.plugin, method, input, &ctx))
    }
}

impl PluginHandle {
    /// Wraps a plugin compiled into the host; it runs on its own worker thread exactly as a
    /// loaded library would (same JSON envelope, panics caught, timeouts, stalls).
    pub fn in_process<P: Plugin>(plugin: P) -> Result<PluginHandle, HostError> {
        let worker = Worker::spawn(P::NAME, Box::new(InProcessExecutor { plugin }))?;
        let info = describe_on(&worker, P::NAME, P::KIND, PluginSource::InProcess)?;
        Ok(PluginHandle::new(info, worker))
    }

    fn new(info: PluginInfo, worker: Worker) -> PluginHandle {
        let timeout = Duration::from_secs_f64(match info.kind {
            PluginKind::Reward => super::DEFAULT_REWARD_TIMEOUT_SECS,
            PluginKind::Trainer => super::DEFAULT_TRAINER_TIMEOUT_SECS,
        });
        PluginHandle {
            inner: Arc::new(Inner {
                info,
                config_name: None,
                timeout,
                default_config: Value::Null,
                worker,
            }),
        }
    }

    fn configured(self, entry: &PluginConfig) -> PluginHandle {
        // Only called right after construction, so the Arc is unique.
        match Arc::try_unwrap(self.inner) {
            Ok(mut inner) => {
                inner.config_name = Some(entry.name.clone());
                inner.timeout = entry.timeout();
                inner.default_config = entry.config.clone();
                PluginHandle {
                    inner: Arc::new(inner),
                }
            }
            Err(inner) => PluginHandle { inner },
        }
    }

    /// The plugin's description.
    pub fn info(&self) -> &PluginInfo {
        &self.inner.info
    }

    /// The `[[plugins]]` name if loaded from config, else the plugin's own name.
    pub fn name(&self) -> &str {
        self.inner
            .config_name
            .as_deref()
            .unwrap_or(&self.inner.info.name)
    }

    /// The per-call timeout used when [`CallOptions::timeout`] is unset.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// Asks the plugin whether `config` is acceptable (a reward rule set for an adapter, a
    /// trainer's hyper-parameters).
    pub fn validate_config(&self, config: &Value) -> Result<(), HostError> {
        self.call(Method::ValidateConfig, config, CallOptions::default())
            .map(|_| ())
    }

    /// Runs the plugin on `request`. If the request is an object without a `config` field and
    /// the handle has a `[[plugins]]` config, that config is added as `config`.
    pub fn run(&self, request: &Value, options: CallOptions) -> Result<Value, HostError> {
        let default = &self.inner.default_config;
        match request {
            Value::Object(map) if !default.is_null() && !map.contains_key("config") => {
                let mut map = map.clone();
                map.insert("config".to_string(), default.clone());
                self.call(Method::Run, &Value::Object(map), options)
            }
            _ => self.call(Method::Run, request, options),
        }
    }

    /// Calls one method with a JSON input and decodes the reply envelope.
    pub fn call(
        &self,
        method: Method,
        input: &Value,
        options: CallOptions,
    ) -> Result<Value, HostError> {
        let bytes = serde_json::to_vec(input).map_err(|source| HostError::Encode {
            plugin: self.name().to_string(),
            source,
        })?;
        let raw = self.inner.worker.call(
            method,
            bytes,
            options.timeout.unwrap_or(self.inner.timeout),
            options.cancel.unwrap_or_default(),
            options.progress,
            options.host,
        )?;
        decode_reply(&self.inner.info.name, method, raw)
    }
}

fn describe_on(
    worker: &Worker,
    name: &str,
    kind: PluginKind,
    source: PluginSource,
) -> Result<PluginInfo, HostError> {
    let raw = worker.call(
        Method::Describe,
        Vec::new(),
        DESCRIBE_TIMEOUT,
        Arc::default(),
        None,
        None,
    )?;
    let value = decode_reply(name, Method::Describe, raw)?;
    let reply: DescribeReply =
        serde_json::from_value(value).map_err(|e| HostError::InvalidReply {
            plugin: name.to_string(),
            method: Method::Describe,
            reason: format!("the description does not have the documented fields: {e}"),
        })?;
    if reply.name != name || reply.kind != kind || reply.abi_version != crate::ABI_VERSION {
        return Err(HostError::InvalidReply {
            plugin: name.to_string(),
            method: Method::Describe,
            reason: format!(
                "it describes itself as {} ({}, ABI {}) but its table says {name} ({kind}, ABI {})",
                reply.name,
                reply.kind,
                reply.abi_version,
                crate::ABI_VERSION
            ),
        });
    }
    Ok(PluginInfo {
        name: reply.name,
        kind: reply.kind,
        abi_version: reply.abi_version,
        version: reply.version,
        summary: reply.summary,
        config_schema: reply.config_schema,
        source,
    })
}

const PREVIEW_BYTES: usize = 80;

pub(crate) fn decode_reply(
    plugin: &str,
    method: Method,
    raw: Result<Vec<u8>, String>,
) -> Result<Value, HostError> {
    let invalid = |reason: String| HostError::InvalidReply {
        plugin: plugin.to_string(),
        method,
        reason,
    };
    let bytes = raw.map_err(invalid)?;
    let doc: Value = serde_json::from_slice(&bytes).map_err(|e| {
        let end = bytes.len().min(PREVIEW_BYTES);
        invalid(format!(
            "not JSON ({e}); it starts with {:?}",
            String::from_utf8_lossy(&bytes[..end])
        ))
    })?;
    let shape = "expected {\"ok\": ...} or {\"error\": {\"message\": ...}}";
    let Value::Object(mut map) = doc else {
        return Err(invalid(format!("{shape}, got a non-object")));
    };
    if map.len() != 1 {
        return Err(invalid(format!(
            "{shape}, got an object with keys {:?}",
            map.keys().collect::<Vec<_>>()
        )));
    }
    if let Some(ok) = map.remove("ok") {
        return Ok(ok);
    }
    if let Some(err) = map.remove("error") {
        let e: PluginError = serde_json::from_value(err)
            .map_err(|e| invalid(format!("its error object is malformed: {e}")))?;
        return Err(HostError::Plugin {
            plugin: plugin.to_string(),
            method,
            message: e.message,
            code: e.code,
        });
    }
    Err(invalid(format!(
        "{shape}, got an object with keys {:?}",
        map.keys().collect::<Vec<_>>()
    )))
}

/// The plugin directory and the libraries loaded from it. One per server; `Send + Sync`.
pub struct PluginHost {
    dir: PathBuf,
    /// Tables of opened libraries by canonical path, so loading a library twice (two
    /// `[[plugins]]` entries) opens it once; each load still gets its own worker.
    libraries: Mutex<HashMap<PathBuf, (&'static PluginV1, String, PluginKind)>>,
}

impl std::fmt::Debug for PluginHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginHost")
            .field("dir", &self.dir)
            .finish()
    }
}

impl PluginHost {
    /// A host that loads only from `plugin_dir` (which must exist).
    pub fn new(plugin_dir: impl AsRef<Path>) -> Result<PluginHost, HostError> {
        let given = plugin_dir.as_ref();
        let dir = given
            .canonicalize()
            .map_err(|source| HostError::PluginDir {
                dir: given.to_path_buf(),
                source,
            })?;
        if !dir.is_dir() {
            return Err(HostError::PluginDir {
                dir: given.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
            });
        }
        Ok(PluginHost {
            dir,
            libraries: Mutex::new(HashMap::new()),
        })
    }

    /// The canonical plugin directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Loads the library at `path` (relative to the plugin directory, or absolute inside it):
    /// confines the path, checks the entry symbol and the ABI version before anything else,
    /// starts the worker and asks the plugin to describe itself.
    pub fn load(&self, path: impl AsRef<Path>) -> Result<PluginHandle, HostError> {
        let canonical = confine(path.as_ref(), &self.dir)?;
        let (table, name, kind) = {
            let mut libs = self.libraries.lock().unwrap_or_else(|e| e.into_inner());
            match libs.get(&canonical) {
                Some(entry) => entry.clone(),
                None => {
                    let opened = dylib::open(&canonical)?;
                    let entry = (opened.table, opened.name, opened.kind);
                    libs.insert(canonical.clone(), entry.clone());
                    entry
                }
            }
        };
        let worker = Worker::spawn(&name, Box::new(DylibExecutor { table }))?;
        let info = describe_on(
            &worker,
            &name,
            kind,
            PluginSource::Dylib { path: canonical },
        )?;
        Ok(PluginHandle::new(info, worker))
    }

    /// Loads one `[[plugins]]` entry: checks its fields, loads the library, checks the kind,
    /// validates the entry's `config` with the plugin, and applies its timeout and config.
    pub fn load_configured(&self, entry: &PluginConfig) -> Result<PluginHandle, HostError> {
        check_entry(entry)?;
        let handle = self.load(&entry.path)?;
        check_and_configure(handle, entry)
    }
}

fn check_entry(entry: &PluginConfig) -> Result<(), HostError> {
    entry.validate().map_err(|message| HostError::Config {
        plugin: entry.name.clone(),
        message,
    })
}

/// Checks a freshly made handle against its `[[plugins]]` entry and applies it. Shared by the
/// dylib path and [`PluginHandle::in_process_configured`].
fn check_and_configure(
    handle: PluginHandle,
    entry: &PluginConfig,
) -> Result<PluginHandle, HostError> {
    if handle.info().kind != entry.kind {
        return Err(HostError::KindMismatch {
            plugin: handle.info().name.clone(),
            expected: entry.kind,
            actual: handle.info().kind,
        });
    }
    if !entry.config.is_null() {
        handle.validate_config(&entry.config)?;
    }
    Ok(handle.configured(entry))
}

impl PluginHandle {
    /// [`PluginHandle::in_process`] with a `[[plugins]]` entry applied (kind check, config
    /// validation, timeout, default config); the entry's `path` is ignored.
    pub fn in_process_configured<P: Plugin>(
        plugin: P,
        entry: &PluginConfig,
    ) -> Result<PluginHandle, HostError> {
        check_entry(entry)?;
        check_and_configure(PluginHandle::in_process(plugin)?, entry)
    }
}
