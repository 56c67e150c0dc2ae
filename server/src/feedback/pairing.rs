//! Turns the rated outputs of one tenant and adapter into training examples. Pure functions:
//! the store loads rows, this module decides, so the rules are testable without a database.
//!
//! # The rules
//!
//! 1. **Same prompt.** Two outputs answer the same prompt when their prompts are equal after
//!    normalising whitespace: chat prompts compare message by message (role, and content with
//!    every run of whitespace collapsed to one space and the ends trimmed), so the system
//!    prompt is part of the comparison; text prompts compare as normalised text; token-id
//!    prompts compare exactly. Chat and text prompts never match each other.
//! 2. **Corrections.** A feedback whose correction differs (after normalising) from the rated
//!    output yields a pair (chosen = correction, rejected = the output) and a demonstration of
//!    the correction, whatever the rating. The corrected output itself is then neither a
//!    demonstration nor a partner in rule 4. A correction equal to the output is ignored.
//! 3. **Thumbs-up.** Every uncorrected thumbs-up output is a demonstration.
//! 4. **Up against down.** Within one prompt, the uncorrected thumbs-down outputs, in the order
//!    their feedback was first submitted, are paired with the uncorrected thumbs-up outputs of
//!    that prompt, also in submission order and reused cyclically: the i-th down gets up
//!    `i mod |ups|`, or the next one after it whose text differs (a pair of identical texts
//!    teaches nothing). So every down has a partner as soon as one usable up exists.
//! 5. **Unpaired negatives.** A thumbs-down output left without a partner by rule 4.
//!
//! Groups are emitted in the order of their first feedback, and examples within a group in
//! submission order, so the same data always gives the same list. Each example has a
//! content-derived [`ExampleKey`] (kind, normalised prompt, texts), stable across calls and
//! changed when any of its text changes; identical examples are emitted once. The store
//! attaches to each example the adapter versions that already trained on its key.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::Rating;

/// Hex digits of the SHA-256 kept in an example key.
const KEY_HEX_DIGITS: usize = 32;

/// One chat message as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The text.
    pub content: String,
}

/// A recorded prompt: chat messages, text, or token ids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// `/v1/chat/completions` messages.
    Chat(Vec<Message>),
    /// `/v1/completions` text.
    Text(String),
    /// `/v1/completions` token ids.
    Tokens(Vec<u32>),
}

impl Prompt {
    /// Reads a recorded `request` value; `None` when it has none of the three shapes.
    pub fn from_json(v: &serde_json::Value) -> Option<Prompt> {
        serde_json::from_value(v.clone()).ok()
    }

    /// The prompt that choice `prompt_index` of a recorded `request` answers: a completions
    /// request with several prompts records their list (texts, or token-id lists), and the
    /// index picks one; any other request is one prompt, index 0.
    pub fn of_choice(request: &serde_json::Value, prompt_index: usize) -> Option<Prompt> {
        use serde_json::Value;
        let list = request.as_array().filter(|items| {
            !items.is_empty()
                && (items.iter().all(Value::is_string) || items.iter().all(Value::is_array))
        });
        match list {
            Some(prompts) => Prompt::from_json(prompts.get(prompt_index)?),
            None if prompt_index == 0 => Prompt::from_json(request),
            None => None,
        }
    }

    /// The canonical form two prompts must share to be "the same prompt" (rule 1).
    pub fn normalised(&self) -> String {
        match self {
            Prompt::Chat(messages) => {
                let mut s = String::from("chat");
                for m in messages {
                    s.push('\u{1e}');
                    s.push_str(&m.role);
                    s.push('\u{1f}');
                    s.push_str(&normalise_text(&m.content));
                }
                s
            }
            Prompt::Text(t) => format!("text\u{1e}{}", normalise_text(t)),
            Prompt::Tokens(ids) => {
                let ids: Vec<String> = ids.iter().map(u32::to_string).collect();
                format!("tokens\u{1e}{}", ids.join(","))
            }
        }
    }

    /// A short stable hash of [`Prompt::normalised`], for grouping in storage.
    pub fn key(&self) -> String {
        short_hash(&[self.normalised().as_str()])
    }
}

