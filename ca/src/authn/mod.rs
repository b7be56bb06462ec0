//! Credential verification: turns what a caller presents into the one
//! identity it proves. Any combination of verifiers may be configured.
//!
//! Routing: a bearer token found in the join-token file is a join token; a
//! JWT whose `iss` is the configured service-account issuer goes to the
//! offline JWKS verifier; any other JWT goes to TokenReview (or to JWKS when
//! TokenReview is not configured). A TLS client certificate is a renewal and
//! must be a valid SVID of the CA's own trust bundle.

pub mod join_token;
pub mod k8s_jwks;
pub mod k8s_tokenreview;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls_pki_types::{CertificateDer, UnixTime};

use crate::spiffe_id::SpiffeId;
use crate::svid::{self, TrustBundle};

/// What a caller presented.
#[derive(Debug, Clone, Copy)]
pub enum Credential<'a> {
    /// `authorization: Bearer <token>`.
    Bearer(&'a str),
    /// The TLS client certificate chain (renewal by a still-valid SVID).
    PeerChain(&'a [CertificateDer<'static>]),
}

/// A proven identity and the verifier that proved it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    /// The caller's SPIFFE ID.
    pub id: SpiffeId,
    /// Which verifier proved it (`join-token`, `k8s-jwks`, `k8s-tokenreview`, `svid`).
    pub verifier: &'static str,
    /// When what it proves must end: an SVID renewing itself (else a
    /// stolen key would renew forever, one new serial after another, and
    /// revoking a serial would not end it).
    pub expires: Option<SystemTime>,
}

impl Authenticated {
    /// `ttl`, cut to end no later than the credential ([`Self::expires`]).
    pub fn cap(&self, ttl: Duration) -> Duration {
        match self.expires {
            Some(end) => ttl.min(end.duration_since(SystemTime::now()).unwrap_or_default()),
            None => ttl,
        }
    }
}

/// Why a credential proves nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthnError {
    /// No bearer token and no client certificate.
    #[error("no credential: send `authorization: Bearer <token>` or a client SVID")]
    NoCredential,
    /// The credential was checked and refused.
    #[error("{verifier}: {detail}")]
    Rejected {
        /// The verifier that refused it.
        verifier: &'static str,
        /// Stable label (`expired`, `wrong_audience`, `unknown_token`, ...).
        reason: &'static str,
        /// Human-readable cause (never contains the token).
        detail: String,
    },
    /// The verifier could not reach what it needs (API server, JWKS).
    #[error("{verifier} unavailable: {detail}")]
    Unavailable {
        /// The verifier that failed.
        verifier: &'static str,
        /// What failed.
        detail: String,
    },
}

impl AuthnError {
    /// The verifier's name, or `none`.
    pub fn verifier(&self) -> &'static str {
        match self {
            Self::NoCredential => "none",
            Self::Rejected { verifier, .. } | Self::Unavailable { verifier, .. } => verifier,
        }
    }

    /// A stable, low-cardinality label for metrics and audit lines.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoCredential => "no_credential",
            Self::Rejected { reason, .. } => reason,
            Self::Unavailable { .. } => "verifier_unavailable",
        }
    }

    pub(crate) fn rejected(
        verifier: &'static str,
        reason: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Self::Rejected {
            verifier,
            reason,
            detail: detail.into(),
        }
    }
}

/// The configured verifiers.
pub struct Authenticator {
    join_tokens: Option<join_token::JoinTokens>,
    jwks: Option<k8s_jwks::K8sJwks>,
    token_review: Option<k8s_tokenreview::TokenReview>,
    bundle: Arc<ArcSwap<TrustBundle>>,
}

impl Authenticator {
    /// Verifiers as configured; `bundle` is the CA's live trust bundle (renewals).
    pub fn new(
        join_tokens: Option<join_token::JoinTokens>,
        jwks: Option<k8s_jwks::K8sJwks>,
        token_review: Option<k8s_tokenreview::TokenReview>,
        bundle: Arc<ArcSwap<TrustBundle>>,
    ) -> Self {
        Self {
            join_tokens,
            jwks,
            token_review,
            bundle,
        }
    }

    /// Whether any bearer-token verifier is configured.
    pub fn has_token_verifier(&self) -> bool {
        self.join_tokens.is_some() || self.jwks.is_some() || self.token_review.is_some()
    }

    /// The JWKS verifier, if configured (its refresh task needs it).
    pub fn jwks(&self) -> Option<&k8s_jwks::K8sJwks> {
        self.jwks.as_ref()
    }

    /// The join-token verifier, if configured (its reload task needs it).
    pub fn join_tokens(&self) -> Option<&join_token::JoinTokens> {
        self.join_tokens.as_ref()
    }

    /// Proves an identity from a credential.
    pub async fn authenticate(&self, cred: Credential<'_>) -> Result<Authenticated, AuthnError> {
        match cred {
            Credential::PeerChain(chain) => {
                let bundle = self.bundle.load();
                svid::verify(chain, &bundle, UnixTime::now())
                    .map(|v| Authenticated {
                        id: v.id,
                        verifier: "svid",
                        expires: Some(v.not_after),
                    })
                    .map_err(|e| AuthnError::rejected("svid", e.reason(), e.to_string()))
            }
            Credential::Bearer(token) => self.bearer(token).await,
        }
    }

    async fn bearer(&self, token: &str) -> Result<Authenticated, AuthnError> {
        if let Some(join) = &self.join_tokens {
            if let Some(id) = join.lookup(token) {
                return Ok(Authenticated {
                    id,
                    verifier: join_token::NAME,
                    expires: None,
                });
            }
        }
        let is_jwt = token.split('.').count() == 3;
        if is_jwt {
            let to_jwks = match (&self.jwks, &self.token_review) {
                (Some(jwks), Some(_)) => jwks.claims_issuer(token),
                (Some(_), None) => true,
                _ => false,
            };
            if to_jwks {
                if let Some(jwks) = &self.jwks {
                    return jwks.verify(token).await.map(|id| Authenticated {
                        id,
                        verifier: k8s_jwks::NAME,
                        expires: None,
                    });
                }
            }
            if let Some(review) = &self.token_review {
                return review.verify(token).await.map(|id| Authenticated {
                    id,
                    verifier: k8s_tokenreview::NAME,
                    expires: None,
                });
            }
        }
        if self.join_tokens.is_some() {
            return Err(AuthnError::rejected(
                join_token::NAME,
                "unknown_token",
                "token is not in the join-token file",
            ));
        }
        Err(AuthnError::rejected(
            "none",
            "no_verifier",
            "no configured verifier accepts this kind of token",
        ))
    }
}
