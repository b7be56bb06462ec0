//! One request through the gateway: the challenge endpoint for `stepmesh
//! login`, or decide → refuse with a `Status`, or rewrite → forward →
//! stream the answer back (watches and long lists chunk by chunk; an
//! upgrade's two halves spliced byte for byte). One JSON audit line each.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Serialize;

use super::answer::{status, PendingStepUps};
use super::classify::RequestInfo;
use super::conn::ConnectionPlaces;
use super::decide::{authenticate, decide, Decision, Pending, Verdict};
use super::upstream::{Lane, Upstream};
use crate::accesslog::{AccessLog, Timestamp};
use crate::policy::PolicyWatch;
use crate::stepup::gate::unix_now;
use crate::stepup::StepUp;
use stepmesh_ca::https::error_chain;

/// Where `stepmesh login` reads the step-up a person owes.
pub use crate::stepup::pending::PATH as CHALLENGE_PATH;

/// A response body: our own, or the API server's streamed through.
pub type Body = Either<Full<Bytes>, Incoming>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    decision: &'static str,
    rule: String,
}

/// The gateway's metric families.
#[derive(Debug, Clone, Default)]
pub struct GatewayMetrics {
    requests: Family<RequestLabels, Counter>,
    upstream_errors: Counter,
    h2_header_timeouts: Counter,
}

impl GatewayMetrics {
    /// Registers `stepmesh_gateway_requests_total{decision,rule}`,
    /// `stepmesh_gateway_upstream_errors_total` and
    /// `stepmesh_gateway_h2_header_timeouts_total`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "stepmesh_gateway_requests",
            "API requests by decision (allowed, exempt, step_up_ok, challenge_pending, challenge_none, a refusal reason) and rule",
            m.requests.clone(),
        );
        registry.register(
            "stepmesh_gateway_upstream_errors",
            "Requests the API server could not be reached for (502)",
            m.upstream_errors.clone(),
        );
        registry.register(
            "stepmesh_gateway_h2_header_timeouts",
            "HTTP/2 connections closed because a frame or header block was not whole within 10 s of its first byte (slow clients)",
            m.h2_header_timeouts.clone(),
        );
        m
    }

    /// The counter of HTTP/2 connections the header deadline closed.
    pub fn h2_header_timeouts(&self) -> Counter {
        self.h2_header_timeouts.clone()
    }
}

/// What every request shares.
pub struct Gateway {
    /// The live policy (hot-reloaded).
    pub policy: PolicyWatch,
    /// Providers, keys and verified-token caches.
    pub stepup: StepUp,
    /// The API server.
    pub upstream: Upstream,
    /// Step-ups owed, for the login plugin.
    pub pending: PendingStepUps,
    /// One JSON line per request.
    pub audit: AccessLog,
    /// Counters.
    pub metrics: GatewayMetrics,
}

