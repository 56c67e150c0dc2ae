//! The plugin side of the boundary: [`export_plugin!`](crate::export_plugin) and the shims it expands to. Every shim
//! runs the plugin under `catch_unwind`, so a panic becomes `{"error": {"code": "panic"}}` and
//! never unwinds into the host. The envelope and dispatch logic here is also what the host's
//! in-process variant runs, so both paths answer with the same bytes.

use std::ffi::CString;
use std::panic::{self, AssertUnwindSafe};
use std::sync::OnceLock;

use serde_json::{json, Value};

use crate::ffi::{self, OwnedBuffer, PluginHeader, PluginV1, RawCallContext, ABI_VERSION};
use crate::plugin::{describe_reply, CallContext, Method, Plugin, PluginError};

/// Encodes a result as the wire envelope `{"ok": v}` / `{"error": {"message", "code"}}`.
pub fn encode_envelope(result: Result<Value, PluginError>) -> Vec<u8> {
    let doc = match result {
        Ok(v) => json!({ "ok": v }),
        Err(e) => json!({ "error": { "message": e.message, "code": e.code } }),
    };
    // Serialising a `Value` cannot fail (its numbers are always finite).
    serde_json::to_vec(&doc).unwrap_or_else(|_| {
        br#"{"error":{"message":"plugin could not encode its reply","code":null}}"#.to_vec()
    })
}

/// Runs one method of `plugin` on `input` (JSON bytes) and returns the encoded envelope.
/// `get` is called inside `catch_unwind`, so a plugin constructor that panics is caught too.
#[doc(hidden)]
pub fn dispatch<'p, P: Plugin>(
    get: impl FnOnce() -> &'p P,
    method: Method,
    input: &[u8],
    ctx: &CallContext<'_>,
) -> Vec<u8> {
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| -> Result<Value, PluginError> {
        let plugin = get();
        match method {
            Method::Describe => serde_json::to_value(describe_reply(plugin))
                .map_err(|e| PluginError::new(format!("cannot encode description: {e}"))),
            Method::ValidateConfig => {
                let config = parse_input(input, "config")?;
                plugin.validate_config(&config).map(|()| Value::Null)
            }
            Method::Run => {
                let request = parse_input(input, "request")?;
                plugin.run(request, ctx)
            }
        }
    }));
    let result = match outcome {
        Ok(r) => r,
        Err(payload) => {
            let message = format!(
                "plugin {} panicked in {method}: {}",
                P::NAME,
                panic_message(payload.as_ref())
            );
            // A payload whose destructor panics would abort here; forgetting it costs a few
            // bytes once per panic.
            std::mem::forget(payload);
            Err(PluginError::with_code(PluginError::PANIC, message))
        }
    };
    encode_envelope(result)
}

