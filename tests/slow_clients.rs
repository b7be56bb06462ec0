//! Slow and greedy clients through a real sidecar pair: clients that
//! trickle their request heads are closed at the header deadline and
//! counted while a good client keeps its latency; one workload (or one
//! source) opening connections without limit meets its cap, and another
//! still connects.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::mesh::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const OTHER_ID: &str = "spiffe://mesh.test/ns/shop/sa/batch";

/// A pair whose inbound port is `protocol: http`, with extra flags.
fn http_pair(server_extra: &[&str], client_extra: &[&str]) -> (Mesh, tempfile::TempDir) {
    let (app, _) = http_ok_app();
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "trustDomain: mesh.test\ninbound:\n  ports:\n    - port: {port}\n      protocol: http\n      allow: [{{from: [\"spiffe://mesh.test/*\"]}}]\n"
        ),
    )
    .unwrap();
    let mut server: Vec<String> = vec!["--policy".into(), policy.display().to_string()];
    server.extend(server_extra.iter().map(|s| s.to_string()));
    let client: Vec<String> = client_extra.iter().map(|s| s.to_string()).collect();
    (Mesh::start_on(port, app, &server, &client), dir)
}

/// The soft limit on open files, from /proc.
fn open_files_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap_or(0)
}

/// Opens a connection, sends the first `at_once` bytes of a request head,
/// then the rest one byte a second, without end; returns how long after
/// connecting the proxy closed it (None: still open after `give_up`).
async fn trickle(to: SocketAddr, at_once: usize, give_up: Duration) -> Option<Duration> {
    const HEAD: &[u8] = b"POST /refunds HTTP/1.1\r\nHost: x\r\n";
    const FIELD: &[u8] = b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut s = tokio::net::TcpStream::connect(to).await.ok()?;
    let started = Instant::now();
    s.write_all(&HEAD[..at_once]).await.ok()?;
    let mut buf = [0u8; 512];
    for byte in HEAD[at_once..].iter().chain(FIELD.iter().cycle()) {
        if started.elapsed() > give_up {
            return None;
        }
        match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {
                // A 408 answer: the close follows.
                continue;
            }
            Err(_) => {}
        }
        if s.write_all(std::slice::from_ref(byte)).await.is_err() {
            return Some(started.elapsed());
        }
    }
    None
}

#[test]
fn slow_header_clients_are_closed_at_the_deadline_and_a_good_client_keeps_its_latency() {
    let limit = open_files_limit();
    if limit < 12_000 {
        println!("skipped: this test holds ~8,000 descriptors and the open-files limit is {limit}");
        return;
    }
    const SLOW: usize = 2_000;
    let deadline = Duration::from_secs(5);
    let timeout = ["--header-timeout", "5s"];
    let (mesh, _dir) = http_pair(&timeout, &timeout);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let outbound = mesh.outbound;
    // Half trickle from the first byte (the inbound side's deadline closes
    // them: the outbound side tunnels what it cannot classify); half send
    // a request line and then trickle header bytes (the outbound relay's
    // deadline closes them with a 408).
    let slow: Vec<_> = (0..SLOW)
        .map(|i| {
            let at_once = if i % 2 == 0 { 1 } else { 33 };
            rt.spawn(trickle(outbound, at_once, Duration::from_secs(30)))
        })
        .collect();
    // Every slow client connected and started: now the good one.
    std::thread::sleep(Duration::from_millis(1500));
    let mut good = TcpStream::connect(outbound).unwrap();
    good.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(good.try_clone().unwrap());
    let mut latencies = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let start = Instant::now();
        good.write_all(b"GET /ok HTTP/1.1\r\nHost: app\r\n\r\n")
            .unwrap();
        let mut status = String::new();
        reader.read_line(&mut status).unwrap();
        assert!(status.starts_with("HTTP/1.1 200"), "{status:?}");
        let mut line = String::new();
        while line != "\r\n" {
            line.clear();
            reader.read_line(&mut line).unwrap();
        }
        let mut body = [0u8; 2];
        reader.read_exact(&mut body).unwrap();
        latencies.push(start.elapsed());
    }
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100];
    let closed: Vec<Option<Duration>> = slow.into_iter().map(|t| rt.block_on(t).unwrap()).collect();
    let open = closed.iter().filter(|c| c.is_none()).count();
    let mut times: Vec<Duration> = closed.iter().flatten().copied().collect();
    times.sort();
    let early = times
        .iter()
        .filter(|d| **d < deadline - Duration::from_secs(1))
        .count();
    // The proxy's clock starts when it has the connection (after accept,
    // detection and the mTLS handshake between the sidecars, which a burst
    // of 2,000 queues on a loaded machine), ours at connect: a straggler
    // may close some seconds after `deadline`, never at an idle timeout.
    let late = times
        .iter()
        .filter(|d| **d > deadline + Duration::from_secs(10))
        .count();
    let median = times.get(times.len() / 2).copied().unwrap_or_default();
    println!(
        "good client p50 {:?}, p99 {p99:?}; slow clients: {open} never closed, {early} closed early, {late} late; closed after: median {median:?}, max {:?}",
        latencies[latencies.len() / 2],
        times.last().copied().unwrap_or_default()
    );
    assert!(p99 < Duration::from_millis(50), "good client p99 {p99:?}");
    assert_eq!(open, 0, "every slow client is closed");
    assert_eq!(early, 0, "none before its deadline");
    assert_eq!(late, 0, "none long after its deadline");
    assert!(
        median >= deadline - Duration::from_secs(1) && median <= deadline + Duration::from_secs(2),
        "closed at the deadline: median {median:?} for a {deadline:?} deadline"
    );
    let counted = |sidecar: &Sidecar, direction: &str| {
        metric_value(
            &sidecar.metrics(),
            &format!(
                "stepmesh_http_refusals_total{{direction=\"{direction}\",reason=\"header_timeout\"}}"
            ),
        )
    };
    // The trickling-from-the-start half meets the inbound side's deadline;
    // the other half the outbound relay's (or, by a hair, the inbound one,
    // whose clock started when the relay dialled it).
    let (inbound, outbound) = (
        counted(&mesh.server, "inbound"),
        counted(&mesh.client, "outbound"),
    );
    println!("header_timeout refusals: inbound {inbound}, outbound {outbound}");
    assert!(inbound >= (SLOW / 2) as f64, "{}", mesh.server.metrics());
    assert!(
        inbound + outbound >= SLOW as f64,
        "{}",
        mesh.client.metrics()
    );
}

