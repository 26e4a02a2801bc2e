//! Residency receipts (`x-residency-receipt`): a compact statement, signed with the
//! checkpoint key, of where a served request was processed and where its decision record
//! sits in the log, including a signed tree head that already covers it.
//!
//! Format: `base64url(JCS statement) "." base64url(Ed25519 signature)`, unpadded; the
//! signature is over `"sovereign-gateway/receipt/v1\n" || statement bytes` (the prefix
//! keeps a receipt signature from ever being valid as a checkpoint note signature).

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use serde::{Deserialize, Serialize};

use super::keys::{SigningKey, VerifierKey};
use super::record::{canonical_json, sorted_json};
use super::{Appended, checkpoint_text};

const DOMAIN: &[u8] = b"sovereign-gateway/receipt/v1\n";

/// What a receipt states. Fields in RFC 8785 key order (see `record::sorted_json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiptStatement {
    /// Base64 root of the tree at `checkpoint_size` (as in a C2SP checkpoint).
    pub checkpoint_root: String,
    /// The tree size right after the record was made durable; the log's checkpoints of
    /// this size or larger cover it, and `checkpoint_root` is that tree's root, signed
    /// here, so `sovctl audit consistency --old <size>` can prove later checkpoints
    /// extend it.
    pub checkpoint_size: u64,
    pub country: String,
    /// `<key name>+<hex key id>` of the signing key.
    pub key: String,
    /// Hex leaf hash of the request's decision record.
    pub leaf_hash: String,
    /// Log origin and sequence number of that record.
    pub origin: String,
    pub policy_hash: String,
    pub pool: String,
    pub request_id: String,
    pub seq: u64,
    pub state: String,
    pub v: u32,
}

impl ReceiptStatement {
    /// The C2SP checkpoint body this receipt commits to.
    pub fn checkpoint_body(&self) -> Option<String> {
        let root: [u8; 32] = B64.decode(&self.checkpoint_root).ok()?.try_into().ok()?;
        Some(checkpoint_text(&self.origin, self.checkpoint_size, &root))
    }
}

pub(crate) fn issue(
    key: &SigningKey,
    a: &Appended,
    request_id: &str,
    state: &str,
    pool: &str,
    country: &str,
    policy_hash: &str,
) -> String {
    let st = ReceiptStatement {
        v: 1,
        request_id: request_id.to_string(),
        state: state.to_string(),
        pool: pool.to_string(),
        country: country.to_string(),
        policy_hash: policy_hash.to_string(),
        origin: a.origin.clone(),
        seq: a.seq,
        leaf_hash: hex::encode(a.leaf_hash),
        checkpoint_size: a.covered_by_size,
        checkpoint_root: B64.encode(a.covered_by_root),
        key: format!("{}+{:08x}", key.name(), key.key_id()),
    };
    let mut payload = Vec::with_capacity(512);
    if sorted_json(&mut payload, &st).is_err() {
        return String::new();
    }
    let mut msg = DOMAIN.to_vec();
    msg.extend_from_slice(&payload);
    let sig = key.sign(&msg).unwrap_or_default();
    format!("{}.{}", B64URL.encode(&payload), B64URL.encode(sig))
}

/// Check a receipt's signature against any of `keys` and return its statement.
pub fn verify_receipt(receipt: &str, keys: &[VerifierKey]) -> Result<ReceiptStatement, String> {
    let (p, s) = receipt
        .trim()
        .split_once('.')
        .ok_or("not a receipt: expected <payload>.<signature>")?;
    let payload = B64URL
        .decode(p)
        .map_err(|e| format!("payload: bad base64url: {e}"))?;
    let sig = B64URL
        .decode(s)
        .map_err(|e| format!("signature: bad base64url: {e}"))?;
    let st: ReceiptStatement =
        serde_json::from_slice(&payload).map_err(|e| format!("payload: {e}"))?;
    if canonical_json(&st).map_err(|e| e.to_string())? != payload {
        return Err("payload is not canonical JSON".into());
    }
    let mut msg = DOMAIN.to_vec();
    msg.extend_from_slice(&payload);
    let key = keys
        .iter()
        .find(|k| format!("{}+{:08x}", k.name(), k.key_id()) == st.key)
        .ok_or_else(|| format!("signed by `{}`, not by a given key", st.key))?;
    if !key.verify_raw(&msg, &sig) {
        return Err("bad signature".into());
    }
    Ok(st)
}
