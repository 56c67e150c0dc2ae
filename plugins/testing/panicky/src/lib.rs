//! A reward plugin whose `run` panics: the host must turn the panic into an error with code
//! `panic` and keep serving. Used only by the host's integration tests.

use prefix_rft_plugin_abi::{
    export_plugin, CallContext, Description, Plugin, PluginError, PluginKind,
};
use serde_json::{json, Value};

/// The plugin; stateless.
#[derive(Default)]
pub struct Panicky;

impl Plugin for Panicky {
    const NAME: &'static str = "panicky";
    const KIND: PluginKind = PluginKind::Reward;

    fn describe(&self) -> Description {
        Description {
            version: env!("CARGO_PKG_VERSION").to_string(),
            summary: "Panics in run (test plugin)".to_string(),
            config_schema: json!({}),
        }
    }

    fn validate_config(&self, _config: &Value) -> Result<(), PluginError> {
        Ok(())
    }

    fn run(&self, request: Value, _ctx: &CallContext<'_>) -> Result<Value, PluginError> {
        panic!("panicky plugin asked to score {request}");
    }
}

export_plugin!(Panicky);
