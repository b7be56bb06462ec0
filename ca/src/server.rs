//! Runs the CA: loads or makes the signing material, builds the verifiers,
//! serves gRPC over TLS 1.3 and the admin port, and keeps the trust bundle
//! (and `bundle.pem`) current. Used by `stepmesh ca serve`, by `stepmesh
//! demo` (embedded) and by tests, all through [`start`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::admin::{Admin, Readiness};
use crate::authn::join_token::JoinTokens;
use crate::authn::k8s_jwks::{JwksSource, K8sJwks};
use crate::authn::k8s_tokenreview::TokenReview;
use crate::authn::Authenticator;
use crate::conn;
use crate::https::{HttpsClient, IN_CLUSTER_CA, IN_CLUSTER_TOKEN};
use crate::metrics::CaMetrics;
use crate::proto::v1::certificate_authority_server::CertificateAuthorityServer;
use crate::ratelimit::{RateLimit, RateLimiter};
use crate::revocation::Revocations;
use crate::service::{BundleState, CaService};
use crate::signer::Signer;
use crate::spiffe_id::TrustDomain;
use crate::store::{self, Mode};
use crate::svid::TrustBundle;
use crate::tls::{self, ServingCert};

/// How long shutdown waits for open calls before closing connections.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Largest gRPC request accepted (a CSR is about 1 KiB): tonic buffers a
/// message of its declared size before any check runs.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 16 * 1024;

/// Calls (HTTP/2 streams) one connection may have open: a sidecar makes
/// one or two at a time and watches revocations on one more. With the
/// windows below, what one connection can make the CA buffer is bounded:
/// 16 KiB per stream, 32 KiB of the connection's unread.
pub const MAX_CALLS_PER_CONNECTION: u32 = 16;

/// Everything `ca serve` takes.
#[derive(Debug, Clone)]
pub struct CaConfig {
    /// gRPC (TLS) listen address; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Admin listen address (`/healthz`, `/ready`, `/metrics`).
    pub admin: SocketAddr,
    /// Trust domain of every issued ID.
    pub trust_domain: TrustDomain,
    /// Holds the root (root mode) and `bundle.pem`.
    pub state_dir: PathBuf,
    /// Root made here, or an outside intermediate.
    pub mode: Mode,
    /// JWKS file path or `https://` URL of the service-account issuer.
    pub k8s_jwks: Option<String>,
    /// Expected `iss` of service-account tokens (required with `k8s_jwks`).
    pub k8s_issuer: Option<String>,
    /// CA file for a JWKS URL (default: the in-cluster CA).
    pub k8s_jwks_ca: Option<PathBuf>,
    /// Bearer token file for a JWKS URL, if the endpoint needs one.
    pub k8s_jwks_token_file: Option<PathBuf>,
    /// API server base URL for TokenReview.
    pub k8s_tokenreview: Option<String>,
    /// The CA's own token for TokenReview (default: the in-cluster token).
    pub k8s_tokenreview_token_file: Option<PathBuf>,
    /// CA file of the API server (default: the in-cluster CA).
    pub k8s_tokenreview_ca: Option<PathBuf>,
    /// Join-token file.
    pub join_tokens: Option<PathBuf>,
    /// Audience tokens must carry.
    pub audience: String,
    /// Lifetime of an SVID when the request asks none.
    pub default_ttl: Duration,
    /// Longest lifetime granted.
    pub max_ttl: Duration,
    /// Extra DNS names of the CA's serving certificate.
    pub dns_names: Vec<String>,
    /// Per-identity signing rate limit.
    pub rate_limit: RateLimit,
    /// Per-source-address rate limit on Sign and SignJwtSvid, before
    /// authentication.
    pub source_rate_limit: RateLimit,
    /// Calls one source address may have in flight (0: no limit).
    pub calls_per_source: usize,
    /// How often bundle sources and the join-token file are re-read.
    pub poll_interval: Duration,
    /// Largest gRPC request accepted.
    pub max_request_bytes: usize,
    /// The admin bearer token (revoke, unrevoke, list); `None`: admin
    /// calls refused.
    pub admin_token_file: Option<PathBuf>,
    /// `--shared-state`: revocations and rotations kept in a ConfigMap the
    /// replicas share; `None`: in the state dir (one replica).
    pub shared_state: Option<SharedStateConfig>,
}

