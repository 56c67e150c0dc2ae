//! Chat templates: the Jinja program a model ships to turn a conversation into its prompt.
//!
//! Rendered with minijinja the way transformers' `apply_chat_template` renders with jinja2
//! (`utils/chat_template_utils.py`, `_compile_jinja_template`): `trim_blocks` and
//! `lstrip_blocks` on, loop controls (`break`/`continue`), `raise_exception(msg)`, a `tojson`
//! that does not HTML-escape, `strftime_now(fmt)`, and Python string/dict methods
//! (`.strip()`, `.startswith()`, `.items()`, ...) through minijinja-contrib's pycompat. The
//! variables are `messages`, `add_generation_prompt`, `bos_token` and `eos_token`.
//!
//! A template comes from a model file and messages come from users, so a render is bounded:
//! minijinja fuel caps the instructions it may run and the output it may write is capped too.
//! Neither can hang the server or exhaust its memory.

use std::io::Write;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};

/// Name the template is registered under in its environment.
const TEMPLATE_NAME: &str = "chat_template";

/// Instructions one render may run. A ChatML render of a 1000-message conversation takes
/// well under 100k; this leaves room for elaborate templates (tools, reasoning) while a
/// runaway loop stops within about a second.
pub const DEFAULT_FUEL: u64 = 20_000_000;

/// Bytes one render may write.
pub const DEFAULT_MAX_OUTPUT: usize = 64 << 20;

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with `role` and `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Why a chat template could not be compiled or rendered.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    /// The template is not valid Jinja.
    #[error("chat template does not compile: {0}")]
    Syntax(String),
    /// The template called `raise_exception(msg)`: the conversation is one it refuses
    /// (e.g. roles that do not alternate). A client error, not a server one.
    #[error("{0}")]
    Raised(String),
    /// The render ran more instructions than allowed.
    #[error("chat template ran too long (more than {0} steps)")]
    OutOfFuel(u64),
    /// The render wrote more than allowed.
    #[error("chat template output exceeds {0} bytes")]
    TooLarge(usize),
    /// Any other render failure (an undefined method, a type error).
    #[error("chat template failed: {0}")]
    Render(String),
}

/// The error `raise_exception` returns, found again in the render error's source chain.
#[derive(Debug)]
struct Raised(String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

/// A compiled chat template, reused for every request.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    fuel: u64,
    max_output: usize,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("fuel", &self.fuel)
            .field("max_output", &self.max_output)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`. `bos_token`/`eos_token` are the texts the template sees under those
    /// names (undefined when `None`, as in transformers).
    pub fn new(
        source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, ChatTemplateError> {
        let mut env = Environment::new();
        // transformers' choices, not jinja2's defaults.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_fuel(Some(DEFAULT_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(|e| ChatTemplateError::Syntax(e.to_string()))?;
        Ok(Self {
            env,
            bos_token,
            eos_token,
            fuel: DEFAULT_FUEL,
            max_output: DEFAULT_MAX_OUTPUT,
        })
    }

    /// Replaces the render bounds: `fuel` instructions and `max_output` bytes per render.
    pub fn with_limits(mut self, fuel: u64, max_output: usize) -> Self {
        self.env.set_fuel(Some(fuel));
        self.fuel = fuel;
        self.max_output = max_output;
        self
    }

    /// The prompt for `messages`; `add_generation_prompt` appends the header of the assistant
    /// turn the model is to write.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ChatTemplateError::Render(e.to_string()))?;
        let token = |t: &Option<String>| t.as_deref().map_or(Value::UNDEFINED, Value::from);
        let ctx = minijinja::context! {
            messages => Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => token(&self.bos_token),
            eos_token => token(&self.eos_token),
        };
        let mut out = LimitedWriter {
            buf: Vec::new(),
            limit: self.max_output,
            exceeded: false,
        };
        if let Err(e) = template.render_captured_to(ctx, &mut out) {
            return Err(self.classify(e, out.exceeded));
        }
        String::from_utf8(out.buf).map_err(|e| ChatTemplateError::Render(e.to_string()))
    }

    fn classify(&self, e: Error, exceeded: bool) -> ChatTemplateError {
        if exceeded {
            return ChatTemplateError::TooLarge(self.max_output);
        }
        if e.kind() == ErrorKind::OutOfFuel {
            return ChatTemplateError::OutOfFuel(self.fuel);
        }
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(err) = source {
            if let Some(raised) = err.downcast_ref::<Raised>() {
                return ChatTemplateError::Raised(raised.0.clone());
            }
            source = err.source();
        }
        ChatTemplateError::Render(e.to_string())
    }
}

/// Collects output, failing once more than `limit` bytes would be written.
struct LimitedWriter {
    buf: Vec<u8>,
    limit: usize,
    exceeded: bool,
}

impl Write for LimitedWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len().saturating_add(data.len()) > self.limit {
            self.exceeded = true;
            return Err(std::io::Error::other("chat template output limit"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `raise_exception(msg)`: abort the render with `msg` for the client.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, "raise_exception").with_source(Raised(message)))
}

