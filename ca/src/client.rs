//! What the sidecar calls to get its SVID: a key made in memory, a CSR,
//! `Sign` with the credential over TLS 1.3 (the CA verified with the bundle
//! alone), and a check of the answer — the chain must validate to the trust
//! bundle and carry the identity we expect.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use tonic::transport::Channel;

use crate::proto::v1 as pb;
use crate::proto::v1::certificate_authority_client::CertificateAuthorityClient;
use crate::spiffe_id::{SpiffeId, TrustDomain};
use crate::svid::{self, TrustBundle};

mod connect;
mod replicas;

use connect::TlsConnector;
use replicas::Replicas;

/// How long connecting to the CA may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one RPC may take.
const RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a call to the CA failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Bad address or bundle given to `connect`.
    #[error("CA client configuration: {0}")]
    Config(String),
    /// The CA answered with an error status (or could not be reached).
    #[error("CA {code:?}: {message}")]
    Rpc {
        /// The gRPC code (`Unauthenticated`, `PermissionDenied`, `Unavailable`, ...).
        code: tonic::Code,
        /// The CA's message.
        message: String,
    },
    /// The CA answered, but the answer does not check out.
    #[error("CA answer refused: {0}")]
    BadAnswer(String),
    /// The key or CSR could not be made.
    #[error("making the key or CSR: {0}")]
    Key(String),
}

impl ClientError {
    /// Whether the replica asked could not answer (refused, reset,
    /// UNAVAILABLE, no answer in time, its own internal error): another
    /// replica may. An answer about the caller (denied, rate-limited,
    /// invalid) is not.
    pub fn is_replica_fault(&self) -> bool {
        use tonic::Code;
        matches!(
            self,
            Self::Rpc {
                code: Code::Unavailable
                    | Code::Unknown
                    | Code::Cancelled
                    | Code::DeadlineExceeded
                    | Code::Aborted
                    | Code::Internal,
                ..
            }
        )
    }
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        Self::Rpc {
            code: s.code(),
            message: s.message().to_owned(),
        }
    }
}

/// How the caller proves who it is.
pub enum Credential {
    /// A bearer token: projected ServiceAccount token or join token.
    Token(String),
    /// A still-valid SVID, presented as the TLS client certificate (renewal).
    Svid {
        /// Leaf first.
        chain: Vec<CertificateDer<'static>>,
        /// The leaf's key.
        key: PrivateKeyDer<'static>,
    },
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a token or a key.
        match self {
            Self::Token(_) => f.write_str("Credential::Token(<redacted>)"),
            Self::Svid { chain, .. } => {
                write!(f, "Credential::Svid({} certs, <key redacted>)", chain.len())
            }
        }
    }
}

/// A freshly issued SVID; the key exists only in this value.
#[derive(Debug)]
pub struct IssuedSvid {
    /// The identity the CA certified.
    pub id: SpiffeId,
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key, made in this process and never sent anywhere.
    pub key: PrivateKeyDer<'static>,
    /// The trust bundle the CA sent with it.
    pub bundle: TrustBundle,
    /// The leaf's notAfter.
    pub not_after: SystemTime,
    /// The leaf's serial, lower-case hex.
    pub serial: String,
}

/// One trust bundle as the CA publishes it.
#[derive(Debug, Clone)]
pub struct BundleUpdate {
    /// The roots.
    pub bundle: TrustBundle,
    /// Increases by one on every change.
    pub sequence: u64,
    /// The serials and IDs to refuse (streamed with the bundle).
    pub revoked: crate::revocation::RevokedSet,
    /// Forced re-issues asked for lately (`ca rotate`).
    pub rotations: Vec<pb::Rotation>,
    /// The JWK set verifying the trust domain's JWT-SVIDs (JSON; empty
    /// from a CA that mints none).
    pub jwks_json: String,
}

