//! kubelet's rewritten probes: a real `stepmesh proxy` with a probe table
//! (`--app-probes`) answers `/app-health/...` on its admin port by running
//! the original probe against local apps — plain HTTP (status passed
//! through), HTTPS with a self-signed certificate, TCP, gRPC health — and
//! says 503 when the app is down or silent, 404 for a path not in the table.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::mesh::{echo_server, Sidecar, SvidFiles};
use serde_json::json;

const ID: &str = "spiffe://mesh.test/ns/shop/sa/web";

/// A plain HTTP app answering every request with the current status and
/// keeping the request heads it saw.
struct HttpApp {
    addr: SocketAddr,
    status: Arc<AtomicU16>,
    heads: Arc<Mutex<Vec<String>>>,
}

impl HttpApp {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let status = Arc::new(AtomicU16::new(200));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (answer, seen) = (status.clone(), heads.clone());
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                seen.lock().unwrap().push(head);
                let code = answer.load(Ordering::SeqCst);
                let _ = write!(
                    conn,
                    "HTTP/1.1 {code} Whatever\r\nLocation: /elsewhere\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
                );
            }
        });
        Self {
            addr,
            status,
            heads,
        }
    }
}

/// Accepts connections and never answers (held open).
fn silent_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming().flatten() {
            held.push(conn);
        }
    });
    addr
}

/// A port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An HTTPS app with a self-signed certificate kubelet could not verify
/// either; answers 204.
fn https_app(rt: &tokio::runtime::Runtime) -> SocketAddr {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["app.local".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = vec![0; 4096];
                let _ = tls.read(&mut buf).await;
                let _ = tls
                    .write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
                    .await;
                let _ = tls.shutdown().await;
            });
        }
    });
    addr
}

/// A gRPC server with the standard health service: the whole server and
/// `shop.Cart` serving, `shop.Payments` not serving.
fn grpc_app(rt: &tokio::runtime::Runtime) -> SocketAddr {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move {
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        reporter
            .set_service_status("shop.Cart", tonic_health::ServingStatus::Serving)
            .await;
        reporter
            .set_service_status("shop.Payments", tonic_health::ServingStatus::NotServing)
            .await;
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming)
            .await
            .unwrap();
    });
    addr
}

/// `GET path` on the admin port as kubelet sends it: (status, body).
fn probe(admin: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 10.0.0.7:15020\r\nUser-Agent: kube-probe/1.33\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text.split_once("\r\n\r\n").unwrap().1.to_owned();
    (status, body)
}

fn sidecar_args(dir: &std::path::Path, table: &serde_json::Value) -> Vec<String> {
    let pki = stepmesh_ca::testing::Pki::new("mesh.test");
    let files = SvidFiles::write(dir, "web", &pki, &pki.leaf(ID));
    let mut args = files.args();
    args.extend([
        "--inbound".into(),
        format!("127.0.0.1:0={}", echo_server()),
        "--app-probes".into(),
        table.to_string(),
    ]);
    args
}

