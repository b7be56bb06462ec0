//! Flags of `stepmesh proxy` and the small value types they parse into.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::Args;

use crate::units::{parse_duration, parse_idle};

/// Flags of `stepmesh proxy`: identity source, listeners, limits.
#[derive(Debug, Clone, Args)]
pub struct ProxyArgs {
    /// CA address (host:port) to obtain an SVID from (identity source 1);
    /// replicas: a comma-separated list, or a name resolving to several
    /// addresses (a headless Service). A replica that cannot answer is left
    /// for the next at once.
    #[arg(long, env = "STEPMESH_CA", requires_all = ["ca_bundle", "token_file", "trust_domain"], conflicts_with_all = ["cert", "key", "bundle"])]
    pub ca: Option<String>,
    /// PEM trust bundle the CA's TLS certificate chains to.
    #[arg(long, env = "STEPMESH_CA_BUNDLE")]
    pub ca_bundle: Option<PathBuf>,
    /// File holding the credential for the CA (re-read on every renewal: kubelet rotates it).
    #[arg(long, env = "STEPMESH_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Our trust domain (with --ca).
    #[arg(long, env = "STEPMESH_TRUST_DOMAIN")]
    pub trust_domain: Option<String>,
    /// SVID TTL to ask the CA for (default: the CA's).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, env = "STEPMESH_SVID_TTL")]
    pub svid_ttl: Option<Duration>,
    /// SVID chain PEM from an outside issuer (identity source 2; watched).
    #[arg(long, env = "STEPMESH_CERT", requires_all = ["key", "bundle"])]
    pub cert: Option<PathBuf>,
    /// Private key PEM of --cert (watched).
    #[arg(long, env = "STEPMESH_KEY")]
    pub key: Option<PathBuf>,
    /// Trust bundle PEM of our trust domain (watched).
    #[arg(long, env = "STEPMESH_BUNDLE")]
    pub bundle: Option<PathBuf>,
    /// How often --cert/--key/--bundle are checked for changes.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "1s", env = "STEPMESH_FILE_POLL")]
    pub file_poll_interval: Duration,
    /// At start, how long to wait for an identity file that does not exist
    /// yet (--cert/--key/--bundle, --ca-bundle, --token-file: a volume
    /// written after the container started); `/ready` says which one. Past
    /// it, or at once with 0s, a missing file stops the sidecar (exit 64).
    /// A file that exists but cannot be used stops it at once.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "60s", env = "STEPMESH_WAIT_FOR_FILES")]
    pub wait_for_files: Duration,
    /// mTLS inbound listener: LISTEN=APP_ADDR (repeatable).
    #[arg(
        long,
        env = "STEPMESH_INBOUND",
        value_name = "LISTEN=APP_ADDR",
        value_delimiter = ','
    )]
    pub inbound: Vec<InboundSpec>,
    /// mTLS outbound listener: LISTEN=PEER_ADDR@SPIFFE_ID, ID exact or ending `/*` (repeatable).
    #[arg(
        long,
        env = "STEPMESH_OUTBOUND",
        value_name = "LISTEN=PEER_ADDR@SPIFFE_ID",
        value_delimiter = ','
    )]
    pub outbound: Vec<OutboundSpec>,
    /// Transparent mode: listeners on --inbound-port/--outbound-port, destination from SO_ORIGINAL_DST.
    #[arg(long, env = "STEPMESH_TRANSPARENT")]
    pub transparent: bool,
    /// Transparent inbound port (where `stepmesh init` redirects inbound TCP).
    #[arg(long, default_value_t = 15006, env = "STEPMESH_INBOUND_PORT")]
    pub inbound_port: u16,
    /// Transparent outbound port (where `stepmesh init` redirects outbound TCP).
    #[arg(long, default_value_t = 15001, env = "STEPMESH_OUTBOUND_PORT")]
    pub outbound_port: u16,
    /// Policy file (watched; a bad file keeps the old policy). Default: allow
    /// authenticated peers of our trust domain.
    #[arg(long, env = "STEPMESH_POLICY")]
    pub policy: Option<PathBuf>,
    /// Admin address: /healthz, /ready, /metrics, /config.
    #[arg(long, default_value = "127.0.0.1:15020", env = "STEPMESH_ADMIN")]
    pub admin: SocketAddr,
    /// kubelet probes to run against the app, as a JSON probe table (the
    /// injector sets it): `{"/app-health/<container>/<readyz|livez|startupz>":
    /// {"httpGet"|"tcpSocket"|"grpc": {...}, "timeoutSeconds": N}}`, served on
    /// the admin port. A malformed table stops the sidecar at start (exit 64).
    #[arg(long, env = "STEPMESH_APP_PROBES")]
    pub app_probes: Option<String>,
    /// How long in-flight connections may finish after SIGTERM.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "5s", env = "STEPMESH_DRAIN_TIMEOUT")]
    pub drain_timeout: Duration,
    /// TLS handshake deadline for inbound and outbound mTLS.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "10s", env = "STEPMESH_HANDSHAKE_TIMEOUT")]
    pub handshake_timeout: Duration,
    /// A connection with no byte in either direction for this long is closed.
    #[arg(long, value_name = "DURATION", value_parser = parse_idle, default_value = "1h", env = "STEPMESH_IDLE_TIMEOUT")]
    pub idle_timeout: Duration,
    /// A pooled mesh connection with streams open pings its peer this
    /// often and is closed, with its app connections, when an answer takes
    /// longer than a third of it (at most 10 s): a peer whose node vanished
    /// is given up then, not at the idle timeout.
    #[arg(long, value_name = "DURATION", value_parser = parse_keepalive, default_value = "30s", env = "STEPMESH_MESH_KEEPALIVE")]
    pub mesh_keepalive: Duration,
    /// A pooled mesh connection to a peer that nothing has used for this
    /// long (no request, no tunnel, no app connection following it) is
    /// closed, and the peer forgotten, so that the peers of past pods do
    /// not stay connected. Checked every few seconds.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "5m", env = "STEPMESH_MESH_POOL_IDLE")]
    pub mesh_pool_idle: Duration,
    /// Deadline for dialling the app or the peer.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "5s", env = "STEPMESH_CONNECT_TIMEOUT")]
    pub connect_timeout: Duration,
    /// Connections open at once, all listeners and inbound tunnels
    /// together; more are closed at accept (a tunnel: refused, 503). Default 16384, lowered at start if the descriptor limit (its
    /// soft limit first raised to the hard one) cannot carry two per
    /// connection; a value given here is kept (with a warning if it may not
    /// fit).
    #[arg(long, env = "STEPMESH_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Inbound connections one peer identity may hold open at once (0: no
    /// cap); more are closed after the handshake, counted and logged.
    #[arg(
        long,
        default_value_t = 4096,
        env = "STEPMESH_MAX_CONNECTIONS_PER_PEER"
    )]
    pub max_connections_per_peer: usize,
    /// App-facing (outbound) connections one source address may hold open
    /// at once (0: no cap); more are closed at accept.
    #[arg(
        long,
        default_value_t = 4096,
        env = "STEPMESH_MAX_CONNECTIONS_PER_SOURCE"
    )]
    pub max_connections_per_source: usize,
    /// An HTTP/1 request head must be complete this long after its first
    /// byte, else 408 and the connection closes (slow-header clients); an
    /// HTTP/2 frame or header block likewise, else the connection closes.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "10s", env = "STEPMESH_HEADER_TIMEOUT")]
    pub header_timeout: Duration,
    /// An HTTP/1 request body may pause this long between bytes, else 408
    /// and the connection closes (slow-body clients).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "60s", env = "STEPMESH_BODY_IDLE_TIMEOUT")]
    pub body_idle_timeout: Duration,
    /// Largest HTTP request head in bytes (at most 65536); over it: 431.
    #[arg(long, default_value_t = 65536, value_parser = clap::value_parser!(u32).range(1024..=65536), env = "STEPMESH_MAX_REQUEST_HEADER_BYTES")]
    pub max_request_header_bytes: u32,
    /// Most fields in an HTTP/1 request head (at most 256); over it: 431.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..=256), env = "STEPMESH_MAX_REQUEST_HEADERS")]
    pub max_request_headers: u16,
    /// Destination ports whose traffic stays opaque TCP end to end, as the
    /// policy's `outbound.opaquePorts` (comma-separated; either list makes
    /// a port opaque): no protocol detection, no HTTP layer.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u16).range(1..), env = "STEPMESH_OPAQUE_PORTS")]
    pub opaque_ports: Vec<u16>,
    /// Do not multiplex opaque TCP between sidecars: each app connection
    /// takes an mTLS connection of its own, as before tunnels (HTTP/2
    /// CONNECT streams on the pooled mesh connection to the peer); the
    /// inbound side then offers no tunnel ALPN either.
    #[arg(long, env = "STEPMESH_NO_TUNNEL")]
    pub no_tunnel: bool,
    /// Tokio worker threads (default: one per core).
    #[arg(long, env = "STEPMESH_WORKERS")]
    pub workers: Option<usize>,
    /// Do not resume TLS sessions on outbound connections.
    #[arg(long, env = "STEPMESH_NO_SESSION_RESUMPTION")]
    pub no_session_resumption: bool,
    /// Also accept and offer TLS 1.2 (default: TLS 1.3 only).
    #[arg(long, env = "STEPMESH_TLS12")]
    pub tls12: bool,
    /// Serve the SPIFFE Workload API on this Unix socket (the app's SVID,
    /// key and bundle, streamed on rotation; see docs/WORKLOAD-API.md).
    /// Clients find it with `SPIFFE_ENDPOINT_SOCKET=unix://PATH`.
    #[arg(long, value_name = "PATH", env = "STEPMESH_WORKLOAD_API")]
    pub workload_api: Option<PathBuf>,
    /// Only processes of this UID (`SO_PEERCRED`) may call the Workload API
    /// (repeatable; default: any process that can reach the socket).
    #[arg(
        long,
        value_name = "UID",
        requires = "workload_api",
        value_delimiter = ',',
        env = "STEPMESH_WORKLOAD_API_UID"
    )]
    pub workload_api_uid: Vec<u32>,
    /// Do not write the JSON access log to stdout.
    #[arg(long, env = "STEPMESH_NO_ACCESS_LOG")]
    pub no_access_log: bool,
}

