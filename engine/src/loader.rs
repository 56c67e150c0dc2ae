//! Loads a model file or directory into everything generation needs: weights, tokenizer and
//! chat template, checked against each other.

use std::path::{Path, PathBuf};

use crate::chat_template::ChatTemplate;
use crate::error::EngineError;
use crate::gguf::GgufFile;
use crate::model::{Llama, LoadOptions, ModelError};
use crate::tokenizer::Tokenizer;

/// A model ready to serve.
pub struct LoadedModel {
    /// The forward.
    pub model: Llama,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Its chat template, when the files carry one.
    pub chat_template: Option<ChatTemplate>,
    /// Where it was loaded from.
    pub path: PathBuf,
}

impl LoadedModel {
    /// Loads a `.gguf` file or a Hugging Face directory.
    pub fn load(path: &Path, opts: LoadOptions) -> Result<Self, EngineError> {
        let load_err = |message: String| EngineError::Load {
            path: path.display().to_string(),
            message,
        };
        if !path.exists() {
            return Err(load_err("no such file or directory".into()));
        }
        let (model, tokenizer) = if path.is_dir() {
            let model = Llama::from_hf_dir(path, opts)?;
            let tokenizer = Tokenizer::from_file(&path.join("tokenizer.json"))?;
            (model, tokenizer)
        } else {
            let file = GgufFile::open(path).map_err(ModelError::from)?;
            let model = Llama::from_gguf(&file, opts)?;
            let tokenizer = Tokenizer::from_gguf(&file)?;
            (model, tokenizer)
        };
        let vocab = model.config().vocab_size;
        // Models may pad the embedding beyond the tokenizer (Qwen2 does), never the reverse.
        if tokenizer.vocab_size() > vocab {
            return Err(load_err(format!(
                "tokenizer has {} tokens but the model's vocabulary is {vocab}",
                tokenizer.vocab_size()
            )));
        }
        for id in tokenizer
            .bos_id()
            .into_iter()
            .chain(tokenizer.eos_ids().iter().copied())
        {
            if id as usize >= vocab {
                return Err(load_err(format!(
                    "special token id {id} is outside the vocabulary of {vocab}"
                )));
            }
        }
        let chat_template = match tokenizer.chat_template() {
            Some(src) => Some(ChatTemplate::new(
                src,
                tokenizer.bos_token(),
                tokenizer.eos_token(),
            )?),
            None => None,
        };
        Ok(LoadedModel {
            model,
            tokenizer,
            chat_template,
            path: path.to_path_buf(),
        })
    }
}
