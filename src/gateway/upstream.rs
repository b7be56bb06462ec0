//! The way to the API server: one pooled HTTPS client (HTTP/2 or 1.1, as
//! the server offers) for ordinary requests, an HTTP/1.1-only client for
//! long-running requests (watch, log, proxy: a connection each, so they
//! never fill the shared HTTP/2 connection's stream limit), one for
//! upgrades (exec, attach, port-forward: WebSocket and SPDY ride HTTP/1.1),
//! and the gateway's own ServiceAccount token, re-read as the kubelet
//! rotates it. Requests are rewritten here: hop-by-hop headers and the
//! person's token out, the gateway's token and impersonation in.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Request, Uri};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use stepmesh_ca::https::{add_pem_roots, client_config};

use super::decide::Person;

/// `Impersonate-Extra-` keys: `stepmesh.io/acr` and friends, with the `/`
/// escaped as header names need (the API server lowercases and unescapes).
pub const EXTRA_ACR: &str = "impersonate-extra-stepmesh.io%2facr";
/// The verified `amr` values, one header each.
pub const EXTRA_AMR: &str = "impersonate-extra-stepmesh.io%2famr";
/// The verified `auth_time` (seconds since the epoch).
pub const EXTRA_AUTH_TIME: &str = "impersonate-extra-stepmesh.io%2fauth-time";

/// Why the upstream could not be set up (exit 64: the flags are wrong).
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// `--upstream` is not an `https://host[:port]` URL.
    #[error("--upstream {0:?}: give https://HOST[:PORT] with no path")]
    Url(String),
    /// The CA file or TLS setup.
    #[error("--upstream-ca: {0}")]
    Tls(#[from] stepmesh_ca::https::HttpError),
    /// The token file is unreadable or empty.
    #[error("--token-file {path}: {reason}")]
    Token {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Idle long-running-request connections kept for reuse.
const STREAM_IDLE_CONNECTIONS: usize = 16;

type HttpsClient = Client<HttpsConnector<HttpConnector>, Incoming>;

/// Which upstream client a request rides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// The shared connection (HTTP/2 when the API server offers it).
    Shared,
    /// A long-running request (watch, log, proxy): an HTTP/1.1 connection
    /// of its own while it lasts. The API server allows 100 concurrent
    /// streams per HTTP/2 connection and hyper-util's pool opens no second
    /// one: on the shared connection the 101st open watch, and every
    /// request after it, would wait for one to end.
    Stream,
    /// An upgrade: HTTP/1.1, never pooled.
    Upgrade,
}

/// The API server, as the gateway reaches it.
pub struct Upstream {
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    pooled: HttpsClient,
    streams: HttpsClient,
    upgrades: HttpsClient,
    token: Arc<ArcSwap<HeaderValue>>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// Checks the URL, the CA and the token file now; spawns the token
    /// re-reader (every `token_every`).
    pub fn new(
        url: &str,
        ca_file: &Path,
        token_file: &Path,
        token_every: Duration,
    ) -> Result<Upstream, UpstreamError> {
        let uri: Uri = url
            .parse()
            .map_err(|_| UpstreamError::Url(url.to_owned()))?;
        let (Some(scheme), Some(authority)) = (uri.scheme().cloned(), uri.authority().cloned())
        else {
            return Err(UpstreamError::Url(url.to_owned()));
        };
        if scheme != http::uri::Scheme::HTTPS || !matches!(uri.path(), "" | "/") {
            return Err(UpstreamError::Url(url.to_owned()));
        }
        let mut roots = rustls::RootCertStore::empty();
        add_pem_roots(&mut roots, ca_file)?;
        let config = client_config(roots)?;
        let connector = |alpn_h2: bool| {
            let mut tcp = HttpConnector::new();
            tcp.enforce_http(false);
            // Without it a request written in pieces waits on the API
            // server's delayed ACK (Nagle): ~40 ms per request.
            tcp.set_nodelay(true);
            tcp.set_connect_timeout(Some(Duration::from_secs(10)));
            let b = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(config.clone())
                .https_only()
                .enable_http1();
            if alpn_h2 {
                b.enable_http2().wrap_connector(tcp)
            } else {
                b.wrap_connector(tcp)
            }
        };
        let pooled = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector(true));
        let streams = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            // A burst of ended watches leaves no crowd of idle connections.
            .pool_max_idle_per_host(STREAM_IDLE_CONNECTIONS)
            .build(connector(false));
        let upgrades = Client::builder(TokioExecutor::new())
            // An upgraded connection is the caller's for good: never pooled.
            .pool_max_idle_per_host(0)
            .build(connector(false));
        let token = Arc::new(ArcSwap::from_pointee(read_token(token_file)?));
        tokio::spawn(reread_token(
            Arc::downgrade(&token),
            token_file.to_owned(),
            token_every,
        ));
        Ok(Upstream {
            scheme,
            authority,
            pooled,
            streams,
            upgrades,
            token,
        })
    }

    /// Sends `req` (already rewritten by [`Upstream::rewrite`]) on `lane`.
    pub async fn send(
        &self,
        req: Request<Incoming>,
        lane: Lane,
    ) -> Result<http::Response<Incoming>, hyper_util::client::legacy::Error> {
        match lane {
            Lane::Shared => self.pooled.request(req).await,
            Lane::Stream => self.streams.request(req).await,
            Lane::Upgrade => self.upgrades.request(req).await,
        }
    }

    /// Points `req` at the API server as `person` from `client`: hop-by-hop
    /// headers (but an upgrade's own) and the person's credentials removed,
    /// the gateway's token, the impersonation headers and `client` as
    /// `X-Forwarded-For` set. Refused, with
    /// `req` untouched, when its target cannot be aimed at the API server
    /// (no path: the classifier refuses those first, and the client's own
    /// authority must never be kept with the gateway's token).
    pub fn rewrite(
        &self,
        req: &mut Request<Incoming>,
        person: &Person,
        client: IpAddr,
        upgrade: bool,
    ) -> Result<(), &'static str> {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = req.uri().path_and_query().cloned();
        *req.uri_mut() = Uri::from_parts(parts).map_err(|_| "the request target has no path")?;
        *req.version_mut() = http::Version::HTTP_11;
        let headers = req.headers_mut();
        strip_hop_by_hop(headers, upgrade);
        headers.remove(header::HOST);
        headers.remove(header::COOKIE);
        // The API server files its audit events under a client's Audit-ID
        // when one comes: a person could file theirs under another's.
        headers.remove("audit-id");
        // It files `X-Forwarded-For`'s first address, else `X-Real-Ip`'s,
        // first in an event's `sourceIPs`: a client's own would stand for
        // where it came from (found by review). Ours is the connection's.
        headers.remove("x-real-ip");
        headers.remove("forwarded");
        headers.remove("x-forwarded-for");
        // An address's text (digits, hex, `.`, `:`) is always a valid value.
        if let Ok(value) = HeaderValue::try_from(client.to_string()) {
            headers.insert("x-forwarded-for", value);
        }
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::clone(&self.token.load()),
        );
        impersonate(headers, person);
        Ok(())
    }
}

