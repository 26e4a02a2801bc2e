//! Text <-> token ids: vocabulary, special-token splitting, GPT-2 byte-level BPE and
//! SentencePiece encoding, detokenization and incremental (streaming) detokenization.
//!
//! Owns: the in-memory vocabulary built from a neutral [`TokenizerSpec`] (filled by the caller
//! from GGUF `tokenizer.ggml.*` metadata) or from a Hugging Face `tokenizer.json`
//! ([`Tokenizer::from_hf_json`]); both front doors feed one implementation. Encoding and decoding
//! follow llama.cpp's `llama-vocab.cpp` rule for rule (special-token partition order, pre-tokenizer
//! regexes chosen by `tokenizer.ggml.pre`, BPE rank merging, SentencePiece score merging, byte
//! fallback, `token_to_piece`/`detokenize`), so ids equal llama.cpp's for the same GGUF.
//!
//! Must not: parse GGUF files, render chat templates (see `chat`), log, or panic on any input
//! coming from model files or users; malformed input is a [`TokenizerError`], unknown ids are
//! skipped when decoding.

mod bpe;
mod hf;
mod spm;

use std::collections::HashMap;
use std::path::PathBuf;

pub use hf::hf_chat_template;

/// Which tokenizer algorithm a vocabulary uses (`tokenizer.ggml.model`: `gpt2` or `llama`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VocabKind {
    /// GPT-2 style byte-level BPE (`tokenizer.ggml.model = "gpt2"`).
    Gpt2Bpe,
    /// SentencePiece style (`tokenizer.ggml.model = "llama"`): `▁` for spaces, `<0xXX>` byte tokens.
    SentencePiece,
}

/// Neutral description of a vocabulary, filled from GGUF metadata keys `tokenizer.ggml.*`.
#[derive(Clone, Debug)]
pub struct TokenizerSpec {
    pub kind: VocabKind,
    /// `tokenizer.ggml.tokens`
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type` (1 normal, 2 unknown, 3 control, 4 user defined, 5 unused,
    /// 6 byte); empty means every token is normal.
    pub token_types: Vec<i32>,
    /// `tokenizer.ggml.scores` (SentencePiece merge priority); empty means all zero.
    pub scores: Vec<f32>,
    /// `tokenizer.ggml.merges` (`"left right"`), BPE only.
    pub merges: Vec<String>,
    /// `tokenizer.ggml.pre`: selects the pre-tokenizer regexes (BPE only).
    pub pre: Option<String>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub eot: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    pub add_space_prefix: bool,
}

impl TokenizerSpec {
    /// llama.cpp's `add_bos` default when `tokenizer.ggml.add_bos_token` is absent: true for
    /// SentencePiece and for the BPE pre-tokenizers `llama3`-family, `tekken` and `chameleon`.
    pub fn default_add_bos(kind: VocabKind, pre: Option<&str>) -> bool {
        match kind {
            VocabKind::SentencePiece => true,
            VocabKind::Gpt2Bpe => bpe::PreConfig::for_name(pre.unwrap_or("")).add_bos,
        }
    }

    /// llama.cpp's `add_space_prefix` default when `tokenizer.ggml.add_space_prefix` is absent.
    pub fn default_add_space_prefix(kind: VocabKind) -> bool {
        kind == VocabKind::SentencePiece
    }
}

/// Why a tokenizer could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer vocabulary is empty")]
    EmptyVocab,
    #[error("tokenizer vocabulary has {0} tokens, more than a u32 id can address")]
    VocabTooLarge(usize),
    #[error("{what} has {got} entries but the vocabulary has {expected} tokens")]
    LengthMismatch {
        what: &'static str,
        got: usize,
        expected: usize,
    },
    #[error("token text {text:?} appears twice (ids {first} and {second})")]
    DuplicateToken {
        text: String,
        first: u32,
        second: u32,
    },
    #[error("pre-tokenizer {0:?} is not supported")]
    UnsupportedPre(String),
    #[error("invalid pre-tokenizer regex {pattern:?}: {message}")]
    Regex { pattern: String, message: String },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot parse {path} as JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("unsupported or malformed tokenizer.json: {0}")]
    Hf(String),
}

/// Per-token type, as in GGUF `tokenizer.ggml.token_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenType {
    Undefined,
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    fn from_gguf(v: i32) -> Self {
        match v {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Undefined,
        }
    }

    /// Control and unknown tokens are "special": hidden unless asked for, parsed only on request.
    fn is_special(self) -> bool {
        matches!(self, Self::Control | Self::Unknown)
    }
}

/// Token texts that end a turn (llama.cpp's EOG list).
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
];
/// Candidates for the EOT token when the metadata does not name one, in priority order.
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];
/// FIM pad / repo / file-separator tokens, which llama.cpp also treats as end of generation.
const FIM_EOG_TEXTS: &[&[&str]] = &[
    &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>"],
    &[
        "<|fim_repo|>",
        "<|repo_name|>",
        "<fim-repo>",
        "<REPO>",
        "<reponame>",
    ],
    &["<|file_sep|>"],
];
/// Other FIM tokens llama.cpp marks as control when found.
const FIM_OTHER_TEXTS: &[&[&str]] = &[
    &[
        "<|fim_prefix|>",
        "<fim-prefix>",
        "<fim_prefix>",
        "<｜fim▁begin｜>",
        "<PRE>",
        "▁<PRE>",
        "<|code_prefix|>",
    ],
    &[
        "<|fim_suffix|>",
        "<fim-suffix>",
        "<fim_suffix>",
        "<｜fim▁hole｜>",
        "<SUF>",
        "▁<SUF>",
        "<|code_suffix|>",
    ],
    &[
        "<|fim_middle|>",
        "<fim-middle>",
        "<fim_middle>",
        "<｜fim▁end｜>",
        "<MID>",
        "▁<MID>",
        "<|code_middle|>",
    ],
];