/// The audit line of one request.
#[derive(Debug, Serialize)]
struct AuditRecord<'a> {
    ts: Timestamp,
    kind: &'static str,
    /// The connection's peer address: what the API server's audit records
    /// as the first of `sourceIPs` (the gateway sets `X-Forwarded-For`).
    client: IpAddr,
    user: Option<&'a str>,
    groups: &'a [String],
    verb: Option<&'a str>,
    method: &'a str,
    path: &'a str,
    api_group: Option<&'a str>,
    resource: Option<&'a str>,
    subresource: Option<&'a str>,
    namespace: Option<&'a str>,
    name: Option<&'a str>,
    rule: Option<&'a str>,
    decision: &'static str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    would_deny: bool,
    acr: Option<&'a str>,
    auth_time: Option<u64>,
    status: u16,
    duration_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl Gateway {
    /// Answers one request from `client` (the connection's peer address).
    pub async fn handle(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        client: IpAddr,
    ) -> Response<Body> {
        let started = Instant::now();
        let now = unix_now();
        let policy = self.policy.current();
        if req.uri().path() == CHALLENGE_PATH {
            // Audited as every request: a token tried here is one tried.
            let (response, d) = self.challenge(&req, now).await;
            self.record(
                &d,
                client,
                req.method(),
                CHALLENGE_PATH,
                response.status(),
                started,
                None,
            );
            return response.map(own_bytes);
        }
        let d = decide(
            &policy,
            &self.stepup,
            req.method(),
            req.uri(),
            req.headers(),
            now,
        )
        .await;
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let (response, error) = match (&d.verdict, &d.person) {
            (Verdict::Forward, Some(person)) => {
                if d.reason == "step_up_ok" {
                    if let Some(rule) = &d.rule {
                        self.pending.met(&person.username, rule);
                    }
                }
                let upgrade = is_upgrade(&req);
                match self.upstream.rewrite(&mut req, person, client, upgrade) {
                    Ok(()) => {
                        let lane = if upgrade {
                            Lane::Upgrade
                        } else if d.info.as_ref().is_some_and(is_long_running) {
                            Lane::Stream
                        } else {
                            Lane::Shared
                        };
                        self.forward(req, lane).await
                    }
                    Err(why) => (status(StatusCode::BAD_REQUEST, why).map(own_bytes), None),
                }
            }
            (verdict, _) => (self.refusal(verdict, &d).map(own_bytes), None),
        };
        self.record(
            &d,
            client,
            &method,
            &path,
            response.status(),
            started,
            error,
        );
        response
    }

    /// The step-up a person owes (`stepmesh login`'s question), and what to
    /// audit of it: `challenge_pending` (200), `challenge_none` (204), or
    /// why it was refused.
    async fn challenge(&self, req: &Request<Incoming>, now: u64) -> (Response<Bytes>, Decision) {
        if req.method() != Method::GET {
            let answer = status(StatusCode::METHOD_NOT_ALLOWED, "use GET");
            return (answer, Decision::about("method_not_allowed", None));
        }
        let policy = self.policy.current();
        let person = match authenticate(&policy, &self.stepup, req.headers(), now).await {
            Ok(person) => person,
            Err((reason, challenge, message)) => {
                let mut r = status(StatusCode::UNAUTHORIZED, &message);
                r.headers_mut().insert(header::WWW_AUTHENTICATE, challenge);
                return (r, Decision::about(reason, None));
            }
        };
        let (answer, reason) = match self.pending.get(&person.username, now) {
            None => {
                let mut r = Response::new(Bytes::new());
                *r.status_mut() = StatusCode::NO_CONTENT;
                (r, "challenge_none")
            }
            Some(p) => {
                let mut r = Response::new(Bytes::from(serde_json::to_vec(&p).unwrap_or_default()));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                (r, "challenge_pending")
            }
        };
        (answer, Decision::about(reason, Some(person)))
    }

    fn refusal(&self, verdict: &Verdict, d: &Decision) -> Response<Bytes> {
        match verdict {
            Verdict::BadRequest(m) => status(StatusCode::BAD_REQUEST, m),
            Verdict::Forbidden(m) => status(StatusCode::FORBIDDEN, m),
            Verdict::Unauthorized(challenge, m) => {
                let mut r = status(StatusCode::UNAUTHORIZED, m);
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, challenge.clone());
                r
            }
            Verdict::StepUp(challenge, m, pending) => {
                if let Some(p) = &d.person {
                    self.pending.record(&p.username, Pending::clone(pending));
                }
                let mut r = status(StatusCode::UNAUTHORIZED, m);
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, challenge.clone());
                r
            }
            // A forward without a person cannot happen (decide authenticates
            // first); refuse rather than forward anonymously.
            Verdict::Forward => status(StatusCode::UNAUTHORIZED, "not authenticated"),
        }
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        lane: Lane,
    ) -> (Response<Body>, Option<String>) {
        // Not sent on: an upgrade's session holds them until it ends.
        let places = req.extensions_mut().remove::<ConnectionPlaces>();
        let client_upgrade = (lane == Lane::Upgrade).then(|| hyper::upgrade::on(&mut req));
        let mut resp = match self.upstream.send(req, lane).await {
            Ok(r) => r,
            Err(e) => {
                self.metrics.upstream_errors.inc();
                let why = error_chain(&e);
                tracing::warn!(error = %why, "API server unreachable");
                let r = status(
                    StatusCode::BAD_GATEWAY,
                    "the gateway could not reach the API server",
                );
                return (r.map(own_bytes), Some(why));
            }
        };
        if let Some(client_upgrade) = client_upgrade {
            if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                let upstream_upgrade = hyper::upgrade::on(&mut resp);
                tokio::spawn(splice(client_upgrade, upstream_upgrade, places));
            }
        } else {
            super::upstream::strip_hop_by_hop(resp.headers_mut(), false);
        }
        (resp.map(Either::Right), None)
    }

    /// Counts one answered request and writes its audit line.
    #[allow(clippy::too_many_arguments)] // one audit line's fields, each its own
    fn record(
        &self,
        d: &Decision,
        client: IpAddr,
        method: &Method,
        path: &str,
        status: StatusCode,
        started: Instant,
        error: Option<String>,
    ) {
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                decision: d.reason,
                rule: d.rule.as_deref().unwrap_or("").to_owned(),
            })
            .inc();
        let info = d.info.as_ref();
        let res = |f: fn(&super::classify::RequestInfo) -> &String| {
            info.filter(|i| i.is_resource_request)
                .map(|i| f(i).as_str())
        };
        let person = d.person.as_ref();
        self.audit.log_json(&AuditRecord {
            ts: Timestamp::now(),
            kind: "gateway",
            client,
            user: person.map(|p| p.username.as_str()),
            groups: person.map_or(&[], |p| p.groups.as_slice()),
            verb: info.map(|i| i.verb.as_str()),
            method: method.as_str(),
            path,
            api_group: res(|i| &i.api_group),
            resource: res(|i| &i.resource),
            subresource: res(|i| &i.subresource).filter(|s| !s.is_empty()),
            namespace: res(|i| &i.namespace).filter(|s| !s.is_empty()),
            name: res(|i| &i.name).filter(|s| !s.is_empty()),
            rule: d.rule.as_deref(),
            decision: d.reason,
            would_deny: d.would_deny,
            acr: person.and_then(|p| p.token.acr.as_deref()),
            auth_time: person.and_then(|p| p.token.auth_time),
            status: status.as_u16(),
            duration_ms: started.elapsed().as_secs_f64() * 1e3,
            error,
        });
    }
}

fn own_bytes(b: Bytes) -> Body {
    Either::Left(Full::new(b))
}

/// A request that may stay open for as long as the client likes: a watch,
/// a pod's log (`follow=true`), a proxied request.
fn is_long_running(info: &RequestInfo) -> bool {
    info.verb == "watch"
        || info.verb == "proxy"
        || (info.is_resource_request && matches!(info.subresource.as_str(), "log" | "proxy"))
}

/// `Connection: upgrade` with an `Upgrade` header (WebSocket, SPDY/3.1).
fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == http::Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Copies both ways between the client's and the API server's upgraded
/// connections until both sides are done, holding the client connection's
/// places under the connection limits (`None` outside a served
/// connection) until then.
async fn splice(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    _places: Option<ConnectionPlaces>,
) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => return tracing::debug!(error = %e, "upgrade did not complete"),
    };
    let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((up, down)) => tracing::debug!(up, down, "upgraded stream closed"),
        Err(e) => tracing::debug!(error = %e, "upgraded stream ended with an error"),
    }
}
