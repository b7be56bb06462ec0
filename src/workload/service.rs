//! The Workload API's methods over the cert store: each stream sends the
//! full state now and again on every change of the store (a new SVID or a
//! new trust bundle), from the store's change counter, so a burst of
//! changes is sent once, as its last state.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};

use super::jwt::{self, JwtMinter};
use super::proto::spiffe_workload_api_server::SpiffeWorkloadApi;
use super::proto::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    ValidateJwtsvidRequest, ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse,
    X509svid, X509svidRequest, X509svidResponse,
};
use super::WorkloadMetrics;
use crate::identity::store::{CertStore, WorkloadSvid};
use stepmesh_ca::svid::TrustBundle;

/// A server stream of the Workload API.
type Updates<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The Workload API service: the pod's SVID (the sidecar's own, see
/// SECURITY.md) and its trust bundle, read from the cert store.
#[derive(Debug, Clone)]
pub struct WorkloadService {
    store: Arc<CertStore>,
    metrics: WorkloadMetrics,
    /// JWT-SVIDs come from the CA (`None`: an identity from files, no CA).
    jwt: Option<Arc<JwtMinter>>,
}

impl WorkloadService {
    /// A service reading `store`, minting JWT-SVIDs with `jwt`.
    pub fn new(
        store: Arc<CertStore>,
        metrics: WorkloadMetrics,
        jwt: Option<Arc<JwtMinter>>,
    ) -> Self {
        Self {
            store,
            metrics,
            jwt,
        }
    }

    fn minter(&self) -> Result<&JwtMinter, Status> {
        self.jwt
            .as_deref()
            .ok_or_else(|| Status::unavailable("JWT-SVIDs need the stepmesh CA (--ca)"))
    }

    /// A stream of `state(store)` now and on every change of the store;
    /// nothing is sent while the store has no SVID yet (`None`).
    fn updates<T: Send + 'static>(
        &self,
        state: fn(&CertStore) -> Option<Result<T, Status>>,
    ) -> Updates<T> {
        let store = self.store.clone();
        let changes = WatchStream::new(self.store.subscribe());
        Box::pin(changes.filter_map(move |_| futures_util::future::ready(state(&store))))
    }
}

/// The trust domain's name as the Workload API keys bundles: its SPIFFE ID.
fn bundle_key(bundle: &TrustBundle) -> String {
    format!("spiffe://{}", bundle.trust_domain())
}

/// The roots as the Workload API carries them: DER certificates concatenated.
fn concat_der<'a>(
    certs: impl IntoIterator<Item = &'a rustls_pki_types::CertificateDer<'a>>,
) -> Vec<u8> {
    certs
        .into_iter()
        .flat_map(|c| c.as_ref().iter().copied())
        .collect()
}

/// The `FetchX509SVID` message for the current SVID.
fn x509_svid_state(store: &CertStore) -> Option<Result<X509svidResponse, Status>> {
    let WorkloadSvid {
        info,
        chain,
        pkcs8,
        bundle,
    } = store.workload_svid()?;
    let Some(key) = pkcs8 else {
        // Only a --key file in another encoding gets here (the CA source
        // always makes PKCS#8); the API can carry PKCS#8 only.
        tracing::warn!(
            "Workload API: the SVID's key is not PKCS#8; convert --key to PKCS#8 to serve it"
        );
        return Some(Err(Status::unavailable("the SVID's key cannot be served")));
    };
    Some(Ok(X509svidResponse {
        svids: vec![X509svid {
            spiffe_id: info.id.to_string(),
            x509_svid: concat_der(&chain),
            x509_svid_key: key.der().to_vec(),
            bundle: concat_der(bundle.roots()),
            hint: String::new(),
        }],
        crl: Vec::new(),
        federated_bundles: HashMap::new(),
    }))
}

/// The `FetchX509Bundles` message for the current trust bundle.
fn x509_bundles_state(store: &CertStore) -> Option<Result<X509BundlesResponse, Status>> {
    let bundle = store.bundle()?;
    Some(Ok(X509BundlesResponse {
        crl: Vec::new(),
        bundles: HashMap::from([(bundle_key(&bundle), concat_der(bundle.roots()))]),
    }))
}

/// The `FetchJWTBundles` message: the CA's JWK set for our trust domain.
fn jwt_bundles_state(store: &CertStore) -> Option<Result<JwtBundlesResponse, Status>> {
    let (jwks, bundle) = (store.jwks()?, store.bundle()?);
    Some(Ok(JwtBundlesResponse {
        bundles: HashMap::from([(bundle_key(&bundle), jwks.as_bytes().to_vec())]),
    }))
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadService {
    type FetchX509SVIDStream = Updates<X509svidResponse>;
    type FetchX509BundlesStream = Updates<X509BundlesResponse>;
    type FetchJWTBundlesStream = Updates<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        _request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        self.metrics.call("FetchX509SVID");
        Ok(Response::new(self.updates(x509_svid_state)))
    }

    async fn fetch_x509_bundles(
        &self,
        _request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        self.metrics.call("FetchX509Bundles");
        Ok(Response::new(self.updates(x509_bundles_state)))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        self.metrics.call("FetchJWTSVID");
        let request = request.into_inner();
        if request.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        let minter = self.minter()?;
        let ours = self.store.info().map(|i| i.id.to_string());
        if !request.spiffe_id.is_empty() && Some(&request.spiffe_id) != ours.as_ref() {
            return Err(Status::permission_denied(
                "no such identity for this caller",
            ));
        }
        let (spiffe_id, token) = minter.mint(&request.audience).await.map_err(|e| {
            tracing::warn!(error = %e, "Workload API: no JWT-SVID from the CA");
            Status::unavailable(format!("could not get a JWT-SVID: {e}"))
        })?;
        Ok(Response::new(JwtsvidResponse {
            svids: vec![Jwtsvid {
                spiffe_id,
                svid: token,
                hint: String::new(),
            }],
        }))
    }

    async fn fetch_jwt_bundles(
        &self,
        _request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        self.metrics.call("FetchJWTBundles");
        self.minter()?;
        Ok(Response::new(self.updates(jwt_bundles_state)))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        self.metrics.call("ValidateJWTSVID");
        let request = request.into_inner();
        if request.audience.is_empty() || request.svid.is_empty() {
            return Err(Status::invalid_argument(
                "audience and svid must be specified",
            ));
        }
        self.minter()?;
        let (Some(jwks), Some(td)) = (self.store.jwks(), self.store.trust_domain()) else {
            return Err(Status::unavailable("no JWT bundle from the CA yet"));
        };
        let (id, claims) = jwt::validate(&request.svid, &request.audience, &jwks, &td)
            .map_err(Status::invalid_argument)?;
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id: id.to_string(),
            claims: Some(jwt::to_struct(claims)),
        }))
    }
}
