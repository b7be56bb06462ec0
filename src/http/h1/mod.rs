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
pub mod message;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Method, StatusCode, Version};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, Sleep};

use self::body::{BodyError, Remaining};
use self::buf::Buf;
pub(crate) use self::message::RequestHead;
use self::message::{Framing, HeadError, ResponseHead};
use super::headers::strip_hop_by_hop;
use super::metrics::LastSeries;
use super::record::Exchange;
use super::{Local, Verdict};

/// Heads and small bodies are gathered into one write (one TLS record) up
/// to this size; larger bodies are written straight from the read buffer.
const COALESCE: usize = 16 * 1024;

/// What differs between the inbound and outbound ends of the relay.
pub(crate) trait Side: Send + Sync {
    /// The connection requests are relayed to.
    type Upstream: AsyncRead + AsyncWrite + Unpin + Send;

    /// A new request's record (direction, port, log, metrics).
    fn exchange(&self) -> Exchange;

    /// The layer: per-client limits, the refusal counter.
    fn layer(&self) -> &super::HttpLayer;

    /// `inbound` or `outbound` (metric label).
    const DIRECTION: &'static str;

    /// Whether requests are decided and rewritten here (inbound): their
    /// heads are then parsed in full. Otherwise (outbound) a clean head is
    /// relayed as it came.
    const DECIDES: bool;

    /// Decides the request and rewrites its head for the upstream; `raw`
    /// is the head as it came.
    fn admit<'a>(
        &'a self,
        x: &'a mut Exchange,
        head: &'a mut RequestHead,
        raw: &'a [u8],
    ) -> impl Future<Output = Verdict> + Send + 'a;

    /// A new upstream connection, when there is none (first request, or
    /// the last one closed); an error when this side cannot redial.
    fn dial(&self) -> impl Future<Output = io::Result<Self::Upstream>> + Send;

    /// Whether a lost upstream connection can be replaced: the app can be
    /// redialled; a peer sidecar's connection is this connection's identity.
    const REDIAL: bool;

    /// The answer when the upstream cannot be reached or fails.
    fn unavailable(&self) -> Local;

    /// Whether the process is draining: responses then close their
    /// connection (checked once per request; an idle connection closes on
    /// the `drain` future given to [`relay`]).
    fn draining(&self) -> bool;
}

/// How a relayed connection ended.
#[derive(Debug, Default)]
pub(crate) struct Relayed {
    /// Bytes written to the upstream.
    pub bytes_in: u64,
    /// Bytes written back to the client.
    pub bytes_out: u64,
    /// Requests answered.
    pub requests: u64,
    /// Why it ended early (stable label, detail).
    pub error: Option<(&'static str, String)>,
    /// The upstream closed before the first request was relayed.
    pub upstream_closed_first: bool,
}

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

/// What a message body relay failed on.
enum PipeError {
    Read(io::Error),
    Write(io::Error),
    Eof,
    Framing(BodyError),
    Idle,
}

/// An idle deadline checked coarsely (between one and two periods), so
/// each read only sets a flag instead of rearming a timer.
struct Idle {
    sleep: Pin<Box<Sleep>>,
    period: Duration,
    active: bool,
    /// A hard deadline besides the idle period (a request head's), on the
    /// same timer: no second timer in every connection's task.
    deadline: Option<Instant>,
}

impl Idle {
    fn new(period: Duration) -> Idle {
        Idle {
            sleep: Box::pin(tokio::time::sleep(period)),
            period,
            active: false,
            deadline: None,
        }
    }

    /// Sets or clears the hard deadline ([`Idle::guard`] gives up at it).
    fn set_deadline(&mut self, at: Option<Instant>) {
        self.deadline = at;
        if let Some(at) = at {
            if at < self.sleep.deadline() {
                self.sleep.as_mut().reset(at);
            }
        }
    }

    /// Whether the hard deadline has passed.
    fn past_deadline(&self) -> bool {
        self.deadline.is_some_and(|at| Instant::now() >= at)
    }

