//! TRL's JSON Lines dataset formats (huggingface/trl, "Dataset formats and types").
//!
//! Out: one preference row per pair, `{"prompt", "chosen", "rejected"}`, conversational
//! (`prompt` a list of messages, `chosen`/`rejected` one assistant message each) for chat
//! prompts and standard (plain strings) for text prompts. Pairs on token-id prompts have no
//! text form and are skipped.
//!
//! In: preference rows (explicit `prompt`, or implicit: `chosen`/`rejected` conversations
//! sharing a prompt prefix) and SFT rows (`messages` ending with the assistant answer, or
//! `prompt`/`completion`), each as messages or plain strings.

use serde_json::{json, Value};

use super::pairing::{Message, PreferencePair, Prompt};
use super::{FeedbackError, ImportExample};

/// The TRL preference row of `pair`, or `None` for a token-id prompt.
pub fn preference_row(pair: &PreferencePair) -> Option<Value> {
    match &pair.prompt {
        Prompt::Chat(messages) => Some(json!({
            "prompt": messages,
            "chosen": [{"role": "assistant", "content": pair.chosen}],
            "rejected": [{"role": "assistant", "content": pair.rejected}],
        })),
        Prompt::Text(text) => Some(json!({
            "prompt": text,
            "chosen": pair.chosen,
            "rejected": pair.rejected,
        })),
        Prompt::Tokens(_) => None,
    }
}

/// JSON Lines of every exportable pair (each line ends with `\n`) and how many were skipped.
pub fn export_lines(pairs: &[PreferencePair]) -> (String, usize) {
    let mut out = String::new();
    let mut skipped = 0;
    for p in pairs {
        match preference_row(p) {
            Some(row) => {
                out.push_str(&row.to_string());
                out.push('\n');
            }
            None => skipped += 1,
        }
    }
    (out, skipped)
}

fn invalid(line: usize, message: impl std::fmt::Display) -> FeedbackError {
    FeedbackError::InvalidData(format!("line {line}: {message}"))
}

fn messages(v: &Value, line: usize, field: &str) -> Result<Vec<Message>, FeedbackError> {
    serde_json::from_value(v.clone()).map_err(|e| {
        invalid(
            line,
            format!("`{field}` is not a list of {{role, content}}: {e}"),
        )
    })
}

/// The answer of a `chosen`/`rejected`/`completion` value: a string, or messages whose last is
/// the assistant's answer.
fn answer(v: &Value, line: usize, field: &str) -> Result<String, FeedbackError> {
    if let Some(s) = v.as_str() {
        return Ok(s.to_string());
    }
    let m = messages(v, line, field)?;
    match m.last() {
        Some(last) if last.role == "assistant" => Ok(last.content.clone()),
        _ => Err(invalid(
            line,
            format!("`{field}` must end with an assistant message"),
        )),
    }
}

fn prompt(v: &Value, line: usize) -> Result<Prompt, FeedbackError> {
    match v {
        Value::String(s) => Ok(Prompt::Text(s.clone())),
        Value::Array(_) => Ok(Prompt::Chat(messages(v, line, "prompt")?)),
        _ => Err(invalid(
            line,
            "`prompt` must be a string or a list of messages",
        )),
    }
}

/// Splits a full conversation into (prompt messages, final assistant answer).
fn split_conversation(
    v: &Value,
    line: usize,
    field: &str,
) -> Result<(Vec<Message>, String), FeedbackError> {
    let mut m = messages(v, line, field)?;
    match m.pop() {
        Some(last) if last.role == "assistant" && !m.is_empty() => Ok((m, last.content)),
        _ => Err(invalid(
            line,
            format!("`{field}` must be a conversation ending with an assistant message"),
        )),
    }
}