/// Collapses every run of whitespace to one space and trims the ends.
pub fn normalise_text(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn short_hash(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    let digest = h.finalize();
    let mut hex = String::with_capacity(KEY_HEX_DIGITS);
    for b in digest.iter().take(KEY_HEX_DIGITS / 2) {
        hex.push_str(&format!("{b:02x}"));
    }
    hex
}

/// A stable id of one training example (`pair-…`, `demo-…`, `neg-…`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ExampleKey(pub String);

/// One rated output, as the store loads it.
#[derive(Debug, Clone, PartialEq)]
pub struct RatedOutput {
    /// `fb-…`.
    pub feedback_id: String,
    /// The completion it rates.
    pub completion_id: String,
    /// The choice it rates.
    pub choice_index: u32,
    /// `base` or `<adapter>@<N>` that produced the output.
    pub adapter_version: String,
    /// The prompt.
    pub prompt: Prompt,
    /// The rated output text.
    pub output: String,
    /// The rating.
    pub rating: Rating,
    /// The user's better answer.
    pub correction: Option<String>,
    /// Submission order (first submission of this feedback).
    pub seq: i64,
}

/// Where a pair came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PairSource {
    /// An up and a down on the same prompt.
    Ratings {
        /// The thumbs-up feedback.
        chosen_feedback: String,
        /// The thumbs-down feedback.
        rejected_feedback: String,
    },
    /// A correction of the rejected output.
    Correction {
        /// The feedback carrying the correction.
        feedback: String,
    },
}

/// `(prompt, chosen, rejected)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreferencePair {
    /// Stable id.
    pub key: ExampleKey,
    /// The prompt (of the rejected output).
    pub prompt: Prompt,
    /// The preferred answer.
    pub chosen: String,
    /// The worse answer.
    pub rejected: String,
    /// The adapter version that produced the rejected output.
    pub rejected_version: String,
    /// Where it came from.
    pub source: PairSource,
    /// Adapter versions that already trained on it.
    pub trained_in: Vec<u32>,
}

/// `(prompt, completion)` to imitate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Demonstration {
    /// Stable id.
    pub key: ExampleKey,
    /// The prompt.
    pub prompt: Prompt,
    /// The answer to imitate.
    pub completion: String,
    /// The feedback it came from.
    pub feedback: String,
    /// True for a correction, false for a thumbs-up output.
    pub from_correction: bool,
    /// Adapter versions that already trained on it.
    pub trained_in: Vec<u32>,
}

/// A thumbs-down output with no better answer to pair it with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnpairedNegative {
    /// Stable id.
    pub key: ExampleKey,
    /// The prompt.
    pub prompt: Prompt,
    /// The bad answer.
    pub completion: String,
    /// The adapter version that produced it.
    pub version: String,
    /// The feedback it came from.
    pub feedback: String,
    /// Adapter versions that already trained on it.
    pub trained_in: Vec<u32>,
}

/// Everything the trainer gets for one tenant and adapter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainingExamples {
    /// Preference pairs (DPO).
    pub pairs: Vec<PreferencePair>,
    /// Demonstrations (SFT).
    pub demonstrations: Vec<Demonstration>,
    /// Unpaired negatives (KTO).
    pub unpaired_negatives: Vec<UnpairedNegative>,
}

impl TrainingExamples {
    /// Every example key, pairs first.
    pub fn keys(&self) -> Vec<ExampleKey> {
        self.pairs
            .iter()
            .map(|p| p.key.clone())
            .chain(self.demonstrations.iter().map(|d| d.key.clone()))
            .chain(self.unpaired_negatives.iter().map(|n| n.key.clone()))
            .collect()
    }

    /// Examples whose `trained_in` is empty.
    pub fn untrained(&self) -> u64 {
        let p = self
            .pairs
            .iter()
            .filter(|p| p.trained_in.is_empty())
            .count();
        let d = self
            .demonstrations
            .iter()
            .filter(|d| d.trained_in.is_empty())
            .count();
        let n = self
            .unpaired_negatives
            .iter()
            .filter(|n| n.trained_in.is_empty())
            .count();
        (p + d + n) as u64
    }

