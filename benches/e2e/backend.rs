//! The backends the load goes to, run in a child process (the bench binary
//! re-executed with `--serve-backend`) so their CPU is not the load
//! generator's: an HTTP/1.1 server answering a fixed body, and a TCP echo.

use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};

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
    /// The child process (killed on drop).
    pub proc: Proc,
}

/// Starts the backend child and waits for its addresses.
pub fn spawn(body_size: usize, log_dir: &Path) -> anyhow::Result<Backend> {
    let exe = std::env::current_exe().context("locating the bench binary")?;
    let log = log_dir.join("backend.log");
    let err = std::fs::File::create(&log).context("creating backend.log")?;
    let mut child = Command::new(exe)
        .args(["--serve-backend", "--payload", &body_size.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(err)
        .spawn()
        .context("spawning the backend child")?;
    let stdout = child.stdout.take().context("backend stdout")?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .context("reading the backend's addresses")?;
    let proc = Proc::adopt("backend", child, log);
    // "READY http=ADDR echo=ADDR"
    let mut http = None;
    let mut echo = None;
    for word in line.split_whitespace() {
        if let Some(a) = word.strip_prefix("http=") {
            http = Some(a.parse().context("backend http address")?);
        } else if let Some(a) = word.strip_prefix("echo=") {
            echo = Some(a.parse().context("backend echo address")?);
        }
    }
    match (http, echo) {
        (Some(http), Some(echo)) => Ok(Backend { http, echo, proc }),
        _ => bail!("backend did not start: {line:?}; log:\n{}", proc.log_tail()),
    }
}

/// The child's main: serves until its stdin closes (the parent went away).
pub fn serve(body_size: usize) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let http = TcpListener::bind("127.0.0.1:0").await?;
        let echo = TcpListener::bind("127.0.0.1:0").await?;
        println!(
            "READY http={} echo={}",
            http.local_addr()?,
            echo.local_addr()?
        );
        let body = Bytes::from(vec![b'x'; body_size]);
        tokio::spawn(serve_http(http, body));
        tokio::spawn(serve_echo(echo));
        // The parent holds our stdin; EOF means it is gone, and so are we.
        tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
        })
        .await?;
        anyhow::Ok(())
    })
}

async fn serve_http(listener: TcpListener, body: Bytes) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
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
