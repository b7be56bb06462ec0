//! Runs the original probes against the app on 127.0.0.1 and turns the
//! outcome into the status kubelet reads: 200 when the app is healthy, the
//! app's own status when it answers 400 or above, 503 when it cannot be
//! reached or does not answer in time, 404 for a path not in the table.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Request, StatusCode};
use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use super::{AppProbe, Grpc, HttpGet, ProbeTable, MAX_TIMEOUT_SECONDS};

/// Probes running at once; more are answered 503 at once, so a flood on
/// the (cluster-reachable) admin port cannot become a flood on the app.
const MAX_IN_FLIGHT: usize = 64;

/// The sidecar's prober: the table and what running it needs.
pub struct Prober {
    table: ProbeTable,
    in_flight: Semaphore,
    /// For `scheme: HTTPS` (built only when the table has such a probe).
    https: Option<tokio_rustls::TlsConnector>,
    /// `stepmesh_app_probes_total{probe, result}`.
    results: Family<ResultLabels, Counter>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    /// An admin path of the table (never a path a caller made up).
    probe: String,
    result: &'static str,
}

impl std::fmt::Debug for Prober {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prober")
            .field("table", &self.table)
            .field("https", &self.https.is_some())
            .finish_non_exhaustive()
    }
}

/// What kubelet gets back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Status of the admin response.
    pub status: StatusCode,
    /// A short explanation for people reading the probe's output.
    pub detail: String,
    /// The metric label: `healthy`, `unhealthy` (the app said so),
    /// `unreachable`, `timeout`, `busy` or `unknown` (not in the table).
    pub result: &'static str,
}

/// Why a probe could not get an answer from the app.
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error("connecting to 127.0.0.1:{port}: {cause}")]
    Connect { port: u16, cause: std::io::Error },
    #[error("HTTPS probes are unavailable (see the log at start)")]
    NoTls,
    #[error("TLS with the app: {0}")]
    Tls(std::io::Error),
    #[error("HTTP with the app: {0}")]
    Http(#[from] hyper::Error),
    #[error("gRPC health check: {0}")]
    Grpc(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl Prober {
    /// A prober for `table` (checked by [`super::parse`]), counting its
    /// results in `registry`.
    pub fn new(table: ProbeTable, registry: &mut Registry) -> Self {
        let results = Family::<ResultLabels, Counter>::default();
        registry.register(
            "stepmesh_app_probes",
            "kubelet probes of the app run by the sidecar, by admin path and result",
            results.clone(),
        );
        let wants_https = table
            .values()
            .any(|p| p.http_get.as_ref().is_some_and(HttpGet::is_https));
        Self {
            table,
            in_flight: Semaphore::new(MAX_IN_FLIGHT),
            https: if wants_https {
                insecure_connector()
            } else {
                None
            },
            results,
        }
    }

    /// Runs the probe of admin path `path`; `user_agent` is kubelet's, passed on.
    pub async fn answer(&self, path: &str, user_agent: Option<&HeaderValue>) -> Answer {
        let Some(probe) = self.table.get(path) else {
            return Answer::new(StatusCode::NOT_FOUND, "no such app probe".into(), "unknown");
        };
        let Ok(_permit) = self.in_flight.try_acquire() else {
            let answer = Answer::unavailable("too many probes in flight".into(), "busy");
            self.count(path, &answer);
            return answer;
        };
        let limit = Duration::from_secs(probe.timeout_seconds.clamp(1, MAX_TIMEOUT_SECONDS).into());
        let run = self.run(probe, user_agent);
        let answer = match tokio::time::timeout(limit, run).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => Answer::unavailable(e.to_string(), "unreachable"),
            Err(_) => Answer::unavailable(ProbeError::Timeout(limit).to_string(), "timeout"),
        };
        if !answer.status.is_success() {
            tracing::debug!(path, status = answer.status.as_u16(), detail = %answer.detail, "app probe failed");
        }
        self.count(path, &answer);
        answer
    }

    fn count(&self, path: &str, answer: &Answer) {
        let labels = ResultLabels {
            probe: path.to_owned(),
            result: answer.result,
        };
        self.results.get_or_create(&labels).inc();
    }

    async fn run(
        &self,
        probe: &AppProbe,
        user_agent: Option<&HeaderValue>,
    ) -> Result<Answer, ProbeError> {
        if let Some(h) = &probe.http_get {
            let status = self.http(h, user_agent).await?;
            let code = status.as_u16();
            return Ok(if (200..400).contains(&code) {
                Answer::healthy(format!("app answered {code}"))
            } else {
                Answer::new(status, format!("app answered {code}"), "unhealthy")
            });
        }
        if let Some(t) = &probe.tcp_socket {
            connect(t.port).await?;
            return Ok(Answer::healthy(format!("port {} open", t.port)));
        }
        if let Some(g) = &probe.grpc {
            return grpc(g).await;
        }
        // `parse` guarantees exactly one handler.
        Ok(Answer::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "probe without a handler".into(),
            "unreachable",
        ))
    }

    async fn http(
        &self,
        h: &HttpGet,
        user_agent: Option<&HeaderValue>,
    ) -> Result<StatusCode, ProbeError> {
        let tcp = connect(h.port).await?;
        let request = h.request(user_agent);
        if !h.is_https() {
            return send(tcp, request).await;
        }
        let tls = self.https.as_ref().ok_or(ProbeError::NoTls)?;
        let name = ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
        let stream = tls.connect(name, tcp).await.map_err(ProbeError::Tls)?;
        send(stream, request).await
    }
}

