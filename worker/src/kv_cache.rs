//! Block bookkeeping for the paged KV cache: [`BlockManager`].
//!
//! Owns: which physical KV block belongs to which sequence (the block tables), per-block
//! reference counts, the LRU free list, and the automatic prefix cache (chained hashes of
//! full blocks -> block id, with hit statistics). It is the *only* owner of KV blocks:
//! nobody else allocates, shares or frees them.
//!
//! Must not: touch KV memory, run a model, or make scheduling decisions (which sequence runs,
//! when to preempt). It answers "is there room?" and records what the caller says was
//! computed; callers decide everything else. All failures are returned as [`KvError`] values
//! and leave the manager unchanged.

use std::collections::HashMap;

/// Index of a physical KV block.
pub type BlockId = u32;
/// Identifier of a sequence (request).
pub type SeqId = u64;
/// Chained content hash of a full block: `hash(parent block hash, the block's token ids)`.
pub type BlockHash = u64;

/// Result of a successful [`BlockManager::allocate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    /// Tokens found in the prefix cache (non-zero only on a sequence's first allocation).
    /// Positions `0..cached_tokens` are already computed.
    pub cached_tokens: usize,
    /// Tokens the caller must compute now, starting at `max(num_computed, cached_tokens)`.
    /// Equals the requested `num_new_tokens`, except on a first allocation with a prefix hit,
    /// where it is capped so that `cached_tokens + num_new_tokens <= tokens.len()`.
    pub num_new_tokens: usize,
}

/// Prefix-cache statistics, counted in tokens over first allocations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// Prompt tokens looked up in the prefix cache.
    pub queries: u64,
    /// Of those, tokens served from the cache.
    pub hits: u64,
}

impl PrefixCacheStats {
    /// `hits / queries`, or 0 when nothing was queried.
    pub fn hit_rate(&self) -> f64 {
        if self.queries == 0 {
            0.0
        } else {
            self.hits as f64 / self.queries as f64
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    #[error("invalid KV cache configuration: {0}")]
    InvalidConfig(String),
    #[error("out of KV cache blocks: {needed} needed, {free} free")]
    OutOfBlocks { needed: usize, free: usize },
    #[error(
        "sequence {seq}: {num_computed} computed + {num_new_tokens} new tokens exceeds its \
         {num_tokens} known tokens"
    )]
    TokenRangeOutOfBounds {
        seq: SeqId,
        num_computed: usize,
        num_new_tokens: usize,
        num_tokens: usize,
    },
    #[error("sequence {seq} has no blocks but claims {num_computed} computed tokens")]
    NoBlockTable { seq: SeqId, num_computed: usize },
}

