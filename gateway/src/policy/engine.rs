//! The Cedar side of a policy set: parse the schema and the policy files, enforce the
//! structural rules (ids, reasons, state scoping, schema validation), build entities and
//! evaluate one (ministry, pool, context) request. Decides nothing about routing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;

use cedar_policy::{
    Authorizer, Context, Decision, Effect, Entities, Entity, EntityId, EntityTypeName, EntityUid,
    Policy, PolicyId, PrincipalConstraint, Request, RestrictedExpression, Schema, ValidationMode,
    Validator,
};
use miette::Diagnostic;

use super::PolicyError;
use super::files::{BASELINE_FILE, Criticality, SCHEMA_FILE, SourceFiles};
use crate::domain::Classification;
use crate::pools::Pool;

/// Reason code for a deny that no forbid explains (nothing permitted).
pub const NO_PERMIT: &str = "no_permit";
/// Reason code when a policy failed to evaluate (the request is denied: fail closed).
pub const EVALUATION_ERROR: &str = "policy_evaluation_error";

/// What one policy is, for explaining decisions.
#[derive(Debug, Clone)]
pub(crate) struct PolicyInfo {
    pub file: String,
    pub effect: Effect,
    pub reason: Option<String>,
}

/// The outcome of one Cedar evaluation.
#[derive(Debug, Clone)]
pub(crate) struct Verdict {
    pub allowed: bool,
    pub policy_ids: Vec<String>,
    pub reasons: Vec<String>,
}

/// A ministry as the policies see it.
#[derive(Debug, Clone)]
pub(crate) struct MinistryFacts<'a> {
    pub state: &'a str,
    pub id: &'a str,
    pub clearance: Classification,
    pub criticality: Criticality,
    pub models: Vec<&'a str>,
}

pub(crate) struct Engine {
    schema: Schema,
    /// Per state: the baseline plus that state's own policies.
    per_state: BTreeMap<String, cedar_policy::PolicySet>,
    pub policies: BTreeMap<String, PolicyInfo>,
    action: EntityUid,
    authorizer: Authorizer,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("states", &self.per_state.keys().collect::<Vec<_>>())
            .field("policies", &self.policies.len())
            .finish()
    }
}

impl Engine {
    /// Parse and structurally check every Cedar file of `src`.
    pub fn build(src: &SourceFiles) -> Result<Engine, PolicyError> {
        let schema_path = src.path(SCHEMA_FILE);
        let schema_text = src.files.get(SCHEMA_FILE).map(String::as_str).unwrap_or("");
        let schema = match Schema::from_cedarschema_str(schema_text) {
            Ok((schema, _warnings)) => schema,
            Err(e) => {
                let (line, column) = first_label_line_col(&e, schema_text);
                return Err(PolicyError::Parse {
                    file: schema_path,
                    line,
                    column,
                    message: e.to_string(),
                });
            }
        };
        let action = uid("Action", "process")?;
        if !schema.actions().any(|a| a == &action) {
            return Err(PolicyError::Schema {
                file: schema_path,
                message: "the schema must declare `action process`".into(),
            });
        }

        let baseline = parse_file(src, BASELINE_FILE, None)?;
        let mut per_state = BTreeMap::new();
        let mut policies = BTreeMap::new();
        let mut all = cedar_policy::PolicySet::new();
        for p in &baseline {
            add_info(&mut policies, BASELINE_FILE, p);
            all.add(p.clone()).map_err(|e| PolicyError::Policy {
                file: src.path(BASELINE_FILE),
                policy: p.id().to_string(),
                message: e.to_string(),
            })?;
        }
        for cc in src.states() {
            let name = format!("{}.cedar", cc.to_ascii_lowercase());
            let own = parse_file(src, &name, Some(&cc))?;
            let mut set = cedar_policy::PolicySet::new();
            for p in baseline.iter().chain(own.iter()) {
                set.add(p.clone()).map_err(|e| PolicyError::Policy {
                    file: src.path(&name),
                    policy: p.id().to_string(),
                    message: e.to_string(),
                })?;
            }
            for p in &own {
                add_info(&mut policies, &name, p);
                all.add(p.clone()).map_err(|e| PolicyError::Policy {
                    file: src.path(&name),
                    policy: p.id().to_string(),
                    message: e.to_string(),
                })?;
            }
            per_state.insert(cc, set);
        }

        let result = Validator::new(schema.clone()).validate(&all, ValidationMode::Strict);
        if let Some(e) = result.validation_errors().next() {
            let id = e.policy_id().to_string();
            let file = policies
                .get(&id)
                .map(|i| i.file.clone())
                .unwrap_or_default();
            let text = src.files.get(&file).map(String::as_str).unwrap_or("");
            let (line, _) = first_label_line_col(e, text);
            return Err(PolicyError::Policy {
                file: src.path(&file),
                policy: id,
                message: format!("schema validation failed (line {line}): {e}"),
            });
        }

        let engine = Engine {
            schema,
            per_state,
            policies,
            action,
            authorizer: Authorizer::new(),
        };
        engine.probe().map_err(|message| PolicyError::Schema {
            file: schema_path,
            message,
        })?;
        Ok(engine)
    }

