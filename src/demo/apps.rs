//! The demo's workloads: the `payments` app (plain HTTP on loopback, behind
//! its sidecar) and the HTTP client the `frontend` and `reports` workloads
//! use to call it through their own sidecars.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

/// The payments app, served until dropped.
pub struct Payments {
    /// Where it listens (only its sidecar should reach it).
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Payments {
    /// Serves `GET /balance` and `POST /refunds` on a loopback port. The
    /// refunds answer reports what the app saw: the step-up subject the
    /// sidecar passed on and the caller identity header.
    pub async fn start() -> std::io::Result<Payments> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let service =
                        service_fn(|req| async move { Ok::<_, Infallible>(answer(&req)) });
                    let io = TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        Ok(Payments { addr, task })
    }
}

impl Drop for Payments {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer(req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("(none)")
    };
    let (status, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/balance") => (
            StatusCode::OK,
            r#"{"account":"acme","balance":"1250.00 EUR"}"#.to_owned(),
        ),
        (&Method::POST, "/refunds") => (
            StatusCode::OK,
            serde_json::json!({
                "refund": "accepted",
                "x-stepup-sub": header("x-stepup-sub"),
                "x-forwarded-client-cert": header("x-forwarded-client-cert"),
                "token forwarded to the app": req.headers().contains_key("authorization"),
            })
            .to_string(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "payments: no such route\n".to_owned(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}

/// What came back from a request; `status` None when the connection ended
/// without an HTTP answer (an L4 deny).
#[derive(Debug)]
pub struct Answer {
    /// The HTTP status, if any answer came.
    pub status: Option<StatusCode>,
    /// Response headers.
    pub headers: HeaderMap,
    /// Response body (lossy UTF-8).
    pub body: String,
    /// Why there was no answer.
    pub error: Option<String>,
}

impl Answer {
    /// A response header as text ("" if absent).
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// "200 OK" or "no HTTP answer (...)".
    pub fn describe(&self) -> String {
        match (self.status, &self.error) {
            (Some(s), _) => s.to_string(),
            (None, Some(e)) => format!("no HTTP answer ({e})"),
            (None, None) => "no HTTP answer".to_owned(),
        }
    }
}

/// Sends one HTTP/1.1 request over a fresh connection to `addr` (a
/// sidecar's outbound listener) and reads the answer.
pub async fn call(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
) -> Answer {
    match tokio::time::timeout(
        Duration::from_secs(15),
        try_call(addr, method, path, headers),
    )
    .await
    {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => Answer {
            status: None,
            headers: HeaderMap::new(),
            body: String::new(),
            error: Some(e),
        },
        Err(_) => Answer {
            status: None,
            headers: HeaderMap::new(),
            body: String::new(),
            error: Some("timed out after 15 s".into()),
        },
    }
}

async fn try_call(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Answer, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "payments");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| format!("{e}"))?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(Answer {
        status: Some(status),
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
        error: None,
    })
}
