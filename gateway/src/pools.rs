//! Worker pools: where inference may run. A pool is a set of workers in one country
//! under one jurisdiction, serving some models. Parsed once from TOML (`pools.toml`);
//! the policy module reads the facts, the router reads the addresses.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::domain::Country;

/// One pool of workers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    /// Unique id, e.g. `de-fra-1` (lower-case letters, digits, `-`).
    pub id: String,
    /// Where the hardware is.
    pub country: Country,
    /// Whose law governs the operator: `EU` for an EU-established operator, otherwise a
    /// country code (e.g. `US`).
    #[serde(default = "default_jurisdiction")]
    pub jurisdiction: String,
    /// Certifications the pool holds (e.g. `bsi-c5`, `secnumcloud`, `iso27001`).
    #[serde(default)]
    pub certifications: BTreeSet<String>,
    /// Model ids this pool serves.
    pub models: BTreeSet<String>,
    /// Worker gRPC addresses (`host:port`).
    #[serde(default)]
    pub workers: Vec<SocketAddr>,
}

fn default_jurisdiction() -> String {
    "EU".to_string()
}

impl Pool {
    /// In an EU member state and under EU jurisdiction.
    pub fn is_eu(&self) -> bool {
        self.country.is_eu() && self.jurisdiction == "EU"
    }
}

/// The pools file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolsConfig {
    #[serde(default, rename = "pool")]
    pub pools: Vec<Pool>,
}

/// A pools file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PoolsError {
    #[error("cannot read pools file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pools file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("pools file {path}: pool `{pool}`: {message}")]
    Invalid {
        path: PathBuf,
        pool: String,
        message: String,
    },
}

impl PoolsConfig {
    pub fn load(path: &Path) -> Result<Self, PoolsError> {
        let text = std::fs::read_to_string(path).map_err(|source| PoolsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parse and validate; `path` only names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, PoolsError> {
        let cfg: PoolsConfig = toml::from_str(text).map_err(|e| PoolsError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let mut seen = BTreeSet::new();
        for p in &cfg.pools {
            let invalid = |message: String| PoolsError::Invalid {
                path: path.to_path_buf(),
                pool: p.id.clone(),
                message,
            };
            let id_ok = !p.id.is_empty()
                && p.id
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !id_ok {
                return Err(invalid(
                    "id must be non-empty lower-case letters, digits and `-`".into(),
                ));
            }
            if !seen.insert(p.id.as_str()) {
                return Err(invalid("duplicate pool id".into()));
            }
            if p.models.is_empty() {
                return Err(invalid("serves no models".into()));
            }
            if p.jurisdiction != "EU" && p.jurisdiction.parse::<Country>().is_err() {
                return Err(invalid(format!(
                    "jurisdiction `{}` is neither `EU` nor a country code",
                    p.jurisdiction
                )));
            }
        }
        Ok(cfg)
    }

    pub fn get(&self, id: &str) -> Option<&Pool> {
        self.pools.iter().find(|p| p.id == id)
    }

    /// Every model some pool serves.
    pub fn models(&self) -> BTreeSet<&str> {
        self.pools
            .iter()
            .flat_map(|p| p.models.iter().map(String::as_str))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_validates() {
        let ok = r#"
            [[pool]]
            id = "de-fra-1"
            country = "de"
            certifications = ["bsi-c5"]
            models = ["smollm2"]
            workers = ["127.0.0.1:50051"]

            [[pool]]
            id = "us-east-1"
            country = "US"
            jurisdiction = "US"
            models = ["smollm2"]
        "#;
        let cfg = PoolsConfig::parse(ok, Path::new("pools.toml")).unwrap();
        assert_eq!(cfg.pools[0].country.as_str(), "DE");
        assert!(cfg.pools[0].is_eu());
        assert!(!cfg.get("us-east-1").unwrap().is_eu());

        let dup = ok.replace("us-east-1", "de-fra-1");
        let e = PoolsConfig::parse(&dup, Path::new("p.toml")).unwrap_err();
        assert!(e.to_string().contains("duplicate pool id"), "{e}");

        let bad = ok.replace("country = \"de\"", "country = \"Germany\"");
        let e = PoolsConfig::parse(&bad, Path::new("p.toml")).unwrap_err();
        assert!(e.to_string().contains("line"), "{e}");
    }
}
