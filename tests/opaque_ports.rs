//! Opaque ports through a real sidecar pair: an HTTP/2 client towards a
//! `protocol: tcp` port stays L4 end to end, whether the client's sidecar
//! knows the port is opaque (`--opaque-ports`: no detection, no HTTP layer)
//! or not (the inbound side negotiates tunnels only on a `tcp` port, so the
//! outbound side sends the bytes through a tunnel); an `http` port still takes the
//! HTTP layer. Told apart by the HTTP request metrics of both sidecars and
//! by the `x-forwarded-client-cert` header only the HTTP layer sets.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;
mod http_support;

use common::mesh::{free_port, inbound_handshakes_of, Sidecar, SvidFiles};
use http_support::app::{request, send, TestApp};
use stepmesh_ca::testing::Pki;

const SERVER_ID: &str = "spiffe://mesh.test/ns/payments/sa/api";
const FRONTEND: &str = "spiffe://mesh.test/ns/web/sa/frontend";

/// HTTP requests the sidecar counted in `direction` on `port`.
fn http_requests(sidecar: &Sidecar, direction: &str, port: u16) -> f64 {
    let text = sidecar.metrics();
    text.lines()
        .filter(|l| l.starts_with("stepmesh_http_requests_total{"))
        .filter(|l| l.contains(&format!("direction=\"{direction}\"")))
        .filter(|l| l.contains(&format!("port=\"{port}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn tcp_and_opaque_ports_stay_l4_end_to_end() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let app = rt.block_on(TestApp::start(true));
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("mesh.test");
    let (tcp_port, http_port) = (free_port(), free_port());
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "trustDomain: mesh.test\ninbound:\n  default: deny\n  ports:\n\
             \x20   - port: {tcp_port}\n      protocol: tcp\n      allow: [{{from: [{FRONTEND}]}}]\n\
             \x20   - port: {http_port}\n      protocol: http\n      allow: [{{from: [{FRONTEND}]}}]\n"
        ),
    )
    .unwrap();
    let files = SvidFiles::write(dir.path(), "server", &pki, &pki.leaf(SERVER_ID));
    let mut args = files.args();
    args.extend([
        "--inbound".into(),
        format!("127.0.0.1:{tcp_port}={}", app.addr),
        "--inbound".into(),
        format!("127.0.0.1:{http_port}={}", app.addr),
        "--policy".into(),
        policy.display().to_string(),
    ]);
    let server = Sidecar::spawn(&args);
    server.wait_ready();
    let client = |name: &str, port: u16, extra: &[String]| {
        let files = SvidFiles::write(dir.path(), name, &pki, &pki.leaf(FRONTEND));
        let mut args = files.args();
        args.extend(extra.iter().cloned());
        args.extend([
            "--outbound".into(),
            format!("127.0.0.1:0=127.0.0.1:{port}@{SERVER_ID}"),
        ]);
        let s = Sidecar::spawn(&args);
        s.wait_ready();
        s
    };
    let to_http = client("to-http", http_port, &[]);
    let to_tcp = client("to-tcp", tcp_port, &[]);
    let opaque = client(
        "opaque",
        tcp_port,
        &["--opaque-ports".into(), format!("1,{tcp_port}")],
    );
    let call = |s: &Sidecar| {
        let a = rt.block_on(send(
            s.listener("outbound"),
            true,
            request(true, "GET", "/hello", &[], b""),
        ));
        assert_eq!(a.status, 200);
        a.json()
    };

    // The http port: the HTTP layer on both sides (it sets XFCC).
    let seen = call(&to_http);
    assert!(seen["headers"].get("x-forwarded-client-cert").is_some());
    assert_eq!(http_requests(&to_http, "outbound", http_port), 1.0);
    assert_eq!(http_requests(&server, "inbound", http_port), 1.0);

    // The tcp port, the client side not told: still bytes end to end (a
    // mesh connection that negotiates tunnels only, and the app's HTTP/2
    // through a tunnel on it).
    let before = inbound_handshakes_of(&server);
    let seen = call(&to_tcp);
    assert_eq!(inbound_handshakes_of(&server) - before, 1.0);
    assert_eq!(seen["version"], "HTTP/2.0", "the app's own HTTP/2");
    assert!(seen["headers"].get("x-forwarded-client-cert").is_none());
    assert_eq!(http_requests(&server, "inbound", tcp_port), 0.0);
    assert_eq!(http_requests(&to_tcp, "outbound", tcp_port), 0.0);

    // The tcp port as an opaque port: never detected, never HTTP (a
    // tunnel, on this sidecar's own mesh connection).
    let before = inbound_handshakes_of(&server);
    let seen = call(&opaque);
    assert_eq!(inbound_handshakes_of(&server) - before, 1.0);
    assert!(seen["headers"].get("x-forwarded-client-cert").is_none());
    assert_eq!(http_requests(&opaque, "outbound", tcp_port), 0.0);
    assert_eq!(http_requests(&server, "inbound", tcp_port), 0.0);
}

#[test]
fn a_bad_opaque_port_is_refused_at_start() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stepmesh"))
        .args(common::PROXY_WITHOUT_FILES)
        .args(["--opaque-ports", "5432,0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "a usage error");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--opaque-ports"), "{err}");
}