/// The engine-specific part of a vocabulary.
enum Engine {
    /// llama.cpp `llm_tokenizer_spm`: bigram merging by score of the merged token.
    Spm,
    /// Rank-based BPE (GPT-2 byte-level, or `▁`-normalized byte-fallback BPE from tokenizer.json).
    Bpe(Box<bpe::Bpe>),
}

/// What both front doors produce; [`Tokenizer::build`] turns it into a [`Tokenizer`].
struct Parts {
    kind: VocabKind,
    tokens: Vec<String>,
    types: Vec<TokenType>,
    scores: Vec<f32>,
    /// Per-token (lstrip, rstrip) for added tokens that ask for it (tokenizer.json only).
    strip: HashMap<u32, (bool, bool)>,
    model: PartsModel,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    eot: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    clean_spaces: bool,
}

enum PartsModel {
    Spm,
    Bpe {
        merges: Vec<(String, String)>,
        pre_regexes: Vec<String>,
        ignore_merges: bool,
        byte_fallback: bool,
    },
}

/// A loaded vocabulary; cheap to share (`&Tokenizer` is all encode/decode need).
pub struct Tokenizer {
    kind: VocabKind,
    tokens: Vec<String>,
    types: Vec<TokenType>,
    scores: Vec<f32>,
    strip: HashMap<u32, (bool, bool)>,
    token_to_id: HashMap<String, u32>,
    engine: Engine,
    /// Control / user-defined / unknown tokens, longest text first (llama.cpp partition order).
    special_cache: Vec<u32>,
    /// `token_to_piece(id, special = true)` for every token.
    pieces: Vec<Box<[u8]>>,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    eot: Option<u32>,
    stop: Vec<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    clean_spaces: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.kind)
            .field("vocab_size", &self.tokens.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("eot", &self.eot)
            .field("stop", &self.stop)
            .field("add_bos", &self.add_bos)
            .finish_non_exhaustive()
    }
}

/// A piece of input text after special-token partitioning.
#[derive(Clone, Copy, Debug)]
enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

