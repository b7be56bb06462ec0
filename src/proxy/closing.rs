//! How an inbound HTTP connection ends when a policy or trust change
//! denies it (`reauth`): the change is watched beside the serving loop,
//! not inside it (the HTTP/1 relay looks at its stop future only between
//! requests: a WebSocket or an endless answer never let it see one). On a
//! denial the connection's [`CloseSignal`] is set: the serving loop ends
//! gracefully as for a drain, a request that still arrives is answered
//! `403`, and the connection is closed once `REVOKED_GRACE` has passed,
//! whatever it carries.

use std::future::Future;
use std::pin::{pin, Pin};
use std::task::Poll;
use std::time::Duration;

use super::conn::{InboundContext, Outcome, Shared};
use super::reauth::Revoked;
use crate::net::close_signal::CloseSignal;

/// How long an inbound HTTP connection a change denied has for the
/// requests in flight before it is closed: a WebSocket, a response
/// streamed without end, or an HTTP/2 client that never acknowledges the
/// GOAWAY, no longer outlives a revocation.
pub const REVOKED_GRACE: Duration = Duration::from_secs(5);

/// The stop future of a revocable connection's serving loop: the process
/// draining, or `closing` set.
pub(super) async fn drained_or_closing(shared: &Shared, closing: &CloseSignal) {
    tokio::select! {
        () = shared.http.drained() => {}
        () = closing.wait() => {}
    }
}

/// Runs `serve` (stopped by [`drained_or_closing`] on `closing`) while
/// watching `ctx`'s grant: a change that denies the connection sets
/// `closing` and starts `REVOKED_GRACE`, at whose end `serve` is dropped
/// (the connection closed). The access-log outcome says why.
pub(super) async fn revocable<F: Future<Output = Outcome>>(
    shared: &Shared,
    ctx: &InboundContext,
    closing: &CloseSignal,
    serve: F,
) -> Outcome {
    let mut serve = pin!(serve);
    let mut watch = pin!(ctx.grant.revoked(shared, ctx));
    // The generation `watch` was last polled at: it is polled again only
    // once that changed (one atomic load per wake-up). Polled at every
    // wake-up, its `Notify` took a lock per poll, three per request.
    // Skipping is safe: a task's waker stays the same, and a bump wakes it.
    let mut watched_at: Option<u64> = None;
    let mut revoked: Option<Revoked> = None;
    // Made only once the connection is closing.
    let mut grace: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let outcome = std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = serve.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        if revoked.is_none() {
            let now = shared.reauth.generation();
            if watched_at == Some(now) {
                return Poll::Pending;
            }
            watched_at = Some(now);
            let Poll::Ready(denied) = watch.as_mut().poll(cx) else {
                return Poll::Pending;
            };
            revoked = Some(denied);
            // Wakes the serving loop's stop future: polled again, it
            // ends gracefully.
            closing.set();
        }
        let grace = grace.get_or_insert_with(|| Box::pin(tokio::time::sleep(REVOKED_GRACE)));
        grace.as_mut().poll(cx).map(|()| None)
    })
    .await;
    let mut outcome = outcome.unwrap_or_default();
    if let Some(revoked) = revoked {
        if outcome.error.is_none() {
            outcome.error = Some(("revoked", revoked.to_string()));
        }
    }
    outcome
}
