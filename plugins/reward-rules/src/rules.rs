//! Rule sets: parsed and checked from the config JSON once (regexes compiled under size
//! limits), then applied to completions. Parsing is by hand rather than serde so each error
//! names the rule (`rules[2]`) and the field, and lists what would have been accepted.
//!
//! ```json
//! {"rules": [
//!   {"kind": "must_match",       "pattern": "^Hello"},
//!   {"kind": "must_not_match",   "pattern": "(?i)as an ai"},
//!   {"kind": "must_contain",     "text": "Paris", "ignore_case": true},
//!   {"kind": "must_not_contain", "text": "TODO"},
//!   {"kind": "max_words",        "max": 120},
//!   {"kind": "valid_json"},
//!   {"kind": "json_with_keys",   "keys": ["name", "age"], "weight": 2}
//! ]}
//! ```
//!
//! Every rule takes an optional `weight` (finite, `>= 0`, default 1); the score of a completion
//! is the weight of the rules it satisfies over the total weight, so it lies in `[0, 1]`.

use regex::{Regex, RegexBuilder};
use serde_json::{json, Map, Value};

/// At most this many rules in one set.
pub const MAX_RULES: usize = 64;
/// Longest accepted regex pattern, in bytes.
pub const MAX_PATTERN_BYTES: usize = 1024;
/// Compiled-program size limit of one regex (the `regex` crate's `size_limit`).
pub const REGEX_SIZE_LIMIT: usize = 1 << 20;
/// Lazy-DFA cache limit of one regex.
pub const REGEX_DFA_SIZE_LIMIT: usize = 1 << 20;
/// Deepest accepted nesting of groups and repetitions in a pattern.
pub const REGEX_NEST_LIMIT: u32 = 32;

/// The rule kinds, in the order error messages list them.
pub const KINDS: [&str; 7] = [
    "must_match",
    "must_not_match",
    "must_contain",
    "must_not_contain",
    "max_words",
    "valid_json",
    "json_with_keys",
];

#[derive(Debug)]
enum Check {
    MustMatch(Regex),
    MustNotMatch(Regex),
    MustContain { text: String, ignore_case: bool },
    MustNotContain { text: String, ignore_case: bool },
    MaxWords(u64),
    ValidJson,
    JsonWithKeys(Vec<String>),
}

#[derive(Debug)]
struct Rule {
    kind: &'static str,
    weight: f64,
    check: Check,
}

/// A checked, compiled set of rules.
#[derive(Debug)]
pub struct RuleSet {
    rules: Vec<Rule>,
    total_weight: f64,
}

/// How one completion fared.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Weighted share of satisfied rules, in `[0, 1]`.
    pub score: f64,
    /// `(kind, weight, passed)` per rule, in config order.
    pub rules: Vec<(&'static str, f64, bool)>,
}

impl Outcome {
    /// The `details` entry of the reply.
    pub fn to_json(&self) -> Value {
        let rules: Vec<Value> = self
            .rules
            .iter()
            .map(|(kind, weight, passed)| json!({"kind": kind, "weight": weight, "passed": passed}))
            .collect();
        json!({"score": self.score, "rules": rules})
    }
}

/// The fields of one rule object, handed out once each so leftovers can be reported.
struct Fields<'a> {
    at: String,
    map: Map<String, Value>,
    kind: &'a str,
}

impl Fields<'_> {
    fn take(&mut self, name: &str) -> Option<Value> {
        self.map.remove(name)
    }

    fn string(&mut self, name: &str) -> Result<String, String> {
        match self.take(name) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s),
            Some(Value::String(_)) => Err(format!("{}.{name} must not be empty", self.at)),
            Some(other) => Err(format!("{}.{name} must be a string, got {other}", self.at)),
            None => Err(format!("{}: a {} rule needs `{name}`", self.at, self.kind)),
        }
    }

    fn flag(&mut self, name: &str) -> Result<bool, String> {
        match self.take(name) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(b),
            Some(other) => Err(format!(
                "{}.{name} must be true or false, got {other}",
                self.at
            )),
        }
    }

    fn finish(self) -> Result<(), String> {
        match self.map.keys().next() {
            None => Ok(()),
            Some(extra) => Err(format!(
                "{}: unknown field `{extra}` for a {} rule",
                self.at, self.kind
            )),
        }
    }
}

fn compile(at: &str, pattern: &str) -> Result<Regex, String> {
    if pattern.len() > MAX_PATTERN_BYTES {
        return Err(format!(
            "{at}.pattern is {} bytes; the limit is {MAX_PATTERN_BYTES}",
            pattern.len()
        ));
    }
    RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_DFA_SIZE_LIMIT)
        .nest_limit(REGEX_NEST_LIMIT)
        .build()
        .map_err(|e| format!("{at}.pattern is not a usable regex: {e}"))
}

