//! The request JSON parsers and validation of `/v1/chat/completions` and `/v1/completions` on
//! arbitrary bodies, as the handlers run them before anything reaches the model. Errors are
//! the API's 400s; none may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prefix_rft_server::config::LimitsSection;
use prefix_rft_server::openai::request::{parse, parse_one, ChatFields, CompletionFields};
use prefix_rft_server::validation;

fuzz_target!(|data: &[u8]| {
    let limits = LimitsSection::default();
    if let Ok(p) = parse::<ChatFields>(data) {
        let max = match p.fields.max_completion_tokens {
            Some(v) => (Some(v), "max_completion_tokens"),
            None => (p.common.max_tokens, "max_tokens"),
        };
        let _ = validation::common(&p.common, max, 1, &limits);
        if let Some(v) = p.fields.top_logprobs {
            let _ = validation::top_logprobs("top_logprobs", v);
        }
        let _ = validation::messages(&p.fields.messages);
    }
    if let Ok(p) = parse::<CompletionFields>(data) {
        let _ = validation::common(&p.common, (p.common.max_tokens, "max_tokens"), 0, &limits);
        if let Some(v) = p.fields.logprobs {
            let _ = validation::top_logprobs("logprobs", v);
        }
    }
    let _ = parse_one::<serde_json::Value>(data);
});
