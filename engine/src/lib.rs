//! The prefix-rft engine: model files, tokenizer, chat template, Llama-family forward with
//! adapter hooks, KV cache and sampler. It knows nothing of HTTP, tenants or feedback.

pub mod chat_template;
pub mod gguf;
#[doc(hidden)]
pub mod testing;
pub mod tokenizer;
