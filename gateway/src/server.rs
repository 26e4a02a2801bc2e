//! The front end: a pingora `HttpServerApp` that runs each request through the phases
//! auth -> body -> classification -> policy -> route -> relay, each a plain function of
//! the request's context (see docs/architecture.md). The data plane never goes through
//! pingora's upstream proxy path: the body is read here, the worker is called over gRPC
//! and the response (streamed or whole) is written from here.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, HttpServerOptions, ReusedHttpStream};
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;
use proto::openai::{self, ChatRequest, CompletionRequest, Endpoint, Prompt, ResponseMeta};
use proto::worker as pb;

use crate::audit::{self, AuditLog};
use crate::auth::{Authenticator, Caller};
use crate::body;
use crate::domain::Classification;
use crate::error::ApiError;
use crate::policy::{Candidate, DecisionRequest, PolicyStore};
use crate::pools::PoolsConfig;
use crate::relay::{self, Relayed};
use crate::route::{self, Router};

/// Header naming the request's data classification.
pub const CLASSIFICATION_HEADER: &str = "x-data-classification";
pub const POOL_HEADER: &str = "x-residency-pool";
pub const COUNTRY_HEADER: &str = "x-residency-country";
pub const REQUEST_ID_HEADER: &str = "x-request-id";
pub const POLICY_HASH_HEADER: &str = "x-policy-hash";
pub const RECEIPT_HEADER: &str = "x-residency-receipt";

/// Everything a request needs, shared by all connections (one clone per front-end
/// thread's listener).
#[derive(Clone)]
pub struct Gateway {
    pub auth: Arc<Authenticator>,
    pub audit: Arc<AuditLog>,
    pub policy: Arc<PolicyStore>,
    pub pools: Arc<PoolsConfig>,
    pub router: Arc<Router>,
    pub max_body_bytes: usize,
    pub options: HttpServerOptions,
}

/// Counts a request in [`AuditLog::in_flight`](audit::AuditLog::in_flight) while it
/// lives (it decides whether the audit writer and appends may poll).
struct ActiveGuard<'a>(&'a AtomicUsize);

impl<'a> ActiveGuard<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Self(n)
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a request ended as, for the access log.
struct Outcome {
    status: u16,
    code: String,
    pool: Option<String>,
    tokens: Option<(u32, u32)>,
}

/// The per-request context the phases fill in.
struct RequestCtx {
    id: String,
    started: Instant,
    caller: Option<Arc<Caller>>,
    classification: Option<Classification>,
    model: Option<String>,
}

#[async_trait]
impl HttpServerApp for Gateway {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        match session.read_request().await {
            Ok(true) => {}
            Ok(false) | Err(_) => return None,
        }
        session.set_keepalive(if *shutdown.borrow() { None } else { Some(60) });
        let active = ActiveGuard::new(self.audit.in_flight());
        let mut ctx = RequestCtx {
            id: new_request_id(),
            started: Instant::now(),
            caller: None,
            classification: None,
            model: None,
        };
        let (outcome, reusable) = self.dispatch(&mut session, &mut ctx).await;
        drop(active);
        log_request(&ctx, &outcome);
        if !reusable {
            return None;
        }
        let settings = HttpPersistentSettings::for_session(&session);
        match session.finish().await {
            Ok(s) => s.map(|s| ReusedHttpStream::from_reusable_stream(s, settings)),
            Err(_) => None,
        }
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        Some(&self.options)
    }
}

impl Gateway {
    /// Routes one request; returns its outcome and whether the connection may be reused.
    async fn dispatch(&self, s: &mut ServerSession, ctx: &mut RequestCtx) -> (Outcome, bool) {
        let method = s.req_header().method.clone();
        let path = s.req_header().uri.path().to_string();
        let result = match (method.as_str(), path.as_str()) {
            ("POST", "/v1/chat/completions") => self.completion(s, ctx, Endpoint::Chat).await,
            ("POST", "/v1/completions") => self.completion(s, ctx, Endpoint::Text).await,
            ("GET", "/v1/models") => self.models(s, ctx).await,
            ("GET", "/health") => {
                let body = serde_json::json!({"status": "ok", "policy_hash": self.policy.hash()});
                let ok = write_json(s, 200, &[], &body, &ctx.id).await;
                return (outcome(200, "ok"), ok);
            }
            (_, "/v1/chat/completions" | "/v1/completions" | "/v1/models" | "/health") => {
                Err(ApiError::new(
                    405,
                    "invalid_request_error",
                    "method_not_allowed",
                    format!("{method} is not allowed on {path}"),
                ))
            }
            _ => Err(ApiError::not_found(format!("no such endpoint: {path}"))),
        };
        match result {
            Ok(o) => {
                let reusable = o.status < 500 && o.code != "client_disconnected";
                (o, reusable)
            }
            Err(e) => {
                // A body we refused to read leaves the connection unusable.
                let reusable = e.status != 413 && s.is_body_done();
                let ok = write_error(s, &e, &ctx.id).await;
                (outcome(e.status, &e.code), ok && reusable)
            }
        }
    }

