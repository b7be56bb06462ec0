//! `stepmesh ca ...`: runs the certificate authority of the `stepmesh-ca` crate.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use stepmesh_ca::ratelimit::RateLimit;
use stepmesh_ca::server::{self, CaConfig};
use stepmesh_ca::spiffe_id::TrustDomain;
use stepmesh_ca::store::Mode;

use crate::exit::{self, ConfigResult as _};
use crate::units::parse_duration;

/// `stepmesh ca` subcommands.
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Serve the gRPC certificate authority.
    Serve(Box<CaServeArgs>),
    /// Revoke a serial or a SPIFFE ID at the running CA (admin token).
    Revoke(crate::ca_admin::RevokeArgs),
    /// Remove a revocation at the running CA (admin token).
    Unrevoke(crate::ca_admin::UnrevokeArgs),
    /// List the running CA's revocations (admin token).
    Revocations(crate::ca_admin::AdminArgs),
    /// Make the sidecars of an ID (or all) renew now, keeping connections (admin token).
    Rotate(crate::ca_admin::RotateArgs),
}

/// Flags of `stepmesh ca serve`.
#[derive(Debug, Args)]
pub struct CaServeArgs {
    /// gRPC (TLS) listen address.
    #[arg(long, default_value = "127.0.0.1:15012", env = "STEPMESH_CA_LISTEN")]
    pub listen: SocketAddr,
    /// Admin listen address (/healthz, /ready, /metrics).
    #[arg(long, default_value = "127.0.0.1:15014", env = "STEPMESH_CA_ADMIN")]
    pub admin: SocketAddr,
    /// Trust domain of every issued SPIFFE ID.
    #[arg(long, default_value = "cluster.local", env = "STEPMESH_TRUST_DOMAIN")]
    pub trust_domain: TrustDomain,
    /// Directory holding the root key (0600) and bundle.pem.
    #[arg(long, env = "STEPMESH_CA_STATE_DIR")]
    pub state_dir: PathBuf,
    /// Sign under this intermediate (PEM) instead of a self-made root.
    #[arg(long, requires_all = ["intermediate_key", "root_bundle"], env = "STEPMESH_CA_INTERMEDIATE_CERT")]
    pub intermediate_cert: Option<PathBuf>,
    /// The intermediate's PKCS#8 PEM private key (mode 0600).
    #[arg(
        long,
        requires = "intermediate_cert",
        env = "STEPMESH_CA_INTERMEDIATE_KEY"
    )]
    pub intermediate_key: Option<PathBuf>,
    /// Roots of the outside PKI, served as the trust bundle (re-read on change).
    #[arg(long, requires = "intermediate_cert", env = "STEPMESH_CA_ROOT_BUNDLE")]
    pub root_bundle: Option<PathBuf>,
    /// Service-account issuer keys: a JWKS file or the issuer's /openid/v1/jwks URL.
    #[arg(long, requires = "k8s_issuer", env = "STEPMESH_CA_K8S_JWKS")]
    pub k8s_jwks: Option<String>,
    /// Expected `iss` of service-account tokens.
    #[arg(long, env = "STEPMESH_CA_K8S_ISSUER")]
    pub k8s_issuer: Option<String>,
    /// CA file to verify a JWKS URL (default: the in-cluster CA).
    #[arg(long, env = "STEPMESH_CA_K8S_JWKS_CA")]
    pub k8s_jwks_ca: Option<PathBuf>,
    /// Bearer token file sent when fetching a JWKS URL.
    #[arg(long, env = "STEPMESH_CA_K8S_JWKS_TOKEN_FILE")]
    pub k8s_jwks_token_file: Option<PathBuf>,
    /// API server URL for the TokenReview API.
    #[arg(long, env = "STEPMESH_CA_K8S_TOKENREVIEW")]
    pub k8s_tokenreview: Option<String>,
    /// The CA's own token for TokenReview (default: the in-cluster token).
    #[arg(long, env = "STEPMESH_CA_K8S_TOKENREVIEW_TOKEN_FILE")]
    pub k8s_tokenreview_token_file: Option<PathBuf>,
    /// CA file of the API server (default: the in-cluster CA).
    #[arg(long, env = "STEPMESH_CA_K8S_TOKENREVIEW_CA")]
    pub k8s_tokenreview_ca: Option<PathBuf>,
    /// Join-token file: `<token> <spiffe-id>` lines, `#` comments (re-read on change).
    #[arg(long, env = "STEPMESH_CA_JOIN_TOKENS")]
    pub join_tokens: Option<PathBuf>,
    /// Audience every token must carry.
    #[arg(long, default_value = "stepmesh-ca", env = "STEPMESH_CA_AUDIENCE")]
    pub audience: String,
    /// SVID lifetime when the request asks none (e.g. 24h, 90m).
    #[arg(long, default_value = "24h", value_name = "DURATION", value_parser = parse_duration, env = "STEPMESH_CA_DEFAULT_TTL")]
    pub default_ttl: Duration,
    /// Longest SVID lifetime granted.
    #[arg(long, default_value = "24h", value_name = "DURATION", value_parser = parse_duration, env = "STEPMESH_CA_MAX_TTL")]
    pub max_ttl: Duration,
    /// Extra DNS name of the CA's serving certificate (repeatable), e.g. the
    /// Service's cluster DNS name.
    #[arg(
        long = "dns-name",
        env = "STEPMESH_CA_DNS_NAMES",
        value_delimiter = ','
    )]
    pub dns_names: Vec<String>,
    /// Sustained signings per second allowed per identity and source
    /// address, i.e. per pod (0 = no limit).
    #[arg(long, default_value_t = 1.0, env = "STEPMESH_CA_SIGN_RATE")]
    pub sign_rate: f64,
    /// Signings per identity and source address allowed at once.
    #[arg(long, default_value_t = 20, env = "STEPMESH_CA_SIGN_BURST")]
    pub sign_burst: u32,
    /// Sustained Sign and SignJwtSvid requests per second allowed per
    /// source address, counted before authentication (0 = no limit), so
    /// that forged tokens from one client cannot keep the verifier busy.
    #[arg(long, default_value_t = 20.0, env = "STEPMESH_CA_SOURCE_RATE")]
    pub source_rate: f64,
    /// Requests per source address allowed at once.
    #[arg(long, default_value_t = 256, env = "STEPMESH_CA_SOURCE_BURST")]
    pub source_burst: u32,
    /// Calls one source address may have in flight (0 = no limit): more
    /// are refused before their bodies are read, so unfinished calls
    /// cannot hold the CA's memory.
    #[arg(long, default_value_t = stepmesh_ca::calls::MAX_CALLS_PER_SOURCE, env = "STEPMESH_CA_SOURCE_CALLS")]
    pub source_calls: usize,
    /// How often the bundle sources and join-token file are re-read.
    #[arg(long, default_value = "5s", value_name = "DURATION", value_parser = parse_duration, env = "STEPMESH_CA_POLL_INTERVAL")]
    pub poll_interval: Duration,
    /// File with the admin token (32+ characters, mode 0600/0640) that
    /// `ca revoke | unrevoke | revocations` must present; without it those
    /// calls are refused.
    #[arg(long, env = "STEPMESH_CA_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Keep revocations and rotations in this ConfigMap, shared by every
    /// replica (`configmap/NAMESPACE/NAME`), instead of the state dir.
    #[arg(
        long,
        value_name = "configmap/NAMESPACE/NAME",
        env = "STEPMESH_CA_SHARED_STATE"
    )]
    pub shared_state: Option<String>,
    /// The API server of --shared-state (default: in-cluster).
    #[arg(
        long,
        requires = "shared_state",
        env = "STEPMESH_CA_SHARED_STATE_SERVER"
    )]
    pub shared_state_server: Option<String>,
    /// CA file of that API server.
    #[arg(long, default_value = stepmesh_ca::https::IN_CLUSTER_CA, env = "STEPMESH_CA_SHARED_STATE_CA_FILE")]
    pub shared_state_ca_file: PathBuf,
    /// Bearer token file for that API server (re-read on every call).
    #[arg(long, default_value = stepmesh_ca::https::IN_CLUSTER_TOKEN, env = "STEPMESH_CA_SHARED_STATE_TOKEN_FILE")]
    pub shared_state_token_file: PathBuf,
}

