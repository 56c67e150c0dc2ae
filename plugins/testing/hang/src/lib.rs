//! A reward plugin whose `run` reports progress once and then never returns by itself. With
//! `{"honour_cancel": true}` it polls the cancel flag and returns `cancelled` once the host
//! sets it; otherwise it sleeps forever, as a plugin stuck in a loop would. Used only by the
//! host's integration tests.

use std::time::Duration;

use prefix_rft_plugin_abi::{
    export_plugin, CallContext, Description, Plugin, PluginError, PluginKind,
};
use serde_json::{json, Value};

/// How often the cancel flag is polled.
const POLL: Duration = Duration::from_millis(5);

/// The plugin; stateless.
#[derive(Default)]
pub struct Hang;

impl Plugin for Hang {
    const NAME: &'static str = "hang";
    const KIND: PluginKind = PluginKind::Reward;

    fn describe(&self) -> Description {
        Description {
            version: env!("CARGO_PKG_VERSION").to_string(),
            summary: "Never finishes run (test plugin)".to_string(),
            config_schema: json!({}),
        }
    }

    fn validate_config(&self, _config: &Value) -> Result<(), PluginError> {
        Ok(())
    }

    fn run(&self, request: Value, ctx: &CallContext<'_>) -> Result<Value, PluginError> {
        ctx.progress(0.25, &json!({"stage": "started"}));
        let honour_cancel = request["honour_cancel"].as_bool().unwrap_or(false);
        loop {
            if honour_cancel && ctx.is_cancelled() {
                return Err(PluginError::cancelled());
            }
            std::thread::sleep(POLL);
        }
    }
}

export_plugin!(Hang);
