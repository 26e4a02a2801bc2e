//! `sovctl audit ...` and `sovctl receipt ...`: the auditor's command line over the
//! `audit` module. Parses arguments, calls the module, prints; decides nothing itself.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand, ValueEnum};

use crate::audit::{
    self, AuditConfig, AuditLog, Candidate, ConsistencyProof, Decision, Filter, Outcome, Phase,
    Proof, Record, RecordInput, VerifierKey,
};
use crate::domain::Classification;

/// `sovctl audit ...`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Recompute every log's Merkle tree, check every checkpoint signature and the
    /// retention anchor. Exit 0 when intact, 1 naming the first bad sequence number.
    Verify(VerifyArgs),
    /// List records matching filters, as a table, JSON lines or CSV.
    Query(Box<QueryArgs>),
    /// Print an inclusion proof (JSON) of a request's decision record against the latest
    /// signed checkpoint of its log.
    Prove(ProveArgs),
    /// Check an inclusion proof offline (exit 0 valid, 1 not).
    VerifyProof(VerifyProofArgs),
    /// Print and check a consistency proof between two tree sizes of one log.
    Consistency(ConsistencyArgs),
    /// List the records whose prompt HMAC matches a prompt file (exit 0: some, 1: none).
    CheckPrompt(CheckPromptArgs),
    /// Generate the checkpoint/receipt signing key and per-state HMAC keys.
    Keygen(KeygenArgs),
    /// Measure group-commit append throughput and latency with real fsync.
    Bench(BenchArgs),
}

/// `sovctl receipt ...`
#[derive(Debug, Subcommand)]
pub enum ReceiptCommand {
    /// Check an `x-residency-receipt` offline and print its statement (exit 0 valid, 1 not).
    Verify(ReceiptVerifyArgs),
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Audit root (every state's log) or one state's log directory.
    pub dir: PathBuf,
    /// Trusted verifier key (file or `name+id+key` line); repeatable. Without it the
    /// log's own `vkey` file is used, which proves nothing against its operator.
    #[arg(long)]
    pub key: Vec<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum, Default)]
pub enum Format {
    #[default]
    Table,
    Jsonl,
    Csv,
}

