//! Latency of the HTTP path against the L4 path through the same sidecar
//! pair, at a fixed request rate on one keep-alive connection each:
//! opaque TCP echo, HTTP on a route without step-up, and HTTP on a
//! sensitive route with a (cached) step-up token. A measurement, not a
//! pass/fail gate: run with
//! `cargo test --test http_perf -- --ignored --nocapture` (ideally release).

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;
mod http_support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::mesh::{free_port, Sidecar, SvidFiles};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::json;
use stepmesh::stepup::testing::{base_claims, TestIdp};
use stepmesh_ca::testing::Pki;

const ISS: &str = "https://idp.example.com";
const SERVER_ID: &str = "spiffe://mesh.test/ns/payments/sa/api";
const CLIENT_ID: &str = "spiffe://mesh.test/ns/web/sa/frontend";
const RATE: u64 = 1000;
const SECONDS: u64 = 5;
/// Saturation phase: this many closed-loop keep-alive connections, this long.
const SAT_CONNS: usize = 16;
const SAT_RUN: Duration = Duration::from_secs(3);

fn report(name: &str, h: &Histogram<u64>) {
    eprintln!(
        "{name:<28} n={:>5}  p50={:>6} µs  p90={:>6} µs  p99={:>6} µs  max={:>6} µs",
        h.len(),
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.9),
        h.value_at_quantile(0.99),
        h.max()
    );
}

/// Calls `op` RATE times a second for SECONDS, recording each latency.
fn paced(mut op: impl FnMut()) -> Histogram<u64> {
    let mut h = Histogram::<u64>::new(3).unwrap();
    let start = Instant::now();
    for i in 0..RATE * SECONDS {
        let due = start + Duration::from_micros(i * 1_000_000 / RATE);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let t = Instant::now();
        op();
        h.record(t.elapsed().as_micros() as u64).unwrap();
    }
    h
}

/// Runs `op` in a closed loop on SAT_CONNS threads, each with its own
/// connection from `connect`, for SAT_RUN; returns the operations done.
fn saturate<C: Send + 'static>(
    connect: impl Fn() -> C + Send + Sync + 'static,
    op: fn(&mut C),
) -> u64 {
    let stop = Arc::new(AtomicBool::new(false));
    let connect = Arc::new(connect);
    let threads: Vec<_> = (0..SAT_CONNS)
        .map(|_| {
            let (stop, connect) = (stop.clone(), connect.clone());
            std::thread::spawn(move || {
                let mut c = connect();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    op(&mut c);
                    n += 1;
                }
                n
            })
        })
        .collect();
    std::thread::sleep(SAT_RUN);
    stop.store(true, Ordering::Relaxed);
    threads.into_iter().map(|t| t.join().unwrap()).sum()
}

/// One HTTP/1.1 keep-alive `GET /fast` on a blocking socket (the answer is
/// `ok` with a Content-Length, as the test app sends it).
fn get_fast(s: &mut TcpStream) {
    s.write_all(b"GET /fast HTTP/1.1\r\nhost: api\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 4096];
    let mut have = 0;
    loop {
        let n = s.read(&mut buf[have..]).unwrap();
        assert!(n > 0, "connection closed mid-response");
        have += n;
        let text = &buf[..have];
        if let Some(end) = text.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&text[..end])
                .unwrap()
                .to_ascii_lowercase();
            assert!(head.starts_with("http/1.1 200"), "{head}");
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            if have >= end + 4 + len {
                assert_eq!(have, end + 4 + len, "one response at a time");
                return;
            }
        }
    }
}

fn echo64(s: &mut TcpStream) {
    let mut back = [0u8; 64];
    s.write_all(&[7u8; 64]).unwrap();
    s.read_exact(&mut back).unwrap();
}

fn connect_to(port: u16) -> impl Fn() -> TcpStream + Send + Sync + 'static {
    move || {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_nodelay(true).unwrap();
        s
    }
}

