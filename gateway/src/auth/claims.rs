//! The gateway's own claims, read from a verified token's payload into a [`Caller`].

use serde_json::Value;

use super::{AuthError, Caller, printable, reason};
use crate::domain::{Classification, Country};

/// Longest accepted `ministry`, `sub`, `jti` or role.
const MAX_CLAIM_CHARS: usize = 128;
/// Most roles accepted in one token.
const MAX_ROLES: usize = 32;

/// Reads `state`, `ministry`, `clearance` (required) and `classification`, `roles`,
/// `sub`, `jti` (optional). `issuer_state` is the state whose IdP signed the token.
pub(crate) fn caller_from_claims(
    issuer_state: &Country,
    claims: &Value,
) -> Result<Caller, AuthError> {
    match claims.get("exp") {
        None | Some(Value::Null) => return Err(missing("exp")),
        Some(Value::Number(_)) => {}
        Some(_) => return Err(invalid("`exp` claim is not a number")),
    }
    let state_text = required_str(claims, "state")?;
    let state: Country = state_text.parse().map_err(|_| {
        invalid(format!(
            "`state` claim `{}` is not a two-letter country code",
            printable(state_text)
        ))
    })?;
    if &state != issuer_state {
        return Err(AuthError::new(
            reason::STATE_MISMATCH,
            format!("the token was issued by {issuer_state}'s IdP but claims state {state}"),
        ));
    }

    let ministry = required_str(claims, "ministry")?;
    check_identifier("ministry", ministry)?;

    let clearance =
        classification_claim(claims, "clearance")?.ok_or_else(|| missing("clearance"))?;
    let default_classification =
        classification_claim(claims, "classification")?.unwrap_or(Classification::Public);
    if default_classification > clearance {
        return Err(invalid(format!(
            "`classification` claim `{default_classification}` is above the `clearance` `{clearance}`"
        )));
    }

    let roles = match claims.get("roles") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => {
            if items.len() > MAX_ROLES {
                return Err(invalid(format!("more than {MAX_ROLES} `roles`")));
            }
            let mut roles = Vec::with_capacity(items.len());
            for item in items {
                let Some(role) = item.as_str() else {
                    return Err(invalid("`roles` must be an array of strings"));
                };
                check_identifier("roles", role)?;
                roles.push(role.to_string());
            }
            roles
        }
        Some(_) => return Err(invalid("`roles` must be an array of strings")),
    };

    Ok(Caller {
        state,
        ministry: ministry.to_string(),
        clearance,
        default_classification,
        roles,
        subject: optional_str(claims, "sub")?,
        token_id: optional_str(claims, "jti")?,
        audit_hmac: Default::default(),
    })
}

fn required_str<'a>(claims: &'a Value, name: &str) -> Result<&'a str, AuthError> {
    match claims.get(name) {
        None | Some(Value::Null) => Err(missing(name)),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(invalid(format!("`{name}` claim is not a string"))),
    }
}

fn optional_str(claims: &Value, name: &str) -> Result<Option<String>, AuthError> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.chars().count() <= MAX_CLAIM_CHARS => Ok(Some(s.clone())),
        Some(Value::String(_)) => Err(invalid(format!(
            "`{name}` claim is longer than {MAX_CLAIM_CHARS} characters"
        ))),
        Some(_) => Err(invalid(format!("`{name}` claim is not a string"))),
    }
}

fn classification_claim(claims: &Value, name: &str) -> Result<Option<Classification>, AuthError> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => s.parse().map(Some).map_err(|_| {
            invalid(format!(
                "`{name}` claim `{}` is not one of public, internal, restricted",
                printable(s)
            ))
        }),
        Some(_) => Err(invalid(format!("`{name}` claim is not a string"))),
    }
}

/// Identifiers end up in policy entity ids and audit records: 1-128 characters of
/// ASCII letters, digits and `-_.:@`.
fn check_identifier(name: &str, value: &str) -> Result<(), AuthError> {
    let ok = !value.is_empty()
        && value.len() <= MAX_CLAIM_CHARS
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:@".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "`{name}` claim `{}` must be 1-{MAX_CLAIM_CHARS} characters of letters, digits and -_.:@",
            printable(value)
        )))
    }
}

fn missing(name: &str) -> AuthError {
    AuthError::new(
        reason::MISSING_CLAIM,
        format!("the token has no `{name}` claim"),
    )
}

fn invalid(message: impl Into<String>) -> AuthError {
    AuthError::new(reason::INVALID_CLAIM, message)
}