/// `--inbound LISTEN=APP_ADDR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundSpec {
    /// Where mTLS is terminated; its port is the policy port.
    pub listen: SocketAddr,
    /// The local app (host:port).
    pub app: String,
}

impl FromStr for InboundSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (listen, app) = s
            .split_once('=')
            .ok_or_else(|| "expected LISTEN=APP_ADDR".to_owned())?;
        let listen = listen
            .parse()
            .map_err(|e| format!("LISTEN {listen:?}: {e}"))?;
        check_host_port(app).map_err(|e| format!("APP_ADDR {e}"))?;
        Ok(Self {
            listen,
            app: app.to_owned(),
        })
    }
}

/// `--outbound LISTEN=PEER_ADDR@SPIFFE_ID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundSpec {
    /// Plaintext listener for the local app.
    pub listen: SocketAddr,
    /// The peer sidecar (host:port).
    pub peer: String,
    /// The identity the peer must present: exact, or a `/*` prefix pattern.
    pub expected_id: String,
}

impl FromStr for OutboundSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (listen, rest) = s
            .split_once('=')
            .ok_or_else(|| "expected LISTEN=PEER_ADDR@SPIFFE_ID".to_owned())?;
        let (peer, id) = rest
            .split_once('@')
            .ok_or_else(|| "expected LISTEN=PEER_ADDR@SPIFFE_ID".to_owned())?;
        let listen = listen
            .parse()
            .map_err(|e| format!("LISTEN {listen:?}: {e}"))?;
        check_host_port(peer).map_err(|e| format!("PEER_ADDR {e}"))?;
        if !id.starts_with("spiffe://") {
            return Err(format!("SPIFFE_ID {id:?} must start with spiffe://"));
        }
        Ok(Self {
            listen,
            peer: peer.to_owned(),
            expected_id: id.to_owned(),
        })
    }
}

