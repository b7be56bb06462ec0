//! The Sign RPC end to end under concurrency: a real `stepmesh ca serve`
//! process, clients over TLS 1.3 (HTTP/2, several connections), join-token
//! credential, rate limit off.
//!
//! Phase 1, closed loop: as many signings per second as the CA gives.
//! Phase 2, open loop at a fixed rate (default 1,000/s): latency measured
//! from each request's scheduled start (no coordinated omission).
//!
//! `cargo bench --bench ca_sign_rpc` (env: CA_BENCH_SECS=10,
//! CA_BENCH_CONCURRENCY=64, CA_BENCH_CONNECTIONS=4, CA_BENCH_RATE=1000).
//! Prints a table and one JSON line.

#![allow(clippy::unwrap_used, missing_docs, dead_code)]

#[path = "../tests/common/ca.rs"]
mod ca;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use stepmesh_ca::client::make_csr;
use stepmesh_ca::proto::v1::certificate_authority_client::CertificateAuthorityClient;
use stepmesh_ca::proto::v1::SignRequest;
use tokio::sync::Mutex;
use tonic::transport::Channel;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn request(csr: &str) -> tonic::Request<SignRequest> {
    let mut req = tonic::Request::new(SignRequest {
        csr_pem: csr.to_owned(),
        ttl_seconds: 0,
    });
    req.metadata_mut()
        .insert("authorization", "Bearer bench-token".parse().unwrap());
    req
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let secs = env("CA_BENCH_SECS", 10);
    let concurrency = env("CA_BENCH_CONCURRENCY", 64);
    let connections = env("CA_BENCH_CONNECTIONS", 4).max(1);
    let rate = env("CA_BENCH_RATE", 1000).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let ca = ca::CaProcess::start_with(
        "bench.local",
        &[("bench-token", "spiffe://bench.local/ns/bench/sa/client")],
        &[
            "--sign-rate",
            "0",
            "--source-rate",
            "0",
            "--source-calls",
            "0",
        ],
    );
    rt.block_on(async move {
        let clients: Vec<CertificateAuthorityClient<Channel>> =
            (0..connections).map(|_| ca.client().grpc()).collect();
        let csr = Arc::new(make_csr(&rcgen::KeyPair::generate().unwrap(), None).unwrap());
        // Warm up every connection.
        for c in &clients {
            c.clone().sign(request(&csr)).await.unwrap();
        }

        // Phase 1: closed loop.
        let hist = Arc::new(Mutex::new(Histogram::<u64>::new(3).unwrap()));
        let done = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let end = Instant::now() + Duration::from_secs(secs);
        let start = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..concurrency {
            let mut client = clients[(i % connections) as usize].clone();
            let (csr, hist, done, errors) = (csr.clone(), hist.clone(), done.clone(), errors.clone());
            tasks.push(tokio::spawn(async move {
                let mut local = Histogram::<u64>::new(3).unwrap();
                while Instant::now() < end {
                    let t = Instant::now();
                    match client.sign(request(&csr)).await {
                        Ok(_) => {
                            local.record(t.elapsed().as_micros() as u64).unwrap();
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                hist.lock().await.add(&local).unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let elapsed = start.elapsed().as_secs_f64();
        let n = done.load(Ordering::Relaxed);
        let max_rate = n as f64 / elapsed;
        let h1 = hist.lock().await.clone();

        // Phase 2: open loop at a fixed rate.
        let hist2 = Arc::new(Mutex::new(Histogram::<u64>::new(3).unwrap()));
        let errors2 = Arc::new(AtomicU64::new(0));
        let interval = Duration::from_secs_f64(1.0 / rate as f64);
        let total = rate * secs;
        let t0 = tokio::time::Instant::now();
        let mut tasks = Vec::with_capacity(total as usize);
        for i in 0..total {
            let scheduled = t0 + interval * i as u32;
            tokio::time::sleep_until(scheduled).await;
            let mut client = clients[(i % connections) as usize].clone();
            let (csr, hist2, errors2) = (csr.clone(), hist2.clone(), errors2.clone());
            tasks.push(tokio::spawn(async move {
                match client.sign(request(&csr)).await {
                    Ok(_) => {
                        let us = scheduled.elapsed().as_micros() as u64;
                        hist2.lock().await.record(us).unwrap();
                    }
                    Err(_) => {
                        errors2.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let achieved = total as f64 / t0.elapsed().as_secs_f64();
        let h2 = hist2.lock().await.clone();

        let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        println!("CA Sign RPC, {connections} TLS connections, {secs}s per phase");
        println!("| phase | rate (/s) | p50 ms | p90 ms | p99 ms | p99.9 ms | errors |");
        println!("|---|---|---|---|---|---|---|");
        println!(
            "| closed loop, {concurrency} in flight | {max_rate:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
            ms(&h1, 0.5), ms(&h1, 0.9), ms(&h1, 0.99), ms(&h1, 0.999), errors.load(Ordering::Relaxed)
        );
        println!(
            "| open loop at {rate}/s | {achieved:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
            ms(&h2, 0.5), ms(&h2, 0.9), ms(&h2, 0.99), ms(&h2, 0.999), errors2.load(Ordering::Relaxed)
        );
        println!(
            "{}",
            serde_json::json!({
                "bench": "ca_sign_rpc",
                "connections": connections,
                "closed_loop": {"concurrency": concurrency, "rate": max_rate, "p50_ms": ms(&h1, 0.5), "p99_ms": ms(&h1, 0.99)},
                "open_loop": {"target_rate": rate, "rate": achieved, "p50_ms": ms(&h2, 0.5), "p90_ms": ms(&h2, 0.9), "p99_ms": ms(&h2, 0.99), "p999_ms": ms(&h2, 0.999), "errors": errors2.load(Ordering::Relaxed)},
            })
        );
    });
}
