//! The prefix-rft engine: model files, tokenizer, chat template, Llama-family forward with
//! adapter hooks, KV cache and sampler. It knows nothing of HTTP, tenants or feedback.

pub mod bench;
pub mod chat_template;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod loader;
pub mod merge;
pub mod model;
pub mod quant;
pub mod sampler;
pub mod stop;
pub mod tokenizer;
pub mod train;

#[doc(hidden)]
pub mod testing;

pub use error::EngineError;
pub use loader::LoadedModel;
