//! Chat-template rendering: turns a list of chat messages into the prompt text a model expects,
//! using the model's Jinja template (GGUF `tokenizer.chat_template` or HF `chat_template`).
//!
//! Owns: compiling the template once with minijinja (HF/llama.cpp settings: `trim_blocks`,
//! `lstrip_blocks`, Python string/dict methods via minijinja-contrib pycompat, `raise_exception`,
//! `tojson`, `strftime_now`) and rendering with `messages`, `add_generation_prompt`, `bos_token`
//! and `eos_token`. Must not: tokenize (the caller encodes the rendered text with
//! `parse_special = true`), read files, or panic on a template or message from outside.

use std::sync::Arc;

use minijinja::value::Kwargs;
use minijinja::{Environment, Error, ErrorKind, Value, context};

/// One chat turn.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Why a template could not be compiled or rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChatError {
    /// The template does not compile; the message names the line.
    #[error("chat template does not compile: {0}")]
    Syntax(String),
    /// The template called `raise_exception(msg)` (e.g. roles do not alternate).
    #[error("chat template rejected the conversation: {0}")]
    Raised(String),
    /// Any other error while rendering.
    #[error("chat template failed to render: {0}")]
    Render(String),
}

const TEMPLATE_NAME: &str = "chat_template";
/// Prefix that marks errors produced by `raise_exception` so they can be told apart.
const RAISE_MARKER: &str = "\u{1}raise_exception\u{1}";

/// ChatML, llama.cpp's fallback for models without a template.
const CHATML: &str = "{%- for message in messages -%}\
{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}";

/// A compiled chat template; cheap to clone and safe to share between threads.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Arc<Environment<'static>>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `template`; `bos_token` / `eos_token` are the token texts the template may use.
    pub fn new(template: &str, bos_token: &str, eos_token: &str) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, template.to_owned())
            .map_err(|e| ChatError::Syntax(describe(&e)))?;
        Ok(Self {
            env: Arc::new(env),
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
        })
    }

    /// The ChatML template (`<|im_start|>role\ncontent<|im_end|>\n`), for models without one.
    pub fn chatml() -> Self {
        // The template is a constant covered by tests; failing to compile it is a bug here.
        #[allow(clippy::expect_used)]
        Self::new(CHATML, "", "").expect("built-in ChatML template compiles")
    }

    /// Renders the conversation; `add_generation_prompt` appends the assistant-turn header.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ChatError::Render(describe(&e)))?;
        let ctx = context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        tmpl.render(ctx).map_err(|e| match raised_message(&e) {
            Some(msg) => ChatError::Raised(msg),
            None => ChatError::Render(describe(&e)),
        })
    }
}

/// `raise_exception(msg)`: aborts rendering with `msg`.
fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("{RAISE_MARKER}{msg}"),
    ))
}

/// The message of a `raise_exception` call somewhere in the error chain.
fn raised_message(e: &Error) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(m) = err.downcast_ref::<Error>()
            && let Some(msg) = m.detail().and_then(|d| d.strip_prefix(RAISE_MARKER))
        {
            return Some(msg.to_owned());
        }
        cur = err.source();
    }
    None
}

/// One-line description with the template line, e.g.
/// "syntax error: unexpected end of input, expected end of block (template line 1)".
fn describe(e: &Error) -> String {
    let mut s = match e.detail() {
        Some(d) => format!("{}: {d}", e.kind()),
        None => e.kind().to_string(),
    };
    if let Some(line) = e.line() {
        s.push_str(&format!(" (template line {line})"));
    }
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Python `json.dumps` separators without indentation: `", "` and `": "`.
struct PyCompactFormatter;

impl serde_json::ser::Formatter for PyCompactFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

/// `tojson` as transformers defines it (`json.dumps(x, ensure_ascii=False, indent=indent)`).
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    // Accepted for compatibility, without effect.
    let _: Option<Value> = kwargs.get("ensure_ascii")?;
    let _: Option<Value> = kwargs.get("separators")?;
    let _: Option<Value> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let res = match indent {
        Some(n) => {
            let pad = vec![b' '; n];
            let fmt = serde_json::ser::PrettyFormatter::with_indent(&pad);
            serde::Serialize::serialize(
                &value,
                &mut serde_json::Serializer::with_formatter(&mut out, fmt),
            )
        }
        None => serde::Serialize::serialize(
            &value,
            &mut serde_json::Serializer::with_formatter(&mut out, PyCompactFormatter),
        ),
    };
    res.map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let s = String::from_utf8(out)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    Ok(Value::from_safe_string(s))
}

