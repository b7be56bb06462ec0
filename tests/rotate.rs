//! `stepmesh ca rotate`: a real CA asks a workload's sidecar to renew now,
//! under load through that workload: the serial its peers see changes and
//! no request fails (connections are kept).
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::ca::CaProcess;
use common::mesh::*;
use rustls::pki_types::ServerName;
use stepmesh::identity::store::{CertStore, Svid};
use stepmesh::tls::verify::Expected;
use stepmesh::tls::TlsSettings;
use stepmesh_ca::spiffe_id::SpiffeIdPattern;

const TD: &str = "mesh.test";
const PROBE_ID: &str = "spiffe://mesh.test/ns/test/sa/probe";
const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef0123456789";

/// A TLS client of its own (an SVID from the CA, the sidecar's verifier)
/// that reports the serial a sidecar's inbound listener presents.
struct Probe {
    config: Arc<rustls::ClientConfig>,
    bundle: stepmesh_ca::svid::TrustBundle,
}

impl Probe {
    fn new(ca: &CaProcess) -> Self {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let issued = rt.block_on(ca.issue("probe-token"));
        let provider = stepmesh::tls::provider();
        let store = Arc::new(CertStore::new(provider.clone(), None));
        let bundle = issued.bundle.clone();
        let svid = Svid {
            chain: issued.chain,
            key: issued.key,
            bundle: issued.bundle,
        };
        store.publish(svid).unwrap();
        let expected = Expected::Pattern(SpiffeIdPattern::parse(SERVER_ID).unwrap());
        let settings = TlsSettings {
            tls12: false,
            session_resumption: false,
        };
        let config =
            stepmesh::tls::client_config(&provider, &store, expected, Vec::new(), settings)
                .unwrap();
        Self { config, bundle }
    }

    fn serial(&self, addr: SocketAddr) -> String {
        let mut tcp = TcpStream::connect(addr).unwrap();
        let name = ServerName::IpAddress(addr.ip().into());
        let mut conn = rustls::ClientConnection::new(self.config.clone(), name).unwrap();
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp).unwrap();
        }
        let chain = conn.peer_certificates().unwrap();
        let now = rustls::pki_types::UnixTime::now();
        stepmesh_ca::svid::verify(chain, &self.bundle, now)
            .unwrap()
            .serial
    }
}

fn sidecar_args(ca: &CaProcess, dir: &Path, token: &str) -> Vec<String> {
    let token_file = dir.join(format!("{token}.jwt"));
    std::fs::write(&token_file, token).unwrap();
    let addr = ca.grpc_host_port();
    let bundle = ca.bundle_path.display().to_string();
    let file = token_file.display().to_string();
    [
        "--ca",
        &addr,
        "--ca-bundle",
        &bundle,
        "--token-file",
        &file,
        "--trust-domain",
        TD,
        "--svid-ttl",
        "1h",
    ]
    .map(String::from)
    .to_vec()
}

fn rotate(ca: &CaProcess, token: &Path, target: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_stepmesh"))
        .args(["ca", "rotate", "--ca", &ca.grpc_host_port(), "--ca-bundle"])
        .arg(&ca.bundle_path)
        .arg("--admin-token-file")
        .arg(token)
        .args(target)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{target:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Echo round trips on one kept connection until `stop`: (ok, failed).
fn load(
    outbound: SocketAddr,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
) {
    let mut conn = TcpStream::connect(outbound).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 16];
    while !stop.load(Ordering::Relaxed) {
        let good = conn.write_all(b"0123456789abcdef").is_ok()
            && conn.read_exact(&mut buf).is_ok()
            && &buf == b"0123456789abcdef";
        if good {
            ok.fetch_add(1, Ordering::Relaxed);
        } else {
            failed.fetch_add(1, Ordering::Relaxed);
            // A new connection, so one failure is counted once.
            match TcpStream::connect(outbound) {
                Ok(c) => conn = c,
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}

#[test]
fn rotate_renews_under_load_without_failing_a_request() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("admin.token");
    std::fs::write(&token, ADMIN_TOKEN).unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let ca = CaProcess::start_with(
        TD,
        &[
            ("server-token", SERVER_ID),
            ("client-token", CLIENT_ID),
            ("probe-token", PROBE_ID),
        ],
        &[
            "--admin-token-file",
            token.to_str().unwrap(),
            "--sign-burst",
            "100",
        ],
    );
    let app = echo_server();
    let mut args = sidecar_args(&ca, dir.path(), "server-token");
    args.extend(["--inbound".into(), format!("127.0.0.1:0={app}")]);
    let server = Sidecar::spawn(&args);
    let inbound = server.listener("inbound");
    let mut args = sidecar_args(&ca, dir.path(), "client-token");
    args.extend([
        "--outbound".into(),
        format!("127.0.0.1:0={inbound}@{SERVER_ID}"),
    ]);
    let client = Sidecar::spawn(&args);
    let outbound = client.listener("outbound");
    server.wait_ready();
    client.wait_ready();
    let probe = Probe::new(&ca);
    let before = probe.serial(inbound);
    let client_before = client.config()["serial"].clone();

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || load(outbound, stop, ok, failed))
        })
        .collect();
    // New connections during the rotation too.
    let fresh = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut good, mut bad) = (0, 0);
            while !stop.load(Ordering::Relaxed) {
                if roundtrip(outbound, b"fresh").unwrap_or_default() == b"fresh" {
                    good += 1;
                } else {
                    bad += 1;
                }
            }
            (good, bad)
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    let ok_at_rotate = ok.load(Ordering::Relaxed);
    rotate(&ca, &token, &["--id", SERVER_ID]);
    let after = eventually("the peer sees a new serial", || {
        let now = probe.serial(inbound);
        (now != before).then_some(now)
    });
    let took = started.elapsed();
    assert_eq!(server.config()["serial"], after.as_str());
    assert_eq!(
        client.config()["serial"],
        client_before,
        "only the ID asked renews"
    );
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    workers.into_iter().for_each(|w| w.join().unwrap());
    let (fresh_ok, fresh_failed) = fresh.join().unwrap();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    let rate = (ok - ok_at_rotate) as f64 / (took + Duration::from_secs(1)).as_secs_f64();
    eprintln!(
        "rotation seen after {took:?}; kept connections: {ok} ok, {failed} failed (~{rate:.0} req/s across the rotation); new connections: {fresh_ok} ok, {fresh_failed} failed"
    );
    assert_eq!(failed, 0, "no request on a kept connection failed");
    assert_eq!(fresh_failed, 0, "no new connection failed");
    assert!(ok > 100 && fresh_ok > 0, "load ran: {ok} {fresh_ok}");
    ca.wait_audit(|v| {
        v["decision"] == "rotate" && v["outcome"] == "ok" && v["identity"] == SERVER_ID
    });

    // --all: the client renews too.
    rotate(&ca, &token, &["--all"]);
    eventually("the client renewed", || {
        (client.config()["serial"] != client_before).then_some(())
    });
    assert_eq!(roundtrip(outbound, b"after").unwrap(), b"after");
}
