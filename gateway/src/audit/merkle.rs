//! The RFC 6962 / RFC 9162 Merkle tree over a log's records: leaf and node hashes, the
//! compact "frontier" the writer keeps (one hash per set bit of the tree size), and the
//! inclusion and consistency proofs the auditor tools produce.
//!
//! Proofs are *generated* here (the RFC 9162 §2.1.3/§2.1.4 recursions over a leaf store
//! that may start after a retention cut) and *checked* by `tlog_tiles` (Cloudflare's port
//! of Go's `golang.org/x/mod/sumdb/tlog`), so a generator bug cannot hide behind a
//! verifier written to match it.

use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];

/// The root of the empty tree: SHA-256 of the empty string.
pub const EMPTY_ROOT: Hash = [
    0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24,
    0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
];

/// `SHA-256(0x00 || data)`.
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(data);
    h.finalize().into()
}

/// `SHA-256(0x01 || left || right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The compact range `[0, size)`: the roots of the maximal perfect subtrees, left to
/// right (one per set bit of `size`, largest first). Enough to compute the root and to
/// keep appending; it is what retention keeps of the deleted prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    nodes: Vec<Hash>,
}

impl Frontier {
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuild from stored parts; `None` when the node count does not match the size.
    pub fn from_parts(size: u64, nodes: Vec<Hash>) -> Option<Self> {
        (nodes.len() == size.count_ones() as usize).then_some(Self { size, nodes })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn nodes(&self) -> &[Hash] {
        &self.nodes
    }

    pub fn push(&mut self, leaf: Hash) {
        let mut h = leaf;
        let mut s = self.size;
        while s & 1 == 1 {
            let left = self.nodes.pop().unwrap_or_default();
            h = node_hash(&left, &h);
            s >>= 1;
        }
        self.nodes.push(h);
        self.size += 1;
    }

    /// The tree root at `size` (RFC 6962 MTH).
    pub fn root(&self) -> Hash {
        let mut it = self.nodes.iter().rev();
        let Some(last) = it.next() else {
            return EMPTY_ROOT;
        };
        it.fold(*last, |acc, n| node_hash(n, &acc))
    }

    /// The `[start, end)` leaf range of each frontier node.
    fn ranges(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::with_capacity(self.nodes.len());
        let mut start = 0u64;
        for bit in (0..64).rev() {
            let w = 1u64 << bit;
            if self.size & w != 0 {
                out.push((start, start + w));
                start += w;
            }
        }
        out
    }
}

/// Why a proof could not be produced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("index {index} is not in a tree of size {size}")]
    OutOfRange { index: u64, size: u64 },
    #[error("sizes must satisfy 0 < old <= new <= {size} (got old {old}, new {new})")]
    BadSizes { old: u64, new: u64, size: u64 },
    #[error("leaves before {0} were deleted by retention; only the compact range remains")]
    Pruned(u64),
}

/// The leaf hashes of a log from `start` on, plus the frontier at `start` (the compact
/// range of what retention deleted). Answers any subtree hash that proofs about leaves
/// and tree sizes `>= start` need.
pub struct LeafStore {
    start: Frontier,
    leaves: Vec<Hash>,
}

impl LeafStore {
    pub fn new(start: Frontier) -> Self {
        Self {
            start,
            leaves: Vec::new(),
        }
    }

    pub fn push(&mut self, leaf: Hash) {
        self.leaves.push(leaf);
    }

    pub fn start(&self) -> u64 {
        self.start.size()
    }

    pub fn size(&self) -> u64 {
        self.start.size() + self.leaves.len() as u64
    }

    pub fn leaf(&self, i: u64) -> Option<Hash> {
        i.checked_sub(self.start())
            .and_then(|j| self.leaves.get(j as usize).copied())
    }

    /// MTH over leaves `[a, b)`.
    pub fn subtree(&self, a: u64, b: u64) -> Result<Hash, ProofError> {
        if b <= a {
            return Ok(EMPTY_ROOT);
        }
        let base = self.start();
        if a >= base {
            return Ok(mth(&self.leaves[(a - base) as usize..(b - base) as usize]));
        }
        if let Some(pos) = self.start.ranges().iter().position(|r| *r == (a, b)) {
            return Ok(self.start.nodes[pos]);
        }
        if b - a == 1 {
            return Err(ProofError::Pruned(base));
        }
        let k = split_point(b - a);
        Ok(node_hash(
            &self.subtree(a, a + k)?,
            &self.subtree(a + k, b)?,
        ))
    }

