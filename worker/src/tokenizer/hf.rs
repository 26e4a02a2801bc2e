//! Hugging Face `tokenizer.json` / `tokenizer_config.json` front door: translates a BPE
//! `tokenizer.json` (byte-level, or SentencePiece-converted with `▁` normalization and byte
//! fallback) into the same parts the GGUF front door produces.
//!
//! Owns: JSON reading and the mapping of HF normalizers / pre-tokenizers / post-processors onto
//! llama.cpp semantics (special added tokens -> control, others -> user defined, as llama.cpp's
//! converter does). Must not: tokenize, or accept constructs it cannot reproduce exactly
//! (unsupported normalizers or pre-tokenizers are an error, not a silent approximation; NFC/NFKC
//! are accepted and, like llama.cpp, not applied).

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use super::{Parts, PartsModel, TokenType, TokenizerError, VocabKind, bpe};

/// HF's ByteLevel pre-tokenizer regex.
const BYTE_LEVEL_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

fn err(msg: impl Into<String>) -> TokenizerError {
    TokenizerError::Hf(msg.into())
}

fn read_json(path: &Path) -> Result<Value, TokenizerError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| TokenizerError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// The `chat_template` of a `tokenizer_config.json` (a string, or a list of named templates of
/// which "default" or else the first is taken), if it has one.
pub fn hf_chat_template(tokenizer_config_json: &Path) -> Result<Option<String>, TokenizerError> {
    let cfg = read_json(tokenizer_config_json)?;
    Ok(match cfg.get("chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(list)) => {
            let named = |name: &str| {
                list.iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some(name))
            };
            named("default")
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string)
        }
        _ => None,
    })
}

/// A token given as `"<s>"` or `{"content": "<s>", ...}`.
fn token_content(v: &Value) -> Option<&str> {
    match v {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("content").and_then(Value::as_str),
        _ => None,
    }
}

/// Flattens `{"type": "Sequence", <key>: [...]}` nesting.
fn flatten<'a>(v: &'a Value, key: &str, out: &mut Vec<&'a Value>) {
    if v.get("type").and_then(Value::as_str) == Some("Sequence") {
        if let Some(items) = v.get(key).and_then(Value::as_array) {
            for item in items {
                flatten(item, key, out);
            }
        }
    } else if !v.is_null() {
        out.push(v);
    }
}

