//! Phase 1 of a request: federated authentication. Each member state runs its own
//! identity provider; a token's `iss` selects the member state, its signature must verify
//! with a key from that state's JWKS (RS256, ES256 or EdDSA only), and its `state` claim
//! must name that same state. The result is a [`Caller`], or an [`AuthError`] with a
//! stable reason code that the HTTP layer turns into a 401.
//!
//! This module owns token verification, JWKS loading/refresh and the demo IdP keys
//! ([`keys`]). It must not decide anything about routing or policy, and it never logs a
//! token or a private key.

mod claims;
mod config;
mod jwks;
pub mod keys;
mod token;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, Validation};

pub use config::{ALLOWED_ALGORITHMS, AuthConfigError, DEFAULT_REFRESH_SECS, IssuerConfig};
pub use keys::{
    DEFAULT_AUDIENCE, IdpInfo, MintClaims, SigningAlg, StateKeys, default_issuer, forge_token,
    generate_state_keys, load_state_keys,
};

use crate::domain::{Classification, Country};
use jwks::VerifyKey;
pub(crate) use token::printable;
use token::{bearer_token, decode_json_part, header_algorithm, map_jwt_error, split_token};

/// Stable reason codes of [`AuthError`] (clients' scripts match on them).
pub mod reason {
    pub const MISSING_TOKEN: &str = "missing_token";
    pub const MALFORMED_TOKEN: &str = "malformed_token";
    pub const UNSUPPORTED_ALGORITHM: &str = "unsupported_algorithm";
    pub const UNKNOWN_ISSUER: &str = "unknown_issuer";
    pub const UNKNOWN_KEY_ID: &str = "unknown_key_id";
    pub const BAD_SIGNATURE: &str = "bad_signature";
    pub const TOKEN_EXPIRED: &str = "token_expired";
    pub const TOKEN_NOT_YET_VALID: &str = "token_not_yet_valid";
    pub const WRONG_AUDIENCE: &str = "wrong_audience";
    pub const MISSING_CLAIM: &str = "missing_claim";
    pub const INVALID_CLAIM: &str = "invalid_claim";
    pub const STATE_MISMATCH: &str = "state_mismatch";
    /// 403, not 401: the caller is authenticated, but asks for a data classification
    /// above its clearance (see [`Caller::classification_for`](super::Caller::classification_for)).
    pub const CLASSIFICATION_ABOVE_CLEARANCE: &str = "classification_above_clearance";
}

/// Clock skew tolerated on `exp` and `nbf`, in seconds.
pub const CLOCK_LEEWAY_SECS: u64 = 30;
/// Largest token accepted (bytes of the compact JWS).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Minimum time between two JWKS fetches triggered by an unknown `kid`, per issuer.
pub const UNKNOWN_KID_REFRESH_COOLDOWN: Duration = Duration::from_secs(10);

/// Why a request is not authenticated. `Display` is the human message; neither field
/// ever contains the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthError {
    pub reason: &'static str,
    pub message: String,
}

impl AuthError {
    pub fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }

    /// 401 for every authentication failure; 403 for
    /// [`reason::CLASSIFICATION_ABOVE_CLEARANCE`].
    pub fn http_status(&self) -> u16 {
        if self.reason == reason::CLASSIFICATION_ABOVE_CLEARANCE {
            403
        } else {
            401
        }
    }
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for AuthError {}

/// The token cache's key: SHA-256 of the token, so the cache holds no bearer tokens.
fn token_digest(token: &str) -> [u8; 32] {
    sha2::Digest::finalize(sha2::Digest::chain_update(
        <sha2::Sha256 as sha2::Digest>::new(),
        token.as_bytes(),
    ))
    .into()
}

/// An authenticated caller: a ministry of a member state, with its clearance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub state: Country,
    pub ministry: String,
    pub clearance: Classification,
    /// The token's `classification` claim, or `Public`; never above `clearance`.
    pub default_classification: Classification,
    pub roles: Vec<String>,
    pub subject: Option<String>,
    pub token_id: Option<String>,
    /// The audit log's HMAC of this caller's identity, computed on first use: the token
    /// cache hands the same `Caller` to every request that presents the token.
    pub audit_hmac: Memo,
}

/// A value derived from a [`Caller`]'s other fields, computed at most once. It never
/// makes two callers differ.
#[derive(Debug, Clone, Default)]
pub struct Memo(std::sync::OnceLock<Option<String>>);

