//! The per-request decision on an HTTP port, in SPEC.md's order: identity
//! (port allow list, route `from`) → 403; sensitive route without token →
//! 401 (RFC 6750); token invalid or bound to another workload → 401
//! `invalid_token`; authentication not strong or recent enough → 401
//! `insufficient_user_authentication` (RFC 9470); else forward. Before all
//! of it, on a port with routes, a request target the policy cannot read
//! unambiguously is refused (400, `policy::target`). Shared by the HTTP
//! proxy and `stepmesh policy explain`.

use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};

use super::require::{self, Failure, Peer};
use super::{challenge, StepUp};
use crate::policy::target::Refusal;
use crate::policy::{JwksSource, Mode, Policy, SpiffeId, StepUpRule};

/// What the proxy does with the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Forward it.
    Allow,
    /// Answer 400: the target cannot be matched safely.
    BadRequest(Refusal),
    /// Answer 403.
    Forbidden,
    /// Answer 401 with this `WWW-Authenticate`.
    Challenge(HeaderValue),
}

/// A request's decision, with what the access log and metrics need.
#[derive(Debug, Clone)]
pub struct GateDecision {
    /// Audit mode already applied (`Allow` with `would_deny`).
    pub outcome: Outcome,
    /// Audit mode: enforce mode would have refused.
    pub would_deny: bool,
    /// The rule that decided: a route name, an allow rule, a default.
    pub rule: Arc<str>,
    /// The matched route, if any.
    pub route: Option<Arc<str>>,
    /// A stable label: `allowed`, `authenticated`, `not_allowed`,
    /// `route_not_allowed`, `default_deny`, `foreign_trust_domain`,
    /// `step_up_ok`, `no_token`, an `invalid_token` cause (`expired`, ...)
    /// or an insufficiency (`insufficient_acr`, `stale_auth_time`, ...).
    pub reason: &'static str,
    /// The verified `sub`, for `x-stepup-sub`.
    pub subject: Option<String>,
    /// The token header to remove before forwarding (unless `forward: true`).
    pub strip: Option<HeaderName>,
}

impl GateDecision {
    /// The HTTP status the proxy answers with itself (None: forward).
    pub fn status(&self) -> Option<http::StatusCode> {
        match self.outcome {
            Outcome::Allow => None,
            Outcome::BadRequest(_) => Some(http::StatusCode::BAD_REQUEST),
            Outcome::Forbidden => Some(http::StatusCode::FORBIDDEN),
            Outcome::Challenge(_) => Some(http::StatusCode::UNAUTHORIZED),
        }
    }
}

/// The request facts the decision uses.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    /// The calling workload.
    pub peer: Peer<'a>,
    /// The port the caller dialled.
    pub port: u16,
    /// Request method.
    pub method: &'a Method,
    /// Request target (its query is ignored).
    pub uri: &'a Uri,
    /// Request headers (the token is read from them).
    pub headers: &'a HeaderMap,
}

/// The token a request carries, or why there is none usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token<'h> {
    /// No token header (or `Authorization` of another scheme).
    Absent,
    /// Twice, or not text: refused as malformed rather than guessed.
    Ambiguous,
    /// The token.
    Present(&'h str),
}

/// The token in `header` (`Authorization: Bearer`, or another header's
/// value with or without `Bearer`): the one reading of where a token is.
pub fn token<'h>(header: &HeaderName, headers: &'h HeaderMap) -> Token<'h> {
    let mut values = headers.get_all(header).iter();
    let Some(value) = values.next() else {
        return Token::Absent;
    };
    if values.next().is_some() {
        return Token::Ambiguous;
    }
    let Ok(value) = value.to_str() else {
        return Token::Ambiguous;
    };
    let value = value.trim();
    let bearer = value
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim());
    if header == http::header::AUTHORIZATION {
        // Another scheme (Basic, ...) carries no step-up token.
        return bearer
            .filter(|t| !t.is_empty())
            .map_or(Token::Absent, Token::Present);
    }
    match bearer.unwrap_or(value) {
        "" => Token::Absent,
        t => Token::Present(t),
    }
}

