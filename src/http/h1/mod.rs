//! HTTP/1.x proxying on the connection's own task, as lean as the L4 path:
//! one task per client connection, one upstream connection beside it, heads
//! parsed and rewritten, bodies relayed byte for byte through per-connection
//! buffers. No spawned tasks, channels or pools per request: at 1,000
//! requests/s the cost of a request is the code it touches, and this is the
//! least code that can still decide and rewrite each request.
//!
//! One request at a time (pipelined requests wait in the buffer), in order:
//! head → decision ([`Side::admit`]) → head and body upstream → response
//! head and body back. `Expect: 100-continue` waits for the upstream's
//! answer or the client's body, whichever comes first; `101 Switching
//! Protocols` after an `Upgrade` request turns the connection into an opaque
//! tunnel (WebSocket). Anything the framing rules refuse ends the connection
//! (400/502 when a response can still be written).

pub(crate) mod body;
mod buf;
mod fields;
mod framing;
mod idle;
mod local;
pub mod message;
mod pipe;
mod response;
mod side;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::time::Duration;

use http::{Method, StatusCode, Version};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use self::body::{BodyError, Remaining};
use self::buf::Buf;
use self::idle::Idle;
pub(crate) use self::message::RequestHead;
use self::message::{Framing, HeadError, ResponseHead};
use self::pipe::{pipe, pipe_detail, request_pipe_fail, write_flush, PipeError};
use self::response::{finish_response_head, restore_framing};
pub(crate) use self::side::{Relayed, Side};
use super::headers::strip_hop_by_hop;
use super::metrics::LastSeries;
use super::record::Exchange;
use super::{Local, Verdict};

/// Heads and small bodies are gathered into one write (one TLS record) up
/// to this size; larger bodies are written straight from the read buffer.
const COALESCE: usize = 16 * 1024;

/// Room a request's head is copied with, for what follows it in the same
/// buffer: the rewritten head's additions (inbound: XFCC, the step-up
/// subject), then the response head and a small body gathered with it.
/// Grown in steps these were one to three reallocations per request.
const OUT_ROOM: usize = 1024;

/// Why one exchange ended the connection.
enum Fail {
    /// The client's socket failed or it closed mid-message: nothing can be
    /// answered.
    Client(io::Error),
    /// The client sent something unparseable: answer 400 (431 for an
    /// oversized head) if possible.
    BadRequest(HeadError),
    /// A request body's framing is broken: answer 400.
    BadBody(BodyError),
    /// The upstream failed before a response head: answer 502.
    Upstream(String),
    /// The upstream failed after the response started: just close.
    UpstreamLate(String),
    /// Nothing moved for the idle timeout.
    Idle,
    /// A request head still incomplete at its deadline: answer 408.
    HeaderTimeout,
    /// A request body paused past its deadline: answer 408.
    BodyTimeout,
}