/// A keep-alive interval: at least 1 s (a ping's answer is waited for a
/// third of it; shorter would close healthy connections on a busy node).
fn parse_keepalive(s: &str) -> Result<Duration, String> {
    let interval = parse_duration(s)?;
    if interval < Duration::from_secs(1) {
        return Err("at least 1s: an answer is waited for a third of it".into());
    }
    Ok(interval)
}

fn check_host_port(addr: &str) -> Result<(), String> {
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
        _ => Err(format!("{addr:?}: expected host:port")),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn inbound_spec() {
        let spec: InboundSpec = "127.0.0.1:8443=127.0.0.1:8080".parse().unwrap();
        assert_eq!(spec.listen.port(), 8443);
        assert_eq!(spec.app, "127.0.0.1:8080");
        assert!("127.0.0.1:8443".parse::<InboundSpec>().is_err());
        assert!("nope=127.0.0.1:8080".parse::<InboundSpec>().is_err());
        assert!("127.0.0.1:1=app".parse::<InboundSpec>().is_err());
    }

    #[test]
    fn a_keepalive_under_a_second_is_refused() {
        assert_eq!(parse_keepalive("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_keepalive("1s"), Ok(Duration::from_secs(1)));
        let refused = parse_keepalive("500ms").unwrap_err();
        assert!(refused.contains("at least 1s"), "{refused}");
        assert!(parse_keepalive("0").is_err());
        assert!(parse_keepalive("soon").is_err());
    }
}
