//! Completion records: every finished completion is handed to a [`CompletionRecorder`]
//! (`feedback::sqlite` in the server, in memory for tests). Feedback refers to a record by its
//! `id`. Recording returns an acknowledgement the handler awaits, so a response is sent only
//! once its completion is durable.

use std::sync::Mutex;

use futures_util::future::BoxFuture;
use serde::Serialize;

/// One choice of a recorded completion.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RecordedChoice {
    /// Choice index (over the whole response: with several prompts, prompt `i`'s choices are
    /// `i * n .. (i + 1) * n`).
    pub index: usize,
    /// Which prompt of the request this choice answers (0 unless a completions request sent a
    /// list of prompts).
    pub prompt_index: usize,
    /// Output text (without echo).
    pub text: String,
    /// Output token ids.
    pub token_ids: Vec<u32>,
    /// `stop` or `length`.
    pub finish_reason: String,
}

/// Everything feedback and training need to know about one completion.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CompletionRecord {
    /// `chatcmpl-…` / `cmpl-…`.
    pub id: String,
    /// Tenant (or `admin`).
    pub tenant: String,
    /// `model` as requested.
    pub model: String,
    /// `base` or `<adapter>@<N>`.
    pub adapter_version: String,
    /// `chat.completions` or `completions`.
    pub endpoint: &'static str,
    /// The messages (chat) or the prompt (completions), as sent; a completions request with
    /// several prompts keeps their list (`["a", "b"]` or `[[1, 2], [3]]`).
    pub request: serde_json::Value,
    /// Sampling parameters and limits as applied.
    pub params: serde_json::Value,
    /// Prompt token ids, one list per prompt (chat: one).
    pub prompt_tokens: Vec<Vec<u32>>,
    /// Output per choice.
    pub choices: Vec<RecordedChoice>,
    /// End-user id, if sent.
    pub user: Option<String>,
    /// Unix seconds the request arrived.
    pub created: u64,
    /// Seconds to the first token.
    pub ttft_secs: f64,
    /// Seconds for the whole request.
    pub duration_secs: f64,
}

/// Why a record could not be stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("recording the completion failed: {0}")]
pub struct RecordError(pub String);

/// Resolves once a record is durably stored (or could not be).
pub type RecordAck = BoxFuture<'static, Result<(), RecordError>>;

/// Where completion records go.
pub trait CompletionRecorder: Send + Sync + 'static {
    /// Queues one record without blocking; the returned future resolves once it is stored.
    fn record(&self, record: CompletionRecord) -> RecordAck;
    /// A record by id, visible only to its tenant.
    fn get(&self, tenant: &str, id: &str) -> Option<CompletionRecord>;
}

/// Records kept in memory, newest last, up to a bound (oldest dropped first).
#[derive(Debug)]
pub struct InMemoryRecorder {
    records: Mutex<std::collections::VecDeque<CompletionRecord>>,
    capacity: usize,
}

impl InMemoryRecorder {
    /// Keeps at most `capacity` records.
    pub fn new(capacity: usize) -> Self {
        InMemoryRecorder {
            records: Mutex::new(Default::default()),
            capacity: capacity.max(1),
        }
    }

    /// All records held, oldest first.
    pub fn all(&self) -> Vec<CompletionRecord> {
        self.records
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }
}

impl CompletionRecorder for InMemoryRecorder {
    fn record(&self, record: CompletionRecord) -> RecordAck {
        if let Ok(mut r) = self.records.lock() {
            if r.len() == self.capacity {
                r.pop_front();
            }
            r.push_back(record);
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn get(&self, tenant: &str, id: &str) -> Option<CompletionRecord> {
        let r = self.records.lock().ok()?;
        r.iter().find(|c| c.id == id && c.tenant == tenant).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, tenant: &str) -> CompletionRecord {
        CompletionRecord {
            id: id.into(),
            tenant: tenant.into(),
            model: "m".into(),
            adapter_version: "base".into(),
            endpoint: "completions",
            request: serde_json::json!("hi"),
            params: serde_json::json!({}),
            prompt_tokens: vec![vec![1]],
            choices: vec![],
            user: None,
            created: 0,
            ttft_secs: 0.0,
            duration_secs: 0.0,
        }
    }

    #[test]
    fn a_tenant_sees_only_its_own_records() {
        let r = InMemoryRecorder::new(4);
        drop(r.record(record("cmpl-1", "acme"))); // stored synchronously
        assert!(r.get("acme", "cmpl-1").is_some());
        assert!(r.get("globex", "cmpl-1").is_none());
    }

    #[test]
    fn oldest_record_is_dropped_at_capacity() {
        let r = InMemoryRecorder::new(2);
        for i in 0..3 {
            drop(r.record(record(&format!("cmpl-{i}"), "acme")));
        }
        let ids: Vec<String> = r.all().into_iter().map(|c| c.id).collect();
        assert_eq!(ids, ["cmpl-1", "cmpl-2"]);
    }
}
