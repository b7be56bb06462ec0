//! Sidecars with SVIDs from a real `stepmesh ca serve`: rotation under load
//! with a short TTL, and a CA outage the sidecars ride out.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::io::BufRead;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::ca::CaProcess;
use common::mesh::*;
use rustls::pki_types::ServerName;
use stepmesh::identity::store::{CertStore, Svid};
use stepmesh::tls::verify::Expected;
use stepmesh::tls::TlsSettings;
use stepmesh_ca::spiffe_id::SpiffeIdPattern;

const TD: &str = "mesh.test";
const PROBE_ID: &str = "spiffe://mesh.test/ns/test/sa/probe";

fn start_ca() -> CaProcess {
    CaProcess::start(
        TD,
        &[
            ("server-token", SERVER_ID),
            ("client-token", CLIENT_ID),
            ("probe-token", PROBE_ID),
        ],
    )
}

/// Inbound sidecar in front of an echo app, outbound sidecar pointing at it.
fn ca_mesh(ca: &CaProcess, dir: &Path, ttl: &str) -> (Sidecar, Sidecar, SocketAddr, SocketAddr) {
    let app = echo_server();
    let mut args = ca.enrol_args(dir, "server-token", Some(ttl));
    args.extend(["--inbound".into(), format!("127.0.0.1:0={app}")]);
    let server = Sidecar::spawn(&args);
    let inbound = server.listener("inbound");
    let mut args = ca.enrol_args(dir, "client-token", Some(ttl));
    args.extend([
        "--outbound".into(),
        format!("127.0.0.1:0={inbound}@{SERVER_ID}"),
    ]);
    let client = Sidecar::spawn(&args);
    let outbound = client.listener("outbound");
    server.wait_ready();
    client.wait_ready();
    (server, client, inbound, outbound)
}

const RENEWED: &str = r#"stepmesh_svid_renewals_total{source="ca",outcome="success"}"#;
const FAILED: &str = r#"stepmesh_svid_renewals_total{source="ca",outcome="failure"}"#;

/// A TLS client of its own (an SVID from the CA for PROBE_ID, the
/// sidecar's own verifier) that reports the serial the inbound sidecar
/// presents.
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
        store
            .publish(Svid {
                chain: issued.chain,
                key: issued.key,
                bundle: issued.bundle,
            })
            .unwrap();
        let config = stepmesh::tls::client_config(
            &provider,
            &store,
            Expected::Pattern(SpiffeIdPattern::parse(SERVER_ID).unwrap()),
            Vec::new(),
            TlsSettings {
                tls12: false,
                session_resumption: false,
            },
        )
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

#[test]
fn rotation_under_load_loses_nothing() {
    let ca = start_ca();
    let dir = tempfile::tempdir().unwrap();
    let (server, client, inbound, outbound) = ca_mesh(&ca, dir.path(), "4s");
    let probe = Probe::new(&ca);

    let done = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let workers: Vec<_> = (0..4u64)
        .map(|w| {
            let (done, ok, errors) = (done.clone(), ok.clone(), errors.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !done.load(Ordering::Relaxed) {
                    let payload = random_bytes(512, w << 32 | i);
                    match roundtrip(outbound, &payload) {
                        Ok(back) if back == payload => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(back) => errors.lock().unwrap().push(format!(
                            "request {w}/{i}: {} bytes back, not the same",
                            back.len()
                        )),
                        Err(e) => errors.lock().unwrap().push(format!("request {w}/{i}: {e}")),
                    }
                    i += 1;
                }
            })
        })
        .collect();

    let mut serials = BTreeSet::new();
    let rotations = |s: &Sidecar| s.metric(RENEWED) as usize;
    eventually("10,000 requests over at least three rotations", || {
        serials.insert(probe.serial(inbound));
        std::thread::sleep(Duration::from_millis(100));
        (ok.load(Ordering::Relaxed) >= 10_000 && rotations(&server) >= 4 && rotations(&client) >= 4)
            .then_some(())
    });
    done.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    serials.insert(probe.serial(inbound));
    let errors = errors.lock().unwrap();
    assert!(
        errors.is_empty(),
        "{} errors, first: {:?}",
        errors.len(),
        errors.first()
    );
    eprintln!(
        "{} requests, server SVID renewals {}, client {}, serials seen {}",
        ok.load(Ordering::Relaxed),
        rotations(&server),
        rotations(&client),
        serials.len()
    );
    assert!(
        serials.len() >= 3,
        "the serial the peer sees changes: {serials:?}"
    );
    assert_eq!(server.metric(FAILED), 0.0);
    assert_eq!(
        client.metric(r#"stepmesh_tls_handshake_failures_total{direction="outbound","#),
        0.0
    );
}

/// `stepmesh ca serve` again on the stopped CA's port and state.
fn restart_ca_same_port(ca: &CaProcess) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_stepmesh"))
        .args(["--log-format", "json", "ca", "serve"])
        .args([
            "--listen",
            &ca.grpc_addr.to_string(),
            "--admin",
            "127.0.0.1:0",
        ])
        .args(["--trust-domain", TD])
        .arg("--state-dir")
        .arg(&ca.state_dir)
        .arg("--join-tokens")
        .arg(&ca.join_tokens_path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut lines = stderr.lines();
    loop {
        let line = lines.next().expect("CA exited").unwrap();
        if line.contains("\"CA serving\"") {
            break;
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    child
}

#[test]
fn ca_outage_keeps_serving_and_recovers() {
    let mut ca = start_ca();
    let dir = tempfile::tempdir().unwrap();
    let (server, _client, _inbound, outbound) = ca_mesh(&ca, dir.path(), "6s");
    assert_eq!(roundtrip(outbound, b"before").unwrap(), b"before");
    let issued = server.metric(RENEWED);

    ca.stop();
    eventually("a failed renewal", || {
        (server.metric(FAILED) >= 1.0).then_some(())
    });
    assert_eq!(
        roundtrip(outbound, b"during").unwrap(),
        b"during",
        "serving on the current SVID"
    );
    assert!(server.config()["spiffe_id"] == SERVER_ID);

    let mut again = restart_ca_same_port(&ca);
    eventually("renewal after the CA is back", || {
        (server.metric(RENEWED) > issued).then_some(())
    });
    assert_eq!(roundtrip(outbound, b"after").unwrap(), b"after");
    let _ = again.kill();
    let _ = again.wait();
}

#[test]
fn a_root_added_at_the_ca_reaches_the_sidecar_without_renewal() {
    let ca = CaProcess::start_with(
        TD,
        &[("server-token", SERVER_ID)],
        &["--poll-interval", "200ms"],
    );
    let dir = tempfile::tempdir().unwrap();
    let app = echo_server();
    // A long TTL: any change seen comes from the bundle stream, not a renewal.
    let mut args = ca.enrol_args(dir.path(), "server-token", Some("1h"));
    args.extend(["--inbound".into(), format!("127.0.0.1:0={app}")]);
    let server = Sidecar::spawn(&args);
    server.wait_ready();
    assert_eq!(server.config()["bundle_roots"], 1);
    let serial = server.config()["serial"].clone();

    let next_root = stepmesh_ca::testing::Pki::new(TD);
    std::fs::write(ca.state_dir.join("extra-roots.pem"), next_root.bundle_pem()).unwrap();
    eventually("the new root in the sidecar's bundle", || {
        (server.config()["bundle_roots"] == 2).then_some(())
    });
    assert_eq!(server.config()["serial"], serial, "no renewal was needed");
    assert_eq!(server.metric(RENEWED), 1.0);
}
