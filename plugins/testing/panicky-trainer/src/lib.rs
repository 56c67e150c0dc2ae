//! A trainer plugin that reports one step of progress and then panics: the server must fail
//! the job with the panic as its reason, publish nothing, and keep serving. Used only by the
//! end-to-end training tests.

use prefix_rft_plugin_abi::{
    export_plugin, CallContext, Description, Plugin, PluginError, PluginKind,
};
use serde_json::{json, Value};

/// The plugin; stateless.
#[derive(Default)]
pub struct PanickyTrainer;

impl Plugin for PanickyTrainer {
    const NAME: &'static str = "panicky-trainer";
    const KIND: PluginKind = PluginKind::Trainer;

    fn describe(&self) -> Description {
        Description {
            version: env!("CARGO_PKG_VERSION").to_string(),
            summary: "Panics after the first training step (test plugin)".to_string(),
            config_schema: json!({}),
        }
    }

    fn validate_config(&self, _config: &Value) -> Result<(), PluginError> {
        Ok(())
    }

    fn run(&self, request: Value, ctx: &CallContext<'_>) -> Result<Value, PluginError> {
        ctx.progress(0.5, &json!({"step": 1, "total": 2, "loss": 0.69}));
        let pairs = request["data"]["pairs"].as_array().map_or(0, Vec::len);
        panic!("panicky trainer gave up after one step of {pairs} pairs");
    }
}

export_plugin!(PanickyTrainer);
