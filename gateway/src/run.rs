//! Process wiring of the `gateway` binary: load the config, admit the policy set, build
//! the authenticator and router, start the background tasks (worker load watchers, JWKS
//! refresh, policy hot reload on change and SIGHUP) and run the pingora server with the
//! OpenAI listener and the admin listener until SIGTERM (graceful) or SIGINT.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use pingora::apps::HttpServerOptions;
use pingora::apps::http_app::HttpServer;
use pingora::listeners::{L4BufferSettings, ListenerConfig, TcpSocketOptions};
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server};
use pingora::services::listening::Service;

use crate::admin::Admin;
use crate::audit::AuditLog;
use crate::auth::Authenticator;
use crate::config::{GatewayConfig, TlsConfig};
use crate::policy::{PolicyStore, spawn_watcher};
use crate::pools::PoolsConfig;
use crate::route::Router;
use crate::server::Gateway;

pub fn run(cfg: GatewayConfig) -> anyhow::Result<()> {
    probe_listeners(&cfg)?;
    let bg = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("gateway-bg")
        .enable_all()
        .build()
        .context("cannot start the background runtime")?;
    let _enter = bg.enter();

    let pools = Arc::new(PoolsConfig::load(&cfg.pools)?);
    let policy = Arc::new(
        PolicyStore::new(cfg.policies.clone(), pools.clone())
            .with_context(|| format!("policy set {} refused", cfg.policies.display()))?,
    );
    tracing::info!(policy_hash = %policy.hash(), dir = %cfg.policies.display(), "policy set admitted");
    let auth = Arc::new(Authenticator::new(cfg.member_states.clone())?);
    let router = Arc::new(Router::new(&pools, cfg.routing.clone()));
    let audit = AuditLog::open(cfg.audit.clone())
        .with_context(|| format!("audit log {} cannot be opened", cfg.audit.dir.display()))?;
    tracing::info!(dir = %cfg.audit.dir.display(), replica = %audit.replica(), key = %audit.public_key(), "audit log open");

    router.spawn_watchers();
    let _refresh = auth.spawn_refresh();
    if cfg.policy_reload_secs > 0 {
        spawn_watcher(policy.clone(), Duration::from_secs(cfg.policy_reload_secs));
    }
    spawn_sighup_reload(policy.clone())?;

    let mut options = HttpServerOptions::default();
    options.h2c = cfg.tls.is_none();
    let gateway = Gateway {
        auth: auth.clone(),
        audit: audit.clone(),
        policy: policy.clone(),
        pools: pools.clone(),
        router: router.clone(),
        max_body_bytes: cfg.max_body_bytes,
        options,
    };

    let threads = cfg.threads.unwrap_or(2).max(1);
    let conf = ServerConf {
        threads,
        // One single-threaded runtime per thread: a connection's requests, and the
        // worker connection that carries them (grpc_h2), stay on one thread.
        work_stealing: false,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(cfg.shutdown_grace_secs),
        ..ServerConf::default()
    };
    probe_listeners(&cfg)?;
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    // One listening service per front-end thread, each a single-threaded runtime with
    // its own SO_REUSEPORT socket on the same address; the kernel spreads connections
    // over them. Why not one service with `threads` runtimes: pingora accepts on one
    // runtime and hands each connection to a random one, while the socket stays
    // registered with the accepting runtime's reactor, so every readiness event of
    // half the connections woke the other thread (an eventfd write and a thread
    // wake-up per request; docs/benchmarks.md).
    for _ in 0..threads {
        let mut api = Service::new("openai-api".to_string(), gateway.clone());
        api.threads = Some(1);
        add_listener(&mut api, cfg.tls.as_ref(), &cfg.listen.to_string(), true)?;
        server.add_service(api);
    }

    if let Some(admin_addr) = cfg.admin_listen {
        let admin = Admin::new(policy, router, auth.clone(), &audit)
            .context("the admin listener cannot read the audit log's key")?;
        let admin = HttpServer::new_app(admin);
        let mut svc = Service::new("admin".to_string(), admin);
        let tls = cfg.tls.as_ref().filter(|t| t.admin);
        if tls.is_none() {
            let mut o = HttpServerOptions::default();
            o.h2c = true;
            if let Some(app) = svc.app_logic_mut() {
                app.server_options = Some(o);
            }
        }
        svc.threads = Some(1);
        add_listener(&mut svc, tls, &admin_addr.to_string(), false)?;
        server.add_service(svc);
    }
    tracing::info!(listen = %cfg.listen, admin = ?cfg.admin_listen, tls = cfg.tls.is_some(), "gateway starting");
    server.run(RunArgs::default());
    // A final checkpoint covers every record written.
    bg.block_on(audit.shutdown());
    tracing::info!("gateway stopped");
    Ok(())
}

/// pingora binds in its service tasks and panics there on failure, leaving a process
/// that runs on without that listener (never ready); probing first (at start, and again
/// just before the server binds) makes a taken port a clear exit.
fn probe_listeners(cfg: &GatewayConfig) -> anyhow::Result<()> {
    for addr in std::iter::once(cfg.listen).chain(cfg.admin_listen) {
        std::net::TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
    }
    Ok(())
}

/// Per-connection write buffer of the listeners (bytes).
const RESPONSE_WRITE_BUFFER: usize = 4096;

/// `reuse_port`: SO_REUSEPORT, for the front-end threads' listeners on one address. The
/// probe in [`probe_listeners`] (a bind without it) has made sure that no other socket
/// holds the address.
fn add_listener<A>(
    svc: &mut Service<A>,
    tls: Option<&TlsConfig>,
    addr: &str,
    reuse_port: bool,
) -> anyhow::Result<()> {
    // A response's head and a short body leave in one send: pingora's default write
    // buffer (1460 bytes) splits any response over that in two, and a batched receipt
    // header alone can be several hundred bytes (at concurrency 64 that was 2 sendto
    // per request, each paying the loopback's receive path too).
    let buffer = L4BufferSettings::default().write(RESPONSE_WRITE_BUFFER);
    let mut endpoint = ListenerConfig::tcp(addr).l4_buffer(buffer);
    if reuse_port {
        let mut options = TcpSocketOptions::default();
        options.so_reuseport = Some(true);
        endpoint = endpoint.tcp_socket_options(options);
    }
    if let Some(tls) = tls {
        let (cert, key) = (tls.cert.to_string_lossy(), tls.key.to_string_lossy());
        let mut settings = pingora::listeners::tls::TlsSettings::intermediate(&cert, &key)
            .map_err(|e| anyhow::anyhow!("TLS certificate {cert} / key {key}: {e}"))?;
        settings.enable_h2();
        endpoint = endpoint.tls(settings);
    }
    svc.add_listener(endpoint);
    Ok(())
}

fn spawn_sighup_reload(policy: Arc<PolicyStore>) -> anyhow::Result<()> {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot install the SIGHUP handler")?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let p = policy.clone();
            let result = tokio::task::spawn_blocking(move || p.reload())
                .await
                .unwrap_or_else(|e| Err(crate::policy::PolicyError::Internal(e.to_string())));
            match result {
                Ok(hash) => tracing::info!(policy_hash = %hash, "SIGHUP: policy set reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: policy set refused; the last good set stays")
                }
            }
        }
    });
    Ok(())
}
