//! The compact JWS as text: the bearer header, the token's parts, its `alg`, and the
//! mapping of `jsonwebtoken` errors to reason codes. No keys, no claims.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use jsonwebtoken::errors::ErrorKind;

use super::{AuthError, IssuerConfig, MAX_TOKEN_BYTES, reason};

/// The token of an `Authorization: Bearer <jwt>` value.
pub(crate) fn bearer_token(header: Option<&str>) -> Result<&str, AuthError> {
    let value = header.map(str::trim).unwrap_or_default();
    if value.is_empty() {
        return Err(AuthError::new(
            reason::MISSING_TOKEN,
            "no Authorization header; send `Authorization: Bearer <token>`",
        ));
    }
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::new(
            reason::MALFORMED_TOKEN,
            "the Authorization header is not of the form `Bearer <token>`",
        ));
    }
    let token = rest.trim();
    if token.is_empty() {
        return Err(AuthError::new(
            reason::MISSING_TOKEN,
            "the Authorization header has no token after `Bearer`",
        ));
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(AuthError::new(
            reason::MALFORMED_TOKEN,
            format!("the token is longer than {MAX_TOKEN_BYTES} bytes"),
        ));
    }
    Ok(token)
}

/// Header and payload parts of a compact JWS (three base64url parts).
pub(crate) fn split_token(token: &str) -> Result<(&str, &str), AuthError> {
    let mut parts = token.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(h), Some(p), Some(_sig), None) if !h.is_empty() && !p.is_empty() => Ok((h, p)),
        _ => Err(AuthError::new(
            reason::MALFORMED_TOKEN,
            "the token is not a compact JWT (header.payload.signature)",
        )),
    }
}

pub(crate) fn decode_json_part(part: &str, what: &str) -> Result<serde_json::Value, AuthError> {
    let bytes = URL_SAFE_NO_PAD.decode(part).map_err(|_| {
        AuthError::new(
            reason::MALFORMED_TOKEN,
            format!("the token {what} is not base64url"),
        )
    })?;
    match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(v @ serde_json::Value::Object(_)) => Ok(v),
        _ => Err(AuthError::new(
            reason::MALFORMED_TOKEN,
            format!("the token {what} is not a JSON object"),
        )),
    }
}

/// The header's `alg`, if it is one the gateway accepts at all.
pub(crate) fn header_algorithm(header: &serde_json::Value) -> Result<Algorithm, AuthError> {
    let name = match header.get("alg") {
        Some(serde_json::Value::String(s)) => s.as_str(),
        _ => {
            return Err(AuthError::new(
                reason::MALFORMED_TOKEN,
                "the token header has no `alg`",
            ));
        }
    };
    match name {
        "RS256" => Ok(Algorithm::RS256),
        "ES256" => Ok(Algorithm::ES256),
        "EdDSA" => Ok(Algorithm::EdDSA),
        other => Err(AuthError::new(
            reason::UNSUPPORTED_ALGORITHM,
            format!(
                "algorithm `{}` is not accepted; only RS256, ES256 and EdDSA are",
                printable(other)
            ),
        )),
    }
}

pub(crate) fn map_jwt_error(e: &jsonwebtoken::errors::Error, issuer: &IssuerConfig) -> AuthError {
    let (reason, message) = match e.kind() {
        ErrorKind::InvalidSignature => (
            reason::BAD_SIGNATURE,
            "the signature does not verify".to_string(),
        ),
        ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat => (
            reason::BAD_SIGNATURE,
            "the signature cannot be verified with the issuer's key".to_string(),
        ),
        ErrorKind::ExpiredSignature => (reason::TOKEN_EXPIRED, "the token has expired".to_string()),
        ErrorKind::ImmatureSignature => (
            reason::TOKEN_NOT_YET_VALID,
            "the token is not valid yet (`nbf` is in the future)".to_string(),
        ),
        ErrorKind::InvalidAudience => (
            reason::WRONG_AUDIENCE,
            format!("the token's `aud` is not `{}`", issuer.audience),
        ),
        ErrorKind::InvalidIssuer => (
            reason::UNKNOWN_ISSUER,
            format!("the token's `iss` is not `{}`", issuer.issuer),
        ),
        ErrorKind::MissingRequiredClaim(c) => (
            reason::MISSING_CLAIM,
            format!("the token has no `{c}` claim"),
        ),
        ErrorKind::InvalidClaimFormat(c) => (
            reason::INVALID_CLAIM,
            format!("the token's `{c}` claim is malformed"),
        ),
        ErrorKind::InvalidAlgorithm
        | ErrorKind::MissingAlgorithm
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::InvalidAlgorithmName => (
            reason::UNSUPPORTED_ALGORITHM,
            "the token's algorithm is not accepted for this key".to_string(),
        ),
        _ => (
            reason::MALFORMED_TOKEN,
            format!("the token cannot be decoded: {e}"),
        ),
    };
    AuthError::new(reason, message)
}

/// A token-supplied string made safe to echo in a message: at most 64 printable
/// ASCII characters.
pub(crate) fn printable(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    if s.chars().count() > 64 {
        out.push('…');
    }
    out
}
