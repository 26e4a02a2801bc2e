//! The policy directory on disk: which files belong to a policy set, the set's hash, and
//! the typed form of each state's `<cc>.routing.toml`. Knows nothing of Cedar semantics.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::PolicyError;
use crate::domain::{Classification, Country, EU_MEMBER_STATES};

pub const SCHEMA_FILE: &str = "schema.cedarschema";
pub const BASELINE_FILE: &str = "eu-baseline.cedar";

/// The files of one policy set, read in one pass: file name -> contents.
#[derive(Debug, Clone)]
pub(crate) struct SourceFiles {
    pub dir: PathBuf,
    pub files: BTreeMap<String, String>,
}

impl SourceFiles {
    /// Read every policy file of `dir`. Sub-directories (e.g. `tests/`), `*.md` files and
    /// hidden files are ignored; any other file that is not a schema, the baseline, or a
    /// `<cc>.cedar` / `<cc>.routing.toml` of an EU member state is an error.
    pub fn read(dir: &Path) -> Result<SourceFiles, PolicyError> {
        let entries = std::fs::read_dir(dir).map_err(|source| PolicyError::ReadDir {
            dir: dir.to_path_buf(),
            source,
        })?;
        let mut files = BTreeMap::new();
        for entry in entries {
            let entry = entry.map_err(|source| PolicyError::ReadDir {
                dir: dir.to_path_buf(),
                source,
            })?;
            let path = entry.path();
            if path.is_dir() {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name.ends_with(".md") {
                continue;
            }
            if classify_file(&name).is_none() {
                return Err(PolicyError::UnknownFile {
                    dir: dir.to_path_buf(),
                    name,
                });
            }
            let text = std::fs::read_to_string(&path)
                .map_err(|source| PolicyError::Read { file: path, source })?;
            files.insert(name, text);
        }
        let sources = SourceFiles {
            dir: dir.to_path_buf(),
            files,
        };
        sources.check_complete()?;
        Ok(sources)
    }

    /// SHA-256 (hex) over the sorted (file name, contents) pairs.
    pub fn hash(&self) -> String {
        hash_files(&self.files)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The member states (upper-case) that have a policy file.
    pub fn states(&self) -> Vec<String> {
        self.files
            .keys()
            .filter_map(|n| match classify_file(n) {
                Some(FileKind::StatePolicy(cc)) => Some(cc),
                _ => None,
            })
            .collect()
    }

    fn check_complete(&self) -> Result<(), PolicyError> {
        let missing = |name: String| PolicyError::Missing {
            dir: self.dir.clone(),
            name,
        };
        for required in [SCHEMA_FILE, BASELINE_FILE] {
            if !self.files.contains_key(required) {
                return Err(missing(required.to_string()));
            }
        }
        let mut states = BTreeSet::new();
        for name in self.files.keys() {
            match classify_file(name) {
                Some(FileKind::StatePolicy(cc)) | Some(FileKind::StateRouting(cc)) => {
                    states.insert(cc);
                }
                _ => {}
            }
        }
        if states.is_empty() {
            return Err(missing("any <cc>.cedar state policy".to_string()));
        }
        for cc in states {
            let lc = cc.to_ascii_lowercase();
            for name in [format!("{lc}.cedar"), format!("{lc}.routing.toml")] {
                if !self.files.contains_key(&name) {
                    return Err(missing(name));
                }
            }
        }
        Ok(())
    }
}

/// Hash of the policy files in `dir` as `SourceFiles::read` would see them; used by the
/// watcher to notice changes without parsing.
pub fn dir_hash(dir: &Path) -> Result<String, PolicyError> {
    let entries = std::fs::read_dir(dir).map_err(|source| PolicyError::ReadDir {
        dir: dir.to_path_buf(),
        source,
    })?;
    let mut files = BTreeMap::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() || name.starts_with('.') || name.ends_with(".md") {
            continue;
        }
        // Unreadable or unknown files still change the hash, so a reload reports them.
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| format!("\0unreadable: {e}"));
        files.insert(name, text);
    }
    Ok(hash_files(&files))
}