    /// Check once that the requests and entities this module builds conform to the
    /// schema, so evaluation can skip per-request validation.
    fn probe(&self) -> Result<(), String> {
        let expect = "the schema must declare `action process` for principal Ministry, \
                      resource Pool, context {classification: String, level: Long, model: String} \
                      and the entity attributes listed in policies/README.md";
        let ministry = MinistryFacts {
            state: "DE",
            id: "probe",
            clearance: Classification::Internal,
            criticality: Criticality::Low,
            models: vec!["m"],
        };
        let pool = Pool {
            id: "probe".into(),
            country: "DE".parse().map_err(|e: String| e)?,
            jurisdiction: "EU".into(),
            certifications: Default::default(),
            models: ["m".to_string()].into(),
            workers: vec![],
        };
        self.entities("DE", [&ministry], [&pool])
            .map_err(|e| format!("{expect}: {e}"))?;
        let context = self
            .context(Classification::Internal, "m")
            .map_err(|e| format!("{expect}: {e}"))?;
        let principal = Self::ministry_uid("DE", "probe").map_err(|e| e.to_string())?;
        let resource = Self::pool_uid("probe").map_err(|e| e.to_string())?;
        Request::new(
            principal,
            self.action.clone(),
            resource,
            context,
            Some(&self.schema),
        )
        .map(|_| ())
        .map_err(|e| format!("{expect}: {e}"))
    }

    pub fn has_state(&self, cc: &str) -> bool {
        self.per_state.contains_key(cc)
    }

    /// The permits of state `cc` (ids), for reports.
    pub fn count(&self, cc: &str, effect: Effect) -> usize {
        let lc = format!("{}.cedar", cc.to_ascii_lowercase());
        self.policies
            .values()
            .filter(|i| i.file == lc && i.effect == effect)
            .count()
    }

    pub fn ministry_uid(state: &str, ministry: &str) -> Result<EntityUid, PolicyError> {
        uid("Ministry", &format!("{state}/{ministry}"))
    }

    pub fn pool_uid(pool: &str) -> Result<EntityUid, PolicyError> {
        uid("Pool", pool)
    }