/// CPU per operation of each sidecar while `run` saturates the pair.
fn cpu_per_op(name: &str, client: &Sidecar, server: &Sidecar, run: impl FnOnce() -> u64) {
    let cpu0 = (client.cpu_time(), server.cpu_time());
    let ops = run();
    let per = |d: Duration| d.as_secs_f64() * 1e6 / ops.max(1) as f64;
    eprintln!(
        "{name:<28} {:>7.0} ops/s; CPU per op: outbound sidecar {:>5.1} µs, inbound sidecar {:>5.1} µs",
        ops as f64 / SAT_RUN.as_secs_f64(),
        per(client.cpu_time() - cpu0.0),
        per(server.cpu_time() - cpu0.1),
    );
}

#[test]
#[ignore = "measurement: run with --ignored --nocapture, ideally on a release build"]
fn http_path_against_l4_path() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let app = rt.block_on(http_support::app::TestApp::start(false));
    let echo = common::mesh::echo_server();
    let idp = TestIdp::new(ISS).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, idp.jwks().to_string()).unwrap();
    let (web, raw) = (free_port(), free_port());
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            r#"
trustDomain: mesh.test
stepUp:
  providers:
    idp: {{issuer: {ISS}, jwks: {{file: {}}}, audiences: [payments], algorithms: [ES256]}}
