//! The rule-based reward plugin: scores each completion by the weighted share of rules it
//! satisfies, in `[0, 1]`. Configured per adapter (the rules travel in each `run` request's
//! `config`, or come from the `[[plugins]]` entry), so one loaded library serves every adapter.
//!
//! Request: `{"config": {"rules": [...]}, "prompt": "..." | [messages], "completions": ["...", ...]}`.
//! Reply: `{"scores": [f64], "details": [{"score": f64, "rules": [{"kind", "weight", "passed"}]}]}`.
//! The rule kinds and their fields are in [`rules`]; the prompt is accepted for future
//! prompt-aware rules and checked for shape only.

pub mod rules;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prefix_rft_plugin_abi::{
    export_plugin, CallContext, Description, Plugin, PluginError, PluginKind,
};
use serde_json::{json, Value};

use rules::RuleSet;

/// Compiled rule sets kept between calls (the trainer scores many groups with one config).
const CACHE_CAPACITY: usize = 64;

/// The plugin: stateless apart from a cache of compiled rule sets keyed by their JSON.
#[derive(Default)]
pub struct RewardRules {
    cache: Mutex<HashMap<String, Arc<RuleSet>>>,
}

impl RewardRules {
    fn rule_set(&self, config: &Value) -> Result<Arc<RuleSet>, PluginError> {
        let key = config.to_string();
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(set) = cache.get(&key) {
            return Ok(Arc::clone(set));
        }
        let set = Arc::new(RuleSet::from_config(config).map_err(PluginError::invalid_config)?);
        if cache.len() >= CACHE_CAPACITY {
            cache.clear();
        }
        cache.insert(key, Arc::clone(&set));
        Ok(set)
    }
}

impl Plugin for RewardRules {
    const NAME: &'static str = "reward-rules";
    const KIND: PluginKind = PluginKind::Reward;

    fn describe(&self) -> Description {
        Description {
            version: env!("CARGO_PKG_VERSION").to_string(),
            summary: "Scores completions by the weighted share of rules they satisfy (regex, \
                      must/must-not contain, max words, JSON validity and keys)"
                .to_string(),
            config_schema: rules::config_schema(),
        }
    }

    fn validate_config(&self, config: &Value) -> Result<(), PluginError> {
        RuleSet::from_config(config)
            .map(|_| ())
            .map_err(PluginError::invalid_config)
    }

    fn run(&self, request: Value, ctx: &CallContext<'_>) -> Result<Value, PluginError> {
        let Value::Object(request) = request else {
            return Err(PluginError::invalid_request(
                "the request must be an object with `config`, `prompt` and `completions`",
            ));
        };
        let config = request.get("config").ok_or_else(|| {
            PluginError::invalid_request("`config` is missing: give the adapter's rule set")
        })?;
        match request.get("prompt") {
            None | Some(Value::String(_)) | Some(Value::Array(_)) | Some(Value::Null) => {}
            Some(_) => {
                return Err(PluginError::invalid_request(
                    "`prompt` must be a string or an array of chat messages",
                ))
            }
        }
        let completions = request
            .get("completions")
            .and_then(Value::as_array)
            .ok_or_else(|| {
                PluginError::invalid_request("`completions` must be an array of strings")
            })?;
        let set = self.rule_set(config)?;
        let mut scores = Vec::with_capacity(completions.len());
        let mut details = Vec::with_capacity(completions.len());
        for (i, completion) in completions.iter().enumerate() {
            if ctx.is_cancelled() {
                return Err(PluginError::cancelled());
            }
            let text = completion.as_str().ok_or_else(|| {
                PluginError::invalid_request(format!("completions[{i}] is not a string"))
            })?;
            let outcome = set.score(text);
            scores.push(outcome.score);
            details.push(outcome.to_json());
        }
        Ok(json!({ "scores": scores, "details": details }))
    }
}

export_plugin!(RewardRules);

#[cfg(test)]
mod tests {
    use super::*;

    fn run(request: Value) -> Result<Value, PluginError> {
        RewardRules::default().run(request, &CallContext::detached())
    }

    #[test]
    fn scores_each_completion_with_details() {
        let out = run(json!({
            "config": {"rules": [
                {"kind": "must_contain", "text": "hello", "weight": 3},
                {"kind": "max_words", "max": 3}
            ]},
            "prompt": [{"role": "user", "content": "greet me"}],
            "completions": ["hello there", "well hello to you all", "bye"]
        }))
        .unwrap();
        assert_eq!(out["scores"], json!([1.0, 0.75, 0.25]));
        assert_eq!(
            out["details"][1],
            json!({"score": 0.75, "rules": [
                {"kind": "must_contain", "weight": 3.0, "passed": true},
                {"kind": "max_words", "weight": 1.0, "passed": false}
            ]})
        );
    }

    #[test]
    fn rejects_malformed_requests_with_the_field_named() {
        let rules = json!({"rules": [{"kind": "valid_json"}]});
        let cases = [
            (json!([1]), "must be an object"),
            (json!({"completions": ["a"]}), "`config` is missing"),
            (
                json!({"config": rules, "completions": "a"}),
                "`completions` must be",
            ),
            (
                json!({"config": rules, "completions": ["a", 2]}),
                "completions[1]",
            ),
            (
                json!({"config": rules, "prompt": 3, "completions": []}),
                "`prompt`",
            ),
            (
                json!({"config": {"rules": []}, "completions": []}),
                "at least one rule",
            ),
        ];
        for (request, needle) in cases {
            let err = run(request.clone()).unwrap_err();
            assert!(err.message.contains(needle), "{request}: {err}");
        }
    }

    #[test]
    fn cancellation_stops_scoring() {
        let cancel = std::sync::atomic::AtomicBool::new(true);
        let ctx = CallContext::native(&cancel, None, None);
        let err = RewardRules::default()
            .run(
                json!({"config": {"rules": [{"kind": "valid_json"}]}, "completions": ["{}"]}),
                &ctx,
            )
            .unwrap_err();
        assert_eq!(err.code.as_deref(), Some(PluginError::CANCELLED));
    }

    #[test]
    fn describes_its_schema_and_validates_configs() {
        let p = RewardRules::default();
        let d = p.describe();
        assert_eq!(d.version, env!("CARGO_PKG_VERSION"));
        assert_eq!(d.config_schema["required"], json!(["rules"]));
        let err = p
            .validate_config(&json!({"rules": [{"kind": "regexp", "pattern": "x"}]}))
            .unwrap_err();
        assert_eq!(err.code.as_deref(), Some(PluginError::INVALID_CONFIG));
        p.validate_config(&json!({"rules": [{"kind": "must_match", "pattern": "^a"}]}))
            .unwrap();
    }
}
