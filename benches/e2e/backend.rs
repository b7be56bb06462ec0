//! The backends the load goes to, run in a child process (the bench binary
//! re-executed with `--serve-backend`) so their CPU is not the load
//! generator's: an HTTP/1.1 server answering a fixed body, and a TCP echo.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::procs::Proc;

/// The running backend child and its two addresses.
pub struct Backend {
    /// HTTP/1.1 server answering every request with the fixed body.
    pub http: SocketAddr,
    /// TCP echo server (bulk transfer).
    pub echo: SocketAddr,
    /// The HTTP server again, behind a one-byte prefix that keeps the
    /// outbound sidecar from detecting HTTP (the opaque TCP path).
    pub l4: SocketAddr,
    /// The child process (killed on drop).
    pub proc: Proc,
}

/// Starts the backend child and waits for the addresses it prints.
pub async fn spawn(body_size: usize, log_dir: &Path) -> anyhow::Result<Backend> {
    let exe = std::env::current_exe().context("locating the bench binary")?;
    let mut cmd = Command::new(exe);
    cmd.args(["--serve-backend", "--payload", &body_size.to_string()]);
    let mut proc = Proc::spawn("backend", cmd, &log_dir.join("backend.log"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    // "READY http=ADDR echo=ADDR l4=ADDR"
    let line = loop {
        if let Some(line) = proc.log().lines().find(|l| l.starts_with("READY ")) {
            break line.to_owned();
        }
        proc.check_alive()?;
        if Instant::now() > deadline {
            bail!(
                "the backend printed no addresses; log:\n{}",
                proc.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let addr = |key: &str| -> anyhow::Result<SocketAddr> {
        let word = line.split_whitespace().find_map(|w| w.strip_prefix(key));
        word.with_context(|| format!("no {key} in {line:?}"))?
            .parse()
            .context("a backend address")
    };
    Ok(Backend {
        http: addr("http=")?,
        echo: addr("echo=")?,
        l4: addr("l4=")?,
        proc,
    })
}

/// The child's main: serves until its stdin closes (the parent went away).
pub fn serve(body_size: usize) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let http = TcpListener::bind("127.0.0.1:0").await?;
        let echo = TcpListener::bind("127.0.0.1:0").await?;
        let l4 = TcpListener::bind("127.0.0.1:0").await?;
        println!(
            "READY http={} echo={} l4={}",
            http.local_addr()?,
            echo.local_addr()?,
            l4.local_addr()?
        );
        let body = Bytes::from(vec![b'x'; body_size]);
        tokio::spawn(serve_http(http, body.clone(), false));
        tokio::spawn(serve_http(l4, body, true));
        tokio::spawn(serve_echo(echo));
        // Lives as long as the bench that started it: re-parented means it
        // is gone (killed before it could kill us).
        let parent = std::os::unix::process::parent_id();
        while std::os::unix::process::parent_id() == parent {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        anyhow::Ok(())
    })
}

/// With `prefixed`, each connection's first byte (the load generator's
/// non-HTTP marker) is dropped before HTTP starts.
async fn serve_http(listener: TcpListener, body: Bytes, prefixed: bool) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            if prefixed {
                let mut marker = [0u8; 1];
                if tokio::io::AsyncReadExt::read_exact(&mut stream, &mut marker)
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let service = service_fn(move |_req| {
                let body = body.clone();
                async move { Ok::<_, Infallible>(hyper::Response::new(Full::new(body))) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn serve_echo(listener: TcpListener) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let (mut r, mut w) = stream.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}
