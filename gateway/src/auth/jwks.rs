//! JSON Web Key Sets: parsing a JWKS document into verification keys, reading it from a
//! file, and fetching it over HTTP. Knows nothing about tokens or claims.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};

/// Largest JWKS document accepted (file or HTTP body).
const MAX_JWKS_BYTES: usize = 1 << 20;
/// Time limit for one JWKS fetch, connect to last byte.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// One public key that may verify tokens.
pub(crate) struct VerifyKey {
    pub kid: Option<String>,
    pub alg: Algorithm,
    pub key: DecodingKey,
}

/// Parses a JWKS document. Keys that are not signature keys for RS256/ES256/EdDSA
/// (encryption keys, HMAC secrets, other algorithms) are skipped; a document without
/// any usable key is an error.
pub(crate) fn parse_jwks(text: &[u8]) -> Result<Vec<VerifyKey>, String> {
    let doc: serde_json::Value =
        serde_json::from_slice(text).map_err(|e| format!("not valid JSON: {e}"))?;
    let Some(keys) = doc.get("keys").and_then(|k| k.as_array()) else {
        return Err("not a JWKS document: no `keys` array".into());
    };
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    for (i, raw) in keys.iter().enumerate() {
        let jwk: Jwk = match serde_json::from_value(raw.clone()) {
            Ok(jwk) => jwk,
            Err(e) => {
                skipped.push(format!("key {i}: {e}"));
                continue;
            }
        };
        match verify_key(&jwk) {
            Ok(key) => out.push(key),
            Err(why) => skipped.push(format!("key {i}: {why}")),
        }
    }
    if out.is_empty() {
        let detail = if skipped.is_empty() {
            "the `keys` array is empty".to_string()
        } else {
            skipped.join("; ")
        };
        return Err(format!(
            "no usable RS256/ES256/EdDSA signature key ({detail})"
        ));
    }
    if !skipped.is_empty() {
        tracing::debug!(skipped = %skipped.join("; "), "JWKS keys ignored");
    }
    Ok(out)
}

fn verify_key(jwk: &Jwk) -> Result<VerifyKey, String> {
    if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
        return Err("not a signature key (`use` is not `sig`)".into());
    }
    // The algorithm the key's type implies; the JWK's own `alg`, when present, must agree.
    let implied = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        AlgorithmParameters::OctetKey(_) => {
            return Err("symmetric (HMAC) keys are not accepted".into());
        }
        _ => return Err("unsupported key type or curve".into()),
    };
    if let Some(alg) = jwk.common.key_algorithm {
        let named = match alg {
            KeyAlgorithm::RS256 => Algorithm::RS256,
            KeyAlgorithm::ES256 => Algorithm::ES256,
            KeyAlgorithm::EdDSA => Algorithm::EdDSA,
            other => return Err(format!("algorithm {other:?} is not accepted")),
        };
        if named != implied {
            return Err(format!("`alg` {named:?} does not match the key type"));
        }
    }
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("bad key material: {e}"))?;
    Ok(VerifyKey {
        kid: jwk.common.key_id.clone(),
        alg: implied,
        key,
    })
}

/// Reads and parses a JWKS file.
pub(crate) fn load_jwks_file(path: &Path) -> Result<Vec<VerifyKey>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read: {e}"))?;
    if meta.len() > MAX_JWKS_BYTES as u64 {
        return Err(format!("larger than {MAX_JWKS_BYTES} bytes"));
    }
    let text = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    parse_jwks(&text)
}

/// An `http(s)://host[:port]/path` URL split into what a request needs.
pub(crate) struct HttpUrl {
    pub host: String,
    pub port: u16,
    pub authority: String,
    pub path: String,
    pub tls: bool,
}

/// Accepts `https://` URLs (verified against the system's roots, plus `jwks_ca_file`
/// when set) and `http://` URLs (for a trusted network).
pub(crate) fn parse_http_url(url: &str) -> Result<HttpUrl, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(format!("`{url}` must start with https:// or http://")),
    };
    let Some(authority) = uri.authority() else {
        return Err(format!("`{url}` has no host"));
    };
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    if host.is_empty() {
        return Err(format!("`{url}` has no host"));
    }
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "/".to_string());
    Ok(HttpUrl {
        host,
        port: authority.port_u16().unwrap_or(if tls { 443 } else { 80 }),
        authority: authority.as_str().to_string(),
        path,
        tls,
    })
}

/// A TLS client configuration trusting the system's roots and, if given, the CA
/// certificates in `ca_file` (PEM).
fn tls_config(ca_file: Option<&Path>) -> Result<std::sync::Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    if let Ok(native) = rustls_native_certs::load_native_certs() {
        for cert in native {
            let _ = roots.add(cert);
        }
    }
    if let Some(path) = ca_file {
        let pem =
            std::fs::read(path).map_err(|e| format!("jwks_ca_file {}: {e}", path.display()))?;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| format!("jwks_ca_file {}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("jwks_ca_file {}: {e}", path.display()))?;
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(std::sync::Arc::new(cfg))
}

/// Fetches and parses a JWKS over HTTP/1.1 (status 200 required, body at most 1 MiB,
/// 10 s in all).
pub(crate) async fn fetch_jwks(
    url: &str,
    ca_file: Option<&Path>,
) -> Result<Vec<VerifyKey>, String> {
    let body = tokio::time::timeout(FETCH_TIMEOUT, fetch_body(url, ca_file))
        .await
        .map_err(|_| format!("no complete answer within {}s", FETCH_TIMEOUT.as_secs()))??;
    parse_jwks(&body)
}

async fn fetch_body(url: &str, ca_file: Option<&Path>) -> Result<Bytes, String> {
    let target = parse_http_url(url)?;
    let stream = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", target.authority))?;
    if target.tls {
        let name = rustls::pki_types::ServerName::try_from(target.host.clone())
            .map_err(|e| format!("`{}` is not a TLS server name: {e}", target.host))?;
        let tls = tokio_rustls::TlsConnector::from(tls_config(ca_file)?)
            .connect(name, stream)
            .await
            .map_err(|e| format!("TLS with {}: {e}", target.authority))?;
        get(TokioIo::new(tls), &target).await
    } else {
        get(TokioIo::new(stream), &target).await
    }
}

async fn get<S>(io: S, target: &HttpUrl) -> Result<Bytes, String>
where
    S: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP handshake with {}: {e}", target.authority))?;
    let conn_task = tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "JWKS connection closed with an error");
        }
    });
    let request = http::Request::get(target.path.as_str())
        .header(http::header::HOST, target.authority.as_str())
        .header(
            http::header::ACCEPT,
            "application/json, application/jwk-set+json",
        )
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("cannot build request: {e}"))?;
    let result = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        if response.status() != http::StatusCode::OK {
            return Err(format!("answered HTTP {}", response.status()));
        }
        let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading the body: {e}"))?;
        Ok(body.to_bytes())
    }
    .await;
    conn_task.abort();
    result
}
