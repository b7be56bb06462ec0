//! HTTP/2 clients that trickle a header block through a real sidecar pair
//! (`--header-timeout 2s`): h2c to the app-facing outbound listener, and
//! h2 over mTLS (the client's own SVID, ALPN `h2`) to the inbound one.
//! One kind sends a HEADERS frame one byte a second; the other sends a
//! HEADERS frame without END_HEADERS whole, then a CONTINUATION frame one
//! byte a second. Each connection is closed at the deadline (not before,
//! long before any idle timeout), counted as `h2_header_timeout` and
//! logged, while good HTTP/2 clients on other connections are served.
//! A peer trickling HEADERS on a `tcp` port's tunnels-only mesh connection
//! (served on h2 directly) is closed at the same deadline. The injector's
//! webhook (hyper's HTTP/2 server, too) closes a trickling client at its
//! own 10 s deadline; the gateway serves through the same wrapper.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;
mod inject_support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::mesh::*;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const DEADLINE: Duration = Duration::from_secs(2);
/// The error the access log gives a connection the deadline closed.
const BREACH: &str = "HTTP/2 frame or header block not complete within the header timeout";
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

/// One frame on stream `stream`.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK for `GET http://app/ok` (static-table indices, a literal
/// `:authority`).
const BLOCK: &[u8] = &[
    0x82, 0x86, 0x04, 0x03, b'/', b'o', b'k', 0x41, 0x03, b'a', b'p', b'p',
];

/// What a trickling client sends at once, and then a byte a second.
struct Trickle {
    at_once: Vec<u8>,
    slowly: Vec<u8>,
}

/// The preface and an empty SETTINGS, then a whole HEADERS frame slowly.
fn slow_headers() -> Trickle {
    let mut at_once = PREFACE.to_vec();
    at_once.extend(frame(0x4, 0, 0, &[]));
    Trickle {
        at_once,
        slowly: frame(HEADERS, END_STREAM | END_HEADERS, 1, BLOCK),
    }
}

/// The preface, SETTINGS and a HEADERS frame without END_HEADERS at once,
/// then the CONTINUATION frame that would end the block, slowly.
fn slow_continuation() -> Trickle {
    let mut at_once = PREFACE.to_vec();
    at_once.extend(frame(0x4, 0, 0, &[]));
    at_once.extend(frame(HEADERS, END_STREAM, 1, &BLOCK[..5]));
    Trickle {
        at_once,
        slowly: frame(CONTINUATION, END_HEADERS, 1, &BLOCK[5..]),
    }
}

/// Sends `t` on `s`; how long after the header block's first byte the
/// proxy closed the connection (None: still open when the block was sent
/// whole, some 20 s on).
async fn trickle<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, t: Trickle) -> Option<Duration> {
    let started = Instant::now();
    s.write_all(&t.at_once).await.ok()?;
    let mut buf = [0u8; 512];
    for byte in &t.slowly {
        if s.write_all(std::slice::from_ref(byte)).await.is_err() {
            return Some(started.elapsed());
        }
        let wait = tokio::time::sleep(Duration::from_secs(1));
        tokio::pin!(wait);
        loop {
            tokio::select! {
                read = s.read(&mut buf) => match read {
                    // The server's SETTINGS and its ACK of ours.
                    Ok(n) if n > 0 => {}
                    _ => return Some(started.elapsed()),
                },
                () = &mut wait => break,
            }
        }
    }
    None
}

/// An HTTP/2 app (h2c): 200 `ok` to every request.
async fn h2_app() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let svc = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                    Bytes::from_static(b"ok"),
                )))
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc),
            );
        }
    });
    addr
}

/// One GET over HTTP/2 on `io`: the status and body.
async fn get<I>(io: I) -> (u16, Bytes)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("http://app/ok")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

/// An mTLS connection to the inbound sidecar as the mesh's client
/// workload, speaking `h2` (an app's HTTP/2, not a peer sidecar's).
async fn mtls(mesh: &Mesh) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    mtls_alpn(mesh, b"h2").await
}

/// As [`mtls`], offering `alpn` only.
async fn mtls_alpn(
    mesh: &Mesh,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let leaf = mesh.pki.leaf(CLIENT_ID);
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(common::any_server::AnyServer))
        .with_client_auth_cert(leaf.chain.clone(), leaf.key())
        .unwrap();
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = tokio::net::TcpStream::connect(mesh.inbound).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn));
    tls
}

fn refusals(sidecar: &Sidecar, direction: &str) -> f64 {
    metric_value(
        &sidecar.metrics(),
        &format!(
            "stepmesh_http_refusals_total{{direction=\"{direction}\",reason=\"h2_header_timeout\"}}"
        ),
    )
}

