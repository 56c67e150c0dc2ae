//! The web console (`/console`) in a real browser against the real binary and model: Debian's
//! chromium, headless, driven by `tests/console/console.test.mjs` (playwright-core). The
//! script signs in, chats (streamed), rates and corrects an answer, trains on that and seeded
//! corrections, sees the new version become current, compares versions and rolls back; it
//! saves a screenshot of each state under `bench/results/console/`.
//!
//! Needs `/usr/bin/chromium` (`apt-get install chromium chromium-driver`) and
//! `tests/console/node_modules` (`npm ci --prefix tests/console`); `scripts/test` installs both.
//! Without them this test fails and says which command installs what is missing.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use prefix_rft_e2e::{repo_root, Server, ACME_KEY};
use serde_json::Value;

/// The browser the script drives (Debian's package; Playwright's own download is not used).
const CHROMIUM: &str = "/usr/bin/chromium";
/// The whole browser session, training job included, on a loaded 2-core machine.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(900);

fn console_dir() -> PathBuf {
    repo_root().join("tests/console")
}

/// Fails with the command that installs whatever the browser test lacks.
fn require_browser_tools() {
    let mut missing = Vec::new();
    if !Path::new(CHROMIUM).is_file() {
        missing.push(format!(
            "{CHROMIUM} is missing: install it with `apt-get install -y chromium chromium-driver`"
        ));
    }
    let node = Command::new("node")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !node {
        missing.push("`node` is not on PATH: install Node.js 20 or later".into());
    }
    if !console_dir()
        .join("node_modules/playwright-core/package.json")
        .is_file()
    {
        missing.push(
            "tests/console/node_modules is missing: run `npm ci --prefix tests/console`".into(),
        );
    }
    assert!(
        missing.is_empty(),
        "the console test cannot run (scripts/test installs all of this):\n{}",
        missing.join("\n")
    );
}

async fn get(server: &Server, path: &str) -> Value {
    let r = reqwest::Client::new()
        .get(format!("{}{path}", server.v1()))
        .bearer_auth(ACME_KEY)
        .send()
        .await
        .expect("request");
    assert!(r.status().is_success(), "GET {path}: {}", r.status());
    r.json().await.expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_chats_rates_trains_promotes_and_rolls_back_in_a_browser() {
    require_browser_tools();
    // The default config, automatic training off: the script starts its job from the page,
    // with a short step count and learning rate typed into the form.
    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::start_in(None, data.path());

    // The page is served without a key, with a strict content security policy.
    let page = reqwest::get(format!("{}/console", server.base))
        .await
        .expect("GET /console");
    assert_eq!(page.status(), 200);
    let csp = page
        .headers()
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(page.text().await.expect("body").contains("/console/app.js"));

    let out = repo_root().join("bench/results/console");
    std::fs::create_dir_all(&out).expect("create bench/results/console");
    let out = out.canonicalize().expect("canonical output path");
    let started = Instant::now();
    let mut child = Command::new("node")
        .arg(console_dir().join("console.test.mjs"))
        .arg(&server.base)
        .arg(ACME_KEY)
        .arg(&out)
        .env("CHROMIUM", CHROMIUM)
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn node");
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for node") {
            break status;
        }
        if started.elapsed() > SCRIPT_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the browser test ran past {SCRIPT_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!(
        "console browser test: {status} after {:.0} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        status.success(),
        "the browser test failed ({status}); see its output above and {}",
        out.join("failure.png").display()
    );

    // What the page did, as the API sees it: trained v2, then rolled back to v1.
    let adapter = get(&server, "/adapters/greeter").await;
    assert_eq!(adapter["current"], 1, "{adapter}");
    let versions = adapter["versions"].as_array().expect("versions");
    assert_eq!(versions.len(), 2, "{adapter}");
    assert_eq!(versions[1]["source"], "training", "{adapter}");
    assert_eq!(versions[1]["parent"], 1, "{adapter}");
    let jobs = get(&server, "/training/jobs").await;
    let job = &jobs["data"][0];
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["promoted"], true, "{job}");
    let stats = get(&server, "/feedback/stats?adapter=greeter").await;
    assert_eq!(stats["down"], 11, "{stats}");
    assert_eq!(stats["corrections"], 11, "{stats}");
    for shot in [
        "01-sign-in.png",
        "05-chat-rated.png",
        "07-training-done.png",
        "08-new-version-current.png",
        "10-rolled-back.png",
        "11-metrics.png",
    ] {
        assert!(out.join(shot).is_file(), "{shot} was not saved");
    }
}