/// Relays HTTP/1.x requests from `client` (whose first bytes, read by
/// protocol detection, are `prefix`) until either side closes, the idle
/// timeout, or `drain` (then the connection closes after the response in
/// flight, or at once when idle). `upstream` is the connection to start
/// with, if any; afterwards it holds a connection still good for another
/// client (idle between messages, kept alive), or `None`. The caller
/// closes `client` (after parking `upstream`, so the next client finds it).
///
/// A connection between requests that holds no upstream (its upstream went
/// back to a pool) waits here in a small state: the relay's own state
/// (buffers, timer, the request in flight) is boxed and lives only while
/// requests come (see [`burst`]). An idle keep-alive connection is paid
/// for in its task's size.
///
/// A plain `fn` around an `async` block, not an `async fn`: an `async fn`
/// stores each argument twice (as given and as moved into its body),
/// and this state is what every idle connection holds.
pub(crate) fn relay<'a, S, C, D>(
    side: &'a S,
    client: &'a mut C,
    prefix: bytes::Bytes,
    upstream: &'a mut Option<S::Upstream>,
    idle: Duration,
    drain: D,
) -> impl Future<Output = Relayed> + Send + 'a
where
    S: Side,
    C: AsyncRead + AsyncWrite + Unpin + Send,
    D: Future<Output = ()> + Send + 'a,
{
    // Copied: the detection buffer is not kept for the connection's life.
    let mut cbuf = Buf::with_prefix(&prefix);
    drop(prefix);
    let mut drain = Box::pin(drain);
    async move {
        let mut kept = Kept {
            done: Relayed::default(),
            series: LastSeries::default(),
            idle: Idle::new(idle),
        };
        loop {
            let (ended, back) = Box::pin(burst(
                side,
                client,
                cbuf,
                upstream,
                idle,
                drain.as_mut(),
                kept,
            ))
            .await;
            kept = back;
            if ended {
                return kept.done;
            }
            cbuf = Buf::with_prefix(&[]);
            let woke = tokio::select! {
                biased;
                read = kept.idle.guard(cbuf.fill(client)) => read,
                () = side.gone() => return kept.done,
                // `burst` returns here only before the drain resolved.
                () = drain.as_mut() => return kept.done,
            };
            match woke {
                Some(Ok(n)) if n > 0 => {}
                // Closed or idle between requests: a clean end.
                Some(Ok(_)) | None => return kept.done,
                // As `Relay::fail` labels a client's failed read.
                Some(Err(e)) => {
                    kept.done.error = Some(Box::new(("client_io", e.to_string())));
                    return kept.done;
                }
            }
        }
    }
}

/// What a connection's relay keeps between its bursts of requests.
struct Kept {
    done: Relayed,
    /// The request-metric series of the last answer.
    series: LastSeries,
    /// The connection's one timer: kept, not made again per burst (a new
    /// timer is registered with the runtime's timer wheel, under its lock).
    idle: Idle,
}

/// Relays requests (the first's bytes, or some of them, in `cbuf`) until
/// the connection ends (`true`) or waits between requests holding no
/// upstream (`false`): the caller then waits for the next request's
/// bytes without this state.
async fn burst<S, C, D>(
    side: &S,
    client: &mut C,
    cbuf: Buf,
    upstream: &mut Option<S::Upstream>,
    idle: Duration,
    mut drain: Pin<&mut D>,
    kept: Kept,
) -> (bool, Kept)
where
    S: Side,
    C: AsyncRead + AsyncWrite + Unpin + Send,
    D: Future<Output = ()> + Send,
{
    let mut r = Relay {
        side,
        cbuf,
        ubuf: Buf::with_prefix(&[]),
        out: Vec::new(),
        idle: kept.idle,
        idle_period: idle,
        done: kept.done,
        draining: false,
        series: kept.series,
    };
    let mut ended = true;
    // The request in flight: parsed into its place here and lent to the
    // exchange, not moved through each call's return value and future
    // (five copies of it, 320 instructions a request, callgrind).
    let mut slot: Option<RequestHead> = None;
    loop {
        let head = match r
            .next_request(client, upstream, drain.as_mut(), &mut slot)
            .await
        {
            Ok(Some(head)) => head,
            Ok(None) => break,
            Err(fail) => {
                Box::pin(r.fail(client, fail)).await;
                break;
            }
        };
        // The drain future is otherwise polled only while waiting between
        // requests: a client that pipelines back to back must still see
        // this connection's own end (a revocation) at its next response.
        // After it resolves it is never polled again (`next_request`
        // guards on `draining`, and the burst does not return to a wait).
        r.draining = r.draining
            || side.draining()
            || futures_util::FutureExt::now_or_never(drain.as_mut()).is_some();
        // Boxed: a request's state (decision, body pipes, response) is the
        // largest part of the relay and lives only while it runs. Inline in
        // the burst's box it cost an allocation less per request, but a
        // side that keeps its upstream waits inside the burst: 16.4 to 21.8
        // KiB per idle connection (`--no-tunnel`, docs/BENCHMARKS.md).
        let exchanged = Box::pin(r.exchange(client, upstream, head)).await;
        // Its fields are not held while the connection waits.
        slot = None;
        match exchanged {
            Ok(true) if upstream.is_none() && r.cbuf.is_empty() && !r.draining => {
                ended = false;
                break;
            }
            Ok(true) => continue,
            Ok(false) => break,
            Err(fail) => {
                Box::pin(r.fail(client, fail)).await;
                break;
            }
        }
    }
    if r.draining || !r.ubuf.is_empty() {
        *upstream = None;
    }
    let kept = Kept {
        done: r.done,
        series: r.series,
        idle: r.idle,
    };
    (ended, kept)
}

