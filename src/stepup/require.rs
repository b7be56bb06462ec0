//! A route's demands on a verified token: the workload a JWT-SVID names
//! (`sub` against the route's `stepUp.from`), binding to the calling
//! workload (`azp`, or `cnf.x5t#S256` per RFC 8705), then `acr` (any of), `amr` (all
//! of), generic claims (equal, or an array containing) and `maxAge` on
//! `auth_time`. Cheap enough to run on every request, cached token or not.

use serde_json::Value;

use super::verify::{TokenError, VerifiedToken};
use crate::policy::{BindToPeer, SpiffeId, StepUpRule};

/// Which requirement of the route the authentication does not meet: each is
/// a `401 insufficient_user_authentication` (RFC 9470).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmet {
    /// `acr` missing or not one of the route's values.
    Acr,
    /// `amr` lacks one of the route's methods.
    Amr,
    /// A required claim is missing or different.
    Claims,
    /// `auth_time` missing or older than `maxAge`.
    MaxAge,
}

impl Unmet {
    /// A stable metric/log label.
    pub fn reason(&self) -> &'static str {
        match self {
            Unmet::Acr => "insufficient_acr",
            Unmet::Amr => "insufficient_amr",
            Unmet::Claims => "insufficient_claims",
            Unmet::MaxAge => "stale_auth_time",
        }
    }

    /// The `error_description` of the challenge.
    pub fn description(&self) -> &'static str {
        match self {
            Unmet::Acr => "A different authentication level is required",
            Unmet::Amr => "A stronger authentication method is required",
            Unmet::Claims => "The authentication does not carry the required context",
            Unmet::MaxAge => "More recent authentication is required",
        }
    }
}

/// Why a verified token does not open the route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The token is not acceptable at all (bound to another workload).
    Invalid(TokenError),
    /// The person must authenticate again, more strongly or more recently.
    Insufficient(Unmet),
}

/// The calling workload, as the token binding sees it.
#[derive(Debug, Clone, Copy)]
pub struct Peer<'a> {
    /// Its SPIFFE ID (from the verified SVID).
    pub id: &'a SpiffeId,
    /// base64url(SHA-256(leaf certificate DER)), RFC 8705 §3.1.
    pub x5t_s256: &'a str,
}

/// Checks `rule` against `token` for `peer` at `now` (seconds). Without a
/// peer (the Kubernetes gateway: a person, no workload) a rule that binds
/// to one cannot be met.
pub fn check(
    rule: &StepUpRule,
    token: &VerifiedToken,
    peer: Option<Peer<'_>>,
    now: u64,
    leeway: u64,
) -> Result<(), Failure> {
    if let Some(from) = &rule.from {
        let named = token
            .sub
            .as_deref()
            .and_then(|s| SpiffeId::parse(s).ok())
            .is_some_and(|id| from.iter().any(|p| p.matches(&id)));
        if !named {
            return Err(Failure::Invalid(TokenError::WrongSubject));
        }
    }
    match rule.bind {
        BindToPeer::None => {}
        BindToPeer::Azp if peer.is_none_or(|p| token.azp.as_deref() != Some(p.id.as_str())) => {
            return Err(Failure::Invalid(TokenError::AzpMismatch));
        }
        BindToPeer::Cnf if peer.is_none_or(|p| token.cnf_x5t.as_deref() != Some(p.x5t_s256)) => {
            return Err(Failure::Invalid(TokenError::CnfMismatch));
        }
        _ => {}
    }
    if !rule.acr.is_empty() && !token.acr.as_ref().is_some_and(|a| rule.acr.contains(a)) {
        return Err(Failure::Insufficient(Unmet::Acr));
    }
    if !rule.amr.iter().all(|m| token.amr.contains(m)) {
        return Err(Failure::Insufficient(Unmet::Amr));
    }
    for (name, want) in &rule.claims {
        let ok = match token.claims.get(name) {
            Some(Value::Array(items)) => items.contains(want),
            Some(v) => v == want,
            None => false,
        };
        if !ok {
            return Err(Failure::Insufficient(Unmet::Claims));
        }
    }
    if let Some(max_age) = rule.max_age {
        // A login in the future (past the leeway) is no login: it would
        // stay "fresh" until the token expires.
        let fresh = token.auth_time.is_some_and(|t| {
            t <= now.saturating_add(leeway)
                && now.saturating_sub(t) <= max_age.as_secs().saturating_add(leeway)
        });
        if !fresh {
            return Err(Failure::Insufficient(Unmet::MaxAge));
        }
    }
    Ok(())
}

/// base64url(SHA-256(DER)): the `x5t#S256` of a certificate.
pub fn x5t_s256(cert_der: &[u8]) -> String {
    use base64::Engine as _;
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert_der);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(d.as_ref())
}