#[test]
fn one_workload_meets_its_per_peer_cap_and_another_still_connects() {
    let app = echo_server();
    let mesh = Mesh::start(app, &["--max-connections-per-peer".into(), "3".into()], &[]);
    // Three slots: the mesh connection and two tunnels on it.
    let held = hold(mesh.outbound, 2);
    let over = roundtrip(mesh.outbound, b"third").unwrap_or_default();
    assert!(
        over.is_empty(),
        "a third app connection of the same workload got through"
    );
    let line = mesh.server.wait_log("the cap's log line", |l| {
        l["message"]
            .as_str()
            .filter(|m| m.contains("per-peer connection cap reached"))
            .map(|_| l.clone())
    });
    assert_eq!(line["peer"], common::mesh::CLIENT_ID, "{line}");
    let series = r#"stepmesh_connections_rejected_total{direction="inbound",reason="peer_limit"}"#;
    eventually(series, || (mesh.server.metric(series) >= 1.0).then_some(()));

    // Another workload is not affected.
    let files = SvidFiles::write(
        mesh.dir.path(),
        "other",
        &mesh.pki,
        &mesh.pki.leaf(OTHER_ID),
    );
    let mut args = files.args();
    args.extend([
        "--outbound".into(),
        format!("127.0.0.1:0={}@{}", mesh.inbound, common::mesh::SERVER_ID),
    ]);
    let other = Sidecar::spawn(&args);
    other.wait_ready();
    assert_eq!(
        roundtrip(other.listener("outbound"), b"other").unwrap(),
        b"other"
    );
    drop(held);
    // Slots come back when connections end.
    eventually("a slot again", || {
        (roundtrip(mesh.outbound, b"again").unwrap_or_default() == b"again").then_some(())
    });
}

#[test]
fn tunnels_count_against_the_process_connection_limit() {
    let app = echo_server();
    let mesh = Mesh::start(app, &["--max-connections".into(), "3".into()], &[]);
    // Three places: the mesh connection's socket and two tunnels on it
    // (each opens an app connection, a descriptor).
    let held = hold(mesh.outbound, 2);
    let over = roundtrip(mesh.outbound, b"third").unwrap_or_default();
    assert!(
        over.is_empty(),
        "a third tunnel got through a limit of three connections"
    );
    let series =
        r#"stepmesh_connections_rejected_total{direction="inbound",reason="connection_limit"}"#;
    eventually(series, || (mesh.server.metric(series) >= 1.0).then_some(()));
    drop(held);
    eventually("a place again", || {
        (roundtrip(mesh.outbound, b"again").unwrap_or_default() == b"again").then_some(())
    });
}

#[test]
fn one_source_meets_its_per_source_cap() {
    let app = echo_server();
    let mesh = Mesh::start(
        app,
        &[],
        &["--max-connections-per-source".into(), "2".into()],
    );
    let _held = hold(mesh.outbound, 2);
    let over = roundtrip(mesh.outbound, b"third").unwrap_or_default();
    assert!(
        over.is_empty(),
        "a third connection from the same source got through"
    );
    let series =
        r#"stepmesh_connections_rejected_total{direction="outbound",reason="source_limit"}"#;
    eventually(series, || (mesh.client.metric(series) >= 1.0).then_some(()));
    mesh.client.wait_log("the cap's log line", |l| {
        l["message"]
            .as_str()
            .is_some_and(|m| m.contains("per-source connection cap reached"))
            .then_some(())
    });
}

