//! Residency policy: which worker pools may process a request, and why.
//!
//! A policy set is a directory (`policies/`): a Cedar schema, the EU baseline (forbids no
//! state can weaken), and per member state a Cedar file (one permit scoped to the state,
//! restrictions as forbids with `@id` and `@reason`) plus a routing file (pool preference
//! per classification, asserted invariants, ministry directory). A set is only used after
//! admission: parsing, schema validation, scoping and annotation rules, and an exhaustive
//! check of every state's invariants (see `admission`). [`PolicyStore`] holds the active
//! set, swaps it atomically on reload, and caches decisions.
//!
//! This module decides; it does not route, authenticate, or write audit records.

mod admission;
mod engine;
mod files;
mod store;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

pub use admission::{CheckDomain, StateReport, UNKNOWN_MODEL, synthetic_pools};
pub use engine::{EVALUATION_ERROR, NO_PERMIT};
pub use files::{
    BASELINE_FILE, Criticality, MinistryEntry, PerClassification, Region, RoutingFile, SCHEMA_FILE,
    dir_hash,
};
pub use store::{PolicyStore, spawn_watcher};

use crate::domain::Classification;
use crate::pools::PoolsConfig;
use engine::{Engine, MinistryFacts};
use files::SourceFiles;

/// Reason code when the state's routing order names no pool of the deployment.
pub const NO_CANDIDATE_POOL: &str = "no_candidate_pool";
/// Reason code when the caller's member state has no policy in the active set.
pub const STATE_NOT_LOADED: &str = "state_has_no_policy";

/// A policy set that cannot be admitted, or a policy directory that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy directory {dir}: {source}")]
    ReadDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {file}: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{dir}: unknown file `{name}` (expected schema.cedarschema, eu-baseline.cedar, and <cc>.cedar + <cc>.routing.toml per EU member state; *.md files, hidden files and sub-directories are ignored)"
    )]
    UnknownFile { dir: PathBuf, name: String },
    #[error("{dir}: missing {name}")]
    Missing { dir: PathBuf, name: String },
    #[error("{file}:{line}:{column}: {message}")]
    Parse {
        file: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{file}: {message}")]
    Schema { file: PathBuf, message: String },
    #[error("{file}: policy `{policy}`: {message}")]
    Policy {
        file: PathBuf,
        policy: String,
        message: String,
    },
    #[error("{file}: {message}")]
    Routing { file: PathBuf, message: String },
    #[error("{file}: policy `{policy}` breaks invariant `{invariant}`: it allows {counterexample}")]
    Invariant {
        file: PathBuf,
        /// The policy ids that allowed the counterexample (the state's permit).
        policy: String,
        invariant: String,
        counterexample: Box<Counterexample>,
    },
    #[error("policy engine: {0}")]
    Internal(String),
}

/// One request the policies allow although an invariant forbids it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Counterexample {
    pub state: String,
    pub ministry: String,
    pub clearance: Classification,
    pub criticality: String,
    pub classification: Classification,
    pub model: String,
    pub pool: String,
    pub country: String,
    pub jurisdiction: String,
}

impl fmt::Display for Counterexample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ministry {}/{} (clearance {}, criticality {}) to send {} data for model `{}` to pool {} (country {}, jurisdiction {})",
            self.state,
            self.ministry,
            self.clearance,
            self.criticality,
            self.classification,
            self.model,
            self.pool,
            self.country,
            self.jurisdiction
        )
    }
}

/// What the gateway asks: may this ministry's request go to which pools?
#[derive(Debug, Clone, Copy)]
pub struct DecisionRequest<'a> {
    pub state: &'a str,
    pub ministry: &'a str,
    /// The caller's clearance from its token.
    pub clearance: Classification,
    pub classification: Classification,
    pub model: &'a str,
}

/// The answer: the state's routing order for the classification (restricted to the
/// deployment's pools), each pool allowed or denied with the deciding policies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResidencyDecision {
    pub policy_hash: String,
    pub state: String,
    pub ministry: String,
    /// Whether the ministry is listed in the state's directory.
    pub listed_ministry: bool,
    /// The clearance the policies saw (the token's, capped by the directory's).
    pub clearance: Classification,
    pub classification: Classification,
    pub model: String,
    pub candidates: Vec<Candidate>,
    /// Why there are no candidates at all (`no_candidate_pool`, `state_has_no_policy`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_candidates: Option<String>,
}

/// One pool of the routing order and its verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Candidate {
    pub pool: String,
    pub country: String,
    pub allowed: bool,
    /// Deciding policies: the forbids that denied, or the permit(s) that allowed.
    pub policy_ids: Vec<String>,
    /// Reason codes of the deciding forbids; `no_permit` if nothing permitted.
    pub reasons: Vec<String>,
}

impl ResidencyDecision {
    /// Allowed candidates in routing order.
    pub fn allowed(&self) -> impl Iterator<Item = &Candidate> {
        self.candidates.iter().filter(|c| c.allowed)
    }

    /// De-duplicated reason codes of all denials (in first-seen order), for a refusal.
    pub fn deny_reasons(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        if let Some(r) = &self.no_candidates {
            out.push(r.clone());
        }
        for c in self.candidates.iter().filter(|c| !c.allowed) {
            for r in &c.reasons {
                if !out.contains(r) {
                    out.push(r.clone());
                }
            }
        }
        out
    }
}

/// One admitted policy set (all loaded states); immutable.
#[derive(Debug)]
pub struct PolicySet {
    hash: String,
    dir: PathBuf,
    engine: Engine,
    routing: BTreeMap<String, RoutingFile>,
    pools: PoolsConfig,
    /// Every model the directories or the deployment's pools name.
    known_models: BTreeSet<String>,
    reports: Vec<StateReport>,
    domain_pools: usize,
    domain_models: usize,
}

