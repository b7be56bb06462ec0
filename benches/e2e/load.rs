//! The load generator: open-loop fixed-rate latency (measured from each
//! request's intended send time, so a stalled server is not let off by the
//! client waiting for it), closed-loop saturation, a new connection per
//! request, bulk transfer, and idle connections held open.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Where load goes. With `opaque`, each connection starts with one byte no
/// HTTP request starts with, so the outbound sidecar forwards it as opaque
/// TCP (its HTTP detection says no); the backend's `l4` listener drops it.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// The address to connect to.
    pub addr: SocketAddr,
    /// Send the one-byte non-HTTP prefix first.
    pub opaque: bool,
}

impl Target {
    async fn connect(self) -> anyhow::Result<TcpStream> {
        let mut stream = TcpStream::connect(self.addr)
            .await
            .with_context(|| format!("connecting to {}", self.addr))?;
        stream.set_nodelay(true)?;
        if self.opaque {
            stream.write_all(&[0]).await?;
        }
        Ok(stream)
    }
}

/// One keep-alive HTTP/1.1 client connection.
struct Conn {
    addr: Target,
    sender: SendRequest<Empty<Bytes>>,
}

impl Conn {
    async fn open(addr: Target) -> anyhow::Result<Conn> {
        let stream = addr.connect().await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(Conn { addr, sender })
    }

    /// One GET; the whole body is read. A failed connection is reopened for
    /// the next request and the failure returned.
    async fn get(&mut self) -> anyhow::Result<()> {
        let outcome = async {
            self.sender.ready().await?;
            let req = hyper::Request::get("/")
                .header(hyper::header::HOST, "backend")
                .body(Empty::new())?;
            let resp = self.sender.send_request(req).await?;
            let status = resp.status();
            resp.into_body().collect().await?;
            if status != hyper::StatusCode::OK {
                bail!("status {status}");
            }
            anyhow::Ok(())
        }
        .await;
        if outcome.is_err() && self.sender.is_closed() {
            if let Ok(fresh) = Conn::open(self.addr).await {
                *self = fresh;
            }
        }
        outcome
    }
}

/// Latency histogram (nanoseconds) and counts of one fixed-rate run.
pub struct Latency {
    /// Per-request latency from the intended send time, in nanoseconds.
    pub hist: Histogram<u64>,
    /// From the due instant to the moment the request was handed to the
    /// connection, in nanoseconds: on an unloaded path this is the load
    /// generator's own floor (pacer wake-up), included in `hist`.
    pub dispatch: Histogram<u64>,
    /// Requests that failed (connection error or non-200).
    pub errors: u64,
    /// Requests completed per second over the measured window.
    pub achieved_rate: f64,
}

/// Sends `rate` requests/s spread over `connections` keep-alive connections
/// for `warmup + duration`; records the latency of the requests of the last
/// `duration` from the instant each one was due.
pub async fn latency(
    addr: Target,
    rate: u64,
    duration: Duration,
    warmup: Duration,
    connections: usize,
) -> anyhow::Result<Latency> {
    let mut txs = Vec::with_capacity(connections);
    let mut tasks = Vec::with_capacity(connections);
    let start = Instant::now() + Duration::from_millis(50);
    let measured_from = start + warmup;
    for _ in 0..connections {
        let mut conn = Conn::open(addr).await?;
        let (tx, mut rx) = mpsc::unbounded_channel::<Instant>();
        txs.push(tx);
        tasks.push(tokio::spawn(async move {
            let mut hist = new_histogram();
            let mut dispatch = new_histogram();
            let mut errors = 0u64;
            while let Some(due) = rx.recv().await {
                let lag = due.elapsed();
                let ok = conn.get().await.is_ok();
                let took = due.elapsed();
                if due >= measured_from {
                    dispatch.saturating_record(lag.as_nanos() as u64);
                    if ok {
                        hist.saturating_record(took.as_nanos() as u64);
                    } else {
                        errors += 1;
                    }
                }
            }
            (hist, dispatch, errors)
        }));
    }
    // The pacer: a thread of its own, sleeping then spinning to each due
    // instant (tokio's timer has 1 ms granularity: too coarse for 1 ms gaps).
    let end = measured_from + duration;
    let interval = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let pacer = std::thread::spawn(move || {
        let mut due = start;
        let mut i = 0usize;
        while due < end {
            pace_until(due);
            if txs[i % txs.len()].send(due).is_err() {
                break;
            }
            i += 1;
            due += interval;
        }
    });
    let mut hist = new_histogram();
    let mut dispatch = new_histogram();
    let mut errors = 0;
    for task in tasks {
        let (h, d, e) = task.await?;
        hist.add(h).context("merging histograms")?;
        dispatch.add(d).context("merging histograms")?;
        errors += e;
    }
    pacer
        .join()
        .map_err(|_| anyhow::anyhow!("the pacer thread panicked"))?;
    let elapsed = measured_from
        .elapsed()
        .as_secs_f64()
        .max(duration.as_secs_f64());
    Ok(Latency {
        achieved_rate: hist.len() as f64 / elapsed,
        hist,
        dispatch,
        errors,
    })
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
    // 1 µs .. 60 s at 3 significant digits; the bounds are valid constants.
    #[allow(clippy::unwrap_used)]
    Histogram::new_with_bounds(1_000, 60_000_000_000, 3).unwrap()
}