impl Tokenizer {
    /// Builds a tokenizer from GGUF-style metadata.
    pub fn from_spec(spec: TokenizerSpec) -> Result<Self, TokenizerError> {
        let n = spec.tokens.len();
        if !spec.token_types.is_empty() && spec.token_types.len() != n {
            return Err(TokenizerError::LengthMismatch {
                what: "token_types",
                got: spec.token_types.len(),
                expected: n,
            });
        }
        if !spec.scores.is_empty() && spec.scores.len() != n {
            return Err(TokenizerError::LengthMismatch {
                what: "scores",
                got: spec.scores.len(),
                expected: n,
            });
        }
        let types = if spec.token_types.is_empty() {
            vec![TokenType::Normal; n]
        } else {
            spec.token_types
                .iter()
                .map(|&t| TokenType::from_gguf(t))
                .collect()
        };
        let (model, clean_spaces) = match spec.kind {
            VocabKind::SentencePiece => (PartsModel::Spm, false),
            VocabKind::Gpt2Bpe => {
                let pre = bpe::PreConfig::for_name(spec.pre.as_deref().unwrap_or(""));
                if pre.unsupported {
                    return Err(TokenizerError::UnsupportedPre(spec.pre.unwrap_or_default()));
                }
                let merges = spec
                    .merges
                    .iter()
                    .filter_map(|m| bpe::split_merge(m))
                    .collect();
                let model = PartsModel::Bpe {
                    merges,
                    pre_regexes: pre.regexes.iter().map(|s| s.to_string()).collect(),
                    ignore_merges: pre.ignore_merges,
                    byte_fallback: false,
                };
                (model, pre.clean_spaces)
            }
        };
        // llama.cpp's per-type defaults for ids missing from the metadata (SentencePiece only;
        // its BPE default of id 11 for BOS/EOS is a placeholder we deliberately do not copy).
        let (bos, eos, unk) = match spec.kind {
            VocabKind::SentencePiece => (
                spec.bos.or(Some(1)),
                spec.eos.or(Some(2)),
                spec.unk.or(Some(0)),
            ),
            VocabKind::Gpt2Bpe => (spec.bos, spec.eos, spec.unk),
        };
        Self::build(Parts {
            kind: spec.kind,
            tokens: spec.tokens,
            types,
            scores: spec.scores,
            strip: HashMap::new(),
            model,
            bos,
            eos,
            unk,
            eot: spec.eot,
            add_bos: spec.add_bos,
            add_eos: spec.add_eos,
            add_space_prefix: spec.add_space_prefix,
            clean_spaces,
        })
    }

    /// Builds a tokenizer from a Hugging Face `tokenizer.json` (BPE models: byte-level, or
    /// SentencePiece-converted with `▁` normalization and `<0xXX>` byte fallback), optionally
    /// reading `bos_token`, `eos_token`, `unk_token`, `add_bos_token`, `add_eos_token` and
    /// `clean_up_tokenization_spaces` from `tokenizer_config.json`.
    pub fn from_hf_json(
        tokenizer_json: &std::path::Path,
        tokenizer_config_json: Option<&std::path::Path>,
    ) -> Result<Self, TokenizerError> {
        let parts = hf::load(tokenizer_json, tokenizer_config_json)?;
        Self::build(parts)
    }

