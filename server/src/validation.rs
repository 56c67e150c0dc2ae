//! Parsed requests → validated values the backend accepts. Every refusal here is a 400 that
//! names the field (`param`), decided before any byte of a response is sent.

use prefix_rft_engine::chat_template::ChatMessage;
use prefix_rft_engine::sampler::{SamplingParams, MAX_TOP_LOGPROBS};

use crate::config::LimitsSection;
use crate::error::ApiError;
use crate::openai::request::{ChatMessageIn, CommonParams, MessageContent, StopField};

/// Most stop strings per request.
pub const MAX_STOP_STRINGS: usize = 16;
/// Roles a chat message may have.
const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];

/// The shared fields, checked.
#[derive(Debug, Clone)]
pub struct ValidParams {
    /// Sampling parameters (validated by the engine's rules).
    pub sampling: SamplingParams,
    /// Choices.
    pub n: usize,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Server-sent events.
    pub stream: bool,
    /// Final usage chunk in a stream.
    pub include_usage: bool,
    /// `max_tokens` as asked (`None` = as many as allowed).
    pub max_tokens: Option<usize>,
    /// End-user id.
    pub user: Option<String>,
}

fn finite_f32(param: &str, v: f64) -> Result<f32, ApiError> {
    if !v.is_finite() {
        return Err(ApiError::invalid(
            param,
            format!("`{param}` must be a finite number, got {v}"),
        ));
    }
    Ok(v as f32)
}

/// Checks the fields shared by both endpoints. `max_tokens` is the endpoint's effective field
/// (chat prefers `max_completion_tokens`) with its name; `min_tokens` is the least allowed.
pub fn common(
    c: &CommonParams,
    max_tokens: (Option<i64>, &str),
    min_tokens: i64,
    limits: &LimitsSection,
) -> Result<ValidParams, ApiError> {
    let mut s = SamplingParams::default();
    if let Some(t) = c.temperature {
        s.temperature = finite_f32("temperature", t)?;
    }
    if let Some(p) = c.top_p {
        s.top_p = finite_f32("top_p", p)?;
    }
    if let Some(p) = c.min_p {
        s.min_p = finite_f32("min_p", p)?;
    }
    if let Some(p) = c.repetition_penalty {
        s.repetition_penalty = finite_f32("repetition_penalty", p)?;
    }
    if let Some(p) = c.presence_penalty {
        s.presence_penalty = finite_f32("presence_penalty", p)?;
    }
    if let Some(p) = c.frequency_penalty {
        s.frequency_penalty = finite_f32("frequency_penalty", p)?;
    }
    if let Some(k) = c.top_k {
        s.top_k = match k {
            -1 | 0 => 0,
            k if k > 0 => usize::try_from(k).unwrap_or(usize::MAX),
            k => {
                return Err(ApiError::invalid(
                    "top_k",
                    format!("`top_k` must be -1, 0 or positive, got {k}"),
                ))
            }
        };
    }
    // Any integer is a seed; negative ones are reinterpreted, as numpy does.
    s.seed = c.seed.map(|v| v as u64);
    s.validate()
        .map_err(|e| ApiError::invalid(e.param, e.to_string()))?;

    let n = match c.n {
        None => 1,
        Some(n) if n >= 1 && (n as u64) <= limits.max_n as u64 => n as usize,
        Some(n) => {
            return Err(ApiError::invalid(
                "n",
                format!("`n` must be between 1 and {}, got {n}", limits.max_n),
            ))
        }
    };
    let (mt, mt_name) = max_tokens;
    let max_tokens = match mt {
        None => None,
        Some(v) if v < min_tokens => {
            return Err(ApiError::invalid(
                mt_name,
                format!("`{mt_name}` must be at least {min_tokens}, got {v}"),
            ))
        }
        Some(v) if v as u64 > limits.max_tokens as u64 => {
            return Err(ApiError::invalid(
                mt_name,
                format!(
                    "`{mt_name}` must be at most {} on this server, got {v}",
                    limits.max_tokens
                ),
            ))
        }
        Some(v) => Some(v as usize),
    };
    let stop = match &c.stop {
        None => Vec::new(),
        Some(StopField::One(s)) => vec![s.clone()],
        Some(StopField::Many(v)) => v.clone(),
    };
    if stop.len() > MAX_STOP_STRINGS {
        return Err(ApiError::invalid(
            "stop",
            format!("at most {MAX_STOP_STRINGS} stop strings are allowed"),
        ));
    }
    Ok(ValidParams {
        sampling: s,
        n,
        stop,
        stream: c.stream.unwrap_or(false),
        include_usage: c
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        max_tokens,
        user: c.user.clone(),
    })
}

/// Checks `top_logprobs`-style counts (0..=20).
pub fn top_logprobs(param: &str, v: i64) -> Result<usize, ApiError> {
    if (0..=MAX_TOP_LOGPROBS as i64).contains(&v) {
        Ok(v as usize)
    } else {
        Err(ApiError::invalid(
            param,
            format!("`{param}` must be between 0 and {MAX_TOP_LOGPROBS}, got {v}"),
        ))
    }
}

