//! The gRPC `stepmesh.ca.v1.CertificateAuthority` service: authenticate,
//! rate-limit, check the CSR, sign, answer — and one audit line per
//! decision, written in exactly one place. A refusal's status and audit
//! fields are built in `service/refusal.rs`; the admin calls' token gate
//! and audit in `service/admin_gate.rs`.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use futures_util::Stream;
use rustls_pki_types::CertificateDer;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::authn::{Authenticated, Authenticator, AuthnError, Credential};
use crate::jwtsvid::{JwtSigner, JwtSvidError, MintedJwt};
use crate::metrics::{CaMetrics, SignLabels};
use crate::proto::v1 as pb;
use crate::proto::v1::certificate_authority_server::CertificateAuthority;
use crate::ratelimit::RateLimiter;
use crate::revocation::{Revocations, Target};
use crate::signer::{Csr, Issued, Signer};
use crate::spiffe_id::{SpiffeId, TrustDomain};

mod admin_gate;
mod refusal;

use self::admin_gate::revoke_status;
use self::refusal::Refusal;

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
    limits: Limits,
    metrics: CaMetrics,
    bundle: watch::Receiver<Arc<BundleState>>,
    revocations: Arc<Revocations>,
    /// `--admin-token-file`: read on every admin call (so a rotated Secret
    /// takes effect); `None`: the admin calls are refused.
    admin_token: Option<std::path::PathBuf>,
    jwt: Arc<JwtSigner>,
}

/// The CA's two signing keys (no `Debug`: they hold private keys).
pub struct Signers {
    /// X.509-SVIDs (the intermediate or root).
    pub x509: Arc<Signer>,
    /// JWT-SVIDs (its own key, published as a JWK set).
    pub jwt: Arc<JwtSigner>,
}

/// The rate limits on Sign and SignJwtSvid.
pub struct Limits {
    /// Sign per authenticated identity and source address (`--sign-rate`,
    /// `--sign-burst`): each pod of an identity has a bucket of its own.
    /// Per identity alone, one pod calling in a loop locked every other
    /// pod of its service account out, and a rollout of more replicas
    /// than the burst waited past their startup probes (found by review).
    pub identity: RateLimiter<Bucketed>,
    /// SignJwtSvid likewise, at the same rate: a bucket of its own, so
    /// that an app asking for JWT-SVIDs without end (each pod's Workload
    /// API mints for its apps) cannot hold back X.509 SVIDs.
    pub jwt: RateLimiter<Bucketed>,
    /// Per source address, before authentication (`--source-rate`,
    /// `--source-burst`): a client sending forged tokens is slowed before
    /// they cost a TokenReview or a signature check.
    pub source: RateLimiter<IpAddr>,
}

/// The key of a signing bucket: who asks, and from where (none: an
/// address the connection did not carry).
pub type Bucketed = (SpiffeId, Option<IpAddr>);

/// What the admin calls work on.
#[derive(Debug)]
pub struct AdminState {
    /// The revocation list (also consulted by every Sign).
    pub revocations: Arc<Revocations>,
    /// `--admin-token-file`; `None`: admin calls refused.
    pub admin_token: Option<std::path::PathBuf>,
}

impl CaService {
    /// Wires the service.
    pub fn new(
        td: TrustDomain,
        signers: Signers,
        authn: Arc<Authenticator>,
        limits: Limits,
        metrics: CaMetrics,
        bundle: watch::Receiver<Arc<BundleState>>,
        admin: AdminState,
    ) -> Self {
        let AdminState {
            revocations,
            admin_token,
        } = admin;
        let Signers { x509: signer, jwt } = signers;
        Self {
            td,
            signer,
            authn,
            limits,
            metrics,
            bundle,
            revocations,
            admin_token,
            jwt,
        }
    }

    /// SignJwtSvid's decision: the caller's identity, then the token.
    async fn decide_jwt(
        &self,
        caller: Caller<'_>,
        req: &pb::SignJwtSvidRequest,
    ) -> Result<(Authenticated, MintedJwt), Refusal> {
        let who = self.admit(caller, &self.limits.jwt).await?;
        let ttl = who.cap(JwtSigner::ttl_for(req.ttl_seconds));
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
        caller: Caller<'_>,
        req: &pb::SignRequest,
    ) -> Result<(Authenticated, Issued, &'static str), Refusal> {
        let who = self.admit(caller, &self.limits.identity).await?;
        let csr = Csr::from_pem(&req.csr_pem).map_err(|e| Refusal::csr(e, &who))?;
        csr.check_identity(&who.id)
            .map_err(|e| Refusal::csr(e, &who))?;
        let ttl = self
            .signer
            .ttl_for(req.ttl_seconds)
            .map_err(|e| Refusal::csr(e, &who))?;
        let ttl = who.cap(ttl);
        let issued = self.signer.sign(&csr, &who.id, ttl).map_err(|e| Refusal {
            status: Status::internal(e.to_string()),
            outcome: "error",
            verifier: who.verifier,
            reason: "sign_failed",
            identity: Some(who.id.to_string()),
        })?;
        Ok((who, issued, csr.key_type()))
    }

