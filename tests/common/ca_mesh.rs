//! A CA-fed sidecar pair and what the revocation, rotation and replica
//! tests do with it: a server sidecar (→ echo) and a client sidecar X both
//! enrolled with a CA address, the `stepmesh ca` admin command lines, a
//! live connection through X, and a load of kept and new connections.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::mesh::{echo_server, roundtrip, Sidecar, CLIENT_ID, PATIENCE, SERVER_ID};

/// The trust domain of the join tokens `server-token` and `client-token`.
pub const TD: &str = "mesh.test";
/// An admin token long enough for `--admin-token-file`.
pub const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef0123456789";

/// The admin token file (0600) in `dir`.
pub fn admin_token(dir: &Path, token: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(format!("admin-{}.token", token.len()));
    std::fs::write(&path, token).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// The join tokens of the pair, for `CaProcess::start_with`.
pub const PAIR_TOKENS: [(&str, &str); 2] =
    [("server-token", SERVER_ID), ("client-token", CLIENT_ID)];

/// `stepmesh proxy` flags enrolling with the CA at `ca_addr` by join token
/// `token` (written to `dir`), asking SVIDs of `ttl`.
pub fn sidecar_args(
    ca_addr: &str,
    bundle: &Path,
    dir: &Path,
    token: &str,
    ttl: &str,
) -> Vec<String> {
    super::ca::enrol_args(ca_addr, bundle, TD, dir, token, Some(ttl))
}

/// Server sidecar (→ echo) with a long-lived SVID; client sidecar X (the
/// workload under test) with `client_ttl`; both fed by `ca_addr`. Returns
/// them and X's outbound listener.
pub fn mesh(
    ca_addr: &str,
    bundle: &Path,
    dir: &Path,
    client_ttl: &str,
) -> (Sidecar, Sidecar, SocketAddr) {
    let app = echo_server();
    let mut args = sidecar_args(ca_addr, bundle, dir, "server-token", "1h");
    args.extend(["--inbound".into(), format!("127.0.0.1:0={app}")]);
    let server = Sidecar::spawn(&args);
    let inbound = server.listener("inbound");
    let mut args = sidecar_args(ca_addr, bundle, dir, "client-token", client_ttl);
    args.extend([
        "--outbound".into(),
        format!("127.0.0.1:0={inbound}@{SERVER_ID}"),
    ]);
    let client = Sidecar::spawn(&args);
    let outbound = client.listener("outbound");
    server.wait_ready();
    client.wait_ready();
    (server, client, outbound)
}

/// `stepmesh ca SUB --ca ADDR --ca-bundle .. --admin-token-file .. ARGS`.
pub fn admin(ca_addr: &str, bundle: &Path, token_file: &Path, sub: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stepmesh"))
        .args(["ca", sub, "--ca", ca_addr, "--ca-bundle"])
        .arg(bundle)
        .arg("--admin-token-file")
        .arg(token_file)
        .args(args)
        .output()
        .unwrap()
}

/// Exit code and both outputs, for assertion messages.
pub fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A live echo connection through X.
pub fn live(outbound: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(outbound).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.write_all(b"live").unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"live");
    s
}

/// Blocks until `s` ends; returns when.
pub fn closed_at(s: &mut TcpStream) -> Instant {
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return Instant::now(),
            Ok(_) => {}
        }
    }
}

/// Echo traffic through X until stopped: four kept connections doing round
/// trips, and a loop of new connections (each a new handshake).
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    workers: Vec<JoinHandle<()>>,
    fresh: JoinHandle<(usize, usize)>,
}

/// What a [`Load`] counted.
#[derive(Debug)]
pub struct LoadResult {
    /// Round trips on kept connections that echoed.
    pub ok: usize,
    /// Round trips on kept connections that did not.
    pub failed: usize,
    /// New connections that echoed.
    pub fresh_ok: usize,
    /// New connections that did not.
    pub fresh_failed: usize,
}

impl Load {
    /// Starts the traffic through `outbound`.
    pub fn start(outbound: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let workers = (0..4)
            .map(|_| {
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                std::thread::spawn(move || kept(outbound, &stop, &ok, &failed))
            })
            .collect();
        let fresh = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut good, mut bad) = (0, 0);
                while !stop.load(Ordering::Relaxed) {
                    if roundtrip(outbound, b"fresh").unwrap_or_default() == b"fresh" {
                        good += 1;
                    } else {
                        bad += 1;
                    }
                }
                (good, bad)
            })
        };
        Self {
            stop,
            ok,
            failed,
            workers,
            fresh,
        }
    }

    /// Round trips on kept connections that echoed so far.
    pub fn ok_so_far(&self) -> usize {
        self.ok.load(Ordering::Relaxed)
    }

    /// Stops the traffic and returns the counts.
    pub fn stop(self) -> LoadResult {
        self.stop.store(true, Ordering::Relaxed);
        self.workers.into_iter().for_each(|w| w.join().unwrap());
        let (fresh_ok, fresh_failed) = self.fresh.join().unwrap();
        LoadResult {
            ok: self.ok.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            fresh_ok,
            fresh_failed,
        }
    }
}

/// Echo round trips on one kept connection until `stop`.
fn kept(outbound: SocketAddr, stop: &AtomicBool, ok: &AtomicUsize, failed: &AtomicUsize) {
    let mut conn = TcpStream::connect(outbound).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 16];
    while !stop.load(Ordering::Relaxed) {
        let good = conn.write_all(b"0123456789abcdef").is_ok()
            && conn.read_exact(&mut buf).is_ok()
            && &buf == b"0123456789abcdef";
        if good {
            ok.fetch_add(1, Ordering::Relaxed);
        } else {
            failed.fetch_add(1, Ordering::Relaxed);
            // A new connection, so one failure is counted once.
            match TcpStream::connect(outbound) {
                Ok(c) => conn = c,
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}