impl Memo {
    pub fn get_or_init(&self, f: impl FnOnce() -> Option<String>) -> Option<&str> {
        self.0.get_or_init(f).as_deref()
    }
}

impl PartialEq for Memo {
    fn eq(&self, _: &Memo) -> bool {
        true
    }
}

impl Eq for Memo {}

impl Caller {
    /// The data classification of a request: the requested one (header
    /// `X-Data-Classification`) or the token's default; never above the clearance
    /// (-> `classification_above_clearance`, HTTP 403).
    pub fn classification_for(
        &self,
        requested: Option<Classification>,
    ) -> Result<Classification, AuthError> {
        let class = requested.unwrap_or(self.default_classification);
        if class > self.clearance {
            return Err(AuthError::new(
                reason::CLASSIFICATION_ABOVE_CLEARANCE,
                format!(
                    "classification `{class}` is above the caller's clearance `{}`",
                    self.clearance
                ),
            ));
        }
        Ok(class)
    }

    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
}

/// Verifies bearer tokens against the member states' identity providers. Built once at
/// start; cheap to share (`Send + Sync`).
pub struct Authenticator {
    issuers: HashMap<String, Arc<Issuer>>,
    refresh_cooldown: Duration,
    /// Tokens already verified, by SHA-256 of the token: a repeated token skips the
    /// signature check (tens of microseconds) while its `exp` holds and the key that
    /// verified it is still in its issuer's key set.
    verified: std::sync::Mutex<HashMap<[u8; 32], Verified>>,
}

/// A cache entry of [`Authenticator::verified`].
struct Verified {
    caller: Arc<Caller>,
    exp: i64,
    issuer: Arc<Issuer>,
    key: Arc<VerifyKey>,
}

/// Most tokens kept in the verified-token cache (it is cleared when full).
const VERIFIED_CACHE_ENTRIES: usize = 16_384;

/// One configured IdP and its current keys.
struct Issuer {
    config: IssuerConfig,
    algorithms: Vec<Algorithm>,
    file_keys: Vec<Arc<VerifyKey>>,
    /// File keys followed by the last successfully fetched URL keys.
    keys: RwLock<Vec<Arc<VerifyKey>>>,
    /// When the last unknown-`kid` fetch started (rate limit).
    last_on_demand: tokio::sync::Mutex<Option<Instant>>,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut issuers: Vec<_> = self.issuers.keys().collect();
        issuers.sort();
        f.debug_struct("Authenticator")
            .field("issuers", &issuers)
            .finish()
    }
}

