//! A real outbound sidecar's tunnels (opaque TCP on a `tcp` port's
//! tunnels-only mesh connection, h2 directly) against a stand-in peer
//! sidecar that misbehaves on purpose: an h2 server with the peer's SVID
//! and ALPN `stepmesh/tunnel` that refuses its first CONNECT stream
//! (`REFUSED_STREAM`) and says GOAWAY once it has served two. Asserted:
//! the refused stream is opened again and the app connection is served;
//! after the GOAWAY new app connections get a new mesh connection while
//! the tunnels already open on the old one go on; no app connection sees
//! an error; each app connection is one processed stream. And a stand-in
//! for a sidecar from before tunnels had connections of their own on
//! `http` ports (it takes `stepmesh/h2+tunnel` only): the tunnels-only
//! handshake it refuses is tried once, and the tunnels ride its mesh
//! connection. And an older sidecar's `tcp` port, which takes 256 streams
//! a connection (ours take 1,024): 300 tunnels take two connections; a
//! peer that takes 8 streams: 4 tunnels a connection. And
//! a peer whose node vanishes (it stops reading, nothing closes): the
//! mesh connection's pings go unanswered and its tunnels end.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::mesh::{echo, outbound_args, peer_acceptor, Sidecar, PATIENCE, SERVER_ID};
use stepmesh::http::{MESH_TUNNEL_ALPN, TUNNEL_ALPN};
use stepmesh_ca::testing::Pki;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// What the stand-in saw.
#[derive(Default)]
struct Seen {
    accepts: AtomicUsize,
    refused: AtomicUsize,
    served: AtomicUsize,
    /// Handshakes that failed (no ALPN in common).
    handshakes_failed: AtomicUsize,
}

/// Accepts connections with `acceptor`, counted in `seen` (a failed
/// handshake too), and serves each with `serve`: its TLS stream, what the
/// stand-in saw, and whether it is the stand-in's first connection.
async fn listen<F, Fut>(acceptor: TlsAcceptor, seen: Arc<Seen>, serve: F) -> SocketAddr
where
    F: Fn(TlsStream<tokio::net::TcpStream>, Arc<Seen>, bool) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serve = Arc::new(serve);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let first = seen.accepts.fetch_add(1, Ordering::SeqCst) == 0;
            let (acceptor, seen, serve) = (acceptor.clone(), seen.clone(), serve.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    seen.handshakes_failed.fetch_add(1, Ordering::SeqCst);
                    return;
                };
                serve(tls, seen, first).await;
            });
        }
    });
    addr
}

/// The stand-in peer sidecar: its first connection refuses its first
/// stream, serves the next two (echoing their bytes) and then says GOAWAY
/// (gracefully: the streams open go on); later connections serve all.
async fn stand_in(pki: &Pki, seen: Arc<Seen>) -> SocketAddr {
    let acceptor = peer_acceptor(pki, SERVER_ID, TUNNEL_ALPN);
    listen(acceptor, seen, |tls, seen, first| async move {
        let mut conn = h2::server::handshake(tls).await.unwrap();
        let mut streams = 0;
        while let Some(Ok((req, mut respond))) = conn.accept().await {
            streams += 1;
            assert_eq!(req.method(), http::Method::CONNECT);
            if first && streams == 1 {
                seen.refused.fetch_add(1, Ordering::SeqCst);
                respond.send_reset(h2::Reason::REFUSED_STREAM);
                continue;
            }
            seen.served.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(echo_stream(req.into_body(), respond));
            if first && streams == 3 {
                conn.graceful_shutdown();
            }
        }
    })
    .await
}

/// A stand-in for an older peer sidecar's port (`alpn`: the one ALPN it
/// takes), which takes 256 streams on a connection, as every sidecar before
/// tunnels-only connections took 1,024: every CONNECT stream echoed.
async fn older_peer(pki: &Pki, seen: Arc<Seen>, alpn: &[u8]) -> SocketAddr {
    peer_taking(pki, seen, alpn, 256).await
}

/// A stand-in peer that takes `streams` streams on a connection (its
/// `SETTINGS`) on ALPN `alpn`: every CONNECT stream echoed.
async fn peer_taking(pki: &Pki, seen: Arc<Seen>, alpn: &[u8], streams: u32) -> SocketAddr {
    let acceptor = peer_acceptor(pki, SERVER_ID, alpn);
    listen(acceptor, seen, move |tls, seen, _| async move {
        let mut conn = h2::server::Builder::new()
            .max_concurrent_streams(streams)
            .handshake(tls)
            .await
            .unwrap();
        while let Some(Ok((req, respond))) = conn.accept().await {
            assert_eq!(req.method(), http::Method::CONNECT);
            seen.served.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(echo_stream(req.into_body(), respond));
        }
    })
    .await
}

