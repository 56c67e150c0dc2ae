//! The GGUF tokenizer and chat template against references nobody on this project wrote:
//! fixtures produced by HF transformers from the same GGUF (`scripts/oracle/tokenizer_hf.py`,
//! `scripts/oracle/chat_template_hf.py`).

use std::path::PathBuf;

use prefix_rft_engine::chat_template::{ChatMessage, ChatTemplate};
use prefix_rft_engine::gguf::GgufFile;
use prefix_rft_engine::testing::default_model_path;
use prefix_rft_engine::tokenizer::Tokenizer;
use serde::Deserialize;

#[derive(Deserialize)]
struct TokenizerFixture {
    cases: Vec<TokenizerCase>,
}

#[derive(Deserialize)]
struct TokenizerCase {
    text: String,
    ids: Vec<u32>,
    decoded: String,
}

#[derive(Deserialize)]
struct ChatFixture {
    template: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
    cases: Vec<ChatCase>,
}

#[derive(Deserialize)]
struct ChatCase {
    messages: Vec<ChatMessage>,
    add_generation_prompt: bool,
    rendered: String,
    ids: Vec<u32>,
}

fn fixture<T: for<'de> Deserialize<'de>>(name: &str) -> T {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn gguf_tokenizer() -> Tokenizer {
    let file = GgufFile::open(&default_model_path()).expect("open model");
    Tokenizer::from_gguf(&file).expect("tokenizer from GGUF")
}

#[derive(Deserialize)]
struct IdsFixture {
    cases: Vec<IdsCase>,
}

#[derive(Deserialize)]
struct IdsCase {
    text: String,
    ids: Vec<u32>,
}

/// Strings on which transformers' GGUF loader and llama.cpp disagree. transformers ignores
/// `tokenizer.ggml.pre = smollm` and pre-tokenizes with plain GPT-2, so it misses SmolLM2's
/// individual-digits split (`Digits(individual_digits=true)` in the model's own
/// tokenizer.json), which also splits other numeric characters such as `½`. We follow
/// llama.cpp and the model's tokenizer.json there.
const TRANSFORMERS_GGUF_DIVERGENCES: &[&str] = &["½ ¼ ¾ ⅓"];

#[test]
fn gguf_tokenizer_matches_transformers_on_fixture_corpus() {
    let tok = gguf_tokenizer();
    let hf: TokenizerFixture = fixture("tokenizer_hf.json");
    let llama: IdsFixture = fixture("tokenizer_llamacpp.json");
    assert!(
        hf.cases.len() >= 200,
        "fixture has {} cases",
        hf.cases.len()
    );
    assert_eq!(
        hf.cases.len(),
        llama.cases.len(),
        "the two fixtures cover the same strings"
    );
    let mut failures = Vec::new();
    let mut matched_hf = 0;
    for (case, reference) in hf.cases.iter().zip(&llama.cases) {
        assert_eq!(case.text, reference.text, "fixtures are in the same order");
        let ids = tok.encode(&case.text, false).expect("encode");
        let diverges = TRANSFORMERS_GGUF_DIVERGENCES.contains(&case.text.as_str());
        if diverges {
            // Still a real divergence between the references, and we side with llama.cpp.
            assert_ne!(
                case.ids, reference.ids,
                "{:?} no longer diverges",
                case.text
            );
            if ids != reference.ids {
                failures.push(format!(
                    "encode {:?}: got {ids:?}, llama.cpp {:?}",
                    case.text, reference.ids
                ));
            }
        } else if ids != case.ids {
            failures.push(format!(
                "encode {:?}: got {ids:?}, want {:?}",
                case.text, case.ids
            ));
        } else {
            matched_hf += 1;
        }
        if ids != reference.ids {
            failures.push(format!(
                "encode {:?}: got {ids:?}, llama.cpp {:?}",
                case.text, reference.ids
            ));
        }
        let decoded = tok.decode(&case.ids, false).expect("decode");
        if decoded != case.decoded {
            failures.push(format!(
                "decode {:?}: got {decoded:?}, want {:?}",
                case.ids, case.decoded
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches over {} fixture strings:\n{}",
        failures.len(),
        hf.cases.len(),
        failures.join("\n")
    );
    assert_eq!(
        matched_hf + TRANSFORMERS_GGUF_DIVERGENCES.len(),
        hf.cases.len()
    );
}

#[test]
fn gguf_tokenizer_special_tokens() {
    let tok = gguf_tokenizer();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.bos_token().as_deref(), Some("<|im_start|>"));
    assert_eq!(tok.eos_token().as_deref(), Some("<|im_end|>"));
    // eos (<|im_end|>) first, then <|endoftext|>, which also ends a turn.
    assert_eq!(tok.eos_ids(), &[2, 0]);
    // add_bos_token is false in this file.
    assert_eq!(
        tok.encode("Hello", true).unwrap(),
        tok.encode("Hello", false).unwrap()
    );
    assert!(!tok.adds_bos());
    let the = tok.encode(" the", false).unwrap();
    assert_eq!(the.len(), 1);
    assert_eq!(tok.token_bytes(the[0]).unwrap(), b" the");
    assert_eq!(tok.token_str(the[0]).unwrap(), " the");
    assert_eq!(tok.token_str(2).unwrap(), "<|im_end|>");
    assert!(tok.chat_template().unwrap().contains("<|im_start|>"));
    assert_eq!(tok.decode(&[1, 2], true).unwrap(), "");
}

#[test]
fn gguf_streaming_decode_matches_full_decode() {
    let tok = gguf_tokenizer();
    let fx: TokenizerFixture = fixture("tokenizer_hf.json");
    for case in &fx.cases {
        let mut dec = tok.decoder(false);
        let mut out = String::new();
        for &id in &case.ids {
            if let Some(text) = dec.push(id).expect("push") {
                out.push_str(&text);
            }
        }
        if let Some(rest) = dec.finish().expect("finish") {
            out.push_str(&rest);
        }
        assert_eq!(out, case.decoded, "streaming {:?}", case.text);
    }
    // Every byte of a 4-byte emoji is its own token: nothing comes out until the last.
    let ids = tok.encode("🦀", false).unwrap();
    let mut dec = tok.decoder(false);
    let outs: Vec<Option<String>> = ids.iter().map(|&id| dec.push(id).unwrap()).collect();
    assert_eq!(outs.last().unwrap().as_deref(), Some("🦀"));
    assert!(
        outs[..outs.len() - 1].iter().all(Option::is_none),
        "{outs:?}"
    );
}

#[test]
fn gguf_chat_template_matches_transformers() {
    let tok = gguf_tokenizer();
    let fx: ChatFixture = fixture("chat_template_hf.json");
    let source = tok.chat_template().expect("GGUF carries a chat template");
    assert_eq!(source, fx.template);
    assert_eq!(tok.bos_token(), fx.bos_token);
    assert_eq!(tok.eos_token(), fx.eos_token);
    let template = ChatTemplate::new(source, tok.bos_token(), tok.eos_token()).expect("compile");
    for case in &fx.cases {
        let rendered = template
            .render(&case.messages, case.add_generation_prompt)
            .expect("render");
        assert_eq!(rendered, case.rendered);
        assert_eq!(
            tok.encode(&rendered, false).unwrap(),
            case.ids,
            "ids of {rendered:?}"
        );
    }
}