impl CaServeArgs {
    /// The server configuration these flags describe.
    pub fn to_config(&self) -> anyhow::Result<CaConfig> {
        let mut c = CaConfig::new(self.trust_domain.clone(), self.state_dir.clone());
        c.listen = self.listen;
        c.admin = self.admin;
        if let (Some(cert), Some(key), Some(root_bundle)) = (
            &self.intermediate_cert,
            &self.intermediate_key,
            &self.root_bundle,
        ) {
            c.mode = Mode::Intermediate {
                cert: cert.clone(),
                key: key.clone(),
                root_bundle: root_bundle.clone(),
            };
        }
        c.k8s_jwks.clone_from(&self.k8s_jwks);
        c.k8s_issuer.clone_from(&self.k8s_issuer);
        c.k8s_jwks_ca.clone_from(&self.k8s_jwks_ca);
        c.k8s_jwks_token_file.clone_from(&self.k8s_jwks_token_file);
        c.k8s_tokenreview.clone_from(&self.k8s_tokenreview);
        c.k8s_tokenreview_token_file
            .clone_from(&self.k8s_tokenreview_token_file);
        c.k8s_tokenreview_ca.clone_from(&self.k8s_tokenreview_ca);
        c.join_tokens.clone_from(&self.join_tokens);
        c.audience.clone_from(&self.audience);
        if self.default_ttl > self.max_ttl {
            anyhow::bail!(
                "--default-ttl ({:?}) is longer than --max-ttl ({:?})",
                self.default_ttl,
                self.max_ttl
            );
        }
        c.default_ttl = self.default_ttl;
        c.max_ttl = self.max_ttl;
        c.dns_names.clone_from(&self.dns_names);
        c.rate_limit = rate_limit("--sign-rate", self.sign_rate, self.sign_burst)?;
        c.source_rate_limit = rate_limit("--source-rate", self.source_rate, self.source_burst)?;
        c.calls_per_source = self.source_calls;
        c.poll_interval = self.poll_interval.max(Duration::from_millis(50));
        c.admin_token_file.clone_from(&self.admin_token_file);
        if let Some(object) = &self.shared_state {
            let object = object
                .parse()
                .map_err(|e| anyhow::anyhow!("--shared-state {e}"))?;
            let server = match &self.shared_state_server {
                Some(server) => server.clone(),
                None => stepmesh_ca::kube::in_cluster_server()
                    .map_err(|e| anyhow::anyhow!("--shared-state-server not given: {e}"))?,
            };
            c.shared_state = Some(server::SharedStateConfig {
                object,
                server,
                ca_file: self.shared_state_ca_file.clone(),
                token_file: self.shared_state_token_file.clone(),
            });
        }
        Ok(c)
    }
}