#[test]
fn a_stalled_body_meets_its_deadline_and_head_limits_are_configurable() {
    let (mesh, _dir) = http_pair(
        &[],
        &[
            "--body-idle-timeout",
            "1s",
            "--max-request-headers",
            "4",
            "--max-request-header-bytes",
            "2048",
        ],
    );
    let status = |request: &[u8]| {
        let mut s = TcpStream::connect(mesh.outbound).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(request).unwrap();
        let started = Instant::now();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        (
            answer.lines().next().unwrap_or_default().to_owned(),
            started.elapsed(),
        )
    };
    // Two body bytes of ten, then nothing.
    let (line, took) = status(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nab");
    assert!(line.starts_with("HTTP/1.1 408"), "{line:?}");
    assert!(took < Duration::from_secs(5), "closed after {took:?}");
    let series = r#"stepmesh_http_refusals_total{direction="outbound",reason="body_timeout"}"#;
    eventually(series, || (mesh.client.metric(series) == 1.0).then_some(()));

    let (line, _) = status(b"GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n");
    assert!(
        line.starts_with("HTTP/1.1 431"),
        "five fields over four: {line:?}"
    );
    let long = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "x".repeat(2048));
    let (line, _) = status(long.as_bytes());
    assert!(
        line.starts_with("HTTP/1.1 431"),
        "over 2048 bytes: {line:?}"
    );
    let series = r#"stepmesh_http_refusals_total{direction="outbound",reason="head_too_large"}"#;
    eventually(series, || (mesh.client.metric(series) == 2.0).then_some(()));
    // Within the limits, the same connection shape is served.
    let (line, _) = status(b"GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nConnection: close\r\n\r\n");
    assert!(line.starts_with("HTTP/1.1 200"), "{line:?}");
}

#[test]
fn a_trickled_head_is_served_and_one_without_line_ends_meets_the_size_limit() {
    // The relay parses a head again only when a read brings a line end
    // (or passes the size limit): a head a byte a read still completes,
    // and one that never ends a line is refused at the limit, not at
    // the header deadline.
    let (mesh, _dir) = http_pair(&[], &["--max-request-header-bytes", "2048"]);
    let trickle = |pieces: &[&[u8]]| {
        let mut s = TcpStream::connect(mesh.outbound).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let started = Instant::now();
        for piece in pieces {
            // Refused, the rest is not read: the answer is what matters.
            if s.write_all(piece).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        (
            answer.lines().next().unwrap_or_default().to_owned(),
            started.elapsed(),
        )
    };
    let head = b"GET /trickled HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    let bytes: Vec<&[u8]> = head.chunks(1).collect();
    let (line, _) = trickle(&bytes);
    assert!(line.starts_with("HTTP/1.1 200"), "{line:?}");

    // A request line (so the outbound side detects HTTP), then a field
    // that never ends.
    let long = [
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Long: ".as_slice(),
        &[b'x'; 3000],
    ]
    .concat();
    let (line, took) = trickle(&long.chunks(100).collect::<Vec<_>>());
    assert!(line.starts_with("HTTP/1.1 431"), "{line:?}");
    assert!(took < Duration::from_secs(5), "refused after {took:?}");
}

#[test]
#[ignore = "a measurement, not a check: run by hand against release builds (STEPMESH_BIN), docs/BENCHMARKS.md"]
fn measure_the_cpu_of_a_head_trickled_a_byte_a_read() {
    // One 60 KiB head whose last field never ends a line until the end,
    // sent a byte at a time with a pause after each (so that each is a
    // read of its own), through the outbound sidecar: its CPU time then.
    let (mesh, _dir) = http_pair(&[], &[]);
    let mut s = TcpStream::connect(mesh.outbound).unwrap();
    s.set_nodelay(true).unwrap();
    let before = mesh.client.cpu_time();
    let started = Instant::now();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nX-Long: ")
        .unwrap();
    let bytes = 60_000;
    for i in 0..bytes {
        s.write_all(b"x").unwrap();
        // Paced by the clock, not a sleep per byte (which oversleeps).
        let due = Duration::from_micros(100) * (i + 1);
        while started.elapsed() < due {
            std::hint::spin_loop();
        }
    }
    s.write_all(b"\r\n\r\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    let cpu = mesh.client.cpu_time() - before;
    println!(
        "a {bytes}-byte field a byte a read over {:?}: outbound sidecar CPU {cpu:?}",
        started.elapsed()
    );
}
