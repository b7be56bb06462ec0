//! The gRPC `stepmesh.ca.v1.CertificateAuthority` service: authenticate,
//! rate-limit, check the CSR, sign, answer — and one audit line per
//! decision, written in exactly one place.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use futures_util::{Stream, StreamExt};
use rustls_pki_types::CertificateDer;
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};

use crate::authn::{Authenticated, Authenticator, AuthnError, Credential};
use crate::jwtsvid::{JwtSigner, JwtSvidError, MintedJwt};
use crate::metrics::{CaMetrics, SignLabels};
use crate::proto::v1 as pb;
use crate::proto::v1::certificate_authority_server::CertificateAuthority;
use crate::ratelimit::RateLimiter;
use crate::signer::{Csr, CsrError, Issued, Signer};
use crate::spiffe_id::TrustDomain;

/// What one connection told us about its peer (a request extension).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The peer's address.
    pub remote: Option<SocketAddr>,
    /// The TLS client certificate chain, if one was presented.
    pub peer_chain: Option<Arc<Vec<CertificateDer<'static>>>>,
}

/// The trust bundle as served, with its change counter.
#[derive(Debug, Clone)]
pub struct BundleState {
    /// PEM roots.
    pub pem: String,
    /// Increases by one on every change.
    pub sequence: u64,
}

/// The service state.
pub struct CaService {
    td: TrustDomain,
    signer: Arc<Signer>,
    authn: Arc<Authenticator>,
    limiter: RateLimiter,
    metrics: CaMetrics,
    bundle: watch::Receiver<Arc<BundleState>>,
    jwt: Arc<JwtSigner>,
}

/// A refused Sign call: what the caller gets and what the audit line says.
struct Refusal {
    status: Status,
    outcome: &'static str,
    verifier: &'static str,
    reason: &'static str,
    identity: Option<String>,
}

