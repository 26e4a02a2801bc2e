//! The admin listener: health, the active policy hash, the workers' status, and the
//! auditors' read-only view of their member state's audit log (JSON under
//! `/admin/audit/`, one self-contained page at `/audit/`).
//!
//! Every `/admin/audit/` endpoint needs a bearer token of the state's identity provider
//! with the role `auditor`; an auditor sees only the log of the token's own `state`. This
//! module reads the log through `audit`'s read side; it must not write to the log, and it
//! never serves prompt or completion text (the log holds none).

mod query;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::{Value, json};

use crate::audit::{self, AuditError, AuditLog, Filter, VerifierKey};
use crate::auth::{Authenticator, Caller};
use crate::error::ApiError;
use crate::policy::PolicyStore;
use crate::route::Router;
use query::{Query, RECORD_PARAMS};

/// The role a token must carry to use the auditor endpoints and page.
pub const AUDITOR_ROLE: &str = "auditor";
/// How long a log verification result is reused.
pub const VERIFY_CACHE: Duration = Duration::from_secs(5);

/// The auditor page: HTML, CSS and script in one file, no external resources.
const AUDITOR_PAGE: &str = include_str!("admin/auditor_page.html");
const PAGE_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                        connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
                        frame-ancestors 'none'";

/// The admin listener's app.
pub struct Admin {
    policy: Arc<PolicyStore>,
    router: Arc<Router>,
    auth: Arc<Authenticator>,
    logs: AuditorView,
}

impl Admin {
    pub fn new(
        policy: Arc<PolicyStore>,
        router: Arc<Router>,
        auth: Arc<Authenticator>,
        audit: &AuditLog,
    ) -> Result<Admin, AuditError> {
        let dirs = audit
            .states()
            .filter_map(|s| audit.state_dir(s).map(|d| (s.to_string(), d.to_path_buf())))
            .collect();
        Ok(Admin {
            policy,
            router,
            auth,
            logs: AuditorView {
                dirs,
                keys: vec![VerifierKey::parse(&audit.public_key())?],
                verified: Mutex::new(HashMap::new()),
            },
        })
    }
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, s: &mut ServerSession) -> http::Response<Vec<u8>> {
        let req = s.req_header();
        let path = req.uri.path().to_string();
        let raw_query = req.uri.query().map(str::to_string);
        let read_only = req.method == http::Method::GET || req.method == http::Method::HEAD;
        let authorization = req
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let result = match path.as_str() {
            "/health" => Ok(json!({"status": "ok"})),
            "/admin/status" => Ok(json!({
                "policy_hash": self.policy.hash(),
                "states": self.policy.current().states().collect::<Vec<_>>(),
                "workers": self.router.status(),
            })),
            "/admin/policy-hash" => Ok(json!({"policy_hash": self.policy.hash()})),
            "/audit" | "/audit/" if read_only => return page(),
            p if p.starts_with("/admin/audit/") || p == "/audit" || p == "/audit/" => {
                if read_only {
                    self.auditor_api(p, raw_query.as_deref(), authorization.as_deref())
                        .await
                } else {
                    Err(ApiError::new(
                        405,
                        "invalid_request_error",
                        "method_not_allowed",
                        "the auditor endpoints are read-only (GET)",
                    ))
                }
            }
            _ => Err(ApiError::not_found(format!("no such endpoint: {path}"))),
        };
        match result {
            Ok(v) => json_response(200, &v, None),
            Err(e) => json_response(e.status, &e.to_json(), Some(&e)),
        }
    }
}

