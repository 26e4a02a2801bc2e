//! One audit record: what the gateway decided for a request and how it ended, never the
//! prompt or completion text (only their HMACs under the member state's key). A record is
//! stored as one line of RFC 8785 canonical JSON; its Merkle leaf is
//! `SHA-256(0x00 || line)`, so any JCS implementation reproduces it.

use serde::{Deserialize, Serialize};

use crate::domain::Classification;

use super::AuditError;

/// Which of a request's records this is, or a retention deletion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Written and durable before any byte goes to a worker (also for denied requests).
    #[default]
    Decision,
    /// How the request ended: outcome, token counts, latency, response HMAC.
    Completion,
    /// Retention deleted old segments; names the range and the tree state kept.
    Retention,
}

impl std::str::FromStr for Phase {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "decision" => Ok(Self::Decision),
            "completion" => Ok(Self::Completion),
            "retention" => Ok(Self::Retention),
            o => Err(format!(
                "unknown phase `{o}` (decision, completion, retention)"
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Allow,
    Deny,
}

impl std::str::FromStr for Decision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "allow" => Ok(Self::Allow),
            "deny" => Ok(Self::Deny),
            o => Err(format!("unknown decision `{o}` (allow, deny)")),
        }
    }
}

/// One candidate pool as the policy saw it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Candidate {
    pub allowed: bool,
    pub country: String,
    pub policy_ids: Vec<String>,
    pub pool: String,
    pub reasons: Vec<String>,
}

/// How a request ended: HTTP status and the stable reason code (`ok` when served).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outcome {
    pub code: String,
    pub status: u16,
}

/// What a retention deletion removed and what it kept so the log still verifies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// First deleted sequence number.
    pub deleted_from: u64,
    /// One past the last deleted sequence number (the new start of the log).
    pub deleted_to: u64,
    /// Compact range of `[0, deleted_to)`: hex subtree roots, largest first.
    pub frontier: Vec<String>,
    /// Hex tree root at size `deleted_to`.
    pub root: String,
    /// The deleted segment files.
    pub segments: Vec<String>,
}

/// What the gateway hands to [`super::AuditLog::append`]: every field except the log
/// position and time, which the log assigns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordInput {
    pub phase: Phase,
    pub request_id: String,
    /// Member state (country code) whose log receives the record.
    pub state: String,
    pub ministry: Option<String>,
    /// HMAC (hex) of the caller's identity (e.g. the token subject) under the state's key.
    pub caller_hmac: Option<String>,
    pub classification: Option<Classification>,
    pub model_requested: Option<String>,
    pub model_served: Option<String>,
    pub decision: Option<Decision>,
    pub pool: Option<String>,
    pub pool_country: Option<String>,
    pub candidates: Vec<Candidate>,
    pub reason_codes: Vec<String>,
    pub policy_hash: Option<String>,
    /// HMAC (hex) of [`prompt_digest_input_chat`] / [`prompt_digest_input_text`].
    pub prompt_hmac: Option<String>,
    /// HMAC (hex) of the completion text as returned (concatenated for streams).
    pub response_hmac: Option<String>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub latency_ms: Option<u64>,
    pub outcome: Option<Outcome>,
    pub retention: Option<Retention>,
}

/// A record as stored: one canonical JSON line. Absent optional fields are omitted.
///
/// The fields of this struct and of every struct in it are declared in RFC 8785 key order
/// (byte order of the ASCII names) and hold no floats, so plain `serde_json` output *is*
/// the canonical form ([`Record::write_canonical`]; `canonical_form_matches_jcs` checks it
/// against a JCS implementation on random records). Keep new fields in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller_hmac: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub candidates: Vec<Candidate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classification: Option<Classification>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ministry: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_requested: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_served: Option<String>,
    pub origin: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    pub phase: Phase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_country: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_hmac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reason_codes: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub request_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_hmac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,
    pub seq: u64,
    pub state: String,
    /// RFC 3339 UTC with milliseconds, e.g. `2025-05-01T12:00:00.123Z`.
    pub time: String,
}

