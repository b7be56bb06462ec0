//! Each HTTP/2 stream the inbound side relays to an HTTP/1 app takes an app
//! connection of its own while its answer lasts: counted against the
//! process's `--max-connections` and the peer's `--max-connections-per-peer`
//! as a tunnel is (before, 256 streams per mesh connection, each with its
//! app connection, were outside the first; then one peer's streams could
//! still take all of it). Client → outbound HTTP layer → mesh HTTP/2 over
//! real mTLS → inbound HTTP layer → HTTP/1 app, in one process.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod http_support;

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use stepmesh::net::caps::{ConnectionBudget, PerKeyCap};
use stepmesh::policy::{Policy, SpiffeId};

use http_support::app::{request, send};
use http_support::{Pair, FRONTEND};

/// Two requests whose bodies stay open hold two app connections; a third
/// request is refused `503` naming `reason` while they do, and served once
/// they end. `full` says whether the limit is reached.
async fn third_refused_until_two_end(
    budget: Arc<ConnectionBudget>,
    peers: Arc<PerKeyCap<Arc<SpiffeId>>>,
    full: impl Fn() -> bool,
    reason: &str,
) -> Pair {
    let policy = Policy::allow_authenticated(http_support::TD.parse().unwrap());
    let inbound = http_support::layer_with_limits(policy, budget, peers);
    let pair = Pair::start_with(inbound, FRONTEND, false).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        // A body that stays open: the app reads it until it ends.
        let (tx, rx) =
            tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(1);
        tx.send(Ok(Frame::data(Bytes::from_static(b"x"))))
            .await
            .unwrap();
        let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed();
        let req = hyper::Request::post("/upload")
            .header("host", "api")
            .body(body)
            .unwrap();
        held.push((tx, tokio::spawn(send(pair.outbound, false, req))));
    }
    wait_until(full, "two held requests take two places").await;
    let fast = || {
        send(
            pair.outbound,
            false,
            request(false, "GET", "/fast", &[], b""),
        )
    };
    let over = fast().await;
    assert_eq!(over.status, 503, "a third app connection at a limit of two");
    assert!(
        String::from_utf8_lossy(&over.body).contains(reason),
        "{:?}",
        over.body
    );
    for (tx, answer) in held {
        drop(tx);
        assert_eq!(answer.await.unwrap().status, 200);
    }
    let again = fast().await;
    assert_eq!(again.status, 200, "the places are given back");
    pair
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_to_an_http1_app_count_against_the_connection_limit() {
    let budget = ConnectionBudget::new(2);
    let probe = budget.clone();
    third_refused_until_two_end(
        budget,
        PerKeyCap::new(0),
        move || probe.left() == 0,
        "the sidecar is at its connection limit",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_to_an_http1_app_count_against_their_peers_cap() {
    let peers = PerKeyCap::new(2);
    let probe = peers.clone();
    let frontend = Arc::new(SpiffeId::parse(FRONTEND).unwrap());
    let open = move || probe.open(&frontend);
    let full = open.clone();
    let pair = third_refused_until_two_end(
        ConnectionBudget::new(1000),
        peers,
        move || full() == 2,
        "the peer is at its connection limit",
    )
    .await;

    // A place is held while the answer streams, not only until its head:
    // the app answers `/held` with a head and a byte, and ends it when
    // told (HTTP/1 from the client too: an HTTP/2 client's requests go to
    // the app as HTTP/2).
    let call = tokio::spawn(send(
        pair.outbound,
        false,
        request(false, "GET", "/held", &[], b""),
    ));
    let app = &pair.app;
    let begun = || app.streams.load(std::sync::atomic::Ordering::SeqCst) > 0;
    wait_until(begun, "the answer never began").await;
    // The head is on its way back meanwhile: places given back at the head
    // would be gone by now.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert_eq!(open(), 1, "held while the answer streams");
    app.release.notify_one();
    assert_eq!(call.await.unwrap().status, 200);
    wait_until(|| open() == 0, "given back when the answer ends").await;
}

/// Waits up to 30 s for `done`, else fails with `what`.
async fn wait_until(done: impl Fn() -> bool, what: &str) {
    let started = std::time::Instant::now();
    while !done() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "{what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}
