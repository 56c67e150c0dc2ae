//! The host against real `cdylib`s: the reward-rules plugin and the hostile test plugins of
//! `plugins/testing/`. The libraries are built by `cargo build` into this test's own target
//! directory and profile on first use (a no-op when the workspace build already made them);
//! `PREFIX_RFT_PLUGIN_LIB_DIR` points at prebuilt ones instead.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use prefix_rft_plugin_abi::host::{
    CallOptions, HostError, PluginConfig, PluginHost, PluginSource, Progress, ProgressSink,
};
use prefix_rft_plugin_abi::{Method, PluginError, PluginKind, ABI_VERSION};
use serde_json::{json, Value};

/// The packages whose libraries these tests load.
const PACKAGES: [&str; 6] = [
    "prefix-rft-reward-rules",
    "prefix-rft-test-panicky",
    "prefix-rft-test-hang",
    "prefix-rft-test-bad-abi",
    "prefix-rft-test-garbage",
    "prefix-rft-test-not-a-plugin",
];

/// The directory holding the built libraries (`target/<profile>`).
fn lib_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("PREFIX_RFT_PLUGIN_LIB_DIR") {
            return PathBuf::from(dir);
        }
        // target/<profile>/deps/<this test> → target/<profile>, target
        let exe = std::env::current_exe().expect("test executable path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test executable lives in target/<profile>/deps");
        let target_dir = profile_dir.parent().expect("target directory");
        let profile = profile_dir
            .file_name()
            .and_then(|n| n.to_str())
            .expect("profile directory name");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
        let mut cmd = Command::new(cargo);
        cmd.arg("build")
            .arg("--manifest-path")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml"))
            .arg("--target-dir")
            .arg(target_dir);
        match profile {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        for p in PACKAGES {
            cmd.args(["-p", p]);
        }
        let status = cmd
            .status()
            .expect("run cargo build for the plugin libraries");
        assert!(
            status.success(),
            "building the plugin libraries failed: {status}"
        );
        profile_dir.to_path_buf()
    })
}

/// The file name of a package's library on this platform.
fn lib_name(package: &str) -> String {
    format!(
        "{}{}{}",
        std::env::consts::DLL_PREFIX,
        package.replace('-', "_"),
        std::env::consts::DLL_SUFFIX
    )
}

fn host() -> PluginHost {
    PluginHost::new(lib_dir()).expect("plugin dir")
}

fn rules_entry(config: Value) -> PluginConfig {
    PluginConfig {
        name: "rules".into(),
        path: lib_name("prefix-rft-reward-rules").into(),
        kind: PluginKind::Reward,
        timeout_secs: Some(10.0),
        config,
    }
}

fn millis(ms: u64) -> CallOptions {
    CallOptions {
        timeout: Some(Duration::from_millis(ms)),
        ..CallOptions::default()
    }
}

