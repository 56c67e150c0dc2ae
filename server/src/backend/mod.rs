//! The one seam between HTTP and the engine (TGI's `Backend`): handlers turn requests into a
//! validated [`GenerationRequest`], submit it, and read [`GenerationEvent`]s back; they never
//! touch tensors, caches or the scheduler. [`local`] implements it over our engine with a
//! continuous-batching [`scheduler`]; `mistralrs` (cargo feature `mistralrs`) generates with
//! mistralrs on the same GGUF instead.

pub mod local;
#[cfg(feature = "mistralrs")]
pub mod mistralrs;
pub mod scheduler;

use prefix_rft_adapters::Lease;
use prefix_rft_engine::chat_template::ChatMessage;
use prefix_rft_engine::generate::FinishReason;
use prefix_rft_engine::model::{AdapterWeights, PrefixWeights};
use prefix_rft_engine::sampler::SamplingParams;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::OwnedSemaphorePermit;

/// What the backend serves.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Base model id (from config).
    pub id: String,
    /// Context length in tokens.
    pub context_length: usize,
    /// Vocabulary size (token ids must be below it).
    pub vocab_size: usize,
    /// Tokens that end a turn (EOS and end-of-turn), as generation stops on them.
    pub stop_tokens: Vec<u32>,
    /// Unix seconds the model was loaded.
    pub created: u64,
}

/// A generation request that passed validation; only the backend accepts it.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// Prompt token ids (non-empty; prompt + `max_tokens` fit the context).
    pub prompt: Vec<u32>,
    /// New tokens per choice (0 = only score the prompt).
    pub max_tokens: usize,
    /// Choices; choice `i` samples with `seed + i` when a seed is set.
    pub n: usize,
    /// Validated sampling parameters (with `top_logprobs` set to what is reported).
    pub sampling: SamplingParams,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Report log-probs of each generated token.
    pub logprobs: bool,
    /// Report log-probs of the prompt tokens (with `sampling.top_logprobs` alternatives).
    pub prompt_logprobs: bool,
    /// The adapter version to run with (`None` = the base model), leased until the request
    /// is dropped.
    pub adapter: Option<Lease>,
}

/// The log-probability of one token and its most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The token.
    pub token: u32,
    /// Its log-probability under the raw model distribution.
    pub logprob: f32,
    /// Alternatives, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// What the backend reports while a request runs. Once every choice sent `Finished`, the
/// stream ends; a stream that ends without that (or with `Failed`) is an error.
#[derive(Debug, Clone)]
pub enum GenerationEvent {
    /// Log-probs of prompt tokens 1.. (token 0 has no context), sent once after prefill.
    PromptLogprobs(Vec<TokenLogprob>),
    /// A new token of `choice` and the text it made final (may be empty while a stop string or
    /// a UTF-8 character is incomplete).
    Token {
        /// Choice index.
        choice: usize,
        /// Token id.
        token: u32,
        /// Text made final by this token.
        text: String,
        /// Its log-prob, when asked for.
        logprob: Option<TokenLogprob>,
    },
    /// `choice` ended; `text` is any held-back text released at the end.
    Finished {
        /// Choice index.
        choice: usize,
        /// Why.
        reason: FinishReason,
        /// Remaining text.
        text: String,
    },
    /// The engine failed; the request is over.
    Failed(String),
}

/// An admitted request: its events and the queue slots it holds until dropped.
pub struct Admission {
    /// Events, in order.
    pub events: UnboundedReceiver<GenerationEvent>,
    /// Back-pressure: the slots are free again when the response is done.
    pub permit: OwnedSemaphorePermit,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SubmitError {
    /// The queue is full.
    #[error("queue is full")]
    Overloaded,
    /// The scheduler is gone.
    #[error("the scheduler is not running")]
    Stopped,
    /// This backend cannot run the request as asked (a client error naming what to change).
    #[error("{0}")]
    Unsupported(String),
    /// A resource the request needs is all in use right now; retrying later can succeed.
    #[error("{0}")]
    Busy(String),
}

/// Why a prompt could not be built.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PromptError {
    /// The chat template refused the conversation (a client error).
    #[error("{0}")]
    Refused(String),
    /// The model has no chat template.
    #[error("this model has no chat template; use /v1/completions")]
    NoTemplate,
    /// Rendering or tokenizing failed for another reason (a server error).
    #[error("{0}")]
    Failed(String),
}

/// The engine as the HTTP layer sees it.
pub trait Backend: Send + Sync + 'static {
    /// What is served.
    fn info(&self) -> &ModelInfo;
    /// The chat template applied to `messages`, with the assistant header appended.
    fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, PromptError>;
    /// Token ids of `text`, with the model's BOS when it uses one.
    fn encode(&self, text: &str) -> Result<Vec<u32>, PromptError>;
    /// Token ids of an answer as the model produces it after a prompt: no BOS, and the first
    /// end-of-sequence token appended (training examples).
    fn encode_answer(&self, text: &str) -> Result<Vec<u32>, PromptError>;
    /// Text of token ids (for echoing a prompt given as ids).
    fn decode(&self, ids: &[u32]) -> Result<String, PromptError>;
    /// The raw bytes of one token (logprobs `token`/`bytes`).
    fn token_bytes(&self, id: u32) -> Vec<u8>;
    /// Queues a request; fails at once when the queue is full.
    fn submit(&self, req: GenerationRequest) -> Result<Admission, SubmitError>;
    /// Gets `adapter`'s version ready to serve before it becomes current (an activation), so
    /// the swap costs its first requests nothing. Our engine applies adapters per request and
    /// needs nothing; mistralrs loads the version's merged model. Blocking.
    fn prepare(&self, _adapter: &Lease) -> Result<(), SubmitError> {
        Ok(())
    }
    /// Lets go of whatever the backend holds for `tenant`'s adapter `name`, which was just
    /// deleted (mistralrs: its merged models, once their requests finish).
    fn forget_adapter(&self, _tenant: &str, _name: &str) {}
    /// True when no admitted request is left (drain is complete).
    fn idle(&self) -> bool;
    /// Prefix-tuning key/values taken from the base model's own activations on `text` (its
    /// tokens repeated or cut to `num_virtual_tokens`): a prefix adapter initialised this way
    /// starts out as if `text` were prepended to every prompt. Blocking.
    fn prefix_from_text(
        &self,
        text: &str,
        num_virtual_tokens: usize,
    ) -> Result<PrefixWeights, PromptError>;
    /// Mean per-token KL(adapter ‖ base) in nats over every position of every probe token
    /// sequence (the eval gate's drift measure). Blocking.
    fn kl_to_base(&self, probes: &[Vec<u32>], adapter: &AdapterWeights)
        -> Result<f64, PromptError>;
}
