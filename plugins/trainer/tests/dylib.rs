//! The trainer as the server loads it: the real `cdylib` through the plugin host, with the ABI
//! check, a progress sink and the reply crossing the C boundary as JSON.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use prefix_rft_adapters::peft::{self, Limits};
use prefix_rft_engine::quant::GgmlDType;
use prefix_rft_engine::testing::{tiny_weights, write_tiny_gguf, TinySpec};
use prefix_rft_plugin_abi::host::{CallOptions, PluginHost, Progress};
use prefix_rft_plugin_abi::PluginKind;
use serde_json::json;

/// Builds the trainer's cdylib into this test's target directory and returns `target/<profile>`.
fn lib_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PREFIX_RFT_PLUGIN_LIB_DIR") {
        return PathBuf::from(dir);
    }
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
        .arg(target_dir)
        .args(["-p", "prefix-rft-trainer", "--lib"]);
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let status = cmd
        .status()
        .expect("run cargo build for the trainer library");
    assert!(status.success(), "building the trainer library failed");
    profile_dir.to_path_buf()
}

#[test]
fn trainer_cdylib_loads_and_trains_through_the_host() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = TinySpec::default();
    let model = dir.path().join("tiny.gguf");
    write_tiny_gguf(&model, &spec, &tiny_weights(&spec, 7), GgmlDType::Q8_0);
    let out = dir.path().join("v1");

    let name = format!(
        "{}prefix_rft_trainer{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    );
    let host = PluginHost::new(lib_dir()).expect("plugin dir");
    let plugin = host.load(&name).expect("trainer loads");
    assert_eq!(plugin.info().name, "prefix-rft");
    assert_eq!(plugin.info().kind, PluginKind::Trainer);
    plugin
        .validate_config(&json!({"kind": "lora", "lora": {"rank": 4}}))
        .expect("config accepted");

    let seen: Arc<Mutex<Vec<Progress>>> = Arc::default();
    let sink = seen.clone();
    let options = CallOptions {
        progress: Some(Arc::new(move |p| {
            if let Ok(mut s) = sink.lock() {
                s.push(p);
            }
        })),
        ..CallOptions::default()
    };
    let request = json!({
        "base_model": model,
        "lora": {"rank": 4},
        "data": {"pairs": [
            {"prompt": [21, 22, 23], "chosen": [10, 11], "rejected": [50, 51]},
            {"prompt": [24, 25], "chosen": [12, 13], "rejected": [52, 53]},
        ]},
        "params": {"steps": 5, "batch_size": 2, "lr": 0.005, "beta": 0.5},
        "out_dir": out,
    });
    let reply = plugin.run(&request, options).expect("run");
    assert_eq!(reply["metrics"]["steps"], 5);
    let seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
    assert_eq!(seen.len(), 5);
    assert_eq!(seen[4].fraction, 1.0);
    assert_eq!(seen[4].detail["step"], 5);
    let after = reply["metrics"]["eval_after"]["reward_margin"].as_f64();
    assert!(after.is_some_and(|m| m > 0.0), "{reply}");
    peft::load_dir(&out, &spec.config(), &Limits::default()).expect("PEFT files load");

    let err = plugin
        .run(&json!({"base_model": model}), CallOptions::default())
        .expect_err("incomplete request");
    assert!(err.to_string().contains("missing field"), "{err}");
}
