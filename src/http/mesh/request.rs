//! One request over the pool: a request as the app sent it made ready
//! for the mesh (a small body read whole so it can be sent again), its
//! sending with the one retry RFC 9113 §8.7 allows, and the reading of
//! h2's errors that decides that retry. The pool itself (`mesh.rs`) only
//! hands out connections.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Either};
use hyper::body::Incoming;

use super::{MeshPool, Pooled, Sender};
use crate::http::outbound::{MeshError, OutboundConn};
use crate::http::record::CountIn;

/// A request body as the mesh connection carries it: the app's, streamed,
/// or a small one read whole so that it can be sent again.
pub(crate) type MeshBody = Either<CountIn<Incoming>, Replay>;

/// Request bodies up to this size (known from `content-length`) are read
/// whole before sending, so that a request the peer refused can be sent
/// again. Larger or unsized (streaming) bodies, and those of requests that
/// wait for `100 Continue`, go out as they arrive and are not retried once
/// sent.
pub(crate) const REPLAY_LIMIT: u64 = 64 * 1024;

/// Why a mesh request got no response.
#[derive(Debug)]
pub(crate) enum SendError {
    /// No connection to the peer could be made.
    Unavailable(MeshError),
    /// The request failed on the connection (the peer may have seen it).
    Failed(hyper::Error),
}

/// A request as the app sent it, made ready for the mesh: the body read
/// whole when small enough to be sent again.
pub(crate) struct Outgoing {
    parts: http::request::Parts,
    /// The app's body while not yet sent, if it is sent as a stream.
    stream: Option<CountIn<Incoming>>,
    /// The body read whole, if it was small enough.
    replay: Option<Replay>,
}

impl Outgoing {
    /// Reads a small body whole (so the request can be retried); a large or
    /// streaming body stays a stream. Fails if the app's body fails.
    pub(crate) async fn new(
        parts: http::request::Parts,
        body: CountIn<Incoming>,
    ) -> Result<Outgoing, hyper::Error> {
        let small = body.size_hint().exact().is_some_and(|n| n <= REPLAY_LIMIT);
        // A client that waits for `100 Continue` sends no body before the
        // answer: reading it first would wait for ever.
        let waits = parts.headers.contains_key(http::header::EXPECT);
        let replayable = !waits && (small || body.is_end_stream());
        if parts.method == http::Method::CONNECT || !replayable {
            return Ok(Outgoing {
                parts,
                stream: Some(body),
                replay: None,
            });
        }
        let collected = body.collect().await?;
        let trailers = collected.trailers().cloned();
        let data = collected.to_bytes();
        let replay = Replay {
            data: (!data.is_empty()).then_some(data),
            trailers,
        };
        Ok(Outgoing {
            parts,
            stream: None,
            replay: Some(replay),
        })
    }

    /// A CONNECT request for a tunnel to `authority` (no body: the
    /// stream's data after the `200` is the tunnel's), sendable again.
    pub(crate) fn connect(authority: http::uri::Authority) -> Outgoing {
        let mut req = Request::new(());
        *req.method_mut() = http::Method::CONNECT;
        *req.uri_mut() = http::Uri::from(authority);
        *req.version_mut() = http::Version::HTTP_2;
        let (parts, ()) = req.into_parts();
        Outgoing {
            parts,
            stream: None,
            replay: Some(Replay::default()),
        }
    }

    /// The request of the first attempt.
    pub(crate) fn first(&mut self) -> Request<MeshBody> {
        match self.stream.take() {
            Some(stream) => {
                let headers = std::mem::take(&mut self.parts.headers);
                self.request(Either::Left(stream), headers)
            }
            None => {
                let replay = self.replay.clone().unwrap_or_default();
                self.request(Either::Right(replay), self.parts.headers.clone())
            }
        }
    }

