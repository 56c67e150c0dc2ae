//! The `[[plugins]]` of the config, loaded once at start-up from `server.plugin_dir`. A plugin
//! that fails to load (missing file, wrong ABI, not a plugin, bad config) is kept with the
//! reason so `GET /v1/plugins` can say why; the server serves regardless.

use prefix_rft_plugin_abi::host::{PluginConfig, PluginHandle, PluginHost};
use serde_json::{json, Value};

/// One configured plugin and what became of it.
pub struct PluginSlot {
    /// Its `[[plugins]]` entry.
    pub config: PluginConfig,
    /// The handle, or why there is none.
    pub state: Result<PluginHandle, String>,
}

/// Every configured plugin.
#[derive(Default)]
pub struct Plugins {
    slots: Vec<PluginSlot>,
}

impl Plugins {
    /// Loads each entry from `dir` (blocking: opens libraries and asks each to describe
    /// itself).
    pub fn load(dir: &std::path::Path, configs: &[PluginConfig]) -> Plugins {
        if configs.is_empty() {
            return Plugins::default();
        }
        let host = PluginHost::new(dir).map_err(|e| e.to_string());
        let slots = configs
            .iter()
            .map(|config| {
                let state = host
                    .as_ref()
                    .map_err(Clone::clone)
                    .and_then(|h| h.load_configured(config).map_err(|e| e.to_string()));
                match &state {
                    Ok(p) => tracing::info!(plugin = %config.name, version = %p.info().version, "plugin loaded"),
                    Err(e) => tracing::error!(plugin = %config.name, error = %e, "plugin not loaded"),
                }
                PluginSlot {
                    config: config.clone(),
                    state,
                }
            })
            .collect();
        Plugins { slots }
    }

    /// A loaded plugin by its configured name.
    pub fn get(&self, name: &str) -> Option<&PluginHandle> {
        self.slots
            .iter()
            .find(|s| s.config.name == name)
            .and_then(|s| s.state.as_ref().ok())
    }

    /// The `GET /v1/plugins` list.
    pub fn to_json(&self) -> Value {
        let data: Vec<Value> = self
            .slots
            .iter()
            .map(|s| match &s.state {
                Ok(p) => json!({
                    "name": s.config.name,
                    "kind": s.config.kind,
                    "status": "loaded",
                    "abi_version": p.info().abi_version,
                    "version": p.info().version,
                    "summary": p.info().summary,
                    "path": s.config.path,
                    "timeout_secs": p.timeout().as_secs_f64(),
                }),
                Err(reason) => json!({
                    "name": s.config.name,
                    "kind": s.config.kind,
                    "status": "failed",
                    "reason": reason,
                    "path": s.config.path,
                }),
            })
            .collect();
        json!({"object": "list", "data": data})
    }
}
