//! `[[plugins]]` in the real server: the real reward-rules `cdylib` loads and is listed by
//! `GET /v1/plugins` (admin only) with its ABI version; a library of another ABI version, a
//! non-plugin library, a missing file and a path out of the plugin directory are each listed
//! as failed with the reason, and the server serves regardless.

use prefix_rft_e2e::{
    plugin_dir, repo_config, with_plugin_dir, Server, ACME_KEY, ADMIN_KEY, MODEL,
};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_plugins_load_or_are_listed_with_the_reason() {
    let plugin_dir = plugin_dir(&[
        "libprefix_rft_reward_rules.so",
        "libprefix_rft_test_bad_abi.so",
        "libprefix_rft_test_not_a_plugin.so",
    ]);
    let base = repo_config();
    let config = format!(
        r#"{base}
[[plugins]]
name = "rules"
path = "libprefix_rft_reward_rules.so"
kind = "reward"
config = {{ rules = [{{ kind = "max_words", max = 5 }}] }}

[[plugins]]
name = "old-abi"
path = "libprefix_rft_test_bad_abi.so"
kind = "reward"

[[plugins]]
name = "not-a-plugin"
path = "libprefix_rft_test_not_a_plugin.so"
kind = "reward"

[[plugins]]
name = "missing"
path = "libnothing.so"
kind = "trainer"

[[plugins]]
name = "escape"
path = "../../etc/passwd"
kind = "reward"
"#
    );
    let config = with_plugin_dir(&config, &plugin_dir);
    let data = tempfile::tempdir().unwrap();
    let server = Server::start_in(Some(&config), data.path());
    let client = reqwest::Client::new();
    let get = |key: &'static str| {
        client
            .get(format!("{}/plugins", server.v1()))
            .bearer_auth(key)
            .send()
    };
    assert_eq!(get(ACME_KEY).await.unwrap().status(), 403);
    let list: Value = get(ADMIN_KEY).await.unwrap().json().await.unwrap();
    let by_name = |n: &str| -> Value {
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == n)
            .cloned()
            .unwrap_or_else(|| panic!("{n} not listed: {list}"))
    };
    let rules = by_name("rules");
    assert_eq!(rules["status"], "loaded", "{rules}");
    assert_eq!(rules["kind"], "reward");
    assert_eq!(rules["abi_version"], 1);
    for (name, reason) in [
        ("old-abi", "ABI"),
        ("not-a-plugin", "prefix_rft_plugin"),
        ("missing", "libnothing.so"),
        ("escape", "refused"),
    ] {
        let p = by_name(name);
        assert_eq!(p["status"], "failed", "{p}");
        let why = p["reason"].as_str().unwrap_or("");
        assert!(
            why.contains(reason),
            "{name}: {why:?} should mention {reason:?}"
        );
    }
    // Serving is unaffected.
    let r = client
        .post(format!("{}/chat/completions", server.v1()))
        .bearer_auth(ACME_KEY)
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
