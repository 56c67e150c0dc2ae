//! The `[[plugins]]` entries of the server config, as serde types. The server deserialises
//! them with the rest of its config and hands each to [`super::PluginHost::load_configured`].

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::plugin::PluginKind;

/// Default per-call timeout of a reward plugin: scoring a rollout group is short work.
pub const DEFAULT_REWARD_TIMEOUT_SECS: f64 = 30.0;
/// Default per-call timeout of a trainer plugin: one `run` is a whole training job.
pub const DEFAULT_TRAINER_TIMEOUT_SECS: f64 = 6.0 * 3600.0;

/// One `[[plugins]]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// The name adapters and the training policy refer to this plugin by.
    pub name: String,
    /// The library, relative to the plugin directory (or absolute inside it).
    pub path: PathBuf,
    /// What the plugin must be; loading fails if it declares another kind.
    pub kind: PluginKind,
    /// Per-call timeout in seconds; defaults by kind
    /// ([`DEFAULT_REWARD_TIMEOUT_SECS`], [`DEFAULT_TRAINER_TIMEOUT_SECS`]).
    #[serde(default)]
    pub timeout_secs: Option<f64>,
    /// Plugin-wide config, checked with `validate_config` at load and passed as `config` to
    /// `run` requests that carry none of their own.
    #[serde(default)]
    pub config: Value,
}

impl PluginConfig {
    /// The per-call timeout this entry asks for, or its kind's default. Non-finite or
    /// non-positive values fall back to the default (validation reports them first).
    pub fn timeout(&self) -> Duration {
        let default = match self.kind {
            PluginKind::Reward => DEFAULT_REWARD_TIMEOUT_SECS,
            PluginKind::Trainer => DEFAULT_TRAINER_TIMEOUT_SECS,
        };
        let secs = self
            .timeout_secs
            .filter(|s| s.is_finite() && *s > 0.0)
            .unwrap_or(default);
        Duration::from_secs_f64(secs.min(u32::MAX as f64))
    }

    /// Checks the fields that do not need the library: a usable name and timeout.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!(
                "plugins.name {:?} must be non-empty and use only ASCII letters, digits, '-' and '_'",
                self.name
            ));
        }
        if let Some(t) = self.timeout_secs {
            if !t.is_finite() || t <= 0.0 {
                return Err(format!(
                    "plugins[{}].timeout_secs must be a positive number of seconds, got {t}",
                    self.name
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Doc {
        plugins: Vec<PluginConfig>,
    }

    #[test]
    fn parses_the_documented_toml() {
        let doc: Doc = toml::from_str(
            r#"
            [[plugins]]
            name = "rules"
            path = "libprefix_rft_reward_rules.so"
            kind = "reward"
            timeout_secs = 5
            config = { rules = [{ kind = "max_words", max = 50 }] }

            [[plugins]]
            name = "trainer"
            path = "libprefix_rft_trainer.so"
            kind = "trainer"
            "#,
        )
        .unwrap();
        let rules = &doc.plugins[0];
        assert_eq!(rules.kind, PluginKind::Reward);
        assert_eq!(rules.timeout(), Duration::from_secs(5));
        assert_eq!(rules.config["rules"][0]["max"], 50);
        let trainer = &doc.plugins[1];
        assert_eq!(trainer.config, Value::Null);
        assert_eq!(
            trainer.timeout(),
            Duration::from_secs_f64(DEFAULT_TRAINER_TIMEOUT_SECS)
        );
        assert!(rules.validate().is_ok() && trainer.validate().is_ok());
    }

    #[test]
    fn rejects_unknown_kinds_fields_and_bad_values() {
        let bad_kind = toml::from_str::<Doc>(
            "[[plugins]]\nname = \"x\"\npath = \"a.so\"\nkind = \"scorer\"\n",
        );
        assert!(bad_kind
            .unwrap_err()
            .to_string()
            .contains("unknown variant"));
        let typo = toml::from_str::<Doc>(
            "[[plugins]]\nname = \"x\"\npath = \"a.so\"\nkind = \"reward\"\ntimeout = 3\n",
        );
        assert!(typo.unwrap_err().to_string().contains("unknown field"));
        let mut c = PluginConfig {
            name: "ok".into(),
            path: "a.so".into(),
            kind: PluginKind::Reward,
            timeout_secs: Some(-1.0),
            config: Value::Null,
        };
        assert!(c.validate().unwrap_err().contains("timeout_secs"));
        c.timeout_secs = None;
        c.name = "has space".into();
        assert!(c.validate().unwrap_err().contains("plugins.name"));
    }
}