    async fn authenticate(
        &self,
        s: &ServerSession,
        ctx: &mut RequestCtx,
    ) -> Result<Arc<Caller>, ApiError> {
        let header = s
            .get_header(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        // A cached token is the common case and needs no future; the full check (which
        // may fetch JWKS) is boxed so that its large state is not part of every
        // request's future, which is allocated and moved per request.
        let caller = match self.auth.authenticate_cached(header) {
            Some(caller) => caller,
            None => Box::pin(self.auth.authenticate(header))
                .await
                .map_err(|e| match e.http_status() {
                    401 => ApiError::unauthorized(e.reason, e.message.clone()),
                    status => {
                        ApiError::new(status, "permission_error", e.reason, e.message.clone())
                    }
                })?,
        };
        ctx.caller = Some(caller.clone());
        Ok(caller)
    }

    async fn models(
        &self,
        s: &mut ServerSession,
        ctx: &mut RequestCtx,
    ) -> Result<Outcome, ApiError> {
        let caller = self.authenticate(s, ctx).await?;
        let classification = requested_classification(s, &caller)?;
        let data: Vec<serde_json::Value> = self
            .pools
            .models()
            .into_iter()
            .filter(|m| {
                let d = self.policy.decide(&DecisionRequest {
                    state: caller.state.as_str(),
                    ministry: &caller.ministry,
                    clearance: caller.clearance,
                    classification,
                    model: m,
                });
                d.allowed().next().is_some()
            })
            .map(|m| serde_json::json!({"id": m, "object": "model", "created": 0, "owned_by": "sovereign-gateway"}))
            .collect();
        let body = serde_json::json!({"object": "list", "data": data});
        write_json(s, 200, &[], &body, &ctx.id).await;
        Ok(outcome(200, "ok"))
    }

    async fn completion(
        &self,
        s: &mut ServerSession,
        ctx: &mut RequestCtx,
        endpoint: Endpoint,
    ) -> Result<Outcome, ApiError> {
        // 1. auth
        let caller = self.authenticate(s, ctx).await?;
        // 2. body
        let bytes = body::read_bounded(s, self.max_body_bytes).await?;
        let parsed = ParsedRequest::parse(&bytes, endpoint, &ctx.id)?;
        ctx.model = Some(parsed.model.clone());
        let state = caller.state.as_str();
        let base = self.audit_base(ctx, &caller, &parsed);
        // 3. classification (a refusal is audited too)
        let classification = match requested_classification(s, &caller) {
            Ok(c) => c,
            Err(e) => {
                let mut rec = base.clone();
                // The classification asked for, when it was a valid one.
                rec.classification = s
                    .get_header(CLASSIFICATION_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().to_ascii_lowercase().parse().ok());
                rec.decision = Some(audit::Decision::Deny);
                rec.reason_codes = vec![e.code.clone()];
                rec.outcome = Some(audit::Outcome {
                    status: e.status,
                    code: e.code.clone(),
                });
                self.append_audit(rec).await?;
                return Err(e);
            }
        };
        ctx.classification = Some(classification);
        // 4. policy
        let decision = self.policy.decide(&DecisionRequest {
            state,
            ministry: &caller.ministry,
            clearance: caller.clearance,
            classification,
            model: &parsed.model,
        });
        let allowed: Vec<&Candidate> = decision.allowed().collect();
        let mut rec = base.clone();
        rec.classification = Some(classification);
        rec.policy_hash = Some(decision.policy_hash.clone());
        rec.candidates = decision
            .candidates
            .iter()
            .map(|c| audit::Candidate {
                pool: c.pool.clone(),
                country: c.country.clone(),
                allowed: c.allowed,
                policy_ids: c.policy_ids.clone(),
                reasons: c.reasons.clone(),
            })
            .collect();
        if allowed.is_empty() {
            let e = if !self.pools.models().contains(parsed.model.as_str()) {
                ApiError::new(
                    404,
                    "invalid_request_error",
                    "model_not_found",
                    format!("no pool serves the model `{}`", parsed.model),
                )
                .with_param("model")
            } else {
                let reasons = decision.deny_reasons();
                let mut e = ApiError::forbidden(
                    "residency_denied",
                    format!(
                        "the {} policy allows no pool for {} data with model `{}` (reasons: {})",
                        caller.state,
                        classification,
                        parsed.model,
                        reasons.join(", ")
                    ),
                );
                e.reasons = reasons;
                e
            };
            rec.decision = Some(audit::Decision::Deny);
            rec.reason_codes = if e.reasons.is_empty() {
                vec![e.code.clone()]
            } else {
                e.reasons.clone()
            };
            rec.outcome = Some(audit::Outcome {
                status: e.status,
                code: e.code.clone(),
            });
            self.append_audit(rec).await?;
            return Err(e);
        }
        // 5. audit: the decision is durable before any byte goes to a worker.
        rec.decision = Some(audit::Decision::Allow);
        rec.pool = Some(allowed[0].pool.clone());
        rec.pool_country = Some(allowed[0].country.clone());
        // The receipt names the serving pool, almost always the first allowed one: the
        // audit writer signs it for that pool right after the group commit, beside the
        // worker call (on its own thread, so a lone request's worker is not kept waiting
        // for this thread's CPU), and it is signed again only if the request fell over to
        // another pool.
        let first = &allowed[0];
        let subject = audit::ReceiptSubject {
            request_id: &ctx.id,
            state,
            pool: &first.pool,
            country: &first.country,
            policy_hash: &decision.policy_hash,
        };
        let (decision_rec, speculative) = self
            .audit
            .append_with_receipt(rec, &subject)
            .await
            .map_err(audit_unavailable)?;
        let mut completion = base;
        completion.phase = audit::Phase::Completion;
        completion.classification = Some(classification);
        completion.policy_hash = Some(decision.policy_hash.clone());
        completion.prompt_hmac = None;
        // 6. route + relay (retry on another allowed worker only before the first token)
        let prefix = route::prefix_key(&parsed.prefix_bytes, self.router.cfg.affinity_prefix_bytes);
        let started = match relay::start(&self.router, &allowed, &parsed.request, prefix).await {
            Ok(st) => st,
            Err(e) => {
                completion.outcome = Some(audit::Outcome {
                    status: e.status,
                    code: e.code.clone(),
                });
                completion.latency_ms = Some(ctx.started.elapsed().as_millis() as u64);
                self.append_completion(completion);
                return Err(e);
            }
        };
        let pool = started.pool.clone();
        // Polled only now, when it is almost always ready: waiting on it earlier would
        // cost this thread a wake-up when it arrives.
        let receipt = if started.pool == first.pool && started.country == first.country {
            match speculative.await {
                Ok(r) => r,
                Err(_) => self.audit.receipt(&decision_rec, &subject),
            }
        } else {
            let served_by = audit::ReceiptSubject {
                pool: &started.pool,
                country: &started.country,
                ..subject
            };
            self.audit.receipt(&decision_rec, &served_by)
        };
        completion.pool = Some(started.pool.clone());
        completion.pool_country = Some(started.country.clone());
        completion.model_served = Some(parsed.model.clone());
        let headers = [
            (POOL_HEADER, completion.pool.as_deref().unwrap_or_default()),
            (
                COUNTRY_HEADER,
                completion.pool_country.as_deref().unwrap_or_default(),
            ),
            (POLICY_HASH_HEADER, decision.policy_hash.as_str()),
            (RECEIPT_HEADER, receipt.as_str()),
        ];
        let relayed = if parsed.stream {
            relay::stream_sse(
                s,
                started,
                &parsed.meta,
                parsed.include_usage,
                &headers,
                &ctx.id,
            )
            .await
        } else {
            relay::whole(s, started, &parsed.meta, &headers, &ctx.id).await
        };
        let out = match relayed {
            Relayed::Done { usage, text } => {
                completion.prompt_tokens = Some(usage.prompt_tokens);
                completion.completion_tokens = Some(usage.completion_tokens);
                completion.response_hmac = self.audit.hmac(state, text.as_bytes()).ok();
                Outcome {
                    status: 200,
                    code: "ok".into(),
                    pool: Some(pool),
                    tokens: Some((usage.prompt_tokens as u32, usage.completion_tokens as u32)),
                }
            }
            Relayed::ClientGone => Outcome {
                status: 499,
                code: "client_disconnected".into(),
                pool: Some(pool),
                tokens: None,
            },
            Relayed::Failed(e) => Outcome {
                status: e.status,
                code: e.code,
                pool: Some(pool),
                tokens: None,
            },
        };
        completion.outcome = Some(audit::Outcome {
            status: out.status,
            code: out.code.clone(),
        });
        completion.latency_ms = Some(ctx.started.elapsed().as_millis() as u64);
        self.append_completion(completion);
        Ok(out)
    }

    /// The fields every record of this request shares (no prompt text: only its HMAC
    /// under the state's key).
    fn audit_base(
        &self,
        ctx: &RequestCtx,
        caller: &Caller,
        parsed: &ParsedRequest,
    ) -> audit::RecordInput {
        let state = caller.state.as_str();
        let caller_hmac = caller.audit_hmac.get_or_init(|| {
            let identity = format!(
                "{}/{}",
                caller.ministry,
                caller.subject.as_deref().unwrap_or("")
            );
            self.audit.hmac(state, identity.as_bytes()).ok()
        });
        audit::RecordInput {
            phase: audit::Phase::Decision,
            request_id: ctx.id.clone(),
            state: state.to_string(),
            ministry: Some(caller.ministry.clone()),
            caller_hmac: caller_hmac.map(str::to_owned),
            model_requested: Some(parsed.model.clone()),
            prompt_hmac: self.audit.hmac(state, &parsed.prompt_digest).ok(),
            ..Default::default()
        }
    }

    /// Appends a decision record; fails closed with 503 `audit_unavailable`.
    async fn append_audit(&self, rec: audit::RecordInput) -> Result<audit::Appended, ApiError> {
        self.audit.append(rec).await.map_err(audit_unavailable)
    }

    /// Appends a completion record without holding up the response or the next
    /// request's decision record (lazy durability: it shares a later fsync). A failure
    /// is logged; the answer has been given and the decision record is durable.
    fn append_completion(&self, rec: audit::RecordInput) {
        if let Err(e) = self.audit.append_lazy(rec) {
            tracing::error!(error = %e, "completion record not written");
        }
    }
}

/// A decision record that could not be made durable: the request is refused.
fn audit_unavailable(e: audit::AuditError) -> ApiError {
    tracing::error!(error = %e, "audit record not durable; request refused");
    ApiError::unavailable(
        "audit_unavailable",
        "the audit log cannot record this request durably, so it is not processed",
    )
}

/// An OpenAI request translated into the worker contract.
struct ParsedRequest {
    model: String,
    stream: bool,
    include_usage: bool,
    request: pb::GenerateRequest,
    meta: ResponseMeta,
    /// The start of the prompt, for prefix affinity (never logged).
    prefix_bytes: Vec<u8>,
    /// What the prompt HMAC covers (`audit::prompt_digest_input_*`); never logged.
    prompt_digest: Vec<u8>,
}

impl ParsedRequest {
    fn parse(bytes: &[u8], endpoint: Endpoint, id: &str) -> Result<Self, ApiError> {
        let (common, input, prefix_bytes, prompt_digest) = match endpoint {
            Endpoint::Chat => {
                let mut r: ChatRequest = openai::parse(bytes)?;
                let messages = r.take_messages()?;
                if messages.is_empty() {
                    return Err(ApiError::bad_request("empty_prompt", "messages is empty")
                        .with_param("messages"));
                }
                let prefix: Vec<u8> = messages
                    .iter()
                    .flat_map(|m| m.content.as_bytes().iter().copied())
                    .take(4096)
                    .collect();
                let pairs: Vec<(&str, &str)> = messages
                    .iter()
                    .map(|m| (m.role.as_str(), m.content.as_str()))
                    .collect();
                let digest = audit::prompt_digest_input_chat(&pairs);
                (
                    r.common,
                    pb::generate_request::Input::Chat(pb::ChatMessages { messages }),
                    prefix,
                    digest,
                )
            }
            Endpoint::Text => {
                let r: CompletionRequest = openai::parse(bytes)?;
                let text = match r.prompt()? {
                    Prompt::Text(t) => t,
                    Prompt::Tokens(_) => {
                        return Err(ApiError::bad_request(
                            "unsupported_parameter",
                            "token-id prompts are not accepted by the gateway; send text",
                        )
                        .with_param("prompt"));
                    }
                };
                let prefix = text.as_bytes()[..text.len().min(4096)].to_vec();
                let digest = audit::prompt_digest_input_text(&text);
                (
                    r.common,
                    pb::generate_request::Input::Prompt(text),
                    prefix,
                    digest,
                )
            }
        };
        if common.model.is_empty() {
            return Err(
                ApiError::bad_request("missing_field", "model is required").with_param("model")
            );
        }
        let sampling = common.sampling()?;
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let prefix_id = if endpoint == Endpoint::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        };
        Ok(Self {
            model: common.model.clone(),
            stream: common.stream,
            include_usage: common.include_usage(),
            request: pb::GenerateRequest {
                request_id: id.to_string(),
                model: common.model.clone(),
                input: Some(input),
                sampling: Some(sampling),
                priority: common.priority,
            },
            meta: ResponseMeta {
                id: format!("{prefix_id}-{id}"),
                created,
                model: common.model.clone(),
                endpoint,
            },
            prefix_bytes,
            prompt_digest,
        })
    }
}