/// convert_hf_to_gguf's `does_token_look_special`, reduced to the common cases.
fn looks_special(text: &str) -> bool {
    matches!(text, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (text.starts_with("<|") && text.ends_with("|>") && text.len() >= 4)
        || (text.starts_with("<｜") && text.ends_with("｜>"))
}

pub(super) fn load(path: &Path, config: Option<&Path>) -> Result<Parts, TokenizerError> {
    let json = read_json(path)?;
    let cfg = config.map(read_json).transpose()?;
    let model = json.get("model").ok_or_else(|| err("no \"model\""))?;
    if let Some(t) = model.get("type").and_then(Value::as_str)
        && t != "BPE"
    {
        return Err(err(format!("model type {t:?} (only BPE is supported)")));
    }
    let vocab = model
        .get("vocab")
        .and_then(Value::as_object)
        .ok_or_else(|| err("model.vocab is missing or not an object"))?;
    let mut merges = Vec::new();
    if let Some(list) = model.get("merges").and_then(Value::as_array) {
        for (i, m) in list.iter().enumerate() {
            let pair = match m {
                Value::String(s) => bpe::split_merge(s),
                Value::Array(a) => match (a.first(), a.get(1), a.len()) {
                    (Some(Value::String(l)), Some(Value::String(r)), 2) => {
                        Some((l.clone(), r.clone()))
                    }
                    _ => None,
                },
                _ => None,
            };
            merges.push(pair.ok_or_else(|| err(format!("model.merges[{i}] is malformed")))?);
        }
    }
    let flag = |v: &Value, key: &str| v.get(key).and_then(Value::as_bool).unwrap_or(false);
    let byte_fallback = flag(model, "byte_fallback");
    let ignore_merges = flag(model, "ignore_merges");

    // Vocabulary by id; added tokens may extend it; holes become unused "[PAD<id>]".
    let as_id = |v: &Value| v.as_u64().and_then(|x| u32::try_from(x).ok());
    let added: &[Value] = json
        .get("added_tokens")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice);
    let mut n: usize = 0;
    for v in vocab.values() {
        let id = as_id(v).ok_or_else(|| err("model.vocab has a non-integer id"))?;
        n = n.max(id as usize + 1);
    }
    for a in added {
        let id = a
            .get("id")
            .and_then(as_id)
            .ok_or_else(|| err("added_tokens entry without an integer id"))?;
        n = n.max(id as usize + 1);
    }
    let mut tokens: Vec<Option<String>> = vec![None; n];
    let mut types = vec![TokenType::Normal; n];
    for (text, v) in vocab {
        let id = as_id(v).unwrap_or(0) as usize;
        if let Some(prev) = &tokens[id] {
            return Err(err(format!(
                "model.vocab maps both {prev:?} and {text:?} to id {id}"
            )));
        }
        tokens[id] = Some(text.clone());
    }
    let mut strip = HashMap::new();
    for a in added {
        let id = a.get("id").and_then(as_id).unwrap_or(0);
        let content = a
            .get("content")
            .and_then(Value::as_str)
            .ok_or_else(|| err(format!("added token {id} has no content")))?;
        let special = flag(a, "special");
        tokens[id as usize] = Some(content.to_string());
        types[id as usize] = if special || looks_special(content) {
            TokenType::Control
        } else {
            TokenType::UserDefined
        };
        let (l, r) = (flag(a, "lstrip"), flag(a, "rstrip"));
        if l || r {
            strip.insert(id, (l, r));
        }
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            t.unwrap_or_else(|| {
                types[i] = TokenType::Unused;
                format!("[PAD{i}]")
            })
        })
        .collect();
    let id_of: HashMap<&str, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i as u32))
        .collect();
    if byte_fallback {
        for (i, t) in tokens.iter().enumerate() {
            if types[i] == TokenType::Normal && super::parse_byte_token(t).is_some() && t.len() == 6
            {
                types[i] = TokenType::Byte;
            }
        }
    }

    // Normalizer: only SentencePiece-style `▁` handling is reproducible.
    let mut metaspace = false;
    let mut space_prefix = false;
    let mut norms = Vec::new();
    if let Some(n) = json.get("normalizer") {
        flatten(n, "normalizers", &mut norms);
    }
    for n in norms {
        let ty = n.get("type").and_then(Value::as_str).unwrap_or("");
        match ty {
            "Prepend" if n.get("prepend").and_then(Value::as_str) == Some("\u{2581}") => {
                space_prefix = true;
                metaspace = true;
            }
            "Replace"
                if n.get("pattern")
                    .and_then(|p| p.get("String"))
                    .and_then(Value::as_str)
                    == Some(" ")
                    && n.get("content").and_then(Value::as_str) == Some("\u{2581}") =>
            {
                metaspace = true;
            }
            // Unicode normalization (Qwen2's NFC) is dropped when llama.cpp converts to GGUF and
            // its tokenizer never applies it; do the same so both front doors agree.
            "NFC" | "NFKC" => {}
            _ => return Err(err(format!("normalizer {ty:?} is not supported"))),
        }
    }

    // Pre-tokenizer -> llama.cpp-style list of splitting regexes.
    let mut byte_level = false;
    let mut regexes: Vec<String> = Vec::new();
    let mut pres = Vec::new();
    if let Some(p) = json.get("pre_tokenizer") {
        flatten(p, "pretokenizers", &mut pres);
    }
    for p in pres {
        let ty = p.get("type").and_then(Value::as_str).unwrap_or("");
        match ty {
            "ByteLevel" => {
                byte_level = true;
                if flag(p, "add_prefix_space") {
                    return Err(err("ByteLevel add_prefix_space=true is not supported"));
                }
                if p.get("use_regex").and_then(Value::as_bool).unwrap_or(true) {
                    regexes.push(BYTE_LEVEL_REGEX.to_string());
                }
            }
            "Split" => {
                let behavior = p.get("behavior").and_then(Value::as_str).unwrap_or("");
                if behavior != "Isolated" || flag(p, "invert") {
                    return Err(err(format!(
                        "Split pre-tokenizer with behavior {behavior:?} / invert is not supported"
                    )));
                }
                let pat = p.get("pattern");
                let re = if let Some(r) = pat.and_then(|x| x.get("Regex")).and_then(Value::as_str) {
                    r.to_string()
                } else if let Some(s) = pat.and_then(|x| x.get("String")).and_then(Value::as_str) {
                    fancy_regex::escape(s).into_owned()
                } else {
                    return Err(err("Split pre-tokenizer without a pattern"));
                };
                regexes.push(re);
            }
            "Digits" => regexes.push(
                if flag(p, "individual_digits") {
                    r"\p{N}"
                } else {
                    r"\p{N}+"
                }
                .to_string(),
            ),
            "Metaspace" => {
                metaspace = true;
                let scheme = p.get("prepend_scheme").and_then(Value::as_str);
                space_prefix |= match scheme {
                    Some(s) => s != "never",
                    None => p
                        .get("add_prefix_space")
                        .and_then(Value::as_bool)
                        .unwrap_or(true),
                };
                if p.get("split").and_then(Value::as_bool).unwrap_or(true) {
                    regexes.push("\u{2581}[^\u{2581}]*|[^\u{2581}]+".to_string());
                }
            }
            _ => return Err(err(format!("pre-tokenizer {ty:?} is not supported"))),
        }
    }
    if !byte_level && !metaspace {
        let decoder_is = |t: &str| {
            let mut ds = Vec::new();
            if let Some(d) = json.get("decoder") {
                flatten(d, "decoders", &mut ds);
            }
            ds.iter()
                .any(|d| d.get("type").and_then(Value::as_str) == Some(t))
        };
        if decoder_is("ByteLevel") {
            byte_level = true;
        } else if byte_fallback || decoder_is("ByteFallback") || decoder_is("Metaspace") {
            metaspace = true;
        } else {
            return Err(err(
                "cannot tell whether the BPE is byte-level or SentencePiece-style",
            ));
        }
    }
    if byte_level && metaspace {
        return Err(err("mixes byte-level and SentencePiece-style processing"));
    }
    let kind = if byte_level {
        VocabKind::Gpt2Bpe
    } else {
        VocabKind::SentencePiece
    };

    // BOS/EOS from the post-processor template, then tokenizer_config.json.
    let mut add_bos = false;
    let mut add_eos = false;
    let mut bos = None;
    let mut eos = None;
    let mut procs = Vec::new();
    if let Some(p) = json.get("post_processor") {
        flatten(p, "processors", &mut procs);
    }
    for p in procs {
        if p.get("type").and_then(Value::as_str) != Some("TemplateProcessing") {
            continue;
        }
        let single = p.get("single").and_then(Value::as_array);
        let special_id = |item: Option<&Value>| -> Option<u32> {
            let name = item?.get("SpecialToken")?.get("id")?.as_str()?;
            p.get("special_tokens")
                .and_then(|s| s.get(name))
                .and_then(|s| s.get("ids"))
                .and_then(Value::as_array)
                .and_then(|ids| ids.first())
                .and_then(as_id)
                .or_else(|| id_of.get(name).copied())
        };
        if let Some(single) = single {
            if let Some(id) = special_id(single.first()) {
                add_bos = true;
                bos = Some(id);
            }
            if single.len() > 1
                && let Some(id) = special_id(single.last())
            {
                add_eos = true;
                eos = Some(id);
            }
        }
    }
    let mut unk = model
        .get("unk_token")
        .and_then(Value::as_str)
        .and_then(|t| id_of.get(t).copied());
    let mut clean_spaces = false;
    if let Some(cfg) = &cfg {
        let tok = |key: &str| {
            cfg.get(key)
                .and_then(token_content)
                .and_then(|t| id_of.get(t).copied())
        };
        bos = tok("bos_token").or(bos);
        eos = tok("eos_token").or(eos);
        unk = tok("unk_token").or(unk);
        if let Some(b) = cfg.get("add_bos_token").and_then(Value::as_bool) {
            add_bos = b;
        }
        if let Some(b) = cfg.get("add_eos_token").and_then(Value::as_bool) {
            add_eos = b;
        }
        clean_spaces = flag(cfg, "clean_up_tokenization_spaces");
    }
    if let Some(u) = unk
        && types[u as usize] == TokenType::Normal
    {
        types[u as usize] = TokenType::Unknown;
    }

    Ok(Parts {
        kind,
        tokens,
        types,
        scores: Vec::new(),
        strip,
        model: PartsModel::Bpe {
            merges,
            pre_regexes: regexes,
            ignore_merges,
            byte_fallback,
        },
        bos,
        eos,
        unk,
        eot: None,
        add_bos,
        add_eos,
        add_space_prefix: space_prefix,
        clean_spaces,
    })
}

