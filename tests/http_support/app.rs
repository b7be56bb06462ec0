//! The test app: reports what it received (headers, version, body size),
//! and speaks gRPC-shaped unary and server-streaming answers with trailers.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};

pub type Body = BoxBody<Bytes, Infallible>;

pub struct TestApp {
    pub addr: SocketAddr,
    /// `/grpc.Echo/Stream` and `/held` calls this app has begun answering.
    pub streams: Arc<std::sync::atomic::AtomicUsize>,
    /// Ends the answers to `/held`, which stay open until then.
    pub release: Arc<tokio::sync::Notify>,
}

fn grpc_frame(msg: &[u8]) -> Bytes {
    let mut f = Vec::with_capacity(5 + msg.len());
    f.push(0);
    f.extend_from_slice(&u32::try_from(msg.len()).unwrap().to_be_bytes());
    f.extend_from_slice(msg);
    Bytes::from(f)
}

fn grpc_trailers() -> HeaderMap {
    let mut t = HeaderMap::new();
    t.insert("grpc-status", HeaderValue::from_static("0"));
    t.insert("grpc-message", HeaderValue::from_static("done"));
    t
}

async fn app(
    req: Request<Incoming>,
    streams: Arc<std::sync::atomic::AtomicUsize>,
    release: Arc<tokio::sync::Notify>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let version = format!("{:?}", req.version());
    let mut headers = serde_json::Map::new();
    for (name, value) in req.headers() {
        let list = headers.entry(name.as_str()).or_insert_with(|| json!([]));
        list.as_array_mut()
            .unwrap()
            .push(json!(value.to_str().unwrap_or("<bin>")));
    }
    let method = req.method().to_string();
    match path.as_str() {
        "/fast" | "/refunds/fast" => {
            Ok(Response::new(Full::new(Bytes::from_static(b"ok")).boxed()))
        }
        "/grpc.Echo/Unary" => {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let reply = format!("echo:{}", String::from_utf8_lossy(&body[5..]));
            let frames = vec![
                Ok(Frame::data(grpc_frame(reply.as_bytes()))),
                Ok(Frame::trailers(grpc_trailers())),
            ];
            let body = StreamBody::new(futures_util::stream::iter(frames)).boxed();
            Ok(Response::builder()
                .header("content-type", "application/grpc")
                .body(body)
                .unwrap())
        }
        "/held" => {
            // A head and one byte now, the end once the test says.
            streams.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
            tokio::spawn(async move {
                let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"x")))).await;
                release.notified().await;
            });
            let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed();
            Ok(Response::new(body))
        }
        "/grpc.Echo/Stream" => {
            let _ = req.into_body().collect().await.unwrap();
            streams.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
            tokio::spawn(async move {
                for i in 0..5 {
                    tx.send(Ok(Frame::data(grpc_frame(format!("msg-{i}").as_bytes()))))
                        .await
                        .unwrap();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                tx.send(Ok(Frame::trailers(grpc_trailers()))).await.unwrap();
            });
            let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed();
            Ok(Response::builder()
                .header("content-type", "application/grpc")
                .body(body)
                .unwrap())
        }
        _ => {
            // Stream the body through, counting, never holding it.
            let mut body = req.into_body();
            let mut received: u64 = 0;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.unwrap().into_data() {
                    received += data.len() as u64;
                }
            }
            let report = json!({"method": method, "path": path, "version": version, "headers": headers, "received": received});
            Ok(Response::new(
                Full::new(Bytes::from(report.to_string())).boxed(),
            ))
        }
    }
}

impl TestApp {
    /// An app speaking HTTP/2 only (`h2`) or HTTP/1.1 only.
    pub async fn start(h2: bool) -> TestApp {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let streams = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let release = Arc::new(tokio::sync::Notify::new());
        let counter = streams.clone();
        let released = release.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let counter = counter.clone();
                let released = released.clone();
                let app = service_fn(move |req| app(req, counter.clone(), released.clone()));
                tokio::spawn(async move {
                    let io = TokioIo::new(tcp);
                    if h2 {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, app)
                            .await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, app)
                            .await;
                    }
                });
            }
        });
        TestApp {
            addr,
            streams,
            release,
        }
    }
}

/// The answer a client got.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
    pub data_frames: usize,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| panic!("not JSON: {:?}", self.body))
    }
}

/// Sends one request over a fresh HTTP/1.1 or HTTP/2 (prior knowledge) connection.
pub async fn send(addr: SocketAddr, h2: bool, req: Request<Body>) -> Answer {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let io = TokioIo::new(tcp);
    let resp = if h2 {
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        send.send_request(req).await.unwrap()
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        send.send_request(req).await.unwrap()
    };
    let (parts, mut body) = resp.into_parts();
    let mut data = Vec::new();
    let mut trailers = None;
    let mut data_frames = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap();
        match frame.into_data() {
            Ok(d) => {
                data_frames += 1;
                data.extend_from_slice(&d);
            }
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    Answer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: Bytes::from(data),
        trailers,
        data_frames,
    }
}

/// A request with a small body: origin-form + Host for HTTP/1.1, an
/// absolute URI for HTTP/2.
pub fn request(
    h2: bool,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &'static [u8],
) -> Request<Body> {
    let host = "api.payments:8080";
    let mut b = if h2 {
        Request::builder()
            .uri(format!("http://{host}{path}"))
            .version(http::Version::HTTP_2)
    } else {
        Request::builder().uri(path).header("host", host)
    };
    b = b.method(method);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::from_static(body)).boxed()).unwrap()
}