/// A stand-in peer whose node vanishes once it has echoed its first
/// tunnel's first bytes: its connection stays open and is never read
/// again (no answer to a PING, no FIN, no reset).
async fn vanishing_peer(pki: &Pki, seen: Arc<Seen>) -> SocketAddr {
    let acceptor = peer_acceptor(pki, SERVER_ID, TUNNEL_ALPN);
    listen(acceptor, seen, |tls, seen, _| async move {
        let mut conn = h2::server::handshake(tls).await.unwrap();
        let Some(Ok((req, mut respond))) = conn.accept().await else {
            return;
        };
        seen.served.fetch_add(1, Ordering::SeqCst);
        let mut send = respond
            .send_response(http::Response::new(()), false)
            .unwrap();
        let mut body = req.into_body();
        let echoed = async {
            let data = body.data().await.unwrap().unwrap();
            send.send_data(data, false).unwrap();
        };
        // The connection is driven while the bytes come in and go back.
        tokio::select! {
            _ = conn.accept() => return,
            () = echoed => {}
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), conn.accept()).await;
        // Gone: everything held, nothing polled again.
        std::future::pending::<()>().await;
        drop((conn, body, send));
    })
    .await
}

/// Answers `200` and sends back what the stream carries, to its end.
async fn echo_stream(mut body: h2::RecvStream, mut respond: h2::server::SendResponse<Bytes>) {
    let mut send = respond
        .send_response(http::Response::new(()), false)
        .unwrap();
    while let Some(Ok(data)) = body.data().await {
        let _ = body.flow_control().release_capacity(data.len());
        if send.send_data(data, false).is_err() {
            return;
        }
    }
    let _ = send.send_data(Bytes::new(), true);
}

/// An app connection through the outbound sidecar, checked with one echo.
fn app_connection(outbound: SocketAddr, msg: &[u8]) -> TcpStream {
    let mut conn = TcpStream::connect(outbound).unwrap();
    conn.set_read_timeout(Some(PATIENCE)).unwrap();
    assert_eq!(echo(&mut conn, msg), msg);
    conn
}

/// `n` app connections through `outbound`, each echoed as it opens and
/// again once all are open (every tunnel still carries bytes).
fn open_all(outbound: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut conns: Vec<TcpStream> = (0..n)
        .map(|i| app_connection(outbound, format!("\0app connection {i}").as_bytes()))
        .collect();
    for (i, conn) in conns.iter_mut().enumerate() {
        let msg = format!("again {i}");
        assert_eq!(echo(conn, msg.as_bytes()), msg.as_bytes());
    }
    conns
}

/// Asserts that no app connection of `client` failed; its metrics.
fn no_app_connection_failed(client: &Sidecar) -> String {
    let metrics = client.metrics();
    assert!(
        !metrics.contains("stepmesh_connection_errors_total{"),
        "no app connection failed:\n{metrics}"
    );
    metrics
}

/// A real outbound sidecar towards a stand-in peer, and what it saw.
struct Setup {
    client: Sidecar,
    outbound: SocketAddr,
    seen: Arc<Seen>,
    _dir: tempfile::TempDir,
    /// Runs the stand-in.
    _rt: tokio::runtime::Runtime,
}

/// Starts the stand-in (`stand_in`: it listens and returns where) and an
/// outbound sidecar towards it.
fn start(stand_in: impl FnOnce(&tokio::runtime::Runtime, &Pki, Arc<Seen>) -> SocketAddr) -> Setup {
    start_with(stand_in, &[])
}

/// [`start`], the sidecar given `flags` too.
fn start_with(
    stand_in: impl FnOnce(&tokio::runtime::Runtime, &Pki, Arc<Seen>) -> SocketAddr,
    flags: &[&str],
) -> Setup {
    let pki = Pki::new("mesh.test");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let seen = Arc::new(Seen::default());
    let peer = stand_in(&rt, &pki, seen.clone());
    let dir = tempfile::tempdir().unwrap();
    let mut args = outbound_args(dir.path(), &pki, peer);
    args.extend(flags.iter().map(|f| f.to_string()));
    let client = Sidecar::spawn(&args);
    client.wait_ready();
    let outbound = client.listener("outbound");
    Setup {
        client,
        outbound,
        seen,
        _dir: dir,
        _rt: rt,
    }
}

#[test]
fn refused_and_going_away_tunnels_are_opened_again_and_open_ones_go_on() {
    let setup = start(|rt, pki, seen| rt.block_on(stand_in(pki, seen)));
    let (client, outbound, seen) = (&setup.client, setup.outbound, &setup.seen);

    // Not HTTP (first byte 0): the outbound side takes the tunnel at once.
    let mut a = app_connection(outbound, b"\0first: refused once");
    assert_eq!(seen.refused.load(Ordering::SeqCst), 1);
    let mut b = app_connection(outbound, b"\0second: then GOAWAY");
    // The GOAWAY reaches the outbound side: the next app connection takes
    // a new mesh connection (asked once more if it raced the GOAWAY).
    std::thread::sleep(Duration::from_millis(300));
    let mut c = app_connection(outbound, b"\0third: a new connection");
    let mut d = app_connection(outbound, b"\0fourth");
    assert_eq!(
        seen.accepts.load(Ordering::SeqCst),
        2,
        "a new mesh connection after the GOAWAY, one only"
    );
    // The tunnels on the connection that went away go on.
    assert_eq!(echo(&mut a, b"a again"), b"a again");
    assert_eq!(echo(&mut b, b"b again"), b"b again");
    assert_eq!(echo(&mut c, b"c again"), b"c again");
    assert_eq!(echo(&mut d, b"d again"), b"d again");
    assert_eq!(
        seen.served.load(Ordering::SeqCst),
        4,
        "each app connection one processed stream"
    );
    let allowed = client.metric(&format!(
        r#"stepmesh_connections_total{{direction="outbound",peer="{SERVER_ID}",decision="allow"}}"#
    ));
    assert_eq!(allowed, 4.0, "four tunnels to the peer");
    no_app_connection_failed(client);
}

