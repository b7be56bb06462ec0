//! Many watches held open through the gateway: each on its own HTTP/1.1 TLS
//! connection (as many kubectl processes), or multiplexed over HTTP/2
//! connections (as one client-go process). Each watch reads its stream and
//! notes when an event naming the probe object arrives.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http::{header, HeaderValue, Request};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

use crate::client::Proto;

/// Where the watches go and as whom.
pub struct WatchTarget {
    /// The gateway's port on 127.0.0.1.
    pub port: u16,
    /// TLS to the gateway (ALPN as the protocol wants).
    pub tls: Arc<rustls::ClientConfig>,
    /// The watch's path and query.
    pub path: String,
    /// The bearer token header.
    pub auth: HeaderValue,
}

/// Watches open and being read.
pub struct Held {
    tasks: Vec<JoinHandle<()>>,
    watches: usize,
    /// Watches that have seen the probe.
    pub seen: Arc<AtomicUsize>,
    /// Connections opened (one per watch over HTTP/1.1).
    pub connections: usize,
    /// How long opening them all took.
    pub open_time: Duration,
}

impl Held {
    /// Waits until every watch has seen the probe, or `timeout`; returns
    /// how many did and how long it took.
    pub async fn wait_seen(&self, timeout: Duration) -> (usize, Duration) {
        let began = Instant::now();
        while self.seen.load(Ordering::Relaxed) < self.watches && began.elapsed() < timeout {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (self.seen.load(Ordering::Relaxed), began.elapsed())
    }

    /// Closes every watch (the tasks own the streams and connections).
    pub fn close(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}

async fn tls_connect(
    t: &WatchTarget,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(("127.0.0.1", t.port))
        .await
        .context("connecting to the gateway")?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from("127.0.0.1")?;
    TlsConnector::from(t.tls.clone())
        .connect(name, tcp)
        .await
        .context("TLS to the gateway")
}

fn request(t: &WatchTarget, absolute: bool) -> anyhow::Result<Request<Empty<Bytes>>> {
    let uri = if absolute {
        format!("https://127.0.0.1:{}{}", t.port, t.path)
    } else {
        t.path.clone()
    };
    Ok(Request::get(uri)
        .header(header::HOST, format!("127.0.0.1:{}", t.port))
        .header(header::AUTHORIZATION, t.auth.clone())
        .header(header::ACCEPT, "application/json")
        .body(Empty::new())?)
}

fn check(resp: &http::Response<Incoming>) -> anyhow::Result<()> {
    if resp.status() != http::StatusCode::OK {
        bail!("watch answered {}", resp.status());
    }
    Ok(())
}

/// Reads one watch's stream until it ends, counting the probe once.
async fn read(mut body: Incoming, marker: Arc<Vec<u8>>, seen: Arc<AtomicUsize>) {
    let mut tail: Vec<u8> = Vec::new();
    let mut counted = false;
    while let Some(Ok(frame)) = body.frame().await {
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if counted {
            continue;
        }
        // Keep only what a marker split across frames needs.
        tail.extend_from_slice(&data);
        if tail.windows(marker.len()).any(|w| w == marker.as_slice()) {
            counted = true;
            seen.fetch_add(1, Ordering::Relaxed);
        }
        let keep = tail.len().saturating_sub(marker.len());
        tail.drain(..keep);
    }
}

/// Opens `n` watches (at most `parallel` handshakes at once) and waits for
/// every response head; each then reads its stream looking for `marker`.
pub async fn open(
    t: Arc<WatchTarget>,
    n: usize,
    proto: Proto,
    streams_per_conn: usize,
    parallel: usize,
    marker: &str,
    timeout: Duration,
) -> anyhow::Result<Held> {
    let began = Instant::now();
    let seen = Arc::new(AtomicUsize::new(0));
    let marker = Arc::new(marker.as_bytes().to_vec());
    let gate = Arc::new(Semaphore::new(parallel.max(1)));
    let mut tasks = Vec::with_capacity(n);
    let mut heads = Vec::with_capacity(n);
    let connections = match proto {
        Proto::H1 => n,
        Proto::H2 => n.div_ceil(streams_per_conn.max(1)),
    };
    let mut senders = Vec::new();
    if proto == Proto::H2 {
        for _ in 0..connections {
            let tls = tls_connect(&t).await?;
            let (sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                    .await
                    .context("HTTP/2 handshake")?;
            tasks.push(tokio::spawn(async move {
                let _ = conn.await;
            }));
            senders.push(sender);
        }
    }
    for i in 0..n {
        let (t, gate, marker, seen) = (t.clone(), gate.clone(), marker.clone(), seen.clone());
        let h2 = senders.get(i / streams_per_conn.max(1)).cloned();
        let (head_tx, head_rx) = tokio::sync::oneshot::channel::<anyhow::Result<()>>();
        heads.push(head_rx);
        tasks.push(tokio::spawn(async move {
            let opened = async {
                let _permit = gate.acquire().await?;
                match h2 {
                    Some(mut sender) => {
                        sender.ready().await?;
                        let resp = sender.send_request(request(&t, true)?).await?;
                        check(&resp)?;
                        anyhow::Ok((resp.into_body(), None))
                    }
                    None => {
                        let tls = tls_connect(&t).await?;
                        let (mut sender, conn) =
                            hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
                        let conn = tokio::spawn(async move {
                            let _ = conn.await;
                        });
                        let resp = sender.send_request(request(&t, false)?).await?;
                        check(&resp)?;
                        Ok((resp.into_body(), Some((sender, conn))))
                    }
                }
            }
            .await;
            match opened {
                Ok((body, conn)) => {
                    let _ = head_tx.send(Ok(()));
                    read(body, marker, seen).await;
                    if let Some((_sender, conn)) = conn {
                        conn.abort();
                    }
                }
                Err(e) => {
                    let _ = head_tx.send(Err(e));
                }
            }
        }));
    }
    let (mut failed, mut late) = (0usize, 0usize);
    let mut first = None;
    let deadline = tokio::time::Instant::now() + timeout;
    for head in heads {
        match tokio::time::timeout_at(deadline, head).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => {
                failed += 1;
                first.get_or_insert(format!("{e:#}"));
            }
            Ok(Err(_)) => failed += 1,
            Err(_) => late += 1,
        }
    }
    let held = Held {
        tasks,
        watches: n,
        seen,
        connections,
        open_time: began.elapsed(),
    };
    if failed + late > 0 {
        held.close();
        bail!(
            "of {n} watches, {failed} failed and {late} had no answer within {timeout:?}; \
             first error: {}",
            first.unwrap_or_else(|| "none".to_owned())
        );
    }
    Ok(held)
}

/// CPU seconds (utime + stime) `pid` has used, from /proc/PID/stat.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces), 1-based 3..:
    // utime is field 14, stime 15, in clock ticks (100 per second on Linux).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    anyhow::ensure!(f.len() == 2, "utime and stime in /proc/{pid}/stat");
    Ok((f[0] + f[1]) as f64 / 100.0)
}

/// VmRSS and VmHWM of `pid`, in KiB, and its open file descriptors.
pub fn memory(pid: u32) -> anyhow::Result<(u64, u64, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .with_context(|| format!("{name} in /proc/{pid}/status"))
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    Ok((field("VmRSS:")?, field("VmHWM:")?, fds))
}