/// The classification header, else the token's default; never above the clearance.
fn requested_classification(
    s: &ServerSession,
    caller: &Caller,
) -> Result<Classification, ApiError> {
    let c = match s.get_header(CLASSIFICATION_HEADER) {
        None => caller.default_classification,
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.trim().to_ascii_lowercase().parse::<Classification>().ok())
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_classification",
                    format!(
                        "{CLASSIFICATION_HEADER} must be one of public, internal, restricted; got `{}`",
                        String::from_utf8_lossy(v.as_bytes())
                    ),
                )
            })?,
    };
    if c > caller.clearance {
        return Err(ApiError::forbidden(
            "classification_above_clearance",
            format!(
                "{c} data is above the caller's clearance ({})",
                caller.clearance
            ),
        ));
    }
    Ok(c)
}

fn outcome(status: u16, code: &str) -> Outcome {
    Outcome {
        status,
        code: code.to_string(),
        pool: None,
        tokens: None,
    }
}

/// One structured log line per request: who, what class, where, how it ended. Never the
/// prompt or the completion.
fn log_request(ctx: &RequestCtx, o: &Outcome) {
    if !tracing::enabled!(tracing::Level::INFO) {
        return;
    }
    let (state, ministry) = ctx
        .caller
        .as_ref()
        .map(|c| (c.state.as_str(), c.ministry.as_str()))
        .unwrap_or_default();
    tracing::info!(
        request_id = %ctx.id,
        state = %state,
        ministry = %ministry,
        classification = %ctx.classification.map(|c| c.to_string()).unwrap_or_default(),
        model = %ctx.model.as_deref().unwrap_or(""),
        pool = %o.pool.as_deref().unwrap_or(""),
        status = o.status,
        code = %o.code,
        prompt_tokens = o.tokens.map(|t| t.0).unwrap_or(0),
        completion_tokens = o.tokens.map(|t| t.1).unwrap_or(0),
        ms = ctx.started.elapsed().as_millis() as u64,
        "request"
    );
}

