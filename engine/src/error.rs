//! The engine's one error type: everything a caller of the engine can get wrong or hit.

use crate::chat_template::ChatTemplateError;
use crate::model::ModelError;
use crate::tokenizer::TokenizerError;

/// Why an engine operation failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    ChatTemplate(#[from] ChatTemplateError),
    #[error("{path}: {message}")]
    Load { path: String, message: String },
    #[error("prompt of {prompt} tokens plus {max_tokens} new tokens exceeds the context length {context}")]
    ContextLength {
        prompt: usize,
        max_tokens: usize,
        context: usize,
    },
    #[error("empty prompt: at least one token is needed")]
    EmptyPrompt,
}