/// Requests completed in a closed-loop run.
pub struct Count {
    /// Successful operations (requests, connections).
    pub ok: u64,
    /// Failed operations.
    pub errors: u64,
    /// Wall time of the run.
    pub elapsed: Duration,
}

impl Count {
    /// Successful operations per second.
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }
}

/// Saturation: each of `connections` keep-alive connections sends its next
/// request as soon as the previous answer arrives, for `duration`.
pub async fn throughput(
    addr: Target,
    duration: Duration,
    connections: usize,
) -> anyhow::Result<Count> {
    let mut conns = Vec::with_capacity(connections);
    for _ in 0..connections {
        conns.push(Conn::open(addr).await?);
    }
    let start = Instant::now();
    let end = start + duration;
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut conn| {
            tokio::spawn(async move {
                let (mut ok, mut errors) = (0u64, 0u64);
                while Instant::now() < end {
                    match conn.get().await {
                        Ok(()) => ok += 1,
                        Err(_) => errors += 1,
                    }
                }
                (ok, errors)
            })
        })
        .collect();
    sum_counts(tasks, start).await
}

/// A new TCP connection per request (`Connection: close`), `concurrency`
/// of them in flight, for `duration`.
pub async fn new_connections(
    addr: Target,
    duration: Duration,
    concurrency: usize,
) -> anyhow::Result<Count> {
    let start = Instant::now();
    let end = start + duration;
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            tokio::spawn(async move {
                let (mut ok, mut errors) = (0u64, 0u64);
                let mut buf = vec![0u8; 64 * 1024];
                while Instant::now() < end {
                    match one_shot(addr, &mut buf).await {
                        Ok(()) => ok += 1,
                        Err(_) => errors += 1,
                    }
                }
                (ok, errors)
            })
        })
        .collect();
    sum_counts(tasks, start).await
}

async fn one_shot(addr: Target, buf: &mut [u8]) -> anyhow::Result<()> {
    let mut stream = addr.connect().await?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n")
        .await?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await?;
    if &head != b"HTTP/1.1 200" {
        bail!("not a 200 answer");
    }
    // The rest of the answer, up to the close.
    while stream.read(buf).await? != 0 {}
    Ok(())
}

async fn sum_counts(
    tasks: Vec<tokio::task::JoinHandle<(u64, u64)>>,
    start: Instant,
) -> anyhow::Result<Count> {
    let (mut ok, mut errors) = (0, 0);
    for task in tasks {
        let (o, e) = task.await?;
        ok += o;
        errors += e;
    }
    Ok(Count {
        ok,
        errors,
        elapsed: start.elapsed(),
    })
}

/// Pushes `bytes` through an echo server over one connection, reading the
/// echo concurrently; returns the time until the last byte came back.
pub async fn bulk(addr: SocketAddr, bytes: u64) -> anyhow::Result<Duration> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut r, mut w) = stream.into_split();
    let start = Instant::now();
    let writer = tokio::spawn(async move {
        let chunk = vec![0xa5u8; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            w.write_all(&chunk[..n]).await?;
            left -= n as u64;
        }
        w.shutdown().await?;
        anyhow::Ok(())
    });
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    while got < bytes {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            bail!("echo closed after {got} of {bytes} bytes");
        }
        got += n as u64;
    }
    let took = start.elapsed();
    writer.await??;
    Ok(took)
}

/// How long one idle connection may take to open and answer: a proxy out of
/// descriptors accepts nothing (the kernel's backlog takes the connection),
/// so without a bound the benchmark would hang instead of saying so.
const IDLE_OPEN_TIMEOUT: Duration = Duration::from_secs(15);

/// Opens `n` keep-alive connections, each proven end to end by one request,
/// and returns them to be held idle. Fails, saying which connection, if one
/// fails or takes longer than [`IDLE_OPEN_TIMEOUT`].
pub async fn hold_idle(addr: Target, n: usize) -> anyhow::Result<Vec<impl Sized>> {
    let mut held = Vec::with_capacity(n);
    let mut batch = Vec::new();
    for i in 0..n {
        batch.push(tokio::spawn(async move {
            let open = async {
                let mut conn = Conn::open(addr).await?;
                conn.get().await?;
                anyhow::Ok(conn.sender)
            };
            match tokio::time::timeout(IDLE_OPEN_TIMEOUT, open).await {
                Ok(outcome) => outcome.with_context(|| format!("idle connection {}", i + 1)),
                Err(_) => bail!(
                    "idle connection {} got no answer within {IDLE_OPEN_TIMEOUT:?}",
                    i + 1
                ),
            }
        }));
        if batch.len() == 64 || i + 1 == n {
            for task in batch.drain(..) {
                held.push(task.await??);
            }
        }
    }
    Ok(held)
}

/// Whether a `GET /` at `addr` answers 200 (readiness of a peer proxy pair).
pub async fn answers(addr: SocketAddr) -> bool {
    let target = Target {
        addr,
        opaque: false,
    };
    let mut buf = vec![0u8; 4096];
    matches!(
        tokio::time::timeout(Duration::from_secs(2), one_shot(target, &mut buf)).await,
        Ok(Ok(()))
    )
}
