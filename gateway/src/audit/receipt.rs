//! Residency receipts (`x-residency-receipt`): a compact statement, signed with the
//! checkpoint key, of where a served request was processed and where its decision record
//! sits in the log, including a signed tree head that already covers it.
//!
//! Two forms, all parts base64url without padding:
//! - single: `statement "." signature`, the Ed25519 signature over
//!   `"sovereign-gateway/receipt/v1\n" || statement bytes`;
//! - batched: `statement "." batch "." signature`. Receipts issued together share one
//!   signature over `"sovereign-gateway/receipt-batch/v1\n" || u64be(size) || root`,
//!   where `root` is the RFC 6962 Merkle tree hash over the batch's statements (leaf =
//!   `SHA-256(0x00 || statement)`), and `batch` is `u32be(index) || u32be(size) || root ||
//!   inclusion path` (32-byte hashes, leaf to root). One Ed25519 signature then serves every
//!   request finishing its decision at the same time (issue 3's throughput target).
//!
//! The domain prefixes keep a receipt signature from ever being valid as a checkpoint note
//! signature, or a batch signature as a single one.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use serde::{Deserialize, Serialize};

use super::keys::{SigningKey, VerifierKey};
use super::merkle::{Hash, check_inclusion, leaf_hash, node_hash};
use super::record::{canonical_json, sorted_json};
use super::{Appended, checkpoint_text};

const DOMAIN: &[u8] = b"sovereign-gateway/receipt/v1\n";
const BATCH_DOMAIN: &[u8] = b"sovereign-gateway/receipt-batch/v1\n";
/// Most receipts sharing one signature (bounds the path at 8 hashes).
pub(crate) const MAX_BATCH: usize = 256;

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

/// What a receipt is about, besides the log position: the request and where it ran.
#[derive(Debug, Clone, Copy)]
pub struct ReceiptSubject<'a> {
    pub request_id: &'a str,
    pub state: &'a str,
    pub pool: &'a str,
    pub country: &'a str,
    pub policy_hash: &'a str,
}

/// The canonical statement bytes of a receipt.
pub(crate) fn statement(key: &SigningKey, a: &Appended, s: &ReceiptSubject<'_>) -> Vec<u8> {
    /// [`ReceiptStatement`] borrowed (same fields, same order: serialized on every
    /// served request).
    #[derive(Serialize)]
    struct Borrowed<'a> {
        checkpoint_root: &'a str,
        checkpoint_size: u64,
        country: &'a str,
        key: &'a str,
        leaf_hash: &'a str,
        origin: &'a str,
        policy_hash: &'a str,
        pool: &'a str,
        request_id: &'a str,
        seq: u64,
        state: &'a str,
        v: u32,
    }
    let root = B64.encode(a.covered_by_root);
    let leaf = crate::hexstr(a.leaf_hash);
    let st = Borrowed {
        v: 1,
        request_id: s.request_id,
        state: s.state,
        pool: s.pool,
        country: s.country,
        policy_hash: s.policy_hash,
        origin: &a.origin,
        seq: a.seq,
        leaf_hash: &leaf,
        checkpoint_size: a.covered_by_size,
        checkpoint_root: &root,
        key: key.receipt_key_id(),
    };
    let mut payload = Vec::with_capacity(512);
    // Plain strings and integers: serializing cannot fail.
    let _ = sorted_json(&mut payload, &st);
    payload
}

/// A single receipt: `statement "." signature`.
pub(crate) fn sign_one(key: &SigningKey, payload: &[u8]) -> String {
    let mut msg = Vec::with_capacity(DOMAIN.len() + payload.len());
    msg.extend_from_slice(DOMAIN);
    msg.extend_from_slice(payload);
    let sig = key.sign(&msg).unwrap_or_default();
    format!("{}.{}", B64URL.encode(payload), B64URL.encode(sig))
}

/// Receipts for `payloads` (at most [`MAX_BATCH`]) under one signature, in order. A batch
/// of one is a single receipt.
pub(crate) fn sign_batch(key: &SigningKey, payloads: &[&[u8]]) -> Vec<String> {
    match payloads {
        [] => Vec::new(),
        [one] => vec![sign_one(key, one)],
        _ => {
            let leaves: Vec<Hash> = payloads.iter().map(|p| leaf_hash(p)).collect();
            let mut paths = vec![Vec::new(); leaves.len()];
            let root = tree_paths(&leaves, &mut paths);
            let size = leaves.len() as u32;
            let sig = key
                .sign(&batch_message(u64::from(size), &root))
                .unwrap_or_default();
            let sig = B64URL.encode(sig);
            payloads
                .iter()
                .zip(paths)
                .enumerate()
                .map(|(i, (p, path))| {
                    let mut batch = Vec::with_capacity(40 + 32 * path.len());
                    batch.extend_from_slice(&(i as u32).to_be_bytes());
                    batch.extend_from_slice(&size.to_be_bytes());
                    batch.extend_from_slice(&root);
                    for h in &path {
                        batch.extend_from_slice(h);
                    }
                    format!("{}.{}.{sig}", B64URL.encode(p), B64URL.encode(batch))
                })
                .collect()
        }
    }
}