    /// A new period from now (a request body's deadline, then back).
    fn set_period(&mut self, period: Duration) {
        if period != self.period {
            self.period = period;
            self.active = false;
            self.sleep.as_mut().reset(Instant::now() + period);
        }
    }

    /// Runs `f`, or gives up once nothing has completed for the period or
    /// the deadline has passed.
    async fn guard<F: Future>(&mut self, f: F) -> Option<F::Output> {
        tokio::pin!(f);
        loop {
            tokio::select! {
                biased;
                out = &mut f => {
                    self.active = true;
                    return Some(out);
                }
                () = self.sleep.as_mut() => {
                    if self.past_deadline() || !std::mem::take(&mut self.active) {
                        return None;
                    }
                    let next = Instant::now() + self.period;
                    let at = self.deadline.map_or(next, |d| d.min(next));
                    self.sleep.as_mut().reset(at);
                }
            }
        }
    }
}

/// Relays HTTP/1.x requests from `client` (whose first bytes, read by
/// protocol detection, are `prefix`) until either side closes, the idle
/// timeout, or `drain` (then the connection closes after the response in
/// flight, or at once when idle). `upstream` is the connection to start
/// with, if any; afterwards it holds a connection still good for another
/// client (idle between messages, kept alive), or `None`. The caller
/// closes `client` (after parking `upstream`, so the next client finds it).
pub(crate) async fn relay<S, C>(
    side: &S,
    client: &mut C,
    prefix: bytes::Bytes,
    upstream: &mut Option<S::Upstream>,
    idle: Duration,
    drain: impl Future<Output = ()> + Send,
) -> Relayed
where
    S: Side,
    C: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut r = Relay {
        side,
        cbuf: Buf::with_prefix(&prefix),
        ubuf: Buf::with_prefix(&[]),
        out: Vec::new(),
        idle: Idle::new(idle),
        idle_period: idle,
        done: Relayed::default(),
        draining: false,
        series: LastSeries::default(),
    };
    // Copied: the detection buffer is not kept for the connection's life.
    drop(prefix);
    tokio::pin!(drain);
    loop {
        let head = match r.next_request(client, upstream, drain.as_mut()).await {
            Ok(Some(head)) => head,
            Ok(None) => break,
            Err(fail) => {
                Box::pin(r.fail(client, fail)).await;
                break;
            }
        };
        r.draining = r.draining || side.draining();
        match r.exchange(client, upstream, head).await {
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
    r.done
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
    async fn next_request<C, D>(
        &mut self,
        client: &mut C,
        upstream: &mut Option<S::Upstream>,
        mut drain: Pin<&mut D>,
    ) -> Result<Option<RequestHead>, Fail>
    where
        C: AsyncRead + AsyncWrite + Unpin + Send,
        D: Future<Output = ()>,
    {
        let limits = self.side.layer().limits;
        let Relay {
            cbuf,
            ubuf,
            out,
            idle,
            done,
            draining,
            ..
        } = self;
        // The head's deadline runs from its first byte (for the first
        // request: from the end of protocol detection, which read it).
        let mut deadline = false;
        loop {
            match message::parse_request(cbuf.bytes(), S::DECIDES, limits.head) {
                Ok(Some((head, len))) => {
                    // The head as it came: relayed verbatim when clean,
                    // and where the request target is read for the log.
                    out.clear();
                    out.extend_from_slice(&cbuf.bytes()[..len]);
                    cbuf.consume(len);
                    idle.set_deadline(None);
                    return Ok(Some(head));
                }
                Ok(None) => {}
                Err(e) => return Err(Fail::BadRequest(e)),
            }
            let between = cbuf.is_empty();
            if !between && !deadline {
                deadline = true;
                idle.set_deadline(Some(Instant::now() + limits.header_timeout));
            }
            if between {
                cbuf.relax();
                ubuf.relax();
                if out.capacity() > buf::INITIAL {
                    // It gathered a body once; an idle connection keeps
                    // no more than a head's worth.
                    *out = Vec::with_capacity(buf::INITIAL);
                }
            }
            let watch = async {
                match upstream.as_mut() {
                    // Any read outcome (EOF, error, unasked-for bytes)
                    // means this connection can carry no further request.
                    Some(up) => {
                        let _ = ubuf.fill(up).await;
                    }
                    None => std::future::pending().await,
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
                () = watch => {
                    *upstream = None;
                    ubuf.consume(usize::MAX);
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
        mut head: RequestHead,
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
            return Box::pin(self.answer(client, x, &head, local, true)).await;
        }
        let (decision, reason) = match self.side.admit(&mut x, &mut head, &self.out).await {
            Verdict::Answer(local) => {
                let close = !head.keep_alive || self.draining;
                return Box::pin(self.answer(client, x, &head, local, close)).await;
            }
            Verdict::Forward { decision, reason } => (decision, reason),
        };
        if S::DECIDES || !head.clean {
            // The client's `close` is about its own connection: the
            // outbound side keeps its peer connection for another client
            // (HTTP/1.0 asks nothing else: its upstream request is 1.0).
            restore_framing(&mut head, S::DECIDES);
            self.out.clear();
            message::write_request(&head.parts, &mut self.out);
        }
        let (mut up, fresh) = match upstream.take() {
            Some(up) => (up, false),
            None => match self.side.dial().await {
                Ok(up) => (up, true),
                Err(e) => {
                    tracing::warn!(error = %e, "http: upstream unavailable");
                    let local = self.side.unavailable();
                    return Box::pin(self.answer(client, x, &head, local, true)).await;
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
            let sent = if head.framing == Framing::Empty {
                write_flush(&mut up, &self.out)
                    .await
                    .map(|()| 0)
                    .map_err(PipeError::Write)
            } else if head.expect_continue {
                // Boxed, as every rare path: the common one's state stays
                // small and close together.
                self.idle
                    .set_period(self.side.layer().limits.body_idle_timeout);
                let sent =
                    Box::pin(self.send_expecting(client, &mut up, &mut head, &mut body_unsent))
                        .await;
                self.idle.set_period(self.idle_period);
                sent
            } else {
                let mut rest = Remaining::of(head.framing);
                self.idle
                    .set_period(self.side.layer().limits.body_idle_timeout);
                let sent = pipe(
                    client,
                    &mut self.cbuf,
                    &mut up,
                    &mut self.out,
                    &mut rest,
                    &mut self.idle,
                )
                .await;
                self.idle.set_period(self.idle_period);
                sent
            };
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
            match self.response_head(client, &mut up, &method, &head).await {
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
            *upstream = Some(up);
        }
        Ok(!close)
    }

    async fn redial(&mut self) -> Result<S::Upstream, Fail> {
        self.ubuf.consume(usize::MAX);
        self.side
            .dial()
            .await
            .map_err(|e| Fail::Upstream(e.to_string()))
    }

    /// `Expect: 100-continue`: the head goes alone; the body follows once
    /// the upstream says 100 or the client sends it anyway. A final answer
    /// first means the body is never sent (the connection then closes).
    async fn send_expecting<C, U>(
        &mut self,
        client: &mut C,
        up: &mut U,
        head: &mut RequestHead,
        body_unsent: &mut bool,
    ) -> Result<u64, PipeError>
    where
        C: AsyncRead + AsyncWrite + Unpin + Send,
        U: AsyncRead + AsyncWrite + Unpin + Send,
    {
        write_flush(up, &self.out).await.map_err(PipeError::Write)?;
        self.out.clear();
        while self.cbuf.is_empty() {
            match message::parse_response(self.ubuf.bytes(), &head.parts.method) {
                Ok(Some((resp, len))) if resp.parts.status.is_informational() => {
                    let mut resp = resp;
                    take_head(&mut self.ubuf, &mut self.out, &resp, len);
                    finish_interim(&mut resp, &mut self.out);
                    write_flush(client, &self.out)
                        .await
                        .map_err(PipeError::Write)?;
                    self.out.clear();
                    if resp.parts.status == StatusCode::CONTINUE {
                        break;
                    }
                    continue;
                }
                // A final answer: left for the response phase.
                Ok(Some(_)) | Err(_) => {
                    *body_unsent = true;
                    return Ok(0);
                }
                Ok(None) => {}
            }
            let (cbuf, ubuf) = (&mut self.cbuf, &mut self.ubuf);
            let either = async {
                tokio::select! {
                    read = cbuf.fill(client) => (true, read),
                    read = ubuf.fill(up) => (false, read),
                }
            };
            match self.idle.guard(either).await {
                None => return Err(PipeError::Idle),
                Some((true, Ok(0))) => return Err(PipeError::Eof),
                Some((true, Err(e))) => return Err(PipeError::Read(e)),
                // The response phase reports the upstream's failure.
                Some((false, Ok(0) | Err(_))) => {
                    *body_unsent = true;
                    return Ok(0);
                }
                Some((_, Ok(_))) => {}
            }
        }
        let mut rest = Remaining::of(head.framing);
        pipe(
            client,
            &mut self.cbuf,
            up,
            &mut self.out,
            &mut rest,
            &mut self.idle,
        )
        .await
    }

    /// Reads the response head, relaying interim (1xx) responses; `None`
    /// for a protocol switch, its head written into `out` for the tunnel.
    async fn response_head<C, U>(
        &mut self,
        client: &mut C,
        up: &mut U,
        method: &Method,
        head: &RequestHead,
    ) -> Result<Option<ResponseHead>, Fail>
    where
        C: AsyncRead + AsyncWrite + Unpin + Send,
        U: AsyncRead + AsyncWrite + Unpin + Send,
    {
        loop {
            let (mut resp, len) = loop {
                match message::parse_response(self.ubuf.bytes(), method) {
                    Ok(Some(found)) => break found,
                    Ok(None) => {}
                    Err(e) => return Err(Fail::Upstream(format!("bad response: {e}"))),
                }
                match self.idle.guard(self.ubuf.fill(up)).await {
                    None => return Err(Fail::Idle),
                    Some(Ok(0)) => return Err(Fail::Upstream("closed before answering".into())),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(Fail::Upstream(e.to_string())),
                }
            };
            take_head(&mut self.ubuf, &mut self.out, &resp, len);
            let status = resp.parts.status;
            if status == StatusCode::SWITCHING_PROTOCOLS {
                let Some(protocol) = &head.upgrade else {
                    return Err(Fail::Upstream("101 without an upgrade request".into()));
                };
                strip_hop_by_hop(&mut resp.parts.headers);
                let headers = &mut resp.parts.headers;
                headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                headers.insert(header::UPGRADE, protocol.clone());
                self.out.clear();
                message::write_response(&resp.parts, &mut self.out);
                return Ok(None);
            }
            if !status.is_informational() {
                return Ok(Some(resp));
            }
            finish_interim(&mut resp, &mut self.out);
            write_flush(client, &self.out).await.map_err(Fail::Client)?;
        }
    }

    /// After `101 Switching Protocols` (its head in `out`): bytes both ways
    /// until both sides close.
    async fn tunnel<C, U>(&mut self, client: &mut C, up: &mut U) -> Result<(), Fail>
    where
        C: AsyncRead + AsyncWrite + Unpin + Send,
        U: AsyncRead + AsyncWrite + Unpin + Send,
    {
        self.out.extend_from_slice(self.ubuf.bytes());
        self.ubuf.consume(usize::MAX);
        write_flush(client, &self.out).await.map_err(Fail::Client)?;
        write_flush(up, self.cbuf.bytes())
            .await
            .map_err(|e| Fail::UpstreamLate(e.to_string()))?;
        self.cbuf.consume(usize::MAX);
        let counters = crate::proxy::forward::ByteCounters::default();
        let done = crate::proxy::forward::forward(client, up, self.idle.period, &counters).await;
        self.done.bytes_in += done.a_to_b;
        self.done.bytes_out += done.b_to_a;
        self.done.requests += 1;
        Ok(())
    }

    /// Answers a request locally; its body, if any, is read and dropped
    /// (or the connection closes, when the client waits for a 100 first).
    async fn answer<C>(
        &mut self,
        client: &mut C,
        mut x: Exchange,
        head: &RequestHead,
        local: Local,
        close: bool,
    ) -> Result<bool, Fail>
    where
        C: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let close = close || (head.framing != Framing::Empty && head.expect_continue);
        if !close && head.framing != Framing::Empty {
            let mut rest = Remaining::of(head.framing);
            let mut sink = tokio::io::sink();
            self.out.clear();
            pipe(
                client,
                &mut self.cbuf,
                &mut sink,
                &mut self.out,
                &mut rest,
                &mut self.idle,
            )
            .await
            .map_err(request_pipe_fail)?;
        }
        x.decided_in(&mut self.series, local.status, local.decision, local.reason);
        self.out.clear();
        local.write_h1(close, &mut self.out);
        let n = self.out.len() as u64;
        write_flush(client, &self.out).await.map_err(Fail::Client)?;
        self.done.bytes_out += n;
        self.done.requests += 1;
        x.ended(0, n);
        Ok(!close)
    }

    /// Ends the connection for `fail`, answering first where HTTP allows.
    async fn fail<C>(&mut self, client: &mut C, fail: Fail)
    where
        C: AsyncRead + AsyncWrite + Unpin + Send,
    {
        // The label the connection's outcome carries: none for a malformed
        // request (answered 400, the client's fault, not the connection's).
        let (label, detail, local) = match fail {
            Fail::Client(e) => (Some("client_io"), e.to_string(), None),
            Fail::Idle => (Some("idle_timeout"), "idle".to_owned(), None),
            Fail::HeaderTimeout | Fail::BodyTimeout => {
                let reason = if matches!(fail, Fail::HeaderTimeout) {
                    "header_timeout"
                } else {
                    "body_timeout"
                };
                self.side.layer().metrics.refusal(S::DIRECTION, reason);
                let local = Local::error(StatusCode::REQUEST_TIMEOUT, reason, "request timeout\n");
                (Some(reason), reason.to_owned(), Some(local))
            }
            Fail::UpstreamLate(d) => (Some("upstream_io"), d, None),
            Fail::BadRequest(e) => {
                let (status, reason) = if e == HeadError::TooLarge {
                    (
                        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                        "head_too_large",
                    )
                } else {
                    (StatusCode::BAD_REQUEST, "malformed_head")
                };
                self.side.layer().metrics.refusal(S::DIRECTION, reason);
                let local = Local::error(status, "bad_request", "malformed HTTP request\n");
                (None, e.to_string(), Some(local))
            }
            Fail::BadBody(e) => {
                let local = Local::error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "malformed HTTP request body\n",
                );
                (None, e.to_string(), Some(local))
            }
            Fail::Upstream(d) => (Some("upstream"), d, Some(self.side.unavailable())),
        };
        if let Some(local) = local {
            tracing::debug!(reason = local.reason, detail = %detail, "http/1: answering and closing");
            let mut x = self.side.exchange();
            x.decided(local.status, local.decision, local.reason);
            self.out.clear();
            local.write_h1(true, &mut self.out);
            if write_flush(client, &self.out).await.is_ok() {
                self.done.bytes_out += self.out.len() as u64;
            }
            x.ended(0, self.out.len() as u64);
        }
        self.done.error = label.map(|label| (label, detail));
    }
}

/// Puts back the framing and connection headers hop-by-hop stripping
/// removed, as this hop relays them: chunked bodies pass through as they
/// are, an upgrade request keeps asking, HTTP/1.0 keep-alive stays asked,
/// and the client's `close` is passed on when `passes_close`.
fn restore_framing(head: &mut RequestHead, passes_close: bool) {
    let headers = &mut head.parts.headers;
    if head.framing == Framing::Chunked {
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
    if let Some(protocol) = &head.upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol.clone());
    } else if !head.keep_alive && passes_close {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    } else if head.parts.version == Version::HTTP_10 {
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
    }
}

/// Takes a parsed response head off `ubuf`; a clean one is copied into
/// `out` as it came, but for its last CRLF (headers may follow).
fn take_head(ubuf: &mut Buf, out: &mut Vec<u8>, resp: &ResponseHead, len: usize) {
    out.clear();
    if resp.clean {
        out.extend_from_slice(&ubuf.bytes()[..len - 2]);
    }
    ubuf.consume(len);
}

/// Completes an interim (1xx) head in `out` (see [`take_head`]).
fn finish_interim(resp: &mut ResponseHead, out: &mut Vec<u8>) {
    if resp.clean {
        out.extend_from_slice(b"\r\n");
    } else {
        strip_hop_by_hop(&mut resp.parts.headers);
        out.clear();
        message::write_response(&resp.parts, out);
    }
}

fn finish_response_head(resp: &mut ResponseHead, close: bool, client_version: Version) {
    let headers = &mut resp.parts.headers;
    strip_hop_by_hop(headers);
    if resp.framing == Framing::Chunked {
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
    if close {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    } else if client_version == Version::HTTP_10 {
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
    }
}

/// Relays a body from `src` (its first bytes in `sbuf`) to `dst`, after
/// whatever `out` holds (a head): gathered into one write while small.
/// Returns the body bytes relayed.
async fn pipe<R, W>(
    src: &mut R,
    sbuf: &mut Buf,
    dst: &mut W,
    out: &mut Vec<u8>,
    rest: &mut Remaining,
    idle: &mut Idle,
) -> Result<u64, PipeError>
where
    R: AsyncRead + Unpin + Send + ?Sized,
    W: AsyncWrite + Unpin + Send + ?Sized,
{
    let mut moved = 0u64;
    loop {
        let take = rest.take(sbuf.bytes()).map_err(PipeError::Framing)?;
        if take > 0 {
            let bytes = &sbuf.bytes()[..take];
            if out.len() + take <= COALESCE {
                out.extend_from_slice(bytes);
            } else {
                drain_out(dst, out).await?;
                dst.write_all(bytes).await.map_err(PipeError::Write)?;
            }
            sbuf.consume(take);
            moved += take as u64;
        }
        drain_out(dst, out).await?;
        dst.flush().await.map_err(PipeError::Write)?;
        if rest.is_done() {
            return Ok(moved);
        }
        match idle.guard(sbuf.fill(src)).await {
            None => return Err(PipeError::Idle),
            Some(Ok(0)) if matches!(rest, Remaining::UntilClose) => *rest = Remaining::Done,
            Some(Ok(0)) => return Err(PipeError::Eof),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(PipeError::Read(e)),
        }
    }
}

async fn drain_out<W: AsyncWrite + Unpin + ?Sized>(
    dst: &mut W,
    out: &mut Vec<u8>,
) -> Result<(), PipeError> {
    if !out.is_empty() {
        dst.write_all(out).await.map_err(PipeError::Write)?;
        out.clear();
    }
    Ok(())
}

async fn write_flush<W: AsyncWrite + Unpin + ?Sized>(w: &mut W, bytes: &[u8]) -> io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

/// A request body relay's failure: the client's fault unless writing to
/// the upstream failed.
fn request_pipe_fail(e: PipeError) -> Fail {
    match e {
        PipeError::Read(e) => Fail::Client(e),
        PipeError::Eof => Fail::Client(io::ErrorKind::UnexpectedEof.into()),
        PipeError::Framing(e) => Fail::BadBody(e),
        PipeError::Idle => Fail::BodyTimeout,
        PipeError::Write(e) => Fail::Upstream(e.to_string()),
    }
}

fn pipe_detail(e: PipeError) -> String {
    match e {
        PipeError::Read(e) | PipeError::Write(e) => e.to_string(),
        PipeError::Eof => "closed mid-body".into(),
        PipeError::Framing(e) => e.to_string(),
        PipeError::Idle => "idle".into(),
    }
}