impl Authenticator {
    /// Validates the configuration and loads every JWKS file. URL JWKS are fetched by
    /// [`spawn_refresh`](Self::spawn_refresh) and on the first unknown `kid`.
    pub fn new(states: Vec<IssuerConfig>) -> Result<Authenticator, AuthConfigError> {
        let mut issuers = HashMap::new();
        for config in states {
            config.check()?;
            let algorithms = config.parsed_algorithms()?;
            let mut file_keys = Vec::new();
            if let Some(path) = &config.jwks_file {
                let keys =
                    jwks::load_jwks_file(path).map_err(|reason| AuthConfigError::JwksFile {
                        path: path.clone(),
                        reason,
                    })?;
                file_keys = keys.into_iter().map(Arc::new).collect();
            }
            if issuers.contains_key(&config.issuer) {
                return Err(config.invalid("issuer is configured twice"));
            }
            let issuer = Issuer {
                keys: RwLock::new(file_keys.clone()),
                file_keys,
                algorithms,
                last_on_demand: tokio::sync::Mutex::new(None),
                config,
            };
            issuers.insert(issuer.config.issuer.clone(), Arc::new(issuer));
        }
        Ok(Authenticator {
            issuers,
            refresh_cooldown: UNKNOWN_KID_REFRESH_COOLDOWN,
            verified: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// Changes the minimum time between two unknown-`kid` fetches (default 10 s). For
    /// tests.
    pub fn with_refresh_cooldown(mut self, cooldown: Duration) -> Self {
        self.refresh_cooldown = cooldown;
        self
    }

    /// The member states configured, in no particular order.
    pub fn states(&self) -> impl Iterator<Item = &Country> {
        self.issuers.values().map(|i| &i.config.state)
    }

    /// The caller of an `Authorization: Bearer <jwt>` header value whose token was
    /// verified before and is still valid: the synchronous fast path of
    /// [`Authenticator::authenticate`]. `None` means "not cached", not "invalid".
    pub fn authenticate_cached(&self, authorization_header: Option<&str>) -> Option<Arc<Caller>> {
        let token = bearer_token(authorization_header).ok()?;
        self.cached(&token_digest(token))
    }

    /// Authenticates an `Authorization: Bearer <jwt>` header value.
    pub async fn authenticate(
        &self,
        authorization_header: Option<&str>,
    ) -> Result<Arc<Caller>, AuthError> {
        let token = bearer_token(authorization_header)?;
        let digest = token_digest(token);
        if let Some(caller) = self.cached(&digest) {
            return Ok(caller);
        }
        let (header_part, payload_part) = split_token(token)?;
        let header = decode_json_part(header_part, "header")?;
        let alg = header_algorithm(&header)?;
        let kid = match header.get("kid") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(k)) => Some(k.as_str()),
            Some(_) => {
                return Err(AuthError::new(
                    reason::MALFORMED_TOKEN,
                    "the token header's `kid` is not a string",
                ));
            }
        };
        if header.get("crit").is_some() {
            return Err(AuthError::new(
                reason::MALFORMED_TOKEN,
                "the token header has a `crit` parameter; no extensions are supported",
            ));
        }

        // The unverified payload only selects the issuer; everything is checked again
        // after the signature.
        let payload = decode_json_part(payload_part, "payload")?;
        let iss = match payload.get("iss") {
            None | Some(serde_json::Value::Null) => {
                return Err(AuthError::new(
                    reason::MISSING_CLAIM,
                    "the token has no `iss` claim",
                ));
            }
            Some(serde_json::Value::String(s)) => s.as_str(),
            Some(_) => {
                return Err(AuthError::new(
                    reason::INVALID_CLAIM,
                    "the token's `iss` claim is not a string",
                ));
            }
        };
        let Some(issuer) = self.issuers.get(iss) else {
            return Err(AuthError::new(
                reason::UNKNOWN_ISSUER,
                format!(
                    "issuer `{}` is not a configured member-state IdP",
                    printable(iss)
                ),
            ));
        };
        if !issuer.algorithms.contains(&alg) {
            return Err(AuthError::new(
                reason::UNSUPPORTED_ALGORITHM,
                format!(
                    "algorithm {alg:?} is not allowed for issuer `{}`",
                    issuer.config.issuer
                ),
            ));
        }

        let key = self.find_key(issuer, kid, alg).await?;
        let mut validation = Validation::new(alg);
        validation.leeway = CLOCK_LEEWAY_SECS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = true;
        validation.set_audience(&[&issuer.config.audience]);
        validation.set_issuer(&[&issuer.config.issuer]);
        // `exp` is required too, but checked with the other claims so that a malformed
        // `exp` reads `invalid_claim` and an absent one `missing_claim`.
        validation.set_required_spec_claims(&["iss", "aud"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &key.key, &validation)
            .map_err(|e| map_jwt_error(&e, &issuer.config))?;
        let caller = Arc::new(claims::caller_from_claims(
            &issuer.config.state,
            &data.claims,
        )?);
        if let Some(exp) = data.claims.get("exp").and_then(serde_json::Value::as_i64) {
            let mut cache = self.verified.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() >= VERIFIED_CACHE_ENTRIES {
                cache.clear();
            }
            cache.insert(
                digest,
                Verified {
                    caller: caller.clone(),
                    exp,
                    issuer: issuer.clone(),
                    key,
                },
            );
        }
        Ok(caller)
    }

    /// A previously verified token that is still valid: not expired (with the same
    /// leeway as a full check) and its key still published by its issuer.
    fn cached(&self, digest: &[u8; 32]) -> Option<Arc<Caller>> {
        let mut cache = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        let entry = cache.get(digest)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(i64::MAX);
        let key_live = entry
            .issuer
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|k| Arc::ptr_eq(k, &entry.key));
        if now > entry.exp.saturating_add(CLOCK_LEEWAY_SECS as i64) || !key_live {
            cache.remove(digest);
            return None;
        }
        Some(entry.caller.clone())
    }

    /// Starts the periodic refresh of every URL JWKS (each every `refresh_secs`, the
    /// first at once). A failed fetch keeps the cached keys and logs a warning. `None`
    /// when no IdP has a URL. Must be called from within a Tokio runtime.
    pub fn spawn_refresh(self: &Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        let with_url: Vec<Arc<Issuer>> = self
            .issuers
            .values()
            .filter(|i| i.config.jwks_url.is_some())
            .cloned()
            .collect();
        if with_url.is_empty() {
            return None;
        }
        let runtime = match tokio::runtime::Handle::try_current() {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "JWKS refresh not started: no Tokio runtime");
                return None;
            }
        };
        Some(runtime.spawn(async move {
            let mut loops = tokio::task::JoinSet::new();
            for issuer in with_url {
                loops.spawn(refresh_loop(issuer));
            }
            while loops.join_next().await.is_some() {}
        }))
    }

    /// The key for `kid` (or the only key of algorithm `alg` when the token has no
    /// `kid`); on a miss, one rate-limited fetch of the issuer's URL JWKS.
    async fn find_key(
        &self,
        issuer: &Issuer,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<Arc<VerifyKey>, AuthError> {
        if let Some(key) = issuer.lookup(kid, alg)? {
            return Ok(key);
        }
        if issuer.config.jwks_url.is_some() {
            self.refresh_on_demand(issuer).await;
            if let Some(key) = issuer.lookup(kid, alg)? {
                return Ok(key);
            }
        }
        Err(AuthError::new(
            reason::UNKNOWN_KEY_ID,
            match kid {
                Some(kid) => format!(
                    "key id `{}` is not in the JWKS of issuer `{}`",
                    printable(kid),
                    issuer.config.issuer
                ),
                None => format!(
                    "the token has no `kid` and issuer `{}` does not have exactly one {alg:?} key",
                    issuer.config.issuer
                ),
            },
        ))
    }

    async fn refresh_on_demand(&self, issuer: &Issuer) {
        let Some(url) = &issuer.config.jwks_url else {
            return;
        };
        let mut last = issuer.last_on_demand.lock().await;
        if let Some(at) = *last
            && at.elapsed() < self.refresh_cooldown
        {
            return;
        }
        *last = Some(Instant::now());
        match jwks::fetch_jwks(url, issuer.config.jwks_ca_file.as_deref()).await {
            Ok(keys) => issuer.set_url_keys(keys),
            Err(e) => tracing::warn!(
                state = %issuer.config.state, url = %url, error = %e,
                "JWKS fetch after an unknown kid failed; keeping the cached keys"
            ),
        }
    }
}

