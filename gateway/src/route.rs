//! Routing: which worker of which allowed pool gets a request. It owns the live view of
//! every worker (load snapshots from WatchLoad, health, circuit breaker) and ranks the
//! workers of a pool; it never decides *whether* a pool is allowed (that is policy's)
//! and never picks a pool the caller did not pass in.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::worker::worker_client::WorkerClient;
use proto::worker::{LoadSnapshot, WatchLoadRequest};
use tonic::transport::{Channel, Endpoint};

use crate::grpc_h2::H2Generate;
use crate::pools::{Pool, PoolsConfig};

/// Tunables of routing, from the gateway config's `[routing]` table.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// TCP connect timeout to a worker.
    pub connect_timeout_ms: u64,
    /// A worker whose last load snapshot is older than this is considered down.
    pub stale_after_ms: u64,
    /// Consecutive failures that open a worker's circuit breaker.
    pub breaker_failures: u32,
    /// How long an open breaker keeps a worker out before one trial request.
    pub breaker_cooldown_ms: u64,
    /// Prefix affinity: a worker that served the same prompt prefix is preferred while
    /// its load score is within this many queued requests of the least-loaded worker.
    pub affinity_slack: f64,
    /// Bytes of the prompt that form its prefix key.
    pub affinity_prefix_bytes: usize,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            connect_timeout_ms: 1000,
            stale_after_ms: 1500,
            breaker_failures: 3,
            breaker_cooldown_ms: 5000,
            affinity_slack: 2.0,
            affinity_prefix_bytes: 256,
        }
    }
}

/// The live view of one worker.
pub struct WorkerHandle {
    pub pool: String,
    /// The pool's country, from the pools file: the worker must report the same.
    pub country: String,
    pub addr: SocketAddr,
    /// For Generate calls: a bare HTTP/2 connection, made on first use from the request
    /// path, so that its task runs on the front end's runtime next to the requests.
    generate: H2Generate,
    /// For WatchLoad, on its own HTTP/2 connection: resets of cancelled Generate
    /// streams (clients that left) must not take the load view down with them.
    watch_client: WorkerClient<Channel>,
    state: Mutex<WorkerState>,
    /// Requests this gateway has in flight on the worker (between snapshots).
    inflight: AtomicU32,
}

#[derive(Default)]
struct WorkerState {
    last: Option<LoadSnapshot>,
    last_seen: Option<Instant>,
    consecutive_failures: u32,
    open_until: Option<Instant>,
}

/// Why a worker is not offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    NoSnapshot,
    Stale,
    Draining,
    BreakerOpen,
}

