//! Query strings of the auditor endpoints: percent-decoded safely (a bad escape or
//! invalid UTF-8 is a 400, never a panic), every name checked against the endpoint's
//! list, and typed values parsed into an [`audit::Filter`](crate::audit::Filter).

use chrono::{DateTime, Utc};

use crate::audit::{Decision, Filter, Phase};
use crate::error::ApiError;

/// Records returned when the query names no `limit`.
pub const DEFAULT_LIMIT: usize = 200;
/// The largest `limit` accepted.
pub const MAX_LIMIT: usize = 10_000;

/// The parameters of `GET /admin/audit/records`.
pub const RECORD_PARAMS: &[&str] = &[
    "state",
    "ministry",
    "since",
    "until",
    "decision",
    "reason",
    "pool",
    "country",
    "policy_hash",
    "request_id",
    "phase",
    "limit",
];

/// A decoded query string: `(name, value)` pairs, each name at most once, empty values
/// dropped (an empty form field means "any").
#[derive(Debug, Default)]
pub struct Query {
    pairs: Vec<(String, String)>,
}

impl Query {
    /// Decode `raw` (`a=1&b=x%20y`) and accept only the names in `allowed`.
    pub fn parse(raw: Option<&str>, allowed: &[&str]) -> Result<Query, ApiError> {
        let mut pairs: Vec<(String, String)> = Vec::new();
        for part in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            let (k, v) = (decode(k)?, decode(v)?);
            if !allowed.contains(&k.as_str()) {
                return Err(ApiError::bad_request(
                    "unknown_parameter",
                    format!(
                        "unknown query parameter `{}` (accepted: {})",
                        printable(&k),
                        allowed.join(", ")
                    ),
                )
                .with_param(&printable(&k)));
            }
            if pairs.iter().any(|(n, _)| *n == k) {
                return Err(ApiError::bad_request(
                    "duplicate_parameter",
                    format!("query parameter `{k}` given more than once"),
                )
                .with_param(&k));
            }
            if !v.is_empty() {
                pairs.push((k, v));
            }
        }
        Ok(Query { pairs })
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The records filter; `state` is left to the caller (it is the auditor's own).
    pub fn filter(&self) -> Result<Filter, ApiError> {
        let text = |name: &str| self.get(name).map(str::to_string);
        Ok(Filter {
            state: None,
            ministry: text("ministry"),
            since: self.time("since")?,
            until: self.time("until")?,
            decision: self.parsed::<Decision>("decision", "invalid_decision")?,
            reason: text("reason"),
            pool: text("pool"),
            country: text("country"),
            policy_hash: text("policy_hash"),
            request_id: text("request_id"),
            phase: self.parsed::<Phase>("phase", "invalid_phase")?,
            limit: Some(self.limit()?),
        })
    }

    fn limit(&self) -> Result<usize, ApiError> {
        let Some(v) = self.get("limit") else {
            return Ok(DEFAULT_LIMIT);
        };
        match v.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            _ => Err(ApiError::bad_request(
                "invalid_limit",
                format!(
                    "`limit` must be an integer from 1 to {MAX_LIMIT}, not `{}`",
                    printable(v)
                ),
            )
            .with_param("limit")),
        }
    }

    fn time(&self, name: &str) -> Result<Option<DateTime<Utc>>, ApiError> {
        self.get(name)
            .map(|v| {
                DateTime::parse_from_rfc3339(v)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|e| {
                        ApiError::bad_request(
                            "invalid_time",
                            format!(
                                "`{name}` must be an RFC 3339 time such as 2026-01-31T12:00:00Z, not `{}`: {e}",
                                printable(v)
                            ),
                        )
                        .with_param(name)
                    })
            })
            .transpose()
    }

    fn parsed<T: std::str::FromStr<Err = String>>(
        &self,
        name: &str,
        code: &str,
    ) -> Result<Option<T>, ApiError> {
        self.get(name)
            .map(|v| {
                v.parse::<T>()
                    .map_err(|e| ApiError::bad_request(code, printable(&e)).with_param(name))
            })
            .transpose()
    }

    /// A non-negative integer parameter (`seq`).
    pub fn number(&self, name: &str) -> Result<Option<u64>, ApiError> {
        self.get(name)
            .map(|v| {
                v.parse::<u64>().map_err(|_| {
                    ApiError::bad_request(
                        "invalid_seq",
                        format!("`{name}` must be a sequence number, not `{}`", printable(v)),
                    )
                    .with_param(name)
                })
            })
            .transpose()
    }
}

/// `application/x-www-form-urlencoded` decoding of one name or value.
pub fn decode(s: &str) -> Result<String, ApiError> {
    let bad = |why: &str| {
        ApiError::bad_request("invalid_query", format!("malformed query string: {why}"))
    };
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = b
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| bad("`%` must be followed by two hex digits"))?;
                out.push(hex);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| bad("not UTF-8 after percent-decoding"))
}

/// At most 64 characters of `s`, control characters replaced (for error messages).
fn printable(s: &str) -> String {
    s.chars()
        .take(64)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_and_checks_names() {
        let q = Query::parse(
            Some("ministry=bm%C3%AF&decision=deny&reason=a+b&pool="),
            RECORD_PARAMS,
        )
        .unwrap();
        assert_eq!(q.get("ministry"), Some("bmï"));
        assert_eq!(q.get("reason"), Some("a b"));
        assert_eq!(q.get("pool"), None);
        let f = q.filter().unwrap();
        assert_eq!(f.decision, Some(Decision::Deny));
        assert_eq!(f.limit, Some(DEFAULT_LIMIT));
        assert!(Query::parse(None, RECORD_PARAMS).is_ok());
    }

    #[test]
    fn bad_queries_are_400_with_a_reason_code() {
        let code = |raw: &str| {
            Query::parse(Some(raw), RECORD_PARAMS)
                .and_then(|q| q.filter())
                .map(|_| ())
                .unwrap_err()
                .code
        };
        assert_eq!(code("ministry=%4"), "invalid_query");
        assert_eq!(code("ministry=%zz"), "invalid_query");
        assert_eq!(code("ministry=%ff"), "invalid_query");
        assert_eq!(code("nope=1"), "unknown_parameter");
        assert_eq!(code("pool=a&pool=b"), "duplicate_parameter");
        assert_eq!(code("decision=maybe"), "invalid_decision");
        assert_eq!(code("phase=x"), "invalid_phase");
        assert_eq!(code("since=yesterday"), "invalid_time");
        assert_eq!(code("limit=0"), "invalid_limit");
        assert_eq!(code("limit=99999999"), "invalid_limit");
        assert_eq!(code("limit=-1"), "invalid_limit");
        let q = Query::parse(Some("seq=x"), &["seq"]).unwrap();
        assert_eq!(q.number("seq").unwrap_err().code, "invalid_seq");
    }
}