fn hash_files(files: &BTreeMap<String, String>) -> String {
    let mut h = Sha256::new();
    for (name, text) in files {
        h.update(name.as_bytes());
        h.update([0u8]);
        h.update((text.len() as u64).to_be_bytes());
        h.update(text.as_bytes());
    }
    crate::hexstr(h.finalize())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FileKind {
    Schema,
    Baseline,
    StatePolicy(String),
    StateRouting(String),
}

pub(crate) fn classify_file(name: &str) -> Option<FileKind> {
    if name == SCHEMA_FILE {
        return Some(FileKind::Schema);
    }
    if name == BASELINE_FILE {
        return Some(FileKind::Baseline);
    }
    let state = |stem: &str| {
        let up = stem.to_ascii_uppercase();
        (stem.len() == 2
            && stem.bytes().all(|b| b.is_ascii_lowercase())
            && EU_MEMBER_STATES.contains(&up.as_str()))
        .then_some(up)
    };
    if let Some(stem) = name.strip_suffix(".routing.toml") {
        return state(stem).map(FileKind::StateRouting);
    }
    if let Some(stem) = name.strip_suffix(".cedar") {
        return state(stem).map(FileKind::StatePolicy);
    }
    None
}

/// How critical a ministry's work is; policies may be stricter for `high`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Criticality {
    Low,
    Medium,
    High,
}

impl Criticality {
    pub const ALL: [Criticality; 3] = [Self::Low, Self::Medium, Self::High];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
        }
    }
}

/// One ministry of a state's directory (`[[ministries]]` in `<cc>.routing.toml`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MinistryEntry {
    /// Ministry id as it appears in tokens, e.g. `bmi` (lower-case letters, digits, `-`).
    pub id: String,
    /// Human-readable name.
    #[serde(default)]
    pub name: String,
    /// Highest classification the ministry may send.
    pub clearance: Classification,
    pub criticality: Criticality,
    /// Model ids the ministry may use.
    pub models: BTreeSet<String>,
}

/// One value per classification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerClassification<T> {
    pub public: T,
    pub internal: T,
    pub restricted: T,
}

impl<T> PerClassification<T> {
    pub fn get(&self, c: Classification) -> &T {
        match c {
            Classification::Public => &self.public,
            Classification::Internal => &self.internal,
            Classification::Restricted => &self.restricted,
        }
    }
}

/// Where an invariant lets a classification be processed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Region {
    /// Any pool in an EU member state under EU jurisdiction (`["EU"]`).
    AnyEu,
    /// Only pools in these countries (each an EU member state, under EU jurisdiction).
    Countries(BTreeSet<String>),
}

impl Region {
    pub fn contains(&self, country: &str) -> bool {
        match self {
            Region::AnyEu => EU_MEMBER_STATES.contains(&country),
            Region::Countries(cs) => cs.contains(country),
        }
    }
}

impl std::fmt::Display for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Region::AnyEu => f.write_str("EU"),
            Region::Countries(cs) => f.write_str(&cs.iter().cloned().collect::<Vec<_>>().join(",")),
        }
    }
}