/// 16 random hex characters.
pub fn new_request_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// A response header with the request id and the given extra headers.
pub fn response_header(
    status: u16,
    content_type: &'static str,
    len: Option<usize>,
    extra: &[(&'static str, &str)],
    request_id: &str,
) -> Option<ResponseHeader> {
    // No case map: names go out as given (ours are lower case) or title-cased (standard
    // ones), and the second header map per response is saved.
    let mut h = ResponseHeader::build_no_case(status, Some(4 + extra.len())).ok()?;
    h.insert_header(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    )
    .ok()?;
    if let Some(n) = len {
        h.insert_header(http::header::CONTENT_LENGTH, http::HeaderValue::from(n))
            .ok()?;
    }
    h.insert_header(REQUEST_ID_HEADER, request_id).ok()?;
    for (k, v) in extra {
        h.insert_header(*k, *v).ok()?;
    }
    Some(h)
}

/// Writes a whole JSON response; false if the client is gone.
pub async fn write_json(
    s: &mut ServerSession,
    status: u16,
    extra: &[(&'static str, &str)],
    body: &impl serde::Serialize,
    request_id: &str,
) -> bool {
    // Our bodies are structs and string-keyed maps: serializing them cannot fail.
    let Ok(bytes) = serde_json::to_vec(body).map(Bytes::from) else {
        return false;
    };
    let Some(h) = response_header(
        status,
        "application/json",
        Some(bytes.len()),
        extra,
        request_id,
    ) else {
        return false;
    };
    s.write_response_header(Box::new(h)).await.is_ok()
        && s.write_response_body(bytes, true).await.is_ok()
}

/// Writes an OpenAI-shaped error (with Retry-After where it applies).
pub async fn write_error(s: &mut ServerSession, e: &ApiError, request_id: &str) -> bool {
    let retry_after = e.retry_after.map(|r| r.to_string());
    let extra: &[(&'static str, &str)] = match &retry_after {
        Some(r) => &[("retry-after", r.as_str())],
        None => &[],
    };
    write_json(s, e.status, extra, &e.to_json(), request_id).await
}