    /// Applies the source's rate limit, authenticates the credential,
    /// refuses a revoked identity or a revoked renewing SVID, and applies
    /// the caller's rate limit in `bucket` (Sign and SignJwtSvid alike).
    async fn admit(
        &self,
        caller: Caller<'_>,
        bucket: &RateLimiter<Bucketed>,
    ) -> Result<Authenticated, Refusal> {
        if let Some(source) = caller.source {
            self.limits
                .source
                .check(&source)
                .map_err(|wait| Refusal::source_limited(source, wait))?;
        }
        let cred = caller.cred;
        // Renewal by SVID: that SVID's serial must not be revoked.
        let renewing = match &cred {
            Ok(Credential::PeerChain(chain)) => chain.first().and_then(leaf_serial),
            _ => None,
        };
        let who = match cred {
            Ok(cred) => self.authn.authenticate(cred).await,
            Err(e) => Err(e),
        }
        .map_err(Refusal::authn)?;
        if let Some(entry) = self.revocations.refusing(&who.id, renewing.as_deref()) {
            let what = if entry.serial.is_empty() {
                format!("{} is revoked", who.id)
            } else {
                format!("the SVID presented (serial {}) is revoked", entry.serial)
            };
            return Err(Refusal {
                status: Status::permission_denied(format!("{what}: {}", entry.reason)),
                outcome: "denied",
                verifier: who.verifier,
                reason: "revoked",
                identity: Some(who.id.to_string()),
            });
        }
        if let Err(wait) = bucket.check(&(who.id.clone(), caller.source)) {
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

/// Who calls: the credential (a bearer token, else the TLS client chain)
/// and the source address it came from.
struct Caller<'r> {
    cred: Result<Credential<'r>, AuthnError>,
    /// Canonical (an IPv4 client of a dual-stack listener as IPv4).
    source: Option<IpAddr>,
}

/// The request's [`Caller`] and its address, for the audit line.
fn caller<T>(request: &Request<T>) -> (Caller<'_>, String) {
    let conn = request.extensions().get::<ConnInfo>();
    let remote = conn.and_then(|c| c.remote);
    let peer = remote.map(|p| p.to_string()).unwrap_or_default();
    let chain = conn.and_then(|c| c.peer_chain.as_deref());
    let cred = match (bearer(request.metadata()), chain) {
        (Err(e), _) => Err(e),
        (Ok(Some(token)), _) => Ok(Credential::Bearer(token)),
        (Ok(None), Some(chain)) => Ok(Credential::PeerChain(chain.as_slice())),
        (Ok(None), None) => Err(AuthnError::NoCredential),
    };
    let source = remote.map(|r| r.ip().to_canonical());
    (Caller { cred, source }, peer)
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
        let (caller, peer) = caller(&request);
        let result = self.decide(caller, request.get_ref()).await;
        self.metrics
            .sign_duration
            .observe(start.elapsed().as_secs_f64());
        match result {
            Ok((who, issued, key_type)) => {
                self.revocations
                    .issued(&issued.serial, &who.id, issued.not_after);
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
                refusal.audit("sign", &peer);
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
        let (caller, peer) = caller(&request);
        let result = self.decide_jwt(caller, request.get_ref()).await;
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
                refusal.audit("sign_jwt_svid", &peer);
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
        // One message now, then one per change of either; the stream ends
        // when the bundle's sender goes (CA shutdown).
        let start = (self.bundle.clone(), self.revocations.subscribe(), true);
        let stream = futures_util::stream::unfold(start, move |(mut bundle, mut revs, first)| {
            let (td, jwt) = (td.clone(), jwt.clone());
            async move {
                if !first {
                    let changed = tokio::select! {
                        r = bundle.changed() => r.is_ok(),
                        r = revs.changed() => r.is_ok(),
                    };
                    if !changed {
                        return None;
                    }
                }
                let state = bundle.borrow_and_update().clone();
                let snapshot = revs.borrow_and_update().clone();
                let mut msg = to_proto(&td, &state, &jwt);
                msg.revocations = snapshot.entries.to_vec();
                msg.revocations_sequence = snapshot.sequence;
                msg.rotations = snapshot.rotations.to_vec();
                Some((Ok(msg), (bundle, revs, false)))
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn revoke(
        &self,
        request: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::Revocation>, Status> {
        let peer = self.admin(&request, "revoke").await?;
        let req = request.get_ref();
        let result = match Target::parse(&req.serial, &req.id, &self.td) {
            Ok(target) => self.revocations.revoke(target, req.reason.trim()).await,
            Err(e) => Err(e),
        };
        self.admin_audit("revoke", &req.serial, &req.id, &peer, &result);
        result
            .map(|e| Response::new(e.to_proto()))
            .map_err(revoke_status)
    }

    async fn unrevoke(
        &self,
        request: Request<pb::UnrevokeRequest>,
    ) -> Result<Response<pb::Revocation>, Status> {
        let peer = self.admin(&request, "unrevoke").await?;
        let req = request.get_ref();
        let result = match Target::parse(&req.serial, &req.id, &self.td) {
            Ok(target) => self.revocations.unrevoke(target).await,
            Err(e) => Err(e),
        };
        self.admin_audit("unrevoke", &req.serial, &req.id, &peer, &result);
        result
            .map(|e| Response::new(e.to_proto()))
            .map_err(revoke_status)
    }

    async fn rotate(
        &self,
        request: Request<pb::RotateRequest>,
    ) -> Result<Response<pb::Rotation>, Status> {
        let peer = self.admin(&request, "rotate").await?;
        let req = request.get_ref();
        let id = match (req.id.trim(), req.all) {
            ("", true) => None,
            (id, false) if !id.is_empty() => match Target::parse("", id, &self.td) {
                Ok(Target::Id(id)) => Some(id),
                Ok(Target::Serial(_)) | Err(_) => {
                    let err = Target::parse("", id, &self.td).err();
                    let why = err.map(|e| e.to_string()).unwrap_or_default();
                    tracing::warn!(target: "stepmesh_ca::audit", decision = "rotate", outcome = "refused", identity = id, detail = %why, peer, "rotation refused");
                    self.metrics.revocation("rotate", "refused");
                    return Err(Status::invalid_argument(why));
                }
            },
            _ => {
                self.metrics.revocation("rotate", "refused");
                return Err(Status::invalid_argument("name exactly one of id or all"));
            }
        };
        let rotation = match self.revocations.rotate(id.as_ref()).await {
            Ok(rotation) => rotation,
            Err(e) => {
                tracing::warn!(target: "stepmesh_ca::audit", decision = "rotate", outcome = "refused", identity = req.id.trim(), detail = %e, peer, "rotation refused");
                self.metrics.revocation("rotate", "refused");
                return Err(revoke_status(e));
            }
        };
        let who = if rotation.id.is_empty() {
            "*"
        } else {
            rotation.id.as_str()
        };
        tracing::info!(target: "stepmesh_ca::audit", decision = "rotate", outcome = "ok", identity = who, issued_before = rotation.issued_before, peer, "forced re-issue asked");
        self.metrics.revocation("rotate", "ok");
        Ok(Response::new(rotation))
    }

    async fn list_revocations(
        &self,
        request: Request<pb::ListRevocationsRequest>,
    ) -> Result<Response<pb::RevocationList>, Status> {
        self.admin(&request, "list_revocations").await?;
        let revocations = self
            .revocations
            .list()
            .iter()
            .map(|e| e.to_proto())
            .collect();
        Ok(Response::new(pb::RevocationList { revocations }))
    }
}

/// The serial of a leaf certificate, as the CA records it.
fn leaf_serial(der: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    Some(crate::svid::serial_hex(cert.raw_serial()))
}

fn to_proto(td: &TrustDomain, state: &BundleState, jwt: &JwtSigner) -> pb::TrustBundle {
    let (revocations, revocations_sequence) = (Vec::new(), 0);
    pb::TrustBundle {
        trust_domain: td.to_string(),
        bundle_pem: state.pem.clone(),
        sequence: state.sequence,
        revocations,
        revocations_sequence,
        rotations: Vec::new(),
        jwks_json: jwt.jwks_json().to_owned(),
    }
}
