//! The CA's own TLS: a serving certificate issued from its own issuing key
//! (DNS SANs `localhost`, the host name and each `--dns-name`), re-issued
//! daily, TLS 1.3 only, and an optional client certificate for renewals.
//!
//! A client certificate is accepted at the handshake with only its
//! possession proof checked; whether it is a valid SVID is decided per
//! request by `svid::verify`, so a stale SVID gets a clear UNAUTHENTICATED
//! answer instead of a failed handshake.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::DistinguishedName as RustlsDn;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use time::OffsetDateTime;

use crate::signer::{random_serial, Signer};

/// Lifetime of the CA's serving certificate; it is re-issued well before.
pub const SERVING_CERT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often the serving certificate is re-issued.
pub const SERVING_CERT_REFRESH: Duration = Duration::from_secs(24 * 3600);

/// Why the serving certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rcgen refused the parameters (for example a bad `--dns-name`).
    #[error("serving certificate: {0}")]
    Issue(#[from] rcgen::Error),
    /// rustls refused the key or configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The DNS names of the serving certificate: `localhost`, the host name,
/// then `extra` (deduplicated, in that order).
pub fn serving_names(extra: &[String]) -> Vec<String> {
    let mut names = vec!["localhost".to_owned()];
    if let Some(host) = host_name() {
        names.push(host);
    }
    names.extend(extra.iter().cloned());
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.to_ascii_lowercase()));
    names
}

fn host_name() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())?;
    let name = name.trim().to_owned();
    (!name.is_empty()).then_some(name)
}

/// The serving certificate, swappable without restarting the listener.
#[derive(Debug)]
pub struct ServingCert {
    current: ArcSwap<CertifiedKey>,
    provider: Arc<CryptoProvider>,
    names: Vec<String>,
}

impl ServingCert {
    /// Issues the first serving certificate for `names`.
    pub fn new(
        signer: &Signer,
        names: Vec<String>,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, TlsError> {
        let first = issue(signer, &names, &provider)?;
        Ok(Self {
            current: ArcSwap::from_pointee(first),
            provider,
            names,
        })
    }

    /// Issues a fresh certificate and swaps it in.
    pub fn refresh(&self, signer: &Signer) -> Result<(), TlsError> {
        let next = issue(signer, &self.names, &self.provider)?;
        self.current.store(Arc::new(next));
        Ok(())
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn issue(
    signer: &Signer,
    names: &[String],
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let authority = signer.authority();
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "stepmesh CA");
    params.distinguished_name = dn;
    let mut sans = names
        .iter()
        .map(|n| Ok(SanType::DnsName(n.as_str().try_into()?)))
        .collect::<Result<Vec<_>, rcgen::Error>>()?;
    sans.push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    sans.push(SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)));
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    let now = SystemTime::now();
    params.not_before = OffsetDateTime::from(now - crate::signer::BACKDATE);
    params.not_after = OffsetDateTime::from((now + SERVING_CERT_TTL).min(authority.not_after));
    let cert = params.signed_by(&key, &authority.issuer)?;
    let mut chain = vec![cert.der().clone()];
    chain.extend(authority.chain_tail.iter().cloned());
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok(CertifiedKey::from_der(chain, der, provider)?)
}

/// TLS 1.3 server config: ALPN h2, optional client certificate.
pub fn server_config(
    cert: Arc<ServingCert>,
    provider: Arc<CryptoProvider>,
) -> Result<rustls::ServerConfig, TlsError> {
    let verifier = Arc::new(OptionalClientCert {
        provider: provider.clone(),
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Asks for a client certificate but does not require one; checks only that
/// the client holds the certificate's key (chain rules come per request).
#[derive(Debug)]
struct OptionalClientCert {
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for OptionalClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[RustlsDn] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Deferred: every use of the chain runs svid::verify first.
        Ok(ClientCertVerified::assertion())
    }

    // The server speaks TLS 1.3 only.
    crate::handshake_signatures!(tls13_only);
}

/// The handshake-signature methods rustls asks of every certificate
/// verifier, answered from the verifier's `provider` field: one definition
/// for the CA's verifier and the sidecar's client, server and probe
/// verifiers. `handshake_signatures!()` takes TLS 1.2 and 1.3;
/// `handshake_signatures!(tls13_only)` refuses 1.2.
#[macro_export]
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &::rustls::pki_types::CertificateDer<'_>,
            dss: &::rustls::DigitallySignedStruct,
        ) -> ::std::result::Result<::rustls::client::danger::HandshakeSignatureValid, ::rustls::Error>
        {
            ::rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        $crate::handshake_signatures!(@tls13);
    };
    (tls13_only) => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &::rustls::pki_types::CertificateDer<'_>,
            _dss: &::rustls::DigitallySignedStruct,
        ) -> ::std::result::Result<::rustls::client::danger::HandshakeSignatureValid, ::rustls::Error>
        {
            Err(::rustls::Error::PeerIncompatible(
                ::rustls::PeerIncompatible::Tls12NotOffered,
            ))
        }

        $crate::handshake_signatures!(@tls13);
    };
    (@tls13) => {
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &::rustls::pki_types::CertificateDer<'_>,
            dss: &::rustls::DigitallySignedStruct,
        ) -> ::std::result::Result<::rustls::client::danger::HandshakeSignatureValid, ::rustls::Error>
        {
            ::rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> ::std::vec::Vec<::rustls::SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}
