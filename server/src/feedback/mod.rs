//! User feedback on completions and what training makes of it.
//!
//! Every completion the server returns is recorded through the [`CompletionRecorder`] side of a
//! [`FeedbackStore`]; thumbs-up/down, corrections and comments refer to a recorded completion by
//! its id and choice index. [`pairing`] turns the feedback of one tenant and adapter into
//! preference pairs, demonstrations and unpaired negatives; [`trl`] reads and writes TRL's
//! JSON Lines formats for the CLI's `feedback export|import`.
//!
//! The only implementation today is [`sqlite::SqliteFeedbackStore`]. The trait is kept narrow
//! so that a Postgres store for several replicas is a new implementation, not a rewrite. HTTP
//! types and status codes do not live here: `routes/feedback.rs` maps [`FeedbackError`].

pub mod cli;
pub mod pairing;
pub mod schema;
pub mod sqlite;
pub mod trl;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::recorder::CompletionRecorder;

pub use pairing::{
    Demonstration, ExampleKey, Message, PairSource, PreferencePair, Prompt, TrainingExamples,
    UnpairedNegative,
};

/// A thumbs-up or thumbs-down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rating {
    /// The answer was good.
    Up,
    /// The answer was bad.
    Down,
}

impl Rating {
    /// `up` or `down`.
    pub fn as_str(self) -> &'static str {
        match self {
            Rating::Up => "up",
            Rating::Down => "down",
        }
    }

    /// Parses `up` or `down`.
    pub fn parse(s: &str) -> Option<Rating> {
        match s {
            "up" => Some(Rating::Up),
            "down" => Some(Rating::Down),
            _ => None,
        }
    }
}

/// One feedback submission, validated by the HTTP edge.
#[derive(Debug, Clone, PartialEq)]
pub struct NewFeedback {
    /// The tenant of the caller; only its own completions can be rated.
    pub tenant: String,
    /// `chatcmpl-…` / `cmpl-…`.
    pub completion_id: String,
    /// Which choice of the completion.
    pub choice_index: u32,
    /// Up or down.
    pub rating: Rating,
    /// A better answer written by the user.
    pub correction: Option<String>,
    /// Free text.
    pub comment: Option<String>,
    /// The `Idempotency-Key` header, if sent.
    pub idempotency_key: Option<String>,
}

/// What a submission did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Submitted {
    /// `fb-…`, the same for every submission on one `(completion_id, choice_index)`.
    pub id: String,
    /// The rated completion.
    pub completion_id: String,
    /// The rated choice.
    pub choice_index: u32,
    /// The rating now stored.
    pub rating: Rating,
    /// Unix seconds of the first submission.
    pub created: u64,
    /// True when this submission created the feedback (201), false when it repeated or
    /// updated an existing one (200).
    pub created_now: bool,
}

/// Counts for one tenant and adapter (`GET /v1/feedback/stats`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Thumbs-up ratings.
    pub up: u64,
    /// Thumbs-down ratings.
    pub down: u64,
    /// Feedback that carries a correction.
    pub corrections: u64,
    /// Preference pairs.
    pub pairs: u64,
    /// Demonstrations.
    pub demonstrations: u64,
    /// Thumbs-down answers with no partner.
    pub unpaired_negatives: u64,
    /// Examples no promoted adapter version has trained on yet.
    pub untrained: u64,
}

/// What `delete_adapter` removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Deleted {
    /// Completion records.
    pub completions: u64,
    /// Feedback rows.
    pub feedback: u64,
}

/// One example to import for an adapter (from a TRL or SFT dataset).
#[derive(Debug, Clone, PartialEq)]
pub enum ImportExample {
    /// `chosen` is preferred over `rejected` for `prompt`.
    Preference {
        /// The prompt.
        prompt: Prompt,
        /// The better answer.
        chosen: String,
        /// The worse answer.
        rejected: String,
    },
    /// `completion` is a good answer to `prompt`.
    Demonstration {
        /// The prompt.
        prompt: Prompt,
        /// The answer.
        completion: String,
    },
}