/// Where the replicas' shared state is and how to reach it.
#[derive(Debug, Clone)]
pub struct SharedStateConfig {
    /// The ConfigMap.
    pub object: crate::shared_state::ObjectRef,
    /// The API server URL.
    pub server: String,
    /// The API server's CA file.
    pub ca_file: PathBuf,
    /// The bearer token file (re-read on every call).
    pub token_file: PathBuf,
}

/// The per-source limit's default: a node of 110 pods starting at once
/// (their addresses masqueraded to the node's) fits the burst, and their
/// renewals (each SVID renewed at half its life) are a small fraction of
/// the rate; a client sending forged tokens gets 20 verifications a
/// second, not as many as it can send.
pub const SOURCE_RATE_LIMIT: RateLimit = RateLimit {
    per_second: 20.0,
    burst: 256,
};

impl CaConfig {
    /// Defaults for an embedded or test CA: loopback, free ports, root mode,
    /// no verifier yet.
    pub fn new(trust_domain: TrustDomain, state_dir: PathBuf) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            trust_domain,
            state_dir,
            mode: Mode::Root,
            k8s_jwks: None,
            k8s_issuer: None,
            k8s_jwks_ca: None,
            k8s_jwks_token_file: None,
            k8s_tokenreview: None,
            k8s_tokenreview_token_file: None,
            k8s_tokenreview_ca: None,
            join_tokens: None,
            audience: "stepmesh-ca".to_owned(),
            default_ttl: Duration::from_secs(24 * 3600),
            max_ttl: Duration::from_secs(24 * 3600),
            dns_names: Vec::new(),
            rate_limit: RateLimit {
                per_second: 1.0,
                burst: 20,
            },
            source_rate_limit: SOURCE_RATE_LIMIT,
            calls_per_source: crate::calls::MAX_CALLS_PER_SOURCE,
            poll_interval: Duration::from_secs(5),
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            admin_token_file: None,
            shared_state: None,
        }
    }
}

/// Why the CA could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad or missing signing material.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// A bad configuration value.
    #[error("{0}")]
    Config(String),
    /// A listen address could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// `--shared-state` could not be read (or created): refusing to serve
    /// without the revocations the other replicas enforce.
    #[error("{0}")]
    Shared(String),
    /// The serving certificate could not be made.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// A running CA.