    /// The entity store for one state's ministries and a set of pools.
    pub fn entities<'a>(
        &self,
        state: &str,
        ministries: impl IntoIterator<Item = &'a MinistryFacts<'a>>,
        pools: impl IntoIterator<Item = &'a Pool>,
    ) -> Result<Entities, PolicyError> {
        let state_uid = uid("State", state)?;
        let mut list = vec![Entity::new_no_attrs(state_uid.clone(), HashSet::new())];
        for m in ministries {
            let attrs = HashMap::from([
                (
                    "allowedModels".to_string(),
                    RestrictedExpression::new_set(
                        m.models
                            .iter()
                            .map(|s| RestrictedExpression::new_string(s.to_string())),
                    ),
                ),
                (
                    "clearance".to_string(),
                    RestrictedExpression::new_string(m.clearance.to_string()),
                ),
                (
                    "clearanceLevel".to_string(),
                    RestrictedExpression::new_long(m.clearance.level()),
                ),
                (
                    "criticality".to_string(),
                    RestrictedExpression::new_string(m.criticality.as_str().to_string()),
                ),
            ]);
            let e = Entity::new(
                Self::ministry_uid(m.state, m.id)?,
                attrs,
                HashSet::from([state_uid.clone()]),
            )
            .map_err(internal)?;
            list.push(e);
        }
        for p in pools {
            let strings = |it: &mut dyn Iterator<Item = &String>| {
                RestrictedExpression::new_set(
                    it.map(|s| RestrictedExpression::new_string(s.clone()))
                        .collect::<Vec<_>>(),
                )
            };
            let attrs = HashMap::from([
                (
                    "country".to_string(),
                    RestrictedExpression::new_string(p.country.as_str().to_string()),
                ),
                (
                    "jurisdiction".to_string(),
                    RestrictedExpression::new_string(p.jurisdiction.clone()),
                ),
                (
                    "certifications".to_string(),
                    strings(&mut p.certifications.iter()),
                ),
                (
                    "eu".to_string(),
                    RestrictedExpression::new_bool(p.country.is_eu()),
                ),
                ("models".to_string(), strings(&mut p.models.iter())),
            ]);
            list.push(
                Entity::new(Self::pool_uid(&p.id)?, attrs, HashSet::new()).map_err(internal)?,
            );
        }
        Entities::from_entities(list, Some(&self.schema)).map_err(internal)
    }

    /// The request context for a classification and model.
    pub fn context(
        &self,
        classification: Classification,
        model: &str,
    ) -> Result<Context, PolicyError> {
        Context::from_pairs([
            (
                "classification".to_string(),
                RestrictedExpression::new_string(classification.to_string()),
            ),
            (
                "level".to_string(),
                RestrictedExpression::new_long(classification.level()),
            ),
            (
                "model".to_string(),
                RestrictedExpression::new_string(model.to_string()),
            ),
        ])
        .map_err(internal)
    }

    /// Evaluate one request with the baseline and `state`'s policies. An unknown state,
    /// an invalid request or an evaluation error denies (fail closed).
    pub fn evaluate(
        &self,
        state: &str,
        entities: &Entities,
        principal: &EntityUid,
        pool: &EntityUid,
        context: &Context,
    ) -> Verdict {
        let deny = |ids: Vec<String>, reason: &str| Verdict {
            allowed: false,
            policy_ids: ids,
            reasons: vec![reason.to_string()],
        };
        let Some(set) = self.per_state.get(state) else {
            return deny(vec![], NO_PERMIT);
        };
        // The request's shape was validated against the schema at build time (`probe`).
        let request = match Request::new(
            principal.clone(),
            self.action.clone(),
            pool.clone(),
            context.clone(),
            None,
        ) {
            Ok(r) => r,
            Err(_) => return deny(vec![], EVALUATION_ERROR),
        };
        let response = self.authorizer.is_authorized(&request, set, entities);
        let mut ids: Vec<String> = response
            .diagnostics()
            .reason()
            .map(PolicyId::to_string)
            .collect();
        ids.sort();
        let errors: Vec<String> = response
            .diagnostics()
            .errors()
            .map(|e| match e {
                cedar_policy::AuthorizationError::PolicyEvaluationError(pe) => {
                    pe.policy_id().to_string()
                }
            })
            .collect();
        if response.decision() == Decision::Allow && errors.is_empty() {
            return Verdict {
                allowed: true,
                policy_ids: ids,
                reasons: vec![],
            };
        }
        let mut reasons: Vec<String> = ids
            .iter()
            .filter_map(|id| self.policies.get(id).and_then(|i| i.reason.clone()))
            .collect();
        if !errors.is_empty() {
            ids.extend(errors);
            ids.sort();
            ids.dedup();
            reasons.push(EVALUATION_ERROR.to_string());
        }
        if reasons.is_empty() {
            reasons.push(NO_PERMIT.to_string());
            // A deny without forbids: nothing permitted. No policy decided it.
            ids.retain(|id| {
                self.policies
                    .get(id)
                    .is_some_and(|i| i.effect == Effect::Forbid)
            });
        }
        reasons.sort();
        reasons.dedup();
        Verdict {
            allowed: false,
            policy_ids: ids,
            reasons,
        }
    }
}

fn add_info(policies: &mut BTreeMap<String, PolicyInfo>, file: &str, p: &Policy) {
    policies.insert(
        p.id().to_string(),
        PolicyInfo {
            file: file.to_string(),
            effect: p.effect(),
            reason: p.annotation("reason").map(str::to_string),
        },
    );
}

