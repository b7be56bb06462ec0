//! Calls in flight per source address, capped before a request's body is
//! read. tonic takes a message's declared size (up to the request limit)
//! and buffers it until it is whole, all before the handler, the source's
//! token bucket or authentication run: a client that starts calls and
//! never finishes their bodies held that memory for the call's timeout.
//! (Measured by review: 16 connections of 256 such calls took the CA from
//! 17 to 343 MB, past its 256 MiB limit.) Past the cap a call is answered
//! `RESOURCE_EXHAUSTED` at once, its body unread.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::conn::{SourceSlot, Sources};
use crate::service::ConnInfo;

/// Calls one source address may have in flight by default: a sidecar
/// makes one or two at a time, a node of masqueraded pods a few dozen.
pub const MAX_CALLS_PER_SOURCE: usize = 32;

/// The layer: one count of calls per source for the whole server.
#[derive(Debug, Clone)]
pub struct CallsPerSource {
    calls: Sources,
    cap: usize,
}

impl CallsPerSource {
    /// At most `cap` calls in flight per source address (0: no limit).
    pub fn new(cap: usize) -> CallsPerSource {
        CallsPerSource {
            calls: Sources::default(),
            cap: if cap == 0 { usize::MAX } else { cap },
        }
    }
}

impl<S> tower_layer::Layer<S> for CallsPerSource {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Counted<S> {
        Counted {
            inner,
            calls: self.calls.clone(),
            cap: self.cap,
        }
    }
}

/// A service whose calls are counted per source (see the module).
#[derive(Debug, Clone)]
pub struct Counted<S> {
    inner: S,
    calls: Sources,
    cap: usize,
}

impl<S, B, R> tower_service::Service<http::Request<B>> for Counted<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    // One box per call: the CA's calls are few, each a signature.
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let source = request
            .extensions()
            .get::<ConnInfo>()
            .and_then(|c| c.remote)
            .map(|r| r.ip().to_canonical());
        let slot = match source {
            Some(ip) => match SourceSlot::take(&self.calls, ip, self.cap) {
                Some(slot) => Some(slot),
                None => {
                    let refused = tonic::Status::resource_exhausted(format!(
                        "too many calls in flight from {ip} (at most {})",
                        self.cap
                    ));
                    return Box::pin(std::future::ready(Ok(refused.into_http())));
                }
            },
            None => None,
        };
        let call = self.inner.call(request);
        Box::pin(async move {
            let answer = call.await;
            drop(slot);
            answer
        })
    }
}