/// One connection's relay state.
struct Relay<'s, S> {
    side: &'s S,
    /// Bytes from the client not yet relayed.
    cbuf: Buf,
    /// Bytes from the upstream not yet relayed.
    ubuf: Buf,
    /// A head being written (and kept until its answer, for a retry).
    out: Vec<u8>,
    idle: Idle,
    /// The connection's idle period (the body deadline replaces it while a
    /// request body is read).
    idle_period: Duration,
    done: Relayed,
    /// Draining: close after the response in flight.
    draining: bool,
    /// The request-metric series of the last answer.
    series: LastSeries,
}

impl<S: Side> Relay<'_, S> {
    /// Waits for the next complete request head; `None` when the client
    /// closed between requests, the drain began while idle, or a peer
    /// upstream closed.
    async fn next_request<'h, C, D>(
        &mut self,
        client: &mut C,
        upstream: &mut Option<S::Upstream>,
        mut drain: Pin<&mut D>,
        slot: &'h mut Option<RequestHead>,
    ) -> Result<Option<&'h mut RequestHead>, Fail>
    where
        C: AsyncRead + AsyncWrite + Unpin + Send,
        D: Future<Output = ()>,
    {
        let side = self.side;
        let limits = side.layer().limits;
        let Relay {
            cbuf,
            ubuf,
            out,
            idle,
            done,
            draining,
            ..
        } = self;
        // How many bytes the last parse saw, if they were some but not a
        // whole head: bytes that bring no line end cannot complete it, and
        // are not parsed again (parsed at every read, a head trickled a
        // byte a read cost its length squared: for 64 KiB, 2 G bytes
        // scanned). The first bytes are always parsed (garbage is refused
        // at once), and bytes past the size limit (refused).
        let mut unfinished: Option<usize> = None;
        loop {
            let parse = cbuf.bytes().len() >= limits.head.bytes
                || unfinished.is_none_or(|seen| {
                    cbuf.bytes()
                        .get(seen..)
                        .is_none_or(|fresh| fresh.contains(&b'\n'))
                });
            match parse.then(|| message::parse_request(cbuf.bytes(), side.detail(), limits.head)) {
                None | Some(Ok(None)) => {
                    unfinished = (!cbuf.is_empty()).then(|| cbuf.bytes().len());
                }
                Some(Ok(Some((head, len)))) => {
                    // The head as it came: relayed verbatim when clean,
                    // and where the request target is read for the log.
                    out.clear();
                    out.reserve(len + OUT_ROOM);
                    out.extend_from_slice(&cbuf.bytes()[..len]);
                    cbuf.consume(len);
                    idle.set_deadline(None);
                    return Ok(Some(slot.insert(head)));
                }
                Some(Err(e)) => return Err(Fail::BadRequest(e)),
            }
            let between = cbuf.is_empty();
            // The head's deadline runs from its first byte (for the first
            // request: from the end of protocol detection, which read it).
            if !between && !idle.has_deadline() {
                idle.set_deadline(Some(Instant::now() + limits.header_timeout));
            }
            if between {
                // Waiting for the next request holds no buffer.
                cbuf.relax();
                ubuf.relax();
                *out = Vec::new();
            }
            // Whether the peer is gone (`true`: end the client connection
            // too), or only the held upstream closed.
            let watch = async {
                match upstream.as_mut() {
                    // Any read outcome (EOF, error, unasked-for bytes)
                    // means this connection can carry no further request.
                    Some(up) => {
                        let _ = ubuf.fill(up).await;
                        false
                    }
                    None => {
                        side.gone().await;
                        true
                    }
                }
            };
            tokio::select! {
                biased;
                read = idle.guard(cbuf.fill(client)) => match read {
                    None if idle.past_deadline() => return Err(Fail::HeaderTimeout),
                    None => return if between { Ok(None) } else { Err(Fail::Idle) },
                    Some(Ok(0)) if between => return Ok(None),
                    Some(Ok(0)) => return Err(Fail::Client(io::ErrorKind::UnexpectedEof.into())),
                    Some(Ok(_)) => {}
                    Some(Err(e)) if e.kind() == io::ErrorKind::InvalidData => {
                        return Err(Fail::BadRequest(HeadError::TooLarge))
                    }
                    Some(Err(e)) => return Err(Fail::Client(e)),
                },
                gone = watch => {
                    *upstream = None;
                    ubuf.consume(usize::MAX);
                    if gone {
                        return Ok(None);
                    }
                    if !S::REDIAL {
                        if done.requests == 0 {
                            done.upstream_closed_first = true;
                        }
                        return Ok(None);
                    }
                }
                () = drain.as_mut(), if between && !*draining => return Ok(None),
            }
        }
    }

    /// Relays one request and its response; `Ok(true)` keeps the
    /// connection for the next one.
    async fn exchange<C>(
        &mut self,
        client: &mut C,
        upstream: &mut Option<S::Upstream>,
        head: &mut RequestHead,
    ) -> Result<bool, Fail>
    where
        C: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let mut x = self.side.exchange();
        if head.parts.method == Method::CONNECT {
            let local = Local::error(
                StatusCode::NOT_IMPLEMENTED,
                "connect",
                "CONNECT is not supported\n",
            );
            return Box::pin(self.answer(client, x, head, local, true)).await;
        }
        let (decision, reason) = match self.side.admit(&mut x, head, &self.out).await {
            Verdict::Answer(local) => {
                let close = !head.keep_alive || self.draining;
                return Box::pin(self.answer(client, x, head, local, close)).await;
            }
            Verdict::Forward { decision, reason } => (decision, reason),
        };
        if head.fields {
            // The client's `close` is about its own connection: the
            // outbound side keeps its peer connection for another client
            // (HTTP/1.0 asks nothing else: its upstream request is 1.0).
            restore_framing(head, S::DECIDES);
            self.out.clear();
            message::write_request(&head.parts, &mut self.out);
        } else if head.splice.is_some() {
            // Clean, its fields not collected: `parts.headers` holds what
            // `admit` set, the head as it came is in `out`.
            restore_framing(head, S::DECIDES);
            message::splice_request(&mut self.out, head);
        }
        let (mut up, fresh) = match upstream.take().or_else(|| self.side.reuse()) {
            Some(up) => (up, false),
            None => match self.side.dial().await {
                Ok(up) => (up, true),
                Err(e) => {
                    tracing::warn!(error = %e, "http: upstream unavailable");
                    let local = self.side.unavailable();
                    return Box::pin(self.answer(client, x, head, local, true)).await;
                }
            },
        };
        let method = head.parts.method.clone();
        let mut body_unsent = false;
        let mut bytes_in;
        // A reused connection the app closed while idle fails at once; a
        // bodiless request is then resent once on a new connection.
        let mut retry = !fresh && S::REDIAL && head.framing == Framing::Empty;
        let resp = loop {
            // A request body may pause only for the body deadline.
            let has_body = head.framing != Framing::Empty;
            if has_body {
                let body_idle = self.side.layer().limits.body_idle_timeout;
                self.idle.set_period(body_idle);
            }
            let sent = if !has_body {
                write_flush(&mut up, &self.out)
                    .await
                    .map(|()| 0)
                    .map_err(PipeError::Write)
            } else if head.expect_continue {
                // Boxed, as every rare path: the common one's state stays
                // small and close together.
                Box::pin(self.send_expecting(client, &mut up, head, &mut body_unsent)).await
            } else {
                let mut rest = Remaining::of(head.framing);
                pipe(
                    client,
                    &mut self.cbuf,
                    &mut up,
                    &mut self.out,
                    &mut rest,
                    &mut self.idle,
                )
                .await
            };
            self.idle.set_period(self.idle_period);
            match sent {
                Ok(n) => bytes_in = n,
                Err(PipeError::Write(e)) => {
                    if std::mem::take(&mut retry) {
                        up = self.redial().await?;
                        continue;
                    }
                    return Err(Fail::Upstream(e.to_string()));
                }
                Err(e) => return Err(request_pipe_fail(e)),
            }
            self.done.bytes_in += bytes_in;
            match self.response_head(client, &mut up, &method, head).await {
                Ok(Some(resp)) => break resp,
                // Switched protocols (the 101 head is in `out`): counted
                // now, then a tunnel to its end.
                Ok(None) => {
                    let status = StatusCode::SWITCHING_PROTOCOLS;
                    x.decided_in(&mut self.series, status, decision, reason);
                    Box::pin(self.tunnel(client, &mut up)).await?;
                    x.ended(bytes_in, 0);
                    return Ok(false);
                }
                Err(Fail::Upstream(_)) if std::mem::take(&mut retry) && self.ubuf.is_empty() => {
                    up = self.redial().await?;
                }
                Err(fail) => return Err(fail),
            }
        };
        let mut resp = resp;
        // An app closing its connection does not close the client's (the
        // next request redials), unless the close is what ends the body.
        let close = !head.keep_alive
            || body_unsent
            || self.draining
            || resp.framing == Framing::UntilClose
            || (!S::REDIAL && !resp.keep_alive);
        x.decided_in(&mut self.series, resp.parts.status, decision, reason);
        let connection: &[u8] = if close {
            b"connection: close\r\n"
        } else if head.parts.version == Version::HTTP_10 {
            b"connection: keep-alive\r\n"
        } else {
            b""
        };
        if resp.clean {
            self.out.extend_from_slice(connection);
            self.out.extend_from_slice(b"\r\n");
        } else {
            finish_response_head(&mut resp, close, head.parts.version);
            self.out.clear();
            message::write_response(&resp.parts, &mut self.out);
        }
        let head_len = self.out.len() as u64;
        let mut rest = Remaining::of(resp.framing);
        let sent = pipe(
            &mut up,
            &mut self.ubuf,
            client,
            &mut self.out,
            &mut rest,
            &mut self.idle,
        )
        .await;
        let bytes_out = match sent {
            Ok(n) => n,
            // Writing to the client failed: it went away.
            Err(PipeError::Write(e)) => {
                x.ended(bytes_in, 0);
                return Err(Fail::Client(e));
            }
            Err(e) => {
                x.ended(bytes_in, 0);
                return Err(Fail::UpstreamLate(pipe_detail(e)));
            }
        };
        self.done.bytes_out += head_len + bytes_out;
        self.done.requests += 1;
        x.ended(bytes_in, bytes_out);
        // A request whose body was never sent leaves the upstream expecting
        // it: that connection carries nothing more.
        if resp.keep_alive && !body_unsent {
            if S::REDIAL && !self.ubuf.is_empty() {
                // The app sent more than its answer: that connection
                // carries no other request, least of all another
                // client's (its bytes would answer that client).
                self.ubuf.consume(usize::MAX);
            } else {
                *upstream = self.side.release(up);
            }
        }
        Ok(!close)
    }
}