fn unknown_kind(at: &str, kind: &str) -> String {
    format!(
        "{at}: unknown rule kind {kind:?}; expected one of {}",
        KINDS.join(", ")
    )
}

fn parse_rule(index: usize, value: &Value) -> Result<Rule, String> {
    let at = format!("rules[{index}]");
    let Value::Object(map) = value else {
        return Err(format!("{at} must be an object with a `kind`, got {value}"));
    };
    let mut map = map.clone();
    let kind_name = match map.remove("kind") {
        Some(Value::String(s)) => s,
        Some(other) => return Err(format!("{at}.kind must be a string, got {other}")),
        None => {
            return Err(format!(
                "{at} has no `kind`; expected one of {}",
                KINDS.join(", ")
            ))
        }
    };
    let Some(&kind) = KINDS.iter().find(|k| **k == kind_name) else {
        return Err(unknown_kind(&at, &kind_name));
    };
    let weight = match map.remove("weight") {
        None => 1.0,
        Some(Value::Number(n)) => match n.as_f64() {
            Some(w) if w.is_finite() && w >= 0.0 => w,
            _ => return Err(format!("{at}.weight must be a finite number >= 0, got {n}")),
        },
        Some(other) => return Err(format!("{at}.weight must be a number, got {other}")),
    };
    let mut f = Fields {
        at: at.clone(),
        map,
        kind,
    };
    let check = match kind {
        "must_match" => Check::MustMatch(compile(&at, &f.string("pattern")?)?),
        "must_not_match" => Check::MustNotMatch(compile(&at, &f.string("pattern")?)?),
        "must_contain" | "must_not_contain" => {
            let text = f.string("text")?;
            let ignore_case = f.flag("ignore_case")?;
            let text = if ignore_case {
                text.to_lowercase()
            } else {
                text
            };
            if kind == "must_contain" {
                Check::MustContain { text, ignore_case }
            } else {
                Check::MustNotContain { text, ignore_case }
            }
        }
        "max_words" => match f.take("max") {
            Some(Value::Number(n)) => match n.as_u64() {
                Some(max) => Check::MaxWords(max),
                None => return Err(format!("{at}.max must be a whole number >= 0, got {n}")),
            },
            Some(other) => {
                return Err(format!("{at}.max must be a whole number >= 0, got {other}"))
            }
            None => return Err(format!("{at}: a max_words rule needs `max`")),
        },
        "valid_json" => Check::ValidJson,
        "json_with_keys" => match f.take("keys") {
            Some(Value::Array(keys)) if !keys.is_empty() => {
                let keys = keys
                    .iter()
                    .map(|k| k.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| format!("{at}.keys must contain only strings"))?;
                Check::JsonWithKeys(keys)
            }
            Some(_) => return Err(format!("{at}.keys must be a non-empty array of strings")),
            None => return Err(format!("{at}: a json_with_keys rule needs `keys`")),
        },
        // Only reachable if KINDS gains an entry without a parser above.
        other => return Err(unknown_kind(&at, other)),
    };
    f.finish()?;
    Ok(Rule {
        kind,
        weight,
        check,
    })
}

impl RuleSet {
    /// Parses and checks `{"rules": [...]}`; the error names the rule and field at fault.
    pub fn from_config(config: &Value) -> Result<RuleSet, String> {
        let Value::Object(map) = config else {
            return Err(format!(
                "the config must be an object {{\"rules\": [...]}}, got {config}"
            ));
        };
        if let Some(extra) = map.keys().find(|k| k.as_str() != "rules") {
            return Err(format!(
                "unknown config field `{extra}`; only `rules` is accepted"
            ));
        }
        let Some(Value::Array(list)) = map.get("rules") else {
            return Err("the config needs `rules`, an array of rule objects".to_string());
        };
        if list.is_empty() {
            return Err("`rules` must hold at least one rule".to_string());
        }
        if list.len() > MAX_RULES {
            return Err(format!(
                "`rules` holds {} rules; the limit is {MAX_RULES}",
                list.len()
            ));
        }
        let rules = list
            .iter()
            .enumerate()
            .map(|(i, v)| parse_rule(i, v))
            .collect::<Result<Vec<_>, _>>()?;
        let total_weight: f64 = rules.iter().map(|r| r.weight).sum();
        if !(total_weight > 0.0 && total_weight.is_finite()) {
            return Err(format!(
                "the rule weights sum to {total_weight}; at least one rule needs a positive weight"
            ));
        }
        Ok(RuleSet {
            rules,
            total_weight,
        })
    }

