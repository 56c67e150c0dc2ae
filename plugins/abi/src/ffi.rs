//! The raw `#[repr(C)]` types of ABI version 1: the function table a plugin exports, the byte
//! buffers that cross the boundary, and the per-call context. Nothing here is safe to use
//! directly; plugin authors go through [`export_plugin!`](crate::export_plugin) and the host
//! through `host::PluginHost`.

use std::ffi::{c_char, c_void};
use std::sync::atomic::AtomicBool;

/// The ABI version this crate implements. Bumped on any change to the layout or meaning of the
/// types in this module; the host refuses a plugin whose table carries another number.
pub const ABI_VERSION: u32 = 1;

/// The name of the one symbol a plugin exports, NUL-terminated for `dlsym`.
///
/// The name carries no version on purpose: the version lives in the table, so a plugin built
/// against another ABI is reported as "ABI 2, host speaks 1" rather than "not a plugin".
pub const ENTRY_SYMBOL: &[u8] = b"prefix_rft_plugin\0";

/// The signature of the exported entry symbol. It must stay this forever: it is the only thing
/// the host calls before it has checked the version.
pub type EntryFn = unsafe extern "C" fn() -> *const PluginHeader;

/// The part of every table that never changes between ABI versions: the version itself, at
/// offset 0. The host reads this and nothing else until the version matches.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PluginHeader {
    /// The ABI version the plugin was built against.
    pub abi_version: u32,
}

/// A byte buffer allocated by the plugin and handed to the host, which copies it and gives it
/// back through [`PluginV1::free_buffer`]. `ptr` is never null for a buffer returned by a
/// well-behaved plugin (an empty buffer has a dangling, non-null pointer).
#[repr(C)]
#[derive(Debug)]
pub struct OwnedBuffer {
    /// Start of the bytes.
    pub ptr: *mut u8,
    /// Number of bytes.
    pub len: usize,
}

/// The progress callback: `user` is the host's opaque pointer from [`RawCallContext`],
/// `fraction` in `[0, 1]`, and `json`/`len` a UTF-8 JSON document (may be empty) that is only
/// valid for the duration of the callback.
pub type ProgressFn =
    unsafe extern "C" fn(user: *mut c_void, fraction: f64, json: *const u8, len: usize);

/// What the host passes to `run`: where to report progress and the flag to poll for
/// cancellation. Valid only for the duration of the `run` call it was passed to.
#[repr(C)]
#[derive(Debug)]
pub struct RawCallContext {
    /// Opaque host pointer, passed back to `progress` untouched.
    pub user: *mut c_void,
    /// Progress callback; may be null (`None`) when the host does not listen.
    pub progress: Option<ProgressFn>,
    /// Set to `true` by the host when the caller gave up (timeout or cancellation); the plugin
    /// polls it with an atomic load and returns early. Never null.
    pub cancel: *const AtomicBool,
}

/// The function table of ABI version 1. Returned by the entry symbol; `'static` (it lives as
/// long as the library, which the host never unloads).
#[repr(C)]
#[derive(Debug)]
pub struct PluginV1 {
    /// Always [`ABI_VERSION`] (1) for this layout; must stay the first field.
    pub header: PluginHeader,
    /// NUL-terminated UTF-8 plugin name (`[a-z0-9_-]+`), static.
    pub name: *const c_char,
    /// NUL-terminated `trainer` or `reward`, static.
    pub kind: *const c_char,
    /// Returns `{"ok": {"name", "kind", "abi_version", "version", "summary", "config_schema"}}`.
    pub describe: unsafe extern "C" fn() -> OwnedBuffer,
    /// Takes a config JSON document, returns `{"ok": null}` or `{"error": {...}}`.
    pub validate_config: unsafe extern "C" fn(input: *const u8, len: usize) -> OwnedBuffer,
    /// Takes a request JSON document and a call context, returns `{"ok": result}` or
    /// `{"error": {...}}`.
    pub run: unsafe extern "C" fn(
        input: *const u8,
        len: usize,
        ctx: *const RawCallContext,
    ) -> OwnedBuffer,
    /// Frees a buffer this plugin returned. Called exactly once per returned buffer.
    pub free_buffer: unsafe extern "C" fn(buffer: OwnedBuffer),
}

// The table is immutable after construction and its pointers refer to static data.
unsafe impl Sync for PluginV1 {}
unsafe impl Send for PluginV1 {}

impl OwnedBuffer {
    /// Hands a byte vector over the boundary; the receiver must give it back to
    /// [`OwnedBuffer::free`] in the same library.
    pub fn from_vec(bytes: Vec<u8>) -> OwnedBuffer {
        let boxed: Box<[u8]> = bytes.into_boxed_slice();
        let len = boxed.len();
        let ptr = Box::into_raw(boxed) as *mut u8;
        OwnedBuffer { ptr, len }
    }

    /// Frees a buffer made by [`OwnedBuffer::from_vec`] in this same library.
    ///
    /// # Safety
    /// `self` must come from `from_vec` of this copy of the crate and not have been freed.
    pub unsafe fn free(self) {
        if self.ptr.is_null() {
            return;
        }
        let slice = std::ptr::slice_from_raw_parts_mut(self.ptr, self.len);
        drop(unsafe { Box::from_raw(slice) });
    }
}

/// The `free_buffer` every plugin built with this crate exports.
///
/// # Safety
/// See [`OwnedBuffer::free`].
pub unsafe extern "C" fn free_buffer(buffer: OwnedBuffer) {
    unsafe { buffer.free() }
}
