//! `export_plugin!` seen from the C side, in process: the entry returns a version-1 table
//! without constructing the plugin, and every shim answers with the JSON envelope, catching
//! panics and bad input.

use std::ffi::CStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use prefix_rft_plugin_abi::ffi::{
    OwnedBuffer, PluginHeader, PluginV1, RawCallContext, ABI_VERSION,
};
use prefix_rft_plugin_abi::{
    export_plugin, CallContext, Description, Plugin, PluginError, PluginKind,
};
use serde_json::{json, Value};

static CONSTRUCTED: AtomicUsize = AtomicUsize::new(0);

struct Counted;

impl Counted {
    fn new() -> Counted {
        CONSTRUCTED.fetch_add(1, Ordering::SeqCst);
        Counted
    }
}

impl Plugin for Counted {
    const NAME: &'static str = "counted";
    const KIND: PluginKind = PluginKind::Trainer;

    fn describe(&self) -> Description {
        Description {
            version: "1.2.3".into(),
            summary: "counts".into(),
            config_schema: json!({"type": "object"}),
        }
    }

    fn validate_config(&self, config: &Value) -> Result<(), PluginError> {
        if config == &json!("explode") {
            panic!("validate exploded");
        }
        Ok(())
    }

    fn run(&self, request: Value, ctx: &CallContext<'_>) -> Result<Value, PluginError> {
        ctx.progress(0.5, &json!({"half": true}));
        Ok(json!({"echo": request, "cancelled": ctx.is_cancelled()}))
    }
}

export_plugin!(Counted, Counted::new);

// The macro's symbol is unnameable from Rust (it lives in an anonymous const); reach it the way
// the host does, by its C name.
unsafe extern "C" {
    fn prefix_rft_plugin() -> *const PluginHeader;
}

fn table() -> &'static PluginV1 {
    let header = unsafe { prefix_rft_plugin() };
    assert!(!header.is_null());
    unsafe { &*(header as *const PluginV1) }
}

fn take(t: &PluginV1, buf: OwnedBuffer) -> Value {
    assert!(!buf.ptr.is_null());
    let bytes = unsafe { std::slice::from_raw_parts(buf.ptr, buf.len) }.to_vec();
    unsafe { (t.free_buffer)(buf) };
    serde_json::from_slice(&bytes).unwrap()
}

unsafe extern "C" fn record(
    user: *mut std::ffi::c_void,
    fraction: f64,
    json: *const u8,
    len: usize,
) {
    let seen = unsafe { &mut *(user as *mut Vec<(f64, Value)>) };
    let bytes = unsafe { std::slice::from_raw_parts(json, len) };
    seen.push((fraction, serde_json::from_slice(bytes).unwrap()));
}

#[test]
fn the_entry_builds_a_version_1_table_before_any_plugin_code_and_the_shims_speak_the_envelope() {
    let t = table();
    assert_eq!(t.header.abi_version, ABI_VERSION);
    assert_eq!(
        unsafe { CStr::from_ptr(t.name) }.to_str().unwrap(),
        "counted"
    );
    assert_eq!(
        unsafe { CStr::from_ptr(t.kind) }.to_str().unwrap(),
        "trainer"
    );
    assert_eq!(
        CONSTRUCTED.load(Ordering::SeqCst),
        0,
        "the entry must not build the plugin"
    );
    // The same table every time.
    assert!(std::ptr::eq(t, table()));

    let described = take(t, unsafe { (t.describe)() });
    assert_eq!(
        described,
        json!({"ok": {"name": "counted", "kind": "trainer", "abi_version": ABI_VERSION,
                      "version": "1.2.3", "summary": "counts", "config_schema": {"type": "object"}}})
    );
    assert_eq!(CONSTRUCTED.load(Ordering::SeqCst), 1);

    let ok = take(t, unsafe { (t.validate_config)(b"{}".as_ptr(), 2) });
    assert_eq!(ok, json!({"ok": null}));
    let input = br#""explode""#;
    let panicked = take(t, unsafe {
        (t.validate_config)(input.as_ptr(), input.len())
    });
    assert_eq!(panicked["error"]["code"], "panic");
    assert!(panicked["error"]["message"]
        .as_str()
        .unwrap()
        .contains("validate exploded"));
    let bad = take(t, unsafe { (t.validate_config)(b"{oops".as_ptr(), 5) });
    assert_eq!(bad["error"]["code"], "invalid_request");
    assert!(bad["error"]["message"]
        .as_str()
        .unwrap()
        .contains("config is not valid JSON"));

    let cancel = AtomicBool::new(true);
    let mut seen: Vec<(f64, Value)> = Vec::new();
    let ctx = RawCallContext {
        user: &mut seen as *mut Vec<(f64, Value)> as *mut std::ffi::c_void,
        progress: Some(record),
        cancel: &cancel,
    };
    let req = br#"{"x": 1}"#;
    let ran = take(t, unsafe { (t.run)(req.as_ptr(), req.len(), &ctx) });
    assert_eq!(ran, json!({"ok": {"echo": {"x": 1}, "cancelled": true}}));
    assert_eq!(seen, vec![(0.5, json!({"half": true}))]);
    // A null context is tolerated: no progress, never cancelled.
    let ran = take(t, unsafe {
        (t.run)(req.as_ptr(), req.len(), std::ptr::null())
    });
    assert_eq!(ran["ok"]["cancelled"], false);
    assert_eq!(CONSTRUCTED.load(Ordering::SeqCst), 1, "built once");
}