    /// Applies every rule to `completion`.
    pub fn score(&self, completion: &str) -> Outcome {
        // Parsed at most once, and only if a JSON rule asks.
        let mut parsed: Option<Option<Value>> = None;
        let mut json = || {
            parsed
                .get_or_insert_with(|| serde_json::from_str::<Value>(completion.trim()).ok())
                .clone()
        };
        let mut lowered: Option<String> = None;
        let mut satisfied = 0.0;
        let mut rules = Vec::with_capacity(self.rules.len());
        for rule in &self.rules {
            let passed = match &rule.check {
                Check::MustMatch(re) => re.is_match(completion),
                Check::MustNotMatch(re) => !re.is_match(completion),
                Check::MustContain { text, ignore_case }
                | Check::MustNotContain { text, ignore_case } => {
                    let found = if *ignore_case {
                        lowered
                            .get_or_insert_with(|| completion.to_lowercase())
                            .contains(text.as_str())
                    } else {
                        completion.contains(text.as_str())
                    };
                    found == matches!(rule.check, Check::MustContain { .. })
                }
                Check::MaxWords(max) => completion.split_whitespace().count() as u64 <= *max,
                Check::ValidJson => json().is_some(),
                Check::JsonWithKeys(keys) => match json() {
                    Some(Value::Object(obj)) => keys.iter().all(|k| obj.contains_key(k)),
                    _ => false,
                },
            };
            if passed {
                satisfied += rule.weight;
            }
            rules.push((rule.kind, rule.weight, passed));
        }
        Outcome {
            score: (satisfied / self.total_weight).clamp(0.0, 1.0),
            rules,
        }
    }
}

