//! Llama-family models: configuration, weights, KV cache, the adapter seam and the forward.

pub mod adapter;
pub mod config;
pub(crate) mod ggml;
pub mod hooks;
pub mod kv_cache;
pub mod llama;
pub(crate) mod simd;
pub mod weights;

pub use adapter::{AdapterShapeError, AdapterWeights, LoraWeights, PrefixWeights};
pub use config::{Arch, ConfigError, ModelConfig};
pub use ggml::uses_ggml_arithmetic;
pub use hooks::{AdapterHook, Proj, ProjRows};
pub use kv_cache::KvCache;
pub use llama::{Llama, Logits, LogitsWanted, ModelError, SeqStep};
pub use weights::{LoadOptions, ModelWeights, WeightsError};
