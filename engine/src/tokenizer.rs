//! The model's tokenizer: text ⇄ token ids, streaming decode, and the special ids the engine
//! needs (BOS, the tokens that end a turn).
//!
//! The `tokenizers` crate does all the tokenizing. What lives here is the translation from a
//! model file into a `tokenizers::Tokenizer`:
//!
//! * `tokenizer.json` (+ `tokenizer_config.json` beside it) is loaded as Hugging Face does;
//! * a GGUF file carries no `tokenizer.json`, only llama.cpp's `tokenizer.ggml.*` metadata, which
//!   we translate the way transformers' GGUF loader (`integrations/gguf/gguf_tokenizer_mapping.py`)
//!   and llama.cpp's `llama-vocab.cpp` do: byte-level BPE for `gpt2`, SentencePiece-style BPE with
//!   byte fallback for `llama`.
//!
//! Every input-dependent problem (a missing key, a merge naming an unknown token, an id out of
//! range) is a [`TokenizerError`] naming the file and the key, never a panic.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BpeBuilder, Vocab};
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::gguf::{GgufFile, GgufValue};

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const TOKEN_TYPE_CONTROL: u64 = 3;
const TOKEN_TYPE_USER_DEFINED: u64 = 4;

/// Tokens that end an assistant turn in the chat formats we know. When the vocabulary has one,
/// generation must stop on it even if the file's `eos` is another token (Llama 3's `eos` is
/// `<|end_of_text|>` but its chat turns end with `<|eot_id|>`).
const END_OF_TURN_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
];

/// SentencePiece's word-boundary marker.
const SPIECE_UNDERLINE: char = '\u{2581}';

/// Llama 3's split regex (llama.cpp `LLAMA_VOCAB_PRE_TYPE_LLAMA3`, HF `tokenizer.json`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's split regex: Llama 3's with single digits.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `tokenizer.ggml.pre` values we can translate, for error messages.
const SUPPORTED_PRE: &str = "default, gpt-2, gpt2, smollm, starcoder, refact, llama-bpe, llama3, \
     llama-v3, smaug-bpe, dbrx, falcon3, qwen2, deepseek-r1-qwen";

/// Why a tokenizer could not be built or used.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A file could not be read.
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `tokenizer.json` or `tokenizer_config.json` is not what it should be.
    #[error("{path}: invalid tokenizer file: {message}")]
    Invalid { path: PathBuf, message: String },
    /// A required GGUF metadata key is absent.
    #[error("{path}: metadata key `{key}` is missing")]
    MissingKey { path: PathBuf, key: String },
    /// A GGUF metadata key holds a value we cannot use.
    #[error("{path}: metadata key `{key}`: {problem}")]
    BadKey {
        path: PathBuf,
        key: String,
        problem: String,
    },
    /// `tokenizer.ggml.model` names a tokenizer kind we do not translate.
    #[error(
        "{path}: unsupported tokenizer model `{model}` in `tokenizer.ggml.model` (supported: gpt2, llama)"
    )]
    UnsupportedModel { path: PathBuf, model: String },
    /// `tokenizer.ggml.pre` names a pre-tokenizer we do not know.
    #[error(
        "{path}: unsupported pre-tokenizer `{pre}` in `tokenizer.ggml.pre` (supported: {SUPPORTED_PRE})"
    )]
    UnsupportedPre { path: PathBuf, pre: String },
    /// The `tokenizers` crate refused the translated parts.
    #[error("{path}: cannot build the tokenizer: {message}")]
    Build { path: PathBuf, message: String },
    /// Encoding failed.
    #[error("cannot encode text: {0}")]
    Encode(String),
    /// Decoding failed.
    #[error("cannot decode tokens: {0}")]
    Decode(String),
    /// A token id outside the vocabulary was given to decode.
    #[error("token id {id} is out of range (the vocabulary has {vocab_size} tokens)")]
    IdOutOfRange { id: u32, vocab_size: usize },
}

/// How a vocabulary entry spells the bytes of its token; decides [`Tokenizer::token_bytes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spelling {
    /// GPT-2 byte-level: each byte is one printable char of `bytes_to_unicode`.
    ByteLevel,
    /// SentencePiece: `▁` is a space and `<0xAB>` is one raw byte.
    SentencePiece,
}