fn parse_input(input: &[u8], what: &str) -> Result<Value, PluginError> {
    serde_json::from_slice(input)
        .map_err(|e| PluginError::invalid_request(format!("{what} is not valid JSON: {e}")))
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// # Safety
/// `ptr` must be null or valid for `len` bytes.
unsafe fn input_slice<'a>(ptr: *const u8, len: usize) -> &'a [u8] {
    if ptr.is_null() || len == 0 {
        &[]
    } else {
        unsafe { std::slice::from_raw_parts(ptr, len) }
    }
}

/// Shim behind `describe`.
#[doc(hidden)]
pub fn describe_shim<P: Plugin>(get: fn() -> &'static P) -> OwnedBuffer {
    let ctx = CallContext::detached();
    OwnedBuffer::from_vec(dispatch(get, Method::Describe, &[], &ctx))
}

/// Shim behind `validate_config`.
///
/// # Safety
/// `input` must be null or valid for `len` bytes for the duration of the call.
#[doc(hidden)]
pub unsafe fn validate_shim<P: Plugin>(
    get: fn() -> &'static P,
    input: *const u8,
    len: usize,
) -> OwnedBuffer {
    let bytes = unsafe { input_slice(input, len) };
    let ctx = CallContext::detached();
    OwnedBuffer::from_vec(dispatch(get, Method::ValidateConfig, bytes, &ctx))
}

/// Shim behind `run`.
///
/// # Safety
/// `input` must be null or valid for `len` bytes, and `ctx` null or a valid context, for the
/// duration of the call.
#[doc(hidden)]
pub unsafe fn run_shim<P: Plugin>(
    get: fn() -> &'static P,
    input: *const u8,
    len: usize,
    ctx: *const RawCallContext,
) -> OwnedBuffer {
    let bytes = unsafe { input_slice(input, len) };
    let reply = match unsafe { ctx.as_ref() } {
        Some(raw) => {
            let ctx = unsafe { CallContext::from_raw(raw) };
            dispatch(get, Method::Run, bytes, &ctx)
        }
        None => dispatch(get, Method::Run, bytes, &CallContext::detached()),
    };
    OwnedBuffer::from_vec(reply)
}

/// The exported table and the C strings it points into, built once on the first entry call.
#[doc(hidden)]
pub struct Table {
    v1: PluginV1,
    _name: CString,
    _kind: CString,
}

/// The three `extern "C"` shims [`export_plugin!`] generates for one plugin type.
#[doc(hidden)]
pub struct Shims {
    pub describe: unsafe extern "C" fn() -> OwnedBuffer,
    pub validate_config: unsafe extern "C" fn(*const u8, usize) -> OwnedBuffer,
    pub run: unsafe extern "C" fn(*const u8, usize, *const RawCallContext) -> OwnedBuffer,
}

/// Body of the exported entry symbol: builds the table (without constructing the plugin, so
/// the host can check the ABI version before any plugin code runs) and returns its header.
/// Returns null if the name cannot be a C string.
#[doc(hidden)]
pub fn entry<P: Plugin>(
    table: &'static OnceLock<Option<Table>>,
    shims: Shims,
) -> *const PluginHeader {
    let built = panic::catch_unwind(AssertUnwindSafe(|| {
        table.get_or_init(|| {
            let name = CString::new(P::NAME).ok()?;
            let kind = CString::new(P::KIND.as_str()).ok()?;
            Some(Table {
                v1: PluginV1 {
                    header: PluginHeader {
                        abi_version: ABI_VERSION,
                    },
                    name: name.as_ptr(),
                    kind: kind.as_ptr(),
                    describe: shims.describe,
                    validate_config: shims.validate_config,
                    run: shims.run,
                    free_buffer: ffi::free_buffer,
                },
                _name: name,
                _kind: kind,
            })
        })
    }));
    match built {
        Ok(Some(t)) => &t.v1 as *const PluginV1 as *const PluginHeader,
        _ => std::ptr::null(),
    }
}

/// Exports a [`Plugin`] through the C ABI: generates the `prefix_rft_plugin` entry symbol, the
/// function table and `extern "C"` shims that catch panics.
///
/// `export_plugin!(MyPlugin)` builds the plugin with `Default::default()` on its first call;
/// `export_plugin!(MyPlugin, MyPlugin::new)` takes any `fn() -> MyPlugin`. Use it once per
/// `cdylib`, at the crate root. The symbol is exported from the `rlib` too, so one binary can
/// link at most one plugin crate as a library; a host that wants several plugins in process
/// uses their `Plugin` types through `host::PluginHandle::in_process` from crates (or
/// modules) that do not invoke this macro.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        $crate::export_plugin!($plugin, <$plugin as ::core::default::Default>::default);
    };
    ($plugin:ty, $ctor:expr) => {
        const _: () = {
            static INSTANCE: ::std::sync::OnceLock<$plugin> = ::std::sync::OnceLock::new();
            static TABLE: ::std::sync::OnceLock<::core::option::Option<$crate::export::Table>> =
                ::std::sync::OnceLock::new();

            fn instance() -> &'static $plugin {
                INSTANCE.get_or_init($ctor)
            }

            unsafe extern "C" fn describe() -> $crate::ffi::OwnedBuffer {
                $crate::export::describe_shim::<$plugin>(instance)
            }

            unsafe extern "C" fn validate_config(
                input: *const u8,
                len: usize,
            ) -> $crate::ffi::OwnedBuffer {
                unsafe { $crate::export::validate_shim::<$plugin>(instance, input, len) }
            }

            unsafe extern "C" fn run(
                input: *const u8,
                len: usize,
                ctx: *const $crate::ffi::RawCallContext,
            ) -> $crate::ffi::OwnedBuffer {
                unsafe { $crate::export::run_shim::<$plugin>(instance, input, len, ctx) }
            }

            #[unsafe(no_mangle)]
            pub extern "C" fn prefix_rft_plugin() -> *const $crate::ffi::PluginHeader {
                $crate::export::entry::<$plugin>(
                    &TABLE,
                    $crate::export::Shims {
                        describe,
                        validate_config,
                        run,
                    },
                )
            }
        };
    };
}