impl Issuer {
    fn lookup(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<Option<Arc<VerifyKey>>, AuthError> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let found = match kid {
            Some(kid) => keys.iter().find(|k| k.kid.as_deref() == Some(kid)).cloned(),
            None => {
                let mut same_alg = keys.iter().filter(|k| k.alg == alg);
                match (same_alg.next(), same_alg.next()) {
                    (Some(only), None) => Some(only.clone()),
                    _ => None,
                }
            }
        };
        match found {
            Some(key) if key.alg != alg => Err(AuthError::new(
                reason::UNSUPPORTED_ALGORITHM,
                format!(
                    "the token says {alg:?} but key `{}` is a {:?} key",
                    kid.unwrap_or_default(),
                    key.alg
                ),
            )),
            other => Ok(other),
        }
    }

    fn set_url_keys(&self, url_keys: Vec<VerifyKey>) {
        let mut all = self.file_keys.clone();
        all.extend(url_keys.into_iter().map(Arc::new));
        let count = all.len();
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = all;
        tracing::debug!(state = %self.config.state, keys = count, "JWKS refreshed");
    }
}

async fn refresh_loop(issuer: Arc<Issuer>) {
    let Some(url) = issuer.config.jwks_url.clone() else {
        return;
    };
    let mut interval =
        tokio::time::interval(Duration::from_secs(issuer.config.refresh_secs.max(1)));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        match jwks::fetch_jwks(&url, issuer.config.jwks_ca_file.as_deref()).await {
            Ok(keys) => issuer.set_url_keys(keys),
            Err(e) => tracing::warn!(
                state = %issuer.config.state, url = %url, error = %e,
                "JWKS refresh failed; keeping the cached keys"
            ),
        }
    }
}
