//! The webhook over real HTTPS (TLS 1.3, HTTP/1.1 keep-alive as the API
//! server uses it): closed-loop clients send the API server's own
//! AdmissionReview for a fixed time; reviews/s and latency percentiles
//! printed as a table and one JSON line. Also the cost with a new TLS
//! connection per review.
//! Run: cargo bench -j2 --bench inject_https [-- SECONDS CONNECTIONS]
#![allow(missing_docs, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, KeyPair};
use stepmesh::inject::config::InjectorConfig;
use stepmesh::inject::server::{Limits, Server};
use stepmesh::tls::serving::{server_config, ReloadingCert};

const FIXTURE: &str = include_str!("../tests/fixtures/k8s/admissionreview-pod-create.json");

struct Client {
    tls: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

impl Client {
    async fn connect(&self) -> Sender {
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        sender
    }
}

async fn review(sender: &mut Sender) {
    let req = http::Request::post("/inject")
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(FIXTURE.as_bytes())))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(body.windows(9).any(|w| w == b"JSONPatch"));
}

/// Closed loop on `conns` connections for `secs`: (reviews/s, histogram µs).
async fn run(
    client: Arc<Client>,
    conns: usize,
    secs: u64,
    reconnect: bool,
) -> (f64, Histogram<u64>) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut h = Histogram::<u64>::new(3).unwrap();
                let mut sender = client.connect().await;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    if reconnect {
                        sender = client.connect().await;
                    }
                    review(&mut sender).await;
                    h.record(t.elapsed().as_micros() as u64).unwrap();
                }
                h
            })
        })
        .collect();
    let mut all = Histogram::<u64>::new(3).unwrap();
    for t in tasks {
        all.add(t.await.unwrap()).unwrap();
    }
    (all.len() as f64 / started.elapsed().as_secs_f64(), all)
}

/// Open loop: `rate` reviews/s spread over `conns` keep-alive connections for
/// `secs`; latency counted from each review's scheduled time, so a stall is
/// charged to every review it delays (no coordinated omission).
async fn open_loop(
    client: Arc<Client>,
    conns: usize,
    secs: u64,
    rate: u64,
) -> (f64, Histogram<u64>) {
    let interval = Duration::from_secs_f64(conns as f64 / rate as f64);
    let start = tokio::time::Instant::now() + Duration::from_millis(100);
    let per_conn = rate * secs / conns as u64;
    let tasks: Vec<_> = (0..conns)
        .map(|c| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut h = Histogram::<u64>::new(3).unwrap();
                let mut sender = client.connect().await;
                // Stagger connections across one interval.
                let offset = interval.mul_f64(c as f64 / conns as f64);
                for i in 0..per_conn {
                    let due = start + offset + interval.mul_f64(i as f64);
                    tokio::time::sleep_until(due).await;
                    review(&mut sender).await;
                    h.record(due.elapsed().as_micros() as u64).unwrap();
                }
                h
            })
        })
        .collect();
    let mut all = Histogram::<u64>::new(3).unwrap();
    for t in tasks {
        all.add(t.await.unwrap()).unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    (all.len() as f64 / elapsed, all)
}

fn main() {
    // `cargo bench` passes `--bench`; our own arguments are plain numbers.
    let nums: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let secs = nums.first().copied().unwrap_or(10);
    let conns = nums.get(1).copied().unwrap_or(8) as usize;

    let dir = tempfile::tempdir().unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let client_tls = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let resolver = ReloadingCert::load(&cert_path, &key_path).unwrap();
        let tls = server_config(resolver).unwrap();
        let server = Server::bind(
            "127.0.0.1:0".parse().unwrap(),
            tls,
            InjectorConfig::default(),
            Limits {
                max_body: 4 << 20,
                body_timeout: Duration::from_secs(30),
                bodies_in_flight: 32 << 20,
            },
        )
        .await
        .unwrap();
        let addr = server.local_addr().unwrap();
        tokio::spawn(server.run(std::future::pending(), Duration::from_secs(1)));
        let client = Arc::new(Client {
            tls: client_tls,
            addr,
        });
        run(client.clone(), conns, 1, false).await; // warm-up

        println!("| mode | connections | reviews/s | p50 ms | p90 ms | p99 ms | p99.9 ms |");
        println!("|---|---|---|---|---|---|---|");
        let mut json = Vec::new();
        let modes = [
            ("open loop 2,000/s, keep-alive", 4, Some(2000)),
            ("closed loop, keep-alive", conns, None),
            ("closed loop, keep-alive", 1, None),
            ("closed loop, new TLS connection per review", conns, None),
        ];
        for (i, (mode, c, fixed)) in modes.into_iter().enumerate() {
            let (rate, h) = match fixed {
                Some(target) => open_loop(client.clone(), c, secs, target).await,
                None => run(client.clone(), c, secs, i == 3).await,
            };
            let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
            println!(
                "| {mode} | {c} | {rate:.0} | {:.2} | {:.2} | {:.2} | {:.2} |",
                ms(0.5),
                ms(0.9),
                ms(0.99),
                ms(0.999)
            );
            json.push(serde_json::json!({
                "mode": mode, "connections": c, "reviews_per_s": rate.round(),
                "p50_ms": ms(0.5), "p90_ms": ms(0.9), "p99_ms": ms(0.99), "p999_ms": ms(0.999),
                "reviews": h.len(), "seconds": secs,
            }));
        }
        println!("{}", serde_json::Value::Array(json));
    });
}
