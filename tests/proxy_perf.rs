//! Quick data-plane measurements through two real sidecars with one worker
//! each (not a benchmark suite: benches/ has the open-loop one). Run:
//! `STEPMESH_BIN=target/release/stepmesh cargo test --test proxy_perf -- --ignored --nocapture`

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::ca::CaProcess;
use common::mesh::*;

const RUN: Duration = Duration::from_secs(3);

fn one_worker() -> Vec<String> {
    vec!["--workers".into(), "1".into(), "--no-access-log".into()]
}

/// Runs `work` on `threads` threads for RUN; returns operations done.
fn load(threads: usize, work: impl Fn(&AtomicBool) -> u64 + Send + Sync + 'static) -> u64 {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let work = Arc::new(work);
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (stop, done, work) = (stop.clone(), done.clone(), work.clone());
            std::thread::spawn(move || done.fetch_add(work(&stop), Ordering::Relaxed))
        })
        .collect();
    std::thread::sleep(RUN);
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().unwrap();
    }
    done.load(Ordering::Relaxed)
}

fn report(what: &str, mesh: &Mesh, ops: u64, cpu0: (Duration, Duration)) {
    let cpu = (
        mesh.client.cpu_time() - cpu0.0,
        mesh.server.cpu_time() - cpu0.1,
    );
    let per = |d: Duration| d.as_secs_f64() * 1e6 / ops.max(1) as f64;
    eprintln!(
        "{what}: {:.0}/s; CPU per op: outbound sidecar {:.1} µs, inbound sidecar {:.1} µs",
        ops as f64 / RUN.as_secs_f64(),
        per(cpu.0),
        per(cpu.1)
    );
}

#[test]
#[ignore = "measurement: run with --ignored --nocapture, ideally on a release build"]
fn measure() {
    let app = echo_server();
    for resumption in [true, false] {
        let mut extra = one_worker();
        if !resumption {
            extra.push("--no-session-resumption".into());
        }
        let mesh = Mesh::start(app, &one_worker(), &extra);
        eprintln!(
            "RSS idle after start: outbound {} KiB, inbound {} KiB",
            mesh.client.rss_kib(),
            mesh.server.rss_kib()
        );
        let cpu0 = (mesh.client.cpu_time(), mesh.server.cpu_time());
        let outbound = mesh.outbound;
        // STEPMESH_PERF_DIR=dir: a `perf record` of each sidecar meanwhile.
        let perf: Vec<_> = std::env::var("STEPMESH_PERF_DIR")
            .ok()
            .map(|dir| {
                [
                    ("outbound", mesh.client.pid()),
                    ("inbound", mesh.server.pid()),
                ]
                .map(|(name, pid)| {
                    std::process::Command::new("perf")
                        .args(["record", "-g", "-o"])
                        .arg(format!("{dir}/{name}-resumption-{resumption}.data"))
                        .args(["-p", &pid.to_string(), "--", "sleep", "2"])
                        .stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null())
                        .spawn()
                        .unwrap()
                })
                .into_iter()
                .collect()
            })
            .unwrap_or_default();
        let ops = load(4, move |stop| {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                assert_eq!(roundtrip(outbound, b"ping").unwrap(), b"ping");
                n += 1;
            }
            n
        });
        for mut p in perf {
            p.wait().unwrap();
        }
        let label = if resumption {
            "new connection per request, resumption"
        } else {
            "new connection per request, full handshake"
        };
        report(label, &mesh, ops, cpu0);
        if !resumption {
            continue;
        }

        let cpu0 = (mesh.client.cpu_time(), mesh.server.cpu_time());
        let ops = load(16, move |stop| {
            let mut c = TcpStream::connect(outbound).unwrap();
            c.set_nodelay(true).unwrap();
            let mut buf = [0u8; 64];
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                c.write_all(&[7u8; 64]).unwrap();
                c.read_exact(&mut buf).unwrap();
                n += 1;
            }
            n
        });
        report(
            "64-byte request/response over 16 kept-alive connections",
            &mesh,
            ops,
            cpu0,
        );

        let data = random_bytes(256 * 1024 * 1024, 9);
        let cpu0 = (mesh.client.cpu_time(), mesh.server.cpu_time());
        let started = Instant::now();
        let back = roundtrip(outbound, &data).unwrap();
        let took = started.elapsed();
        assert!(back == data);
        let cpu = (
            mesh.client.cpu_time() - cpu0.0,
            mesh.server.cpu_time() - cpu0.1,
        );
        eprintln!(
            "bulk: 256 MiB each way in {took:?} ({:.0} MiB/s each way); CPU outbound {:?}, inbound {:?}",
            256.0 / took.as_secs_f64(),
            cpu.0,
            cpu.1
        );
        eprintln!(
            "RSS after: outbound {} KiB, inbound {} KiB",
            mesh.client.rss_kib(),
            mesh.server.rss_kib()
        );
    }
}

#[test]
#[ignore = "measurement: run with --ignored --nocapture, ideally on a release build"]
fn measure_start_to_ready() {
    let ca = CaProcess::start("mesh.test", &[("t", SERVER_ID)]);
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t").unwrap();
    let app = echo_server();
    let mut best = Duration::MAX;
    for _ in 0..5 {
        let started = Instant::now();
        let sidecar = Sidecar::spawn(&[
            "--ca".into(),
            ca.grpc_host_port(),
            "--ca-bundle".into(),
            ca.bundle_path.display().to_string(),
            "--token-file".into(),
            token.display().to_string(),
            "--trust-domain".into(),
            "mesh.test".into(),
            "--inbound".into(),
            format!("127.0.0.1:0={app}"),
            "--workers".into(),
            "1".into(),
        ]);
        while http_get(sidecar.admin, "/ready").0 != 200 {
            assert!(started.elapsed() < PATIENCE);
        }
        let took = started.elapsed();
        eprintln!("process start to /ready 200 with an SVID from the CA: {took:?}");
        best = best.min(took);
    }
    eprintln!("best of 5: {best:?}");
}