#[cfg(test)]
mod tests {
    use super::super::{IncrementalDecoder, Tokenizer, TokenizerError, VocabKind};
    use super::hf_chat_template;
    use std::path::PathBuf;

    /// Writes an embedded fixture to a temp file (the loader takes paths).
    fn fixture(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("worker-hf-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    const BYTELEVEL: &str = include_str!("../../tests/data/tiny_bytelevel_tokenizer.json");
    const SPM: &str = include_str!("../../tests/data/tiny_spm_tokenizer.json");
    const SPM_CONFIG: &str = include_str!("../../tests/data/tiny_spm_tokenizer_config.json");

    #[test]
    fn byte_level_llama3_style() {
        let t = Tokenizer::from_hf_json(&fixture("bl.json", BYTELEVEL), None).unwrap();
        assert_eq!(t.kind(), VocabKind::Gpt2Bpe);
        assert_eq!(t.vocab_size(), 270);
        // TemplateProcessing adds <|begin_of_text|> (267)
        assert_eq!((t.bos(), t.add_bos()), (Some(267), true));
        // hello | Ġworld | Ġ | 123 | 4 | 5
        assert_eq!(
            t.encode("hello world 12345", true, false),
            [267, 259, 264, 32, 266, 52, 53]
        );
        assert_eq!(
            t.encode("HELLO's", false, false),
            [72, 69, 76, 76, 79, 39, 115]
        );
        assert_eq!(t.encode("<|eot_id|>é", false, true), [268, 195, 169]);
        assert_eq!(
            t.encode("<|eot_id|>", false, false),
            "<|eot_id|>".bytes().map(u32::from).collect::<Vec<_>>()
        );
        // non-special added tokens are always split out
        assert_eq!(t.encode("a<tool>b", false, false), [97, 269, 98]);
        assert_eq!(t.stop_tokens(), [268]);
        assert_eq!(t.decode(&[267, 259, 264, 268], true), "hello world");
        assert_eq!(
            t.decode(&[267, 259, 264, 268], false),
            "<|begin_of_text|>hello world<|eot_id|>"
        );
        let mut d = IncrementalDecoder::new(true);
        assert_eq!(d.push(&t, 195), "");
        assert_eq!(d.push(&t, 169), "é");
    }

    #[test]
    fn sentencepiece_style_with_config() {
        let t = Tokenizer::from_hf_json(
            &fixture("spm.json", SPM),
            Some(&fixture("spm_config.json", SPM_CONFIG)),
        )
        .unwrap();
        assert_eq!(t.kind(), VocabKind::SentencePiece);
        assert_eq!(
            (t.bos(), t.eos(), t.unk(), t.add_bos()),
            (Some(1), Some(2), Some(0), true)
        );
        // same ids llama.cpp gives for the equivalent SentencePiece GGUF (see spm.rs)
        assert_eq!(t.encode("hello world", true, false), [1, 272, 277]);
        assert_eq!(t.encode("hé", false, false), [259, 260, 198, 172]);
        assert_eq!(t.encode("<|im_end|>hello", false, true), [278, 272]);
        assert_eq!(t.encode("<tool>x", false, false), [279, 259, 123]);
        assert_eq!(t.encode("hello  world", false, false), [272, 259, 277]);
        assert_eq!(t.decode(&[272, 277], true), "hello world");
        assert_eq!(t.decode(&[198, 172], true), "é");
        assert_eq!(t.stop_tokens(), [2, 278]);
        let tmpl = hf_chat_template(&fixture("spm_config2.json", SPM_CONFIG)).unwrap();
        assert!(tmpl.is_some_and(|s| s.starts_with("{{ bos_token }}")));
    }

    #[test]
    fn added_token_lstrip_rstrip() {
        let mut j: serde_json::Value = serde_json::from_str(BYTELEVEL).unwrap();
        for a in j["added_tokens"].as_array_mut().unwrap() {
            if a["content"] == "<tool>" {
                a["lstrip"] = true.into();
                a["rstrip"] = true.into();
            }
        }
        let t = Tokenizer::from_hf_json(&fixture("strip.json", &j.to_string()), None).unwrap();
        // "a \t<tool>\n b" -> "a", <tool>, "b"
        assert_eq!(t.encode("a \t<tool>\n b", false, false), [97, 269, 98]);
    }

    #[test]
    fn errors_are_values() {
        let missing = std::env::temp_dir().join("definitely-missing-tokenizer.json");
        assert!(matches!(
            Tokenizer::from_hf_json(&missing, None),
            Err(TokenizerError::Io { .. })
        ));
        assert!(matches!(
            Tokenizer::from_hf_json(&fixture("bad.json", "{not json"), None),
            Err(TokenizerError::Json { .. })
        ));
        let wordpiece = r#"{"model": {"type": "WordPiece", "vocab": {"a": 0}}}"#;
        assert!(matches!(
            Tokenizer::from_hf_json(&fixture("wp.json", wordpiece), None),
            Err(TokenizerError::Hf(_))
        ));
        let lower = BYTELEVEL.replacen(
            "\"normalizer\": null",
            "\"normalizer\": {\"type\": \"Lowercase\"}",
            1,
        );
        assert!(matches!(
            Tokenizer::from_hf_json(&fixture("lower.json", &lower), None),
            Err(TokenizerError::Hf(_))
        ));
        let bad_merge = SPM.replacen("\"l l\"", "\"ll\"", 1);
        assert!(matches!(
            Tokenizer::from_hf_json(&fixture("merge.json", &bad_merge), None),
            Err(TokenizerError::Hf(_))
        ));
    }
}