/// Seconds since the epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Decides one request. `now` is seconds since the epoch.
pub async fn decide(
    policy: &Policy,
    stepup: &StepUp,
    req: RequestInfo<'_>,
    now: u64,
) -> GateDecision {
    let matched =
        match policy.authorize_request(req.peer.id, req.port, req.method, req.uri, req.headers) {
            Ok(m) => m,
            Err(refusal) => {
                return GateDecision {
                    rule: Arc::from(match &refusal {
                        Refusal::Ambiguous(a, b) => format!("routes {a} | {b}"),
                        _ => "request target".to_owned(),
                    }),
                    route: None,
                    reason: refusal.reason(),
                    outcome: Outcome::BadRequest(refusal),
                    would_deny: false,
                    subject: None,
                    strip: None,
                };
            }
        };
    let route = matched.route.map(|r| r.name.clone());
    let id = matched.decision;
    let mut d = GateDecision {
        outcome: Outcome::Allow,
        would_deny: id.would_deny,
        rule: id.rule,
        route,
        reason: id.reason,
        subject: None,
        strip: None,
    };
    if !id.allow {
        stepup.metrics().challenge(d.reason);
        d.outcome = Outcome::Forbidden;
        return d;
    }
    let Some((route, rule)) = matched
        .route
        .and_then(|r| r.step_up.as_ref().map(|s| (r, s)))
    else {
        return d;
    };
    d.rule = route.name.clone();
    if !rule.forward {
        d.strip = Some(rule.header.clone());
    }
    // Boxed: only a step-up route gets here, and its verification's future
    // (a JWKS fetch within) would size every request's decision future,
    // which the relay moves twice per request (callgrind).
    let refused = match Box::pin(step_up(policy, stepup, rule, req, now)).await {
        Ok(sub) => {
            d.subject = sub;
            d.reason = if d.would_deny { d.reason } else { "step_up_ok" };
            return d;
        }
        Err(refusal) => refusal,
    };
    stepup.metrics().challenge(refused.0);
    d.reason = refused.0;
    match policy.mode() {
        Mode::Enforce => d.outcome = Outcome::Challenge(refused.1),
        Mode::Audit => d.would_deny = true,
    }
    d
}

/// Ok(subject), or Err((reason, challenge)).
async fn step_up(
    policy: &Policy,
    stepup: &StepUp,
    rule: &StepUpRule,
    req: RequestInfo<'_>,
    now: u64,
) -> Result<Option<String>, (&'static str, HeaderValue)> {
    use super::verify::TokenError;
    let token = match token(&rule.header, req.headers) {
        Token::Absent => return Err(("no_token", challenge::no_token(rule))),
        Token::Ambiguous => {
            return Err((
                TokenError::Malformed.reason(),
                challenge::invalid_token(TokenError::Malformed),
            ))
        }
        Token::Present(t) => t,
    };
    let invalid = |e: TokenError| (e.reason(), challenge::invalid_token(e));
    // Validated at load: every route names a provider of the same policy.
    let config = policy
        .provider(&rule.provider)
        .ok_or_else(|| invalid(TokenError::NoKeys))?;
    let provider = stepup.provider(config).await;
    let verified = provider.verify(token, now).await.map_err(invalid)?;
    // A JWT-SVID's `sub` is a workload of this trust domain, or nothing.
    if config.jwks == JwksSource::Mesh {
        let ours = verified
            .sub
            .as_deref()
            .and_then(|s| SpiffeId::parse(s).ok())
            .is_some_and(|id| id.trust_domain() == policy.trust_domain());
        if !ours {
            return Err(invalid(TokenError::WrongSubject));
        }
    }
    match require::check(
        rule,
        &verified,
        Some(req.peer),
        now,
        config.token.leeway.as_secs(),
    ) {
        Ok(()) => Ok(verified.sub.clone()),
        Err(Failure::Invalid(e)) => Err(invalid(e)),
        Err(Failure::Insufficient(unmet)) => {
            Err((unmet.reason(), challenge::insufficient(rule, unmet)))
        }
    }
}

#[cfg(test)]
#[path = "gate_tests.rs"]
mod tests;