/// Owner of all KV blocks: block tables, reference counts, LRU free list and prefix cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockManager {
    block_size: usize,
    blocks: Vec<BlockMeta>,
    free: FreeList,
    /// Prefix cache: hash -> the block carrying it. A block is in here iff its `hash` is set.
    cached: HashMap<BlockHash, BlockId>,
    tables: HashMap<SeqId, SeqBlocks>,
    stats: PrefixCacheStats,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct BlockMeta {
    ref_count: usize,
    /// Set while the block is registered in the prefix cache.
    hash: Option<BlockHash>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct SeqBlocks {
    blocks: Vec<BlockId>,
    /// Chained hashes of this sequence's leading full, computed blocks (whether or not the
    /// block itself is the one registered in the cache). Next block's parent is the last one.
    hashes: Vec<BlockHash>,
}

/// Parent hash of a sequence's first block.
const ROOT_HASH: BlockHash = 0;

impl BlockManager {
    /// A manager for `num_blocks` blocks of `block_size` tokens each, all free.
    pub fn new(num_blocks: usize, block_size: usize) -> Result<Self, KvError> {
        if block_size == 0 {
            return Err(KvError::InvalidConfig(
                "block_size must be at least 1".into(),
            ));
        }
        if num_blocks == 0 || num_blocks >= NIL as usize {
            return Err(KvError::InvalidConfig(format!(
                "num_blocks must be in 1..{NIL}, got {num_blocks}"
            )));
        }
        Ok(Self {
            block_size,
            blocks: vec![BlockMeta::default(); num_blocks],
            free: FreeList::with_all(num_blocks),
            cached: HashMap::new(),
            tables: HashMap::new(),
            stats: PrefixCacheStats::default(),
        })
    }

    /// Makes room in `seq`'s blocks for positions up to `num_computed + num_new_tokens`.
    ///
    /// `tokens` are all of the sequence's known token ids; the first `num_computed` are
    /// already in its blocks. On the first call for `seq` (it has no blocks; `num_computed`
    /// must be 0) the longest chain of cached full blocks matching a prefix of `tokens` is
    /// shared instead of recomputed, capped so at least the last token is computed; room is
    /// then made for `num_new_tokens` after that prefix (see [`Allocation`]).
    ///
    /// All or nothing: on error nothing changes.
    pub fn allocate(
        &mut self,
        seq: SeqId,
        tokens: &[u32],
        num_computed: usize,
        num_new_tokens: usize,
    ) -> Result<Allocation, KvError> {
        let out_of_bounds = KvError::TokenRangeOutOfBounds {
            seq,
            num_computed,
            num_new_tokens,
            num_tokens: tokens.len(),
        };
        match num_computed.checked_add(num_new_tokens) {
            Some(end) if end <= tokens.len() => {}
            _ => return Err(out_of_bounds),
        }
        let existing = self.tables.get(&seq);
        let first = existing.is_none();
        if first && num_computed > 0 {
            return Err(KvError::NoBlockTable { seq, num_computed });
        }
        let hits = match existing {
            None => self.lookup_prefix(tokens),
            Some(_) => Vec::new(),
        };
        let cached_tokens = hits.len() * self.block_size;
        let computed = num_computed.max(cached_tokens);
        let new_tokens = num_new_tokens.min(tokens.len() - computed);

        let have = existing.map_or(hits.len(), |t| t.blocks.len());
        let fresh = (computed + new_tokens)
            .div_ceil(self.block_size)
            .saturating_sub(have);
        // Cached blocks nobody references sit in the free list; sharing them takes them out.
        let revived = hits
            .iter()
            .filter(|(b, _)| self.blocks[*b as usize].ref_count == 0)
            .count();
        let needed = fresh + revived;
        if needed > self.free.len {
            return Err(KvError::OutOfBlocks {
                needed,
                free: self.free.len,
            });
        }

        // Commit point: everything below succeeds.
        let table = self.tables.entry(seq).or_default();
        for &(block, hash) in &hits {
            let meta = &mut self.blocks[block as usize];
            if meta.ref_count == 0 {
                self.free.remove(block);
            }
            meta.ref_count += 1;
            table.blocks.push(block);
            table.hashes.push(hash);
        }
        for _ in 0..fresh {
            let Some(block) = self.free.pop_front() else {
                break; // unreachable: `needed <= free.len` was checked above
            };
            let meta = &mut self.blocks[block as usize];
            if let Some(hash) = meta.hash.take() {
                // Evict: the block is reused for other content.
                self.cached.remove(&hash);
            }
            meta.ref_count = 1;
            table.blocks.push(block);
        }
        if first {
            self.stats.queries += tokens.len() as u64;
            self.stats.hits += cached_tokens as u64;
        }
        Ok(Allocation {
            cached_tokens,
            num_new_tokens: new_tokens,
        })
    }

    /// Registers prefix-cache hashes for `seq`'s blocks that became full now that its first
    /// `num_computed` tokens have KV written. A hash already carried by another block is left
    /// alone (this block then simply stays uncached). Unknown sequences are ignored.
    pub fn commit_full_blocks(&mut self, seq: SeqId, tokens: &[u32], num_computed: usize) {
        let bs = self.block_size;
        let Some(table) = self.tables.get_mut(&seq) else {
            return;
        };
        let full = (num_computed.min(tokens.len()) / bs).min(table.blocks.len());
        while table.hashes.len() < full {
            let i = table.hashes.len();
            let parent = table.hashes.last().copied().unwrap_or(ROOT_HASH);
            let hash = chain_hash(parent, &tokens[i * bs..(i + 1) * bs]);
            table.hashes.push(hash);
            let block = table.blocks[i];
            let meta = &mut self.blocks[block as usize];
            if meta.hash.is_none() && !self.cached.contains_key(&hash) {
                meta.hash = Some(hash);
                self.cached.insert(hash, block);
            }
        }
    }

    /// Drops `seq`'s references and its block table. Blocks whose count reaches zero go to
    /// the free list's tail, last block first, so a sequence's tail is evicted before its
    /// (more shareable) head. Cached blocks stay in the prefix cache until reused.
    /// Unknown sequences are ignored (freeing is idempotent).
    pub fn free(&mut self, seq: SeqId) {
        let Some(table) = self.tables.remove(&seq) else {
            return;
        };
        for &block in table.blocks.iter().rev() {
            let meta = &mut self.blocks[block as usize];
            meta.ref_count = meta.ref_count.saturating_sub(1);
            if meta.ref_count == 0 {
                self.free.push_back(block);
            }
        }
    }

    /// Tokens of `tokens` a first allocation would take from the prefix cache right now.
    /// A pure query: no references are taken and no statistics are counted.
    pub fn cached_prefix_len(&self, tokens: &[u32]) -> usize {
        self.lookup_prefix(tokens).len() * self.block_size
    }

    pub fn block_table(&self, seq: SeqId) -> Option<&[BlockId]> {
        self.tables.get(&seq).map(|t| t.blocks.as_slice())
    }

    /// Blocks with no references (including cached ones that may be evicted).
    pub fn num_free_blocks(&self) -> usize {
        self.free.len
    }

    /// Blocks referenced by at least one sequence.
    pub fn num_used_blocks(&self) -> usize {
        self.blocks.len() - self.free.len
    }

    /// Blocks registered in the prefix cache (referenced or not).
    pub fn num_cached_blocks(&self) -> usize {
        self.cached.len()
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Number of sequences currently holding blocks.
    pub fn num_seqs(&self) -> usize {
        self.tables.len()
    }

    /// Reference count of `block` (0 for free or out-of-range blocks).
    pub fn block_ref_count(&self, block: BlockId) -> usize {
        self.blocks.get(block as usize).map_or(0, |m| m.ref_count)
    }

    /// Whether `n_blocks` more blocks could be allocated right now.
    pub fn can_allocate(&self, n_blocks: usize) -> bool {
        n_blocks <= self.free.len
    }

    pub fn prefix_cache_stats(&self) -> PrefixCacheStats {
        self.stats
    }

    /// Checks the bookkeeping: every block is either free (ref 0, in the free list exactly
    /// once) or referenced by exactly `ref_count` table entries; the prefix-cache map and the
    /// blocks' hashes agree. For tests and debugging.
    pub fn check_invariants(&self) -> Result<(), String> {
        let n = self.blocks.len();
        let mut in_free = vec![false; n];
        let mut walked = 0;
        let mut prev = NIL;
        let mut cur = self.free.head;
        while cur != NIL {
            let b = cur as usize;
            if b >= n || in_free[b] {
                return Err(format!("free list revisits or overruns at block {cur}"));
            }
            if self.free.prev[b] != prev {
                return Err(format!("free list back link of block {cur} is broken"));
            }
            in_free[b] = true;
            walked += 1;
            prev = cur;
            cur = self.free.next[b];
        }
        if prev != self.free.tail || walked != self.free.len {
            return Err(format!(
                "free list: walked {walked} blocks ending at {prev}, recorded len {} tail {}",
                self.free.len, self.free.tail
            ));
        }
        let mut refs = vec![0usize; n];
        for (seq, table) in &self.tables {
            if table.hashes.len() > table.blocks.len() {
                return Err(format!("seq {seq}: more hashes than blocks"));
            }
            for (i, &b) in table.blocks.iter().enumerate() {
                let Some(r) = refs.get_mut(b as usize) else {
                    return Err(format!("seq {seq}: block {b} out of range"));
                };
                if table.blocks[..i].contains(&b) {
                    return Err(format!("seq {seq}: block {b} appears twice"));
                }
                *r += 1;
            }
        }
        for (b, meta) in self.blocks.iter().enumerate() {
            if meta.ref_count != refs[b] {
                return Err(format!(
                    "block {b}: ref_count {} but {} table entries",
                    meta.ref_count, refs[b]
                ));
            }
            if (meta.ref_count == 0) != in_free[b] {
                return Err(format!(
                    "block {b}: ref_count {} but in free list = {}",
                    meta.ref_count, in_free[b]
                ));
            }
            if let Some(h) = meta.hash
                && self.cached.get(&h) != Some(&(b as BlockId))
            {
                return Err(format!("block {b} carries hash {h:#x} not mapped to it"));
            }
        }
        for (&h, &b) in &self.cached {
            if self.blocks.get(b as usize).and_then(|m| m.hash) != Some(h) {
                return Err(format!("cache maps {h:#x} to block {b}, which lacks it"));
            }
        }
        Ok(())
    }

    /// The longest chain of cached full blocks matching a prefix of `tokens`, stopping one
    /// block short of covering all of `tokens` (the last token must be computed for logits).
    fn lookup_prefix(&self, tokens: &[u32]) -> Vec<(BlockId, BlockHash)> {
        let bs = self.block_size;
        let max_blocks = tokens.len().saturating_sub(1) / bs;
        let mut hits = Vec::new();
        let mut parent = ROOT_HASH;
        for chunk in tokens.chunks_exact(bs).take(max_blocks) {
            let hash = chain_hash(parent, chunk);
            let Some(&block) = self.cached.get(&hash) else {
                break;
            };
            hits.push((block, hash));
            parent = hash;
        }
        hits
    }
}

/// Deterministic chained block hash: FNV-1a 64 over the parent hash and the token ids
/// (little-endian), then a splitmix64 finalizer to spread FNV's weak low bits.
fn chain_hash(parent: BlockHash, tokens: &[u32]) -> BlockHash {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let bytes = parent
        .to_le_bytes()
        .into_iter()
        .chain(tokens.iter().flat_map(|t| t.to_le_bytes()));
    let mut h = OFFSET;
    for byte in bytes {
        h ^= u64::from(byte);
        h = h.wrapping_mul(PRIME);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// "No block" link in the intrusive free list.
const NIL: BlockId = BlockId::MAX;

/// Intrusive doubly linked list of free blocks in LRU order: pop from the head, push to the
/// tail, O(1) removal from the middle when a cached free block is shared again.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FreeList {
    head: BlockId,
    tail: BlockId,
    len: usize,
    prev: Vec<BlockId>,
    next: Vec<BlockId>,
}

impl FreeList {
    /// All of `0..n` free, in order. `n < NIL` is checked by the caller.
    fn with_all(n: usize) -> Self {
        let ids = 0..n as BlockId;
        Self {
            head: if n == 0 { NIL } else { 0 },
            tail: if n == 0 { NIL } else { n as BlockId - 1 },
            len: n,
            prev: ids
                .clone()
                .map(|b| b.checked_sub(1).unwrap_or(NIL))
                .collect(),
            next: ids
                .map(|b| if b as usize + 1 == n { NIL } else { b + 1 })
                .collect(),
        }
    }

    fn push_back(&mut self, b: BlockId) {
        self.prev[b as usize] = self.tail;
        self.next[b as usize] = NIL;
        match self.tail {
            NIL => self.head = b,
            t => self.next[t as usize] = b,
        }
        self.tail = b;
        self.len += 1;
    }

    fn pop_front(&mut self) -> Option<BlockId> {
        let b = self.head;
        if b == NIL {
            return None;
        }
        self.remove(b);
        Some(b)
    }

    /// Unlinks `b`, which must be in the list.
    fn remove(&mut self, b: BlockId) {
        let (p, n) = (self.prev[b as usize], self.next[b as usize]);
        match p {
            NIL => self.head = n,
            p => self.next[p as usize] = n,
        }
        match n {
            NIL => self.tail = p,
            n => self.prev[n as usize] = p,
        }
        self.prev[b as usize] = NIL;
        self.next[b as usize] = NIL;
        self.len -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn toks(seed: u32, n: usize) -> Vec<u32> {
        (0..n as u32).map(|i| seed * 1000 + i).collect()
    }

    /// Allocates and "computes" all of `tokens` for a fresh `seq`, committing its blocks.
    fn run_prompt(bm: &mut BlockManager, seq: SeqId, tokens: &[u32]) -> Allocation {
        let a = bm.allocate(seq, tokens, 0, tokens.len()).expect("allocate");
        bm.commit_full_blocks(seq, tokens, a.cached_tokens + a.num_new_tokens);
        bm.check_invariants().expect("invariants");
        a
    }

    #[test]
    fn rejects_bad_config() {
        assert!(matches!(
            BlockManager::new(8, 0),
            Err(KvError::InvalidConfig(_))
        ));
        assert!(matches!(
            BlockManager::new(0, 16),
            Err(KvError::InvalidConfig(_))
        ));
        assert!(BlockManager::new(1, 16).is_ok());
    }

    #[test]
    fn prefix_reuse_40_token_prompt() {
        let mut bm = BlockManager::new(10, 16).unwrap();
        let prompt = toks(1, 40);
        let a = run_prompt(&mut bm, 1, &prompt);
        assert_eq!(
            a,
            Allocation {
                cached_tokens: 0,
                num_new_tokens: 40
            }
        );
        assert_eq!(bm.num_cached_blocks(), 2);
        let b = run_prompt(&mut bm, 2, &prompt);
        assert_eq!(
            b,
            Allocation {
                cached_tokens: 32,
                num_new_tokens: 8
            }
        );
        let (t1, t2) = (bm.block_table(1).unwrap(), bm.block_table(2).unwrap());
        assert_eq!(t1[..2], t2[..2]);
        assert_ne!(t1[2], t2[2]);
        assert_eq!(bm.block_ref_count(t1[0]), 2);
        assert_eq!(bm.num_used_blocks(), 4);
        // Still a hit once the original owner is gone.
        bm.free(1);
        bm.free(2);
        let c = run_prompt(&mut bm, 3, &prompt);
        assert_eq!(c.cached_tokens, 32);
        let stats = bm.prefix_cache_stats();
        assert_eq!((stats.queries, stats.hits), (120, 64));
        assert!((stats.hit_rate() - 64.0 / 120.0).abs() < 1e-12);
    }

    #[test]
    fn fully_cached_prompt_still_computes_last_block() {
        let mut bm = BlockManager::new(10, 16).unwrap();
        let prompt = toks(1, 32);
        run_prompt(&mut bm, 1, &prompt);
        assert_eq!(bm.cached_prefix_len(&prompt), 16);
        let a = run_prompt(&mut bm, 2, &prompt);
        assert_eq!(
            a,
            Allocation {
                cached_tokens: 16,
                num_new_tokens: 16
            }
        );
        let longer: Vec<u32> = prompt.iter().copied().chain([7]).collect();
        let b = run_prompt(&mut bm, 3, &longer);
        assert_eq!(
            b,
            Allocation {
                cached_tokens: 32,
                num_new_tokens: 1
            }
        );
    }

    #[test]
    fn chained_hash_depends_on_parent() {
        let mut bm = BlockManager::new(10, 4).unwrap();
        run_prompt(&mut bm, 1, &[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        // Same second block, different first block: no hit at all.
        assert_eq!(bm.cached_prefix_len(&[0, 2, 3, 4, 5, 6, 7, 8, 9]), 0);
        assert_eq!(bm.cached_prefix_len(&[1, 2, 3, 4, 5, 6, 7, 8, 9]), 8);
        assert_eq!(bm.cached_prefix_len(&[1, 2, 3, 4, 5, 6, 7, 0, 9]), 4);
    }

    #[test]
    fn lru_eviction_drops_hashes_tail_first() {
        let mut bm = BlockManager::new(4, 4).unwrap();
        let a = toks(1, 8);
        let b = toks(2, 8);
        run_prompt(&mut bm, 1, &a); // blocks 0, 1
        bm.free(1); // free list: 2 3 1 0
        run_prompt(&mut bm, 2, &b); // blocks 2, 3
        bm.free(2); // free list: 1 0 3 2
        assert_eq!(bm.num_cached_blocks(), 4);
        run_prompt(&mut bm, 3, &toks(3, 12)); // reuses 1, 0, 3: evicts all of a, b's tail
        assert_eq!(bm.block_table(3).unwrap(), &[1, 0, 3]);
        assert_eq!(bm.num_cached_blocks(), 4); // b's head + the three new blocks
        assert_eq!(bm.cached_prefix_len(&[a.as_slice(), &[0]].concat()), 0);
        assert_eq!(bm.cached_prefix_len(&[b.as_slice(), &[0]].concat()), 4);
    }

    #[test]
    fn allocation_is_all_or_nothing() {
        let mut bm = BlockManager::new(4, 4).unwrap();
        let shared = toks(1, 8);
        run_prompt(&mut bm, 1, &shared);
        bm.free(1); // two cached free blocks
        run_prompt(&mut bm, 2, &toks(2, 8)); // takes the two uncached ones
        let before = bm.clone();
        // Hit on 2 cached blocks (which must leave the free list) + 2 fresh: 4 > 2 free.
        let long: Vec<u32> = shared.iter().copied().chain(toks(3, 8)).collect();
        let err = bm.allocate(3, &long, 0, long.len()).unwrap_err();
        assert_eq!(err, KvError::OutOfBlocks { needed: 4, free: 2 });
        assert_eq!(bm, before);
        let err = bm.allocate(2, &toks(2, 20), 8, 12).unwrap_err();
        assert_eq!(err, KvError::OutOfBlocks { needed: 3, free: 2 });
        assert_eq!(bm, before);
        // Once there is room, the cached prefix is shared.
        bm.free(2);
        let a = bm.allocate(3, &long, 0, long.len()).unwrap();
        assert_eq!(
            a,
            Allocation {
                cached_tokens: 8,
                num_new_tokens: 8
            }
        );
        bm.check_invariants().unwrap();
    }

    #[test]
    fn caller_errors_are_values_and_free_is_idempotent() {
        let mut bm = BlockManager::new(4, 4).unwrap();
        let before = bm.clone();
        assert!(matches!(
            bm.allocate(1, &[1, 2], 1, 2),
            Err(KvError::TokenRangeOutOfBounds { .. })
        ));
        assert!(matches!(
            bm.allocate(1, &[1, 2], usize::MAX, 2),
            Err(KvError::TokenRangeOutOfBounds { .. })
        ));
        assert_eq!(
            bm.allocate(1, &[1, 2], 1, 1),
            Err(KvError::NoBlockTable {
                seq: 1,
                num_computed: 1
            })
        );
        bm.free(42);
        bm.commit_full_blocks(42, &[1, 2, 3, 4], 4);
        assert_eq!(bm, before);
        run_prompt(&mut bm, 1, &toks(1, 6));
        bm.free(1);
        let after_one = bm.clone();
        bm.free(1);
        assert_eq!(bm, after_one);
        assert_eq!(bm.num_free_blocks(), 4);
        bm.check_invariants().unwrap();
    }

    #[derive(Debug, Clone)]
    enum Op {
        Advance { seq: usize, n: usize },
        Free { seq: usize },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..6usize, 1..40usize).prop_map(|(seq, n)| Op::Advance { seq, n }),
            1 => (0..6usize).prop_map(|seq| Op::Free { seq }),
        ]
    }

    /// Six sequences built from three shared prefixes plus private suffixes.
    fn seq_tokens() -> impl Strategy<Value = Vec<Vec<u32>>> {
        let prefixes = proptest::collection::vec(proptest::collection::vec(0..3u32, 0..48), 3);
        let suffixes =
            proptest::collection::vec((0..3usize, proptest::collection::vec(0..3u32, 1..40)), 6);
        (prefixes, suffixes).prop_map(|(prefixes, suffixes)| {
            suffixes
                .into_iter()
                .map(|(p, s)| prefixes[p].iter().copied().chain(s).collect())
                .collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Random allocate/commit/free traffic against a shadow KV store: the bookkeeping
        /// invariants hold after every op, shared or cached blocks always hold exactly the
        /// tokens a sequence expects (so prefix hits are correct and nothing live is ever
        /// overwritten or evicted), failed allocations change nothing, and nothing leaks.
        #[test]
        fn random_traffic_keeps_invariants(
            block_size in prop_oneof![Just(4usize), Just(16usize)],
            num_blocks in 1..24usize,
            seqs in seq_tokens(),
            ops in proptest::collection::vec(op(), 1..80),
        ) {
            let mut bm = BlockManager::new(num_blocks, block_size).unwrap();
            let mut shadow = vec![vec![None::<u32>; block_size]; num_blocks];
            let mut computed = [0usize; 6];
            for op in ops {
                match op {
                    Op::Free { seq } => {
                        bm.free(seq as SeqId);
                        computed[seq] = 0;
                    }
                    Op::Advance { seq, n } => {
                        let tokens = &seqs[seq];
                        let c = computed[seq];
                        if c == tokens.len() {
                            continue;
                        }
                        let n = n.min(tokens.len() - c);
                        let before = bm.clone();
                        match bm.allocate(seq as SeqId, tokens, c, n) {
                            Err(KvError::OutOfBlocks { needed, free }) => {
                                prop_assert!(needed > free);
                                prop_assert_eq!(&bm, &before);
                                continue;
                            }
                            Err(e) => return Err(TestCaseError::fail(e.to_string())),
                            Ok(a) => {
                                let start = c.max(a.cached_tokens);
                                prop_assert!(a.cached_tokens < tokens.len());
                                prop_assert!(a.num_new_tokens >= 1);
                                let end = start + a.num_new_tokens;
                                let table = bm.block_table(seq as SeqId).unwrap().to_vec();
                                prop_assert_eq!(table.len(), end.div_ceil(block_size));
                                for (pos, &tok) in tokens.iter().enumerate().take(end).skip(start) {
                                    let b = table[pos / block_size];
                                    // Writes only ever go to private, uncached blocks.
                                    prop_assert_eq!(bm.block_ref_count(b), 1);
                                    prop_assert!(bm.blocks[b as usize].hash.is_none());
                                    shadow[b as usize][pos % block_size] = Some(tok);
                                }
                                bm.commit_full_blocks(seq as SeqId, tokens, end);
                                computed[seq] = end;
                            }
                        }
                    }
                }
                if let Err(e) = bm.check_invariants() {
                    return Err(TestCaseError::fail(e));
                }
                for (seq, tokens) in seqs.iter().enumerate() {
                    let Some(table) = bm.block_table(seq as SeqId) else { continue };
                    for (pos, &tok) in tokens.iter().enumerate().take(computed[seq]) {
                        let b = table[pos / block_size] as usize;
                        prop_assert_eq!(shadow[b][pos % block_size], Some(tok));
                    }
                }
            }
            for seq in 0..6 {
                bm.free(seq as SeqId);
                bm.free(seq as SeqId);
            }
            prop_assert_eq!(bm.num_free_blocks(), num_blocks);
            prop_assert_eq!(bm.num_used_blocks(), 0);
            prop_assert!(bm.check_invariants().is_ok());
            let stats = bm.prefix_cache_stats();
            prop_assert!(stats.hits <= stats.queries);
        }
    }
}