    fn build(mut p: Parts) -> Result<Self, TokenizerError> {
        let n = p.tokens.len();
        if n == 0 {
            return Err(TokenizerError::EmptyVocab);
        }
        if u32::try_from(n).is_err() {
            return Err(TokenizerError::VocabTooLarge(n));
        }
        if p.scores.is_empty() {
            p.scores = vec![0.0; n];
        }
        let mut token_to_id: HashMap<String, u32> = HashMap::with_capacity(n);
        for (i, text) in p.tokens.iter_mut().enumerate() {
            let id = i as u32;
            if text.is_empty() {
                *text = format!("[EMPTY_{id}]");
            }
            if let Some(&first) = token_to_id.get(text.as_str()) {
                return Err(TokenizerError::DuplicateToken {
                    text: text.clone(),
                    first,
                    second: id,
                });
            }
            token_to_id.insert(text.clone(), id);
        }
        let valid = |id: Option<u32>| id.filter(|&i| (i as usize) < n);
        let (bos, eos, unk) = (valid(p.bos), valid(p.eos), valid(p.unk));
        let mut eot = valid(p.eot);
        let mut types = p.types;

        // Auto-detect EOT / FIM tokens by text and force them to control type, as llama.cpp does.
        let lookup = |t: &str| token_to_id.get(t).copied();
        if eot.is_none() {
            eot = EOT_TEXTS.iter().find_map(|t| lookup(t));
            if let Some(id) = eot {
                types[id as usize] = TokenType::Control;
            }
        }
        for group in FIM_OTHER_TEXTS.iter().chain(FIM_EOG_TEXTS) {
            if let Some(id) = group.iter().find_map(|t| lookup(t)) {
                types[id as usize] = TokenType::Control;
            }
        }
        let mut stop: Vec<u32> = Vec::new();
        for group in FIM_EOG_TEXTS {
            stop.extend(group.iter().find_map(|t| lookup(t)));
        }
        for t in EOG_TEXTS {
            if let Some(id) = lookup(t) {
                stop.push(id);
                types[id as usize] = TokenType::Control;
            }
        }
        // gpt-oss: these must always render.
        for t in ["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"] {
            if let Some(id) = lookup(t) {
                types[id as usize] = TokenType::UserDefined;
            }
        }
        stop.extend(eos);
        stop.extend(eot);
        // "</s>" ends a turn in llama/mistral vocabularies even when it is not the EOS id.
        if let Some(id) = lookup("</s>").filter(|&id| types[id as usize] == TokenType::Control) {
            stop.push(id);
        }
        stop.sort_unstable();
        stop.dedup();
        // o200k_harmony: with <|return|> and <|call|> present, <|end|> is not end of generation.
        if let (Some(_), Some(_), Some(end)) =
            (lookup("<|return|>"), lookup("<|call|>"), lookup("<|end|>"))
        {
            stop.retain(|&id| id != end);
            types[end as usize] = TokenType::UserDefined;
        }

        let mut special_cache: Vec<u32> = (0..n as u32)
            .filter(|&id| {
                matches!(
                    types[id as usize],
                    TokenType::Control | TokenType::UserDefined | TokenType::Unknown
                )
            })
            .collect();
        special_cache.sort_by(|&a, &b| p.tokens[b as usize].len().cmp(&p.tokens[a as usize].len()));

        let engine = match p.model {
            PartsModel::Spm => Engine::Spm,
            PartsModel::Bpe {
                merges,
                pre_regexes,
                ignore_merges,
                byte_fallback,
            } => Engine::Bpe(Box::new(bpe::Bpe::new(
                &p.tokens,
                &token_to_id,
                &merges,
                &pre_regexes,
                ignore_merges,
                p.kind == VocabKind::Gpt2Bpe,
                byte_fallback,
            )?)),
        };

        let pieces = (0..n)
            .map(|i| make_piece(p.kind, &p.tokens[i], types[i]))
            .collect();

        Ok(Self {
            kind: p.kind,
            tokens: p.tokens,
            types,
            scores: p.scores,
            strip: p.strip,
            token_to_id,
            engine,
            special_cache,
            pieces,
            bos,
            eos,
            unk,
            eot,
            stop,
            add_bos: p.add_bos,
            add_eos: p.add_eos,
            add_space_prefix: p.add_space_prefix,
            clean_spaces: p.clean_spaces,
        })
    }