/// `strftime_now(fmt)`: the current UTC time, for templates that print today's date
/// (Llama 3.1). Supports the common `strftime` directives.
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    strftime(secs, &format)
}

fn strftime(secs: u64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    // 1970-01-01 was a Thursday (index 3 from Monday).
    let weekday = ((days % 7 + 7 + 3) % 7) as usize;
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('B') => out.push_str(month_name),
            Some('b') => out.push_str(&month_name[..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `tojson` as transformers defines it: Python's `json.dumps` (`ensure_ascii=False`, `", "`
/// and `": "` separators, optional `indent` and `sort_keys`) and no HTML escaping, which
/// minijinja's built-in `tojson` does.
fn tojson(value: Value, kwargs: Kwargs) -> Result<String, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => Some(if let Some(s) = v.as_str() {
            s.to_owned()
        } else {
            let n = usize::try_from(v.clone()).map_err(|_| {
                Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or string",
                )
            })?;
            " ".repeat(n.min(64))
        }),
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !(v.is_none() || v.is_undefined()) => {
            let a = v
                .get_item_by_index(0)
                .ok()
                .and_then(|x| x.as_str().map(str::to_owned));
            let b = v
                .get_item_by_index(1)
                .ok()
                .and_then(|x| x.as_str().map(str::to_owned));
            match (a, b) {
                (Some(a), Some(b)) => (a, b),
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be a pair of strings",
                    ))
                }
            }
        }
        // Python drops the space after "," when indenting.
        _ if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        _ => (", ".to_owned(), ": ".to_owned()),
    };
    let opts = JsonOpts {
        indent,
        ensure_ascii: ensure_ascii.unwrap_or(false),
        sort_keys: sort_keys.unwrap_or(false),
        item_sep,
        key_sep,
    };
    let mut out = String::new();
    write_json(&value, &opts, 0, &mut out)?;
    Ok(out)
}

struct JsonOpts {
    indent: Option<String>,
    ensure_ascii: bool,
    sort_keys: bool,
    item_sep: String,
    key_sep: String,
}

/// Deepest nesting `tojson` follows; deeper values are a template bug or an attack.
const MAX_JSON_DEPTH: usize = 128;

fn write_json(value: &Value, opts: &JsonOpts, depth: usize, out: &mut String) -> Result<(), Error> {
    if depth > MAX_JSON_DEPTH {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "tojson: value nested too deeply",
        ));
    }
    let newline = |out: &mut String, level: usize| {
        if let Some(ind) = &opts.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(ind);
            }
        }
    };
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Ok(i) = i128::try_from(value.clone()) {
                out.push_str(&i.to_string());
            } else if let Ok(f) = f64::try_from(value.clone()) {
                out.push_str(&python_float(f));
            } else {
                out.push_str(&value.to_string());
            }
        }
        ValueKind::String | ValueKind::Bytes => {
            write_json_string(value.as_str().unwrap_or_default(), opts.ensure_ascii, out)
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline(out, depth + 1);
                write_json(item, opts, depth + 1, out)?;
            }
            newline(out, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let mut entries: Vec<(String, Value)> = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                let key = key.as_str().map_or_else(|| key.to_string(), str::to_owned);
                entries.push((key, item));
            }
            if opts.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            if entries.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, (key, item)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline(out, depth + 1);
                write_json_string(key, opts.ensure_ascii, out);
                out.push_str(&opts.key_sep);
                write_json(item, opts, depth + 1, out)?;
            }
            newline(out, depth);
            out.push('}');
        }
        _ => write_json_string(&value.to_string(), opts.ensure_ascii, out),
    }
    Ok(())
}

/// Python's `repr(float)` for the values JSON can hold.
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // Rust's `{:?}` is the shortest round-trip form, as is Python's repr; they differ only
    // in exponent spelling (1e-5 vs 1e-05) and in where they switch to exponents.
    let s = format!("{f:?}");
    match s.split_once('e') {
        Some((mantissa, exp)) => {
            let (sign, digits) = match exp.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', exp),
            };
            format!("{mantissa}e{sign}{digits:0>2}")
        }
        None => s,
    }
}

