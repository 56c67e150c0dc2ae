//! Random adapters for tests and benchmarks (not for serving): seeded, uniform values, any
//! targets and rank on any model shape. They live in the engine, whose own tests use them too.

pub use prefix_rft_engine::testing::{random_lora, random_prefix};
