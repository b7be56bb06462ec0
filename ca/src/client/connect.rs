//! Dialing the CA: the address, TCP, then TLS 1.3 verified against the
//! bundle (optionally with a client SVID), ALPN h2 — as a tonic connector.

use std::net::IpAddr;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tonic::codegen::{Context, Poll, Service};
use tonic::transport::Uri;

use super::ClientError;

/// Where the CA is and the name its certificate must carry.
#[derive(Clone)]
pub(super) struct Target {
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) server_name: ServerName<'static>,
}

/// Parses `host:port`, `[v6]:port`, optionally with `https://`.
pub(super) fn parse_target(addr: &str) -> Result<Target, ClientError> {
    let bad = || ClientError::Config(format!("CA address {addr:?} is not host:port"));
    let rest = addr
        .strip_prefix("https://")
        .unwrap_or(addr)
        .trim_end_matches('/');
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, p) = v6.split_once("]:").ok_or_else(bad)?;
        (h.to_owned(), p)
    } else {
        let (h, p) = rest.rsplit_once(':').ok_or_else(bad)?;
        (h.to_owned(), p)
    };
    let port: u16 = port.parse().map_err(|_| bad())?;
    let server_name = match host.parse::<IpAddr>() {
        Ok(ip) => ServerName::IpAddress(ip.into()),
        Err(_) => ServerName::try_from(host.clone()).map_err(|_| bad())?,
    };
    Ok(Target {
        host,
        port,
        server_name,
    })
}

/// A host as it appears in a URI authority.
pub(super) fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

/// Dials the CA: TCP, then TLS 1.3 verified against the bundle, ALPN h2.
#[derive(Clone)]
pub(super) struct TlsConnector {
    target: Target,
    tls: tokio_rustls::TlsConnector,
}

impl TlsConnector {
    pub(super) fn new(
        target: Target,
        roots: Arc<rustls::RootCertStore>,
        client_cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> Result<Self, ClientError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| ClientError::Config(e.to_string()))?
            .with_root_certificates(roots);
        let mut config = match client_cert {
            Some((chain, key)) => builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| ClientError::Config(format!("client SVID: {e}")))?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            target,
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }
}

type ConnectFuture = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = std::io::Result<
                    hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
                >,
            > + Send,
    >,
>;

impl Service<Uri> for TlsConnector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = TcpStream::connect((this.target.host.as_str(), this.target.port)).await?;
            tcp.set_nodelay(true)?;
            let tls = this
                .tls
                .connect(this.target.server_name.clone(), tcp)
                .await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn targets() {
        let cases = [
            ("localhost:15012", "localhost", 15012),
            (
                "https://ca.stepmesh-system.svc:443/",
                "ca.stepmesh-system.svc",
                443,
            ),
            ("127.0.0.1:1", "127.0.0.1", 1),
            ("[::1]:8443", "::1", 8443),
        ];
        for (addr, host, port) in cases {
            let t = parse_target(addr).unwrap();
            assert_eq!((t.host.as_str(), t.port), (host, port), "{addr}");
        }
        for bad in ["localhost", "host:port", ":99", "[::1]", "a b:1"] {
            assert!(parse_target(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(bracket("::1"), "[::1]");
    }
}
