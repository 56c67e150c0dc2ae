//! A plugin with a correct version-1 table and a sane `describe`, but whose `run` answers
//! bytes that are not JSON and whose `validate_config` answers JSON that is not the envelope.
//! Written by hand over the raw `ffi` types, as a plugin in another language might be. The
//! host must report an invalid reply and keep serving.

use std::ffi::c_char;

use prefix_rft_plugin_abi::ffi::{self, OwnedBuffer, PluginHeader, PluginV1, RawCallContext};

/// `describe` must be valid so that loading succeeds.
const DESCRIBE: &[u8] = br#"{"ok":{"name":"garbage","kind":"reward","abi_version":1,"version":"0.1.0","summary":"Answers garbage (test plugin)","config_schema":{}}}"#;
/// Not JSON at all.
const RUN_REPLY: &[u8] = b"\x00\x01this is {not json";
/// JSON, but neither `{"ok": ...}` nor `{"error": ...}`.
const VALIDATE_REPLY: &[u8] = br#"{"scores":[1.0]}"#;

unsafe extern "C" fn describe() -> OwnedBuffer {
    OwnedBuffer::from_vec(DESCRIBE.to_vec())
}

unsafe extern "C" fn validate_config(_input: *const u8, _len: usize) -> OwnedBuffer {
    OwnedBuffer::from_vec(VALIDATE_REPLY.to_vec())
}

unsafe extern "C" fn run(
    _input: *const u8,
    _len: usize,
    _ctx: *const RawCallContext,
) -> OwnedBuffer {
    OwnedBuffer::from_vec(RUN_REPLY.to_vec())
}

static TABLE: PluginV1 = PluginV1 {
    header: PluginHeader {
        abi_version: ffi::ABI_VERSION,
    },
    name: c"garbage".as_ptr() as *const c_char,
    kind: c"reward".as_ptr() as *const c_char,
    describe,
    validate_config,
    run,
    free_buffer: ffi::free_buffer,
};

/// The entry symbol.
#[unsafe(no_mangle)]
pub extern "C" fn prefix_rft_plugin() -> *const PluginHeader {
    &TABLE.header
}