    /// Fills every example's `trained_in` from a key → versions map.
    pub fn attach_trained(&mut self, trained: &HashMap<ExampleKey, Vec<u32>>) {
        let get = |k: &ExampleKey| trained.get(k).cloned().unwrap_or_default();
        for p in &mut self.pairs {
            p.trained_in = get(&p.key);
        }
        for d in &mut self.demonstrations {
            d.trained_in = get(&d.key);
        }
        for n in &mut self.unpaired_negatives {
            n.trained_in = get(&n.key);
        }
    }
}

fn key(kind: &str, prompt: &Prompt, texts: &[&str]) -> ExampleKey {
    let norm = prompt.normalised();
    let mut parts = vec![kind, norm.as_str()];
    parts.extend_from_slice(texts);
    ExampleKey(format!("{kind}-{}", short_hash(&parts)))
}

/// The correction of `o` if rule 2 applies to it.
fn usable_correction(o: &RatedOutput) -> Option<&str> {
    o.correction
        .as_deref()
        .filter(|c| !normalise_text(c).is_empty() && normalise_text(c) != normalise_text(&o.output))
}

/// Applies the module's rules to `outputs` (any order; they are sorted by `seq`).
pub fn build(outputs: &[RatedOutput]) -> TrainingExamples {
    let mut sorted: Vec<&RatedOutput> = outputs.iter().collect();
    sorted.sort_by(|a, b| a.seq.cmp(&b.seq).then(a.feedback_id.cmp(&b.feedback_id)));
    // Groups in order of their first feedback: BTreeMap keyed by that first position.
    let mut group_of: HashMap<String, usize> = HashMap::new();
    let mut groups: BTreeMap<usize, Vec<&RatedOutput>> = BTreeMap::new();
    for (pos, o) in sorted.iter().enumerate() {
        let first = *group_of.entry(o.prompt.normalised()).or_insert(pos);
        groups.entry(first).or_default().push(o);
    }
    let mut out = TrainingExamples::default();
    let mut seen: HashSet<ExampleKey> = HashSet::new();
    for group in groups.values() {
        let mut ups = Vec::new();
        let mut downs = Vec::new();
        for o in group {
            if let Some(c) = usable_correction(o) {
                let k = key("pair", &o.prompt, &[c, &o.output]);
                if seen.insert(k.clone()) {
                    out.pairs.push(PreferencePair {
                        key: k,
                        prompt: o.prompt.clone(),
                        chosen: c.to_string(),
                        rejected: o.output.clone(),
                        rejected_version: o.adapter_version.clone(),
                        source: PairSource::Correction {
                            feedback: o.feedback_id.clone(),
                        },
                        trained_in: Vec::new(),
                    });
                }
                let k = key("demo", &o.prompt, &[c]);
                if seen.insert(k.clone()) {
                    out.demonstrations.push(Demonstration {
                        key: k,
                        prompt: o.prompt.clone(),
                        completion: c.to_string(),
                        feedback: o.feedback_id.clone(),
                        from_correction: true,
                        trained_in: Vec::new(),
                    });
                }
                continue;
            }
            match o.rating {
                Rating::Up => {
                    ups.push(*o);
                    let k = key("demo", &o.prompt, &[&o.output]);
                    if seen.insert(k.clone()) {
                        out.demonstrations.push(Demonstration {
                            key: k,
                            prompt: o.prompt.clone(),
                            completion: o.output.clone(),
                            feedback: o.feedback_id.clone(),
                            from_correction: false,
                            trained_in: Vec::new(),
                        });
                    }
                }
                Rating::Down => downs.push(*o),
            }
        }
        for (i, d) in downs.iter().enumerate() {
            let partner = (0..ups.len())
                .map(|k| ups[(i + k) % ups.len()])
                .find(|u| normalise_text(&u.output) != normalise_text(&d.output));
            match partner {
                Some(u) => {
                    let k = key("pair", &d.prompt, &[&u.output, &d.output]);
                    if seen.insert(k.clone()) {
                        out.pairs.push(PreferencePair {
                            key: k,
                            prompt: d.prompt.clone(),
                            chosen: u.output.clone(),
                            rejected: d.output.clone(),
                            rejected_version: d.adapter_version.clone(),
                            source: PairSource::Ratings {
                                chosen_feedback: u.feedback_id.clone(),
                                rejected_feedback: d.feedback_id.clone(),
                            },
                            trained_in: Vec::new(),
                        });
                    }
                }
                None => {
                    let k = key("neg", &d.prompt, &[&d.output]);
                    if seen.insert(k.clone()) {
                        out.unpaired_negatives.push(UnpairedNegative {
                            key: k,
                            prompt: d.prompt.clone(),
                            completion: d.output.clone(),
                            version: d.adapter_version.clone(),
                            feedback: d.feedback_id.clone(),
                            trained_in: Vec::new(),
                        });
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(system: Option<&str>, user: &str) -> Prompt {
        let mut m = Vec::new();
        if let Some(s) = system {
            m.push(Message {
                role: "system".into(),
                content: s.into(),
            });
        }
        m.push(Message {
            role: "user".into(),
            content: user.into(),
        });
        Prompt::Chat(m)
    }

    #[test]
    fn a_choice_reads_its_own_prompt_from_a_list_of_prompts() {
        use serde_json::json;
        let texts = json!(["2+2=", "3+3="]);
        assert_eq!(
            Prompt::of_choice(&texts, 1),
            Some(Prompt::Text("3+3=".into()))
        );
        assert_eq!(Prompt::of_choice(&texts, 2), None);
        let ids = json!([[1, 2], [3]]);
        assert_eq!(Prompt::of_choice(&ids, 1), Some(Prompt::Tokens(vec![3])));
        // One prompt: token ids, text or chat messages, only index 0.
        assert_eq!(
            Prompt::of_choice(&json!([5, 6]), 0),
            Some(Prompt::Tokens(vec![5, 6]))
        );
        assert_eq!(
            Prompt::of_choice(&json!("hi"), 0),
            Some(Prompt::Text("hi".into()))
        );
        assert_eq!(Prompt::of_choice(&json!("hi"), 1), None);
        let messages = json!([{"role": "user", "content": "hi"}]);
        assert_eq!(Prompt::of_choice(&messages, 0), Some(chat(None, "hi")));
    }

    fn rated(
        seq: i64,
        prompt: Prompt,
        output: &str,
        rating: Rating,
        correction: Option<&str>,
    ) -> RatedOutput {
        RatedOutput {
            feedback_id: format!("fb-{seq}"),
            completion_id: format!("chatcmpl-{seq}"),
            choice_index: 0,
            adapter_version: "support@1".into(),
            prompt,
            output: output.into(),
            rating,
            correction: correction.map(str::to_string),
            seq,
        }
    }

    /// A conversation log: three prompts (one asked twice with different whitespace, one
    /// asked with and without a system prompt), ups, downs and corrections.
    fn fixture() -> Vec<RatedOutput> {
        use Rating::{Down, Up};
        let capital = || chat(None, "What is the capital of France?");
        let capital_spaced = || chat(None, "  What is the\n capital of   France? ");
        let capital_pirate = || {
            chat(
                Some("Talk like a pirate."),
                "What is the capital of France?",
            )
        };
        let haiku = || chat(None, "Write a haiku about rain.");
        vec![
            rated(1, capital(), "Paris.", Up, None),
            rated(2, capital_spaced(), "Lyon.", Down, None),
            rated(3, capital(), "Marseille.", Down, None),
            rated(4, capital_pirate(), "Arr, Lyon.", Down, None),
            rated(
                5,
                haiku(),
                "Rain is wet.",
                Down,
                Some("Soft rain on the roof"),
            ),
            rated(6, haiku(), "Drops fall.", Up, None),
            rated(7, capital(), "Paris, of course.", Up, None),
            rated(8, haiku(), "Clouds weep.", Up, Some("Clouds weep softly")),
            rated(9, Prompt::Text("2+2=".into()), "4", Up, Some("  4 ")),
        ]
    }

    fn triples(ex: &TrainingExamples) -> Vec<(String, String, String)> {
        ex.pairs
            .iter()
            .map(|p| {
                let user = match &p.prompt {
                    Prompt::Chat(m) => m.last().map(|m| m.content.clone()).unwrap_or_default(),
                    Prompt::Text(t) => t.clone(),
                    Prompt::Tokens(_) => String::new(),
                };
                (normalise_text(&user), p.chosen.clone(), p.rejected.clone())
            })
            .collect()
    }

    #[test]
    fn fixture_log_gives_the_expected_pairs() {
        let ex = build(&fixture());
        let capital = "What is the capital of France?".to_string();
        let haiku = "Write a haiku about rain.".to_string();
        assert_eq!(
            triples(&ex),
            vec![
                // Downs of the capital prompt (whitespace-insensitive) in order, ups cyclic.
                (capital.clone(), "Paris.".into(), "Lyon.".into()),
                (
                    capital.clone(),
                    "Paris, of course.".into(),
                    "Marseille.".into()
                ),
                // Haiku: corrections first as they are met, then the remaining down (none).
                (
                    haiku.clone(),
                    "Soft rain on the roof".into(),
                    "Rain is wet.".into()
                ),
                (
                    haiku.clone(),
                    "Clouds weep softly".into(),
                    "Clouds weep.".into()
                ),
            ]
        );
        let demos: Vec<(&str, bool)> = ex
            .demonstrations
            .iter()
            .map(|d| (d.completion.as_str(), d.from_correction))
            .collect();
        assert_eq!(
            demos,
            vec![
                ("Paris.", false),
                ("Paris, of course.", false),
                ("Soft rain on the roof", true),
                ("Drops fall.", false),
                ("Clouds weep softly", true),
                // The correction "  4 " equals the output after normalising: just a thumbs-up.
                ("4", false),
            ]
        );
        // The pirate prompt has a system prompt, so it is another prompt with no up: unpaired.
        let negs: Vec<&str> = ex
            .unpaired_negatives
            .iter()
            .map(|n| n.completion.as_str())
            .collect();
        assert_eq!(negs, vec!["Arr, Lyon."]);
        assert_eq!(
            ex.pairs[0].source,
            PairSource::Ratings {
                chosen_feedback: "fb-1".into(),
                rejected_feedback: "fb-2".into()
            }
        );
        assert_eq!(
            ex.pairs[2].source,
            PairSource::Correction {
                feedback: "fb-5".into()
            }
        );
    }

    #[test]
    fn pairing_does_not_depend_on_input_order() {
        let mut log = fixture();
        let a = build(&log);
        log.reverse();
        assert_eq!(build(&log), a);
        assert_eq!(build(&log).keys(), a.keys());
    }

    #[test]
    fn keys_change_when_a_text_changes() {
        let mut log = fixture();
        let before = build(&log);
        log[0].output = "Paris!".into();
        let after = build(&log);
        assert_ne!(before.pairs[0].key, after.pairs[0].key);
        assert_eq!(before.pairs[2].key, after.pairs[2].key);
    }

    #[test]
    fn a_down_with_only_identical_ups_stays_unpaired() {
        let p = || chat(None, "hi");
        let log = vec![
            rated(1, p(), "Hello!", Rating::Up, None),
            rated(2, p(), "Hello!", Rating::Down, None),
        ];
        let ex = build(&log);
        assert!(ex.pairs.is_empty());
        assert_eq!(ex.unpaired_negatives.len(), 1);
        assert_eq!(ex.demonstrations.len(), 1);
    }

    #[test]
    fn untrained_counts_examples_without_versions() {
        let mut ex = build(&fixture());
        let total = ex.keys().len() as u64;
        assert_eq!(ex.untrained(), total);
        let mut trained = HashMap::new();
        trained.insert(ex.pairs[0].key.clone(), vec![2]);
        trained.insert(ex.demonstrations[0].key.clone(), vec![2, 3]);
        ex.attach_trained(&trained);
        assert_eq!(ex.untrained(), total - 2);
        assert_eq!(ex.demonstrations[0].trained_in, vec![2, 3]);
    }

    #[test]
    fn recorded_request_values_become_prompts() {
        let chat = serde_json::json!([{"role": "user", "content": "hi"}]);
        assert!(matches!(Prompt::from_json(&chat), Some(Prompt::Chat(m)) if m.len() == 1));
        assert_eq!(
            Prompt::from_json(&serde_json::json!("hi")),
            Some(Prompt::Text("hi".into()))
        );
        assert_eq!(
            Prompt::from_json(&serde_json::json!([1, 2])),
            Some(Prompt::Tokens(vec![1, 2]))
        );
        assert_eq!(Prompt::from_json(&serde_json::json!({"x": 1})), None);
    }
}
