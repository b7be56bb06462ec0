//! A foreign HTTP/2 client at full tilt through a real sidecar pair (two
//! `stepmesh proxy` processes, files SVIDs, TLS 1.3): h2load (nghttp2), 64
//! connections × 100 concurrent streams, 20,000 requests per burst, request
//! bodies of 1 KiB or 16 KiB and responses of 1 KiB and 16 KiB mixed, to
//! nghttpd. Six bursts: for each of two fresh outbound sidecars (an empty
//! mesh pool, 64 connections racing for it), three bursts (fresh, then
//! warm). Asserted: not one request fails, and each fresh pool opened one
//! mesh connection (counted at the inbound sidecar). Skips, saying why, when
//! h2load or nghttpd is not installed (Debian: nghttp2-client,
//! nghttp2-server).

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::mesh::{free_port, Sidecar, SvidFiles};
use stepmesh_ca::testing::Pki;

const SERVER_ID: &str = "spiffe://mesh.test/ns/payments/sa/api";
const FRONTEND: &str = "spiffe://mesh.test/ns/web/sa/frontend";
const REQUESTS: u64 = 20_000;

fn installed(bin: &str) -> bool {
    Command::new(bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// A child process killed when the test ends, however it ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// h2load's request summary line: `requests: N total, N started, N done,
/// N succeeded, N failed, N errored, N timeout`, and the 2xx count.
#[derive(Debug, PartialEq, Eq)]
struct Summary {
    done: u64,
    succeeded: u64,
    failed: u64,
    errored: u64,
    timeout: u64,
    status_2xx: u64,
}

fn field(line: &str, name: &str) -> Option<u64> {
    line.split(',').find_map(|part| {
        let part = part.trim();
        let number = part.strip_suffix(name)?.trim();
        number.rsplit(' ').next()?.parse().ok()
    })
}

fn summary(output: &str) -> Option<Summary> {
    let requests = output.lines().find(|l| l.starts_with("requests:"))?;
    let codes = output.lines().find(|l| l.starts_with("status codes:"))?;
    Some(Summary {
        done: field(requests, "done")?,
        succeeded: field(requests, "succeeded")?,
        failed: field(requests, "failed")?,
        errored: field(requests, "errored")?,
        timeout: field(requests, "timeout")?,
        status_2xx: field(codes, "2xx")?,
    })
}

#[test]
fn the_summary_parser_reads_h2loads_lines() {
    let out = "finished in 92.74ms, 21565.20 req/s, 179.74MB/s\n\
        requests: 2000 total, 2000 started, 1990 done, 1985 succeeded, 15 failed, 10 errored, 0 timeout\n\
        status codes: 1985 2xx, 0 3xx, 0 4xx, 5 5xx\n";
    assert_eq!(
        summary(out),
        Some(Summary {
            done: 1990,
            succeeded: 1985,
            failed: 15,
            errored: 10,
            timeout: 0,
            status_2xx: 1985,
        })
    );
    assert_eq!(summary("no summary"), None);
}

/// One burst: h2load against the outbound listener; its summary.
fn burst(outbound: std::net::SocketAddr, body: &Path) -> (Summary, Duration) {
    let started = Instant::now();
    let child = Command::new("h2load")
        .args(["-n", &REQUESTS.to_string(), "-c", "64", "-m", "100"])
        // A stalled connection ends as timed-out requests, not a hung test.
        .args(["-N", "20s"])
        .arg("-d")
        .arg(body)
        .arg(format!("http://{outbound}/1k"))
        .arg(format!("http://{outbound}/16k"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let s = summary(&text).unwrap_or_else(|| {
        panic!(
            "no h2load summary: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (s, started.elapsed())
}

#[test]
fn h2load_bursts_through_a_sidecar_pair_fail_no_request() {
    for bin in ["h2load", "nghttpd"] {
        if !installed(bin) {
            println!("skipped: {bin} is not installed (Debian: nghttp2-client, nghttp2-server)");
            return;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let docroot = dir.path().join("www");
    std::fs::create_dir(&docroot).unwrap();
    let bytes = |n: usize| (0..n).map(|i| (i % 251) as u8).collect::<Vec<u8>>();
    std::fs::write(docroot.join("1k"), bytes(1024)).unwrap();
    std::fs::write(docroot.join("16k"), bytes(16 * 1024)).unwrap();
    let (small, large) = (dir.path().join("body-1k"), dir.path().join("body-16k"));
    std::fs::write(&small, bytes(1024)).unwrap();
    std::fs::write(&large, bytes(16 * 1024)).unwrap();

    let app_port = free_port();
    let _app = Reaped(
        Command::new("nghttpd")
            .args(["--no-tls", "-d"])
            .arg(&docroot)
            .arg(app_port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    common::mesh::eventually("nghttpd listening", || {
        std::net::TcpStream::connect(("127.0.0.1", app_port)).ok()
    });

    let pki = Pki::new("mesh.test");
    let port = free_port();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "trustDomain: mesh.test\ninbound:\n  default: deny\n  ports:\n    - port: {port}\n      protocol: http\n      allow:\n        - name: web\n          from: [{FRONTEND}]\n"
        ),
    )
    .unwrap();
    let files = SvidFiles::write(dir.path(), "server", &pki, &pki.leaf(SERVER_ID));
    let mut args = files.args();
    args.extend([
        "--no-access-log".into(),
        "--inbound".into(),
        format!("127.0.0.1:{port}=127.0.0.1:{app_port}"),
        "--policy".into(),
        policy.display().to_string(),
    ]);
    let server = Sidecar::spawn(&args);
    server.wait_ready();
    let inbound = server.listener("inbound");
    // mTLS connections the server accepted (its handshakes: a mesh
    // connection that carries tunnels is counted in
    // `stepmesh_connections_total` through its tunnels, not itself).
    let accepted = || {
        ["full", "resumed"]
            .iter()
            .map(|kind| {
                server.metric(&format!(
                    r#"stepmesh_tls_handshakes_total{{direction="inbound",kind="{kind}"}}"#
                ))
            })
            .sum::<f64>()
    };

    let started = Instant::now();
    for pool in 0..2 {
        let files = SvidFiles::write(dir.path(), "frontend", &pki, &pki.leaf(FRONTEND));
        let mut args = files.args();
        args.extend([
            "--no-access-log".into(),
            "--outbound".into(),
            format!("127.0.0.1:0={inbound}@{SERVER_ID}"),
        ]);
        let frontend = Sidecar::spawn(&args);
        frontend.wait_ready();
        let outbound = frontend.listener("outbound");
        let before = accepted();
        for round in 0..3 {
            let body = if round != 1 { &small } else { &large };
            let cpu = (frontend.cpu_time(), server.cpu_time());
            let (s, took) = burst(outbound, body);
            let per_request = |before: Duration, after: Duration| {
                (after - before).as_secs_f64() * 1e6 / REQUESTS as f64
            };
            let pool_state = if round == 0 { "fresh" } else { "warm" };
            println!(
                "pool {pool} burst {round} ({pool_state}, body {body:?}): {s:?} in {took:?}, \
                 {:.0} req/s, CPU µs/req outbound {:.1} inbound {:.1}",
                REQUESTS as f64 / took.as_secs_f64(),
                per_request(cpu.0, frontend.cpu_time()),
                per_request(cpu.1, server.cpu_time()),
            );
            assert_eq!(
                (
                    s.done,
                    s.succeeded,
                    s.failed,
                    s.errored,
                    s.timeout,
                    s.status_2xx
                ),
                (REQUESTS, REQUESTS, 0, 0, 0, REQUESTS),
                "pool {pool} burst {round} ({pool_state}): every request succeeds"
            );
        }
        let opened = accepted() - before;
        assert_eq!(
            opened, 1.0,
            "64 h2load connections racing for a fresh pool open one mesh connection"
        );
    }
    println!("six bursts in {:?}", started.elapsed());
}