/// A state's `<cc>.routing.toml`, parsed and validated.
#[derive(Debug, Clone)]
pub struct RoutingFile {
    pub state: String,
    /// Ordered preference per classification: country codes, pool ids, or `*`.
    pub routing: PerClassification<Vec<String>>,
    pub invariants: PerClassification<Region>,
    pub ministries: BTreeMap<String, MinistryEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouting {
    state: String,
    routing: PerClassification<Vec<String>>,
    invariants: PerClassification<Vec<String>>,
    #[serde(default)]
    ministries: Vec<MinistryEntry>,
}

impl RoutingFile {
    /// Parse `<cc>.routing.toml` for state `cc`; `file` only names the source in errors.
    pub fn parse(text: &str, cc: &str, file: &Path) -> Result<RoutingFile, PolicyError> {
        let err = |message: String| PolicyError::Routing {
            file: file.to_path_buf(),
            message,
        };
        let raw: RawRouting = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        if raw.state != cc {
            return Err(err(format!(
                "`state = \"{}\"` but the file belongs to {cc}",
                raw.state
            )));
        }
        let region = |class: &str, entries: &[String]| -> Result<Region, PolicyError> {
            if entries == ["EU"] {
                return Ok(Region::AnyEu);
            }
            if entries.is_empty() {
                return Err(err(format!(
                    "invariants.{class} is empty (use [\"EU\"] or country codes)"
                )));
            }
            let mut set = BTreeSet::new();
            for e in entries {
                if !EU_MEMBER_STATES.contains(&e.as_str()) {
                    return Err(err(format!(
                        "invariants.{class}: `{e}` is not an EU member state code (or use [\"EU\"] alone)"
                    )));
                }
                set.insert(e.clone());
            }
            Ok(Region::Countries(set))
        };
        let invariants = PerClassification {
            public: region("public", &raw.invariants.public)?,
            internal: region("internal", &raw.invariants.internal)?,
            restricted: region("restricted", &raw.invariants.restricted)?,
        };
        let home_only = Region::Countries(BTreeSet::from([cc.to_string()]));
        if invariants.restricted != home_only {
            return Err(err(format!(
                "invariants.restricted must be [\"{cc}\"]: restricted data never leaves the member state"
            )));
        }
        for class in Classification::ALL {
            let inv = invariants.get(class);
            for entry in raw.routing.get(class) {
                if entry == "*" {
                    continue;
                }
                if entry.len() == 2 && entry.bytes().all(|b| b.is_ascii_uppercase()) {
                    if entry.parse::<Country>().is_err() || !inv.contains(entry) {
                        return Err(err(format!(
                            "routing.{class} lists `{entry}`, outside invariants.{class} ({inv})"
                        )));
                    }
                    continue;
                }
                let pool_id_ok = entry
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
                if entry.is_empty() || !pool_id_ok {
                    return Err(err(format!(
                        "routing.{class}: `{entry}` is neither `*`, a country code (upper-case) nor a pool id"
                    )));
                }
            }
        }
        let mut ministries = BTreeMap::new();
        for m in raw.ministries {
            let id_ok = !m.id.is_empty()
                && m.id
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !id_ok {
                return Err(err(format!(
                    "ministry `{}`: id must be lower-case letters, digits and `-`",
                    m.id
                )));
            }
            if m.models.is_empty() {
                return Err(err(format!("ministry `{}`: no models", m.id)));
            }
            let id = m.id.clone();
            if ministries.insert(id.clone(), m).is_some() {
                return Err(err(format!("ministry `{id}` listed twice")));
            }
        }
        Ok(RoutingFile {
            state: raw.state,
            routing: raw.routing,
            invariants,
            ministries,
        })
    }
}

/// Resolve a routing list against the known pools: country codes expand to that
/// country's pools (by id), pool ids name one pool, `*` adds every pool not yet listed
/// (by country, then id). Unknown pool ids are skipped; no pool appears twice.
pub(crate) fn resolve_order<'p>(
    entries: &[String],
    pools: &'p [crate::pools::Pool],
) -> Vec<&'p crate::pools::Pool> {
    let mut out: Vec<&crate::pools::Pool> = Vec::new();
    let push = |out: &mut Vec<&'p crate::pools::Pool>, mut add: Vec<&'p crate::pools::Pool>| {
        add.retain(|p| !out.iter().any(|q| q.id == p.id));
        out.extend(add);
    };
    for entry in entries {
        if entry == "*" {
            let mut rest: Vec<_> = pools.iter().collect();
            rest.sort_by(|a, b| (a.country.as_str(), &a.id).cmp(&(b.country.as_str(), &b.id)));
            push(&mut out, rest);
        } else if entry.len() == 2 && entry.bytes().all(|b| b.is_ascii_uppercase()) {
            let mut here: Vec<_> = pools
                .iter()
                .filter(|p| p.country.as_str() == entry)
                .collect();
            here.sort_by(|a, b| a.id.cmp(&b.id));
            push(&mut out, here);
        } else if let Some(p) = pools.iter().find(|p| &p.id == entry) {
            push(&mut out, vec![p]);
        }
    }
    out
}