impl Admin {
    async fn auditor_api(
        &self,
        path: &str,
        raw_query: Option<&str>,
        authorization: Option<&str>,
    ) -> Result<Value, ApiError> {
        let caller = self.auditor(authorization).await?;
        let state = caller.state.as_str().to_string();
        match path {
            "/admin/audit/records" => {
                let q = Query::parse(raw_query, RECORD_PARAMS)?;
                check_state(&q, &state)?;
                let filter = Filter {
                    state: Some(state.clone()),
                    ..q.filter()?
                };
                self.logs.records(&state, filter).await
            }
            "/admin/audit/proof" => {
                let q = Query::parse(raw_query, &["state", "request_id", "seq"])?;
                check_state(&q, &state)?;
                let target = match (q.get("request_id"), q.number("seq")?) {
                    (Some(id), None) => ProofOf::Request(id.to_string()),
                    (None, Some(seq)) => ProofOf::Seq(seq),
                    _ => {
                        return Err(ApiError::bad_request(
                            "missing_parameter",
                            "give exactly one of `request_id` or `seq`",
                        )
                        .with_param("request_id"));
                    }
                };
                self.logs.proof(&state, target).await
            }
            "/admin/audit/verify" => {
                let q = Query::parse(raw_query, &["state"])?;
                check_state(&q, &state)?;
                self.logs.verify(&state).await
            }
            p => {
                let seq = p
                    .strip_prefix("/admin/audit/records/")
                    .ok_or_else(|| ApiError::not_found(format!("no such endpoint: {p}")))?;
                Query::parse(raw_query, &["state"]).and_then(|q| check_state(&q, &state))?;
                let seq = seq.parse::<u64>().map_err(|_| {
                    ApiError::bad_request(
                        "invalid_seq",
                        "the path must end in a record's sequence number",
                    )
                })?;
                self.logs.record(&state, seq).await
            }
        }
    }

    /// The caller, if its token is valid and carries the auditor role.
    async fn auditor(
        &self,
        authorization: Option<&str>,
    ) -> Result<std::sync::Arc<Caller>, ApiError> {
        let caller =
            self.auth
                .authenticate(authorization)
                .await
                .map_err(|e| match e.http_status() {
                    401 => ApiError::unauthorized(e.reason, e.message.clone()),
                    status => {
                        ApiError::new(status, "permission_error", e.reason, e.message.clone())
                    }
                })?;
        if !caller.has_role(AUDITOR_ROLE) {
            return Err(ApiError::forbidden(
                "auditor_role_required",
                format!(
                    "the audit log is readable only with a token carrying the role `{AUDITOR_ROLE}`"
                ),
            ));
        }
        Ok(caller)
    }
}

/// An auditor may name its own state only.
fn check_state(q: &Query, own: &str) -> Result<(), ApiError> {
    match q.get("state") {
        Some(s) if !s.eq_ignore_ascii_case(own) => Err(ApiError::forbidden(
            "state_not_permitted",
            format!("an auditor of {own} may read only the {own} audit log"),
        )
        .with_param("state")),
        _ => Ok(()),
    }
}

enum ProofOf {
    Request(String),
    Seq(u64),
}

/// The state logs as auditors see them (read-only), with a short-lived verify cache.
struct AuditorView {
    dirs: BTreeMap<String, PathBuf>,
    keys: Vec<VerifierKey>,
    verified: Mutex<HashMap<String, (Instant, Value)>>,
}

impl AuditorView {
    fn dir(&self, state: &str) -> Result<PathBuf, ApiError> {
        self.dirs.get(state).cloned().ok_or_else(|| {
            ApiError::new(
                404,
                "invalid_request_error",
                "no_audit_log",
                format!("this gateway keeps no audit log for {state}"),
            )
        })
    }

    /// Matching records, newest first.
    async fn records(&self, state: &str, filter: Filter) -> Result<Value, ApiError> {
        let dir = self.dir(state)?;
        let limit = filter.limit;
        let mut records = blocking(move || audit::read_records(&dir, &filter)).await??;
        records.reverse();
        Ok(json!({
            "state": state,
            "count": records.len(),
            "limit": limit,
            "records": records,
        }))
    }

    /// One record, its canonical line and its Merkle leaf hash.
    async fn record(&self, state: &str, seq: u64) -> Result<Value, ApiError> {
        let dir = self.dir(state)?;
        let found = blocking(move || audit::read_records(&dir, &Filter::default())).await??;
        let rec = found.into_iter().find(|r| r.seq == seq).ok_or_else(|| {
            ApiError::new(
                404,
                "invalid_request_error",
                "record_not_found",
                format!("the {state} log has no record {seq}"),
            )
        })?;
        let canonical = rec.canonical().map_err(audit_error)?;
        Ok(json!({
            "record": rec,
            "leaf_hash": crate::hexstr(audit::leaf_hash(&canonical)),
            "canonical": String::from_utf8_lossy(&canonical),
        }))
    }

