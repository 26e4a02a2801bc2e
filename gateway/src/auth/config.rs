//! Configuration of the member states' identity providers, as it appears in the gateway's
//! TOML config (`[[member_state]]` tables), and its validation at start.

use std::path::PathBuf;

use jsonwebtoken::Algorithm;
use serde::{Deserialize, Serialize};

use crate::domain::Country;

/// The only signature algorithms the gateway accepts, by their JOSE names.
pub const ALLOWED_ALGORITHMS: [&str; 3] = ["RS256", "ES256", "EdDSA"];

/// Default interval between two fetches of a URL JWKS.
pub const DEFAULT_REFRESH_SECS: u64 = 300;

/// One member state's identity provider.
///
/// ```toml
/// [[member_state]]
/// state = "DE"
/// issuer = "https://idp.de.example.eu"
/// audience = "sovereign-gateway"
/// jwks_file = "keys/de.jwks.json"             # and/or
/// jwks_url = "http://idp.de.internal/jwks.json"
/// refresh_secs = 300                          # default
/// algorithms = ["EdDSA"]                      # default: RS256, ES256, EdDSA
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// The member state whose ministries this IdP speaks for.
    pub state: Country,
    /// Exact `iss` value of the tokens; selects the member state.
    pub issuer: String,
    /// Exact `aud` value the tokens must carry.
    pub audience: String,
    /// A JWKS document on disk, read once at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<PathBuf>,
    /// A JWKS URL, fetched every `refresh_secs` and on an unknown `kid` (at most once
    /// per 10 s). Keys from the file and the URL are both accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    /// Extra CA certificates (PEM) trusted for an `https://` `jwks_url`, besides the
    /// system's roots.
    #[serde(default)]
    pub jwks_ca_file: Option<PathBuf>,
    #[serde(default = "default_refresh_secs")]
    pub refresh_secs: u64,
    /// Subset of RS256, ES256, EdDSA.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
}

fn default_refresh_secs() -> u64 {
    DEFAULT_REFRESH_SECS
}

fn default_algorithms() -> Vec<String> {
    ALLOWED_ALGORITHMS.iter().map(|a| a.to_string()).collect()
}

/// Why the identity-provider configuration cannot be used. Raised at start only.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("member state {state} (issuer `{issuer}`): {reason}")]
    Invalid {
        state: Country,
        issuer: String,
        reason: String,
    },
    #[error("JWKS file {}: {reason}", path.display())]
    JwksFile { path: PathBuf, reason: String },
}

impl IssuerConfig {
    /// The config's algorithms as `jsonwebtoken` values; rejects anything but
    /// RS256/ES256/EdDSA.
    pub(crate) fn parsed_algorithms(&self) -> Result<Vec<Algorithm>, AuthConfigError> {
        if self.algorithms.is_empty() {
            return Err(
                self.invalid("`algorithms` is empty; allow at least one of RS256, ES256, EdDSA")
            );
        }
        let mut out = Vec::new();
        for name in &self.algorithms {
            let alg = match name.as_str() {
                "RS256" => Algorithm::RS256,
                "ES256" => Algorithm::ES256,
                "EdDSA" => Algorithm::EdDSA,
                other => {
                    return Err(self.invalid(format!(
                        "algorithm `{other}` is not allowed; only RS256, ES256 and EdDSA are \
                         (no HS*, no `none`)"
                    )));
                }
            };
            if !out.contains(&alg) {
                out.push(alg);
            }
        }
        Ok(out)
    }

    /// Checks everything that does not need the JWKS itself.
    pub(crate) fn check(&self) -> Result<(), AuthConfigError> {
        if self.issuer.trim().is_empty() {
            return Err(self.invalid("`issuer` is empty"));
        }
        if self.audience.trim().is_empty() {
            return Err(self.invalid("`audience` is empty"));
        }
        if self.jwks_file.is_none() && self.jwks_url.is_none() {
            return Err(self.invalid("set `jwks_file`, `jwks_url` or both"));
        }
        if let Some(url) = &self.jwks_url {
            super::jwks::parse_http_url(url).map_err(|e| self.invalid(format!("jwks_url: {e}")))?;
        }
        if self.jwks_url.is_some() && self.refresh_secs == 0 {
            return Err(self.invalid("`refresh_secs` must be at least 1"));
        }
        self.parsed_algorithms()?;
        Ok(())
    }

    pub(crate) fn invalid(&self, reason: impl Into<String>) -> AuthConfigError {
        AuthConfigError::Invalid {
            state: self.state.clone(),
            issuer: self.issuer.clone(),
            reason: reason.into(),
        }
    }
}