#[test]
fn admin_runs_the_apps_probes() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let app = HttpApp::start();
    let tcp = echo_server();
    let (silent, closed) = (silent_app(), closed_port());
    let (https, grpc) = (https_app(&rt), grpc_app(&rt));
    let table = json!({
        "/app-health/web/readyz": {"httpGet": {"path": "/ready?deep=1", "port": app.addr.port(),
            "scheme": "HTTP", "httpHeaders": [{"name": "X-Probe", "value": "yes"},
                                              {"name": "Host", "value": "web.example"}]},
            "timeoutSeconds": 5},
        "/app-health/web/livez": {"tcpSocket": {"port": tcp.port()}},
        "/app-health/down/readyz": {"httpGet": {"port": closed}},
        "/app-health/down/livez": {"tcpSocket": {"port": closed}},
        "/app-health/silent/readyz": {"httpGet": {"path": "/", "port": silent.port()}, "timeoutSeconds": 1},
        "/app-health/tls/startupz": {"httpGet": {"path": "/", "port": https.port(), "scheme": "HTTPS"}, "timeoutSeconds": 10},
        "/app-health/grpc/readyz": {"grpc": {"port": grpc.port()}, "timeoutSeconds": 10},
        "/app-health/grpc/livez": {"grpc": {"port": grpc.port(), "service": "shop.Cart"}, "timeoutSeconds": 10},
        "/app-health/grpc/startupz": {"grpc": {"port": grpc.port(), "service": "shop.Payments"}, "timeoutSeconds": 10},
    });
    let dir = tempfile::tempdir().unwrap();
    let sidecar = Sidecar::spawn(&sidecar_args(dir.path(), &table));
    let admin = sidecar.admin;

    // Healthy app: 200, and the app saw kubelet's request as the probe describes.
    let (status, body) = probe(admin, "/app-health/web/readyz");
    assert_eq!(status, 200, "{body}");
    let head = app.heads.lock().unwrap().last().unwrap().to_lowercase();
    assert!(head.starts_with("get /ready?deep=1 http/1.1\r\n"), "{head}");
    for line in [
        "x-probe: yes",
        "host: web.example",
        "user-agent: kube-probe/1.33",
    ] {
        assert!(head.contains(line), "{line} missing from {head}");
    }
    // Redirects count as success (kubelet: 200-399), without the Location.
    app.status.store(302, Ordering::SeqCst);
    assert_eq!(probe(admin, "/app-health/web/readyz").0, 200);
    // The app's failure passes through as its own status.
    for code in [500, 404, 503] {
        app.status.store(code, Ordering::SeqCst);
        let (status, body) = probe(admin, "/app-health/web/readyz");
        assert_eq!(status, code, "{body}");
        assert!(body.contains(&code.to_string()), "{body}");
    }
    app.status.store(200, Ordering::SeqCst);
    assert_eq!(probe(admin, "/app-health/web/readyz").0, 200);

    assert_eq!(probe(admin, "/app-health/web/livez").0, 200);
    let (status, body) = probe(admin, "/app-health/down/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("connecting to 127.0.0.1"), "{body}");
    assert_eq!(probe(admin, "/app-health/down/livez").0, 503);

    // An app that never answers: 503 once the probe's own timeout passed.
    let started = Instant::now();
    let (status, body) = probe(admin, "/app-health/silent/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no answer within 1s"), "{body}");
    assert!(started.elapsed() < Duration::from_secs(20));

    let (status, body) = probe(admin, "/app-health/tls/startupz");
    assert_eq!(status, 200, "HTTPS, certificate not verified: {body}");

    assert_eq!(probe(admin, "/app-health/grpc/readyz").0, 200);
    assert_eq!(probe(admin, "/app-health/grpc/livez").0, 200);
    let (status, body) = probe(admin, "/app-health/grpc/startupz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("NOT_SERVING"), "{body}");

    // Not in the table.
    assert_eq!(probe(admin, "/app-health/web/startupz").0, 404);
    assert_eq!(probe(admin, "/app-health/nope/readyz").0, 404);
    assert_eq!(probe(admin, "/app-health/").0, 404);
    // Counted by admin path and result; made-up paths are not labels.
    let count = |probe: &str, result: &str| {
        sidecar.metric(&format!(
            "stepmesh_app_probes_total{{probe=\"/app-health/{probe}\",result=\"{result}\"}}"
        ))
    };
    assert_eq!(count("web/readyz", "healthy"), 3.0);
    assert_eq!(count("web/readyz", "unhealthy"), 3.0);
    assert_eq!(count("down/readyz", "unreachable"), 1.0);
    assert_eq!(count("silent/readyz", "timeout"), 1.0);
    assert_eq!(count("grpc/startupz", "unhealthy"), 1.0);
    assert!(!sidecar.metrics().contains("nope/readyz"));
    // The rest of the admin server is unchanged; /config lists the probes.
    sidecar.wait_ready();
    let config = sidecar.config();
    let listed = config["app_probes"].as_array().unwrap();
    assert_eq!(listed.len(), 9, "{config}");
    assert!(
        listed.contains(&json!("/app-health/grpc/livez")),
        "{config}"
    );
    assert_eq!(probe(admin, "/healthz").0, 200);
}

#[test]
fn a_malformed_probe_table_stops_the_sidecar_with_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    for (table, needle) in [
        (
            json!({"/app-health/web/readyz": {"httpGet": {"port": 0}}}),
            "/app-health/web/readyz: httpGet.port 0 is not a port",
        ),
        (
            json!({"/app-health/web/readyz": {"tcpSocket": {"port": 8080, "host": "db"}}}),
            "unknown field `host`",
        ),
        (
            json!(["not", "an", "object"]),
            "not a JSON object of probes",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_stepmesh"))
            .arg("proxy")
            .args(sidecar_args(dir.path(), &table))
            .args(["--admin", "127.0.0.1:0"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{stderr}");
        let last = stderr.lines().last().unwrap();
        assert!(last.starts_with("stepmesh: --app-probes: "), "{stderr}");
        assert!(last.contains(needle), "{needle} not in {last}");
    }
}