    /// An inclusion proof against the latest checkpoint, checked here with the log's key.
    async fn proof(&self, state: &str, of: ProofOf) -> Result<Value, ApiError> {
        let dir = self.dir(state)?;
        let proof = blocking(move || match of {
            ProofOf::Request(id) => audit::inclusion_proof(&dir, &id),
            ProofOf::Seq(seq) => audit::inclusion_proof_at(&dir, seq),
        })
        .await??;
        let check = audit::verify_proof(&proof, &self.keys);
        Ok(json!({
            "verified": check.is_ok(),
            "error": check.err(),
            "key": self.keys.first().map(VerifierKey::line),
            "proof": proof,
        }))
    }

    /// The whole log verified against the gateway's key (reused for [`VERIFY_CACHE`]).
    async fn verify(&self, state: &str) -> Result<Value, ApiError> {
        if let Ok(cache) = self.verified.lock()
            && let Some((at, v)) = cache.get(state)
            && at.elapsed() < VERIFY_CACHE
        {
            let mut v = v.clone();
            v["cached"] = json!(true);
            return Ok(v);
        }
        let dir = self.dir(state)?;
        let keys = self.keys.clone();
        let v = blocking(move || {
            let report = audit::verify_dir(&dir, &keys, |_| {});
            let Some(log) = report.logs.into_iter().next() else {
                return Err(AuditError::NotFound("no audit log found".into()));
            };
            let note = match log.latest_checkpoint {
                Some(size) if log.error.is_none() => audit::checkpoint_note(&dir, size)?,
                _ => None,
            };
            Ok(json!({
                "ok": log.error.is_none(),
                "origin": log.origin,
                "start": log.start,
                "size": log.size,
                "checkpoints": log.checkpoints,
                "latest_checkpoint": log.latest_checkpoint,
                "latest_checkpoint_note": note,
                "warnings": log.warnings,
                "error": log.error,
            }))
        })
        .await??;
        let mut v = v;
        v["state"] = json!(state);
        v["checked_at"] =
            json!(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
        v["key"] = json!(self.keys.first().map(VerifierKey::line));
        v["cached"] = json!(false);
        if let Ok(mut cache) = self.verified.lock() {
            cache.insert(state.to_string(), (Instant::now(), v.clone()));
        }
        Ok(v)
    }
}

/// Run file reading off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AuditError> + Send + 'static,
) -> Result<Result<T, ApiError>, ApiError> {
    tokio::task::spawn_blocking(move || f().map_err(audit_error))
        .await
        .map_err(|e| ApiError::internal(format!("audit read task failed: {e}")))
}

fn audit_error(e: AuditError) -> ApiError {
    match e {
        AuditError::NotFound(m) => {
            ApiError::new(404, "invalid_request_error", "record_not_found", m)
        }
        e => ApiError::new(500, "server_error", "audit_read_failed", e.to_string()),
    }
}

fn json_response(status: u16, body: &Value, err: Option<&ApiError>) -> http::Response<Vec<u8>> {
    let bytes = body.to_string().into_bytes();
    let mut b = http::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("cache-control", "no-store")
        .header("x-content-type-options", "nosniff")
        .header("content-length", bytes.len());
    if status == 401 {
        b = b.header("www-authenticate", "Bearer");
    }
    if let Some(secs) = err.and_then(|e| e.retry_after) {
        b = b.header("retry-after", secs);
    }
    b.body(bytes).unwrap_or_default()
}

fn page() -> http::Response<Vec<u8>> {
    let bytes = AUDITOR_PAGE.as_bytes().to_vec();
    http::Response::builder()
        .status(200)
        .header("content-type", "text/html; charset=utf-8")
        .header("content-security-policy", PAGE_CSP)
        .header("x-content-type-options", "nosniff")
        .header("x-frame-options", "DENY")
        .header("referrer-policy", "no-referrer")
        .header("cache-control", "no-store")
        .header("content-length", bytes.len())
        .body(bytes)
        .unwrap_or_default()
}
