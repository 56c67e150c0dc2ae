//! The one error type of the training path.

use crate::quant::QuantError;

/// Why a training forward or adapter could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A tensor operation failed (shape, device or dtype mismatch inside candle).
    #[error("tensor: {0}")]
    Candle(#[from] candle_core::Error),
    /// A quantized weight could not be read.
    #[error("weights: {0}")]
    Quant(#[from] QuantError),
    /// An input token is not in the vocabulary.
    #[error("token id {token} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { token: u32, vocab: usize },
    /// A sequence (plus the adapter's virtual tokens) is longer than the model's context.
    #[error("sequence of {needed} positions exceeds the context length {context}")]
    ContextLength { needed: usize, context: usize },
    /// The batch has no tokens to run.
    #[error("empty batch: at least one sequence with at least one token is needed")]
    EmptyBatch,
    /// An adapter configuration cannot describe a valid adapter for this model.
    #[error("invalid adapter configuration: {0}")]
    AdapterConfig(String),
    /// Nothing to score: every sequence is shorter than two tokens.
    #[error("scoring needs a sequence of at least two tokens")]
    NothingToScore,
    /// A prompt cache is used with an adapter other than the one it was built with.
    #[error("prompt cache holds {cache} virtual tokens but the adapter has {adapter}")]
    PromptMismatch { cache: usize, adapter: usize },
    /// A combination of options the training path does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
}
