//! The chat-template input path: arbitrary messages (roles and contents, as requests send them)
//! through SmolLM2's real template, and arbitrary template sources (a model file's metadata)
//! over those messages, under the render limits. Errors are fine; panics, hangs and unbounded
//! output are not.
#![no_main]

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use prefix_rft_engine::chat_template::{ChatMessage, ChatTemplate};

#[derive(Arbitrary, Debug)]
struct Input {
    /// `None`: SmolLM2's template.
    template: Option<String>,
    messages: Vec<(String, String)>,
    add_generation_prompt: bool,
}

fn smollm2() -> &'static ChatTemplate {
    static T: OnceLock<ChatTemplate> = OnceLock::new();
    T.get_or_init(|| {
        let fixture: serde_json::Value = serde_json::from_str(include_str!(
            "../../engine/tests/fixtures/chat_template_hf.json"
        ))
        .expect("fixture");
        let src = fixture["template"].as_str().expect("template");
        ChatTemplate::new(src, None, Some("<|im_end|>".into())).expect("SmolLM2's template")
    })
}

fuzz_target!(|input: Input| {
    let messages: Vec<ChatMessage> = input
        .messages
        .iter()
        .map(|(role, content)| ChatMessage::new(role.as_str(), content.as_str()))
        .collect();
    let own;
    let template = match &input.template {
        None => smollm2(),
        Some(src) => match ChatTemplate::new(src, Some("<s>".into()), Some("</s>".into())) {
            Ok(t) => {
                own = t.with_limits(100_000, 1 << 20);
                &own
            }
            Err(_) => return,
        },
    };
    if let Ok(text) = template.render(&messages, input.add_generation_prompt) {
        assert!(text.len() <= 1 << 20 || input.template.is_none());
    }
});
