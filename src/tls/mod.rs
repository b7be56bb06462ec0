//! rustls configurations of the mesh: aws-lc-rs, TLS 1.3 (1.2 by a flag),
//! X25519MLKEM768 then X25519, SPIFFE verifiers on both sides, certificates
//! resolved from the [`CertStore`] on every handshake so rotation needs no
//! new config, session resumption on outbound connections.

pub mod failure;
pub mod resolve;
pub mod serving;
pub mod sessions;
pub mod verify;

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, ServerConfig};

use crate::identity::store::CertStore;
use resolve::SvidResolver;
use verify::{Expected, SvidClientVerifier, SvidServerVerifier};

/// ALPN protocol ids offered/accepted; the HTTP layer adds its own.
pub type Alpn = Vec<Vec<u8>>;

/// Knobs shared by every config of the process.
#[derive(Debug, Clone, Copy)]
pub struct TlsSettings {
    /// Also speak TLS 1.2.
    pub tls12: bool,
    /// Resume sessions on outbound connections (tickets).
    pub session_resumption: bool,
}

/// The aws-lc-rs provider restricted to the mesh's key exchange groups:
/// X25519MLKEM768 (post-quantum hybrid) first, then X25519. The TLS 1.3
/// suites prefer AES-128-GCM/SHA-256: the SHA-384 key schedule of the
/// AES-256 suite was the largest single cost of a resumed handshake in a
/// profile (SHA-256 runs on the CPU's SHA extensions, SHA-512 does not).
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::aws_lc_rs::{cipher_suite, kx_group};
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.kx_groups = vec![kx_group::X25519MLKEM768, kx_group::X25519];
    provider.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        // Used only with --tls12.
        cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cipher_suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        cipher_suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        cipher_suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        cipher_suite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(provider)
}

static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

fn versions(settings: TlsSettings) -> &'static [&'static rustls::SupportedProtocolVersion] {
    if settings.tls12 {
        rustls::ALL_VERSIONS
    } else {
        TLS13_ONLY
    }
}

/// Error building a config (only with a broken provider, reported at start).
#[derive(Debug, thiserror::Error)]
#[error("TLS configuration: {0}")]
pub struct ConfigError(#[from] rustls::Error);

/// Inbound: client certificate required and verified as an SVID of our
/// trust domain; our SVID served from the store; stateless session tickets.
pub fn server_config(
    provider: &Arc<CryptoProvider>,
    store: &Arc<CertStore>,
    alpn: Alpn,
    settings: TlsSettings,
) -> Result<Arc<ServerConfig>, ConfigError> {
    let verifier = Arc::new(SvidClientVerifier::new(store.clone(), provider.clone()));
    let mut config = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions(settings))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(SvidResolver::new(store.clone())));
    config.alpn_protocols = alpn;
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
    Ok(Arc::new(config))
}

/// Outbound: the peer must present an SVID matching `expected`; ours goes
/// out as the client certificate; sessions resumed unless disabled.
pub fn client_config(
    provider: &Arc<CryptoProvider>,
    store: &Arc<CertStore>,
    expected: Expected,
    alpn: Alpn,
    settings: TlsSettings,
) -> Result<Arc<ClientConfig>, ConfigError> {
    let verifier = Arc::new(SvidServerVerifier::new(
        store.clone(),
        provider.clone(),
        expected,
    ));
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions(settings))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(SvidResolver::new(store.clone())));
    config.alpn_protocols = alpn;
    config.resumption = if settings.session_resumption {
        let sessions = Arc::new(sessions::SvidSessions::new(store.clone()));
        rustls::client::Resumption::store(sessions)
    } else {
        rustls::client::Resumption::disabled()
    };
    Ok(Arc::new(config))
}

/// How long a session ticket can be redeemed (rustls' aws-lc-rs `Ticketer`
/// rotates its key every 6 h and honours the previous one: 12 h), plus margin.
const RESUMPTION_WINDOW: std::time::Duration = std::time::Duration::from_secs(13 * 3600);

/// Re-checks the peer of a *resumed* session, which rustls does not verify
/// again: a ticket must not outlive the SVID it was made with (leaf expiry,
/// a cheap parse), nor a root removed from the bundle (full chain
/// verification, only while a roots change is younger than any ticket),
/// nor a revocation.
/// Full handshakes were verified already and pass straight through.
pub fn check_resumed(conn: &rustls::CommonState, store: &CertStore) -> Result<(), &'static str> {
    if conn.handshake_kind() != Some(rustls::HandshakeKind::Resumed) {
        return Ok(());
    }
    let chain = conn.peer_certificates().ok_or("no_client_cert")?;
    let leaf = chain.first().ok_or("no_client_cert")?;
    verify::check_revoked(store, leaf).map_err(|_| "revoked")?;
    let now = rustls::pki_types::UnixTime::now();
    if store.roots_changed_within(RESUMPTION_WINDOW) {
        let bundle = store.bundle().ok_or("no_bundle")?;
        return stepmesh_ca::svid::verify(chain, &bundle, now)
            .map(|_| ())
            .map_err(|e| e.reason());
    }
    let leaf = chain.first().ok_or("no_client_cert")?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|_| "malformed")?;
    let not_after = cert.validity().not_after.timestamp();
    let skew = stepmesh_ca::svid::CLOCK_SKEW.as_secs() as i64;
    if (now.as_secs() as i64) > not_after.saturating_add(skew) {
        return Err("expired");
    }
    Ok(())
}

/// The SPIFFE ID in a (verified) leaf certificate's URI SAN (defined with
/// the identity it reads; here where handshakes use it).
pub use crate::identity::spiffe_id_of;

/// SHA-256 of a certificate's DER (the RFC 8705 `x5t#S256` thumbprint input).
pub fn cert_sha256(cert: &CertificateDer<'_>) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert);
    let mut out = [0; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

#[cfg(test)]
mod tests;
