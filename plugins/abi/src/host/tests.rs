//! Host logic against an in-process plugin: the same worker, envelope and timeout code as a
//! dylib, without building one. The dylib paths are in `tests/dylib.rs`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::handle::decode_reply;
use super::*;
use crate::{CallContext, Description, Method, Plugin, PluginError, PluginKind};

/// Does what each request's `op` says, counting the `run` calls that started.
#[derive(Default)]
struct Scripted {
    runs: Arc<AtomicUsize>,
}

fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

impl Plugin for Scripted {
    const NAME: &'static str = "scripted";
    const KIND: PluginKind = PluginKind::Reward;

    fn describe(&self) -> Description {
        Description {
            version: "9.9.9".into(),
            summary: "test double".into(),
            config_schema: json!({"type": "object"}),
        }
    }

    fn validate_config(&self, config: &Value) -> Result<(), PluginError> {
        if config.get("bad").is_some() {
            return Err(PluginError::invalid_config("field `bad` is not allowed"));
        }
        Ok(())
    }

    fn run(&self, request: Value, ctx: &CallContext<'_>) -> Result<Value, PluginError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        match request["op"].as_str().unwrap_or("") {
            "echo" => Ok(request),
            "error" => Err(PluginError::with_code("custom", "asked to fail")),
            "panic" => panic!("scripted panic"),
            "progress" => {
                for i in 1..=3 {
                    ctx.progress(i as f64 / 4.0, &json!({ "step": i }));
                }
                Ok(json!("done"))
            }
            "host" => ctx.host_call("double", &request["x"]),
            "sleep" => {
                sleep_ms(request["ms"].as_u64().unwrap_or(0));
                Ok(json!("slept"))
            }
            "wait_cancel" => {
                while !ctx.is_cancelled() {
                    sleep_ms(2);
                }
                // Linger so the stall is observable, as a plugin finishing its step would.
                sleep_ms(request["linger_ms"].as_u64().unwrap_or(0));
                ctx.progress(1.0, &json!("after cancel"));
                Err(PluginError::cancelled())
            }
            other => Err(PluginError::invalid_request(format!(
                "unknown op {other:?}"
            ))),
        }
    }
}

fn handle() -> (PluginHandle, Arc<AtomicUsize>) {
    let plugin = Scripted::default();
    let runs = Arc::clone(&plugin.runs);
    (PluginHandle::in_process(plugin).unwrap(), runs)
}

fn with_timeout(ms: u64) -> CallOptions {
    CallOptions {
        timeout: Some(Duration::from_millis(ms)),
        ..CallOptions::default()
    }
}

#[test]
fn in_process_plugin_describes_itself_through_the_wire_format() {
    let (h, _) = handle();
    let info = h.info();
    assert_eq!(info.name, "scripted");
    assert_eq!(info.kind, PluginKind::Reward);
    assert_eq!(info.abi_version, crate::ABI_VERSION);
    assert_eq!(info.version, "9.9.9");
    assert_eq!(info.config_schema, json!({"type": "object"}));
    assert_eq!(info.source, PluginSource::InProcess);
    assert_eq!(h.name(), "scripted");
    assert_eq!(
        h.timeout(),
        Duration::from_secs_f64(DEFAULT_REWARD_TIMEOUT_SECS)
    );
    let listed = serde_json::to_value(info).unwrap();
    assert_eq!(listed["kind"], "reward");
    assert_eq!(listed["source"]["type"], "in_process");
}

#[test]
fn run_returns_the_plugin_value_and_errors_keep_message_and_code() {
    let (h, _) = handle();
    let req = json!({"op": "echo", "x": [1, 2]});
    assert_eq!(h.run(&req, CallOptions::default()).unwrap(), req);
    match h.run(&json!({"op": "error"}), CallOptions::default()) {
        Err(HostError::Plugin {
            plugin,
            method,
            message,
            code,
        }) => {
            assert_eq!(plugin, "scripted");
            assert_eq!(method, Method::Run);
            assert_eq!(message, "asked to fail");
            assert_eq!(code.as_deref(), Some("custom"));
        }
        other => panic!("expected a plugin error, got {other:?}"),
    }
    let err = h.validate_config(&json!({"bad": 1})).unwrap_err();
    assert!(
        err.to_string().contains("field `bad` is not allowed"),
        "{err}"
    );
    h.validate_config(&json!({})).unwrap();
}

#[test]
fn a_panic_becomes_an_error_and_the_plugin_stays_usable() {
    let (h, _) = handle();
    match h.run(&json!({"op": "panic"}), CallOptions::default()) {
        Err(HostError::Plugin { message, code, .. }) => {
            assert_eq!(code.as_deref(), Some(PluginError::PANIC));
            assert!(message.contains("scripted panic"), "{message}");
            assert!(message.contains("panicked in run"), "{message}");
        }
        other => panic!("expected a panic error, got {other:?}"),
    }
    assert_eq!(
        h.run(&json!({"op": "echo"}), CallOptions::default())
            .unwrap(),
        json!({"op": "echo"})
    );
}