/// `strftime_now(format)` (used by Llama 3.x templates) in UTC; supports
/// `%d %m %Y %y %b %B %a %A %H %M %S %j %e %%`.
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    strftime(&format, secs)
}

fn strftime(format: &str, unix_secs: u64) -> String {
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
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
    ];
    let days = unix_secs / 86_400;
    let sod = unix_secs % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm), all in non-negative ints.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_mar = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_mar + 2) / 153;
    let day = doy_mar - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    let leap = (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400);
    const CUM: [u64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let mi = (month - 1) as usize;
    let yday = CUM[mi] + day + u64::from(leap && month > 2);
    let wday = ((days + 4) % 7) as usize;
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&MONTHS[mi][..3]),
            Some('B') => out.push_str(MONTHS[mi]),
            Some('a') => out.push_str(&DAYS[wday][..3]),
            Some('A') => out.push_str(DAYS[wday]),
            Some('H') => out.push_str(&format!("{:02}", sod / 3600)),
            Some('M') => out.push_str(&format!("{:02}", sod / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", sod % 60)),
            Some('j') => out.push_str(&format!("{yday:03}")),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M-Instruct's `tokenizer.chat_template` (from its GGUF).
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    /// Llama-3-Instruct's template (Meta, as shipped in tokenizer_config.json).
    const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

    /// Mistral-style template with a role-alternation check.
    const ALTERNATING: &str = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'].strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}";

    fn msgs(list: &[(&str, &str)]) -> Vec<ChatMessage> {
        list.iter().map(|(r, c)| ChatMessage::new(*r, *c)).collect()
    }

    #[test]
    fn smollm2_default_system_prompt() {
        let t = ChatTemplate::new(SMOLLM2, "<|im_start|>", "<|im_end|>").unwrap();
        let out = t.render(&msgs(&[("user", "Hi there")]), true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t
            .render(
                &msgs(&[
                    ("system", "Be terse."),
                    ("user", "2+2?"),
                    ("assistant", "4"),
                ]),
                false,
            )
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n\
             <|im_start|>assistant\n4<|im_end|>\n"
        );
    }

    #[test]
    fn llama3_template() {
        let t = ChatTemplate::new(LLAMA3, "<|begin_of_text|>", "<|eot_id|>").unwrap();
        let out = t
            .render(&msgs(&[("system", " sys "), ("user", "hello\n")]), true)
            .unwrap();
        assert_eq!(
            out,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nsys<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nhello<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    #[test]
    fn raise_exception_is_an_error() {
        let t = ChatTemplate::new(ALTERNATING, "<s>", "</s>").unwrap();
        let ok = t
            .render(
                &msgs(&[("user", " a "), ("assistant", "b"), ("user", "c")]),
                true,
            )
            .unwrap();
        assert_eq!(ok, "<s>[INST] a [/INST]b</s>[INST] c [/INST]");
        let err = t
            .render(&msgs(&[("user", "a"), ("user", "b")]), true)
            .unwrap_err();
        assert_eq!(
            err,
            ChatError::Raised(
                "Conversation roles must alternate user/assistant/user/assistant/...".into()
            )
        );
    }

    #[test]
    fn syntax_error_is_reported() {
        let err = ChatTemplate::new("{% for m in messages %}{{ m.content }}", "", "").unwrap_err();
        match err {
            ChatError::Syntax(msg) => assert_eq!(
                msg,
                "syntax error: unexpected end of input, expected end of block (template line 1)"
            ),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn chatml_fallback() {
        let t = ChatTemplate::chatml();
        let out = t
            .render(&msgs(&[("system", "S"), ("user", "U")]), true)
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn pycompat_methods_and_tojson() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{{ m.content.strip().upper() }}|{{ m.role.startswith('us') }}|{{ m | tojson }}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        let out = t.render(&msgs(&[("user", "  hé \"q\" ")]), false).unwrap();
        assert_eq!(
            out,
            "HÉ \"Q\"|True|{\"role\": \"user\", \"content\": \"  hé \\\"q\\\" \"}"
        );
    }

    #[test]
    fn strftime_formats() {
        // 2024-07-04T13:05:09Z, a Thursday
        let t = 1_720_098_309;
        assert_eq!(strftime("%d %b %Y", t), "04 Jul 2024");
        assert_eq!(
            strftime("%A %B %e %H:%M:%S %j %y%%", t),
            "Thursday July  4 13:05:09 186 24%"
        );
        assert_eq!(strftime("%d %b %Y", 0), "01 Jan 1970");
        // leap day
        assert_eq!(strftime("%Y-%m-%d %j", 1_709_164_800), "2024-02-29 060");
    }
}
