//! Admission: the exhaustive invariant check a policy set must pass before it may be
//! used. For every loaded state it evaluates every ministry (the directory plus one
//! synthetic unlisted ministry per criticality) x classification x model x pool (a
//! built-in synthetic universe plus the deployment's pools) and proves that every
//! allowed decision respects both the EU baseline and the state's asserted invariants.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Serialize;

use super::engine::{Engine, MinistryFacts};
use super::files::{Criticality, RoutingFile};
use super::{Counterexample, PolicyError};
use crate::domain::{Classification, Country, EU_MEMBER_STATES};
use crate::pools::{Pool, PoolsConfig};

/// A model no ministry lists and no pool serves, so the check also covers requests for
/// models nobody expected.
pub const UNKNOWN_MODEL: &str = "unknown-model";

/// Certifications the synthetic pools hold (the `-a` pools hold all of them).
const SYNTHETIC_CERTS: [&str; 6] = [
    "acn-qc",
    "bsi-c5",
    "ens-high",
    "iso27001",
    "secnumcloud",
    "eucs-high",
];

/// What the check found for one state (one line of `sovctl policy check`).
#[derive(Debug, Clone, Serialize)]
pub struct StateReport {
    pub state: String,
    pub ministries: usize,
    pub forbids: usize,
    pub restricted: String,
    pub internal: String,
    pub public: String,
    pub decisions: usize,
    pub allowed: usize,
}

/// The domain of the check.
#[derive(Debug, Clone)]
pub struct CheckDomain {
    pub pools: Vec<Pool>,
    pub models: BTreeSet<String>,
}

impl CheckDomain {
    /// Synthetic pools plus the deployment's, and every model anyone names plus one
    /// unknown model.
    pub fn new(real: &PoolsConfig, routing: &BTreeMap<String, RoutingFile>) -> CheckDomain {
        let mut models: BTreeSet<String> = routing
            .values()
            .flat_map(|r| r.ministries.values())
            .flat_map(|m| m.models.iter().cloned())
            .collect();
        models.extend(real.models().into_iter().map(str::to_string));
        models.insert(UNKNOWN_MODEL.to_string());
        let mut pools = synthetic_pools(&models, real);
        pools.extend(real.pools.iter().cloned());
        CheckDomain { pools, models }
    }
}

/// The built-in universe: per EU country a fully certified pool (`syn-xx-a`), an
/// uncertified one (`syn-xx-b`) and one under US jurisdiction (`syn-xx-us`), plus pools
/// in CH, GB, NO and US. Every synthetic pool serves every model of the domain, so a
/// model check never hides a residency hole. Real pools with the same id win.
pub fn synthetic_pools(models: &BTreeSet<String>, real: &PoolsConfig) -> Vec<Pool> {
    let mut certs: BTreeSet<String> = SYNTHETIC_CERTS.iter().map(|s| s.to_string()).collect();
    certs.extend(
        real.pools
            .iter()
            .flat_map(|p| p.certifications.iter().cloned()),
    );
    let pool = |id: String, country: &str, jurisdiction: &str, certifications: BTreeSet<String>| {
        country.parse::<Country>().ok().map(|country| Pool {
            id,
            country,
            jurisdiction: jurisdiction.to_string(),
            certifications,
            models: models.clone(),
            workers: vec![],
        })
    };
    let mut out = Vec::new();
    for cc in EU_MEMBER_STATES {
        let lc = cc.to_ascii_lowercase();
        out.extend(pool(format!("syn-{lc}-a"), cc, "EU", certs.clone()));
        out.extend(pool(format!("syn-{lc}-b"), cc, "EU", BTreeSet::new()));
        out.extend(pool(format!("syn-{lc}-us"), cc, "US", certs.clone()));
    }
    for (cc, jurisdiction) in [
        ("CH", "CH"),
        ("GB", "GB"),
        ("NO", "NO"),
        ("US", "US"),
        ("US", "EU"),
    ] {
        let id = format!(
            "syn-{}-{}",
            cc.to_ascii_lowercase(),
            jurisdiction.to_ascii_lowercase()
        );
        out.extend(pool(id, cc, jurisdiction, certs.clone()));
    }
    out.retain(|p| real.get(&p.id).is_none());
    out
}

