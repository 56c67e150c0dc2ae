//! The training path of the engine: a differentiable Llama-family forward on candle autograd
//! that computes what the serving forward (`crate::model::Llama`) computes, with trainable LoRA
//! and prefix parameters as `Var`s. Base weights are frozen tensors and never receive gradient.
//! Serving code must not depend on this module; the bridge back is [`TrainAdapter::to_weights`].

mod adapter;
mod error;
mod forward;
pub mod fused;
mod lora;
pub mod ops;
mod prefix;
mod qmatmul;

pub use adapter::TrainAdapter;
pub use error::TrainError;
pub use forward::{PromptCache, TrainModel, TrainOptions};
pub use lora::{LoraConfig, LoraLayer};
pub use prefix::{PrefixConfig, PrefixLayer};
pub use qmatmul::{HeadLogSoftmax, QLoraLinear, QMatMulOp};
