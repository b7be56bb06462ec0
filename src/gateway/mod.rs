//! `stepmesh gateway`: step-up in front of the Kubernetes API server.
//! kubectl talks to the gateway; it authenticates the person (OIDC, the
//! step-up providers of the policy), classifies the request the way the API
//! server does ([`classify`]), demands a fresh step-up where the policy's
//! `kubernetes:` rules say so ([`decide`]), and forwards with impersonation
//! ([`upstream`]) so the API server's RBAC and audit log still decide and
//! record. docs/GATEWAY.md.

pub mod answer;
pub mod classify;
mod conn;
pub mod decide;
pub mod explain;
pub mod server;
pub mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::drain;
use crate::exit::{self, ConfigResult as _};
use crate::policy::PolicyWatch;
use crate::stepup::{StepUp, StepUpMetrics};
use crate::tls::serving::{server_config, ReloadingCert};
use crate::units::parse_duration;

/// `stepmesh gateway` subcommands.
#[derive(Debug, Subcommand)]
pub enum GatewayCommand {
    /// Serve the step-up gateway kubectl talks to instead of the API server.
    Serve(ServeArgs),
}

/// Flags of `stepmesh gateway serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address kubectl connects to (HTTPS).
    #[arg(long, default_value = "0.0.0.0:8443", env = "STEPMESH_GATEWAY_LISTEN")]
    pub listen: SocketAddr,
    /// Serving certificate chain (PEM; reloaded when it changes).
    #[arg(long, env = "STEPMESH_GATEWAY_CERT")]
    pub cert: PathBuf,
    /// Serving private key (PEM; reloaded when it changes).
    #[arg(long, env = "STEPMESH_GATEWAY_KEY")]
    pub key: PathBuf,
    /// The API server, `https://HOST[:PORT]`.
    #[arg(
        long,
        default_value = "https://kubernetes.default.svc",
        env = "STEPMESH_GATEWAY_UPSTREAM"
    )]
    pub upstream: String,
    /// CA bundle the API server's certificate must chain to.
    #[arg(long, default_value = stepmesh_ca::https::IN_CLUSTER_CA, env = "STEPMESH_GATEWAY_UPSTREAM_CA")]
    pub upstream_ca: PathBuf,
    /// The gateway's own ServiceAccount token (re-read as the kubelet rotates it).
    #[arg(long, default_value = stepmesh_ca::https::IN_CLUSTER_TOKEN, env = "STEPMESH_GATEWAY_TOKEN_FILE")]
    pub token_file: PathBuf,
    /// Policy with a `kubernetes:` section (hot-reloaded).
    #[arg(long, env = "STEPMESH_GATEWAY_POLICY")]
    pub policy: PathBuf,
    /// Admin server: /healthz, /ready, /metrics.
    #[arg(long, default_value = "0.0.0.0:15021", env = "STEPMESH_GATEWAY_ADMIN")]
    pub admin: SocketAddr,
    /// How often the certificate and token files are checked.
    #[arg(long, default_value = "2s", value_name = "DURATION", value_parser = parse_duration)]
    pub reload_interval: Duration,
    /// After SIGTERM, how long requests in flight (watches, exec) may go on.
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Write no audit lines on stdout.
    #[arg(long)]
    pub no_audit_log: bool,
    /// A client connection with no request in flight this long is closed,
    /// as the API server closes its own (its first request must come
    /// within 10 s of the handshake, or this if shorter).
    #[arg(long, default_value = "90s", value_name = "DURATION", value_parser = crate::units::parse_idle, env = "STEPMESH_GATEWAY_IDLE_TIMEOUT")]
    pub idle_timeout: Duration,
    /// Client connections open at once; more are closed at accept. Default
    /// 16384, lowered at start if the descriptor limit (its soft limit
    /// first raised to the hard one) cannot carry two per connection.
    #[arg(long, env = "STEPMESH_GATEWAY_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Client connections one source address may hold open at once (0: no
    /// cap); more are closed at accept. Raise it (or 0) where a load
    /// balancer in front puts every client behind a few addresses.
    #[arg(
        long,
        default_value_t = 256,
        env = "STEPMESH_GATEWAY_MAX_CONNECTIONS_PER_SOURCE"
    )]
    pub max_connections_per_source: usize,
}

/// Runs a `stepmesh gateway` subcommand.
pub async fn run(cmd: GatewayCommand) -> anyhow::Result<()> {
    match cmd {
        GatewayCommand::Serve(args) => serve(args).await,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut signals = drain::Signals::new().context("listening for SIGTERM/SIGINT")?;
    let fds = crate::net::fdlimit::raise();
    let mut registry = Registry::default();
    let policy = PolicyWatch::start(&args.policy, &mut registry).config_err()?;
    if policy.current().kubernetes().is_none() {
        return Err(exit::config(anyhow::anyhow!(
            "policy {}: no `kubernetes:` section; the gateway has nothing to enforce",
            args.policy.display()
        )));
    }
    let cert = ReloadingCert::load(&args.cert, &args.key).config_err()?;
    let acceptor = TlsAcceptor::from(Arc::new(server_config(cert.clone())?));
    let upstream = upstream::Upstream::new(
        &args.upstream,
        &args.upstream_ca,
        &args.token_file,
        args.reload_interval,
    )
    .config_err()?;
    let audit = if args.no_audit_log {
        crate::accesslog::AccessLog::disabled()
    } else {
        crate::accesslog::AccessLog::stdout(&mut registry).context("starting the audit log")?
    };
    let stepup = StepUp::new(StepUpMetrics::register(&mut registry));
    stepup.sync(&policy.current()).await;
    let metrics = server::GatewayMetrics::new(&mut registry);
    let limits = Arc::new(conn::Limits::new(
        crate::net::fdlimit::connection_limit(args.max_connections, fds),
        args.max_connections_per_source,
        args.idle_timeout,
        &mut registry,
    ));
    let gateway = Arc::new(server::Gateway {
        policy: policy.clone(),
        stepup,
        upstream,
        pending: answer::PendingStepUps::default(),
        audit: audit.clone(),
        metrics,
    });

    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let admin_listener = TcpListener::bind(args.admin)
        .await
        .with_context(|| format!("binding the admin address {}", args.admin))?;
    let addr = listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let ready_policy = policy.clone();
    let ready: stepmesh_ca::admin::ReadyCheck = Arc::new(move || {
        ready_policy
            .current()
            .kubernetes()
            .is_none()
            .then(|| "the policy has no kubernetes section".to_owned())
    });
    let admin = stepmesh_ca::admin::Admin::new(Arc::new(registry), ready);
    let (trigger, watch) = drain::channel();
    let mut admin_stop = watch.clone();
    tokio::spawn(admin.serve(admin_listener, async move { admin_stop.signaled().await }));
    tokio::spawn(cert.watch(args.reload_interval));
    tracing::info!(%addr, admin = %admin_addr, upstream = %args.upstream, "gateway listening");
    // Tests and scripts read the bound ports from this line.
    println!("listening on {addr} admin {admin_addr}");

    let accept = conn::accept_loop(listener, acceptor, gateway, limits, watch);
    let signal = signals.recv();
    tokio::pin!(accept);
    tokio::select! {
        () = &mut accept => {}
        name = signal => tracing::info!(signal = name, "draining"),
    }
    if !trigger.drain(args.drain_timeout).await {
        tracing::warn!("drain timed out; closing the remaining connections");
    }
    audit.flush(Duration::from_secs(2));
    Ok(())
}