    /// Encodes `text`. `add_special` adds BOS/EOS when the vocabulary asks for them;
    /// `parse_special` lets control-token texts such as `<|im_start|>` in `text` become those
    /// tokens (user-defined tokens are always recognised, as in llama.cpp).
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let fragments = self.partition(text, parse_special);
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        let mut prev_special = true;
        for frag in fragments {
            match frag {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(t) => {
                    match self.kind {
                        VocabKind::Gpt2Bpe => self.encode_text(t, &mut out),
                        VocabKind::SentencePiece => {
                            let mut s = String::with_capacity(t.len() + 4);
                            if self.add_space_prefix && prev_special {
                                s.push(' ');
                            }
                            s.push_str(t);
                            let s = s.replace(' ', "\u{2581}");
                            self.encode_text(&s, &mut out);
                        }
                    }
                    prev_special = false;
                }
            }
        }
        if add_special && self.add_eos {
            out.extend(self.eos);
        }
        out
    }

    fn encode_text(&self, text: &str, out: &mut Vec<u32>) {
        match &self.engine {
            Engine::Spm => spm::encode(self, text, out),
            Engine::Bpe(b) => b.encode(self, text, out),
        }
    }

    /// llama.cpp `tokenizer_st_partition`: for each special token, longest first, split every
    /// text fragment at each occurrence.
    fn partition<'a>(&self, text: &'a str, parse_special: bool) -> Vec<Fragment<'a>> {
        if text.is_empty() {
            return Vec::new();
        }
        let mut frags = vec![Fragment::Text(text)];
        for &id in &self.special_cache {
            if !parse_special && self.types[id as usize].is_special() {
                continue;
            }
            let needle = self.tokens[id as usize].as_str();
            let (lstrip, rstrip) = self.strip.get(&id).copied().unwrap_or((false, false));
            if !frags
                .iter()
                .any(|f| matches!(f, Fragment::Text(t) if t.contains(needle)))
            {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len() + 2);
            for frag in frags {
                let Fragment::Text(mut rest) = frag else {
                    next.push(frag);
                    continue;
                };
                while let Some(pos) = rest.find(needle) {
                    let mut left = &rest[..pos];
                    if lstrip {
                        left = left.trim_end_matches(is_c_space);
                    }
                    if !left.is_empty() {
                        next.push(Fragment::Text(left));
                    }
                    next.push(Fragment::Token(id));
                    rest = &rest[pos + needle.len()..];
                    if rstrip {
                        rest = rest.trim_start_matches(is_c_space);
                    }
                }
                if !rest.is_empty() {
                    next.push(Fragment::Text(rest));
                }
            }
            frags = next;
        }
        frags
    }

    /// Decodes ids to text (llama.cpp `detokenize`). With `skip_special`, control/unknown tokens
    /// are omitted and a leading BOS / trailing EOS the vocabulary adds itself is dropped;
    /// otherwise control tokens render as their text. Ids outside the vocabulary are skipped.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        let mut ids = ids;
        let mut remove_space = self.add_space_prefix;
        if skip_special && self.add_bos && self.bos.is_some() && ids.first() == self.bos.as_ref() {
            remove_space = false;
            ids = &ids[1..];
        }
        if skip_special && self.add_eos && self.eos.is_some() && ids.last() == self.eos.as_ref() {
            ids = &ids[..ids.len() - 1];
        }
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids.iter().filter(|&&id| (id as usize) < self.tokens.len()) {
            let mut piece = self.piece(id, !skip_special);
            if remove_space && piece.first() == Some(&b' ') {
                piece = &piece[1..];
            }
            remove_space = false;
            bytes.extend_from_slice(piece);
        }
        if self.clean_spaces {
            clean_spaces(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Bytes a token contributes to the output with special tokens shown (llama.cpp
    /// `token_to_piece(.., special = true)`); may be a partial UTF-8 sequence. Empty for ids
    /// outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.pieces.get(id as usize).map_or(&[], |p| p)
    }

    /// Like [`Self::token_bytes`], but control and unknown tokens are empty unless `special`.
    pub fn piece(&self, id: u32, special: bool) -> &[u8] {
        match self.types.get(id as usize) {
            Some(t) if special || !t.is_special() => self.token_bytes(id),
            _ => &[],
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn kind(&self) -> VocabKind {
        self.kind
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    pub fn eot(&self) -> Option<u32> {
        self.eot
    }

    pub fn unk(&self) -> Option<u32> {
        self.unk
    }

    /// Whether `encode(.., add_special = true, ..)` prepends BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos && self.bos.is_some()
    }

    /// Sorted ids that end generation: EOS, EOT and end-of-turn control tokens such as
    /// `<|im_end|>`, `<|eot_id|>`, `<|end|>`, `</s>` (llama.cpp's EOG set).
    pub fn stop_tokens(&self) -> &[u32] {
        &self.stop
    }

    pub fn is_stop(&self, id: u32) -> bool {
        self.stop.binary_search(&id).is_ok()
    }

    pub fn token_to_id(&self, text: &str) -> Option<u32> {
        self.token_to_id.get(text).copied()
    }

    /// Raw vocabulary text of a token (byte-level or `▁` encoded, not decoded).
    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.types.get(id as usize).copied()
    }

    fn score(&self, id: u32) -> f32 {
        self.scores.get(id as usize).copied().unwrap_or(0.0)
    }

    /// llama.cpp `byte_to_token` for SentencePiece vocabularies: `<0xXX>`, else the raw byte.
    fn byte_token(&self, b: u8) -> Option<u32> {
        self.token_to_id(&format!("<0x{b:02X}>")).or_else(|| {
            if b.is_ascii() {
                self.token_to_id(char::from(b).encode_utf8(&mut [0; 4]))
            } else {
                None
            }
        })
    }
}

/// C `isspace` in the "C" locale (what llama.cpp's lstrip/rstrip use).
fn is_c_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0B' | '\x0C' | '\r')
}

/// `token_to_piece(id, special = true)` for one token.
fn make_piece(kind: VocabKind, text: &str, ty: TokenType) -> Box<[u8]> {
    match ty {
        TokenType::Control | TokenType::Unknown | TokenType::UserDefined => text.as_bytes().into(),
        TokenType::Normal => match kind {
            VocabKind::SentencePiece => text.replace('\u{2581}', " ").into_bytes().into(),
            VocabKind::Gpt2Bpe => bpe::decode_byte_level(text).into(),
        },
        TokenType::Byte if kind == VocabKind::SentencePiece => parse_byte_token(text)
            .map(|b| Box::from([b]))
            .unwrap_or_default(),
        _ => Box::default(),
    }
}

/// `<0xXX>` -> byte.
fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// llama.cpp's `clean_spaces` passes of `detokenize` (" ?" -> "?", " ' " -> "'", " 's" -> "'s",
/// ...), ported in place so that its quirks (the zeroed byte after " ' ") carry over.
fn clean_spaces(text: &mut Vec<u8>) {
    // first pass: " ?", " !", " .", " ,"
    let total1 = text.len();
    let mut total = total1.min(1);
    for i in 1..total1 {
        let x = text[i];
        if text[i - 1] == b' ' && matches!(x, b'?' | b'!' | b'.' | b',') {
            total -= 1;
        }
        text[total] = x;
        total += 1;
    }
    // second pass: strip a single apostrophe's surrounding spaces
    let total2 = total;
    total = total2.min(1);
    let mut i = 1;
    while i < total2 {
        let x = text[i];
        if x == b'\'' && i + 1 < total2 && text[i - 1] == b' ' && text[i + 1] == b' ' {
            total -= 1;
            i += 1;
            text[i] = 0;
        }
        text[total] = x;
        total += 1;
        i += 1;
    }
    // third pass: contractions " 's", " 'm", " 're", " 've"
    let total3 = total;
    total = total3.min(1);
    for i in 1..total3 {
        let x = text[i];
        if text[i - 1] == b' ' && x == b'\'' && i + 1 < total3 {
            let x1 = text[i + 1];
            if matches!(x1, b's' | b'm')
                || (i + 2 < total3 && matches!((x1, text[i + 2]), (b'r', b'e') | (b'v', b'e')))
            {
                total -= 1;
            }
        }
        text[total] = x;
        total += 1;
    }
    text.truncate(total);
}

/// Streaming detokenizer: feed ids one at a time, get back only completed UTF-8 text.
///
/// Holds back an incomplete multi-byte sequence split across tokens until it completes; invalid
/// bytes become U+FFFD. Follows [`Tokenizer::decode`]'s rules (first-token leading-space strip for
/// SentencePiece, skipped BOS), so the concatenation of all `push` results plus `finish` equals
/// `decode(ids, skip_special)` whenever the vocabulary does not `clean_spaces` and the last id is
/// not an auto-added EOS.
#[derive(Clone, Debug, Default)]
pub struct IncrementalDecoder {
    skip_special: bool,
    started: bool,
    pending: Vec<u8>,
}

impl IncrementalDecoder {
    pub fn new(skip_special: bool) -> Self {
        Self {
            skip_special,
            started: false,
            pending: Vec::new(),
        }
    }

    /// Appends one token; returns the text that became complete (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        if id as usize >= tok.vocab_size() {
            return String::new();
        }
        let mut piece = tok.piece(id, !self.skip_special);
        if !self.started {
            self.started = true;
            if self.skip_special && tok.add_bos && Some(id) == tok.bos {
                return String::new();
            }
            if tok.add_space_prefix && piece.first() == Some(&b' ') {
                piece = &piece[1..];
            }
        }
        self.pending.extend_from_slice(piece);
        self.take_complete()
    }

    /// Bytes held back waiting for the rest of a UTF-8 sequence.
    pub fn pending_bytes(&self) -> &[u8] {
        &self.pending
    }

    /// Flushes whatever is held back (an incomplete sequence becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }

    fn take_complete(&mut self) -> String {
        let mut out = String::new();
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = start + e.valid_up_to();
                    // from_utf8 just validated this range
                    out.push_str(&String::from_utf8_lossy(&self.pending[start..valid]));
                    match e.error_len() {
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            start = valid + bad;
                        }
                        None => {
                            start = valid;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_spaces_like_llama_cpp() {
        let run = |s: &str| {
            let mut v = s.as_bytes().to_vec();
            clean_spaces(&mut v);
            String::from_utf8(v).unwrap()
        };
        assert_eq!(
            run("Hello , world . Yes ! Why ?"),
            "Hello, world. Yes! Why?"
        );
        assert_eq!(
            run("I 'm sure they 're here , we 've won"),
            "I'm sure they're here, we've won"
        );
        assert_eq!(run("don 't and I 'll"), "don 't and I 'll");
        assert_eq!(run("a ' b"), "a'b");
        assert_eq!(run(" ' ' x"), "'' x");
        assert_eq!(run(""), "");
        assert_eq!(run(" "), " ");
    }

    #[test]
    fn spec_validation() {
        let spec = |tokens: Vec<&str>, types: Vec<i32>| TokenizerSpec {
            kind: VocabKind::Gpt2Bpe,
            tokens: tokens.into_iter().map(String::from).collect(),
            token_types: types,
            scores: Vec::new(),
            merges: vec!["a b".into(), "malformed".into()],
            pre: Some("gpt-2".into()),
            bos: Some(7),
            eos: None,
            unk: None,
            eot: None,
            add_bos: true,
            add_eos: false,
            add_space_prefix: false,
        };
        assert!(matches!(
            Tokenizer::from_spec(spec(vec![], vec![])),
            Err(TokenizerError::EmptyVocab)
        ));
        assert!(matches!(
            Tokenizer::from_spec(spec(vec!["a", "b"], vec![1])),
            Err(TokenizerError::LengthMismatch { .. })
        ));
        assert!(matches!(
            Tokenizer::from_spec(spec(vec!["a", "a"], vec![])),
            Err(TokenizerError::DuplicateToken { .. })
        ));
        let mut s = spec(vec!["a"], vec![]);
        s.pre = Some("kimi-k2".into());
        assert!(matches!(
            Tokenizer::from_spec(s),
            Err(TokenizerError::UnsupportedPre(_))
        ));
        // out-of-range BOS is ignored (llama.cpp keeps its default), merges to unknown
        // strings and malformed merge lines are tolerated
        let t = Tokenizer::from_spec(spec(vec!["a", "b", "ab"], vec![])).unwrap();
        assert_eq!((t.bos(), t.add_bos()), (None, false));
        assert_eq!(t.encode("ab", true, true), [2]);
        assert_eq!(t.encode("abc", true, true), [2]);
        assert!(TokenizerSpec::default_add_bos(
            VocabKind::Gpt2Bpe,
            Some("llama-bpe")
        ));
        assert!(!TokenizerSpec::default_add_bos(
            VocabKind::Gpt2Bpe,
            Some("smollm")
        ));
        assert!(TokenizerSpec::default_add_bos(
            VocabKind::SentencePiece,
            None
        ));
    }
}