impl Answer {
    fn new(status: StatusCode, detail: String, result: &'static str) -> Self {
        Self {
            status,
            detail,
            result,
        }
    }

    fn healthy(detail: String) -> Self {
        Self::new(StatusCode::OK, detail, "healthy")
    }

    fn unavailable(detail: String, result: &'static str) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, detail, result)
    }
}

impl HttpGet {
    fn is_https(&self) -> bool {
        self.scheme.as_deref() == Some("HTTPS")
    }

    /// The GET kubelet would send: its headers, then the probe's own.
    fn request(&self, user_agent: Option<&HeaderValue>) -> Request<Empty<Bytes>> {
        let mut req = Request::new(Empty::new());
        // Checked by `parse`; "/" is the fallback kubelet uses as well.
        if let Ok(uri) = self.path.as_deref().unwrap_or("/").parse() {
            *req.uri_mut() = uri;
        }
        let headers = req.headers_mut();
        let host = format!("127.0.0.1:{}", self.port);
        // A formatted IP and port is always a valid header value.
        if let Ok(host) = HeaderValue::from_str(&host) {
            headers.insert(http::header::HOST, host);
        }
        headers.insert(
            http::header::USER_AGENT,
            user_agent
                .cloned()
                .unwrap_or(HeaderValue::from_static("kube-probe/stepmesh")),
        );
        headers.insert(http::header::ACCEPT, HeaderValue::from_static("*/*"));
        headers.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        for header in &self.http_headers {
            // Names and values checked by `parse`.
            if let (Ok(name), Ok(value)) = (
                http::HeaderName::from_bytes(header.name.as_bytes()),
                HeaderValue::from_str(&header.value),
            ) {
                headers.insert(name, value);
            }
        }
        req
    }
}

async fn connect(port: u16) -> Result<TcpStream, ProbeError> {
    TcpStream::connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        .await
        .map_err(|cause| ProbeError::Connect { port, cause })
}

/// One HTTP/1.1 request on its own connection; only the status is read.
async fn send<S>(stream: S, request: Request<Empty<Bytes>>) -> Result<StatusCode, ProbeError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let conn = AbortOnDrop(tokio::spawn(conn));
    let response = sender.send_request(request).await?;
    drop(conn);
    Ok(response.status())
}

/// `grpc.health.v1.Health/Check` over plaintext HTTP/2, as kubelet does;
/// `SERVING` is healthy, anything else 503.
async fn grpc(g: &Grpc) -> Result<Answer, ProbeError> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", g.port))
        .map_err(|e| ProbeError::Grpc(e.to_string()))?;
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| ProbeError::Grpc(e.to_string()))?;
    let request = HealthCheckRequest {
        service: g.service.clone().unwrap_or_default(),
    };
    let response = HealthClient::new(channel)
        .check(request)
        .await
        .map_err(|status| ProbeError::Grpc(format!("{}: {}", status.code(), status.message())))?;
    let serving = response.into_inner().status();
    Ok(if serving == ServingStatus::Serving {
        Answer::healthy("SERVING".into())
    } else {
        Answer::unavailable(serving.as_str_name().to_owned(), "unhealthy")
    })
}

/// Aborts the HTTP connection task when the probe is done (or timed out),
/// so an app that never closes cannot keep it alive.
struct AbortOnDrop(tokio::task::JoinHandle<Result<(), hyper::Error>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// kubelet does not verify an app's certificate on `scheme: HTTPS` probes;
/// neither do we (the connection never leaves the pod).
fn insecure_connector() -> Option<tokio_rustls::TlsConnector> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = Arc::new(AnyCertificate {
        provider: provider.clone(),
    });
    // TLS 1.2 and 1.3, as kubelet: apps are not ours to hold to 1.3.
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tracing::error!(error = %e, "HTTPS app probes unavailable"))
        .ok()?;
    let mut config = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// Accepts any server certificate; the handshake signature is still checked.
#[derive(Debug)]
struct AnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    crate::tls::verify::handshake_signatures!();
}
