//! Drives the running server with the official `openai` Python client (installed into
//! `.venv-e2e` by `scripts/test`), so what real users run is what is tested.

use std::process::Command;

use prefix_rft_e2e::{repo_root, shared};

#[test]
fn official_python_client_passes_every_check() {
    let python = repo_root().join(".venv-e2e/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: scripts/test creates it (python3 -m venv .venv-e2e; pip install openai)",
        python.display()
    );
    let script = repo_root().join("tests/python/openai_client.py");
    let out = Command::new(python)
        .arg(script)
        .arg(shared().v1())
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python client checks failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
}