#[test]
fn http2_clients_trickling_a_header_block_are_closed_at_the_deadline() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let app = rt.block_on(h2_app());
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "trustDomain: mesh.test\ninbound:\n  ports:\n    - port: {port}\n      protocol: http\n      allow: [{{from: [\"spiffe://mesh.test/*\"]}}]\n"
        ),
    )
    .unwrap();
    let timeout = ["--header-timeout".to_owned(), "2s".to_owned()];
    let mut server = vec!["--policy".to_owned(), policy.display().to_string()];
    server.extend(timeout.iter().cloned());
    let mesh = Mesh::start_on(port, app, &server, &timeout);

    rt.block_on(async {
        let to = mesh.outbound;
        let outbound = move |t| async move {
            let tcp = tokio::net::TcpStream::connect(to).await.unwrap();
            trickle(tcp, t).await
        };
        let slow = [
            ("outbound HEADERS", tokio::spawn(outbound(slow_headers()))),
            (
                "outbound CONTINUATION",
                tokio::spawn(outbound(slow_continuation())),
            ),
            (
                "inbound HEADERS",
                tokio::spawn(trickle(mtls(&mesh).await, slow_headers())),
            ),
            (
                "inbound CONTINUATION",
                tokio::spawn(trickle(mtls(&mesh).await, slow_continuation())),
            ),
        ];
        // While they trickle: good clients on other connections.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let tcp = tokio::net::TcpStream::connect(mesh.outbound).await.unwrap();
        assert_eq!(
            get(tcp).await,
            (200, Bytes::from_static(b"ok")),
            "outbound h2c"
        );
        assert_eq!(
            get(mtls(&mesh).await).await,
            (200, Bytes::from_static(b"ok")),
            "inbound h2"
        );
        for (what, task) in slow {
            let closed = task.await.unwrap();
            println!("{what}: closed after {closed:?}");
            let closed = closed.unwrap_or_else(|| panic!("{what}: never closed"));
            assert!(
                closed >= DEADLINE,
                "{what}: closed before the deadline ({closed:?})"
            );
            // The deadline is checked on a timer: about 2 s, never the
            // idle timeout (1 h) nor the ~15 s the block took to trickle.
            assert!(closed < DEADLINE * 4, "{what}: closed late ({closed:?})");
        }
        // A good client still gets served after them.
        let tcp = tokio::net::TcpStream::connect(mesh.outbound).await.unwrap();
        assert_eq!(get(tcp).await.0, 200, "outbound h2c after");
    });
    assert_eq!(
        refusals(&mesh.client, "outbound"),
        2.0,
        "{}",
        mesh.client.metrics()
    );
    assert_eq!(
        refusals(&mesh.server, "inbound"),
        2.0,
        "{}",
        mesh.server.metrics()
    );
    // The client sidecar's one mesh connection (the good requests') was
    // not closed with them: the server accepted it and our three.
    assert_eq!(
        inbound_handshakes_of(&mesh.server),
        4.0,
        "{}",
        mesh.server.metrics()
    );
    // The connections' own lines and error counts say why they ended.
    for (sidecar, direction) in [(&mesh.client, "outbound"), (&mesh.server, "inbound")] {
        let ended = || {
            sidecar
                .access_log()
                .iter()
                .filter(|l| l["direction"] == direction && l["error"] == BREACH)
                .count()
        };
        eventually("the access-log lines", || (ended() >= 2).then_some(()));
        assert_eq!(ended(), 2, "{direction}: {:?}", sidecar.access_log());
        let errors = sidecar.metric(&format!(
            "stepmesh_connection_errors_total{{direction=\"{direction}\",reason=\"h2_header_timeout\"}}"
        ));
        assert_eq!(errors, 2.0, "{}", sidecar.metrics());
    }
    for sidecar in [&mesh.client, &mesh.server] {
        let breaches = || {
            sidecar
                .logs()
                .iter()
                .filter(|l| {
                    l["message"].as_str().is_some_and(|m| {
                        m.contains("within the header timeout: closing the connection")
                    })
                })
                .count()
        };
        eventually("the breaches' log lines", || {
            (breaches() >= 2).then_some(())
        });
        assert_eq!(breaches(), 2, "one log line per closed connection");
    }
}

#[test]
fn a_peer_trickling_headers_on_a_tcp_ports_tunnels_only_connection_is_closed_at_the_deadline() {
    // A `tcp` port's mesh connection (ALPN `stepmesh/tunnel`) is served on
    // h2 directly, under the same deadline as the hyper-served ones.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        l4_policy(port, "enforce", &["spiffe://mesh.test/*"]),
    )
    .unwrap();
    let mut server = vec!["--policy".to_owned(), policy.display().to_string()];
    server.extend(["--header-timeout".to_owned(), "2s".to_owned()]);
    let mesh = Mesh::start_on(port, echo_server(), &server, &[]);
    let closed = rt.block_on(async {
        let tls = mtls_alpn(&mesh, stepmesh::http::TUNNEL_ALPN).await;
        trickle(tls, slow_headers()).await
    });
    let closed = closed.expect("the slow peer's connection is closed");
    println!("tunnels-only HEADERS: closed after {closed:?}");
    assert!(
        closed >= DEADLINE,
        "closed before the deadline ({closed:?})"
    );
    assert!(closed < DEADLINE * 4, "closed late ({closed:?})");
    assert_eq!(
        refusals(&mesh.server, "inbound"),
        1.0,
        "{}",
        mesh.server.metrics()
    );
}

#[tokio::test]
async fn the_webhook_closes_a_trickling_http2_client_at_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let pki = inject_support::pki(dir.path(), "webhook");
    let webhook = inject_support::Webhook::start(&pki.cert, &pki.key, &[]);
    let tls = inject_support::client_config(&pki.ca_pem);
    let tcp = tokio::net::TcpStream::connect(webhook.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
        .unwrap();
    let closed = trickle(conn, slow_headers()).await;
    // The webhook's header deadline (HTTP/1's too) is 10 s.
    let closed = closed.expect("the webhook kept a trickling client past its block");
    assert!(
        closed >= Duration::from_secs(10) && closed < Duration::from_secs(16),
        "closed {closed:?} after the header block's first byte"
    );
    let (status, body) =
        inject_support::request(webhook.addr, tls, "GET", "/metrics", None, Vec::new())
            .await
            .unwrap();
    assert_eq!(status, 200);
    let metrics = String::from_utf8(body).unwrap();
    assert!(
        metrics.contains("stepmesh_injector_h2_header_timeouts_total 1"),
        "{metrics}"
    );
}
