//! Response bodies and stream chunks of the OpenAI endpoints, as the official clients parse them.

use std::collections::BTreeMap;

use serde::Serialize;

/// `usage`.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens over all choices.
    pub completion_tokens: usize,
    /// Their sum.
    pub total_tokens: usize,
}

impl Usage {
    /// Usage of `prompt` tokens and `completion` new tokens.
    pub fn new(prompt: usize, completion: usize) -> Self {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        }
    }
}

/// One alternative in chat `top_logprobs`.
#[derive(Debug, Clone, Serialize)]
pub struct ChatTopLogprob {
    /// Token text.
    pub token: String,
    /// Its log-probability.
    pub logprob: f32,
    /// Its UTF-8 bytes.
    pub bytes: Vec<u8>,
}

/// One output token in chat `logprobs.content`.
#[derive(Debug, Clone, Serialize)]
pub struct ChatTokenLogprob {
    /// Token text.
    pub token: String,
    /// Its log-probability.
    pub logprob: f32,
    /// Its UTF-8 bytes.
    pub bytes: Vec<u8>,
    /// The most likely alternatives.
    pub top_logprobs: Vec<ChatTopLogprob>,
}

/// Chat `logprobs`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatLogprobs {
    /// One entry per output token.
    pub content: Vec<ChatTokenLogprob>,
}

/// The assistant message of a chat choice.
#[derive(Debug, Clone, Serialize)]
pub struct ChatMessageOut {
    /// Always `assistant`.
    pub role: &'static str,
    /// The text.
    pub content: String,
}

/// One choice of a chat completion.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    /// Choice index.
    pub index: usize,
    /// The message.
    pub message: ChatMessageOut,
    /// Log-probabilities, when asked for.
    pub logprobs: Option<ChatLogprobs>,
    /// `stop` or `length`.
    pub finish_reason: &'static str,
}

/// `chat.completion`.
#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletion {
    /// `chatcmpl-…`, the id feedback refers to.
    pub id: String,
    /// `chat.completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The model as requested.
    pub model: String,
    /// `base` or `<adapter>@<N>`.
    pub system_fingerprint: String,
    /// Choices.
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    pub usage: Usage,
}

/// The delta of a chat stream chunk.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatDelta {
    /// `assistant` in the first chunk of a choice.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// New text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// One choice of a chat stream chunk.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChunkChoice {
    /// Choice index.
    pub index: usize,
    /// New text.
    pub delta: ChatDelta,
    /// Log-probabilities of the tokens in this chunk.
    pub logprobs: Option<ChatLogprobs>,
    /// Set in the choice's last chunk.
    pub finish_reason: Option<&'static str>,
}

/// `chat.completion.chunk`.
#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletionChunk {
    /// Same id in every chunk.
    pub id: String,
    /// `chat.completion.chunk`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The model as requested.
    pub model: String,
    /// `base` or `<adapter>@<N>`.
    pub system_fingerprint: String,
    /// Choices (empty in the usage chunk).
    pub choices: Vec<ChatChunkChoice>,
    /// Only in the usage chunk; `null` elsewhere when usage was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

/// Legacy completions `logprobs`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CompletionLogprobs {
    /// Token texts.
    pub tokens: Vec<String>,
    /// Their log-probabilities (`null` for the first prompt token, which has no context).
    pub token_logprobs: Vec<Option<f32>>,
    /// Alternatives per token (`null` for the first prompt token).
    pub top_logprobs: Vec<Option<BTreeMap<String, f32>>>,
    /// Character offset of each token in the returned text.
    pub text_offset: Vec<usize>,
}

/// One choice of a completion.
#[derive(Debug, Clone, Serialize)]
pub struct CompletionChoice {
    /// Choice index.
    pub index: usize,
    /// Text (with the prompt in front when `echo`).
    pub text: String,
    /// Log-probabilities, when asked for.
    pub logprobs: Option<CompletionLogprobs>,
    /// `stop` or `length`; `null` in stream chunks before the last.
    pub finish_reason: Option<&'static str>,
}

/// `text_completion` (also each stream chunk).
#[derive(Debug, Clone, Serialize)]
pub struct Completion {
    /// `cmpl-…`.
    pub id: String,
    /// `text_completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The model as requested.
    pub model: String,
    /// `base` or `<adapter>@<N>`.
    pub system_fingerprint: String,
    /// Choices.
    pub choices: Vec<CompletionChoice>,
    /// Token counts (absent in stream chunks except the usage one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

/// One entry of `/v1/models`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelCard {
    /// The id clients send as `model`.
    pub id: String,
    /// `model`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// Owner (the tenant for adapters, `prefix-rft` for the base).
    pub owned_by: String,
    /// The base model id an adapter applies to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// An adapter's current version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Context length in tokens.
    pub max_model_len: usize,
}

/// `/v1/models`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelList {
    /// `list`.
    pub object: &'static str,
    /// Models.
    pub data: Vec<ModelCard>,
}
