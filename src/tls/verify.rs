//! SPIFFE certificate verifiers for rustls, on top of
//! `stepmesh_ca::svid::verify`. A refusal keeps its reason inside the rustls
//! error (see [`super::failure`]) so handshake failures are counted by reason.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use stepmesh_ca::spiffe_id::{SpiffeId, SpiffeIdPattern};

use crate::identity::store::CertStore;

/// Which server identity an outbound connection accepts.
#[derive(Debug, Clone)]
pub enum Expected {
    /// An exact ID, or any ID under a `/*` prefix (`--outbound ...@ID`).
    Pattern(SpiffeIdPattern),
    /// Any valid SVID of our trust domain (transparent mode, where the
    /// destination's identity is not configured).
    AnyInTrustDomain,
}

/// The peer presented a valid SVID, but not the identity we dialled for.
#[derive(Debug, thiserror::Error)]
#[error("peer is {got}, expected {expected}")]
pub struct WrongPeer {
    /// What the listener requires.
    pub expected: String,
    /// What the peer is.
    pub got: SpiffeId,
}

fn refuse(err: impl std::error::Error + Send + Sync + 'static) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(err))))
}

/// No bundle loaded yet: nothing can be verified.
#[derive(Debug, thiserror::Error)]
#[error("no trust bundle loaded yet")]
pub struct NoBundle;

fn verify_chain(
    store: &CertStore,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
) -> Result<stepmesh_ca::svid::VerifiedSvid, rustls::Error> {
    let bundle = store.bundle().ok_or_else(|| refuse(NoBundle))?;
    let mut chain = Vec::with_capacity(1 + intermediates.len());
    chain.push(end_entity.clone());
    chain.extend(intermediates.iter().cloned());
    stepmesh_ca::svid::verify(&chain, &bundle, now).map_err(refuse)
}

/// Server side: a client certificate is mandatory and must be an SVID of our
/// trust domain (any workload; authorization comes after, from the policy).
#[derive(Debug)]
pub struct SvidClientVerifier {
    store: Arc<CertStore>,
    provider: Arc<CryptoProvider>,
}

impl SvidClientVerifier {
    /// Verifies against the store's current bundle.
    pub fn new(store: Arc<CertStore>, provider: Arc<CryptoProvider>) -> Self {
        Self { store, provider }
    }
}

impl ClientCertVerifier for SvidClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        verify_chain(&self.store, end_entity, intermediates, now)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Client side: the server must present an SVID of our trust domain that
/// matches [`Expected`]. The DNS/IP server name is not used: SPIFFE
/// authenticates by ID.
#[derive(Debug)]
pub struct SvidServerVerifier {
    store: Arc<CertStore>,
    provider: Arc<CryptoProvider>,
    expected: Expected,
}

impl SvidServerVerifier {
    /// Verifies against the store's current bundle and `expected`.
    pub fn new(store: Arc<CertStore>, provider: Arc<CryptoProvider>, expected: Expected) -> Self {
        Self {
            store,
            provider,
            expected,
        }
    }
}

impl ServerCertVerifier for SvidServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = verify_chain(&self.store, end_entity, intermediates, now)?;
        if let Expected::Pattern(pattern) = &self.expected {
            if !pattern.matches(&verified.id) {
                return Err(refuse(WrongPeer {
                    expected: pattern.to_string(),
                    got: verified.id,
                }));
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