pub struct RunningCa {
    /// Where gRPC listens.
    pub grpc_addr: SocketAddr,
    /// Where the admin server listens.
    pub admin_addr: SocketAddr,
    bundle: watch::Receiver<Arc<BundleState>>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl RunningCa {
    /// The trust bundle served now (PEM), what clients trust.
    pub fn bundle_pem(&self) -> String {
        self.bundle.borrow().pem.clone()
    }

    /// Stops serving and waits for the tasks to end.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }

    /// Runs until the CA's tasks end (they end only on shutdown).
    pub async fn wait(mut self) {
        let _ = (&mut self.task).await;
    }
}

/// Starts the CA and returns once both ports are bound and it is serving.
pub async fn start(config: CaConfig) -> Result<RunningCa, StartError> {
    let config = Arc::new(config);
    let cfg = config.clone();
    let authority = tokio::task::spawn_blocking(move || {
        store::load(&cfg.state_dir, &cfg.trust_domain, &cfg.mode)
    })
    .await
    .map_err(|e| StartError::Config(format!("loading the CA: {e}")))??;
    let cfg = config.clone();
    let jwt = tokio::task::spawn_blocking(move || {
        crate::jwtsvid::JwtSigner::load_or_create(&cfg.state_dir)
    })
    .await
    .map_err(|e| StartError::Config(format!("loading the JWT-SVID key: {e}")))?
    .map_err(|e| StartError::Config(e.to_string()))?;
    let own_root = authority.cert.clone();
    let roots = read_roots_blocking(&config, &own_root).await?;
    let bundle = TrustBundle::new(config.trust_domain.clone(), roots)
        .map_err(|e| StartError::Config(format!("trust bundle: {e}")))?;
    write_bundle_blocking(&config, bundle.to_pem()).await?;
    if config.max_ttl.is_zero() {
        return Err(StartError::Config("--max-ttl must be positive".into()));
    }

    let mut registry = Registry::default();
    let metrics = CaMetrics::new(&mut registry);
    metrics.issuer_expiry.set(unix(authority.not_after));
    let signer = Arc::new(Signer::new(authority, config.default_ttl, config.max_ttl));

    let live_bundle = Arc::new(ArcSwap::from_pointee(bundle.clone()));
    let (bundle_tx, bundle_rx) = watch::channel(Arc::new(BundleState {
        pem: bundle.to_pem(),
        sequence: 1,
    }));
    metrics.bundle_sequence.set(1);
    let authn = Arc::new(build_authenticator(&config, live_bundle.clone()).await?);
    if !authn.has_token_verifier() {
        tracing::warn!("no token verifier configured: only renewals by a valid SVID can be signed");
    }

    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let names = tls::serving_names(&config.dns_names);
    let serving = Arc::new(ServingCert::new(&signer, names.clone(), provider.clone())?);
    let tls_config = Arc::new(tls::server_config(serving.clone(), provider)?);

    let grpc = TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
    let admin = TcpListener::bind(config.admin)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.admin,
            source,
        })?;
    let grpc_addr = grpc.local_addr().map_err(|source| StartError::Bind {
        addr: config.listen,
        source,
    })?;
    let admin_addr = admin.local_addr().map_err(|source| StartError::Bind {
        addr: config.admin,
        source,
    })?;

    let dir = config.state_dir.clone();
    let mut revocations = tokio::task::spawn_blocking(move || Revocations::load(&dir))
        .await
        .map_err(|e| StartError::Config(format!("loading revocations: {e}")))??;
    if let Some(shared) = &config.shared_state {
        let api = crate::kube::Api::new(
            shared.server.clone(),
            &shared.ca_file,
            shared.token_file.clone(),
        )
        .map_err(|e| StartError::Config(format!("--shared-state-ca-file: {e}")))?;
        let state =
            crate::shared_state::SharedState::new(api, shared.object.clone(), metrics.clone());
        revocations
            .share(state)
            .await
            .map_err(|e| StartError::Shared(e.to_string()))?;
    }
    let revocations = Arc::new(revocations);
    if let Some(path) = &config.admin_token_file {
        check_admin_token(path).await?;
    }
    let service = CaService::new(
        config.trust_domain.clone(),
        crate::service::Signers {
            x509: signer.clone(),
            jwt: Arc::new(jwt),
        },
        authn.clone(),
        crate::service::Limits {
            identity: RateLimiter::new(config.rate_limit),
            jwt: RateLimiter::new(config.rate_limit),
            source: RateLimiter::new(config.source_rate_limit),
        },
        metrics.clone(),
        bundle_rx.clone(),
        crate::service::AdminState {
            revocations: revocations.clone(),
            admin_token: config.admin_token_file.clone(),
        },
    );
    let (health, health_svc) = tonic_health::server::health_reporter();
    health
        .set_serving::<CertificateAuthorityServer<CaService>>()
        .await;
    let ready = Readiness::default();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (stop_all, _) = tokio::sync::broadcast::channel::<()>(1);

    let mut tasks = Vec::new();
    let incoming = conn::incoming(
        grpc,
        tokio_rustls::TlsAcceptor::from(tls_config),
        stop_all.subscribe(),
    );
    let mut stop = stop_all.subscribe();
    let router = tonic::transport::Server::builder()
        .timeout(Duration::from_secs(30))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .max_concurrent_streams(MAX_CALLS_PER_CONNECTION)
        .concurrency_limit_per_connection(MAX_CALLS_PER_CONNECTION as usize)
        .initial_stream_window_size(16 * 1024)
        .initial_connection_window_size(32 * 1024)
        .layer(crate::calls::CallsPerSource::new(config.calls_per_source))
        .add_service(health_svc)
        .add_service(
            CertificateAuthorityServer::new(service)
                .max_decoding_message_size(config.max_request_bytes),
        );
    tasks.push(tokio::spawn(async move {
        let signal = async move {
            let _ = stop.recv().await;
        };
        if let Err(e) = router.serve_with_incoming_shutdown(incoming, signal).await {
            tracing::error!(error = %e, "CA gRPC server failed");
        }
    }));
    let mut stop = stop_all.subscribe();
    let admin_server = Admin::new(Arc::new(registry), ready.check());
    tasks.push(tokio::spawn(admin_server.serve(admin, async move {
        let _ = stop.recv().await;
    })));
    tasks.push(tokio::spawn(crate::tasks::poll_sources(
        config.clone(),
        own_root,
        authn.clone(),
        live_bundle,
        bundle_tx,
        metrics.clone(),
        stop_all.subscribe(),
    )));
    if config.shared_state.is_some() {
        tasks.push(tokio::spawn(crate::tasks::follow_shared_state(
            revocations.clone(),
            metrics.clone(),
            stop_all.subscribe(),
        )));
    }
    tasks.push(tokio::spawn(crate::tasks::prune_revocations(
        revocations,
        stop_all.subscribe(),
    )));
    tasks.push(tokio::spawn(crate::tasks::refresh_serving_cert(
        serving,
        signer,
        stop_all.subscribe(),
    )));

    let task = tokio::spawn(async move {
        let _ = stop_rx.await;
        // Stopping the poller drops the bundle sender, which ends every
        // WatchTrustBundle stream, so the graceful drain can finish.
        let _ = stop_all.send(());
        let aborts: Vec<_> = tasks.iter().map(|t| t.abort_handle()).collect();
        let drain = futures_util::future::join_all(tasks);
        if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
            tracing::warn!("connections still open after {SHUTDOWN_GRACE:?}; closing them");
            aborts.iter().for_each(tokio::task::AbortHandle::abort);
        }
    });
    ready.set(true);
    tracing::info!(
        grpc = %grpc_addr,
        admin = %admin_addr,
        trust_domain = %config.trust_domain,
        state_dir = %config.state_dir.display(),
        dns_names = ?names,
        mode = match config.mode {
            Mode::Root => "root",
            Mode::Intermediate { .. } => "intermediate",
        },
        verifiers = ?verifiers(&config),
        shared_state = %config.shared_state.as_ref().map(|s| s.object.to_string()).unwrap_or_default(),
        audience = %config.audience,
        default_ttl = ?config.default_ttl,
        max_ttl = ?config.max_ttl,
        "CA serving"
    );
    Ok(RunningCa {
        grpc_addr,
        admin_addr,
        bundle: bundle_rx,
        shutdown: Some(stop_tx),
        task,
    })
}