/// A JWT-SVID as the CA minted it.
#[derive(Debug, Clone)]
pub struct JwtSvid {
    /// JWS compact serialization (a bearer token: never log it).
    pub token: String,
    /// Its subject.
    pub spiffe_id: String,
    /// Its `exp`, Unix seconds.
    pub expires_at: i64,
}

/// A client of one CA, which may be several replicas.
#[derive(Clone)]
pub struct CaClient {
    replicas: Arc<Replicas>,
    /// The first address, dialled by name (for [`Self::grpc`]).
    channel: Channel,
    expect_td: Option<TrustDomain>,
    expect_id: Option<SpiffeId>,
}

impl CaClient {
    /// A client of the CA at `addr` (`host:port`, optionally `https://`;
    /// several replicas: a comma-separated list, or a name resolving to
    /// several addresses), trusting only the roots of `bundle_pem`.
    /// Connects lazily (the CA may be down now); must be called inside a
    /// Tokio runtime.
    pub fn connect(addr: &str, bundle_pem: &str) -> Result<Self, ClientError> {
        let mut roots = rustls::RootCertStore::empty();
        let certs = crate::pem::decode_certs(bundle_pem.as_bytes())
            .map_err(|e| ClientError::Config(format!("CA bundle: {e}")))?;
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| ClientError::Config(format!("CA bundle: {e}")))?;
        }
        if roots.is_empty() {
            return Err(ClientError::Config("CA bundle holds no certificate".into()));
        }
        let replicas = Replicas::parse(addr, Arc::new(roots))?;
        let first = replicas.first().clone();
        let connector = TlsConnector::new(first.clone(), replicas.roots().clone(), None)?;
        let channel = replicas::endpoint(&first)?.connect_with_connector_lazy(connector);
        Ok(Self {
            replicas: Arc::new(replicas),
            channel,
            expect_td: None,
            expect_id: None,
        })
    }

    /// Counts in `failovers` every call that a replica could not answer
    /// and that moved on to the next one (set once; later calls keep the
    /// first counter).
    pub fn count_failovers(self, failovers: prometheus_client::metrics::counter::Counter) -> Self {
        let _ = self.replicas.failovers.set(failovers);
        self
    }

    /// Refuses SVIDs of any other trust domain.
    pub fn expect_trust_domain(mut self, td: TrustDomain) -> Self {
        self.expect_td = Some(td);
        self
    }

    /// Refuses SVIDs for any other identity (and asks for this one in the CSR).
    pub fn expect_id(mut self, id: SpiffeId) -> Self {
        self.expect_td = Some(id.trust_domain().clone());
        self.expect_id = Some(id);
        self
    }

    /// Gets an SVID: key and CSR made here, signed by the CA for the
    /// identity `cred` proves, checked before it is returned.
    pub async fn issue(
        &self,
        cred: &Credential,
        ttl: Option<Duration>,
    ) -> Result<IssuedSvid, ClientError> {
        // A renewal must keep the identity of the SVID it presents.
        let renewing = match cred {
            Credential::Svid { chain, .. } => Some(leaf_id(chain)?),
            Credential::Token(_) => None,
        };
        let expect_id = self.expect_id.clone().or(renewing);
        let key = KeyPair::generate().map_err(|e| ClientError::Key(e.to_string()))?;
        let csr_pem = make_csr(&key, expect_id.as_ref())?;
        let ttl_seconds = ttl.map_or(0, |t| i64::try_from(t.as_secs()).unwrap_or(i64::MAX));
        let roots = self.replicas.roots().clone();
        let answer = self
            .replicas
            .call(|replica| {
                let (csr_pem, roots) = (csr_pem.clone(), roots.clone());
                async move {
                    let mut request = tonic::Request::new(pb::SignRequest {
                        csr_pem,
                        ttl_seconds,
                    });
                    let channel = match cred {
                        Credential::Token(token) => {
                            request
                                .metadata_mut()
                                .insert("authorization", bearer(token)?);
                            replica.channel.clone()
                        }
                        Credential::Svid { chain, key } => {
                            replica.with_client_cert(&roots, chain, key)?
                        }
                    };
                    with_timeout(CertificateAuthorityClient::new(channel).sign(request)).await
                }
            })
            .await?
            .into_inner();
        self.check_answer(answer, key, expect_id.as_ref())
    }

    fn check_answer(
        &self,
        answer: pb::SignResponse,
        key: KeyPair,
        expect_id: Option<&SpiffeId>,
    ) -> Result<IssuedSvid, ClientError> {
        let bad = |m: String| ClientError::BadAnswer(m);
        let mut chain = Vec::with_capacity(answer.cert_chain_pem.len());
        for pem in &answer.cert_chain_pem {
            chain.push(
                CertificateDer::from_pem_slice(pem.as_bytes())
                    .map_err(|e| bad(format!("chain: {}", crate::pem::describe(&e))))?,
            );
        }
        let id = leaf_id(&chain)?;
        let td = self
            .expect_td
            .clone()
            .unwrap_or_else(|| id.trust_domain().clone());
        // The bundle came over a TLS session authenticated by the roots we
        // already trust, so it is as trustworthy as they are.
        let bundle =
            TrustBundle::from_pem(td, &answer.trust_bundle_pem).map_err(|e| bad(e.to_string()))?;
        let verified = svid::verify(&chain, &bundle, UnixTime::now())
            .map_err(|e| bad(format!("issued SVID: {e}")))?;
        if let Some(want) = expect_id {
            if verified.id != *want {
                return Err(bad(format!(
                    "CA issued {} but {want} was expected",
                    verified.id
                )));
            }
        }
        if !leaf_key_matches(&chain[0], &key) {
            return Err(bad("issued certificate is not for our key".into()));
        }
        Ok(IssuedSvid {
            id: verified.id,
            chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            bundle,
            not_after: verified.not_after,
            serial: verified.serial,
        })
    }

    /// Gets a JWT-SVID for `audience` with the identity a bearer `token`
    /// proves (`ttl`: the CA's default and cap, 5 minutes, when `None`).
    pub async fn sign_jwt_svid(
        &self,
        token: &str,
        audience: &[String],
        ttl: Option<Duration>,
    ) -> Result<JwtSvid, ClientError> {
        let ttl_seconds = ttl.map_or(0, |t| i64::try_from(t.as_secs()).unwrap_or(i64::MAX));
        let answer = self
            .replicas
            .call(|replica| async move {
                let mut request = tonic::Request::new(pb::SignJwtSvidRequest {
                    audience: audience.to_vec(),
                    ttl_seconds,
                });
                request
                    .metadata_mut()
                    .insert("authorization", bearer(token)?);
                let mut client = CertificateAuthorityClient::new(replica.channel.clone());
                with_timeout(client.sign_jwt_svid(request)).await
            })
            .await?
            .into_inner();
        if let Some(want) = &self.expect_td {
            let id = SpiffeId::parse(&answer.spiffe_id)
                .map_err(|e| ClientError::BadAnswer(format!("JWT-SVID subject: {e}")))?;
            if id.trust_domain() != want {
                return Err(ClientError::BadAnswer(format!(
                    "JWT-SVID for {id}, not of trust domain {want}"
                )));
            }
        }
        Ok(JwtSvid {
            token: answer.token,
            spiffe_id: answer.spiffe_id,
            expires_at: answer.expires_at,
        })
    }

    /// The generated gRPC client on this client's channel, for calls the
    /// typed methods do not cover (tests, benchmarks).
    pub fn grpc(&self) -> CertificateAuthorityClient<Channel> {
        CertificateAuthorityClient::new(self.channel.clone())
    }

    /// The channel to the CA (for other services it serves, such as gRPC health).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// The CA's current trust bundle (no credential needed).
    pub async fn trust_bundle(&self) -> Result<BundleUpdate, ClientError> {
        let answer = self
            .replicas
            .call(|replica| async move {
                let mut client = CertificateAuthorityClient::new(replica.channel.clone());
                with_timeout(client.get_trust_bundle(pb::GetTrustBundleRequest {})).await
            })
            .await?
            .into_inner();
        to_update(answer)
    }

    /// A stream of trust bundles: the current one, then each change.
    pub async fn watch_trust_bundle(&self) -> Result<BundleWatch, ClientError> {
        // Only opening the stream is bounded; it then lives as long as wanted.
        let stream = self
            .replicas
            .call(|replica| async move {
                let mut client = CertificateAuthorityClient::new(replica.channel.clone());
                with_timeout(client.watch_trust_bundle(pb::WatchTrustBundleRequest {})).await
            })
            .await?
            .into_inner();
        Ok(BundleWatch { stream })
    }
}

