//! The bench's HTTPS clients: the same code for both paths (to the gateway
//! with a bearer token, straight to the API server with a client
//! certificate), a hyper-util pooled client over rustls, HTTP/2 (as kubectl
//! speaks it) or HTTP/1.1 keep-alive.

use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use clap::ValueEnum;
use http_body_util::Empty;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The HTTP version a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
pub enum Proto {
    /// HTTP/2 (ALPN `h2`): one multiplexed connection, as kubectl.
    H2,
    /// HTTP/1.1 keep-alive (ALPN `http/1.1`): a pool of connections.
    H1,
}

/// A pooled HTTPS client.
pub type HttpsClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// A rustls client configuration trusting `ca_pem`, presenting `cert`
/// (PEM chain and key) if given; TLS 1.3, no ALPN (hyper-rustls sets its
/// own; see [`with_alpn`] for raw connections).
pub fn tls_config(
    ca_pem: &str,
    cert: Option<(&str, &str)>,
) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.context("a CA certificate")?)?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots);
    Ok(match cert {
        Some((chain, key)) => {
            let chain = CertificateDer::pem_slice_iter(chain.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .context("the client certificate")?;
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).context("the client key")?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    })
}

/// `config` offering only `proto` by ALPN.
pub fn with_alpn(mut config: rustls::ClientConfig, proto: Proto) -> rustls::ClientConfig {
    config.alpn_protocols = vec![match proto {
        Proto::H2 => b"h2".to_vec(),
        Proto::H1 => b"http/1.1".to_vec(),
    }];
    config
}

/// A pooled client speaking `proto` with `config` (TCP_NODELAY, as Go's
/// client sets it).
pub fn pooled(config: rustls::ClientConfig, proto: Proto) -> HttpsClient {
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    let b = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only();
    let connector = match proto {
        Proto::H2 => b.enable_http2().wrap_connector(tcp),
        Proto::H1 => b.enable_http1().wrap_connector(tcp),
    };
    let mut builder = Client::builder(TokioExecutor::new());
    builder.http2_only(proto == Proto::H2);
    builder.build(connector)
}