    /// The request of a second attempt, if its body can be sent again.
    fn again(&self) -> Option<Request<MeshBody>> {
        let replay = self.replay.clone()?;
        Some(self.request(Either::Right(replay), self.parts.headers.clone()))
    }

    fn request(&self, body: MeshBody, headers: HeaderMap) -> Request<MeshBody> {
        let mut req = Request::new(body);
        *req.method_mut() = self.parts.method.clone();
        *req.uri_mut() = self.parts.uri.clone();
        *req.version_mut() = self.parts.version;
        *req.headers_mut() = headers;
        req
    }
}

/// Sends `out` to the peer over the pooled connection; `on_peer` learns
/// which connection (and peer identity) each attempt used. A request that
/// never reached the peer is sent once more, on a new connection when the
/// first is going away: one that hyper never wrote (the connection closed
/// first) always; one the peer refused (`REFUSED_STREAM`, or above a
/// `GOAWAY`'s last stream ID) when its body can be sent again.
pub(crate) async fn send(
    pool: &MeshPool,
    conn: &OutboundConn,
    out: &mut Outgoing,
    on_peer: &mut (dyn FnMut(&Pooled) + Send),
) -> Result<Response<Incoming>, SendError> {
    let mut avoid = None;
    let mut req = out.first();
    let mut retried = false;
    loop {
        let pooled = pool
            .get(conn, avoid)
            .await
            .map_err(SendError::Unavailable)?;
        on_peer(&pooled);
        let Sender::Hyper(mut send) = pooled.sender() else {
            // A tunnels-only connection (a `tcp` port's) takes no request.
            return Err(SendError::Unavailable(MeshError::NoMeshAlpn(
                conn.dst.clone(),
            )));
        };
        if let Err(e) = send.ready().await {
            // Closed before this request was handed to it: nothing sent.
            pool.retire(&conn.key, pooled.id);
            avoid = Some(pooled.id);
            if retried {
                return Err(SendError::Failed(e));
            }
            retried = true;
            continue;
        }
        let mut err = match send.try_send_request(req).await {
            Ok(resp) => return Ok(resp),
            Err(err) => err,
        };
        let unsent = err.take_message();
        let error = err.into_error();
        if send.is_closed() || peer_going_away(&error) {
            pool.retire(&conn.key, pooled.id);
            avoid = Some(pooled.id);
        }
        let next = match unsent {
            Some(unsent) => Some(unsent),
            None if never_processed(&error) => out.again(),
            None => None,
        };
        match next {
            Some(next) if !retried => {
                tracing::debug!(dst = %conn.dst, error = %error, "mesh request not processed by the peer: sent again");
                retried = true;
                req = next;
            }
            _ => return Err(SendError::Failed(error)),
        }
    }
}

fn h2_error(e: &hyper::Error) -> Option<&h2::Error> {
    std::error::Error::source(e).and_then(|s| s.downcast_ref::<h2::Error>())
}

/// The peer said GOAWAY: the connection takes no new streams.
pub(crate) fn peer_going_away(e: &hyper::Error) -> bool {
    h2_error(e).is_some_and(going_away)
}

/// As [`peer_going_away`], for h2's own error.
pub(crate) fn going_away(e: &h2::Error) -> bool {
    e.is_remote() && e.is_go_away()
}

/// The peer says it did not process the stream (RFC 9113 §8.7): it
/// refused it, or its GOAWAY's last stream ID is below it (h2 reports a
/// remote GOAWAY only to those streams; the ones at or below it end with
/// the connection's own error).
pub(crate) fn never_processed(e: &hyper::Error) -> bool {
    h2_error(e).is_some_and(not_processed)
}

/// As [`never_processed`], for h2's own error.
pub(crate) fn not_processed(e: &h2::Error) -> bool {
    e.is_remote() && (e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM))
}

/// A request body read whole, sent again as it was: data, then trailers.
#[derive(Clone, Default)]
pub(crate) struct Replay {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for Replay {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}
