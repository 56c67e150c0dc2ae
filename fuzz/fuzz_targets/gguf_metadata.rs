//! The GGUF reader on arbitrary bytes, then everything that reads its metadata: the model
//! config, the tokenizer built from `tokenizer.ggml.*`, and the chat template. Any input may
//! be refused; none may panic, hang or allocate what the file cannot hold.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prefix_rft_engine::chat_template::{ChatMessage, ChatTemplate};
use prefix_rft_engine::gguf::GgufFile;
use prefix_rft_engine::model::ModelConfig;
use prefix_rft_engine::tokenizer::Tokenizer;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::from_bytes("fuzz.gguf", data) else {
        return;
    };
    for info in file.tensors.values() {
        // In bounds by construction; reading it must not fault.
        let _ = file.tensor_data(info).iter().fold(0u8, |a, b| a ^ b);
    }
    let _ = ModelConfig::from_gguf(&file);
    let Ok(tokenizer) = Tokenizer::from_gguf(&file) else {
        return;
    };
    if let Ok(ids) = tokenizer.encode("Hello, world! ünïcödé 🎉 <|im_start|>", true) {
        let _ = tokenizer.decode(&ids, false);
    }
    if let Some(src) = tokenizer.chat_template() {
        if let Ok(t) = ChatTemplate::new(src, tokenizer.bos_token(), tokenizer.eos_token()) {
            let _ = t.render(&[ChatMessage::new("user", "hi")], true);
        }
    }
});