    pub fn root(&self, size: u64) -> Result<Hash, ProofError> {
        if size > self.size() {
            return Err(ProofError::BadSizes {
                old: size,
                new: size,
                size: self.size(),
            });
        }
        self.subtree(0, size)
    }

    /// RFC 9162 §2.1.3.1: the audit path of leaf `index` in the tree of `size` leaves,
    /// leaf to root.
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, ProofError> {
        if index >= size || size > self.size() {
            return Err(ProofError::OutOfRange { index, size });
        }
        if index < self.start() {
            return Err(ProofError::Pruned(self.start()));
        }
        let mut out = Vec::new();
        self.path(index, 0, size, &mut out)?;
        Ok(out)
    }

    fn path(&self, m: u64, a: u64, b: u64, out: &mut Vec<Hash>) -> Result<(), ProofError> {
        if b - a <= 1 {
            return Ok(());
        }
        let k = split_point(b - a);
        if m < a + k {
            self.path(m, a, a + k, out)?;
            out.push(self.subtree(a + k, b)?);
        } else {
            self.path(m, a + k, b, out)?;
            out.push(self.subtree(a, a + k)?);
        }
        Ok(())
    }

    /// RFC 9162 §2.1.4.1: the consistency proof from the tree of `old` leaves to the tree
    /// of `new` leaves.
    pub fn consistency_proof(&self, old: u64, new: u64) -> Result<Vec<Hash>, ProofError> {
        if old == 0 || old > new || new > self.size() {
            return Err(ProofError::BadSizes {
                old,
                new,
                size: self.size(),
            });
        }
        if old < self.start() {
            return Err(ProofError::Pruned(self.start()));
        }
        let mut out = Vec::new();
        if old < new {
            self.subproof(old, 0, new, true, &mut out)?;
        }
        Ok(out)
    }

    fn subproof(
        &self,
        m: u64,
        a: u64,
        b: u64,
        complete: bool,
        out: &mut Vec<Hash>,
    ) -> Result<(), ProofError> {
        let n = b - a;
        if m == n {
            if !complete {
                out.push(self.subtree(a, b)?);
            }
            return Ok(());
        }
        let k = split_point(n);
        if m <= k {
            self.subproof(m, a, a + k, complete, out)?;
            out.push(self.subtree(a + k, b)?);
        } else {
            self.subproof(m - k, a + k, b, false, out)?;
            out.push(self.subtree(a, a + k)?);
        }
        Ok(())
    }
}

/// The largest power of two strictly less than `n` (`n >= 2`).
fn split_point(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1u64 << (63 - (n - 1).leading_zeros())
}

/// MTH over a slice of leaf hashes (iterative, bottom-up; same result as the recursion).
pub fn mth(leaves: &[Hash]) -> Hash {
    let mut f = Frontier::new();
    for l in leaves {
        f.push(*l);
    }
    f.root()
}

/// Checks an inclusion proof with `tlog_tiles` (a port of Go's sumdb/tlog).
pub fn check_inclusion(
    proof: &[Hash],
    size: u64,
    root: &Hash,
    index: u64,
    leaf: &Hash,
) -> Result<(), String> {
    let p: Vec<tlog_tiles::Hash> = proof.iter().map(|h| tlog_tiles::Hash(*h)).collect();
    let (root, leaf) = (tlog_tiles::Hash(*root), tlog_tiles::Hash(*leaf));
    // The crate documents panics only for internal math errors; a malformed proof from a
    // file must never take the auditor's process down, so contain it anyway.
    std::panic::catch_unwind(|| tlog_tiles::check_record(&p, size, root, index, leaf))
        .map_err(|_| "proof check panicked".to_string())?
        .map_err(|e| format!("inclusion proof does not verify: {e}"))
}

/// Checks a consistency proof with `tlog_tiles`.
pub fn check_consistency(
    proof: &[Hash],
    new_size: u64,
    new_root: &Hash,
    old_size: u64,
    old_root: &Hash,
) -> Result<(), String> {
    let p: Vec<tlog_tiles::Hash> = proof.iter().map(|h| tlog_tiles::Hash(*h)).collect();
    let (nr, or) = (tlog_tiles::Hash(*new_root), tlog_tiles::Hash(*old_root));
    std::panic::catch_unwind(|| tlog_tiles::check_tree(&p, new_size, nr, old_size, or))
        .map_err(|_| "proof check panicked".to_string())?
        .map_err(|e| format!("consistency proof does not verify: {e}"))
}