#[test]
fn reward_rules_loads_describes_itself_and_scores_known_inputs_exactly() {
    let rules = json!({"rules": [
        {"kind": "must_match", "pattern": "^Hello", "weight": 2},
        {"kind": "must_not_contain", "text": "sorry", "ignore_case": true},
        {"kind": "json_with_keys", "keys": ["answer"]}
    ]});
    let h = host().load_configured(&rules_entry(rules)).unwrap();
    let info = h.info();
    assert_eq!(info.name, "reward-rules");
    assert_eq!(info.kind, PluginKind::Reward);
    assert_eq!(info.abi_version, ABI_VERSION);
    assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
    assert!(info.config_schema["properties"]["rules"].is_object());
    match &info.source {
        PluginSource::Dylib { path } => {
            assert_eq!(
                path,
                &lib_dir()
                    .join(lib_name("prefix-rft-reward-rules"))
                    .canonicalize()
                    .unwrap()
            )
        }
        other => panic!("expected a dylib, got {other:?}"),
    }
    assert_eq!(h.name(), "rules");
    assert_eq!(h.timeout(), Duration::from_secs(10));

    // The entry's rules are used when the request brings none.
    let out = h
        .run(
            &json!({
                "prompt": "Say hello in JSON",
                "completions": [
                    "Hello {\"answer\": 1}",
                    "{\"answer\": \"hi\"}",
                    "Hello, SORRY",
                    "Hello"
                ]
            }),
            CallOptions::default(),
        )
        .unwrap();
    // Weights 2 + 1 + 1: "Hello {..}" is not JSON, so it misses the last rule.
    assert_eq!(out["scores"], json!([0.75, 0.5, 0.5, 0.75]));
    assert_eq!(
        out["details"][2]["rules"],
        json!([
            {"kind": "must_match", "weight": 2.0, "passed": true},
            {"kind": "must_not_contain", "weight": 1.0, "passed": false},
            {"kind": "json_with_keys", "weight": 1.0, "passed": false}
        ])
    );
    // A per-adapter config in the request takes precedence.
    let out = h
        .run(
            &json!({
                "config": {"rules": [{"kind": "max_words", "max": 2}]},
                "prompt": [{"role": "user", "content": "hi"}],
                "completions": ["one two", "one two three"]
            }),
            CallOptions::default(),
        )
        .unwrap();
    assert_eq!(out["scores"], json!([1.0, 0.0]));

    // Errors cross the boundary with their message and code.
    match h.validate_config(&json!({"rules": [{"kind": "must_match", "pattern": "(x"}]})) {
        Err(HostError::Plugin {
            method,
            message,
            code,
            ..
        }) => {
            assert_eq!(method, Method::ValidateConfig);
            assert_eq!(code.as_deref(), Some(PluginError::INVALID_CONFIG));
            assert!(
                message.contains("rules[0].pattern is not a usable regex"),
                "{message}"
            );
        }
        other => panic!("expected an invalid_config error, got {other:?}"),
    }
}

#[test]
fn a_configured_entry_of_the_wrong_kind_or_config_is_refused() {
    let host = host();
    let mut entry = rules_entry(Value::Null);
    entry.kind = PluginKind::Trainer;
    let err = host.load_configured(&entry).unwrap_err();
    assert_eq!(
        err.to_string(),
        "plugin reward-rules is a reward plugin, but its config entry says trainer"
    );
    let err = host
        .load_configured(&rules_entry(json!({"rules": [{"kind": "sparkle"}]})))
        .unwrap_err();
    assert!(
        err.to_string().contains("unknown rule kind \"sparkle\""),
        "{err}"
    );
}

#[test]
fn a_panicking_plugin_fails_the_call_and_not_the_process() {
    let h = host().load(lib_name("prefix-rft-test-panicky")).unwrap();
    for _ in 0..2 {
        match h.run(&json!({"completions": ["x"]}), CallOptions::default()) {
            Err(HostError::Plugin { message, code, .. }) => {
                assert_eq!(code.as_deref(), Some(PluginError::PANIC));
                assert!(
                    message.contains("panicky plugin asked to score"),
                    "{message}"
                );
            }
            other => panic!("expected a panic error, got {other:?}"),
        }
    }
    // Still answering after two panics.
    h.validate_config(&json!({})).unwrap();
}

