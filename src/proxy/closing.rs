//! How an inbound HTTP connection ends when a policy or trust change
//! denies it (`reauth`): gracefully, a request that still arrives answered
//! `403`, and closed once `REVOKED_GRACE` has passed, whatever it carries.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::conn::{InboundContext, Outcome, Shared};

/// How long an inbound HTTP connection a change denied has for the
/// requests in flight before it is closed: a WebSocket, a response
/// streamed without end, or an HTTP/2 client that never acknowledges the
/// GOAWAY, no longer outlives a revocation.
pub const REVOKED_GRACE: Duration = Duration::from_secs(5);

/// What ends an inbound HTTP connection gracefully (in-flight requests
/// finish, no new ones are taken): the process draining, or a policy or
/// trust bundle change denying it (then `revoked` says why, and `closing`
/// is set: an HTTP request that still arrives is answered `403`).
pub(super) async fn drain_or_revoked(
    shared: &Shared,
    ctx: &InboundContext,
    closing: &AtomicBool,
    revoked: &mut Option<super::reauth::Revoked>,
) {
    tokio::select! {
        () = shared.http.drained() => {}
        denied = ctx.grant.revoked(shared, ctx) => {
            closing.store(true, Ordering::Release);
            *revoked = Some(denied);
        }
    }
}

/// Runs `serve` to its end, or until `REVOKED_GRACE` after `closing` is
/// set (by `serve`'s own stop future: a poll that sets it is followed by
/// the check below, so no wake-up is missed); `None` when cut short. The
/// timer exists only once the connection is closing.
pub(super) async fn within_grace<F: Future>(serve: F, closing: &AtomicBool) -> Option<F::Output> {
    let mut serve = std::pin::pin!(serve);
    let mut grace: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    std::future::poll_fn(|cx| {
        if let std::task::Poll::Ready(out) = serve.as_mut().poll(cx) {
            return std::task::Poll::Ready(Some(out));
        }
        if !closing.load(Ordering::Acquire) {
            return std::task::Poll::Pending;
        }
        let grace = grace.get_or_insert_with(|| Box::pin(tokio::time::sleep(REVOKED_GRACE)));
        grace.as_mut().poll(cx).map(|()| None)
    })
    .await
}

/// The access-log outcome of an HTTP connection a change closed (`None`:
/// closed at the end of its grace).
pub(super) fn with_revoked(
    outcome: Option<Outcome>,
    revoked: Option<super::reauth::Revoked>,
) -> Outcome {
    let mut outcome = outcome.unwrap_or_default();
    if let Some(revoked) = revoked {
        if outcome.error.is_none() {
            outcome.error = Some(("revoked", revoked.to_string()));
        }
    }
    outcome
}