fn batch_message(size: u64, root: &Hash) -> Vec<u8> {
    let mut msg = Vec::with_capacity(BATCH_DOMAIN.len() + 40);
    msg.extend_from_slice(BATCH_DOMAIN);
    msg.extend_from_slice(&size.to_be_bytes());
    msg.extend_from_slice(root);
    msg
}

/// RFC 6962 tree hash of `leaves`, appending to each leaf's path the sibling hashes from
/// the leaf up (the audit path of RFC 6962 section 2.1.1). `n - 1` node hashes in all.
fn tree_paths(leaves: &[Hash], paths: &mut [Vec<Hash>]) -> Hash {
    if leaves.len() == 1 {
        return leaves[0];
    }
    let k = leaves.len().next_power_of_two() / 2;
    let (lp, rp) = paths.split_at_mut(k);
    let l = tree_paths(&leaves[..k], lp);
    let r = tree_paths(&leaves[k..], rp);
    lp.iter_mut().for_each(|p| p.push(r));
    rp.iter_mut().for_each(|p| p.push(l));
    node_hash(&l, &r)
}

/// Check a receipt's signature against any of `keys` and return its statement.
pub fn verify_receipt(receipt: &str, keys: &[VerifierKey]) -> Result<ReceiptStatement, String> {
    let parts: Vec<&str> = receipt.trim().split('.').collect();
    let (p, batch, s) = match parts[..] {
        [p, s] => (p, None, s),
        [p, b, s] => (p, Some(b), s),
        _ => {
            return Err("not a receipt: expected <statement>.<signature> or \
                 <statement>.<batch>.<signature>"
                .into());
        }
    };
    let payload = B64URL
        .decode(p)
        .map_err(|e| format!("statement: bad base64url: {e}"))?;
    let sig = B64URL
        .decode(s)
        .map_err(|e| format!("signature: bad base64url: {e}"))?;
    let st: ReceiptStatement =
        serde_json::from_slice(&payload).map_err(|e| format!("statement: {e}"))?;
    if canonical_json(&st).map_err(|e| e.to_string())? != payload {
        return Err("statement is not canonical JSON".into());
    }
    let msg = match batch {
        None => {
            let mut msg = DOMAIN.to_vec();
            msg.extend_from_slice(&payload);
            msg
        }
        Some(b) => {
            let b = B64URL
                .decode(b)
                .map_err(|e| format!("batch: bad base64url: {e}"))?;
            let (index, size, root, path) = parse_batch(&b)?;
            check_inclusion(&path, size, &root, index, &leaf_hash(&payload))
                .map_err(|e| format!("batch: {e}"))?;
            batch_message(size, &root)
        }
    };
    let key = keys
        .iter()
        .find(|k| format!("{}+{:08x}", k.name(), k.key_id()) == st.key)
        .ok_or_else(|| format!("signed by `{}`, not by a given key", st.key))?;
    if !key.verify_raw(&msg, &sig) {
        return Err("bad signature".into());
    }
    Ok(st)
}

/// `u32be(index) || u32be(size) || root || path` of a batched receipt.
fn parse_batch(b: &[u8]) -> Result<(u64, u64, Hash, Vec<Hash>), String> {
    if b.len() < 40 || !(b.len() - 40).is_multiple_of(32) {
        return Err(format!(
            "batch: {} bytes; expected 40 + 32 per path hash",
            b.len()
        ));
    }
    let word = |i: usize| u64::from(u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]));
    let (index, size) = (word(0), word(4));
    if index >= size {
        return Err(format!("batch: index {index} not below size {size}"));
    }
    let hash = |c: &[u8]| -> Hash {
        let mut h = [0u8; 32];
        h.copy_from_slice(c);
        h
    };
    let root = hash(&b[8..40]);
    let path = b[40..].chunks_exact(32).map(hash).collect();
    Ok((index, size, root, path))
}