/// Admin calls (revocations), authenticated by the CA's admin token.
impl CaClient {
    /// One admin call with the admin token, at the first replica that
    /// answers.
    async fn admin_call<M, T, F, Fut>(
        &self,
        token: &str,
        message: M,
        call: F,
    ) -> Result<T, ClientError>
    where
        M: Clone,
        F: Fn(CertificateAuthorityClient<Channel>, tonic::Request<M>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.admin_call_until(token, message, ClientError::is_replica_fault, call)
            .await
    }

    /// [`Self::admin_call`], moving on from every error `next` accepts.
    async fn admin_call_until<M, T, F, Fut>(
        &self,
        token: &str,
        message: M,
        next: impl Fn(&ClientError) -> bool,
        call: F,
    ) -> Result<T, ClientError>
    where
        M: Clone,
        F: Fn(CertificateAuthorityClient<Channel>, tonic::Request<M>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let value = bearer(token.trim())?;
        let answer = self
            .replicas
            .call_until(next, |replica| {
                let mut request = tonic::Request::new(message.clone());
                request
                    .metadata_mut()
                    .insert("authorization", value.clone());
                let client = CertificateAuthorityClient::new(replica.channel.clone());
                with_timeout(call(client, request))
            })
            .await?;
        Ok(answer.into_inner())
    }