/// Run the exhaustive check for one state.
pub fn check_state(
    engine: &Engine,
    cc: &str,
    routing: &RoutingFile,
    domain: &CheckDomain,
    policy_file: &Path,
) -> Result<StateReport, PolicyError> {
    let all_models: Vec<&str> = domain.models.iter().map(String::as_str).collect();
    let unlisted: Vec<(String, Criticality)> = Criticality::ALL
        .iter()
        .map(|c| (format!("~unlisted-{}", c.as_str()), *c))
        .collect();
    let mut ministries: Vec<MinistryFacts> = routing
        .ministries
        .values()
        .map(|m| MinistryFacts {
            state: cc,
            id: &m.id,
            clearance: m.clearance,
            criticality: m.criticality,
            models: m.models.iter().map(String::as_str).collect(),
        })
        .collect();
    ministries.extend(unlisted.iter().map(|(id, c)| MinistryFacts {
        state: cc,
        id,
        clearance: Classification::Restricted,
        criticality: *c,
        models: all_models.clone(),
    }));
    let entities = engine.entities(cc, ministries.iter(), domain.pools.iter())?;
    let pool_uids = domain
        .pools
        .iter()
        .map(|p| Engine::pool_uid(&p.id))
        .collect::<Result<Vec<_>, _>>()?;

    let mut decisions = 0;
    let mut allowed = 0;
    for m in &ministries {
        let principal = Engine::ministry_uid(cc, m.id)?;
        for class in Classification::ALL {
            let invariant = routing.invariants.get(class);
            for model in &domain.models {
                let context = engine.context(class, model)?;
                for (pool, pool_uid) in domain.pools.iter().zip(&pool_uids) {
                    let v = engine.evaluate(cc, &entities, &principal, pool_uid, &context);
                    decisions += 1;
                    if !v.allowed {
                        continue;
                    }
                    allowed += 1;
                    let broken = if !pool.is_eu() {
                        Some(
                            "pool_in_eu: allowed pools are in the EU under EU jurisdiction"
                                .to_string(),
                        )
                    } else if !pool.models.contains(model) {
                        Some("model_served: the pool serves the model".to_string())
                    } else if !m.models.contains(&model.as_str()) {
                        Some("model_allowed: the ministry may use the model".to_string())
                    } else if class > m.clearance {
                        Some("within_clearance: classification <= ministry clearance".to_string())
                    } else if !invariant.contains(pool.country.as_str()) {
                        Some(format!("{class} countries = [{invariant}]"))
                    } else {
                        None
                    };
                    if let Some(invariant) = broken {
                        return Err(PolicyError::Invariant {
                            file: policy_file.to_path_buf(),
                            policy: v.policy_ids.join(", "),
                            invariant,
                            counterexample: Box::new(Counterexample {
                                state: cc.to_string(),
                                ministry: m.id.to_string(),
                                clearance: m.clearance,
                                criticality: m.criticality.as_str().to_string(),
                                classification: class,
                                model: model.clone(),
                                pool: pool.id.clone(),
                                country: pool.country.to_string(),
                                jurisdiction: pool.jurisdiction.clone(),
                            }),
                        });
                    }
                }
            }
        }
    }
    Ok(StateReport {
        state: cc.to_string(),
        ministries: routing.ministries.len(),
        forbids: engine.count(cc, cedar_policy::Effect::Forbid),
        restricted: routing.invariants.restricted.to_string(),
        internal: routing.invariants.internal.to_string(),
        public: routing.invariants.public.to_string(),
        decisions,
        allowed,
    })
}