#[test]
fn an_older_peer_refuses_the_tunnels_only_handshake_once_and_its_mesh_connection_carries_them() {
    let setup = start(|rt, pki, seen| rt.block_on(older_peer(pki, seen, MESH_TUNNEL_ALPN)));
    let (client, outbound, seen) = (&setup.client, setup.outbound, &setup.seen);

    let _conns = open_all(outbound, 5);
    assert_eq!(
        seen.handshakes_failed.load(Ordering::SeqCst),
        1,
        "the tunnels-only handshake is tried once, and the refusal remembered"
    );
    assert_eq!(
        seen.accepts.load(Ordering::SeqCst),
        2,
        "the refused handshake and one mesh connection"
    );
    assert_eq!(seen.served.load(Ordering::SeqCst), 5, "five tunnels");
    let metrics = no_app_connection_failed(client);
    assert!(
        !metrics.contains("stepmesh_tls_handshake_failures_total{"),
        "the refusal is not counted as a failed handshake:\n{metrics}"
    );
}

#[test]
fn an_older_peers_256_streams_are_kept_to_and_a_second_connection_carries_the_rest() {
    // An older sidecar's `tcp` port: tunnels-only, 256 streams, 240 of
    // them taken a connection. Were its limit not read from its SETTINGS,
    // h2 would hold the 257th tunnel until another stream ended, and that
    // app connection would hang.
    tunnels_take_connections(
        |rt, pki, seen| rt.block_on(older_peer(pki, seen, TUNNEL_ALPN)),
        300,
        2,
    );
}

/// Opens `tunnels` app connections through an outbound sidecar towards
/// a stand-in peer, each kept open, and asserts that they took `connections`
/// connections to it and were all served.
fn tunnels_take_connections(
    stand_in: impl FnOnce(&tokio::runtime::Runtime, &Pki, Arc<Seen>) -> SocketAddr,
    tunnels: usize,
    connections: usize,
) {
    let setup = start(stand_in);
    let (client, outbound, seen) = (&setup.client, setup.outbound, &setup.seen);

    let _conns = open_all(outbound, tunnels);
    assert_eq!(
        seen.accepts.load(Ordering::SeqCst),
        connections,
        "{tunnels} tunnels"
    );
    assert_eq!(seen.served.load(Ordering::SeqCst), tunnels);
    no_app_connection_failed(client);
}

#[test]
fn a_peer_that_takes_few_streams_still_carries_several_tunnels_a_connection() {
    // 8 streams: 4 tunnels a connection (half kept as headroom). With the
    // full headroom of 16 subtracted it would be none, and each app
    // connection would dial a connection of its own.
    tunnels_take_connections(
        |rt, pki, seen| rt.block_on(peer_taking(pki, seen, TUNNEL_ALPN, 8)),
        20,
        5,
    );
}

#[test]
fn a_peer_that_stops_answering_pings_ends_its_tunnels() {
    // Pinged every second, answers waited for 333 ms: the app connection
    // ends about 1.3 to 2.3 s after the peer went silent. Without the
    // pings it would wait for the idle timeout, an hour.
    let setup = start_with(
        |rt, pki, seen| rt.block_on(vanishing_peer(pki, seen)),
        &["--mesh-keepalive", "1s"],
    );
    let (client, outbound, seen) = (&setup.client, setup.outbound, &setup.seen);

    let mut conn = app_connection(outbound, b"\0hello before the node vanishes");
    assert_eq!(seen.served.load(Ordering::SeqCst), 1);
    let silent = std::time::Instant::now();
    let mut rest = Vec::new();
    // PATIENCE is the read timeout: a read that times out fails the test.
    let ended = std::io::Read::read_to_end(&mut conn, &mut rest);
    assert!(
        !matches!(&ended, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut),
        "the app connection still open after {:?}",
        silent.elapsed()
    );
    assert!(rest.is_empty(), "nothing more came: {rest:?}");
    let waited = silent.elapsed();
    assert!(
        waited < Duration::from_secs(5),
        "ended {waited:?} after the peer went silent"
    );
    client.wait_log("why the connection closed", |l| {
        l["message"]
            .as_str()
            .is_some_and(|m| m.contains("no answer to a ping in time"))
            .then_some(())
    });
}
