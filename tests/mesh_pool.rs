//! The outbound mesh pool against a stand-in peer sidecar (an HTTP/2 server
//! built on the h2 crate, real mTLS with the peer's SVID, ALPN
//! `stepmesh/h2`) that misbehaves on purpose: it goes away (GOAWAY) after a
//! few streams per connection, refuses streams (`REFUSED_STREAM`) or resets
//! a stream it has read. Asserted: what the peer did not process is sent
//! again and succeeds, exactly once per request; what it processed is never
//! sent twice and fails with a clear 502; racing callers open one
//! connection.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;
mod http_support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use http_support::app::{request, send, Body};
use http_support::{API, FRONTEND, TD};
use stepmesh::http::{HttpLayer, MESH_ALPN};
use stepmesh::policy::Policy;
use stepmesh_ca::testing::Pki;
use tokio::net::TcpListener;

/// What the stand-in peer does with a stream.
#[derive(Clone, Copy)]
struct Behaviour {
    /// Graceful GOAWAY once the first connection has accepted this many
    /// streams (a peer that drains; the next connection reaches one that
    /// does not).
    go_away_after: Option<usize>,
    /// How long an answer takes.
    answer_delay: Duration,
    /// How long the TLS handshake waits after the TCP accept (so that
    /// racing callers all arrive while the first dial is in progress).
    accept_delay: Duration,
}

impl Behaviour {
    const PLAIN: Behaviour = Behaviour {
        go_away_after: None,
        answer_delay: Duration::from_millis(20),
        accept_delay: Duration::ZERO,
    };
}

/// What the stand-in saw.
#[derive(Default)]
struct Seen {
    accepts: AtomicUsize,
    /// Connections the sidecar closed (or that failed).
    ended: AtomicUsize,
    /// Requests per path (each processed or refused stream counts).
    paths: Mutex<HashMap<String, usize>>,
}

impl Seen {
    fn count(&self, path: &str) -> usize {
        self.paths.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

/// A stand-in for a peer sidecar: mTLS as `API`, h2 server. Paths:
/// `/refuse-once/*` is refused the first time it is seen, `/refuse-always`
/// every time, `/reset-after-read` is read whole and then reset
/// (INTERNAL_ERROR: processed, not answered); anything else is answered
/// after `answer_delay` (`/slow*`: 4 s more) with
/// `seen:<path>:<request body bytes>`.
async fn stand_in(pki: &Pki, behaviour: Behaviour) -> (SocketAddr, Arc<Seen>) {
    let acceptor = common::mesh::peer_acceptor(pki, API, MESH_ALPN);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let stats = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let first = seen.accepts.fetch_add(1, Ordering::SeqCst) == 0;
            let go_away_after = behaviour.go_away_after.filter(|_| first);
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                tokio::time::sleep(behaviour.accept_delay).await;
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut conn) = h2::server::handshake(tls).await else {
                    return;
                };
                let mut accepted = 0;
                while let Some(Ok((req, respond))) = conn.accept().await {
                    accepted += 1;
                    if go_away_after == Some(accepted) {
                        conn.graceful_shutdown();
                    }
                    let delay = behaviour.answer_delay;
                    tokio::spawn(answer(req, respond, seen.clone(), delay));
                }
                seen.ended.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, stats)
}