fn write_json_string(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !c.is_ascii()) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn msgs() -> Vec<ChatMessage> {
        vec![
            ChatMessage::new("user", "Hi"),
            ChatMessage::new("assistant", "Hello!"),
        ]
    }

    #[test]
    fn renders_chatml() {
        let t = ChatTemplate::new(CHATML, None, None).unwrap();
        let out = t.render(&msgs(), true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t.render(&msgs(), false).unwrap();
        assert!(out.ends_with("Hello!<|im_end|>\n"));
    }

    #[test]
    fn trim_and_lstrip_blocks_like_transformers() {
        let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}\n";
        let t = ChatTemplate::new(src, None, None).unwrap();
        assert_eq!(t.render(&msgs(), false).unwrap(), "[Hi]\n");
    }

    #[test]
    fn special_tokens_and_python_methods() {
        let src = "{{ bos_token }}{% for m in messages %}{{ m.content.strip().upper() }}{% if m.role.startswith('ass') %}{{ eos_token }}{% endif %}{% endfor %}";
        let t = ChatTemplate::new(src, Some("<s>".into()), Some("</s>".into())).unwrap();
        let m = vec![
            ChatMessage::new("user", "  hi "),
            ChatMessage::new("assistant", "yo"),
        ];
        assert_eq!(t.render(&m, false).unwrap(), "<s>HIYO</s>");
        // Absent tokens are undefined: they print as nothing and `is defined` is false
        // (printed as Python prints it).
        let t =
            ChatTemplate::new("[{{ bos_token }}]{{ eos_token is defined }}", None, None).unwrap();
        assert_eq!(t.render(&m, false).unwrap(), "[]False");
    }

    #[test]
    fn raise_exception_is_reported_as_raised() {
        let src = "{% if messages[0].role != 'system' %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}";
        let t = ChatTemplate::new(src, None, None).unwrap();
        match t.render(&msgs(), true) {
            Err(ChatTemplateError::Raised(m)) => {
                assert_eq!(
                    m,
                    "Conversation roles must alternate user/assistant/user/assistant/..."
                )
            }
            other => panic!("expected Raised, got {other:?}"),
        }
        // Also from inside a macro.
        let src = "{% macro f() %}{{ raise_exception('inner') }}{% endmacro %}{{ f() }}";
        let t = ChatTemplate::new(src, None, None).unwrap();
        assert!(
            matches!(t.render(&msgs(), true), Err(ChatTemplateError::Raised(m)) if m == "inner")
        );
    }

    #[test]
    fn message_content_is_data_not_template() {
        let t = ChatTemplate::new(CHATML, None, None).unwrap();
        let m = vec![ChatMessage::new(
            "user",
            "{{ 7 * 7 }}{% for i in range(10) %}x{% endfor %}",
        )];
        let out = t.render(&m, false).unwrap();
        assert!(out.contains("user\n{{ 7 * 7 }}{% for i in range(10) %}x{% endfor %}<|im_end|>"));
    }

    #[test]
    fn syntax_errors_are_reported_at_compile_time() {
        let err = ChatTemplate::new("{% for m in messages %}", None, None).unwrap_err();
        assert!(matches!(err, ChatTemplateError::Syntax(_)), "{err:?}");
    }

    #[test]
    fn runaway_loops_run_out_of_fuel() {
        let src =
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";
        let t = ChatTemplate::new(src, None, None).unwrap();
        let started = std::time::Instant::now();
        let err = t.render(&msgs(), false).unwrap_err();
        assert!(matches!(err, ChatTemplateError::OutOfFuel(_)), "{err:?}");
        assert!(started.elapsed() < std::time::Duration::from_secs(30));
    }

    #[test]
    fn output_is_bounded() {
        let src = "{% for m in messages %}{{ m.content * 1000 }}{% endfor %}";
        let t = ChatTemplate::new(src, None, None)
            .unwrap()
            .with_limits(DEFAULT_FUEL, 10_000);
        let m = vec![ChatMessage::new("user", "x".repeat(100))];
        assert!(matches!(
            t.render(&m, false),
            Err(ChatTemplateError::TooLarge(10_000))
        ));
        // Under the limit it renders.
        let m = vec![ChatMessage::new("user", "x")];
        assert_eq!(t.render(&m, false).unwrap().len(), 1000);
    }

    #[test]
    fn tojson_is_python_json_dumps() {
        let src = "{{ {'a': [1, 2.5, none, true], 'b': '<é>\"'} | tojson }}|{{ [1, {'k': 'v'}] | tojson(indent=2) }}|{{ 'é' | tojson(ensure_ascii=true) }}|{{ {'b': 1, 'a': 2} | tojson(sort_keys=true) }}";
        let t = ChatTemplate::new(src, None, None).unwrap();
        assert_eq!(
            t.render(&[], false).unwrap(),
            "{\"a\": [1, 2.5, null, true], \"b\": \"<é>\\\"\"}|[\n  1,\n  {\n    \"k\": \"v\"\n  }\n]|\"\\u00e9\"|{\"a\": 2, \"b\": 1}"
        );
    }

    #[test]
    fn loop_controls_and_namespace() {
        let src = "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{% set ns.n = ns.n + 1 %}{{ m.role }}{% endfor %}{{ ns.n }}";
        let t = ChatTemplate::new(src, None, None).unwrap();
        assert_eq!(t.render(&msgs(), false).unwrap(), "user1");
    }

    #[test]
    fn strftime_formats_dates() {
        // 2024-07-26 13:05:09 UTC, a Friday.
        let secs = 1_722_000_000 - 1_722_000_000 % 86_400 + 13 * 3600 + 5 * 60 + 9;
        assert_eq!(
            strftime(secs, "%d %b %Y %A %H:%M:%S %%"),
            "26 Jul 2024 Friday 13:05:09 %"
        );
        assert_eq!(strftime(0, "%Y-%m-%d %a"), "1970-01-01 Thu");
        let t = ChatTemplate::new("{{ strftime_now('%Y') | length }}", None, None).unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "4");
    }
}
