//! `stepmesh gateway`: step-up in front of the Kubernetes API server.
//! kubectl talks to the gateway; it authenticates the person (OIDC, the
//! step-up providers of the policy), classifies the request the way the API
//! server does ([`classify`]), demands a fresh step-up where the policy's
//! `kubernetes:` rules say so ([`decide`]), and forwards with impersonation
//! ([`upstream`]) so the API server's RBAC and audit log still decide and
//! record. docs/GATEWAY.md.

pub mod answer;
pub mod classify;
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
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::drain::{self, DrainWatch};
use crate::exit::{self, ConfigResult as _};
use crate::http::h2_deadline::HeaderDeadline;
use crate::net::linger::Lingering;
use crate::policy::PolicyWatch;
use crate::stepup::{StepUp, StepUpMetrics};
use crate::tls::serving::{server_config, ReloadingCert};
use crate::units::parse_duration;

/// Deadline for a client's TLS handshake and request headers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
}

/// Runs a `stepmesh gateway` subcommand.
pub async fn run(cmd: GatewayCommand) -> anyhow::Result<()> {
    match cmd {
        GatewayCommand::Serve(args) => serve(args).await,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut signals = drain::Signals::new().context("listening for SIGTERM/SIGINT")?;
    crate::net::fdlimit::raise();
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

    let accept = accept_loop(listener, acceptor, gateway, watch);
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

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    gateway: Arc<server::Gateway>,
    mut watch: DrainWatch,
) {
    loop {
        let accepted = tokio::select! {
            () = watch.signaled() => return,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(c) => c,
            Err(err) => {
                // EMFILE and friends: back off rather than spin.
                tracing::warn!(%err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, gateway, conn_watch) = (acceptor.clone(), gateway.clone(), watch.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(err)) => return tracing::debug!(%peer, %err, "TLS handshake failed"),
                Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
            };
            serve_connection(tls, gateway, conn_watch).await;
        });
    }
}

async fn serve_connection(
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    gateway: Arc<server::Gateway>,
    mut watch: DrainWatch,
) {
    let timeouts = gateway.metrics.h2_header_timeouts();
    let service = hyper::service::service_fn(move |req| {
        let gateway = gateway.clone();
        async move { Ok::<_, std::convert::Infallible>(gateway.handle(req).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT);
    // hyper's HTTP/2 server has no header deadline: the sidecar's, below it.
    // Lingering: a drain ends connections on our side (`net::linger`).
    let tls = HeaderDeadline::new(Lingering::new(tls), HANDSHAKE_TIMEOUT, timeouts, "gateway");
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = watch.signaled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(err) = result {
        tracing::debug!(%err, "gateway connection ended with an error");
    }
}
