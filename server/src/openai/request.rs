//! Request bodies of `/v1/chat/completions` and `/v1/completions`, shaped like the official
//! OpenAPI spec. Numbers are kept wide (`i64`, `f64`) so that out-of-range values reach
//! validation and get a message naming the field, instead of a serde type error.

use serde::Deserialize;

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with `usage` and empty `choices`.
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// One part of a multi-part message `content`.
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    /// `text` is the only kind a text model accepts.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    #[serde(default)]
    pub text: Option<String>,
}

/// A message `content`: a string or a list of parts.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Content parts.
    Parts(Vec<ContentPart>),
}

/// One chat message.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessageIn {
    /// `system`, `developer`, `user`, `assistant`, `tool`.
    pub role: String,
    /// The content; `null` is allowed for assistant messages.
    #[serde(default)]
    pub content: Option<MessageContent>,
    /// Optional participant name (ignored by the template).
    #[serde(default)]
    pub name: Option<String>,
}

/// Fields shared by both endpoints.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CommonParams {
    /// The model id, adapter name or `adapter@version`.
    pub model: String,
    /// Most new tokens (legacy name).
    #[serde(default)]
    pub max_tokens: Option<i64>,
    /// Sampling temperature in [0, 2].
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Nucleus mass in (0, 1].
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Top-k filter (extension; -1 or 0 disables).
    #[serde(default)]
    pub top_k: Option<i64>,
    /// Min-p filter (extension).
    #[serde(default)]
    pub min_p: Option<f64>,
    /// Repetition penalty (extension, HF semantics).
    #[serde(default)]
    pub repetition_penalty: Option<f64>,
    /// Seed for reproducible sampling.
    #[serde(default)]
    pub seed: Option<i64>,
    /// Stop strings.
    #[serde(default)]
    pub stop: Option<StopField>,
    /// Choices to generate.
    #[serde(default)]
    pub n: Option<i64>,
    /// Server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// OpenAI presence penalty in [-2, 2].
    #[serde(default)]
    pub presence_penalty: Option<f64>,
    /// OpenAI frequency penalty in [-2, 2].
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    /// End-user id, recorded with the completion.
    #[serde(default)]
    pub user: Option<String>,
}

/// The chat-only fields of `POST /v1/chat/completions` (the rest is [`CommonParams`], read
/// from the same JSON object; two passes instead of `#[serde(flatten)]`, which loses the field
/// path that errors report as `param`).
#[derive(Debug, Clone, Deserialize)]
pub struct ChatFields {
    /// The conversation.
    pub messages: Vec<ChatMessageIn>,
    /// Most new tokens (current name; wins over `max_tokens`).
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    /// Return log-probabilities of the output tokens.
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// Alternatives per token (0..=20); needs `logprobs: true`.
    #[serde(default)]
    pub top_logprobs: Option<i64>,
}

/// `prompt`: text, token ids, or a list of one of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    /// One text.
    Text(String),
    /// Several texts.
    Texts(Vec<String>),
    /// One prompt as token ids.
    Tokens(Vec<i64>),
    /// Several prompts as token ids.
    TokenLists(Vec<Vec<i64>>),
}

/// The completions-only fields of `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionFields {
    /// The prompt.
    pub prompt: PromptField,
    /// Return the prompt before the completion (with its log-probs when `logprobs` is set).
    #[serde(default)]
    pub echo: Option<bool>,
    /// Alternatives per token (0..=20); `Some(0)` returns only the chosen tokens' log-probs.
    #[serde(default)]
    pub logprobs: Option<i64>,
    /// Text appended after the completion (accepted only when empty).
    #[serde(default)]
    pub suffix: Option<String>,
}

/// A parsed request: its endpoint's own fields plus the shared ones.
#[derive(Debug, Clone)]
pub struct Parsed<F> {
    /// Endpoint-specific fields.
    pub fields: F,
    /// Shared fields.
    pub common: CommonParams,
}

/// Parses `body` as a JSON object into `F` and [`CommonParams`]; the error names the field path
/// at fault (`None` for JSON that does not parse or is not an object).
pub fn parse<F: serde::de::DeserializeOwned>(
    body: &[u8],
) -> Result<Parsed<F>, (Option<String>, String)> {
    let value = object(body)?;
    Ok(Parsed {
        fields: typed(&value)?,
        common: typed(&value)?,
    })
}

/// Parses `body` as one JSON object of type `T`, with the same errors as [`parse`].
pub fn parse_one<T: serde::de::DeserializeOwned>(
    body: &[u8],
) -> Result<T, (Option<String>, String)> {
    typed(&object(body)?)
}

fn object(body: &[u8]) -> Result<serde_json::Value, (Option<String>, String)> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| (None, format!("the body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err((None, "the body must be a JSON object".into()));
    }
    Ok(value)
}

fn typed<T: serde::de::DeserializeOwned>(
    v: &serde_json::Value,
) -> Result<T, (Option<String>, String)> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path == "." {
            // A missing field: serde names it in the message (`missing field `messages``).
            let param = inner.split('`').nth(1).map(str::to_string);
            (param, inner)
        } else {
            (
                Some(path.clone()),
                format!("invalid value for `{path}`: {inner}"),
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_type_names_the_field() {
        let body = br#"{"model": "m", "messages": [], "temperature": "hot"}"#;
        let (param, msg) = parse::<ChatFields>(body).expect_err("must fail");
        assert_eq!(param.as_deref(), Some("temperature"), "{msg}");
    }

    #[test]
    fn nested_wrong_type_names_the_path() {
        let body = br#"{"model": "m", "messages": [{"role": 1, "content": "x"}]}"#;
        let (param, _) = parse::<ChatFields>(body).expect_err("must fail");
        assert_eq!(param.as_deref(), Some("messages[0].role"));
    }

    #[test]
    fn missing_field_is_named() {
        let (param, _) = parse::<ChatFields>(br#"{"model": "m"}"#).expect_err("must fail");
        assert_eq!(param.as_deref(), Some("messages"));
    }

    #[test]
    fn malformed_json_has_no_param() {
        let (param, msg) = parse::<ChatFields>(b"{\"model\": ").expect_err("must fail");
        assert_eq!(param, None);
        assert!(msg.contains("not valid JSON"), "{msg}");
    }

    #[test]
    fn unknown_fields_are_ignored_and_stop_takes_both_shapes() {
        let p = parse::<CompletionFields>(
            br#"{"model": "m", "prompt": "hi", "stop": "x", "frobnicate": 1}"#,
        )
        .expect("parses");
        assert!(matches!(p.common.stop, Some(StopField::One(ref s)) if s == "x"));
        assert!(matches!(p.fields.prompt, PromptField::Text(ref s) if s == "hi"));
    }
}
