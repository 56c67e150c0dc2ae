//! Opening a plugin library and reading its table: the only `unsafe` of the host. Order
//! matters: symbol, then the version in the header, and only then the rest of the table.
//! Libraries are leaked on purpose: unloading code that may still run on a stalled worker
//! thread, or that registered thread-locals, is undefined behaviour.

use std::ffi::{c_void, CStr};
use std::path::Path;
use std::sync::atomic::AtomicBool;

use super::worker::Executor;
use super::HostError;
use crate::ffi::{EntryFn, PluginV1, RawCallContext, ABI_VERSION, ENTRY_SYMBOL};
use crate::plugin::{Method, NativeHost, NativeProgress, PluginKind};

/// A library whose version has been checked, with the facts from its table.
pub(crate) struct OpenedLibrary {
    pub table: &'static PluginV1,
    pub name: String,
    pub kind: PluginKind,
}

fn symbol_name() -> String {
    String::from_utf8_lossy(ENTRY_SYMBOL.strip_suffix(b"\0").unwrap_or(ENTRY_SYMBOL)).into_owned()
}

/// Opens `path` (already confined and canonical) and checks it is a plugin of this ABI.
pub(crate) fn open(path: &Path) -> Result<OpenedLibrary, HostError> {
    // Safety: loading runs the library's initialisers; the plugin directory is trusted by
    // configuration (see the module docs of `host`).
    let lib = unsafe { libloading::Library::new(path) }.map_err(|e| HostError::Open {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let lib: &'static libloading::Library = Box::leak(Box::new(lib));
    // Safety: the symbol's type is fixed forever by the ABI contract (`EntryFn`).
    let entry: EntryFn = match unsafe { lib.get::<EntryFn>(ENTRY_SYMBOL) } {
        Ok(sym) => *sym,
        Err(_) => {
            return Err(HostError::NotAPlugin {
                path: path.to_path_buf(),
                symbol: symbol_name(),
            })
        }
    };
    let bad = |reason: &str| HostError::BadTable {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    // Safety: the entry takes nothing and returns a pointer to a static table whose first
    // field is the header; we read the header alone before trusting the layout.
    let header = unsafe { entry() };
    let Some(header_ref) = (unsafe { header.as_ref() }) else {
        return Err(bad("the entry symbol returned a null table"));
    };
    if header_ref.abi_version != ABI_VERSION {
        return Err(HostError::AbiMismatch {
            path: path.to_path_buf(),
            plugin_abi: header_ref.abi_version,
            host_abi: ABI_VERSION,
        });
    }
    // Safety: version 1 guarantees the header is the first field of a `PluginV1`.
    let table: &'static PluginV1 = unsafe { &*(header as *const PluginV1) };
    let name = read_c_str(table.name).ok_or_else(|| bad("the name is null or not UTF-8"))?;
    let kind_str = read_c_str(table.kind).ok_or_else(|| bad("the kind is null or not UTF-8"))?;
    let kind = PluginKind::parse(&kind_str).ok_or_else(|| {
        bad(&format!(
            "unknown kind {kind_str:?} (expected \"trainer\" or \"reward\")"
        ))
    })?;
    Ok(OpenedLibrary { table, name, kind })
}

fn read_c_str(ptr: *const std::ffi::c_char) -> Option<String> {
    if ptr.is_null() {
        return None;
    }
    // Safety: the ABI promises a NUL-terminated static string.
    let s = unsafe { CStr::from_ptr(ptr) };
    s.to_str().ok().map(str::to_string)
}

/// Calls through a version-1 table.
pub(crate) struct DylibExecutor {
    pub table: &'static PluginV1,
}

unsafe extern "C" fn progress_trampoline(
    user: *mut c_void,
    fraction: f64,
    json: *const u8,
    len: usize,
) {
    if user.is_null() {
        return;
    }
    // Safety: `user` points at the `NativeProgress` on the worker's stack for the duration of
    // the `run` call, which is the only time the plugin may call this.
    let f: NativeProgress<'_> = unsafe { *(user as *const NativeProgress<'_>) };
    let bytes = if json.is_null() || len == 0 {
        &[][..]
    } else {
        unsafe { std::slice::from_raw_parts(json, len) }
    };
    // `f` catches its own panics; this guard keeps a host bug from unwinding into C anyway.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(fraction, bytes)));
}

impl Executor for DylibExecutor {
    fn execute(
        &self,
        method: Method,
        input: &[u8],
        cancel: &AtomicBool,
        progress: Option<NativeProgress<'_>>,
        // ABI 1 has no host calls; the plugin's `host_call` answers with an error.
        _host: Option<NativeHost<'_>>,
    ) -> Result<Vec<u8>, String> {
        let t = self.table;
        // Safety: the table passed the version check; input and context outlive the call.
        let buffer = unsafe {
            match method {
                Method::Describe => (t.describe)(),
                Method::ValidateConfig => (t.validate_config)(input.as_ptr(), input.len()),
                Method::Run => {
                    let progress_ref = progress;
                    let raw = RawCallContext {
                        user: match &progress_ref {
                            Some(p) => p as *const NativeProgress<'_> as *mut c_void,
                            None => std::ptr::null_mut(),
                        },
                        progress: progress_ref.map(|_| progress_trampoline as _),
                        cancel: cancel as *const AtomicBool,
                    };
                    (t.run)(input.as_ptr(), input.len(), &raw)
                }
            }
        };
        if buffer.ptr.is_null() {
            return Err("it returned a null buffer".to_string());
        }
        // Safety: the plugin hands over `len` readable bytes until we free them.
        let bytes = unsafe { std::slice::from_raw_parts(buffer.ptr, buffer.len) }.to_vec();
        unsafe { (t.free_buffer)(buffer) };
        Ok(bytes)
    }
}