impl WorkerHandle {
    fn new(pool: &str, country: &str, addr: SocketAddr, cfg: &RoutingConfig) -> Self {
        // `connect_lazy` never fails for a well-formed URI; the address is a SocketAddr.
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map(|e| {
                e.connect_timeout(Duration::from_millis(cfg.connect_timeout_ms))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(10))
            })
            .unwrap_or_else(|_| Endpoint::from_static("http://127.0.0.1:9"));
        Self {
            pool: pool.to_string(),
            country: country.to_string(),
            addr,
            generate: H2Generate::new(addr, Duration::from_millis(cfg.connect_timeout_ms)),
            watch_client: WorkerClient::new(endpoint.connect_lazy()),
            state: Mutex::new(WorkerState::default()),
            inflight: AtomicU32::new(0),
        }
    }

    /// The Generate client (must be called within a tokio runtime).
    pub fn generate(&self) -> &H2Generate {
        &self.generate
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WorkerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the worker may get a request now, and its load score if so.
    fn availability(&self, cfg: &RoutingConfig, now: Instant) -> Result<f64, Unavailable> {
        let st = self.lock();
        if let Some(until) = st.open_until
            && now < until
        {
            return Err(Unavailable::BreakerOpen);
        }
        let (Some(snap), Some(seen)) = (&st.last, st.last_seen) else {
            return Err(Unavailable::NoSnapshot);
        };
        if now.duration_since(seen) > Duration::from_millis(cfg.stale_after_ms) {
            return Err(Unavailable::Stale);
        }
        if snap.draining {
            return Err(Unavailable::Draining);
        }
        let kv = if snap.kv_blocks_total > 0 {
            f64::from(snap.kv_blocks_used) / f64::from(snap.kv_blocks_total)
        } else {
            0.0
        };
        let inflight = f64::from(self.inflight.load(Ordering::Relaxed));
        // Queued requests dominate; running and KV use break ties; our own in-flight
        // requests count until the next snapshot reflects them.
        Ok(f64::from(snap.queued) + 0.25 * f64::from(snap.running) + kv + inflight)
    }

    pub fn record_success(&self) {
        let mut st = self.lock();
        st.consecutive_failures = 0;
        st.open_until = None;
    }

    pub fn record_failure(&self, cfg: &RoutingConfig) {
        let mut st = self.lock();
        st.consecutive_failures += 1;
        if st.consecutive_failures >= cfg.breaker_failures {
            st.open_until = Some(Instant::now() + Duration::from_millis(cfg.breaker_cooldown_ms));
            tracing::warn!(worker = %self.addr, pool = %self.pool, "circuit breaker open");
        }
    }

    fn record_snapshot(&self, snap: LoadSnapshot) {
        let mut st = self.lock();
        st.last = Some(snap);
        st.last_seen = Some(Instant::now());
    }

    fn mark_down(&self) {
        let mut st = self.lock();
        st.last_seen = None;
    }

    /// Counts a request as in flight until the guard is dropped.
    pub fn start_request(self: &Arc<Self>) -> InflightGuard {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        InflightGuard(self.clone())
    }
}

/// Decrements the worker's in-flight count on drop.
pub struct InflightGuard(Arc<WorkerHandle>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// All workers of all pools.
pub struct Router {
    pub cfg: RoutingConfig,
    pools: HashMap<String, Vec<Arc<WorkerHandle>>>,
    /// prefix key -> worker address that last served it (bounded).
    affinity: Mutex<HashMap<u64, SocketAddr>>,
}

const AFFINITY_ENTRIES: usize = 65_536;

impl Router {
    pub fn new(pools: &PoolsConfig, cfg: RoutingConfig) -> Self {
        let pools = pools
            .pools
            .iter()
            .map(|p: &Pool| {
                let workers = p
                    .workers
                    .iter()
                    .map(|&a| Arc::new(WorkerHandle::new(&p.id, p.country.as_str(), a, &cfg)))
                    .collect();
                (p.id.clone(), workers)
            })
            .collect();
        Self {
            cfg,
            pools,
            affinity: Mutex::new(HashMap::new()),
        }
    }

    /// Starts one WatchLoad watcher per worker on the current tokio runtime. A watcher
    /// reconnects with backoff; while it cannot reach the worker, the worker is down.
    pub fn spawn_watchers(self: &Arc<Self>) {
        for w in self.pools.values().flatten() {
            let w = w.clone();
            tokio::spawn(async move { watch(w).await });
        }
    }

    /// The available workers of `pool`, best first: least loaded, except that the
    /// worker which last served `prefix_key` goes first while it is within the slack.
    pub fn rank(&self, pool: &str, prefix_key: Option<u64>) -> Vec<Arc<WorkerHandle>> {
        let now = Instant::now();
        let Some(workers) = self.pools.get(pool) else {
            return Vec::new();
        };
        let mut avail: Vec<(f64, Arc<WorkerHandle>)> = workers
            .iter()
            .filter_map(|w| w.availability(&self.cfg, now).ok().map(|s| (s, w.clone())))
            .collect();
        avail.sort_by(|a, b| a.0.total_cmp(&b.0));
        if let (Some(key), Some(best)) = (prefix_key, avail.first().map(|a| a.0)) {
            let preferred = self
                .affinity
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&key)
                .copied();
            if let Some(addr) = preferred
                && let Some(i) = avail
                    .iter()
                    .position(|(s, w)| w.addr == addr && *s <= best + self.cfg.affinity_slack)
            {
                let a = avail.remove(i);
                avail.insert(0, a);
            }
        }
        avail.into_iter().map(|(_, w)| w).collect()
    }

    /// Whether any worker of `pool` is available now.
    pub fn pool_available(&self, pool: &str) -> bool {
        let now = Instant::now();
        self.pools
            .get(pool)
            .is_some_and(|ws| ws.iter().any(|w| w.availability(&self.cfg, now).is_ok()))
    }

    /// Remembers that `worker` served `prefix_key`.
    pub fn note_affinity(&self, prefix_key: u64, worker: SocketAddr) {
        let mut m = self.affinity.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= AFFINITY_ENTRIES {
            m.clear();
        }
        m.insert(prefix_key, worker);
    }

    /// Per worker: pool, address, availability (for /health and the admin listener).
    pub fn status(&self) -> Vec<serde_json::Value> {
        let now = Instant::now();
        let mut out = Vec::new();
        for (pool, ws) in &self.pools {
            for w in ws {
                let avail = w.availability(&self.cfg, now);
                let st = w.lock();
                out.push(serde_json::json!({
                    "pool": pool,
                    "worker": w.addr.to_string(),
                    "available": avail.is_ok(),
                    "reason": avail.err().map(|e| format!("{e:?}")),
                    "queued": st.last.as_ref().map(|s| s.queued),
                    "running": st.last.as_ref().map(|s| s.running),
                    "inflight": w.inflight.load(Ordering::Relaxed),
                }));
            }
        }
        out.sort_by(|a, b| a["worker"].as_str().cmp(&b["worker"].as_str()));
        out
    }
}

