//! `sovctl demo --dir DIR`: the local federation on loopback. It writes the embedded
//! policy set, generates demo signing keys for DE, FR and IT, fetches SmolLM2 if absent,
//! starts one worker per pool (DE, FR, IT) and the gateway as child processes, mints
//! tokens for ministries with different clearances, writes `DIR/demo.json` and prints
//! copy-paste commands. It runs until Ctrl-C (or SIGTERM) and then stops everything it
//! started. Nothing here is needed in production: it only composes the real binaries.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::auth::{MintClaims, SigningAlg, generate_state_keys};
use crate::domain::{Classification, Country};

include!(concat!(env!("OUT_DIR"), "/policies_embedded.rs"));

/// Options of `sovctl demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Directory for everything the demo writes (created if missing).
    #[arg(long)]
    pub dir: PathBuf,
    /// Model for the workers: a GGUF file, a HF directory or the alias `smollm2`.
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    /// Gateway port on 127.0.0.1 (0 = any free port).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// CPU threads per worker.
    #[arg(long, default_value_t = 1)]
    pub worker_threads: usize,
    /// KV-cache MiB per worker.
    #[arg(long, default_value_t = 64)]
    pub kv_cache_mb: usize,
    /// The worker binary (default: next to this sovctl).
    #[arg(long)]
    pub worker_bin: Option<PathBuf>,
    /// The gateway binary (default: next to this sovctl).
    #[arg(long)]
    pub gateway_bin: Option<PathBuf>,
    /// Serve the API over TLS with a generated demo CA (its certificate is `ca_cert` in
    /// demo.json); the admin listener stays plain HTTP on loopback.
    #[arg(long)]
    pub tls: bool,
    /// Seconds between checks of the policy directory for changes (0: reload only on
    /// SIGHUP to the gateway).
    #[arg(long, default_value_t = 2)]
    pub policy_reload_secs: u64,
    /// Seconds to wait for everything to become ready.
    #[arg(long, default_value_t = 180)]
    pub ready_timeout: u64,
}

/// The demo federation: pools and ministries.
struct DemoPool {
    id: &'static str,
    country: &'static str,
    certifications: &'static str,
}

/// Each state's home pool holds the certification its policy demands for restricted
/// data; `de-ber-1` lacks it, so German restricted data may never fall back to it.
const POOLS: [DemoPool; 4] = [
    DemoPool {
        id: "de-fra-1",
        country: "DE",
        certifications: r#"["bsi-c5", "iso27001"]"#,
    },
    DemoPool {
        id: "de-ber-1",
        country: "DE",
        certifications: r#"["iso27001"]"#,
    },
    DemoPool {
        id: "fr-par-1",
        country: "FR",
        certifications: r#"["secnumcloud", "iso27001"]"#,
    },
    DemoPool {
        id: "it-mil-1",
        country: "IT",
        certifications: r#"["acn-qc", "iso27001"]"#,
    },
];

/// (state, signing algorithm): one of each algorithm the gateway accepts.
const STATES: [(&str, SigningAlg); 3] = [
    ("DE", SigningAlg::EdDsa),
    ("FR", SigningAlg::Es256),
    ("IT", SigningAlg::Rs256),
];

/// (state, ministry id, clearance).
/// As in the shipped policies' ministry directories (policies/<cc>.routing.toml).
const MINISTRIES: [(&str, &str, Classification); 10] = [
    ("DE", "bmi", Classification::Restricted),
    ("DE", "bmf", Classification::Internal),
    ("DE", "bmbf", Classification::Public),
    ("DE", "aa", Classification::Restricted),
    ("FR", "minint", Classification::Restricted),
    ("FR", "bercy", Classification::Internal),
    ("FR", "menj", Classification::Public),
    ("IT", "interno", Classification::Restricted),
    ("IT", "mef", Classification::Internal),
    ("IT", "mim", Classification::Public),
];