/// The JSON Schema `describe` reports (informative; `from_config` is the authority).
pub fn config_schema() -> Value {
    json!({
        "type": "object",
        "required": ["rules"],
        "additionalProperties": false,
        "properties": {
            "rules": {
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_RULES,
                "items": {
                    "type": "object",
                    "required": ["kind"],
                    "properties": {
                        "kind": {"enum": KINDS},
                        "weight": {"type": "number", "minimum": 0, "default": 1},
                        "pattern": {"type": "string", "maxLength": MAX_PATTERN_BYTES},
                        "text": {"type": "string", "minLength": 1},
                        "ignore_case": {"type": "boolean", "default": false},
                        "max": {"type": "integer", "minimum": 0},
                        "keys": {"type": "array", "items": {"type": "string"}, "minItems": 1}
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(rules: Value) -> RuleSet {
        RuleSet::from_config(&json!({ "rules": rules })).unwrap()
    }

    fn passes(rule: Value, completion: &str) -> bool {
        set(json!([rule])).score(completion).score == 1.0
    }

    fn err(rules: Value) -> String {
        RuleSet::from_config(&json!({ "rules": rules })).unwrap_err()
    }

    #[test]
    fn each_rule_kind_passes_and_fails_as_documented() {
        let cases = [
            (
                json!({"kind": "must_match", "pattern": "^Hello"}),
                "Hello you",
                "Well, Hello",
            ),
            (
                json!({"kind": "must_not_match", "pattern": "(?i)as an ai"}),
                "Sure.",
                "As an AI, no",
            ),
            (
                json!({"kind": "must_contain", "text": "Paris"}),
                "It is Paris.",
                "It is paris.",
            ),
            (
                json!({"kind": "must_contain", "text": "PARIS", "ignore_case": true}),
                "It is paris.",
                "It is Rome.",
            ),
            (
                json!({"kind": "must_not_contain", "text": "TODO"}),
                "done",
                "TODO: fix",
            ),
            (
                json!({"kind": "must_not_contain", "text": "todo", "ignore_case": true}),
                "done",
                "ToDo later",
            ),
            (
                json!({"kind": "max_words", "max": 3}),
                " one  two\nthree ",
                "one two three four",
            ),
            (
                json!({"kind": "valid_json"}),
                " {\"a\": [1, 2]}\n",
                "{\"a\": }",
            ),
            (
                json!({"kind": "json_with_keys", "keys": ["name", "age"]}),
                "{\"name\": \"x\", \"age\": 3, \"extra\": 1}",
                "{\"name\": \"x\"}",
            ),
        ];
        for (rule, good, bad) in cases {
            assert!(passes(rule.clone(), good), "{rule} should pass {good:?}");
            assert!(!passes(rule.clone(), bad), "{rule} should fail {bad:?}");
        }
        // Keys are required on an object, not inside an array.
        assert!(!passes(
            json!({"kind": "json_with_keys", "keys": ["a"]}),
            "[{\"a\": 1}]"
        ));
        assert!(passes(json!({"kind": "max_words", "max": 0}), "   "));
    }

    #[test]
    fn the_score_is_the_weighted_share_of_satisfied_rules() {
        let s = set(json!([
            {"kind": "must_contain", "text": "a", "weight": 2},
            {"kind": "must_contain", "text": "b", "weight": 0.5},
            {"kind": "must_contain", "text": "c", "weight": 1.5},
            {"kind": "must_contain", "text": "zzz", "weight": 0}
        ]));
        assert_eq!(s.score("abc").score, 1.0);
        assert_eq!(s.score("a").score, 0.5);
        assert_eq!(s.score("bc").score, 0.5);
        assert_eq!(s.score("b").score, 0.125);
        assert_eq!(s.score("").score, 0.0);
        let out = s.score("ac");
        assert_eq!(out.score, 0.875);
        assert_eq!(
            out.rules,
            vec![
                ("must_contain", 2.0, true),
                ("must_contain", 0.5, false),
                ("must_contain", 1.5, true),
                ("must_contain", 0.0, false)
            ]
        );
    }

    #[test]
    fn rejects_bad_configs_with_messages_naming_the_rule() {
        let cases = [
            (
                json!([{"kind": "regexp", "pattern": "x"}]),
                "rules[0]: unknown rule kind \"regexp\"; expected one of must_match",
            ),
            (
                json!([{"kind": "valid_json"}, {"kind": "must_match", "pattern": "(unclosed"}]),
                "rules[1].pattern is not a usable regex",
            ),
            (
                json!([{"kind": "valid_json", "weight": -1}]),
                "rules[0].weight must be a finite number >= 0, got -1",
            ),
            (
                json!([{"kind": "valid_json", "weight": "2"}]),
                "rules[0].weight must be a number",
            ),
            (
                json!([{"kind": "valid_json", "weight": 0}]),
                "at least one rule needs a positive weight",
            ),
            (
                json!([{"kind": "must_contain"}]),
                "rules[0]: a must_contain rule needs `text`",
            ),
            (
                json!([{"kind": "must_contain", "text": ""}]),
                "rules[0].text must not be empty",
            ),
            (
                json!([{"kind": "must_contain", "text": "x", "pattern": "y"}]),
                "rules[0]: unknown field `pattern` for a must_contain rule",
            ),
            (
                json!([{"kind": "must_contain", "text": "x", "ignore_case": "yes"}]),
                "ignore_case must be true or false",
            ),
            (
                json!([{"kind": "max_words", "max": -3}]),
                "rules[0].max must be a whole number >= 0",
            ),
            (
                json!([{"kind": "max_words", "max": 2.5}]),
                "rules[0].max must be a whole number >= 0",
            ),
            (
                json!([{"kind": "json_with_keys", "keys": []}]),
                "non-empty array of strings",
            ),
            (
                json!([{"kind": "json_with_keys", "keys": ["a", 1]}]),
                "keys must contain only strings",
            ),
            (json!([{"pattern": "x"}]), "rules[0] has no `kind`"),
            (json!(["must_match"]), "rules[0] must be an object"),
            (json!([]), "at least one rule"),
        ];
        for (rules, want) in cases {
            let got = err(rules.clone());
            assert!(got.contains(want), "{rules}: got {got:?}, want {want:?}");
        }
        assert!(RuleSet::from_config(&json!([1]))
            .unwrap_err()
            .contains("must be an object"));
        assert!(RuleSet::from_config(&json!({"rules": [], "extra": 1}))
            .unwrap_err()
            .contains("unknown config field `extra`"));
        let many = Value::Array(vec![json!({"kind": "valid_json"}); MAX_RULES + 1]);
        assert!(err(many).contains("the limit is 64"));
    }

    #[test]
    fn refuses_regexes_beyond_the_size_limits() {
        let long = "a".repeat(MAX_PATTERN_BYTES + 1);
        assert!(err(json!([{"kind": "must_match", "pattern": long}])).contains("the limit is 1024"));
        // Small to write, huge to compile: rejected by size_limit, not built.
        let blowup = err(json!([{"kind": "must_match", "pattern": "(\\w{100}){100}"}]));
        assert!(blowup.contains("not a usable regex"), "{blowup}");
        assert!(blowup.contains("size limit"), "{blowup}");
        let nested = format!("{}a{}", "(".repeat(40), ")".repeat(40));
        let deep = err(json!([{"kind": "must_not_match", "pattern": nested}]));
        assert!(deep.contains("not a usable regex"), "{deep}");
        assert!(deep.contains("nest"), "{deep}");
    }
}