/// Why a feedback operation failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FeedbackError {
    /// No completion with this id for this tenant (another tenant's is reported the same way).
    #[error("completion `{0}` does not exist")]
    CompletionNotFound(String),
    /// The completion has fewer choices.
    #[error("choice_index {index} is out of range: the completion has {choices} choice(s)")]
    ChoiceOutOfRange { index: u32, choices: u32 },
    /// The `Idempotency-Key` was already used for another completion or choice.
    #[error(
        "Idempotency-Key `{key}` was already used for completion `{completion_id}` choice {choice_index}"
    )]
    IdempotencyKeyReused {
        key: String,
        completion_id: String,
        choice_index: u32,
    },
    /// An import row or a stored value could not be understood.
    #[error("{0}")]
    InvalidData(String),
    /// SQLite or the file system failed.
    #[error("feedback storage: {0}")]
    Storage(String),
    /// The database was written by a newer version of this program.
    #[error("feedback database schema version {found} is newer than this program's {supported}")]
    SchemaTooNew { found: i64, supported: i64 },
    /// The writer thread is gone (the store is shutting down or crashed).
    #[error("the feedback writer is not running")]
    WriterGone,
}

impl From<rusqlite::Error> for FeedbackError {
    fn from(e: rusqlite::Error) -> Self {
        FeedbackError::Storage(e.to_string())
    }
}

impl From<std::io::Error> for FeedbackError {
    fn from(e: std::io::Error) -> Self {
        FeedbackError::Storage(e.to_string())
    }
}

/// A store operation's result, resolved once it is durable (writes) or read (reads).
pub type StoreFuture<T> = BoxFuture<'static, Result<T, FeedbackError>>;

/// Where completions, feedback and training marks live. Every write resolves only after it is
/// committed to durable storage; a caller that got `Ok` may acknowledge it to a client.
pub trait FeedbackStore: CompletionRecorder {
    /// Stores or updates feedback, idempotent on `(completion_id, choice_index)` and on the
    /// idempotency key.
    fn submit(&self, feedback: NewFeedback) -> StoreFuture<Submitted>;
    /// Counts for `tenant`'s `adapter` (`base` for the base model).
    fn stats(&self, tenant: &str, adapter: &str) -> StoreFuture<Stats>;
    /// Pairs, demonstrations and unpaired negatives for `tenant`'s `adapter`, in the
    /// deterministic order of [`pairing`].
    fn training_examples(&self, tenant: &str, adapter: &str) -> StoreFuture<TrainingExamples>;
    /// Records that `version` of `tenant`'s `adapter` trained on `examples` (call it when the
    /// version is promoted); returns how many marks were new.
    fn mark_trained(
        &self,
        tenant: &str,
        adapter: &str,
        examples: Vec<ExampleKey>,
        version: u32,
    ) -> StoreFuture<u64>;
    /// Removes every completion, feedback and training mark of `tenant`'s `adapter`.
    fn delete_adapter(&self, tenant: &str, adapter: &str) -> StoreFuture<Deleted>;
    /// Adds examples from a dataset as synthetic completions with feedback; returns the count.
    fn import(&self, tenant: &str, adapter: &str, examples: Vec<ImportExample>)
        -> StoreFuture<u64>;
}

/// The adapter name of an `adapter_version` label: `base`, or `<name>` of `<name>@<N>`.
pub fn adapter_of(version_label: &str) -> &str {
    version_label
        .split_once('@')
        .map(|(name, _)| name)
        .unwrap_or(version_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_name_is_the_part_before_the_version() {
        assert_eq!(adapter_of("base"), "base");
        assert_eq!(adapter_of("support@3"), "support");
        assert_eq!(adapter_of("a@b@1"), "a");
    }

    #[test]
    fn ratings_parse_only_up_and_down() {
        assert_eq!(Rating::parse("up"), Some(Rating::Up));
        assert_eq!(Rating::parse("down"), Some(Rating::Down));
        assert_eq!(Rating::parse("Up"), None);
        assert_eq!(Rating::parse("meh"), None);
    }
}