impl Refusal {
    fn authn(err: AuthnError) -> Self {
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

    fn csr(err: CsrError, who: &Authenticated) -> Self {
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

impl CaService {
    /// Wires the service.
    pub fn new(
        td: TrustDomain,
        signer: Arc<Signer>,
        authn: Arc<Authenticator>,
        limiter: RateLimiter,
        metrics: CaMetrics,
        bundle: watch::Receiver<Arc<BundleState>>,
        jwt: Arc<JwtSigner>,
    ) -> Self {
        Self {
            td,
            signer,
            authn,
            limiter,
            metrics,
            bundle,
            jwt,
        }
    }

    /// SignJwtSvid's decision: the caller's identity, then the token.
    async fn decide_jwt(
        &self,
        cred: Result<Credential<'_>, AuthnError>,
        req: &pb::SignJwtSvidRequest,
    ) -> Result<(Authenticated, MintedJwt), Refusal> {
        let who = self.admit(cred).await?;
        let ttl = JwtSigner::ttl_for(req.ttl_seconds);
        let minted = self.jwt.mint(&who.id, &req.audience, ttl).map_err(|e| {
            let (status, outcome, reason) = match &e {
                JwtSvidError::Audience(_) => (
                    Status::invalid_argument(e.to_string()),
                    "invalid",
                    "bad_audience",
                ),
                _ => (Status::internal(e.to_string()), "error", "sign_failed"),
            };
            Refusal {
                status,
                outcome,
                verifier: who.verifier,
                reason,
                identity: Some(who.id.to_string()),
            }
        })?;
        Ok((who, minted))
    }

    async fn decide(
        &self,
        cred: Result<Credential<'_>, AuthnError>,
        req: &pb::SignRequest,
    ) -> Result<(Authenticated, Issued, &'static str), Refusal> {
        let who = self.admit(cred).await?;
        let csr = Csr::from_pem(&req.csr_pem).map_err(|e| Refusal::csr(e, &who))?;
        csr.check_identity(&who.id)
            .map_err(|e| Refusal::csr(e, &who))?;
        let ttl = self
            .signer
            .ttl_for(req.ttl_seconds)
            .map_err(|e| Refusal::csr(e, &who))?;
        let issued = self.signer.sign(&csr, &who.id, ttl).map_err(|e| Refusal {
            status: Status::internal(e.to_string()),
            outcome: "error",
            verifier: who.verifier,
            reason: "sign_failed",
            identity: Some(who.id.to_string()),
        })?;
        Ok((who, issued, csr.key_type()))
    }

    /// Authenticates the credential and applies the caller's rate limit.
    async fn admit(
        &self,
        cred: Result<Credential<'_>, AuthnError>,
    ) -> Result<Authenticated, Refusal> {
        let who = match cred {
            Ok(cred) => self.authn.authenticate(cred).await,
            Err(e) => Err(e),
        }
        .map_err(Refusal::authn)?;
        if let Err(wait) = self.limiter.check(&who.id) {
            return Err(Refusal {
                status: Status::resource_exhausted(format!(
                    "rate limit for {}: retry in {:.1}s",
                    who.id,
                    wait.as_secs_f64()
                )),
                outcome: "rate_limited",
                verifier: who.verifier,
                reason: "rate_limited",
                identity: Some(who.id.to_string()),
            });
        }
        Ok(who)
    }
}

/// The caller's credential (a bearer token, else the TLS client chain) and
/// its address, for the audit line.
fn credential<T>(request: &Request<T>) -> (Result<Credential<'_>, AuthnError>, String) {
    let conn = request.extensions().get::<ConnInfo>();
    let peer = conn
        .and_then(|c| c.remote)
        .map(|p| p.to_string())
        .unwrap_or_default();
    let chain = conn.and_then(|c| c.peer_chain.as_deref());
    let cred = match (bearer(request.metadata()), chain) {
        (Err(e), _) => Err(e),
        (Ok(Some(token)), _) => Ok(Credential::Bearer(token)),
        (Ok(None), Some(chain)) => Ok(Credential::PeerChain(chain.as_slice())),
        (Ok(None), None) => Err(AuthnError::NoCredential),
    };
    (cred, peer)
}

/// The bearer token of `authorization`, if any; a malformed header is an error.
fn bearer(meta: &tonic::metadata::MetadataMap) -> Result<Option<&str>, AuthnError> {
    let Some(value) = meta.get("authorization") else {
        return Ok(None);
    };
    let bad = || {
        AuthnError::rejected(
            "none",
            "malformed_authorization",
            "authorization must be `Bearer <token>`",
        )
    };
    let value = value.to_str().map_err(|_| bad())?;
    let (scheme, token) = value.split_once(' ').ok_or_else(bad)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(bad());
    }
    Ok(Some(token.trim()))
}

fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

type BundleStream = Pin<Box<dyn Stream<Item = Result<pb::TrustBundle, Status>> + Send>>;

#[tonic::async_trait]
impl CertificateAuthority for CaService {
    async fn sign(
        &self,
        request: Request<pb::SignRequest>,
    ) -> Result<Response<pb::SignResponse>, Status> {
        let start = Instant::now();
        let conn = request.extensions().get::<ConnInfo>().cloned();
        let peer = conn.as_ref().and_then(|c| c.remote);
        let chain = conn.and_then(|c| c.peer_chain);
        let cred = match (bearer(request.metadata()), &chain) {
            (Err(e), _) => Err(e),
            (Ok(Some(token)), _) => Ok(Credential::Bearer(token)),
            (Ok(None), Some(chain)) => Ok(Credential::PeerChain(chain.as_slice())),
            (Ok(None), None) => Err(AuthnError::NoCredential),
        };
        let result = self.decide(cred, request.get_ref()).await;
        self.metrics
            .sign_duration
            .observe(start.elapsed().as_secs_f64());
        let peer = peer.map(|p| p.to_string()).unwrap_or_default();
        match result {
            Ok((who, issued, key_type)) => {
                let expires_at = unix_secs(issued.not_after);
                tracing::info!(
                    target: "stepmesh_ca::audit",
                    decision = "sign",
                    outcome = "issued",
                    identity = %who.id,
                    serial = %issued.serial,
                    not_after = expires_at,
                    verifier = who.verifier,
                    key_type,
                    peer = %peer,
                    "issued an SVID"
                );
                self.metrics
                    .sign
                    .get_or_create(&SignLabels {
                        outcome: "issued",
                        verifier: who.verifier,
                        reason: "ok",
                    })
                    .inc();
                let bundle = self.bundle.borrow().clone();
                Ok(Response::new(pb::SignResponse {
                    cert_chain_pem: issued
                        .chain
                        .iter()
                        .map(|c| crate::pem::encode("CERTIFICATE", c))
                        .collect(),
                    trust_bundle_pem: bundle.pem.clone(),
                    expires_at,
                }))
            }
            Err(refusal) => {
                tracing::warn!(
                    target: "stepmesh_ca::audit",
                    decision = "sign",
                    outcome = refusal.outcome,
                    identity = refusal.identity.as_deref().unwrap_or(""),
                    verifier = refusal.verifier,
                    reason = refusal.reason,
                    detail = refusal.status.message(),
                    peer = %peer,
                    "refused to sign"
                );
                self.metrics
                    .sign
                    .get_or_create(&SignLabels {
                        outcome: refusal.outcome,
                        verifier: refusal.verifier,
                        reason: refusal.reason,
                    })
                    .inc();
                Err(refusal.status)
            }
        }
    }

    async fn sign_jwt_svid(
        &self,
        request: Request<pb::SignJwtSvidRequest>,
    ) -> Result<Response<pb::SignJwtSvidResponse>, Status> {
        let (cred, peer) = credential(&request);
        let result = self.decide_jwt(cred, request.get_ref()).await;
        match result {
            Ok((who, minted)) => {
                let expires_at = unix_secs(minted.expires_at);
                tracing::info!(
                    target: "stepmesh_ca::audit",
                    decision = "sign_jwt_svid",
                    outcome = "issued",
                    identity = %who.id,
                    audience = ?request.get_ref().audience,
                    not_after = expires_at,
                    verifier = who.verifier,
                    peer = %peer,
                    "issued a JWT-SVID"
                );
                Ok(Response::new(pb::SignJwtSvidResponse {
                    token: minted.token,
                    spiffe_id: who.id.to_string(),
                    expires_at,
                }))
            }
            Err(refusal) => {
                tracing::warn!(
                    target: "stepmesh_ca::audit",
                    decision = "sign_jwt_svid",
                    outcome = refusal.outcome,
                    identity = refusal.identity.as_deref().unwrap_or(""),
                    verifier = refusal.verifier,
                    reason = refusal.reason,
                    detail = refusal.status.message(),
                    peer = %peer,
                    "refused to sign a JWT-SVID"
                );
                Err(refusal.status)
            }
        }
    }

    async fn get_trust_bundle(
        &self,
        _request: Request<pb::GetTrustBundleRequest>,
    ) -> Result<Response<pb::TrustBundle>, Status> {
        let state = self.bundle.borrow().clone();
        Ok(Response::new(to_proto(&self.td, &state, &self.jwt)))
    }

    type WatchTrustBundleStream = BundleStream;

    async fn watch_trust_bundle(
        &self,
        _request: Request<pb::WatchTrustBundleRequest>,
    ) -> Result<Response<Self::WatchTrustBundleStream>, Status> {
        let (td, jwt) = (self.td.clone(), self.jwt.clone());
        let stream =
            WatchStream::new(self.bundle.clone()).map(move |state| Ok(to_proto(&td, &state, &jwt)));
        Ok(Response::new(Box::pin(stream)))
    }
}

fn to_proto(td: &TrustDomain, state: &BundleState, jwt: &JwtSigner) -> pb::TrustBundle {
    pb::TrustBundle {
        trust_domain: td.to_string(),
        bundle_pem: state.pem.clone(),
        sequence: state.sequence,
        jwks_json: jwt.jwks_json().to_owned(),
    }
}