#[test]
fn a_timeout_returns_on_time_cancels_and_later_calls_fail_fast_until_the_call_returns() {
    let (h, runs) = handle();
    let started = Instant::now();
    let err = h
        .run(
            &json!({"op": "wait_cancel", "linger_ms": 3000}),
            with_timeout(100),
        )
        .unwrap_err();
    let waited = started.elapsed();
    assert!(matches!(err, HostError::Timeout { .. }), "{err}");
    assert!(err.is_timeout());
    assert!(
        waited >= Duration::from_millis(100) && waited < Duration::from_millis(2000),
        "returned after {waited:?}"
    );
    // The stuck call is still lingering: refused at once, without queueing.
    let started = Instant::now();
    let err = h
        .run(&json!({"op": "echo"}), CallOptions::default())
        .unwrap_err();
    assert!(
        matches!(
            err,
            HostError::Stalled {
                method: Method::Run,
                ..
            }
        ),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_millis(50));
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the refused call must not run"
    );
    // Once it returns (it honoured the cancel flag), the plugin serves again.
    wait_until_usable(&h);
}

/// Polls with echo calls until the plugin is no longer stalled.
fn wait_until_usable(h: &PluginHandle) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match h.run(&json!({"op": "echo"}), CallOptions::default()) {
            Ok(v) => {
                assert_eq!(v, json!({"op": "echo"}));
                return;
            }
            Err(HostError::Stalled { .. }) if Instant::now() < deadline => sleep_ms(20),
            Err(e) => panic!("plugin did not recover: {e}"),
        }
    }
}

#[test]
fn progress_reaches_the_sink_in_order_and_stops_after_a_timeout() {
    let (h, _) = handle();
    let seen: Arc<Mutex<Vec<Progress>>> = Arc::default();
    let sink_seen = Arc::clone(&seen);
    let sink: ProgressSink = Arc::new(move |p| sink_seen.lock().unwrap().push(p));
    let options = CallOptions {
        progress: Some(Arc::clone(&sink)),
        ..CallOptions::default()
    };
    assert_eq!(
        h.run(&json!({"op": "progress"}), options).unwrap(),
        json!("done")
    );
    let got = seen.lock().unwrap().clone();
    assert_eq!(
        got,
        (1..=3)
            .map(|i| Progress {
                fraction: i as f64 / 4.0,
                detail: json!({ "step": i }),
            })
            .collect::<Vec<_>>()
    );
    // The report a timed-out call makes after the cancel flag is dropped.
    seen.lock().unwrap().clear();
    let options = CallOptions {
        timeout: Some(Duration::from_millis(50)),
        progress: Some(sink),
        ..CallOptions::default()
    };
    assert!(h.run(&json!({"op": "wait_cancel"}), options).is_err());
    // Once the call has returned, its after-cancel report has been made (and dropped).
    wait_until_usable(&h);
    assert!(seen.lock().unwrap().is_empty());
}

#[test]
fn the_callers_cancel_flag_stops_a_long_call() {
    let (h, _) = handle();
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&cancel);
    let setter = std::thread::spawn(move || {
        sleep_ms(50);
        flag.store(true, Ordering::SeqCst);
    });
    let options = CallOptions {
        cancel: Some(cancel),
        ..CallOptions::default()
    };
    let err = h.run(&json!({"op": "wait_cancel"}), options).unwrap_err();
    setter.join().unwrap();
    match err {
        HostError::Plugin { code, .. } => assert_eq!(code.as_deref(), Some("cancelled")),
        other => panic!("expected cancelled, got {other:?}"),
    }
}

