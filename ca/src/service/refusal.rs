//! A refused Sign or SignJwtSvid call as one value: the status the caller
//! gets and the fields of its audit line, built from the authenticator's or
//! the CSR check's error, so that the refusal is written in exactly one
//! place whichever step refused.

use tonic::Status;

use crate::authn::{Authenticated, AuthnError};
use crate::signer::CsrError;

/// A refused Sign call: what the caller gets and what the audit line says.
pub(super) struct Refusal {
    pub(super) status: Status,
    pub(super) outcome: &'static str,
    pub(super) verifier: &'static str,
    pub(super) reason: &'static str,
    pub(super) identity: Option<String>,
}

impl Refusal {
    /// The audit line of a refused `decision` (`sign`, `sign_jwt_svid`).
    pub(super) fn audit(&self, decision: &'static str, peer: &str) {
        tracing::warn!(
            target: "stepmesh_ca::audit",
            decision,
            outcome = self.outcome,
            identity = self.identity.as_deref().unwrap_or(""),
            verifier = self.verifier,
            reason = self.reason,
            detail = self.status.message(),
            peer,
            "refused to sign ({decision})"
        );
    }

    pub(super) fn authn(err: AuthnError) -> Self {
        let status = match &err {
            AuthnError::Unavailable { .. } => Status::unavailable(err.to_string()),
            _ => Status::unauthenticated(err.to_string()),
        };
        let outcome = match &err {
            AuthnError::Unavailable { .. } => "unavailable",
            _ => "unauthenticated",
        };
        Self {
            status,
            outcome,
            verifier: err.verifier(),
            reason: err.reason(),
            identity: None,
        }
    }

    /// The source address's requests exceed its rate (checked before
    /// authentication: no identity, no verifier).
    pub(super) fn source_limited(source: std::net::IpAddr, wait: std::time::Duration) -> Self {
        Self {
            status: Status::resource_exhausted(format!(
                "too many requests from {source}: retry in {:.1}s",
                wait.as_secs_f64()
            )),
            outcome: "rate_limited",
            verifier: "none",
            reason: "source_rate_limited",
            identity: None,
        }
    }

    pub(super) fn csr(err: CsrError, who: &Authenticated) -> Self {
        let (status, outcome) = match &err {
            CsrError::IdentityMismatch { .. } => {
                (Status::permission_denied(err.to_string()), "denied")
            }
            _ => (Status::invalid_argument(err.to_string()), "invalid"),
        };
        Self {
            status,
            outcome,
            verifier: who.verifier,
            reason: err.reason(),
            identity: Some(who.id.to_string()),
        }
    }
}