/// The model's tokenizer: a `tokenizers::Tokenizer` plus the special ids the engine needs.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Number of ids the model knows (embedding rows), added tokens included.
    vocab_size: usize,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    eos_ids: Vec<u32>,
    /// Prepend BOS / append EOS ourselves on `encode(.., true)`: the GGUF path has no
    /// post-processor, and a `tokenizer.json` without one may still ask for BOS in its config.
    add_bos: bool,
    add_eos: bool,
    /// Whether `inner`'s post-processor already adds the special tokens.
    post_processor_adds: bool,
    /// Raw bytes of every id, precomputed so logprobs cost a lookup.
    token_bytes: Vec<Vec<u8>>,
    chat_template: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("bos_id", &self.bos_id)
            .field("eos_ids", &self.eos_ids)
            .field("add_bos", &self.add_bos)
            .finish()
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` at `path`, and `tokenizer_config.json` beside it when present
    /// (BOS/EOS, `add_bos_token`, `add_eos_token`, `chat_template`).
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
            path: path.to_owned(),
            source,
        })?;
        let inner: tokenizers::Tokenizer =
            text.parse()
                .map_err(|e: tokenizers::Error| TokenizerError::Invalid {
                    path: path.to_owned(),
                    message: e.to_string(),
                })?;

        let config_path = path.with_file_name("tokenizer_config.json");
        let config =
            match std::fs::read_to_string(&config_path) {
                Ok(text) => Some(serde_json::from_str::<serde_json::Value>(&text).map_err(
                    |e| TokenizerError::Invalid {
                        path: config_path.clone(),
                        message: e.to_string(),
                    },
                )?),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(source) => {
                    return Err(TokenizerError::Io {
                        path: config_path,
                        source,
                    })
                }
            };
        let config = config.unwrap_or(serde_json::Value::Null);

        // `bos_token` is a string or an AddedToken object `{"content": ..}`.
        let special = |name: &str| -> Option<String> {
            match config.get(name)? {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
                _ => None,
            }
        };
        let lookup = |name: &str| -> Result<Option<u32>, TokenizerError> {
            match special(name) {
                None => Ok(None),
                Some(tok) => {
                    inner
                        .token_to_id(&tok)
                        .map(Some)
                        .ok_or_else(|| TokenizerError::Invalid {
                            path: config_path.clone(),
                            message: format!("`{name}` is `{tok}`, which is not in the vocabulary"),
                        })
                }
            }
        };
        let bos_id = lookup("bos_token")?;
        let eos_id = lookup("eos_token")?;

        let post_processor_adds = inner.get_post_processor().is_some();
        let add_bos = config
            .get("add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
            && !post_processor_adds;
        let add_eos = config
            .get("add_eos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
            && !post_processor_adds;

        // `chat_template` is a string, or a list of named templates of which "default" is used.
        let chat_template = match config.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_owned),
            _ => None,
        };

        let vocab_size = inner.get_vocab_size(true);
        let spelling = detect_spelling(&inner);
        let token_bytes = (0..vocab_size as u32)
            .map(|id| {
                let is_added = inner.get_added_tokens_decoder().contains_key(&id);
                inner
                    .id_to_token(id)
                    .map(|t| spelled_bytes(&t, spelling, is_added))
                    .unwrap_or_default()
            })
            .collect();

        Ok(Self::assemble(
            inner,
            vocab_size,
            bos_id,
            eos_id,
            add_bos,
            add_eos,
            post_processor_adds,
            token_bytes,
            chat_template,
        ))
    }

    /// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, TokenizerError> {
        Self::from_gguf_metadata(&file.metadata, file.path())
    }

    /// Builds the tokenizer from GGUF metadata already in memory; `source` only names it in
    /// errors.
    pub fn from_gguf_metadata(
        metadata: &HashMap<String, GgufValue>,
        source: &Path,
    ) -> Result<Self, TokenizerError> {
        let meta = Meta {
            map: metadata,
            path: source,
        };
        let model = meta.required_str("tokenizer.ggml.model")?;
        let tokens = meta.string_array("tokenizer.ggml.tokens")?;
        if tokens.is_empty() {
            return Err(meta.bad("tokenizer.ggml.tokens", "the vocabulary is empty".into()));
        }
        if u32::try_from(tokens.len()).is_err() {
            return Err(meta.bad("tokenizer.ggml.tokens", "more than 2^32 tokens".into()));
        }
        let token_types = meta.optional_u64_array("tokenizer.ggml.token_type", tokens.len())?;
        let bos_id = meta.token_id("tokenizer.ggml.bos_token_id", tokens.len())?;
        let eos_id = meta.token_id("tokenizer.ggml.eos_token_id", tokens.len())?;
        let unk_id = meta.token_id("tokenizer.ggml.unknown_token_id", tokens.len())?;
        let pad_id = meta.token_id("tokenizer.ggml.padding_token_id", tokens.len())?;
        let chat_template = meta
            .optional_str("tokenizer.chat_template")?
            .map(str::to_owned);
        let add_eos = meta
            .optional_bool("tokenizer.ggml.add_eos_token")?
            .unwrap_or(false);

        let (mut inner, spelling, add_bos, vocab_tokens) = match model {
            "gpt2" => {
                let pre = meta.optional_str("tokenizer.ggml.pre")?;
                let pre_tokenizer =
                    gpt2_pre_tokenizer(pre).ok_or_else(|| TokenizerError::UnsupportedPre {
                        path: source.to_owned(),
                        pre: pre.unwrap_or_default().to_owned(),
                    })?;
                let pre_tokenizer = pre_tokenizer.map_err(|message| TokenizerError::Build {
                    path: source.to_owned(),
                    message,
                })?;
                // A vocabulary entry outside the byte alphabet is respelled through its UTF-8
                // bytes, as transformers does, so the BPE model can still reach it.
                let alphabet = byte_level_alphabet_cached();
                let vocab_tokens: Vec<String> = tokens
                    .iter()
                    .map(|t| {
                        if t.chars().all(|c| alphabet.contains_key(&c)) {
                            t.clone()
                        } else {
                            byte_level_spell(t.as_bytes())
                        }
                    })
                    .collect();
                let merges = meta.merges(&vocab_tokens)?;
                let vocab: Vocab = vocab_tokens
                    .iter()
                    .enumerate()
                    .map(|(i, t)| (t.clone(), i as u32))
                    .collect();
                let bpe = BpeBuilder::new()
                    .vocab_and_merges(vocab, merges)
                    .build()
                    .map_err(|e| TokenizerError::Build {
                        path: source.to_owned(),
                        message: e.to_string(),
                    })?;
                let mut inner = tokenizers::Tokenizer::new(bpe);
                inner.with_pre_tokenizer(Some(pre_tokenizer));
                inner.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));
                // GPT-2-style vocabularies add no BOS unless the file asks.
                let add_bos = meta
                    .optional_bool("tokenizer.ggml.add_bos_token")?
                    .unwrap_or(false);
                (inner, Spelling::ByteLevel, add_bos, vocab_tokens)
            }
            "llama" => {
                let vocab_tokens = tokens.clone();
                let merges = if meta.map.contains_key("tokenizer.ggml.merges") {
                    meta.merges(&vocab_tokens)?
                } else {
                    let scores = meta
                        .optional_f64_array("tokenizer.ggml.scores", tokens.len())?
                        .ok_or_else(|| TokenizerError::MissingKey {
                            path: source.to_owned(),
                            key: "tokenizer.ggml.scores".into(),
                        })?;
                    merges_from_scores(&vocab_tokens, &scores)
                };
                let vocab: Vocab = vocab_tokens
                    .iter()
                    .enumerate()
                    .map(|(i, t)| (t.clone(), i as u32))
                    .collect();
                let mut builder = BpeBuilder::new()
                    .vocab_and_merges(vocab, merges)
                    .byte_fallback(true)
                    .fuse_unk(true);
                if let Some(unk) = unk_id {
                    builder = builder.unk_token(tokens[unk as usize].clone());
                }
                let bpe = builder.build().map_err(|e| TokenizerError::Build {
                    path: source.to_owned(),
                    message: e.to_string(),
                })?;
                let add_prefix_space = meta
                    .optional_bool("tokenizer.ggml.add_space_prefix")?
                    .unwrap_or(true);
                let mut inner = tokenizers::Tokenizer::new(bpe);
                let scheme = if add_prefix_space {
                    PrependScheme::First
                } else {
                    PrependScheme::Never
                };
                inner.with_pre_tokenizer(Some(Metaspace::new(SPIECE_UNDERLINE, scheme, false)));
                let replace = Replace::new(SPIECE_UNDERLINE.to_string(), " ").map_err(|e| {
                    TokenizerError::Build {
                        path: source.to_owned(),
                        message: e.to_string(),
                    }
                })?;
                let mut decoders: Vec<DecoderWrapper> = vec![
                    replace.into(),
                    ByteFallback::new().into(),
                    Fuse::new().into(),
                ];
                if add_prefix_space {
                    decoders.push(Strip::new(' ', 1, 0).into());
                }
                inner.with_decoder(Some(DecoderSequence::new(decoders)));
                // llama.cpp and transformers add BOS to a SentencePiece vocabulary that does
                // not say otherwise.
                let add_bos = meta
                    .optional_bool("tokenizer.ggml.add_bos_token")?
                    .unwrap_or(true);
                (inner, Spelling::SentencePiece, add_bos, vocab_tokens)
            }
            other => {
                return Err(TokenizerError::UnsupportedModel {
                    path: source.to_owned(),
                    model: other.to_owned(),
                })
            }
        };

        // Control tokens (and the named specials) become special added tokens so `<|im_start|>`
        // in text is one token and `skip_special` drops them; user-defined tokens are added as
        // plain added tokens so they too are matched whole. In a byte-level vocabulary a
        // "control" token spelled outside the byte alphabet is a llama.cpp mislabel, skipped
        // as transformers does.
        let alphabet = byte_level_alphabet_cached();
        let spelled_ok = |t: &str| {
            spelling != Spelling::ByteLevel || t.chars().all(|c| alphabet.contains_key(&c))
        };
        let named: Vec<u32> = [bos_id, eos_id, unk_id, pad_id]
            .into_iter()
            .flatten()
            .collect();
        let mut special = Vec::new();
        let mut user = Vec::new();
        for (id, token) in tokens.iter().enumerate() {
            let ty = token_types.as_ref().map(|t| t[id]);
            let is_named = named.contains(&(id as u32));
            // transformers registers the named specials (bos/eos/unk/pad) as special tokens
            // whatever their type.
            let is_control = ty == Some(TOKEN_TYPE_CONTROL) || is_named;
            if is_control && spelled_ok(token) {
                special.push(AddedToken::from(token.clone(), true).normalized(false));
            } else if ty == Some(TOKEN_TYPE_USER_DEFINED) && vocab_tokens[id] == *token {
                user.push(AddedToken::from(token.clone(), false).normalized(false));
            }
        }
        inner.add_special_tokens(&special);
        inner.add_tokens(&user);

        let added = inner.get_added_tokens_decoder();
        let token_bytes = vocab_tokens
            .iter()
            .enumerate()
            .map(|(id, t)| {
                let is_added = added.contains_key(&(id as u32));
                // Added tokens keep their file spelling (their content), not the respelling.
                let t = if is_added { &tokens[id] } else { t };
                spelled_bytes(t, spelling, is_added)
            })
            .collect();

        let vocab_size = tokens.len().max(inner.get_vocab_size(true));
        Ok(Self::assemble(
            inner,
            vocab_size,
            bos_id,
            eos_id,
            add_bos,
            add_eos,
            false,
            token_bytes,
            chat_template,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        inner: tokenizers::Tokenizer,
        vocab_size: usize,
        bos_id: Option<u32>,
        eos_id: Option<u32>,
        add_bos: bool,
        add_eos: bool,
        post_processor_adds: bool,
        token_bytes: Vec<Vec<u8>>,
        chat_template: Option<String>,
    ) -> Self {
        let mut eos_ids: Vec<u32> = eos_id.into_iter().collect();
        for name in END_OF_TURN_TOKENS {
            if let Some(id) = inner.token_to_id(name) {
                if !eos_ids.contains(&id) {
                    eos_ids.push(id);
                }
            }
        }
        Self {
            inner,
            vocab_size,
            bos_id,
            eos_id,
            eos_ids,
            add_bos: add_bos && bos_id.is_some(),
            add_eos: add_eos && eos_id.is_some(),
            post_processor_adds,
            token_bytes,
            chat_template,
        }
    }

    /// Token ids of `text`. Special tokens written in the text (`<|im_start|>`) are recognised
    /// as single tokens, as Hugging Face does. `add_special` adds BOS (and EOS) where the model
    /// asks for them.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode(text, add_special && self.post_processor_adds)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let ids = encoding.get_ids();
        let mut out = Vec::with_capacity(ids.len() + 2);
        if add_special && self.add_bos {
            out.extend(self.bos_id);
        }
        out.extend_from_slice(ids);
        if add_special && self.add_eos {
            out.extend(self.eos_id);
        }
        Ok(out)
    }

    /// Text of `ids`; `skip_special` drops special tokens.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        // `tokenizers` silently skips unknown ids; a caller passing one has a bug we want to see.
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(TokenizerError::IdOutOfRange {
                id,
                vocab_size: self.vocab_size,
            });
        }
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// A streaming decoder that emits text only once it is complete UTF-8.
    pub fn decoder(&self, skip_special: bool) -> IncrementalDecoder<'_> {
        IncrementalDecoder {
            tokenizer: self,
            stream: self.inner.decode_stream(skip_special),
            skip_special,
            context: None,
            pending: Vec::new(),
        }
    }

    /// Number of token ids the model knows.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The beginning-of-sequence id, if the model has one (whether or not it is added).
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// Whether `encode(.., true)` prepends BOS.
    pub fn adds_bos(&self) -> bool {
        self.add_bos || (self.post_processor_adds && self.bos_id.is_some())
    }

    /// Ids that end generation: the model's EOS plus the end-of-turn tokens it has.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The surface text of one token, for logprobs `token` fields: its bytes, with an
    /// incomplete UTF-8 sequence shown as U+FFFD.
    pub fn token_str(&self, id: u32) -> Option<String> {
        self.token_bytes(id)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    }

    /// The raw bytes one token stands for (OpenAI logprobs `bytes`).
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        self.token_bytes.get(id as usize).cloned()
    }

    /// The chat template the model file carries, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The BOS token's text.
    pub fn bos_token(&self) -> Option<String> {
        self.bos_id.and_then(|id| self.inner.id_to_token(id))
    }

    /// The EOS token's text.
    pub fn eos_token(&self) -> Option<String> {
        self.eos_id.and_then(|id| self.inner.id_to_token(id))
    }

    /// The underlying `tokenizers` tokenizer. For a GGUF it has no post-processor: BOS is
    /// added by [`Tokenizer::encode`].
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Streaming decode: feed ids one at a time, get text once it is whole UTF-8.
pub struct IncrementalDecoder<'a> {
    tokenizer: &'a Tokenizer,
    stream: tokenizers::DecodeStream<
        'a,
        tokenizers::ModelWrapper,
        tokenizers::NormalizerWrapper,
        tokenizers::PreTokenizerWrapper,
        tokenizers::PostProcessorWrapper,
        tokenizers::DecoderWrapper,
    >,
    skip_special: bool,
    /// The last id whose text was emitted, kept so `finish` decodes the tail in context.
    context: Option<u32>,
    /// Ids pushed since text was last emitted.
    pending: Vec<u32>,
}

impl IncrementalDecoder<'_> {
    /// Adds `id`; returns the new text if it completes any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>, TokenizerError> {
        if id as usize >= self.tokenizer.vocab_size {
            return Err(TokenizerError::IdOutOfRange {
                id,
                vocab_size: self.tokenizer.vocab_size,
            });
        }
        let out = self
            .stream
            .step(id)
            .map_err(|e| TokenizerError::Decode(e.to_string()))?;
        if out.is_some() {
            self.context = Some(id);
            self.pending.clear();
        } else {
            self.pending.push(id);
        }
        Ok(out)
    }

    /// Text held back because it was not yet whole UTF-8 (generation stopped mid-character):
    /// what is left, with the broken sequence shown as U+FFFD. `None` when nothing is held.
    pub fn finish(self) -> Result<Option<String>, TokenizerError> {
        if self.pending.is_empty() {
            return Ok(None);
        }
        let ctx: Vec<u32> = self.context.into_iter().collect();
        let all: Vec<u32> = ctx.iter().chain(&self.pending).copied().collect();
        let prefix = self.tokenizer.decode(&ctx, self.skip_special)?;
        let full = self.tokenizer.decode(&all, self.skip_special)?;
        let tail = full.strip_prefix(prefix.as_str()).unwrap_or(&full);
        Ok((!tail.is_empty()).then(|| tail.to_owned()))
    }
}

/// Typed access to GGUF metadata with errors that name the key.
struct Meta<'a> {
    map: &'a HashMap<String, GgufValue>,
    path: &'a Path,
}

impl Meta<'_> {
    fn missing(&self, key: &str) -> TokenizerError {
        TokenizerError::MissingKey {
            path: self.path.to_owned(),
            key: key.to_owned(),
        }
    }

    fn bad(&self, key: &str, problem: String) -> TokenizerError {
        TokenizerError::BadKey {
            path: self.path.to_owned(),
            key: key.to_owned(),
            problem,
        }
    }

    fn required_str(&self, key: &str) -> Result<&str, TokenizerError> {
        self.optional_str(key)?.ok_or_else(|| self.missing(key))
    }

    fn optional_str(&self, key: &str) -> Result<Option<&str>, TokenizerError> {
        match self.map.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.bad(key, format!("expected a string, found {}", kind(v)))),
        }
    }

    fn optional_bool(&self, key: &str) -> Result<Option<bool>, TokenizerError> {
        match self.map.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.bad(key, format!("expected a bool, found {}", kind(v)))),
        }
    }

    fn array(&self, key: &str) -> Result<Option<&[GgufValue]>, TokenizerError> {
        match self.map.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_array()
                .map(Some)
                .ok_or_else(|| self.bad(key, format!("expected an array, found {}", kind(v)))),
        }
    }

    fn string_array(&self, key: &str) -> Result<Vec<String>, TokenizerError> {
        let items = self.array(key)?.ok_or_else(|| self.missing(key))?;
        items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str().map(str::to_owned).ok_or_else(|| {
                    self.bad(key, format!("element {i} is {}, not a string", kind(v)))
                })
            })
            .collect()
    }

    fn check_len(&self, key: &str, len: usize, expected: usize) -> Result<(), TokenizerError> {
        if len != expected {
            return Err(self.bad(
                key,
                format!("has {len} entries but `tokenizer.ggml.tokens` has {expected}"),
            ));
        }
        Ok(())
    }

    fn optional_u64_array(
        &self,
        key: &str,
        expected: usize,
    ) -> Result<Option<Vec<u64>>, TokenizerError> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        self.check_len(key, items.len(), expected)?;
        items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_u64().ok_or_else(|| {
                    self.bad(key, format!("element {i} is {}, not an integer", kind(v)))
                })
            })
            .collect::<Result<_, _>>()
            .map(Some)
    }

    fn optional_f64_array(
        &self,
        key: &str,
        expected: usize,
    ) -> Result<Option<Vec<f64>>, TokenizerError> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        self.check_len(key, items.len(), expected)?;
        items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_f64().ok_or_else(|| {
                    self.bad(key, format!("element {i} is {}, not a number", kind(v)))
                })
            })
            .collect::<Result<_, _>>()
            .map(Some)
    }

    fn token_id(&self, key: &str, vocab: usize) -> Result<Option<u32>, TokenizerError> {
        let Some(v) = self.map.get(key) else {
            return Ok(None);
        };
        let id = v
            .as_u64()
            .ok_or_else(|| self.bad(key, format!("expected a token id, found {}", kind(v))))?;
        if id >= vocab as u64 {
            return Err(self.bad(
                key,
                format!("id {id} is out of range (the vocabulary has {vocab} tokens)"),
            ));
        }
        Ok(Some(id as u32))
    }

    /// `tokenizer.ggml.merges` ("a b" strings), checked against the vocabulary so a bad merge
    /// is reported by index rather than as an opaque build failure.
    fn merges(&self, vocab_tokens: &[String]) -> Result<Vec<(String, String)>, TokenizerError> {
        const KEY: &str = "tokenizer.ggml.merges";
        let merges = self.string_array(KEY)?;
        let known: std::collections::HashSet<&str> =
            vocab_tokens.iter().map(String::as_str).collect();
        merges
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                let (a, b) = m
                    .split_once(' ')
                    .filter(|(_, b)| !b.contains(' '))
                    .ok_or_else(|| {
                        self.bad(KEY, format!("merge {i} `{m}` is not two tokens separated by one space"))
                    })?;
                for part in [a, b, &format!("{a}{b}")] {
                    if !known.contains(part) {
                        return Err(self.bad(
                            KEY,
                            format!("merge {i} `{m}` refers to `{part}`, which is not in the vocabulary"),
                        ));
                    }
                }
                Ok((a.to_owned(), b.to_owned()))
            })
            .collect()
    }
}

/// A short name for a value's type, for error messages.
fn kind(v: &GgufValue) -> &'static str {
    match v {
        GgufValue::String(_) => "a string",
        GgufValue::Array(_) => "an array",
        GgufValue::Bool(_) => "a bool",
        GgufValue::F32(_) | GgufValue::F64(_) => "a float",
        _ => "an integer",
    }
}

/// The pre-tokenizer for a `gpt2` vocabulary's `tokenizer.ggml.pre`; `None` if unknown.
/// An absent `pre` is the GPT-2 default, as in llama.cpp and transformers.
fn gpt2_pre_tokenizer(pre: Option<&str>) -> Option<Result<PreTokenizerWrapper, String>> {
    let split = |regex: &str| -> Result<PreTokenizerWrapper, String> {
        let split = Split::new(
            SplitPattern::Regex(regex.to_owned()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| e.to_string())?;
        Ok(PreSequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, false).into(),
        ])
        .into())
    };
    Some(match pre.unwrap_or("default") {
        "default" | "gpt-2" | "gpt2" => Ok(ByteLevel::new(false, true, true).into()),
        // SmolLM2's tokenizer.json; llama.cpp's SMOLLM/STARCODER/REFACT: single digits, then
        // the GPT-2 regex.
        "smollm" | "starcoder" | "refact" => Ok(PreSequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])
        .into()),
        "llama-bpe" | "llama3" | "llama-v3" | "smaug-bpe" | "dbrx" | "falcon3" => {
            split(LLAMA3_SPLIT)
        }
        "qwen2" | "deepseek-r1-qwen" => split(QWEN2_SPLIT),
        _ => return None,
    })
}

/// GPT-2's `bytes_to_unicode`: every byte as one printable char.
fn byte_level_chars() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        out[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(256 + extra).unwrap_or('\0');
            extra += 1;
            c
        };
    }
    out
}

/// The inverse of [`byte_level_chars`].
fn byte_level_alphabet() -> HashMap<char, u8> {
    byte_level_chars()
        .iter()
        .enumerate()
        .map(|(b, &c)| (c, b as u8))
        .collect()
}

fn byte_level_spell(bytes: &[u8]) -> String {
    let chars = byte_level_chars();
    bytes.iter().map(|&b| chars[b as usize]).collect()
}

/// The bytes a vocabulary entry stands for. Added tokens are literal text.
fn spelled_bytes(token: &str, spelling: Spelling, is_added: bool) -> Vec<u8> {
    if is_added {
        return token.as_bytes().to_vec();
    }
    match spelling {
        Spelling::ByteLevel => {
            let alphabet = byte_level_alphabet_cached();
            let mut out = Vec::with_capacity(token.len());
            for c in token.chars() {
                match alphabet.get(&c) {
                    Some(&b) => out.push(b),
                    // Not byte-level spelled: take it literally.
                    None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                }
            }
            out
        }
        Spelling::SentencePiece => {
            if let Some(byte) = sentencepiece_byte(token) {
                return vec![byte];
            }
            token.replace(SPIECE_UNDERLINE, " ").into_bytes()
        }
    }
}

fn byte_level_alphabet_cached() -> &'static HashMap<char, u8> {
    static ALPHABET: std::sync::OnceLock<HashMap<char, u8>> = std::sync::OnceLock::new();
    ALPHABET.get_or_init(byte_level_alphabet)
}

/// `<0xAB>` → 0xAB.
fn sentencepiece_byte(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// Whether a `tokenizer.json` spells tokens byte-level (its decoder says so) or SentencePiece.
fn detect_spelling(tokenizer: &tokenizers::Tokenizer) -> Spelling {
    let decoder = tokenizer
        .get_decoder()
        .and_then(|d| serde_json::to_string(d).ok())
        .unwrap_or_default();
    if decoder.contains("\"ByteLevel\"") {
        Spelling::ByteLevel
    } else {
        Spelling::SentencePiece
    }
}

/// Merges implied by a SentencePiece vocabulary and its scores, as transformers'
/// `generate_merges` derives them: every split of a token into two known pieces, best score
/// first, ties broken by longer left then longer right piece, then vocabulary order.
fn merges_from_scores(tokens: &[String], scores: &[f64]) -> Vec<(String, String)> {
    // Later duplicates win, as in a Python dict built from the list.
    let mut vocab: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t, i);
    }
    let mut score_of: HashMap<&str, f64> = HashMap::with_capacity(tokens.len());
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    for (t, &s) in tokens.iter().zip(scores) {
        if score_of.insert(t, s).is_none() {
            order.push(t);
        }
    }
    struct Candidate<'a> {
        left: &'a str,
        right: &'a str,
        score: f64,
        left_chars: usize,
        right_chars: usize,
    }
    let mut merges: Vec<Candidate<'_>> = Vec::new();
    for token in order {
        let score = score_of[token];
        let mut local: Vec<Candidate<'_>> = token
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| {
                let (left, right) = token.split_at(at);
                (vocab.contains_key(left) && vocab.contains_key(right)).then(|| Candidate {
                    left,
                    right,
                    score,
                    left_chars: left.chars().count(),
                    right_chars: right.chars().count(),
                })
            })
            .collect();
        local.sort_by_key(|c| (vocab[c.left], vocab[c.right]));
        merges.extend(local);
    }
    // Python's `sorted(.., reverse=True)` is stable: equal keys keep their order.
    merges.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(b.left_chars.cmp(&a.left_chars))
            .then(b.right_chars.cmp(&a.right_chars))
    });
    merges
        .into_iter()
        .map(|c| (c.left.to_owned(), c.right.to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> GgufValue {
        GgufValue::Array(
            items
                .iter()
                .map(|s| GgufValue::String((*s).into()))
                .collect(),
        )
    }

    fn path() -> &'static Path {
        Path::new("test.gguf")
    }

    /// A tiny SentencePiece-style (llama) vocabulary: specials, the 256 byte tokens, and
    /// pieces that spell "hello world".
    fn sentencepiece_meta() -> HashMap<String, GgufValue> {
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![2i32, 3, 3];
        let mut scores = vec![0f32, 0.0, 0.0];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(6);
            scores.push(0.0);
        }
        let pieces = [
            ("▁", -50.0),
            ("h", -60.0),
            ("e", -61.0),
            ("l", -62.0),
            ("o", -63.0),
            ("w", -64.0),
            ("r", -65.0),
            ("d", -66.0),
            ("▁h", -1.0),
            ("ll", -2.0),
            ("▁he", -3.0),
            ("llo", -4.0),
            ("▁hello", -5.0),
            ("or", -6.0),
            ("▁w", -7.0),
            ("▁wor", -8.0),
            ("ld", -9.0),
            ("▁world", -10.0),
        ];
        for (p, s) in pieces {
            tokens.push(p.into());
            types.push(1);
            scores.push(s);
        }
        let mut m = HashMap::new();
        m.insert(
            "tokenizer.ggml.model".into(),
            GgufValue::String("llama".into()),
        );
        m.insert(
            "tokenizer.ggml.tokens".into(),
            GgufValue::Array(tokens.into_iter().map(GgufValue::String).collect()),
        );
        m.insert(
            "tokenizer.ggml.token_type".into(),
            GgufValue::Array(types.into_iter().map(GgufValue::I32).collect()),
        );
        m.insert(
            "tokenizer.ggml.scores".into(),
            GgufValue::Array(scores.into_iter().map(GgufValue::F32).collect()),
        );
        m.insert("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(1));
        m.insert("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(2));
        m.insert("tokenizer.ggml.unknown_token_id".into(), GgufValue::U32(0));
        m
    }

    /// A tiny byte-level (gpt2) vocabulary.
    fn gpt2_meta() -> HashMap<String, GgufValue> {
        let mut m = HashMap::new();
        m.insert(
            "tokenizer.ggml.model".into(),
            GgufValue::String("gpt2".into()),
        );
        m.insert(
            "tokenizer.ggml.pre".into(),
            GgufValue::String("smollm".into()),
        );
        m.insert(
            "tokenizer.ggml.tokens".into(),
            strings(&["<|im_end|>", "a", "b", "ab", "Ġ", "Ġab", "1", "2"]),
        );
        m.insert(
            "tokenizer.ggml.token_type".into(),
            GgufValue::Array([3, 1, 1, 1, 1, 1, 1, 1].map(GgufValue::I32).to_vec()),
        );
        m.insert("tokenizer.ggml.merges".into(), strings(&["a b", "Ġ ab"]));
        m.insert("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(0));
        m
    }

    fn build(m: &HashMap<String, GgufValue>) -> Result<Tokenizer, TokenizerError> {
        Tokenizer::from_gguf_metadata(m, path())
    }

    #[test]
    fn sentencepiece_round_trips() {
        let tok = build(&sentencepiece_meta()).unwrap();
        let id = |t: &str| tok.inner().token_to_id(t).unwrap();
        assert_eq!(
            tok.encode("hello world", false).unwrap(),
            vec![id("▁hello"), id("▁world")]
        );
        // BOS by default for SentencePiece vocabularies.
        assert_eq!(
            tok.encode("hello", true).unwrap(),
            vec![1, id("▁hello")],
            "llama vocabularies add BOS unless told not to"
        );
        // Characters outside the vocabulary fall back to bytes and come back whole.
        for text in [
            "hello world",
            "hello wörld!",
            "héllo  world",
            "你好 hello",
            "<s> hello",
        ] {
            let ids = tok.encode(text, false).unwrap();
            assert_eq!(tok.decode(&ids, false).unwrap(), text, "{ids:?}");
        }
        let ids = tok.encode("é", false).unwrap();
        assert_eq!(ids, vec![id("▁"), id("<0xC3>"), id("<0xA9>")]);
        assert_eq!(tok.token_bytes(id("<0xC3>")).unwrap(), vec![0xC3]);
        assert_eq!(tok.token_str(id("▁hello")).unwrap(), " hello");
        // Special tokens in text are single tokens and can be skipped on decode.
        // Only the start of the text gets the `▁` prefix (prepend scheme "first", as
        // transformers' LlamaTokenizer), not text after a special token.
        let ids = tok.encode("<s>hello</s>", false).unwrap();
        assert_eq!(ids, vec![1, id("h"), id("e"), id("llo"), 2]);
        assert_eq!(tok.decode(&ids, true).unwrap(), "hello");
        assert_eq!(tok.bos_token().as_deref(), Some("<s>"));
        assert_eq!(tok.eos_ids(), &[2]);
    }

    #[test]
    fn sentencepiece_without_prefix_space() {
        let mut m = sentencepiece_meta();
        m.insert(
            "tokenizer.ggml.add_space_prefix".into(),
            GgufValue::Bool(false),
        );
        m.insert(
            "tokenizer.ggml.add_bos_token".into(),
            GgufValue::Bool(false),
        );
        let tok = build(&m).unwrap();
        let ids = tok.encode("hello world", true).unwrap();
        assert_eq!(tok.inner().id_to_token(ids[0]).as_deref(), Some("h"));
        assert_eq!(tok.decode(&ids, false).unwrap(), "hello world");
    }

    #[test]
    fn merges_from_scores_follow_score_order() {
        let tokens: Vec<String> = ["a", "b", "c", "ab", "bc", "abc"]
            .map(String::from)
            .to_vec();
        let scores = [0.0, 0.0, 0.0, -2.0, -1.0, -3.0];
        let merges = merges_from_scores(&tokens, &scores);
        let expect: Vec<(String, String)> = [("b", "c"), ("a", "b"), ("ab", "c"), ("a", "bc")]
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
            .to_vec();
        assert_eq!(merges, expect);
    }

    #[test]
    fn byte_level_vocab_encodes_and_decodes() {
        let tok = build(&gpt2_meta()).unwrap();
        assert_eq!(tok.encode("ab ab", false).unwrap(), vec![3, 5]);
        // Digits are split one by one for smollm.
        assert_eq!(tok.encode("12", false).unwrap(), vec![6, 7]);
        assert_eq!(tok.encode("ab<|im_end|>", true).unwrap(), vec![3, 0]);
        assert_eq!(tok.decode(&[3, 5, 0], false).unwrap(), "ab ab<|im_end|>");
        assert_eq!(tok.decode(&[3, 5, 0], true).unwrap(), "ab ab");
        assert_eq!(tok.token_bytes(5).unwrap(), b" ab".to_vec());
        assert_eq!(tok.token_str(0).unwrap(), "<|im_end|>");
        assert_eq!(tok.eos_ids(), &[0]);
        assert_eq!(tok.bos_id(), None);
        assert!(tok.token_bytes(8).is_none());
        assert!(matches!(
            tok.decode(&[8], false),
            Err(TokenizerError::IdOutOfRange {
                id: 8,
                vocab_size: 8
            })
        ));
    }

    #[test]
    fn incremental_decoder_emits_whole_characters() {
        let tok = build(&sentencepiece_meta()).unwrap();
        let ids = tok.encode("hello é world", false).unwrap();
        let mut dec = tok.decoder(false);
        let mut out = String::new();
        for &id in &ids {
            if let Some(text) = dec.push(id).unwrap() {
                assert!(!text.contains('\u{FFFD}'), "{text:?}");
                out.push_str(&text);
            }
        }
        assert!(dec.finish().unwrap().is_none());
        assert_eq!(out, "hello é world");

        // Stopping in the middle of a character: held back, then flushed lossily.
        let id = |t: &str| tok.inner().token_to_id(t).unwrap();
        let mut dec = tok.decoder(false);
        assert_eq!(dec.push(id("▁hello")).unwrap().as_deref(), Some("hello"));
        assert_eq!(dec.push(id("<0xC3>")).unwrap(), None);
        assert_eq!(dec.finish().unwrap().as_deref(), Some("\u{FFFD}"));
        let mut dec = tok.decoder(false);
        assert!(matches!(
            dec.push(100_000),
            Err(TokenizerError::IdOutOfRange { .. })
        ));
    }

    fn expect_bad_key(m: &HashMap<String, GgufValue>, key: &str) -> String {
        match build(m) {
            Err(e @ TokenizerError::BadKey { .. }) | Err(e @ TokenizerError::MissingKey { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(key), "{msg} should name {key}");
                assert!(msg.contains("test.gguf"), "{msg} should name the file");
                msg
            }
            other => panic!("expected an error about {key}, got {other:?}"),
        }
    }

    #[test]
    fn missing_keys_are_named() {
        for key in [
            "tokenizer.ggml.model",
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.merges",
        ] {
            let mut m = gpt2_meta();
            m.remove(key);
            expect_bad_key(&m, key);
        }
        let mut m = sentencepiece_meta();
        m.remove("tokenizer.ggml.scores");
        expect_bad_key(&m, "tokenizer.ggml.scores");
    }

    #[test]
    fn unknown_model_and_pre_are_rejected() {
        let mut m = gpt2_meta();
        m.insert(
            "tokenizer.ggml.model".into(),
            GgufValue::String("wordpiece".into()),
        );
        assert!(
            matches!(build(&m), Err(TokenizerError::UnsupportedModel { model, .. }) if model == "wordpiece")
        );
        let mut m = gpt2_meta();
        m.insert(
            "tokenizer.ggml.pre".into(),
            GgufValue::String("klingon".into()),
        );
        let err = build(&m).unwrap_err();
        assert!(matches!(&err, TokenizerError::UnsupportedPre { pre, .. } if pre == "klingon"));
        assert!(err.to_string().contains("tokenizer.ggml.pre"));
        // No `pre` at all is the GPT-2 default.
        let mut m = gpt2_meta();
        m.remove("tokenizer.ggml.pre");
        assert_eq!(
            build(&m).unwrap().encode("ab ab", false).unwrap(),
            vec![3, 5]
        );
    }

    #[test]
    fn every_supported_pre_tokenizer_builds() {
        for pre in SUPPORTED_PRE.split(", ") {
            let mut m = gpt2_meta();
            m.insert("tokenizer.ggml.pre".into(), GgufValue::String(pre.into()));
            let tok = build(&m).unwrap_or_else(|e| panic!("{pre}: {e}"));
            assert_eq!(tok.encode("ab ab", false).unwrap(), vec![3, 5], "{pre}");
        }
    }

    #[test]
    fn length_mismatches_are_rejected() {
        let mut m = gpt2_meta();
        m.insert(
            "tokenizer.ggml.token_type".into(),
            GgufValue::Array(vec![GgufValue::I32(1); 3]),
        );
        let msg = expect_bad_key(&m, "tokenizer.ggml.token_type");
        assert!(msg.contains("3 entries"), "{msg}");
        let mut m = sentencepiece_meta();
        m.insert(
            "tokenizer.ggml.scores".into(),
            GgufValue::Array(vec![GgufValue::F32(0.0); 5]),
        );
        expect_bad_key(&m, "tokenizer.ggml.scores");
    }

    #[test]
    fn bad_merges_are_rejected() {
        for (merge, missing) in [
            ("a c", "`c`"),
            ("b b", "`bb`"),
            ("ab", "one space"),
            ("a b c", "one space"),
        ] {
            let mut m = gpt2_meta();
            m.insert("tokenizer.ggml.merges".into(), strings(&["a b", merge]));
            let msg = expect_bad_key(&m, "tokenizer.ggml.merges");
            assert!(msg.contains(missing) && msg.contains("merge 1"), "{msg}");
        }
    }

    #[test]
    fn special_ids_out_of_range_are_rejected() {
        for key in [
            "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.unknown_token_id",
            "tokenizer.ggml.padding_token_id",
        ] {
            let mut m = gpt2_meta();
            m.insert(key.into(), GgufValue::U32(8));
            let msg = expect_bad_key(&m, key);
            assert!(msg.contains("out of range"), "{msg}");
            m.insert(key.into(), GgufValue::I32(-1));
            expect_bad_key(&m, key);
        }
    }

    #[test]
    fn wrong_value_types_are_rejected() {
        let mut m = gpt2_meta();
        m.insert(
            "tokenizer.ggml.tokens".into(),
            GgufValue::Array(vec![GgufValue::U32(1)]),
        );
        let msg = expect_bad_key(&m, "tokenizer.ggml.tokens");
        assert!(msg.contains("element 0"), "{msg}");
        let mut m = gpt2_meta();
        m.insert("tokenizer.ggml.model".into(), GgufValue::U32(2));
        expect_bad_key(&m, "tokenizer.ggml.model");
        let mut m = gpt2_meta();
        m.insert("tokenizer.ggml.tokens".into(), GgufValue::Array(vec![]));
        expect_bad_key(&m, "tokenizer.ggml.tokens");
    }

    #[test]
    fn from_file_reads_tokenizer_json_and_config() {
        let dir = tempfile::tempdir().unwrap();
        let tok = build(&gpt2_meta()).unwrap();
        let json = tok.inner().to_string(false).unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, json).unwrap();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"bos_token": {"content": "a"}, "eos_token": "<|im_end|>", "add_bos_token": true,
                "chat_template": [{"name": "default", "template": "T"}, {"name": "tool_use", "template": "U"}]}"#,
        )
        .unwrap();
        let tok = Tokenizer::from_file(&path).unwrap();
        assert_eq!(tok.bos_id(), Some(1));
        assert_eq!(tok.eos_ids(), &[0]);
        assert_eq!(tok.encode("ab ab", true).unwrap(), vec![1, 3, 5]);
        assert_eq!(tok.chat_template(), Some("T"));
        assert_eq!(tok.token_bytes(5).unwrap(), b" ab".to_vec());

        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"bos_token": "zzz"}"#,
        )
        .unwrap();
        let err = Tokenizer::from_file(&path).unwrap_err();
        assert!(err.to_string().contains("tokenizer_config.json"), "{err}");
        std::fs::write(&path, "{ not json").unwrap();
        assert!(matches!(
            Tokenizer::from_file(&path),
            Err(TokenizerError::Invalid { .. })
        ));
        let missing = dir.path().join("nope.json");
        assert!(matches!(
            Tokenizer::from_file(&missing),
            Err(TokenizerError::Io { .. })
        ));
    }
}