/// Parse one Cedar file; ids come from `@id`. `state` is `None` for the baseline.
fn parse_file(
    src: &SourceFiles,
    name: &str,
    state: Option<&str>,
) -> Result<Vec<Policy>, PolicyError> {
    let file = src.path(name);
    let text = src.files.get(name).map(String::as_str).unwrap_or("");
    let parsed = cedar_policy::PolicySet::from_str(text).map_err(|e| {
        let (line, column) = first_label_line_col(&e, text);
        PolicyError::Parse {
            file: file.clone(),
            line,
            column,
            message: e.to_string(),
        }
    })?;
    if let Some(t) = parsed.templates().next() {
        return Err(PolicyError::Policy {
            file,
            policy: t.annotation("id").unwrap_or("?").to_string(),
            message: "templates (`?principal`, `?resource`) are not allowed".into(),
        });
    }
    let prefix = match state {
        Some(cc) => format!("{}/", cc.to_ascii_lowercase()),
        None => "eu-baseline/".to_string(),
    };
    let mut out: Vec<Policy> = Vec::new();
    // Keep source order so error messages follow the file.
    let mut ordered: Vec<&Policy> = parsed.policies().collect();
    ordered.sort_by_key(|p| {
        p.id()
            .to_string()
            .strip_prefix("policy")
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(usize::MAX)
    });
    for (index, p) in ordered.into_iter().enumerate() {
        let err = |policy: String, message: String| PolicyError::Policy {
            file: file.clone(),
            policy,
            message,
        };
        let Some(id) = p.annotation("id").filter(|s| !s.is_empty()) else {
            return Err(err(
                format!("#{} (no @id)", index + 1),
                "every policy needs an @id(\"...\") annotation".into(),
            ));
        };
        if !id.starts_with(&prefix) || id.len() == prefix.len() {
            return Err(err(
                id.to_string(),
                format!("@id must start with `{prefix}` in {name}"),
            ));
        }
        if out.iter().any(|q| q.id().to_string() == id) {
            return Err(err(id.to_string(), "duplicate @id".into()));
        }
        if p.effect() == Effect::Forbid {
            let reason_ok = p.annotation("reason").is_some_and(|r| {
                r.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
                    && r.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            });
            if !reason_ok {
                return Err(err(
                    id.to_string(),
                    "every forbid needs @reason(\"snake_case_code\")".into(),
                ));
            }
        }
        match state {
            None => {
                if p.effect() == Effect::Permit {
                    return Err(err(
                        id.to_string(),
                        "the EU baseline may only contain forbids".into(),
                    ));
                }
            }
            Some(cc) => {
                if !scoped_to(&p.principal_constraint(), cc) {
                    return Err(err(
                        id.to_string(),
                        format!(
                            "not scoped to its state: the scope must be `principal in State::\"{cc}\"` (or a ministry of {cc})"
                        ),
                    ));
                }
            }
        }
        out.push(p.new_id(PolicyId::new(id)));
    }
    if let Some(cc) = state {
        let permits = out.iter().filter(|p| p.effect() == Effect::Permit).count();
        if permits != 1 {
            return Err(PolicyError::Policy {
                file,
                policy: format!("{}/permit", cc.to_ascii_lowercase()),
                message: format!("a state file needs exactly one permit, found {permits}"),
            });
        }
    }
    Ok(out)
}

/// Whether a principal scope only matches ministries of state `cc`.
fn scoped_to(c: &PrincipalConstraint, cc: &str) -> bool {
    let within = |u: &EntityUid| {
        let ty = u.type_name().to_string();
        let id = u.id().unescaped();
        (ty == "State" && id == cc)
            || (ty == "Ministry" && id.strip_prefix(cc).is_some_and(|r| r.starts_with('/')))
    };
    match c {
        PrincipalConstraint::In(u)
        | PrincipalConstraint::Eq(u)
        | PrincipalConstraint::IsIn(_, u) => within(u),
        PrincipalConstraint::Any | PrincipalConstraint::Is(_) => false,
    }
}

fn uid(ty: &str, id: &str) -> Result<EntityUid, PolicyError> {
    let ty = EntityTypeName::from_str(ty).map_err(internal)?;
    Ok(EntityUid::from_type_name_and_id(ty, EntityId::new(id)))
}

fn internal(e: impl std::fmt::Display) -> PolicyError {
    PolicyError::Internal(e.to_string())
}

/// 1-based line and column of a diagnostic's first labelled span (1:1 if none).
fn first_label_line_col(d: &dyn Diagnostic, text: &str) -> (usize, usize) {
    let offset = d
        .labels()
        .and_then(|mut l| l.next())
        .map(|l| l.offset())
        .unwrap_or(0)
        .min(text.len());
    let before = text.get(..offset).unwrap_or("");
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}