    /// Revokes a serial or (exactly one of them) an ID. A serial is known
    /// only to the replica that issued it: `NOT_FOUND` from one replica
    /// moves on to the next.
    pub async fn revoke(
        &self,
        admin_token: &str,
        serial: &str,
        id: &str,
        reason: &str,
    ) -> Result<pb::Revocation, ClientError> {
        let message = pb::RevokeRequest {
            serial: serial.to_owned(),
            id: id.to_owned(),
            reason: reason.to_owned(),
        };
        let by_serial = !serial.trim().is_empty();
        let next = |e: &ClientError| {
            e.is_replica_fault()
                || (by_serial
                    && matches!(
                        e,
                        ClientError::Rpc {
                            code: tonic::Code::NotFound,
                            ..
                        }
                    ))
        };
        self.admin_call_until(admin_token, message, next, |mut c, r| async move {
            c.revoke(r).await
        })
        .await
    }

    /// Removes the revocation of a serial or an ID.
    pub async fn unrevoke(
        &self,
        admin_token: &str,
        serial: &str,
        id: &str,
    ) -> Result<pb::Revocation, ClientError> {
        let message = pb::UnrevokeRequest {
            serial: serial.to_owned(),
            id: id.to_owned(),
        };
        self.admin_call(admin_token, message, |mut c, r| async move {
            c.unrevoke(r).await
        })
        .await
    }

    /// Asks the sidecars of `id` (`None`: every workload) to renew now.
    pub async fn rotate(
        &self,
        admin_token: &str,
        id: Option<&str>,
    ) -> Result<pb::Rotation, ClientError> {
        let message = pb::RotateRequest {
            id: id.unwrap_or_default().to_owned(),
            all: id.is_none(),
        };
        self.admin_call(
            admin_token,
            message,
            |mut c, r| async move { c.rotate(r).await },
        )
        .await
    }