pub const AUDIENCE: &str = "sovereign-gateway";

/// Children that are stopped (SIGTERM, then SIGKILL) when dropped.
struct Children(Vec<(String, Child)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            terminate(c);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for (name, c) in &mut self.0 {
            loop {
                match c.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        let _ = c.kill();
                        let _ = c.wait();
                        eprintln!("demo: {name} did not stop in time; killed");
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
    }
}

fn terminate(c: &Child) {
    // SAFETY: kill(2) on a pid we spawned and have not reaped; no memory is touched.
    unsafe {
        libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
    }
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let dir = absolute(&args.dir)?;
    for sub in ["keys", "tokens", "logs", "audit", "policies"] {
        std::fs::create_dir_all(dir.join(sub))
            .with_context(|| format!("cannot create {}", dir.join(sub).display()))?;
    }
    let demo_json = dir.join("demo.json");
    let _ = std::fs::remove_file(&demo_json);
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."));
    let worker_bin = args
        .worker_bin
        .clone()
        .unwrap_or_else(|| exe_dir.join("worker"));
    let gateway_bin = args
        .gateway_bin
        .clone()
        .unwrap_or_else(|| exe_dir.join("gateway"));
    for (what, p) in [("worker", &worker_bin), ("gateway", &gateway_bin)] {
        if !p.is_file() {
            bail!(
                "the {what} binary {} does not exist; build it first with `cargo build --release` \
                 (or pass --{what}-bin)",
                p.display()
            );
        }
    }

    // 1. Policies (embedded default), keys, tokens.
    for (name, text) in EMBEDDED_POLICIES {
        std::fs::write(dir.join("policies").join(name), text)?;
    }
    eprintln!(
        "demo: policy set written to {}",
        dir.join("policies").display()
    );
    let mut issuers = String::new();
    let mut ministries = Vec::new();
    for (cc, alg) in STATES {
        let country: Country = cc.parse().map_err(anyhow::Error::msg)?;
        let issuer = format!("https://idp.{}.demo.example.eu", cc.to_ascii_lowercase());
        let keys = generate_state_keys(&dir.join("keys"), &country, alg, &issuer, AUDIENCE)?;
        issuers.push_str(&format!(
            "\n[[member_state]]\nstate = \"{cc}\"\nissuer = \"{issuer}\"\naudience = \"{AUDIENCE}\"\njwks_file = {:?}\n",
            dir.join("keys").join(format!("{}.jwks.json", cc.to_ascii_lowercase()))
        ));
        for (state, ministry, clearance) in MINISTRIES.iter().filter(|m| m.0 == cc) {
            let token = keys.mint(
                &MintClaims {
                    state: state.to_string(),
                    ministry: ministry.to_string(),
                    clearance: *clearance,
                    classification: None,
                    roles: Vec::new(),
                    subject: Some(format!(
                        "demo-user@{ministry}.{}",
                        state.to_ascii_lowercase()
                    )),
                },
                Duration::from_secs(24 * 3600),
            )?;
            let path = dir
                .join("tokens")
                .join(format!("{}-{ministry}.jwt", state.to_ascii_lowercase()));
            write_private(&path, &token)?;
            ministries.push(serde_json::json!({
                "state": state, "ministry": ministry, "clearance": clearance.to_string(),
                "token_file": path,
            }));
        }
    }
    eprintln!(
        "demo: signing keys for DE (EdDSA), FR (ES256), IT (RS256) in {}",
        dir.join("keys").display()
    );
    let audit_toml = demo_audit_keys(&dir)?;

    // 2. Model.
    let model_path = if Path::new(&args.model).exists() {
        args.model.clone()
    } else {
        eprintln!(
            "demo: resolving model `{}` (downloads SmolLM2 on first use)...",
            args.model
        );
        let out = Command::new(&worker_bin)
            .args(["fetch-model", &args.model])
            .stderr(Stdio::inherit())
            .output()
            .context("cannot run the worker to fetch the model")?;
        if !out.status.success() {
            bail!("fetching the model `{}` failed (see above)", args.model);
        }
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let model_id = if args.model == "smollm2" {
        "smollm2".to_string()
    } else {
        Path::new(&model_path)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("model")
            .to_string()
    };

    // 3. Workers.
    let mut children = Children(Vec::new());
    let mut pools_toml = String::new();
    let mut pools_json = Vec::new();
    let mut worker_http = Vec::new();
    for p in &POOLS {
        let grpc = free_port()?;
        let http = free_port()?;
        let log = std::fs::File::create(dir.join("logs").join(format!("worker-{}.log", p.id)))?;
        let child = Command::new(&worker_bin)
            .args([
                "serve",
                "--model",
                &model_path,
                "--served-model-name",
                &model_id,
            ])
            .args(["--pool", p.id, "--country", p.country])
            .args([
                "--http-addr",
                &http.to_string(),
                "--grpc-addr",
                &grpc.to_string(),
            ])
            .args(["--threads", &args.worker_threads.to_string()])
            .args(["--kv-cache-mb", &args.kv_cache_mb.to_string()])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start worker {}", worker_bin.display()))?;
        let pid = child.id();
        children.0.push((format!("worker {}", p.id), child));
        pools_toml.push_str(&format!(
            "[[pool]]\nid = \"{}\"\ncountry = \"{}\"\ncertifications = {}\nmodels = [\"{model_id}\"]\nworkers = [\"{grpc}\"]\n\n",
            p.id, p.country, p.certifications
        ));
        pools_json.push(serde_json::json!({"id": p.id, "country": p.country, "workers": [grpc.to_string()], "worker_http": format!("http://{http}"), "worker_pids": [pid]}));
        worker_http.push((p.id, http));
        eprintln!(
            "demo: worker {} ({}) starting: gRPC {grpc}, HTTP {http}",
            p.id, p.country
        );
    }
    let pools_path = dir.join("pools.toml");
    std::fs::write(&pools_path, &pools_toml)?;

    // 4. Gateway.
    let port = if args.port == 0 {
        free_port()?.port()
    } else {
        args.port
    };
    let listen: SocketAddr = ([127, 0, 0, 1], port).into();
    let admin = free_port()?;
    let (tls_toml, ca_cert) = if args.tls {
        let (ca, cert, key) = demo_tls(&dir.join("tls"))?;
        (
            format!("\n[tls]\ncert = {cert:?}\nkey = {key:?}\nadmin = false\n"),
            Some(ca),
        )
    } else {
        (String::new(), None)
    };
    let gateway_toml = format!(
        "# Written by `sovctl demo`.\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\npolicies = {:?}\npools = {:?}\npolicy_reload_secs = {}\n{audit_toml}{issuers}{tls_toml}",
        dir.join("policies"),
        pools_path,
        args.policy_reload_secs
    );
    let config_path = dir.join("gateway.toml");
    std::fs::write(&config_path, gateway_toml)?;
    let log = std::fs::File::create(dir.join("logs").join("gateway.log"))?;
    let child = Command::new(&gateway_bin)
        .arg("--config")
        .arg(&config_path)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start the gateway {}", gateway_bin.display()))?;
    let gateway_pid = child.id();
    children.0.push(("gateway".to_string(), child));

    // 5. Ready: every worker healthy, the gateway sees every worker.
    let deadline = Instant::now() + Duration::from_secs(args.ready_timeout);
    for (id, http) in &worker_http {
        wait_until(
            &mut children,
            &dir,
            deadline,
            &format!("worker {id}"),
            || crate::net::http_get(*http, "/health").is_some_and(|(s, _)| s == 200),
        )?;
    }
    wait_until(&mut children, &dir, deadline, "gateway", || {
        crate::net::http_get(admin, "/admin/status").is_some_and(|(s, body)| {
            s == 200
                && serde_json::from_str::<serde_json::Value>(&body).is_ok_and(|v| {
                    v["workers"].as_array().is_some_and(|ws| {
                        ws.len() == POOLS.len() && ws.iter().all(|w| w["available"] == true)
                    })
                })
        })
    })?;
    let policy_hash = crate::net::http_get(admin, "/admin/policy-hash")
        .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok())
        .and_then(|v| v["policy_hash"].as_str().map(str::to_string))
        .unwrap_or_default();

    let scheme = if ca_cert.is_some() { "https" } else { "http" };
    let gateway_url = format!("{scheme}://{listen}/v1");
    let demo = serde_json::json!({
        "gateway_url": gateway_url,
        "ca_cert": ca_cert,
        "admin_url": format!("http://{admin}"),
        "audit_dir": dir.join("audit"),
        "audit_key": dir.join("keys").join("audit.vkey"),
        "audit_hmac_keys": STATES.iter().map(|(cc, _)| (cc.to_string(), dir.join("keys").join(format!("{}.audit-hmac", cc.to_ascii_lowercase())))).collect::<std::collections::BTreeMap<_, _>>(),
        "policy_dir": dir.join("policies"),
        "policy_hash": policy_hash,
        "config": config_path,
        "gateway_pid": gateway_pid,
        "logs_dir": dir.join("logs"),
        "model": model_id,
        "pools": pools_json,
        "ministries": ministries,
    });
    let tmp = dir.join("demo.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&demo)?)?;
    std::fs::rename(&tmp, &demo_json)?;
    print_instructions(&dir, &gateway_url, &model_id, ca_cert.as_deref());

    // 6. Run until Ctrl-C / SIGTERM or a child dies.
    let stop = wait_for_stop_signal(&mut children)?;
    eprintln!("demo: {stop}; stopping everything");
    drop(children);
    eprintln!("demo: stopped");
    Ok(())
}

fn print_instructions(dir: &Path, url: &str, model: &str, ca: Option<&Path>) {
    let tok = |n: &str| dir.join("tokens").join(n).display().to_string();
    let cacert = ca
        .map(|c| format!(" --cacert {}", c.display()))
        .unwrap_or_default();
    let python_env = ca
        .map(|c| format!("SSL_CERT_FILE={} ", c.display()))
        .unwrap_or_default();
    println!(
        "\nThe federation is up: gateway {url}, pools de-fra-1 and de-ber-1 (DE), fr-par-1 (FR), it-mil-1 (IT)."
    );
    println!(
        "Everything is described in {}.\n",
        dir.join("demo.json").display()
    );
    println!("# A German interior-ministry request with restricted data (stays in DE):");
    println!(
        "curl{cacert} -si {url}/chat/completions -H \"Authorization: Bearer $(cat {})\" \\\n  -H 'x-data-classification: restricted' -H 'content-type: application/json' \\\n  -d '{{\"model\":\"{model}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Wie heißt die Hauptstadt von Deutschland?\"}}],\"max_tokens\":32}}'\n",
        tok("de-bmi.jwt")
    );
    println!("# The French education ministry (clearance public) is refused restricted data:");
    println!(
        "curl{cacert} -si {url}/chat/completions -H \"Authorization: Bearer $(cat {})\" \\\n  -H 'x-data-classification: restricted' -H 'content-type: application/json' \\\n  -d '{{\"model\":\"{model}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Bonjour\"}}]}}'\n",
        tok("fr-menj.jwt")
    );
    println!("# With the official openai package (streaming):");
    println!(
        "{python_env}python3 -c \"import openai; c = openai.OpenAI(base_url='{url}', api_key=open('{}').read().strip()); \\\n[print(x.choices[0].delta.content or '', end='', flush=True) for x in c.chat.completions.create(model='{model}', messages=[{{'role': 'user', 'content': 'Ciao!'}}], max_tokens=32, stream=True) if x.choices]; print()\"\n",
        tok("it-mef.jwt")
    );
    println!("Press Ctrl-C to stop the demo.");
    let _ = std::io::stdout().flush();
}

fn wait_until(
    children: &mut Children,
    dir: &Path,
    deadline: Instant,
    what: &str,
    mut ready: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    loop {
        if ready() {
            eprintln!("demo: {what} ready");
            return Ok(());
        }
        for (name, c) in &mut children.0 {
            if let Ok(Some(status)) = c.try_wait() {
                bail!(
                    "{name} exited ({status}) before the demo was ready; see the logs in {}",
                    dir.join("logs").display()
                );
            }
        }
        if Instant::now() > deadline {
            bail!(
                "{what} was not ready in time; see the logs in {}",
                dir.join("logs").display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Blocks until SIGINT/SIGTERM or until the gateway exits; says which.
fn wait_for_stop_signal(children: &mut Children) -> anyhow::Result<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut reported = std::collections::HashSet::new();
        loop {
            tokio::select! {
                _ = int.recv() => return Ok("Ctrl-C".to_string()),
                _ = term.recv() => return Ok("SIGTERM".to_string()),
                _ = tick.tick() => {
                    for (name, c) in &mut children.0 {
                        if let Ok(Some(status)) = c.try_wait() {
                            // A worker may die (that is what failover is for); the
                            // demo ends only without its gateway.
                            if name == "gateway" {
                                return Ok(format!("{name} exited ({status})"));
                            }
                            if reported.insert(name.clone()) {
                                eprintln!("demo: {name} exited ({status}); the gateway routes around it");
                            }
                        }
                    }
                }
            }
        }
    })
}

/// The audit log's checkpoint/receipt signing key and each state's HMAC key; returns
/// the `[audit]` table for gateway.toml.
fn demo_audit_keys(dir: &Path) -> anyhow::Result<String> {
    let keys = dir.join("keys");
    let (skey, vkey) = crate::audit::generate_signing_key("sovereign-gateway-demo")?;
    write_private(&keys.join("audit.key"), &format!("{skey}\n"))?;
    std::fs::write(keys.join("audit.vkey"), format!("{vkey}\n"))?;
    let mut t = format!(
        "\n[audit]\ndir = {:?}\nreplica = \"demo\"\nsigning_key = {:?}\n",
        dir.join("audit"),
        keys.join("audit.key")
    );
    t.push_str("[audit.hmac_keys]\n");
    for (cc, _) in STATES {
        let path = keys.join(format!("{}.audit-hmac", cc.to_ascii_lowercase()));
        let key: [u8; 32] = rand::random();
        write_private(&path, &format!("{}\n", crate::hexstr(key)))?;
        t.push_str(&format!("{cc} = {path:?}\n"));
    }
    Ok(t)
}

/// A demo CA and a server certificate for 127.0.0.1 / localhost signed by it; returns
/// (CA certificate, server certificate chain, server key) paths.
fn demo_tls(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    std::fs::create_dir_all(dir)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Sovereign gateway demo CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let key = KeyPair::generate()?;
    let mut params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
    params
        .distinguished_name
        .push(DnType::CommonName, "sovereign-gateway demo");
    let cert = params.signed_by(&key, &ca)?;
    let (ca_path, cert_path, key_path) = (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    );
    std::fs::write(&ca_path, ca.pem())?;
    std::fs::write(&cert_path, format!("{}{}", cert.pem(), ca.pem()))?;
    write_private(&key_path, &key.serialize_pem())?;
    Ok((ca_path, cert_path, key_path))
}

fn free_port() -> anyhow::Result<SocketAddr> {
    crate::net::free_loopback_addr().context("no free loopback port")
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(p).with_context(|| format!("cannot create {}", p.display()))?;
    p.canonicalize()
        .with_context(|| format!("cannot resolve {}", p.display()))
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}