#[test]
fn a_hanging_plugin_times_out_on_time_and_later_calls_fail_fast() {
    let h = host().load(lib_name("prefix-rft-test-hang")).unwrap();
    let seen: Arc<Mutex<Vec<Progress>>> = Arc::default();
    let sink_seen = Arc::clone(&seen);
    let sink: ProgressSink = Arc::new(move |p| sink_seen.lock().unwrap().push(p));
    let started = Instant::now();
    let err = h
        .run(
            &json!({"completions": ["x"]}),
            CallOptions {
                timeout: Some(Duration::from_millis(200)),
                progress: Some(sink),
                ..CallOptions::default()
            },
        )
        .unwrap_err();
    let waited = started.elapsed();
    assert!(
        matches!(
            err,
            HostError::Timeout {
                method: Method::Run,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        waited >= Duration::from_millis(200) && waited < Duration::from_secs(3),
        "timed out after {waited:?}"
    );
    // Progress crossed the C boundary before the hang.
    assert_eq!(
        *seen.lock().unwrap(),
        vec![Progress {
            fraction: 0.25,
            detail: json!({"stage": "started"})
        }]
    );
    // The call never returns; everything after it is refused at once.
    for _ in 0..3 {
        let started = Instant::now();
        let err = h.validate_config(&json!({})).unwrap_err();
        assert!(matches!(err, HostError::Stalled { .. }), "{err}");
        assert!(err.to_string().contains("timed out"), "{err}");
        assert!(started.elapsed() < Duration::from_millis(100));
    }
}

#[test]
fn a_hanging_plugin_that_polls_the_cancel_flag_recovers_after_a_timeout() {
    let h = host().load(lib_name("prefix-rft-test-hang")).unwrap();
    let err = h
        .run(&json!({"honour_cancel": true}), millis(100))
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match h.validate_config(&json!({})) {
            Ok(()) => break,
            Err(HostError::Stalled { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("the plugin did not recover after cancelling: {e}"),
        }
    }
}

#[test]
fn a_plugin_of_another_abi_version_is_refused_naming_both_versions() {
    let err = host()
        .load(lib_name("prefix-rft-test-bad-abi"))
        .unwrap_err();
    match &err {
        HostError::AbiMismatch {
            plugin_abi,
            host_abi,
            ..
        } => {
            assert_eq!(*plugin_abi, 2);
            assert_eq!(*host_abi, ABI_VERSION);
        }
        other => panic!("expected an ABI mismatch, got {other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains("ABI version 2"), "{text}");
    assert!(
        text.contains(&format!("host speaks ABI version {ABI_VERSION}")),
        "{text}"
    );
}

#[test]
fn a_library_without_the_entry_symbol_or_a_non_library_is_refused() {
    let err = host()
        .load(lib_name("prefix-rft-test-not-a-plugin"))
        .unwrap_err();
    assert!(matches!(err, HostError::NotAPlugin { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("is not a prefix-rft plugin: it does not export `prefix_rft_plugin`"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("libtext.so"), b"just some text\n").unwrap();
    let err = PluginHost::new(dir.path())
        .unwrap()
        .load("libtext.so")
        .unwrap_err();
    assert!(matches!(err, HostError::Open { .. }), "{err}");
}

#[test]
fn garbage_replies_are_reported_and_the_plugin_keeps_answering() {
    let h = host().load(lib_name("prefix-rft-test-garbage")).unwrap();
    assert_eq!(h.info().name, "garbage");
    for _ in 0..2 {
        match h.run(&json!({"completions": ["x"]}), CallOptions::default()) {
            Err(HostError::InvalidReply { method, reason, .. }) => {
                assert_eq!(method, Method::Run);
                assert!(reason.contains("not JSON"), "{reason}");
                assert!(reason.contains("this is {not json"), "{reason}");
            }
            other => panic!("expected an invalid reply, got {other:?}"),
        }
    }
    match h.validate_config(&json!({})) {
        Err(HostError::InvalidReply { reason, .. }) => {
            assert!(reason.contains("[\"scores\"]"), "{reason}")
        }
        other => panic!("expected an invalid reply, got {other:?}"),
    }
}

#[cfg(unix)]
#[test]
fn paths_leading_out_of_the_plugin_dir_are_refused_before_loading() {
    let real = lib_dir()
        .join(lib_name("prefix-rft-reward-rules"))
        .canonicalize()
        .unwrap();
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    std::fs::copy(&real, plugins.join("librules.so")).unwrap();
    std::fs::copy(&real, root.path().join("libsibling.so")).unwrap();
    std::os::unix::fs::symlink(&real, plugins.join("libescape.so")).unwrap();
    let host = PluginHost::new(&plugins).unwrap();

    // Control: the copy inside loads and works.
    let h = host.load("librules.so").unwrap();
    assert_eq!(h.info().name, "reward-rules");

    let refused = |path: &Path, needle: &str| {
        let err = host.load(path).unwrap_err();
        assert!(
            matches!(err, HostError::OutsidePluginDir { .. }),
            "{}: {err}",
            path.display()
        );
        assert!(
            err.to_string().contains(needle),
            "{}: {err}",
            path.display()
        );
    };
    refused(Path::new("libescape.so"), "through a symlink");
    refused(Path::new("../libsibling.so"), "`..`");
    refused(&plugins.join("../libsibling.so"), "`..`");
    refused(&real, "absolute path outside the plugin directory");
    refused(&root.path().join("libsibling.so"), "absolute path outside");
}