/// The shortest admin token accepted: a guessable one would hand out the
/// power to lock any workload out.
const MIN_ADMIN_TOKEN: usize = 32;

/// `--admin-token-file` must be readable, private and long enough.
async fn check_admin_token(path: &std::path::Path) -> Result<(), StartError> {
    let bad =
        |why: String| StartError::Config(format!("--admin-token-file {}: {why}", path.display()));
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| bad(e.to_string()))?;
    if text.trim().len() < MIN_ADMIN_TOKEN {
        return Err(bad(format!(
            "the token must be at least {MIN_ADMIN_TOKEN} characters"
        )));
    }
    let mode = tokio::fs::metadata(path)
        .await
        .map_err(|e| bad(e.to_string()))?;
    use std::os::unix::fs::PermissionsExt;
    if mode.permissions().mode() & 0o007 != 0 {
        return Err(bad("readable by others: chmod 0600 (or 0640)".into()));
    }
    Ok(())
}

fn unix(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The configured credential verifiers, for the start-up line.
fn verifiers(config: &CaConfig) -> Vec<&'static str> {
    let mut v = vec!["svid"];
    if config.join_tokens.is_some() {
        v.push("join-token");
    }
    if config.k8s_jwks.is_some() {
        v.push("k8s-jwks");
    }
    if config.k8s_tokenreview.is_some() {
        v.push("k8s-tokenreview");
    }
    v
}