/// The sidecar's hop-by-hop stripping (RFC 9110 §7.6.1, and what
/// `Connection` names); an upgrade keeps `Connection: Upgrade` and its
/// `Upgrade` values, which are the request itself.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let protocols: Vec<HeaderValue> = if upgrade {
        headers.get_all(header::UPGRADE).iter().cloned().collect()
    } else {
        Vec::new()
    };
    crate::http::headers::strip_hop_by_hop(headers);
    if !protocols.is_empty() {
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        for p in protocols {
            headers.append(header::UPGRADE, p);
        }
    }
}

fn impersonate(headers: &mut HeaderMap, person: &Person) {
    // Names were checked to be valid header values when the person was
    // made (decide::person_of); a value that is not is skipped, never sent.
    let value = |s: &str| HeaderValue::from_str(s).ok();
    if let Some(v) = value(&person.username) {
        headers.insert("impersonate-user", v);
    }
    for g in &person.groups {
        if let Some(v) = value(g) {
            headers.append("impersonate-group", v);
        }
    }
    let t = &person.token;
    if let Some(v) = t.acr.as_deref().and_then(value) {
        headers.insert(EXTRA_ACR, v);
    }
    for m in &t.amr {
        if let Some(v) = value(m) {
            headers.append(EXTRA_AMR, v);
        }
    }
    if let Some(at) = t.auth_time {
        headers.insert(EXTRA_AUTH_TIME, HeaderValue::from(at));
    }
}

fn read_token(path: &Path) -> Result<HeaderValue, UpstreamError> {
    let bad = |reason: String| UpstreamError::Token {
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(bad("empty".to_owned()));
    }
    let mut v = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| bad("not a token (bytes a header cannot carry)".to_owned()))?;
    v.set_sensitive(true);
    Ok(v)
}

/// Re-reads the token every `every` until the upstream is dropped; a bad
/// read keeps the last good token (the kubelet writes it atomically).
async fn reread_token(
    token: std::sync::Weak<ArcSwap<HeaderValue>>,
    path: PathBuf,
    every: Duration,
) {
    loop {
        tokio::time::sleep(every).await;
        let Some(current) = token.upgrade() else {
            return;
        };
        let read = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || read_token(&path)).await
        };
        match read {
            Ok(Ok(v)) => {
                if *current.load_full() != v {
                    tracing::info!(path = %path.display(), "ServiceAccount token re-read");
                    current.store(Arc::new(v));
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "keeping the last good ServiceAccount token"),
            Err(e) => tracing::warn!(error = %e, "token re-read task failed"),
        }
    }
}