/// Runs a `stepmesh ca` subcommand.
pub async fn run(cmd: CaCommand) -> anyhow::Result<()> {
    match cmd {
        CaCommand::Serve(args) => serve(*args).await,
        CaCommand::Revoke(args) => crate::ca_admin::revoke(args).await,
        CaCommand::Unrevoke(args) => crate::ca_admin::unrevoke(args).await,
        CaCommand::Revocations(args) => crate::ca_admin::list(args).await,
        CaCommand::Rotate(args) => crate::ca_admin::rotate(args).await,
    }
}

async fn serve(args: CaServeArgs) -> anyhow::Result<()> {
    let config = args.to_config().config_err()?;
    crate::net::fdlimit::raise();
    let ca = server::start(config)
        .await
        .map_err(exit_class)
        .context("starting the CA")?;
    shutdown_signal().await;
    tracing::info!("shutting down");
    ca.shutdown().await;
    Ok(())
}

/// Flags and the files they name are configuration (exit 64); a port in use
/// or a failure to make a key is a failed run (exit 1).
fn exit_class(err: server::StartError) -> anyhow::Error {
    use server::StartError;
    use stepmesh_ca::store::StoreError;
    match err {
        StartError::Config(_)
        | StartError::Store(StoreError::Io { .. } | StoreError::Invalid { .. })
        | StartError::Tls(stepmesh_ca::tls::TlsError::Issue(_)) => exit::config(err),
        other => other.into(),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// A rate limit from its flags: `per_second` must be a finite number >= 0.
fn rate_limit(flag: &str, per_second: f64, burst: u32) -> anyhow::Result<RateLimit> {
    if !(per_second >= 0.0 && per_second.is_finite()) {
        anyhow::bail!("{flag} must be a number >= 0, got {per_second}");
    }
    Ok(RateLimit { per_second, burst })
}