pub(crate) async fn read_roots_blocking(
    config: &Arc<CaConfig>,
    own: &rustls_pki_types::CertificateDer<'static>,
) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, StartError> {
    let (cfg, own) = (config.clone(), own.clone());
    tokio::task::spawn_blocking(move || store::read_roots(&cfg.state_dir, &cfg.mode, &own))
        .await
        .map_err(|e| StartError::Config(format!("reading roots: {e}")))?
        .map_err(StartError::from)
}

pub(crate) async fn write_bundle_blocking(
    config: &Arc<CaConfig>,
    pem: String,
) -> Result<(), StartError> {
    let cfg = config.clone();
    tokio::task::spawn_blocking(move || store::write_bundle(&cfg.state_dir, &pem))
        .await
        .map_err(|e| StartError::Config(format!("writing bundle.pem: {e}")))?
        .map_err(StartError::from)
}

async fn build_authenticator(
    config: &CaConfig,
    bundle: Arc<ArcSwap<TrustBundle>>,
) -> Result<Authenticator, StartError> {
    let td = &config.trust_domain;
    let join = match &config.join_tokens {
        Some(path) => {
            let (path, td) = (path.clone(), td.clone());
            let tokens = tokio::task::spawn_blocking(move || JoinTokens::load(&path, &td))
                .await
                .map_err(|e| StartError::Config(e.to_string()))?
                .map_err(|e| StartError::Config(format!("--join-tokens: {e}")))?;
            tracing::info!(tokens = tokens.len(), "join-token verifier loaded");
            Some(tokens)
        }
        None => None,
    };
    let jwks = match &config.k8s_jwks {
        Some(source) => {
            let issuer = config
                .k8s_issuer
                .clone()
                .ok_or_else(|| StartError::Config("--k8s-jwks needs --k8s-issuer".into()))?;
            let source = if source.starts_with("https://") || source.starts_with("http://") {
                let ca = config
                    .k8s_jwks_ca
                    .clone()
                    .unwrap_or_else(|| IN_CLUSTER_CA.into());
                JwksSource::Url {
                    url: source.clone(),
                    client: Box::new(
                        HttpsClient::new(&ca)
                            .map_err(|e| StartError::Config(format!("--k8s-jwks-ca: {e}")))?,
                    ),
                    token_file: config.k8s_jwks_token_file.clone(),
                }
            } else {
                JwksSource::File(source.into())
            };
            let verifier = K8sJwks::new(source, issuer, config.audience.clone(), td.clone())
                .await
                .map_err(|e| StartError::Config(format!("--k8s-jwks: {e}")))?;
            Some(verifier)
        }
        None => None,
    };
    let review = match &config.k8s_tokenreview {
        Some(url) => {
            let ca = config
                .k8s_tokenreview_ca
                .clone()
                .unwrap_or_else(|| IN_CLUSTER_CA.into());
            let client = HttpsClient::new(&ca)
                .map_err(|e| StartError::Config(format!("--k8s-tokenreview-ca: {e}")))?;
            let token_file = config
                .k8s_tokenreview_token_file
                .clone()
                .unwrap_or_else(|| IN_CLUSTER_TOKEN.into());
            Some(TokenReview::new(
                url,
                client,
                token_file,
                config.audience.clone(),
                td.clone(),
            ))
        }
        None => None,
    };
    Ok(Authenticator::new(join, jwks, review, bundle))
}