#[derive(Debug, Args)]
pub struct QueryArgs {
    /// Audit root or one state's log directory.
    pub dir: PathBuf,
    #[arg(long)]
    pub state: Option<String>,
    #[arg(long)]
    pub ministry: Option<String>,
    /// RFC 3339, inclusive.
    #[arg(long)]
    pub since: Option<String>,
    /// RFC 3339, inclusive.
    #[arg(long)]
    pub until: Option<String>,
    /// allow or deny.
    #[arg(long)]
    pub decision: Option<String>,
    /// A reason code (record, candidate or outcome).
    #[arg(long)]
    pub reason: Option<String>,
    #[arg(long)]
    pub pool: Option<String>,
    /// The pool's country.
    #[arg(long)]
    pub country: Option<String>,
    #[arg(long)]
    pub policy_hash: Option<String>,
    #[arg(long)]
    pub request_id: Option<String>,
    /// decision, completion or retention.
    #[arg(long)]
    pub phase: Option<String>,
    /// Only the newest N matches.
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct ProveArgs {
    /// Audit root or one state's log directory.
    #[arg(long)]
    pub dir: PathBuf,
    #[arg(long, required_unless_present = "seq")]
    pub request_id: Option<String>,
    /// Prove this sequence number instead (`--dir` must be one state's log).
    #[arg(long, conflicts_with = "request_id")]
    pub seq: Option<u64>,
}

#[derive(Debug, Args)]
pub struct VerifyProofArgs {
    /// Proof file from `sovctl audit prove`, or `-` for stdin.
    pub proof: String,
    /// Trusted verifier key (file or line); repeatable. Without it the checkpoint
    /// signature is NOT checked.
    #[arg(long)]
    pub key: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ConsistencyArgs {
    /// Audit root (with `--state`) or one state's log directory.
    #[arg(long)]
    pub dir: PathBuf,
    #[arg(long)]
    pub state: Option<String>,
    /// The older tree size (e.g. a receipt's checkpoint_size).
    #[arg(long)]
    pub old: u64,
    /// The newer tree size (default: the latest checkpoint).
    #[arg(long)]
    pub new: Option<u64>,
    /// Trusted verifier key for the checkpoints in the proof; repeatable.
    #[arg(long)]
    pub key: Vec<String>,
}

#[derive(Debug, Args)]
pub struct CheckPromptArgs {
    /// Audit root or one state's log directory.
    pub dir: PathBuf,
    /// The member state's HMAC key file.
    #[arg(long)]
    pub key: PathBuf,
    /// The prompt: plain text, a JSON array of {role, content}, or a request body.
    #[arg(long)]
    pub text: PathBuf,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Key name in checkpoint signature lines.
    #[arg(long, default_value = audit::DEFAULT_KEY_NAME)]
    pub name: String,
    /// Also write an HMAC key per state, e.g. `DE,FR,IT`.
    #[arg(long, value_delimiter = ',')]
    pub hmac_states: Vec<String>,
    /// Overwrite existing key files.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Directory on the disk to measure (a temporary subdirectory is used and removed).
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
    /// Concurrent writer counts to run.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64,256")]
    pub writers: Vec<usize>,
    /// Records per run.
    #[arg(long, default_value_t = 20_000)]
    pub records: usize,
    /// Keep the logs written (their path is printed) instead of removing them.
    #[arg(long)]
    pub keep: bool,
    /// Measure one plain fsync instead of the log: append one record-sized line to a file
    /// and `fdatasync` it, `--records` times (what an fsync costs on this disk, without
    /// the log's durability ring or writer thread).
    #[arg(long)]
    pub plain_fsync: bool,
}

#[derive(Debug, Args)]
pub struct ReceiptVerifyArgs {
    /// The receipt (the header value), a file holding it, or `-` for stdin.
    pub receipt: String,
    /// Trusted verifier key (file or line); repeatable.
    #[arg(long, required = true)]
    pub key: Vec<String>,
}

pub fn run_audit(cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCommand::Verify(a) => verify(a),
        AuditCommand::Query(a) => query(*a),
        AuditCommand::Prove(a) => prove(a),
        AuditCommand::VerifyProof(a) => verify_proof(a),
        AuditCommand::Consistency(a) => consistency(a),
        AuditCommand::CheckPrompt(a) => check_prompt(a),
        AuditCommand::Keygen(a) => keygen(a),
        AuditCommand::Bench(a) => bench(a),
    }
}

pub fn run_receipt(cmd: ReceiptCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ReceiptCommand::Verify(a) => {
            let keys = load_keys(&a.key)?;
            let text = read_arg(&a.receipt)?;
            match audit::verify_receipt(&text, &keys) {
                Ok(st) => {
                    println!("{}", serde_json::to_string_pretty(&st)?);
                    eprintln!("receipt OK: signed by {}", st.key);
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("receipt INVALID: {e}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
    }
}

fn load_keys(args: &[String]) -> anyhow::Result<Vec<VerifierKey>> {
    args.iter()
        .map(|k| VerifierKey::load(k).map_err(anyhow::Error::from))
        .collect()
}

/// A value given inline, as a file path, or `-` (stdin).
fn read_arg(arg: &str) -> anyhow::Result<String> {
    if arg == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        return Ok(s);
    }
    let p = Path::new(arg);
    if p.is_file() {
        return std::fs::read_to_string(p).with_context(|| format!("reading {arg}"));
    }
    Ok(arg.to_string())
}

fn verify(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let keys = load_keys(&a.key)?;
    let started = Instant::now();
    let mut last = Instant::now();
    let report = audit::verify_dir(&a.dir, &keys, |p| {
        if last.elapsed().as_millis() >= 500 && !a.json {
            last = Instant::now();
            let pct = (p.bytes_done * 100)
                .checked_div(p.bytes_total)
                .unwrap_or(100);
            eprintln!("  {}: {} records, {pct}%", p.log.display(), p.records);
        }
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for l in &report.logs {
            let origin = l.origin.as_deref().unwrap_or("?");
            match &l.error {
                None => println!(
                    "OK    {} ({origin}): records {}..{}, {} checkpoints, latest covers {}",
                    l.dir.display(),
                    l.start,
                    l.size as i128 - 1,
                    l.checkpoints,
                    l.latest_checkpoint.unwrap_or(0)
                ),
                Some(f) => println!(
                    "FAIL  {} ({origin}): {}{}",
                    l.dir.display(),
                    f.seq
                        .map(|s| format!("first bad seq {s}: "))
                        .unwrap_or_default(),
                    f.what
                ),
            }
            for w in &l.warnings {
                println!("      warning: {w}");
            }
        }
        println!(
            "{} in {:.1}s",
            if report.ok() { "intact" } else { "NOT INTACT" },
            started.elapsed().as_secs_f64()
        );
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn parse_time(s: &Option<String>) -> anyhow::Result<Option<chrono::DateTime<chrono::Utc>>> {
    s.as_deref()
        .map(|t| {
            chrono::DateTime::parse_from_rfc3339(t)
                .map(|d| d.with_timezone(&chrono::Utc))
                .with_context(|| format!("`{t}` is not an RFC 3339 time"))
        })
        .transpose()
}

fn query(a: QueryArgs) -> anyhow::Result<ExitCode> {
    let filter = Filter {
        state: a.state,
        ministry: a.ministry,
        since: parse_time(&a.since)?,
        until: parse_time(&a.until)?,
        decision: a
            .decision
            .as_deref()
            .map(str::parse::<Decision>)
            .transpose()
            .map_err(anyhow::Error::msg)?,
        reason: a.reason,
        pool: a.pool,
        country: a.country,
        policy_hash: a.policy_hash,
        request_id: a.request_id,
        phase: a
            .phase
            .as_deref()
            .map(str::parse::<Phase>)
            .transpose()
            .map_err(anyhow::Error::msg)?,
        limit: a.limit,
    };
    let recs = audit::read_records(&a.dir, &filter)?;
    print_records(&recs, a.format)?;
    Ok(ExitCode::SUCCESS)
}

const COLUMNS: [&str; 16] = [
    "origin",
    "seq",
    "time",
    "phase",
    "request_id",
    "state",
    "ministry",
    "classification",
    "model",
    "decision",
    "pool",
    "country",
    "reasons",
    "policy_hash",
    "status",
    "tokens",
];

fn row(r: &Record) -> [String; 16] {
    let opt = |o: &Option<String>| o.clone().unwrap_or_default();
    let mut reasons = r.reason_codes.clone();
    if let Some(o) = &r.outcome
        && !reasons.contains(&o.code)
    {
        reasons.push(o.code.clone());
    }
    [
        r.origin.clone(),
        r.seq.to_string(),
        r.time.clone(),
        format!("{:?}", r.phase).to_lowercase(),
        r.request_id.clone(),
        r.state.clone(),
        opt(&r.ministry),
        r.classification.map(|c| c.to_string()).unwrap_or_default(),
        r.model_served
            .clone()
            .or(r.model_requested.clone())
            .unwrap_or_default(),
        r.decision
            .map(|d| format!("{d:?}").to_lowercase())
            .unwrap_or_default(),
        opt(&r.pool),
        opt(&r.pool_country),
        reasons.join(" "),
        opt(&r.policy_hash),
        r.outcome
            .as_ref()
            .map(|o| o.status.to_string())
            .unwrap_or_default(),
        match (r.prompt_tokens, r.completion_tokens) {
            (None, None) => String::new(),
            (p, c) => format!("{}/{}", p.unwrap_or(0), c.unwrap_or(0)),
        },
    ]
}

fn print_records(recs: &[Record], format: Format) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match format {
        Format::Jsonl => {
            for r in recs {
                out.write_all(&r.canonical()?)?;
                out.write_all(b"\n")?;
            }
        }
        Format::Csv => {
            writeln!(out, "{}", COLUMNS.join(","))?;
            for r in recs {
                let cells: Vec<String> = row(r).iter().map(|c| csv_cell(c)).collect();
                writeln!(out, "{}", cells.join(","))?;
            }
        }
        Format::Table => {
            // The table leaves out origin and policy hash (in jsonl/csv) to stay readable.
            let keep = [1usize, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 15];
            let rows: Vec<[String; 16]> = recs.iter().map(row).collect();
            let mut width = [0usize; 16];
            for i in keep {
                width[i] = COLUMNS[i].len();
                for r in &rows {
                    width[i] = width[i].max(r[i].chars().count());
                }
            }
            let line = |cells: &[String; 16]| {
                keep.iter()
                    .map(|&i| format!("{:<w$}", cells[i], w = width[i]))
                    .collect::<Vec<_>>()
                    .join("  ")
                    .trim_end()
                    .to_string()
            };
            writeln!(out, "{}", line(&COLUMNS.map(String::from)))?;
            for r in &rows {
                writeln!(out, "{}", line(r))?;
            }
            writeln!(out, "({} records)", recs.len())?;
        }
    }
    Ok(())
}

fn csv_cell(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn prove(a: ProveArgs) -> anyhow::Result<ExitCode> {
    let proof = match (&a.request_id, a.seq) {
        (_, Some(seq)) => audit::inclusion_proof_at(&a.dir, seq)?,
        (Some(id), None) => audit::inclusion_proof(&a.dir, id)?,
        (None, None) => bail!("give --request-id or --seq"),
    };
    println!("{}", serde_json::to_string_pretty(&proof)?);
    Ok(ExitCode::SUCCESS)
}

fn verify_proof(a: VerifyProofArgs) -> anyhow::Result<ExitCode> {
    let keys = load_keys(&a.key)?;
    let text = if a.proof == "-" {
        read_arg("-")?
    } else {
        std::fs::read_to_string(&a.proof).with_context(|| format!("reading {}", a.proof))?
    };
    let proof: Proof = serde_json::from_str(&text).context("not an inclusion proof")?;
    match audit::verify_proof(&proof, &keys) {
        Ok(()) => {
            println!(
                "proof OK: {} seq {} (request {}) is in the tree of size {}{}",
                proof.origin,
                proof.seq,
                proof.record.request_id,
                proof.tree_size,
                if keys.is_empty() {
                    " (checkpoint signature NOT checked: no --key)"
                } else {
                    ", checkpoint signature verified"
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!("proof INVALID: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn consistency(a: ConsistencyArgs) -> anyhow::Result<ExitCode> {
    let keys = load_keys(&a.key)?;
    let log = match &a.state {
        Some(s) => a.dir.join(s.to_ascii_uppercase()),
        None => a.dir.clone(),
    };
    let p: ConsistencyProof = audit::consistency_proof(&log, a.old, a.new)?;
    println!("{}", serde_json::to_string_pretty(&p)?);
    match audit::verify_consistency(&p, &keys) {
        Ok(()) => {
            eprintln!(
                "consistent: the tree of size {} is a prefix of the tree of size {}",
                p.old_size, p.new_size
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("NOT consistent: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn check_prompt(a: CheckPromptArgs) -> anyhow::Result<ExitCode> {
    let key = audit::load_hmac_key(&a.key)?;
    let text = std::fs::read(&a.text).with_context(|| format!("reading {}", a.text.display()))?;
    let recs = audit::check_prompt(&a.dir, &key, &text)?;
    print_records(&recs, a.format)?;
    Ok(if recs.is_empty() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn write_secret(path: &Path, data: &[u8], force: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).mode(0o600);
    if force {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("writing {} (use --force to overwrite)", path.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    Ok(())
}

fn keygen(a: KeygenArgs) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&a.out)?;
    let (skey, vkey) = audit::generate_signing_key(&a.name)?;
    let sk = a.out.join("audit-signing.key");
    let pk = a.out.join("audit-signing.pub");
    write_secret(&sk, format!("{skey}\n").as_bytes(), a.force)?;
    std::fs::write(&pk, format!("{vkey}\n"))?;
    println!("signing key   {}", sk.display());
    println!("verifier key  {}  ({vkey})", pk.display());
    for s in &a.hmac_states {
        let cc = s.trim().to_ascii_uppercase();
        if cc.len() != 2 || !cc.bytes().all(|b| b.is_ascii_uppercase()) {
            bail!("`{s}` is not a country code");
        }
        let mut key = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut key);
        let p = a.out.join(format!("hmac-{cc}.key"));
        write_secret(&p, format!("{}\n", crate::hexstr(key)).as_bytes(), a.force)?;
        println!("hmac key {cc}   {}", p.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// A realistic decision record for benchmarks and tests.
pub fn sample_record(state: &str, i: usize) -> RecordInput {
    RecordInput {
        phase: Phase::Decision,
        request_id: format!("req-{i:08}"),
        state: state.to_string(),
        ministry: Some("bmi".into()),
        caller_hmac: Some("ab".repeat(32)),
        classification: Some(Classification::Internal),
        model_requested: Some("smollm2".into()),
        model_served: Some("smollm2".into()),
        decision: Some(Decision::Allow),
        pool: Some("de-fra-1".into()),
        pool_country: Some("DE".into()),
        candidates: vec![
            Candidate {
                pool: "de-fra-1".into(),
                country: "DE".into(),
                allowed: true,
                policy_ids: vec!["de-internal-eu".into()],
                reasons: vec![],
            },
            Candidate {
                pool: "us-east-1".into(),
                country: "US".into(),
                allowed: false,
                policy_ids: vec!["eu-baseline-no-third-country".into()],
                reasons: vec!["pool_outside_eu".into()],
            },
        ],
        reason_codes: vec![],
        policy_hash: Some("cd".repeat(32)),
        prompt_hmac: Some("ef".repeat(32)),
        response_hmac: None,
        prompt_tokens: Some(42),
        completion_tokens: None,
        latency_ms: None,
        outcome: None::<Outcome>,
        retention: None,
    }
}

fn bench(a: BenchArgs) -> anyhow::Result<ExitCode> {
    let root = a
        .dir
        .join(format!(".sov-audit-bench-{}", std::process::id()));
    std::fs::create_dir_all(&root)?;
    let result = bench_in(&root, &a);
    if a.keep {
        eprintln!("logs kept in {}", root.display());
    } else {
        let _ = std::fs::remove_dir_all(&root);
    }
    result?;
    Ok(ExitCode::SUCCESS)
}

/// The `p` quantile, in ms, of latencies in us sorted ascending (not empty).
fn pct_ms(sorted_us: &[u64], p: f64) -> f64 {
    sorted_us[((sorted_us.len() as f64 - 1.0) * p) as usize] as f64 / 1000.0
}

/// `--plain-fsync`: append + `fdatasync` of one canonical sample record per round.
fn bench_plain_fsync(root: &Path, records: usize) -> anyhow::Result<()> {
    use std::io::Write as _;
    let path = root.join("plain-fsync.jsonl");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    let mut lat = Vec::with_capacity(records);
    let mut line = Vec::with_capacity(1024);
    let started = Instant::now();
    for i in 0..records.max(1) {
        let rec = audit::Record::from_input(
            sample_record("DE", i),
            "sovereign-gateway/bench/DE",
            i as u64,
            "2026-01-01T00:00:00.000Z".into(),
        );
        line.clear();
        rec.write_canonical(&mut line)?;
        line.push(b'\n');
        f.write_all(&line)?;
        let t = Instant::now();
        f.sync_data()?;
        lat.push(t.elapsed().as_micros() as u64);
    }
    let secs = started.elapsed().as_secs_f64();
    lat.sort_unstable();
    println!(
        "{}",
        serde_json::json!({
            "plain_fsync": true,
            "records": lat.len(),
            "seconds": (secs * 1000.0).round() / 1000.0,
            "p50_ms": pct_ms(&lat, 0.50),
            "p99_ms": pct_ms(&lat, 0.99),
        })
    );
    Ok(())
}

fn bench_in(root: &Path, a: &BenchArgs) -> anyhow::Result<()> {
    if a.plain_fsync {
        return bench_plain_fsync(root, a.records);
    }
    let (skey, _) = audit::generate_signing_key(audit::DEFAULT_KEY_NAME)?;
    std::fs::write(root.join("signing.key"), skey)?;
    std::fs::write(root.join("hmac-DE.key"), "11".repeat(32))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    for &writers in &a.writers {
        let writers = writers.max(1);
        let dir = root.join(format!("w{writers}"));
        let cfg = AuditConfig::new(
            dir,
            root.join("signing.key"),
            BTreeMap::from([("DE".to_string(), root.join("hmac-DE.key"))]),
        );
        let per = a.records.div_ceil(writers);
        let out = rt.block_on(async move {
            let log: Arc<AuditLog> = AuditLog::open(cfg)?;
            let started = Instant::now();
            let mut tasks = Vec::new();
            for w in 0..writers {
                let log = log.clone();
                tasks.push(tokio::spawn(async move {
                    let mut lat = Vec::with_capacity(per);
                    for i in 0..per {
                        let t = Instant::now();
                        log.append(sample_record("DE", w * per + i)).await?;
                        lat.push(t.elapsed().as_micros() as u64);
                    }
                    Ok::<_, audit::AuditError>(lat)
                }));
            }
            let mut lat = Vec::new();
            for t in tasks {
                lat.extend(t.await??);
            }
            let secs = started.elapsed().as_secs_f64();
            let (_, fsyncs) = log.stats("DE").unwrap_or_default();
            log.shutdown().await;
            lat.sort_unstable();
            anyhow::Ok(serde_json::json!({
                "writers": writers,
                "records": lat.len(),
                "seconds": (secs * 1000.0).round() / 1000.0,
                "records_per_s": (lat.len() as f64 / secs).round(),
                "fsyncs": fsyncs,
                "records_per_fsync": ((lat.len() as f64 / fsyncs.max(1) as f64) * 10.0).round() / 10.0,
                "p50_ms": pct_ms(&lat, 0.50),
                "p99_ms": pct_ms(&lat, 0.99),
            }))
        })?;
        println!("{out}");
    }
    Ok(())
}
