//! Helpers shared by the engine's tests: where the real model is, and tiny random models.

use std::path::PathBuf;

/// The default model file; the test command (`scripts/test`) fetches it before running tests.
pub fn default_model_path() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-model (scripts/test does this for you)",
        path.display()
    );
    path
}