/// Chat messages → the template's messages.
pub fn messages(input: &[ChatMessageIn]) -> Result<Vec<ChatMessage>, ApiError> {
    if input.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "`messages` must contain at least one message",
        ));
    }
    input
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if !ROLES.contains(&m.role.as_str()) {
                return Err(ApiError::invalid(
                    format!("messages[{i}].role"),
                    format!(
                        "unknown role `{}` (expected one of {})",
                        m.role,
                        ROLES.join(", ")
                    ),
                ));
            }
            let content = match &m.content {
                Some(MessageContent::Text(t)) => t.clone(),
                Some(MessageContent::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => text.push_str(t),
                            _ => {
                                return Err(ApiError::invalid(
                                    format!("messages[{i}].content[{j}]"),
                                    "only `text` content parts are supported by this model",
                                ))
                            }
                        }
                    }
                    text
                }
                None if m.role == "assistant" => String::new(),
                None => {
                    return Err(ApiError::invalid(
                        format!("messages[{i}].content"),
                        "`content` is required",
                    ));
                }
            };
            Ok(ChatMessage {
                role: m.role.clone(),
                content,
            })
        })
        .collect()
}

/// The new-token count a request runs with: what it asked for, or by default as many as the
/// server limit and the context allow; 400 `context_length_exceeded` when the prompt (plus the
/// requested tokens) does not fit. `param` names the prompt field.
pub fn fit_context(
    prompt_len: usize,
    requested: Option<usize>,
    context: usize,
    limits: &LimitsSection,
    param: &str,
) -> Result<usize, ApiError> {
    let max_prompt = limits.max_prompt_tokens.min(context);
    if prompt_len > max_prompt {
        return Err(ApiError::ContextLength {
            message: format!(
                "This model's maximum context length is {context} tokens and this server accepts prompts of at \
                 most {max_prompt} tokens; your prompt has {prompt_len} tokens."
            ),
            param: Some(param.into()),
        });
    }
    let room = context - prompt_len;
    match requested {
        Some(m) if m > room => Err(ApiError::ContextLength {
            message: format!(
                "This model's maximum context length is {context} tokens. However, you requested {} tokens \
                 ({prompt_len} in the prompt, {m} for the completion).",
                prompt_len + m
            ),
            param: Some(param.into()),
        }),
        Some(m) => Ok(m),
        None if room == 0 => Err(ApiError::ContextLength {
            message: format!("This model's maximum context length is {context} tokens; your prompt fills it."),
            param: Some(param.into()),
        }),
        None => Ok(room.min(limits.max_tokens)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::request::{ChatFields, CompletionFields};

    fn limits() -> LimitsSection {
        LimitsSection::default()
    }

    fn common_of(json: &str) -> Result<ValidParams, ApiError> {
        let p = crate::openai::request::parse::<CompletionFields>(json.as_bytes()).expect("parses");
        common(&p.common, (p.common.max_tokens, "max_tokens"), 0, &limits())
    }

    fn param_of(e: ApiError) -> Option<String> {
        e.object().param
    }

    #[test]
    fn temperature_out_of_range_names_temperature() {
        let e = common_of(r#"{"model":"m","prompt":"x","temperature":3}"#).expect_err("must fail");
        assert_eq!(param_of(e).as_deref(), Some("temperature"));
    }

    #[test]
    fn n_zero_and_negative_max_tokens_are_refused() {
        let e = common_of(r#"{"model":"m","prompt":"x","n":0}"#).expect_err("n=0");
        assert_eq!(param_of(e).as_deref(), Some("n"));
        let e = common_of(r#"{"model":"m","prompt":"x","max_tokens":-1}"#).expect_err("negative");
        assert_eq!(param_of(e).as_deref(), Some("max_tokens"));
    }

    #[test]
    fn seed_and_stop_list_pass_through() {
        let v = common_of(r#"{"model":"m","prompt":"x","seed":7,"stop":["a","b"],"n":2}"#)
            .expect("valid");
        assert_eq!(v.sampling.seed, Some(7));
        assert_eq!(v.stop, ["a", "b"]);
        assert_eq!(v.n, 2);
    }

    #[test]
    fn empty_messages_are_refused() {
        let p = crate::openai::request::parse::<ChatFields>(br#"{"model":"m","messages":[]}"#)
            .expect("parses");
        let e = messages(&p.fields.messages).expect_err("empty");
        assert_eq!(param_of(e).as_deref(), Some("messages"));
    }

    #[test]
    fn prompt_over_context_is_context_length_exceeded() {
        let e = fit_context(9000, None, 8192, &limits(), "prompt").expect_err("too long");
        assert_eq!(e.object().code, Some("context_length_exceeded"));
        let e = fit_context(8000, Some(500), 8192, &limits(), "prompt")
            .expect_err("too long with output");
        assert_eq!(e.object().code, Some("context_length_exceeded"));
    }

    #[test]
    fn default_max_tokens_is_capped_by_limit_and_context() {
        assert_eq!(
            fit_context(10, None, 8192, &limits(), "prompt").expect("fits"),
            2048
        );
        assert_eq!(
            fit_context(8000, None, 8192, &limits(), "prompt").expect("fits"),
            192
        );
    }
}
