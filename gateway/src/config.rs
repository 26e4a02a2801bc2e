//! The gateway's configuration: one TOML file, parsed once at start into typed structs.
//! Relative paths are resolved against the file's directory. Invalid configuration
//! fails at start with the file, the line (from the TOML parser) and the reason.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::audit::AuditConfig;
use crate::auth::IssuerConfig;
use crate::route::RoutingConfig;

/// Default request body limit: 4 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 << 20;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// The OpenAI-compatible listener, e.g. `127.0.0.1:8443`.
    pub listen: SocketAddr,
    /// The admin listener (policy hash, worker status, later the auditor page).
    #[serde(default)]
    pub admin_listen: Option<SocketAddr>,
    /// TLS for both listeners; without it they speak plain HTTP (h2c allowed).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Largest request body accepted; larger ones get 413.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Directory with `schema.cedarschema`, `eu-baseline.cedar` and per-state files.
    pub policies: PathBuf,
    /// The pools file.
    pub pools: PathBuf,
    /// Worker threads of the front end (default: 2).
    #[serde(default)]
    pub threads: Option<usize>,
    /// Seconds between policy-directory checks for hot reload (0 = only SIGHUP).
    #[serde(default = "default_reload_secs")]
    pub policy_reload_secs: u64,
    /// Seconds that graceful shutdown waits for in-flight requests.
    #[serde(default = "default_grace_secs")]
    pub shutdown_grace_secs: u64,
    #[serde(default)]
    pub routing: RoutingConfig,
    /// The tamper-evident audit log (required: no request is served unaudited).
    pub audit: AuditConfig,
    /// One table per member state's identity provider.
    #[serde(default, rename = "member_state")]
    pub member_states: Vec<IssuerConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// Whether the admin listener uses TLS too (default: yes).
    #[serde(default = "yes")]
    pub admin: bool,
}

fn yes() -> bool {
    true
}

fn default_max_body() -> usize {
    DEFAULT_MAX_BODY_BYTES
}

fn default_reload_secs() -> u64 {
    2
}

fn default_grace_secs() -> u64 {
    5
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl GatewayConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let mut cfg: GatewayConfig = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut cfg.policies);
        resolve(&mut cfg.pools);
        if let Some(tls) = &mut cfg.tls {
            resolve(&mut tls.cert);
            resolve(&mut tls.key);
        }
        resolve(&mut cfg.audit.dir);
        resolve(&mut cfg.audit.signing_key);
        for p in cfg.audit.hmac_keys.values_mut() {
            resolve(p);
        }
        for s in &mut cfg.member_states {
            if let Some(f) = &mut s.jwks_file {
                resolve(f);
            }
        }
        if cfg.max_body_bytes == 0 {
            return Err(invalid("max_body_bytes must be positive".into()));
        }
        for s in &cfg.member_states {
            if !cfg.audit.hmac_keys.contains_key(s.state.as_str()) {
                return Err(invalid(format!(
                    "member state {} has no [audit.hmac_keys] entry: its requests could not be audited",
                    s.state
                )));
            }
        }
        if cfg.member_states.is_empty() {
            return Err(invalid(
                "no [[member_state]] tables: nobody could authenticate".into(),
            ));
        }
        Ok(cfg)
    }
}