impl Record {
    pub fn from_input(input: RecordInput, origin: &str, seq: u64, time: String) -> Self {
        Self {
            origin: origin.to_string(),
            seq,
            time,
            phase: input.phase,
            request_id: input.request_id,
            state: input.state,
            ministry: input.ministry,
            caller_hmac: input.caller_hmac,
            classification: input.classification,
            model_requested: input.model_requested,
            model_served: input.model_served,
            decision: input.decision,
            pool: input.pool,
            pool_country: input.pool_country,
            candidates: input.candidates,
            reason_codes: input.reason_codes,
            policy_hash: input.policy_hash,
            prompt_hmac: input.prompt_hmac,
            response_hmac: input.response_hmac,
            prompt_tokens: input.prompt_tokens,
            completion_tokens: input.completion_tokens,
            latency_ms: input.latency_ms,
            outcome: input.outcome,
            retention: input.retention,
        }
    }

    /// The record's canonical (RFC 8785) bytes: the stored line without its newline.
    pub fn canonical(&self) -> Result<Vec<u8>, AuditError> {
        let mut out = Vec::with_capacity(512);
        self.write_canonical(&mut out)?;
        Ok(out)
    }

    /// Appends the canonical bytes to `out` (no allocation of its own).
    pub fn write_canonical(&self, out: &mut Vec<u8>) -> Result<(), AuditError> {
        sorted_json(out, self)
    }

    /// Every reason code the record mentions (its own, its candidates', its outcome's).
    pub fn mentions_reason(&self, code: &str) -> bool {
        self.reason_codes.iter().any(|r| r == code)
            || self
                .candidates
                .iter()
                .any(|c| c.reasons.iter().any(|r| r == code))
            || self.outcome.as_ref().is_some_and(|o| o.code == code)
    }
}

/// RFC 8785 canonical JSON of any serializable value (`serde_json_canonicalizer`).
pub fn canonical_json<T: Serialize>(v: &T) -> Result<Vec<u8>, AuditError> {
    serde_json_canonicalizer::to_vec(v).map_err(|e| AuditError::Encode(e.to_string()))
}

/// Canonical JSON of a value whose structs declare their fields in RFC 8785 key order and
/// hold no floats or maps: for such values `serde_json`'s compact output is already
/// canonical (same string escapes, integers as digits), without JCS's detour through a
/// sorted `Value` tree. Callers are tested against [`canonical_json`].
pub(crate) fn sorted_json<T: Serialize>(out: &mut Vec<u8>, v: &T) -> Result<(), AuditError> {
    serde_json::to_writer(out, v).map_err(|e| AuditError::Encode(e.to_string()))
}

/// The bytes the gateway HMACs for a chat request's `prompt_hmac`: the messages as
/// canonical JSON `[{"content":...,"role":...},...]` (role and text content only).
pub fn prompt_digest_input_chat<R: AsRef<str>, C: AsRef<str>>(messages: &[(R, C)]) -> Vec<u8> {
    // Fields in JCS key order (see `sorted_json`).
    #[derive(Serialize)]
    struct Msg<'a> {
        content: &'a str,
        role: &'a str,
    }
    let msgs: Vec<Msg<'_>> = messages
        .iter()
        .map(|(r, c)| Msg {
            role: r.as_ref(),
            content: c.as_ref(),
        })
        .collect();
    // Serializing plain strings cannot fail.
    let mut out = Vec::new();
    let _ = sorted_json(&mut out, &msgs);
    out
}

/// The bytes the gateway HMACs for a completions request's `prompt_hmac`: the prompt as
/// a canonical JSON string.
pub fn prompt_digest_input_text(prompt: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(prompt.len() + 2);
    let _ = sorted_json(&mut out, &prompt);
    out
}
