//! The active policy set: an atomically swapped `Arc<PolicySet>`, the decision cache, and
//! hot reload. A set that fails admission is refused and the last good one stays.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use super::{DecisionRequest, PolicyError, PolicySet, ResidencyDecision, dir_hash};
use crate::domain::Classification;
use crate::pools::PoolsConfig;

/// Cached decisions before the cache is cleared (a crude but bounded LRU substitute).
const CACHE_CAPACITY: usize = 16_384;

/// A cached decision's inputs. The cache is looked up by a hash of the borrowed request
/// fields and this key is then compared field by field, so a cache hit allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CacheKey {
    policy_hash: String,
    state: String,
    ministry: String,
    clearance: Classification,
    classification: Classification,
    model: String,
}

impl CacheKey {
    fn matches(&self, policy_hash: &str, req: &DecisionRequest) -> bool {
        self.policy_hash == policy_hash
            && self.state == req.state
            && self.ministry == req.ministry
            && self.clearance == req.clearance
            && self.classification == req.classification
            && self.model == req.model
    }
}

/// Decisions by the hash of their inputs; a bucket holds the (rare) collisions.
#[derive(Debug, Default)]
struct DecisionCache {
    hasher: std::hash::RandomState,
    buckets: HashMap<u64, Vec<(CacheKey, Arc<ResidencyDecision>)>>,
    len: usize,
}

impl DecisionCache {
    fn hash(&self, policy_hash: &str, req: &DecisionRequest) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one((
            policy_hash,
            req.state,
            req.ministry,
            req.clearance,
            req.classification,
            req.model,
        ))
    }

    fn get(
        &self,
        h: u64,
        policy_hash: &str,
        req: &DecisionRequest,
    ) -> Option<&Arc<ResidencyDecision>> {
        self.buckets
            .get(&h)?
            .iter()
            .find(|(k, _)| k.matches(policy_hash, req))
            .map(|(_, d)| d)
    }

    fn insert(&mut self, h: u64, key: CacheKey, decision: Arc<ResidencyDecision>) {
        if self.len >= CACHE_CAPACITY {
            self.clear();
        }
        let bucket = self.buckets.entry(h).or_default();
        match bucket.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = decision,
            None => {
                bucket.push((key, decision));
                self.len += 1;
            }
        }
    }

    fn clear(&mut self) {
        self.buckets.clear();
        self.len = 0;
    }
}

/// Holds the active policy set; `Send + Sync`, share it as `Arc<PolicyStore>`.
#[derive(Debug)]
pub struct PolicyStore {
    dir: PathBuf,
    pools: Arc<PoolsConfig>,
    current: RwLock<Arc<PolicySet>>,
    cache: Mutex<DecisionCache>,
    /// Serializes reloads (SIGHUP and the watcher may race).
    reloading: Mutex<()>,
}

impl PolicyStore {
    /// Load and admit the set in `dir`; fails if it does not pass the check.
    pub fn new(dir: PathBuf, pools: Arc<PoolsConfig>) -> Result<PolicyStore, PolicyError> {
        let set = PolicySet::load(&dir, &pools)?;
        tracing::info!(
            dir = %dir.display(),
            policy_hash = set.hash(),
            states = set.states().count(),
            "policy set active"
        );
        Ok(PolicyStore {
            dir,
            pools,
            current: RwLock::new(Arc::new(set)),
            cache: Mutex::new(DecisionCache::default()),
            reloading: Mutex::new(()),
        })
    }

    /// The policy directory this store loads from.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// The active set.
    pub fn current(&self) -> Arc<PolicySet> {
        match self.current.read() {
            Ok(g) => Arc::clone(&g),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// The active set's hash.
    pub fn hash(&self) -> String {
        self.current().hash().to_string()
    }

    /// Decide with the active set; repeated requests are answered from the cache.
    pub fn decide(&self, req: &DecisionRequest) -> Arc<ResidencyDecision> {
        let set = self.current();
        let h = {
            let cache = self.lock_cache();
            let h = cache.hash(set.hash(), req);
            if let Some(hit) = cache.get(h, set.hash(), req) {
                return Arc::clone(hit);
            }
            h
        };
        let decision = Arc::new(set.decide(req));
        let key = CacheKey {
            policy_hash: set.hash().to_string(),
            state: req.state.to_string(),
            ministry: req.ministry.to_string(),
            clearance: req.clearance,
            classification: req.classification,
            model: req.model.to_string(),
        };
        self.lock_cache().insert(h, key, Arc::clone(&decision));
        decision
    }

    /// Re-read the directory and swap in the new set if it passes admission. On error
    /// the active set stays and the error is returned (and logged).
    pub fn reload(&self) -> Result<String, PolicyError> {
        let _one_at_a_time = match self.reloading.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let active = self.hash();
        match PolicySet::load(&self.dir, &self.pools) {
            Ok(set) => {
                let hash = set.hash().to_string();
                if hash == active {
                    tracing::debug!(policy_hash = %hash, "policy set unchanged");
                    return Ok(hash);
                }
                {
                    let mut cur = match self.current.write() {
                        Ok(g) => g,
                        Err(poisoned) => poisoned.into_inner(),
                    };
                    *cur = Arc::new(set);
                }
                self.lock_cache().clear();
                tracing::info!(policy_hash = %hash, previous = %active, "policy set reloaded and active");
                Ok(hash)
            }
            Err(e) => {
                tracing::error!(
                    dir = %self.dir.display(),
                    active_policy_hash = %active,
                    error = %e,
                    "policy set refused; keeping the last good set"
                );
                Err(e)
            }
        }
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, DecisionCache> {
        match self.cache.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

/// Poll the policy directory every `every`; when its contents hash changes (and differs
/// from the active set), reload. A refused set is reported once per change, not per poll.
pub fn spawn_watcher(store: Arc<PolicyStore>, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last_seen = store.hash();
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            let s = Arc::clone(&store);
            let polled = tokio::task::spawn_blocking(move || {
                let on_disk = dir_hash(s.dir())?;
                Ok::<_, PolicyError>(on_disk)
            })
            .await;
            let on_disk = match polled {
                Ok(Ok(h)) => h,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "policy watcher cannot read the policy directory");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "policy watcher task failed");
                    continue;
                }
            };
            if on_disk == last_seen {
                continue;
            }
            last_seen = on_disk.clone();
            if on_disk == store.hash() {
                continue;
            }
            let s = Arc::clone(&store);
            // Errors are logged by reload itself.
            let _ = tokio::task::spawn_blocking(move || s.reload()).await;
        }
    })
}
