//! What a client connection may hold of the gateway before any token is
//! checked (src/gateway/conn.rs): a silent connection is closed after
//! `--idle-timeout`, whichever protocol its TLS handshake chose, and one
//! source address holds at most `--max-connections-per-source`. A real
//! gateway process; the API server behind it is never reached.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::gateway::{idp_with_jwks, Gateway};
use common::mesh::{eventually, http_get, metric_value};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

/// `--idle-timeout` of the gateway under test.
const IDLE: Duration = Duration::from_secs(2);

fn gateway(extra: &[&str]) -> Gateway {
    let (_idp, jwks) = idp_with_jwks("https://idp.example.com");
    let policy = format!(
        "trustDomain: example.org\n\
         stepUp:\n  providers:\n    corp:\n      issuer: https://idp.example.com\n      \
         jwks: {{file: {}}}\n      audiences: [kubectl]\n      algorithms: [ES256]\n\
         kubernetes:\n  authentication: {{provider: corp, usernameClaim: email}}\n  rules: []\n",
        jwks.display()
    );
    Gateway::spawn("not-a-token", "https://127.0.0.1:9", None, &policy, extra)
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A client of the gateway's serving CA, offering `alpn`.
fn client_config(gw: &Gateway, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(gw.ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A TLS connection to the gateway offering `alpn`, handshake done.
fn connect(gw: &Gateway, alpn: &[&[u8]]) -> std::io::Result<Tls> {
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut conn = rustls::ClientConnection::new(client_config(gw, alpn), name).unwrap();
    let mut tcp = TcpStream::connect(("127.0.0.1", gw.port))?;
    tcp.set_read_timeout(Some(Duration::from_secs(20)))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)?;
    }
    Ok(rustls::StreamOwned::new(conn, tcp))
}

/// How long until the gateway closes `tls` (read returns end of stream or
/// an error other than the 20 s read timeout).
fn closed_after(tls: &mut Tls, since: Instant) -> Duration {
    let mut buf = [0; 64];
    loop {
        match tls.read(&mut buf) {
            Ok(0) => return since.elapsed(),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                panic!("still open after the 20 s read timeout")
            }
            Err(_) => return since.elapsed(),
        }
    }
}

fn refused(gw: &Gateway, reason: &str) -> f64 {
    let admin = SocketAddr::from(([127, 0, 0, 1], gw.admin_port));
    let (status, body) = http_get(admin, "/metrics");
    assert_eq!(status, 200);
    metric_value(
        &body,
        &format!(r#"stepmesh_gateway_connections_refused_total{{reason="{reason}"}}"#),
    )
}

#[test]
fn a_silent_connection_is_closed_whatever_protocol_it_chose() {
    let gw = gateway(&["--idle-timeout", "2s"]);
    for alpn in [&[b"h2".as_slice()][..], &[b"http/1.1"], &[]] {
        let start = Instant::now();
        let mut tls = connect(&gw, alpn).unwrap();
        let closed = closed_after(&mut tls, start);
        assert!(
            closed >= IDLE / 2 && closed < IDLE + Duration::from_secs(8),
            "ALPN {alpn:?}: closed after {closed:?}"
        );
    }
    // A client that asks is answered, on a connection the same deadline
    // then closes once it goes quiet.
    let start = Instant::now();
    let mut tls = connect(&gw, &[b"http/1.1"]).unwrap();
    tls.write_all(b"GET /version HTTP/1.1\r\nHost: gw\r\n\r\n")
        .unwrap();
    let mut head = [0; 12];
    tls.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 401", "no token: refused, not dropped");
    let closed = closed_after(&mut tls, start);
    assert!(
        closed < IDLE + Duration::from_secs(8),
        "closed after {closed:?}"
    );
}

#[test]
fn one_source_address_holds_at_most_its_cap() {
    let gw = gateway(&["--idle-timeout", "4s", "--max-connections-per-source", "2"]);
    let held: Vec<Tls> = (0..2).map(|_| connect(&gw, &[b"h2"]).unwrap()).collect();
    let third = connect(&gw, &[b"h2"]);
    assert!(
        third.is_err(),
        "a third connection from 127.0.0.1 at a cap of two"
    );
    eventually("the refusal counted", || {
        (refused(&gw, "source_limit") == 1.0).then_some(())
    });
    assert_eq!(refused(&gw, "connection_limit"), 0.0);
    // Places come back when connections end.
    drop(held);
    eventually("a place again", || connect(&gw, &[b"h2"]).ok());
}

/// A TLS connection to the gateway with ALPN h2, for the h2 crate.
async fn h2_tls(gw: &Gateway) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    tokio_rustls::TlsConnector::from(client_config(gw, &[b"h2"]))
        .connect(name, tcp)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_client_that_never_takes_its_refusal_does_not_keep_its_connection() {
    let gw = gateway(&["--idle-timeout", "2s"]);
    // A window of 0: the gateway's 401 head goes out, its body never can.
    let (client, conn) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, bytes::Bytes>(h2_tls(&gw).await)
        .await
        .unwrap();
    let start = Instant::now();
    let conn = tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = http::Request::get(format!("https://127.0.0.1:{}/version", gw.port))
        .body(())
        .unwrap();
    let (answer, _) = client.send_request(req, true).unwrap();
    let answer = answer.await.unwrap();
    assert_eq!(answer.status(), 401, "no token: refused");
    // Closed once idle (2 s), after the grace a closing connection gets
    // (10 s), not held for as long as the client keeps the window shut.
    let ended = tokio::time::timeout(Duration::from_secs(30), conn).await;
    assert!(ended.is_ok(), "still open after 30 s");
    assert!(
        start.elapsed() < Duration::from_secs(25),
        "{:?}",
        start.elapsed()
    );
}