async fn answer(
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    seen: Arc<Seen>,
    delay: Duration,
) {
    let path = req.uri().path().to_owned();
    let times = {
        let mut paths = seen.paths.lock().unwrap();
        let n = paths.entry(path.clone()).or_default();
        *n += 1;
        *n
    };
    if path == "/refuse-always" || (path.starts_with("/refuse-once/") && times == 1) {
        respond.send_reset(h2::Reason::REFUSED_STREAM);
        return;
    }
    let mut body = req.into_body();
    let mut received = 0;
    while let Some(Ok(chunk)) = body.data().await {
        received += chunk.len();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    if path == "/reset-after-read" {
        respond.send_reset(h2::Reason::INTERNAL_ERROR);
        return;
    }
    let slow = if path.starts_with("/slow") {
        Duration::from_secs(4)
    } else {
        Duration::ZERO
    };
    tokio::time::sleep(delay + slow).await;
    let Ok(mut stream) = respond.send_response(http::Response::new(()), false) else {
        return;
    };
    let _ = stream.send_data(Bytes::from(format!("seen:{path}:{received}")), true);
}

async fn outbound_to(pki: &Pki, peer: SocketAddr) -> SocketAddr {
    let me = pki.leaf(FRONTEND);
    let open = Policy::allow_authenticated(TD.parse().unwrap());
    http_support::start_outbound(pki, &me, http_support::layer(open), peer).await
}

fn post(path: &str, body: &'static [u8]) -> http::Request<Body> {
    request(true, "POST", path, &[], body)
}

fn get(path: &str) -> http::Request<Body> {
    let req = http::Request::builder()
        .method("GET")
        .uri(format!("http://api.test{path}"))
        .body(Full::new(Bytes::new()).boxed())
        .unwrap();
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_a_going_away_peer_did_not_process_are_sent_again_and_succeed() {
    let pki = Pki::new(TD);
    // The first connection says GOAWAY after 25 streams (answered after
    // 300 ms); 175 more requests come once it has said so.
    let (peer, seen) = stand_in(
        &pki,
        Behaviour {
            go_away_after: Some(25),
            answer_delay: Duration::from_millis(300),
            ..Behaviour::PLAIN
        },
    )
    .await;
    let outbound = outbound_to(&pki, peer).await;
    let started = std::time::Instant::now();
    let call = |i: usize| {
        let req = if i.is_multiple_of(2) {
            get(&format!("/item/{i}"))
        } else {
            post(&format!("/item/{i}"), b"0123456789")
        };
        tokio::spawn(send(outbound, true, req))
    };
    let mut calls: Vec<_> = (0..25).map(call).collect();
    while seen.paths.lock().unwrap().len() < 25 {
        assert!(started.elapsed() < Duration::from_secs(20), "25 streams");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    calls.extend((25..200).map(call));
    for (i, call) in calls.into_iter().enumerate() {
        let a = call.await.unwrap();
        let body = String::from_utf8_lossy(&a.body).into_owned();
        assert_eq!(a.status, 200, "request {i}: {body}");
        let len = if i.is_multiple_of(2) { 0 } else { 10 };
        assert_eq!(body, format!("seen:/item/{i}:{len}"), "request {i}");
    }
    for i in 0..200 {
        let path = format!("/item/{i}");
        assert_eq!(seen.count(&path), 1, "{path} processed exactly once");
    }
    let accepts = seen.accepts.load(Ordering::SeqCst);
    assert!(
        accepts >= 2,
        "the peer went away, so the pool reconnected ({accepts} connections)"
    );
    println!(
        "200 requests over {accepts} connections (GOAWAY after 25 streams) in {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_streams_are_sent_again_once_and_processed_ones_fail_with_a_clear_502() {
    let pki = Pki::new(TD);
    let (peer, seen) = stand_in(&pki, Behaviour::PLAIN).await;
    let outbound = outbound_to(&pki, peer).await;

    // Refused once: sent again with its (small, buffered) body.
    let a = send(outbound, true, post("/refuse-once/a", b"hello")).await;
    assert_eq!(a.status, 200);
    assert_eq!(&a.body[..], b"seen:/refuse-once/a:5");
    assert_eq!(seen.count("/refuse-once/a"), 2);
    let a = send(outbound, true, get("/refuse-once/b")).await;
    assert_eq!(a.status, 200);
    assert_eq!(seen.count("/refuse-once/b"), 2);

    // Refused every time: sent twice, then a 502 that says what failed.
    let a = send(outbound, true, get("/refuse-always")).await;
    assert_eq!(a.status, 502);
    assert_eq!(&a.body[..], b"the request to the destination failed\n");
    assert_eq!(seen.count("/refuse-always"), 2, "one retry, not more");

    // Processed, then reset: never sent again.
    let a = send(outbound, true, post("/reset-after-read", b"pay once")).await;
    assert_eq!(a.status, 502);
    assert_eq!(&a.body[..], b"the request to the destination failed\n");
    assert_eq!(
        seen.count("/reset-after-read"),
        1,
        "a processed request is not retried"
    );

    // None of that took the shared connection down.
    let a = send(outbound, true, get("/after")).await;
    assert_eq!(a.status, 200);
    assert_eq!(
        seen.accepts.load(Ordering::SeqCst),
        1,
        "one connection throughout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_callers_to_one_peer_open_one_connection() {
    let pki = Pki::new(TD);
    let (peer, seen) = stand_in(
        &pki,
        Behaviour {
            accept_delay: Duration::from_millis(200),
            ..Behaviour::PLAIN
        },
    )
    .await;
    let outbound = outbound_to(&pki, peer).await;
    // 64 app connections at once, each asking the empty pool for the peer.
    let calls: Vec<_> = (0..64)
        .map(|i| tokio::spawn(send(outbound, true, get(&format!("/race/{i}")))))
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap().status, 200);
    }
    assert_eq!(
        seen.accepts.load(Ordering::SeqCst),
        1,
        "64 racing callers, one connection accepted at the peer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unused_pooled_connection_is_let_go_after_its_last_stream_and_dialled_again() {
    let pki = Pki::new(TD);
    let (peer, seen) = stand_in(&pki, Behaviour::PLAIN).await;
    let open = Policy::allow_authenticated(TD.parse().unwrap());
    // Fresh: nothing else holds it.
    let layer = Arc::into_inner(http_support::layer(open))
        .unwrap()
        .with_mesh_pool_idle(Duration::from_secs(1));
    let layer = Arc::new(layer);
    tokio::spawn(HttpLayer::sweep_idle(Arc::downgrade(&layer)));
    let outbound = http_support::start_outbound(&pki, &pki.leaf(FRONTEND), layer, peer).await;

    // Swept every second: the pool lets the connection go about two
    // seconds in, while this request is still in flight; it finishes.
    let slow = send(outbound, true, get("/slow")).await;
    assert_eq!((slow.status, &slow.body[..]), (200, &b"seen:/slow:0"[..]));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while seen.ended.load(Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the unused connection was not closed after its last stream"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen.accepts.load(Ordering::SeqCst), 1);

    let next = send(outbound, true, get("/next")).await;
    assert_eq!(next.status, 200);
    assert_eq!(
        seen.accepts.load(Ordering::SeqCst),
        2,
        "the next request dials a new connection"
    );
}
