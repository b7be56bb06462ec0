//! Open-loop latency of one GET, through the gateway and straight to the API
//! server, alternating in one run: a pacer thread releases request i at its
//! due instant (sleep, then spin: tokio's timer is 1 ms coarse) to path
//! i % 2; latency runs from that due instant to the last byte of the body,
//! so a request that waits behind a slow one is charged the wait.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use http::{header, HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Empty};
use tokio::sync::mpsc;

use crate::client::HttpsClient;

/// One way to the object.
#[derive(Clone)]
pub struct Target {
    /// `gateway` or `direct`.
    pub name: &'static str,
    /// The client (its own connections).
    pub client: HttpsClient,
    /// The object's full URL.
    pub uri: Uri,
    /// `Authorization` (the gateway path's bearer token), if any.
    pub auth: Option<HeaderValue>,
}

impl Target {
    /// One GET, its body read whole; an error unless 200.
    pub async fn get(&self) -> anyhow::Result<usize> {
        let mut req = Request::get(self.uri.clone()).header(header::ACCEPT, "application/json");
        if let Some(auth) = &self.auth {
            req = req.header(header::AUTHORIZATION, auth.clone());
        }
        let resp = self.client.request(req.body(Empty::new())?).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        if status != http::StatusCode::OK {
            bail!(
                "{} answered {status}: {}",
                self.name,
                String::from_utf8_lossy(&body)
            );
        }
        Ok(body.len())
    }
}

/// The latencies of one path in one round.
pub struct PathLatency {
    /// Nanoseconds from the due instant to the end of the body.
    pub hist: Histogram<u64>,
    /// Failed requests (transport error or not 200).
    pub errors: u64,
    /// The first error, for the report.
    pub first_error: Option<String>,
}

/// `rate` requests/s to each target (interleaved: one every
/// 1 / (rate × targets) s) for `warmup + duration`; the last `duration`
/// is recorded.
pub async fn run(
    targets: &[Target],
    rate: u64,
    duration: Duration,
    warmup: Duration,
) -> anyhow::Result<Vec<PathLatency>> {
    for t in targets {
        t.get()
            .await
            .with_context(|| format!("the first GET to {}", t.name))?;
    }
    let start = Instant::now() + Duration::from_millis(50);
    let measured_from = start + warmup;
    let end = measured_from + duration;
    let per_second = rate.max(1) * targets.len() as u64;
    let interval = Duration::from_nanos(1_000_000_000 / per_second);
    let (due_tx, mut due_rx) = mpsc::unbounded_channel::<(Instant, usize)>();
    let n = targets.len();
    let pacer = std::thread::spawn(move || {
        let mut due = start;
        let mut i = 0usize;
        while due < end {
            pace_until(due);
            if due_tx.send((due, i % n)).is_err() {
                break;
            }
            i += 1;
            due += interval;
        }
    });
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    while let Some((due, which)) = due_rx.recv().await {
        let target = targets[which].clone();
        let done = done_tx.clone();
        tokio::spawn(async move {
            let outcome = target.get().await.map_err(|e| format!("{e:#}"));
            let _ = done.send((which, due, due.elapsed(), outcome));
        });
    }
    drop(done_tx);
    let mut results: Vec<PathLatency> = (0..n)
        .map(|_| PathLatency {
            hist: new_histogram(),
            errors: 0,
            first_error: None,
        })
        .collect();
    while let Some((which, due, took, outcome)) = done_rx.recv().await {
        if due < measured_from {
            continue;
        }
        let r = &mut results[which];
        match outcome {
            Ok(_) => r.hist.saturating_record(took.as_nanos() as u64),
            Err(e) => {
                r.errors += 1;
                r.first_error.get_or_insert(e);
            }
        }
    }
    pacer
        .join()
        .map_err(|_| anyhow::anyhow!("the pacer thread panicked"))?;
    Ok(results)
}

fn pace_until(due: Instant) {
    const SPIN: Duration = Duration::from_micros(100);
    let now = Instant::now();
    if due > now + SPIN {
        std::thread::sleep(due - now - SPIN);
    }
    while Instant::now() < due {
        std::hint::spin_loop();
    }
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 60 s at 3 significant digits: valid constant bounds.
    #[allow(clippy::unwrap_used)]
    Histogram::new_with_bounds(1_000, 60_000_000_000, 3).unwrap()
}
