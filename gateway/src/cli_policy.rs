//! `sovctl policy check` and `sovctl policy explain`: the command-line face of the
//! `policy` module for member-state officials and operators. Parses arguments, calls the
//! module, prints; decides nothing itself.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};

use crate::domain::Classification;
use crate::policy::{DecisionRequest, PolicySet};
use crate::pools::PoolsConfig;

/// `sovctl policy ...`
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Admit a policy directory: schema validation, state scoping, and an exhaustive
    /// check of every state's invariants. Exit 0 with a summary, or 1 with the file,
    /// policy id and a counterexample.
    Check(CheckArgs),
    /// Show how one request would be decided: candidate pools in routing order, allow or
    /// deny, deciding policies and reason codes. Exit 0 if some pool is allowed, 2 if the
    /// request would be refused, 1 on error.
    Explain(ExplainArgs),
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The policy directory (schema.cedarschema, eu-baseline.cedar, <cc>.cedar, <cc>.routing.toml).
    pub dir: PathBuf,
    /// The deployment's pools file, added to the built-in synthetic pools.
    #[arg(long)]
    pub pools: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The policy directory.
    #[arg(long)]
    pub policies: PathBuf,
    /// The deployment's pools file (the candidates come from it).
    #[arg(long)]
    pub pools: PathBuf,
    /// Member state, e.g. DE.
    #[arg(long)]
    pub state: String,
    /// Ministry id, e.g. bmi.
    #[arg(long)]
    pub ministry: String,
    /// Data classification of the request: public, internal or restricted.
    #[arg(long)]
    pub classification: Classification,
    /// Requested model id.
    #[arg(long)]
    pub model: String,
    /// The caller's clearance (default: the directory's, or the classification for an
    /// unlisted ministry).
    #[arg(long)]
    pub clearance: Option<Classification>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Run a `sovctl policy` subcommand.
pub fn run(cmd: PolicyCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PolicyCommand::Check(args) => Ok(check(&args)),
        PolicyCommand::Explain(args) => explain(&args),
    }
}

fn load_pools(path: Option<&Path>) -> anyhow::Result<PoolsConfig> {
    match path {
        Some(p) => PoolsConfig::load(p).map_err(anyhow::Error::from),
        None => Ok(PoolsConfig::default()),
    }
}

fn check(args: &CheckArgs) -> ExitCode {
    let pools = match load_pools(args.pools.as_deref()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("policy check FAILED: {e:#}");
            return ExitCode::from(1);
        }
    };
    match PolicySet::load(&args.dir, &pools) {
        Ok(set) => {
            print!("{}", check_summary(&set));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("policy check FAILED: {e}");
            ExitCode::from(1)
        }
    }
}

/// The success report of `sovctl policy check`: one line per state, then the hash.
pub fn check_summary(set: &PolicySet) -> String {
    let mut out = String::new();
    for r in set.reports() {
        out.push_str(&format!(
            "{}  ok  {} ministries, {} forbids  restricted: {}  internal: {}  public: {}  ({} decisions, {} allowed)\n",
            r.state, r.ministries, r.forbids, r.restricted, r.internal, r.public, r.decisions, r.allowed
        ));
    }
    let (pools, models) = set.domain_size();
    out.push_str(&format!(
        "{} states admitted over {pools} pools x {models} models\npolicy set sha256:{}\n",
        set.reports().len(),
        set.hash()
    ));
    out
}

fn explain(args: &ExplainArgs) -> anyhow::Result<ExitCode> {
    let pools = load_pools(Some(&args.pools))?;
    let set = PolicySet::load(&args.policies, &pools)
        .with_context(|| format!("policy set {} is not admitted", args.policies.display()))?;
    let state = args.state.to_ascii_uppercase();
    let clearance = args.clearance.unwrap_or_else(|| {
        set.ministry(&state, &args.ministry)
            .map_or(args.classification, |m| m.clearance)
    });
    let d = set.decide(&DecisionRequest {
        state: &state,
        ministry: &args.ministry,
        clearance,
        classification: args.classification,
        model: &args.model,
    });
    let allowed = d.allowed().next().is_some();
    if args.json {
        let mut v = serde_json::to_value(&d)?;
        if let Some(obj) = v.as_object_mut() {
            obj.insert("allowed".into(), allowed.into());
            obj.insert(
                "pool".into(),
                d.allowed().next().map(|c| c.pool.clone()).into(),
            );
            obj.insert("deny_reasons".into(), d.deny_reasons().into());
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", explain_table(&d));
    }
    Ok(if allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

/// The human-readable form of a decision.
pub fn explain_table(d: &crate::policy::ResidencyDecision) -> String {
    let mut out = String::new();
    out.push_str(&format!("policy set  sha256:{}\n", d.policy_hash));
    out.push_str(&format!(
        "request     {}/{} ({}, clearance {}): {} data, model {}\n",
        d.state,
        d.ministry,
        if d.listed_ministry {
            "listed"
        } else {
            "not in directory"
        },
        d.clearance,
        d.classification,
        d.model
    ));
    match d.allowed().next() {
        Some(c) => out.push_str(&format!(
            "decision    ALLOW -> {} ({})\n",
            c.pool, c.country
        )),
        None => out.push_str(&format!(
            "decision    DENY ({})\n",
            d.deny_reasons().join(", ")
        )),
    }
    if d.candidates.is_empty() {
        return out;
    }
    let rows: Vec<[String; 6]> = d
        .candidates
        .iter()
        .enumerate()
        .map(|(i, c)| {
            [
                (i + 1).to_string(),
                c.pool.clone(),
                c.country.clone(),
                if c.allowed { "allow" } else { "deny" }.to_string(),
                c.policy_ids.join(", "),
                if c.reasons.is_empty() {
                    "-".to_string()
                } else {
                    c.reasons.join(", ")
                },
            ]
        })
        .collect();
    let header = ["#", "pool", "country", "decision", "policies", "reasons"];
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    out.push('\n');
    out.push_str(&line(&header.map(String::from)));
    for r in &rows {
        out.push_str(&line(r));
    }
    out
}
