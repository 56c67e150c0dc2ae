//! The adapter validator on arbitrary files: the input is `adapter_config.json`, one 0xFF byte
//! (never inside UTF-8 JSON), then `adapter_model.safetensors`, checked against a small llama
//! config. Any input may be refused; none may panic or allocate beyond the configured limits.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use prefix_rft_adapters::peft::{self, Limits};
use prefix_rft_engine::model::ModelConfig;
use prefix_rft_engine::testing::TinySpec;

fn config() -> &'static ModelConfig {
    static CFG: OnceLock<ModelConfig> = OnceLock::new();
    CFG.get_or_init(|| TinySpec::default().config())
}

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == 0xFF).unwrap_or(data.len());
    let (cfg_bytes, rest) = data.split_at(split);
    let weights = rest.get(1..).unwrap_or(&[]);
    let limits = Limits {
        max_file_bytes: 1 << 20,
        ..Limits::default()
    };
    if let Ok(adapter) = peft::parse(cfg_bytes, weights, config(), &limits) {
        // What validates must also export and parse back the same.
        let files = peft::to_files(&adapter.weights, config(), "fuzz").expect("export");
        let back = peft::parse(&files.config, &files.weights, config(), &limits).expect("reparse");
        assert_eq!(back.kind(), adapter.kind());
    }
});