    /// The revocations in force.
    pub async fn revocations(&self, admin_token: &str) -> Result<Vec<pb::Revocation>, ClientError> {
        let list = self
            .admin_call(
                admin_token,
                pb::ListRevocationsRequest {},
                |mut c, r| async move { c.list_revocations(r).await },
            )
            .await?;
        Ok(list.revocations)
    }
}

/// Trust bundles as the CA sends them.
pub struct BundleWatch {
    stream: tonic::Streaming<pb::TrustBundle>,
}

impl BundleWatch {
    /// The next bundle; `None` when the CA ended the stream.
    pub async fn next(&mut self) -> Option<Result<BundleUpdate, ClientError>> {
        match self.stream.message().await {
            Ok(Some(b)) => Some(to_update(b)),
            Ok(None) => None,
            Err(status) => Some(Err(status.into())),
        }
    }
}

/// `Bearer <token>` as a header value.
fn bearer(
    token: &str,
) -> Result<tonic::metadata::MetadataValue<tonic::metadata::Ascii>, ClientError> {
    format!("Bearer {token}")
        .parse()
        .map_err(|_| ClientError::Config("token is not a valid header value".into()))
}

async fn with_timeout<T>(
    call: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T, ClientError> {
    match tokio::time::timeout(RPC_TIMEOUT, call).await {
        Ok(result) => result.map_err(ClientError::from),
        Err(_) => Err(ClientError::Rpc {
            code: tonic::Code::DeadlineExceeded,
            message: format!("no answer from the CA within {RPC_TIMEOUT:?}"),
        }),
    }
}

fn to_update(b: pb::TrustBundle) -> Result<BundleUpdate, ClientError> {
    let td: TrustDomain = b
        .trust_domain
        .parse()
        .map_err(|e| ClientError::BadAnswer(format!("trust domain {:?}: {e}", b.trust_domain)))?;
    let bundle = TrustBundle::from_pem(td, &b.bundle_pem)
        .map_err(|e| ClientError::BadAnswer(e.to_string()))?;
    Ok(BundleUpdate {
        bundle,
        sequence: b.sequence,
        revoked: crate::revocation::RevokedSet::from_proto(&b.revocations),
        rotations: b.rotations,
        jwks_json: b.jwks_json,
    })
}

fn leaf_id(chain: &[CertificateDer<'_>]) -> Result<SpiffeId, ClientError> {
    use x509_parser::prelude::FromDer;
    let leaf = chain
        .first()
        .ok_or_else(|| ClientError::BadAnswer("empty certificate chain".into()))?;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(leaf)
        .map_err(|e| ClientError::BadAnswer(format!("leaf: {e}")))?;
    svid::leaf_spiffe_id(&cert).map_err(|e| ClientError::BadAnswer(e.to_string()))
}

fn leaf_key_matches(leaf: &CertificateDer<'_>, key: &KeyPair) -> bool {
    use x509_parser::prelude::FromDer;
    x509_parser::certificate::X509Certificate::from_der(leaf)
        .map(|(_, c)| c.public_key().subject_public_key.data.as_ref() == key.public_key_raw())
        .unwrap_or(false)
}

/// A CSR for `key`, naming `id` when we know which identity we expect.
pub fn make_csr(key: &KeyPair, id: Option<&SpiffeId>) -> Result<String, ClientError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    if let Some(id) = id {
        let uri = id
            .as_str()
            .try_into()
            .map_err(|e: rcgen::Error| ClientError::Key(e.to_string()))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
    }
    params
        .serialize_request(key)
        .and_then(|csr| csr.pem())
        .map_err(|e| ClientError::Key(e.to_string()))
}