#[test]
fn a_call_that_times_out_in_the_queue_never_runs_and_does_not_stall() {
    let (h, runs) = handle();
    let first = {
        let h = h.clone();
        std::thread::spawn(move || h.run(&json!({"op": "sleep", "ms": 500}), with_timeout(10_000)))
    };
    // Queue the echo only once the sleep is running.
    let deadline = Instant::now() + Duration::from_secs(5);
    while runs.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
        sleep_ms(1);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the sleep never started");
    let err = h.run(&json!({"op": "echo"}), with_timeout(50)).unwrap_err();
    assert!(matches!(err, HostError::Timeout { .. }), "{err}");
    assert_eq!(first.join().unwrap().unwrap(), json!("slept"));
    // Not stalled, and the queued echo was skipped: only the sleep and this echo ran.
    assert_eq!(
        h.run(&json!({"op": "echo"}), CallOptions::default())
            .unwrap(),
        json!({"op": "echo"})
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[test]
fn a_configured_entry_checks_kind_validates_config_and_supplies_it() {
    let entry = PluginConfig {
        name: "my-rules".into(),
        path: "ignored.so".into(),
        kind: PluginKind::Reward,
        timeout_secs: Some(2.5),
        config: json!({"threshold": 1}),
    };
    let h = PluginHandle::in_process_configured(Scripted::default(), &entry).unwrap();
    assert_eq!(h.name(), "my-rules");
    assert_eq!(h.timeout(), Duration::from_millis(2500));
    // A request without `config` gets the entry's; one with its own keeps it.
    let got = h
        .run(&json!({"op": "echo"}), CallOptions::default())
        .unwrap();
    assert_eq!(got["config"], json!({"threshold": 1}));
    let got = h
        .run(
            &json!({"op": "echo", "config": {"mine": true}}),
            CallOptions::default(),
        )
        .unwrap();
    assert_eq!(got["config"], json!({"mine": true}));

    let trainer = PluginConfig {
        kind: PluginKind::Trainer,
        ..entry.clone()
    };
    let err = PluginHandle::in_process_configured(Scripted::default(), &trainer).unwrap_err();
    assert_eq!(
        err.to_string(),
        "plugin scripted is a reward plugin, but its config entry says trainer"
    );
    let bad = PluginConfig {
        config: json!({"bad": true}),
        ..entry.clone()
    };
    let err = PluginHandle::in_process_configured(Scripted::default(), &bad).unwrap_err();
    assert!(
        err.to_string().contains("field `bad` is not allowed"),
        "{err}"
    );
    let bad_name = PluginConfig {
        name: "a b".into(),
        ..entry
    };
    let err = PluginHandle::in_process_configured(Scripted::default(), &bad_name).unwrap_err();
    assert!(matches!(err, HostError::Config { .. }), "{err}");
}

#[test]
fn replies_that_are_not_the_envelope_are_invalid() {
    let decode = |bytes: &[u8]| decode_reply("p", Method::Run, Ok(bytes.to_vec()));
    assert_eq!(decode(br#"{"ok": [1]}"#).unwrap(), json!([1]));
    for (bytes, needle) in [
        (&b"nope"[..], "not JSON"),
        (br#"[1]"#, "non-object"),
        (br#"{"ok": 1, "extra": 2}"#, "keys"),
        (br#"{"scores": [1]}"#, "keys"),
        (br#"{"error": "flat string"}"#, "error object is malformed"),
    ] {
        match decode(bytes) {
            Err(HostError::InvalidReply { reason, .. }) => {
                assert!(reason.contains(needle), "{reason} lacks {needle}")
            }
            other => panic!(
                "{:?}: expected invalid reply, got {other:?}",
                String::from_utf8_lossy(bytes)
            ),
        }
    }
    let err = decode_reply("p", Method::Run, Err("it returned a null buffer".into())).unwrap_err();
    assert!(err.to_string().contains("null buffer"), "{err}");
}

#[test]
fn handles_and_hosts_can_be_shared_across_threads() {
    fn shareable<T: Send + Sync + 'static>() {}
    shareable::<PluginHandle>();
    shareable::<PluginHost>();
    shareable::<HostError>();
}

#[test]
fn a_host_refuses_a_missing_plugin_directory() {
    let err = PluginHost::new("/definitely/not/here").unwrap_err();
    assert!(matches!(err, HostError::PluginDir { .. }), "{err}");
}

#[test]
fn an_in_process_plugin_calls_the_hosts_services_during_run() {
    let (h, _) = handle();
    let service: HostService = Arc::new(|name, request| match name {
        "double" => Ok(json!(request.as_f64().unwrap_or(0.0) * 2.0)),
        _ => Err(format!("no service {name}")),
    });
    let with_host = CallOptions {
        host: Some(service),
        ..CallOptions::default()
    };
    assert_eq!(
        h.run(&json!({"op": "host", "x": 21}), with_host).unwrap(),
        json!(42.0)
    );
    // Without a service the plugin's call fails with a reason, and so does its run.
    match h.run(&json!({"op": "host", "x": 1}), CallOptions::default()) {
        Err(HostError::Plugin { message, .. }) => assert!(message.contains("double"), "{message}"),
        other => panic!("expected the plugin's error, got {other:?}"),
    }
    let panicking: HostService = Arc::new(|_, _| panic!("service bug"));
    let options = CallOptions {
        host: Some(panicking),
        ..CallOptions::default()
    };
    match h.run(&json!({"op": "host", "x": 1}), options) {
        Err(HostError::Plugin { message, .. }) => {
            assert!(message.contains("panicked"), "{message}")
        }
        other => panic!("expected the plugin's error, got {other:?}"),
    }
}