inbound:
  ports:
    - port: {web}
      protocol: http
      allow: [{{from: [{CLIENT_ID}]}}]
      routes:
        - name: refunds
          match: {{path: /refunds/*}}
          stepUp: {{provider: idp, acr: [mfa], bindToPeer: azp}}
    - port: {raw}
      protocol: tcp
      allow: [{{from: [{CLIENT_ID}]}}]
"#,
            jwks.display()
        ),
    )
    .unwrap();
    let pki = Pki::new("mesh.test");
    let files = SvidFiles::write(dir.path(), "server", &pki, &pki.leaf(SERVER_ID));
    let mut args = files.args();
    args.extend(["--no-access-log".into(), "--workers".into(), "1".into()]);
    args.extend(["--inbound".into(), format!("127.0.0.1:{web}={}", app.addr)]);
    args.extend(["--inbound".into(), format!("127.0.0.1:{raw}={echo}")]);
    args.extend(["--policy".into(), policy.display().to_string()]);
    let server = Sidecar::spawn(&args);
    let files = SvidFiles::write(dir.path(), "client", &pki, &pki.leaf(CLIENT_ID));
    let (out_web, out_raw) = (free_port(), free_port());
    let mut args = files.args();
    args.extend(["--no-access-log".into(), "--workers".into(), "1".into()]);
    args.extend([
        "--outbound".into(),
        format!("127.0.0.1:{out_web}=127.0.0.1:{web}@{SERVER_ID}"),
    ]);
    args.extend([
        "--outbound".into(),
        format!("127.0.0.1:{out_raw}=127.0.0.1:{raw}@{SERVER_ID}"),
    ]);
    let client = Sidecar::spawn(&args);
    server.wait_ready();
    client.wait_ready();

    // L4: 64 bytes echoed on one connection.
    let mut tcp = TcpStream::connect(("127.0.0.1", out_raw)).unwrap();
    tcp.set_nodelay(true).unwrap();
    let ping = [7u8; 64];
    let mut back = [0u8; 64];
    let cpu0 = (client.cpu_time(), server.cpu_time());
    let l4 = paced(|| {
        tcp.write_all(&ping).unwrap();
        tcp.read_exact(&mut back).unwrap();
    });
    let l4_cpu = (client.cpu_time() - cpu0.0, server.cpu_time() - cpu0.1);

    // HTTP/1.1 keep-alive on one connection.
    let addr: SocketAddr = format!("127.0.0.1:{out_web}").parse().unwrap();
    let mut send = rt.block_on(async {
        let io = TokioIo::new(tokio::net::TcpStream::connect(addr).await.unwrap());
        let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        send
    });
    let mut claims = base_claims(ISS, "payments", "alice");
    claims["acr"] = json!("mfa");
    claims["azp"] = json!(CLIENT_ID);
    let auth = format!("Bearer {}", idp.es256(&claims).unwrap());
    let call = |send: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
                path: &str,
                token: bool| {
        let mut req = http::Request::builder().uri(path).header("host", "api");
        if token {
            req = req.header("authorization", auth.as_str());
        }
        let req = req.body(Full::new(Bytes::new())).unwrap();
        rt.block_on(async {
            send.ready().await.unwrap();
            let resp = send.send_request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            resp.into_body().collect().await.unwrap();
        });
    };
    // STEPMESH_PERF_DIR=dir: a `perf record` of each sidecar during the HTTP phase.
    let perf: Vec<_> = std::env::var("STEPMESH_PERF_DIR")
        .map(|dir| {
            [("outbound", client.pid()), ("inbound", server.pid())]
                .map(|(name, pid)| {
                    std::process::Command::new("perf")
                        .args([
                            "record",
                            "-g",
                            "-o",
                            &format!("{dir}/http-{name}.data"),
                            "-p",
                            &pid.to_string(),
                            "--",
                            "sleep",
                            "3",
                        ])
                        .stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null())
                        .spawn()
                        .unwrap()
                })
                .into_iter()
                .collect()
        })
        .unwrap_or_default();
    let cpu0 = (client.cpu_time(), server.cpu_time());
    let plain = paced(|| call(&mut send, "/fast", false));
    let http_cpu = (client.cpu_time() - cpu0.0, server.cpu_time() - cpu0.1);
    for mut p in perf {
        p.wait().unwrap();
    }
    let stepup = paced(|| call(&mut send, "/refunds/fast", true));
    // The same exchanges without sidecars: what the sidecars add is the difference.
    let mut direct_tcp = TcpStream::connect(echo).unwrap();
    direct_tcp.set_nodelay(true).unwrap();
    let l4_direct = paced(|| {
        direct_tcp.write_all(&ping).unwrap();
        direct_tcp.read_exact(&mut back).unwrap();
    });
    let mut direct = rt.block_on(async {
        let io = TokioIo::new(tokio::net::TcpStream::connect(app.addr).await.unwrap());
        let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        send
    });
    let http_direct = paced(|| call(&mut direct, "/fast", false));
    eprintln!("\n{RATE} requests/s for {SECONDS} s, one connection each, through outbound → mTLS → inbound:");
    report("L4 echo (64 B)", &l4);
    report("HTTP/1.1, no step-up", &plain);
    report("HTTP/1.1, step-up (cached)", &stepup);
    report("L4 echo, direct", &l4_direct);
    report("HTTP/1.1, direct", &http_direct);
    let p50 = |h: &Histogram<u64>| h.value_at_quantile(0.5) as f64;
    let added_l4 = p50(&l4) - p50(&l4_direct);
    let added_http = p50(&plain) - p50(&http_direct);
    let added_stepup = p50(&stepup) - p50(&http_direct);
    eprintln!(
        "p50 added by the sidecar pair: L4 {added_l4:.0} µs, HTTP {added_http:.0} µs ({:+.0} %), HTTP + cached step-up {added_stepup:.0} µs ({:+.0} %)",
        (added_http / added_l4 - 1.0) * 100.0,
        (added_stepup / added_l4 - 1.0) * 100.0
    );
    eprintln!(
        "p50 through the pair / direct: L4 {:.2}x, HTTP {:.2}x; p99: L4 {:.2}x, HTTP {:.2}x",
        p50(&l4) / p50(&l4_direct),
        p50(&plain) / p50(&http_direct),
        l4.value_at_quantile(0.99) as f64 / l4_direct.value_at_quantile(0.99) as f64,
        plain.value_at_quantile(0.99) as f64 / http_direct.value_at_quantile(0.99) as f64,
    );
    let per = |d: Duration| d.as_secs_f64() * 1e6 / (RATE * SECONDS) as f64;
    eprintln!(
        "CPU per request at {RATE}/s (outbound, inbound sidecar): L4 {:.0} µs, {:.0} µs; HTTP {:.0} µs, {:.0} µs",
        per(l4_cpu.0),
        per(l4_cpu.1),
        per(http_cpu.0),
        per(http_cpu.1)
    );
    eprintln!("\nSaturation, {SAT_CONNS} closed-loop connections for {SAT_RUN:?}:");
    cpu_per_op("L4 echo (64 B)", &client, &server, || {
        saturate(connect_to(out_raw), echo64)
    });
    cpu_per_op("HTTP/1.1 GET /fast", &client, &server, || {
        saturate(connect_to(out_web), get_fast)
    });
}