/// Parses one JSON Lines row (1-based `line` for messages).
pub fn parse_row(text: &str, line: usize) -> Result<ImportExample, FeedbackError> {
    let v: Value =
        serde_json::from_str(text).map_err(|e| invalid(line, format!("not JSON: {e}")))?;
    let Some(obj) = v.as_object() else {
        return Err(invalid(line, "a row must be a JSON object"));
    };
    match (
        obj.get("prompt"),
        obj.get("chosen"),
        obj.get("rejected"),
        obj.get("completion"),
        obj.get("messages"),
    ) {
        (Some(p), Some(c), Some(r), _, _) => Ok(ImportExample::Preference {
            prompt: prompt(p, line)?,
            chosen: answer(c, line, "chosen")?,
            rejected: answer(r, line, "rejected")?,
        }),
        (None, Some(c), Some(r), _, _) => {
            if let (Some(c), Some(r)) = (c.as_str(), r.as_str()) {
                return Err(invalid(
                    line,
                    format!(
                        "a row without `prompt` needs conversations, not strings ({} / {} chars)",
                        c.len(),
                        r.len()
                    ),
                ));
            }
            let (pc, chosen) = split_conversation(c, line, "chosen")?;
            let (pr, rejected) = split_conversation(r, line, "rejected")?;
            if pc != pr {
                return Err(invalid(
                    line,
                    "`chosen` and `rejected` do not share the same prompt messages",
                ));
            }
            Ok(ImportExample::Preference {
                prompt: Prompt::Chat(pc),
                chosen,
                rejected,
            })
        }
        (Some(p), None, None, Some(c), _) => Ok(ImportExample::Demonstration {
            prompt: prompt(p, line)?,
            completion: answer(c, line, "completion")?,
        }),
        (None, None, None, None, Some(m)) => {
            let (prompt, completion) = split_conversation(m, line, "messages")?;
            Ok(ImportExample::Demonstration {
                prompt: Prompt::Chat(prompt),
                completion,
            })
        }
        _ => Err(invalid(
            line,
            "expected a preference row (prompt/chosen/rejected) or an SFT row (messages, or prompt/completion)",
        )),
    }
}

/// Parses a whole JSON Lines text; blank lines are skipped.
pub fn parse_lines(text: &str) -> Result<Vec<ImportExample>, FeedbackError> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| parse_row(l, i + 1))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feedback::pairing::{ExampleKey, PairSource};

    fn user(text: &str) -> Vec<Message> {
        vec![Message {
            role: "user".into(),
            content: text.into(),
        }]
    }

    #[test]
    fn reads_every_supported_row_shape() {
        let text = r#"
{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": [{"role": "assistant", "content": "Go away."}]}
{"prompt": "2+2=", "chosen": "4", "rejected": "5"}
{"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A"}], "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "B"}]}
{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hey"}]}
{"prompt": "Capital of France?", "completion": "Paris"}
"#;
        let rows = parse_lines(text).expect("parses");
        assert_eq!(
            rows,
            vec![
                ImportExample::Preference {
                    prompt: Prompt::Chat(user("hi")),
                    chosen: "Hello!".into(),
                    rejected: "Go away.".into()
                },
                ImportExample::Preference {
                    prompt: Prompt::Text("2+2=".into()),
                    chosen: "4".into(),
                    rejected: "5".into()
                },
                ImportExample::Preference {
                    prompt: Prompt::Chat(user("hi")),
                    chosen: "A".into(),
                    rejected: "B".into()
                },
                ImportExample::Demonstration {
                    prompt: Prompt::Chat(user("hi")),
                    completion: "Hey".into()
                },
                ImportExample::Demonstration {
                    prompt: Prompt::Text("Capital of France?".into()),
                    completion: "Paris".into()
                },
            ]
        );
    }

    #[test]
    fn bad_rows_name_their_line() {
        for (text, needle) in [
            ("{}\n", "line 1"),
            ("\n[1]\n", "line 2"),
            ("{\"prompt\": 3, \"completion\": \"x\"}", "`prompt`"),
            (
                "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}",
                "assistant",
            ),
            ("not json", "not JSON"),
        ] {
            let e = parse_lines(text).expect_err(text).to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn exports_chat_and_text_pairs_and_skips_token_prompts() {
        let pair = |prompt| PreferencePair {
            key: ExampleKey("pair-x".into()),
            prompt,
            chosen: "good".into(),
            rejected: "bad".into(),
            rejected_version: "base".into(),
            source: PairSource::Correction {
                feedback: "fb-1".into(),
            },
            trained_in: vec![],
        };
        let (text, skipped) = export_lines(&[
            pair(Prompt::Chat(user("hi"))),
            pair(Prompt::Text("t".into())),
            pair(Prompt::Tokens(vec![1])),
        ]);
        assert_eq!(skipped, 1);
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        assert_eq!(
            lines[0],
            json!({"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "good"}], "rejected": [{"role": "assistant", "content": "bad"}]})
        );
        assert_eq!(
            lines[1],
            json!({"prompt": "t", "chosen": "good", "rejected": "bad"})
        );
        // What we export, we can import again.
        let back = parse_lines(&text).expect("round trip");
        assert_eq!(back.len(), 2);
    }
}
