//! The relay's contract with the two ends that run it: what the inbound
//! and outbound sides supply ([`Side`]: the upstream, the decision, the
//! local answers) and what a relayed connection reports back
//! ([`Relayed`]). Kept apart from the relay itself (`h1/mod.rs`) so that
//! the state machine reads on its own and a side's implementer reads only
//! this.

use std::future::Future;
use std::io;

use tokio::io::{AsyncRead, AsyncWrite};

use super::message::Detail;
use super::RequestHead;
use crate::http::record::Exchange;
use crate::http::{HttpLayer, Local, Verdict};

/// What differs between the inbound and outbound ends of the relay.
pub(crate) trait Side: Send + Sync {
    /// The connection requests are relayed to.
    type Upstream: AsyncRead + AsyncWrite + Unpin + Send;

    /// A new request's record (direction, port, log, metrics).
    fn exchange(&self) -> Exchange;

    /// The layer: per-client limits, the refusal counter.
    fn layer(&self) -> &HttpLayer;

    /// `inbound` or `outbound` (metric label).
    const DIRECTION: &'static str;

    /// Whether requests are decided and rewritten here (inbound).
    /// Otherwise (outbound) a clean head is relayed as it came.
    const DECIDES: bool;

    /// How much of the next clean request head [`Side::admit`] needs
    /// (asked per request: a policy reload may change it).
    fn detail(&self) -> Detail;

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

    /// An idle upstream connection another client left, for the next
    /// request (it may have been closed meanwhile: a bodiless request
    /// failing on it at once is sent again on a new one).
    fn reuse(&self) -> Option<Self::Upstream> {
        None
    }

    /// The upstream connection after a response that left it reusable:
    /// `Some` keeps it with this client connection, `None` means it went
    /// back to a pool for any client's next request.
    fn release(&self, up: Self::Upstream) -> Option<Self::Upstream> {
        Some(up)
    }

    /// Resolves when the peer this side's requests go to has closed the
    /// connection they share (a side whose upstream goes back to a pool
    /// between requests): the client connection, idle and holding no
    /// upstream, then ends as it would had it held that one. Never, by
    /// default.
    fn gone(&self) -> impl Future<Output = ()> + Send {
        std::future::pending()
    }

    /// The answer when the upstream cannot be reached or fails.
    fn unavailable(&self) -> Local;

    /// Whether the process is draining: responses then close their
    /// connection (checked once per request; an idle connection closes on
    /// the `drain` future given to [`relay`](super::relay)).
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
    /// Why it ended early (stable label, detail). Boxed: every idle
    /// HTTP/1 connection keeps this beside its wait (8 bytes, not 40).
    pub error: Option<Box<(&'static str, String)>>,
    /// The upstream closed before the first request was relayed.
    pub upstream_closed_first: bool,
}