impl PolicySet {
    /// Read `dir`, parse everything, and run the full admission check with `pools` added
    /// to the synthetic domain. The returned set decides over `pools`.
    pub fn load(dir: &Path, pools: &PoolsConfig) -> Result<PolicySet, PolicyError> {
        let src = SourceFiles::read(dir)?;
        let engine = Engine::build(&src)?;
        let mut routing = BTreeMap::new();
        for cc in src.states() {
            let name = format!("{}.routing.toml", cc.to_ascii_lowercase());
            let text = src.files.get(&name).map(String::as_str).unwrap_or("");
            let file = RoutingFile::parse(text, &cc, &src.path(&name))?;
            routing.insert(cc, file);
        }
        let domain = CheckDomain::new(pools, &routing);
        let mut reports = Vec::new();
        for (cc, r) in &routing {
            let file = src.path(&format!("{}.cedar", cc.to_ascii_lowercase()));
            reports.push(admission::check_state(&engine, cc, r, &domain, &file)?);
        }
        let mut known_models: BTreeSet<String> = domain.models.clone();
        known_models.remove(UNKNOWN_MODEL);
        Ok(PolicySet {
            hash: src.hash(),
            dir: dir.to_path_buf(),
            engine,
            routing,
            pools: pools.clone(),
            known_models,
            reports,
            domain_pools: domain.pools.len(),
            domain_models: domain.models.len(),
        })
    }

    /// SHA-256 (hex) over the sorted (file name, contents) of the policy files.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Loaded member states (upper-case codes, sorted).
    pub fn states(&self) -> impl Iterator<Item = &str> {
        self.routing.keys().map(String::as_str)
    }

    /// A state's parsed routing file.
    pub fn routing(&self, state: &str) -> Option<&RoutingFile> {
        self.routing.get(state)
    }

    /// The directory entry of a ministry, if its state lists it.
    pub fn ministry(&self, state: &str, ministry: &str) -> Option<&MinistryEntry> {
        self.routing.get(state)?.ministries.get(ministry)
    }

    /// The admission check's per-state results.
    pub fn reports(&self) -> &[StateReport] {
        &self.reports
    }

    /// Size of the admission domain: (pools, models).
    pub fn domain_size(&self) -> (usize, usize) {
        (self.domain_pools, self.domain_models)
    }

    /// The file a policy id comes from and its reason code, if any.
    pub fn policy_reason(&self, id: &str) -> Option<(&str, Option<&str>)> {
        self.engine
            .policies
            .get(id)
            .map(|i| (i.file.as_str(), i.reason.as_deref()))
    }

    /// Decide a request over the deployment's pools, in the state's routing order.
    ///
    /// A listed ministry gets its directory's models and criticality, and the lower of the
    /// token's and the directory's clearance. An unlisted ministry keeps the token's
    /// clearance, may use any model, and counts as `high` criticality (the strictest).
    pub fn decide(&self, req: &DecisionRequest) -> ResidencyDecision {
        let entry = self.ministry(req.state, req.ministry);
        let clearance = entry.map_or(req.clearance, |e| e.clearance.min(req.clearance));
        let mut decision = ResidencyDecision {
            policy_hash: self.hash.clone(),
            state: req.state.to_string(),
            ministry: req.ministry.to_string(),
            listed_ministry: entry.is_some(),
            clearance,
            classification: req.classification,
            model: req.model.to_string(),
            candidates: vec![],
            no_candidates: None,
        };
        let Some(routing) = self.routing.get(req.state) else {
            decision.no_candidates = Some(STATE_NOT_LOADED.to_string());
            return decision;
        };
        if !self.engine.has_state(req.state) {
            decision.no_candidates = Some(STATE_NOT_LOADED.to_string());
            return decision;
        }
        let order =
            files::resolve_order(routing.routing.get(req.classification), &self.pools.pools);
        if order.is_empty() {
            decision.no_candidates = Some(NO_CANDIDATE_POOL.to_string());
            return decision;
        }
        let facts = MinistryFacts {
            state: req.state,
            id: req.ministry,
            clearance,
            criticality: entry.map_or(Criticality::High, |e| e.criticality),
            models: match entry {
                Some(e) => e.models.iter().map(String::as_str).collect(),
                None => self
                    .known_models
                    .iter()
                    .map(String::as_str)
                    .chain([req.model])
                    .collect(),
            },
        };
        let prepared = self
            .engine
            .entities(req.state, [&facts], order.iter().copied())
            .and_then(|entities| {
                let principal = Engine::ministry_uid(req.state, req.ministry)?;
                let context = self.engine.context(req.classification, req.model)?;
                Ok((entities, principal, context))
            });
        for pool in order {
            let verdict = match &prepared {
                Ok((entities, principal, context)) => match Engine::pool_uid(&pool.id) {
                    Ok(uid) => self
                        .engine
                        .evaluate(req.state, entities, principal, &uid, context),
                    Err(_) => engine::Verdict {
                        allowed: false,
                        policy_ids: vec![],
                        reasons: vec![EVALUATION_ERROR.to_string()],
                    },
                },
                // Fail closed: a request the engine cannot even build is denied everywhere.
                Err(_) => engine::Verdict {
                    allowed: false,
                    policy_ids: vec![],
                    reasons: vec![EVALUATION_ERROR.to_string()],
                },
            };
            decision.candidates.push(Candidate {
                pool: pool.id.clone(),
                country: pool.country.to_string(),
                allowed: verdict.allowed,
                policy_ids: verdict.policy_ids,
                reasons: verdict.reasons,
            });
        }
        decision
    }
}