/// A stable key for the first `n` bytes of a prompt (FNV-1a).
pub fn prefix_key(prompt: &[u8], n: usize) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in &prompt[..prompt.len().min(n)] {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Why a worker's own account of itself (gRPC Info) disqualifies it from its pool: a
/// worker that says it is in another pool or country is never routed to, whatever the
/// pools file says, so a wrong address cannot silently move data across a border.
pub fn identity_mismatch(
    info: &proto::worker::InfoReply,
    pool: &str,
    country: &str,
) -> Option<String> {
    if info.pool != pool {
        return Some(format!(
            "reports pool `{}`, configured in `{pool}`",
            info.pool
        ));
    }
    if !info.country.eq_ignore_ascii_case(country) {
        return Some(format!(
            "reports country `{}`, its pool `{pool}` is in {country}",
            info.country
        ));
    }
    None
}

/// Keeps one worker's load view fresh: checks its identity (Info), then WatchLoad
/// snapshots while connected; marks it down and retries with backoff (100 ms doubling
/// to 2 s) while it cannot be reached or does not match its pool.
async fn watch(w: Arc<WorkerHandle>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut client = w.watch_client.clone();
        let identity = match client.info(proto::worker::InfoRequest {}).await {
            Ok(info) => identity_mismatch(info.get_ref(), &w.pool, &w.country),
            Err(e) => Some(format!("unreachable: {}", e.message())),
        };
        if let Some(why) = identity {
            tracing::warn!(worker = %w.addr, pool = %w.pool, reason = %why, "worker not routed to");
            w.mark_down();
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
            continue;
        }
        match client.watch_load(WatchLoadRequest {}).await {
            Ok(resp) => {
                let mut stream = resp.into_inner();
                while let Ok(Some(snap)) = stream.message().await {
                    backoff = Duration::from_millis(100);
                    w.record_snapshot(snap);
                }
                tracing::warn!(worker = %w.addr, pool = %w.pool, "load stream ended; worker marked down");
            }
            Err(e) => {
                tracing::debug!(worker = %w.addr, error = %e.message(), "worker unreachable");
            }
        }
        w.mark_down();
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(queued: u32, running: u32, draining: bool) -> LoadSnapshot {
        LoadSnapshot {
            queued,
            running,
            kv_blocks_used: 0,
            kv_blocks_total: 100,
            draining,
            unix_ms: 0,
            prefix_cache_hit_rate: 0.0,
        }
    }

    fn router(n: usize) -> Router {
        let toml = format!(
            "[[pool]]\nid = \"de-1\"\ncountry = \"DE\"\nmodels = [\"m\"]\nworkers = [{}]\n",
            (0..n)
                .map(|i| format!("\"127.0.0.1:{}\"", 40000 + i))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let pools = PoolsConfig::parse(&toml, std::path::Path::new("t.toml")).unwrap();
        Router::new(&pools, RoutingConfig::default())
    }

    #[tokio::test]
    async fn ranks_by_load_skips_unavailable_and_honours_affinity() {
        let r = router(4);
        let ws = r.pools["de-1"].clone();
        assert!(
            r.rank("de-1", None).is_empty(),
            "no snapshot yet = not available"
        );
        ws[0].record_snapshot(snap(3, 1, false));
        ws[1].record_snapshot(snap(0, 1, false));
        ws[2].record_snapshot(snap(0, 0, true)); // draining
        ws[3].record_snapshot(snap(1, 0, false));
        let order: Vec<_> = r.rank("de-1", None).iter().map(|w| w.addr.port()).collect();
        assert_eq!(order, vec![40001, 40003, 40000]);

        // Affinity within the slack moves worker 3 first; beyond the slack it does not.
        r.note_affinity(7, ws[3].addr);
        assert_eq!(r.rank("de-1", Some(7))[0].addr.port(), 40003);
        r.note_affinity(8, ws[0].addr);
        assert_eq!(r.rank("de-1", Some(8))[0].addr.port(), 40001);

        // In-flight requests count against a worker until the guard drops.
        let guards: Vec<_> = (0..3).map(|_| ws[1].start_request()).collect();
        assert_eq!(r.rank("de-1", None)[0].addr.port(), 40003);
        drop(guards);
        assert_eq!(r.rank("de-1", None)[0].addr.port(), 40001);

        // The breaker opens after `breaker_failures` failures and closes on success.
        for _ in 0..r.cfg.breaker_failures {
            ws[1].record_failure(&r.cfg);
        }
        assert!(r.rank("de-1", None).iter().all(|w| w.addr.port() != 40001));
        ws[1].record_success();
        assert_eq!(r.rank("de-1", None)[0].addr.port(), 40001);

        ws[1].mark_down();
        assert!(r.rank("de-1", None).iter().all(|w| w.addr.port() != 40001));
        assert!(r.pool_available("de-1"));
        assert!(!r.pool_available("fr-1"));
    }

    #[test]
    fn a_worker_must_report_its_pools_identity() {
        let info = |pool: &str, country: &str| proto::worker::InfoReply {
            pool: pool.into(),
            country: country.into(),
            ..Default::default()
        };
        assert_eq!(
            identity_mismatch(&info("de-fra-1", "DE"), "de-fra-1", "DE"),
            None
        );
        assert_eq!(
            identity_mismatch(&info("de-fra-1", "de"), "de-fra-1", "DE"),
            None
        );
        let e = identity_mismatch(&info("de-fra-1", "FR"), "de-fra-1", "DE").unwrap();
        assert!(e.contains("country `FR`"), "{e}");
        let e = identity_mismatch(&info("fr-par-1", "DE"), "de-fra-1", "DE").unwrap();
        assert!(e.contains("pool `fr-par-1`"), "{e}");
        // A standalone worker's defaults (pool `local`, country `EU`) never pass.
        assert!(identity_mismatch(&info("local", "EU"), "de-fra-1", "DE").is_some());
    }

    #[test]
    fn prefix_key_uses_only_the_prefix() {
        assert_eq!(prefix_key(b"abcdef", 3), prefix_key(b"abcxyz", 3));
        assert_ne!(prefix_key(b"abcdef", 4), prefix_key(b"abcxyz", 4));
    }
}
