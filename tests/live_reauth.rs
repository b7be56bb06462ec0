//! Live re-authorization through real sidecars: established connections
//! (opaque L4 streams — tunnels on one pooled mesh connection — and a
//! keep-alive HTTP/1 connection) from workload X survive a policy reload
//! that still allows X, and are closed within 2 s of one that denies X; new
//! connections from X are refused; workload Y's connections are untouched.
//! Also: a trust bundle that drops X's root closes X's connections, tunnels
//! and mTLS connections of their own (`--no-tunnel`) alike; a request in
//! flight when X is denied still gets its response, and its connection then
//! takes no other.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;
mod http_support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::mesh::*;
use stepmesh_ca::testing::Pki;

const X: &str = "spiffe://mesh.test/ns/shop/sa/x";
const Y: &str = "spiffe://mesh.test/ns/shop/sa/y";
const Z: &str = "spiffe://mesh.test/ns/shop/sa/z";
/// How soon a denied connection must be closed (the policy file is polled
/// every 500 ms; the close follows the reload at once).
const REVOKE_WITHIN: Duration = Duration::from_secs(2);

/// An L4 port and an HTTP port, each allowing `from`.
fn policy(l4: u16, web: u16, from: &[&str]) -> String {
    let from = from.join(", ");
    format!(
        "trustDomain: mesh.test\ninbound:\n  default: deny\n  ports:\n    - port: {l4}\n      protocol: tcp\n      allow:\n        - name: l4-clients\n          from: [{from}]\n    - port: {web}\n      protocol: http\n      allow:\n        - name: web-clients\n          from: [{from}]\n"
    )
}

/// The server sidecar (`SERVER_ID`, its SVID files under `dir`, its
/// bundle `bundle` if given, else `pki`'s): an inbound listener per
/// `(port, app)`, under `policy` (written to `dir/policy.yaml`); ready.
/// Its SVID files and policy file are returned for changes.
fn server(
    dir: &Path,
    pki: &Pki,
    bundle: Option<&str>,
    inbound: &[(u16, SocketAddr)],
    policy: &str,
) -> (Sidecar, SvidFiles, PathBuf) {
    let policy_file = dir.join("policy.yaml");
    std::fs::write(&policy_file, policy).unwrap();
    let files = SvidFiles::write(dir, "server", pki, &pki.leaf(SERVER_ID));
    if let Some(bundle) = bundle {
        atomic_write(&files.bundle, bundle.as_bytes());
    }
    let mut args = files.args();
    for (port, app) in inbound {
        args.extend(["--inbound".into(), format!("127.0.0.1:{port}={app}")]);
    }
    args.extend(["--policy".into(), policy_file.display().to_string()]);
    let server = Sidecar::spawn(&args);
    server.wait_ready();
    (server, files, policy_file)
}

fn client(
    dir: &Path,
    pki: &Pki,
    id: &str,
    bundle: Option<&str>,
    (l4, web): (SocketAddr, SocketAddr),
) -> (Sidecar, SocketAddr, SocketAddr) {
    client_with(dir, pki, id, bundle, (l4, web), &[])
}

/// As [`client`], with `extra` flags, its files named after the
/// identity and the flags.
fn client_with(
    dir: &Path,
    pki: &Pki,
    id: &str,
    bundle: Option<&str>,
    (l4, web): (SocketAddr, SocketAddr),
    extra: &[&str],
) -> (Sidecar, SocketAddr, SocketAddr) {
    let name = format!("{}{}", id.rsplit('/').next().unwrap(), extra.concat());
    let files = SvidFiles::write(dir, &name, pki, &pki.leaf(id));
    if let Some(bundle) = bundle {
        atomic_write(&files.bundle, bundle.as_bytes());
    }
    let mut args = files.args();
    args.extend(extra.iter().map(|a| a.to_string()));
    args.extend([
        "--outbound".into(),
        format!("127.0.0.1:0={l4}@{SERVER_ID}"),
        "--outbound".into(),
        format!("127.0.0.1:0={web}@{SERVER_ID}"),
    ]);
    let sidecar = Sidecar::spawn(&args);
    let listener_to = |upstream: SocketAddr| {
        sidecar.wait_log("outbound listener", |l| {
            (l["message"] == "listening"
                && l["kind"] == "outbound"
                && l["upstream"]
                    .as_str()
                    .unwrap()
                    .starts_with(&upstream.to_string()))
            .then(|| l["listen"].as_str().unwrap().parse().unwrap())
        })
    };
    let (to_l4, to_web) = (listener_to(l4), listener_to(web));
    sidecar.wait_ready();
    (sidecar, to_l4, to_web)
}

/// A long-lived echo connection.
struct Echo(TcpStream);

impl Echo {
    fn open(addr: SocketAddr) -> Echo {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut echo = Echo(s);
        assert!(echo.ping(b"hello"), "a fresh L4 connection echoes");
        echo
    }

    /// Whether `data` comes back.
    fn ping(&mut self, data: &[u8]) -> bool {
        if self.0.write_all(data).is_err() {
            return false;
        }
        let mut back = vec![0; data.len()];
        self.0.read_exact(&mut back).is_ok() && back == data
    }

    /// Waits for the connection to end (EOF or reset), returning when.
    fn closed_at(&mut self) -> Instant {
        let mut buf = [0u8; 64];
        loop {
            match self.0.read(&mut buf) {
                Ok(0) | Err(_) => return Instant::now(),
                Ok(_) => {}
            }
        }
    }
}

/// A keep-alive HTTP/1.1 connection.
struct Http(BufReader<TcpStream>);

impl Http {
    fn open(addr: SocketAddr) -> Http {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut http = Http(BufReader::new(s));
        assert_eq!(http.get(), Some(200), "a fresh HTTP connection is served");
        http
    }

    /// One GET on the connection: its status, `None` if the connection ended.
    fn get(&mut self) -> Option<u16> {
        let req = b"GET /thing HTTP/1.1\r\nHost: app\r\n\r\n";
        self.0.get_mut().write_all(req).ok()?;
        let mut status = String::new();
        if self.0.read_line(&mut status).ok()? == 0 {
            return None;
        }
        let code = status.split(' ').nth(1)?.parse().ok()?;
        let mut length = 0;
        loop {
            let mut line = String::new();
            if self.0.read_line(&mut line).ok()? == 0 {
                return None;
            }
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().ok()?;
                }
            }
        }
        let mut body = vec![0; length];
        self.0.read_exact(&mut body).ok()?;
        Some(code)
    }

    /// Waits for the connection to end, returning when.
    fn closed_at(&mut self) -> Instant {
        let mut buf = [0u8; 64];
        loop {
            match self.0.read(&mut buf) {
                Ok(0) | Err(_) => return Instant::now(),
                Ok(_) => {}
            }
        }
    }
}

/// A fresh one-request HTTP connection's status (0: no answer).
fn fresh_status(addr: SocketAddr) -> u16 {
    http_get(addr, "/fresh").0
}

#[test]
fn a_reload_that_denies_x_closes_its_live_connections_and_spares_others() {
    let echo = echo_server();
    let (web_app, _) = http_ok_app();
    let (l4_port, web_port) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("mesh.test");
    let inbound = [(l4_port, echo), (web_port, web_app)];
    let rules = policy(l4_port, web_port, &[X, Y]);
    let (server, _, policy_file) = server(dir.path(), &pki, None, &inbound, &rules);
    let l4: SocketAddr = format!("127.0.0.1:{l4_port}").parse().unwrap();
    let web: SocketAddr = format!("127.0.0.1:{web_port}").parse().unwrap();
    let (_x, x_l4, x_web) = client(dir.path(), &pki, X, None, (l4, web));
    let (_y, y_l4, y_web) = client(dir.path(), &pki, Y, None, (l4, web));

    let mut x_stream = Echo::open(x_l4);
    let mut x_http = Http::open(x_web);
    let mut y_stream = Echo::open(y_l4);
    let mut y_http = Http::open(y_web);
    // X's second L4 connection is a second tunnel on the same mesh
    // connection: no new handshake at the server.
    let handshakes = inbound_handshakes_of(&server);
    let mut x_tunnel = Echo::open(x_l4);
    assert_eq!(
        inbound_handshakes_of(&server),
        handshakes,
        "a tunnel, not a connection"
    );

    // A reload that still allows X: nothing is closed.
    reload_policy(
        &server,
        &policy_file,
        &policy(l4_port, web_port, &[X, Y, Z]),
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        x_stream.ping(b"still"),
        "X's L4 connection survives a reload that allows X"
    );
    assert!(x_tunnel.ping(b"still"), "so does its second tunnel");
    assert_eq!(x_http.get(), Some(200), "X's HTTP connection survives it");
    let revoked_before = server.metric("stepmesh_connections_revoked_total");
    assert_eq!(revoked_before, 0.0, "nothing revoked by an allowing reload");

    // A reload that denies X.
    let denied = reload_policy(&server, &policy_file, &policy(l4_port, web_port, &[Y]));
    let stream_closed = x_stream.closed_at();
    let tunnel_closed = x_tunnel.closed_at();
    let http_closed = x_http.closed_at();
    for (what, at) in [
        ("L4", stream_closed),
        ("second tunnel", tunnel_closed),
        ("HTTP", http_closed),
    ] {
        let took = at.duration_since(denied);
        assert!(
            took < REVOKE_WITHIN,
            "X's {what} connection closed {took:?} after the policy file changed"
        );
    }
    // New connections from X are refused: L4 closed without a byte, HTTP 403.
    assert!(
        roundtrip(x_l4, b"again").unwrap_or_default().is_empty(),
        "a new L4 connection from X is refused"
    );
    assert_eq!(
        fresh_status(x_web),
        403,
        "a new HTTP request from X is denied"
    );
    // Y is untouched, on the connections it had and on new ones.
    assert!(y_stream.ping(b"y-still"), "Y's L4 connection is untouched");
    assert_eq!(y_http.get(), Some(200), "Y's HTTP connection is untouched");
    assert_eq!(roundtrip(y_l4, b"y-new").unwrap(), b"y-new");
    assert_eq!(fresh_status(y_web), 200);

    // Counted and logged with the rule that denied them: on the L4 port
    // the two tunnels (the mesh connection they rode is not an app
    // connection: it stays, quiet, for the tunnels a policy allows); on
    // the HTTP port the tunnel of X's HTTP/1 connection and the mesh
    // connection it rode, which also carries X's HTTP/2 requests and so
    // is closed as an HTTP connection is.
    let metrics = server.metrics();
    for (port, closed) in [("inbound.ports[0]", 2.0), ("inbound.ports[1]", 2.0)] {
        let series =
            format!("stepmesh_connections_revoked_total{{reason=\"not_allowed\",rule=\"{port}\"}}");
        assert_eq!(
            metric_value(&metrics, &series),
            closed,
            "{series}:\n{metrics}"
        );
    }
    server.wait_log("revocation logged", |l| {
        (l["message"] == "inbound connection revoked: closing" && l["peer"] == X).then_some(())
    });
    let line = server.wait_access("the revoked L4 connection's access-log line", |l| {
        l["peer_id"] == X
            && l["port"] == l4_port
            && l["error"]
                .as_str()
                .is_some_and(|e| e.starts_with("revoked by "))
    });
    eprintln!("access log: {line}");
}

#[test]
fn a_trust_bundle_without_xs_root_closes_xs_connections() {
    // X's SVID comes from a second root of the same trust domain; the
    // server trusts both roots, then only the first.
    let echo = echo_server();
    let (l4_port, web_port) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let (pki, other) = (Pki::new("mesh.test"), Pki::new("mesh.test"));
    let both = format!("{}{}", pki.bundle_pem(), other.bundle_pem());
    let rules = policy(l4_port, web_port, &[X, Y]);
    let (server, files, _) = server(dir.path(), &pki, Some(&both), &[(l4_port, echo)], &rules);
    let l4: SocketAddr = format!("127.0.0.1:{l4_port}").parse().unwrap();
    let unused: SocketAddr = format!("127.0.0.1:{web_port}").parse().unwrap();
    // X trusts both roots too (it must accept the server's SVID). One X
    // sidecar tunnels, the other (`--no-tunnel`) takes an mTLS connection
    // per app connection.
    let (_x, x_l4, _) = client(dir.path(), &other, X, Some(&both), (l4, unused));
    let no_tunnel = ["--no-tunnel"];
    let (_x2, x2_l4, _) = client_with(dir.path(), &other, X, Some(&both), (l4, unused), &no_tunnel);
    let (_y, y_l4, _) = client(dir.path(), &pki, Y, None, (l4, unused));

    let mut x_stream = Echo::open(x_l4);
    let mut x2_stream = Echo::open(x2_l4);
    let mut y_stream = Echo::open(y_l4);

    atomic_write(&files.bundle, pki.bundle_pem().as_bytes());
    let changed = Instant::now();
    for (what, stream) in [("tunnel", &mut x_stream), ("mTLS", &mut x2_stream)] {
        let took = stream.closed_at().duration_since(changed);
        // The bundle file is polled every 100 ms here.
        assert!(
            took < REVOKE_WITHIN,
            "X's {what} connection closed {took:?} after its root left the bundle"
        );
    }
    assert!(y_stream.ping(b"y"), "Y's root is still trusted: untouched");
    // The tunnel and the mTLS connection (the mesh connection the tunnel
    // rode closes too, quietly: it is not an app connection).
    assert_eq!(
        server.metric(
            "stepmesh_connections_revoked_total{reason=\"untrusted_root\",rule=\"trust_bundle\"}"
        ),
        2.0
    );
}

#[test]
fn an_http2_mesh_connection_is_ended_gracefully_and_requests_then_get_403() {
    // An HTTP/2 app client: X's sidecar carries it over one pooled
    // `stepmesh/h2` connection to the server's sidecar. Denying X ends that
    // connection gracefully (GOAWAY); the app's own connection to X's
    // sidecar stays, and its next request (over a new mesh connection) is
    // decided by the new policy: 403.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let app = rt.block_on(http_support::app::TestApp::start(true));
    let dir = tempfile::tempdir().unwrap();
    let web = WebPair::start_with(dir.path(), app.addr, &[]);
    let (server, policy_file, x_web) = (&web.server, &web.policy_file, web.x_web);

    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(x_web).await.unwrap();
        let io = hyper_util::rt::TokioIo::new(tcp);
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .unwrap();
        tokio::spawn(conn);
        let get = || http_support::app::request(true, "GET", "/h2", &[], b"");
        let first = send.send_request(get()).await.unwrap();
        assert_eq!(first.status(), 200);

        let denied = reload_policy(server, policy_file, &web.policy(&[Y]));
        let series =
            "stepmesh_connections_revoked_total{reason=\"not_allowed\",rule=\"inbound.ports[1]\"}";
        let closed = eventually("the mesh connection revoked", || {
            (server.metric(series) == 1.0).then(Instant::now)
        });
        let took = closed.duration_since(denied);
        assert!(
            took < REVOKE_WITHIN,
            "revoked {took:?} after the policy file changed"
        );
        server.wait_log("GOAWAY'd connection logged", |l| {
            (l["message"] == "inbound connection revoked: closing" && l["peer"] == X).then_some(())
        });
        // The app's connection to its own sidecar is untouched; the next
        // request is decided by the new policy.
        let next = send.send_request(get()).await.unwrap();
        assert_eq!(next.status(), 403, "a request after the reload is denied");
    });
}

/// A server sidecar with one `http` port in front of `web_app`, allowing X
/// alone, and X's client sidecar: for tests of X's HTTP connections.
struct WebPair {
    server: Sidecar,
    _x: Sidecar,
    policy_file: PathBuf,
    ports: (u16, u16),
    /// X's outbound listener to the server's `http` port.
    x_web: SocketAddr,
}

impl WebPair {
    fn start_with(dir: &Path, web_app: SocketAddr, x_flags: &[&str]) -> WebPair {
        let (l4_port, web_port) = (free_port(), free_port());
        let pki = Pki::new("mesh.test");
        let rules = policy(l4_port, web_port, &[X]);
        let (server, _, policy_file) = server(dir, &pki, None, &[(web_port, web_app)], &rules);
        let web: SocketAddr = format!("127.0.0.1:{web_port}").parse().unwrap();
        let unused: SocketAddr = format!("127.0.0.1:{l4_port}").parse().unwrap();
        let (x, _, x_web) = client_with(dir, &pki, X, None, (unused, web), x_flags);
        WebPair {
            server,
            _x: x,
            policy_file,
            ports: (l4_port, web_port),
            x_web,
        }
    }

    /// The policy text allowing `from` on both ports.
    fn policy(&self, from: &[&str]) -> String {
        policy(self.ports.0, self.ports.1, from)
    }
}

#[test]
fn a_pipelining_http1_client_is_closed_too() {
    // The client keeps requests queued ahead of the responses, so the
    // connection is rarely idle between requests: the close still comes
    // at the next response.
    let (web_app, _) = http_ok_app();
    let dir = tempfile::tempdir().unwrap();
    let web = WebPair::start_with(dir.path(), web_app, &[]);
    let (server, policy_file, x_web) = (&web.server, &web.policy_file, web.x_web);

    let conn = TcpStream::connect(x_web).unwrap();
    conn.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut writer = conn.try_clone().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let pipeline = std::thread::spawn(move || {
        // Bounded: 4 requests every 5 ms for at most 20 s.
        let req = b"GET /p HTTP/1.1\r\nHost: app\r\n\r\n".repeat(4);
        let until = Instant::now() + Duration::from_secs(20);
        while !stopped.load(std::sync::atomic::Ordering::Relaxed)
            && Instant::now() < until
            && writer.write_all(&req).is_ok()
        {
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    let mut answered = 0;
    // Served while allowed.
    while answered < 50 {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0);
        // The 2-byte body has no newline: a status line may follow it.
        answered += usize::from(line.contains("HTTP/1.1 200"));
    }
    let denied = reload_policy(server, policy_file, &web.policy(&[Y]));
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    let took = denied.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    pipeline.join().unwrap();
    assert!(
        took < REVOKE_WITHIN,
        "the pipelining connection closed {took:?} after the policy file changed"
    );
    // The pipelining connection's tunnel, and the mesh connection it rode.
    assert_eq!(
        server.metric(
            "stepmesh_connections_revoked_total{reason=\"not_allowed\",rule=\"inbound.ports[1]\"}"
        ),
        2.0
    );
}

/// An app that answers each request only when the test says so: tells
/// `arrived` when a request head is in, answers `200` once `release` says.
fn held_app() -> (SocketAddr, mpsc::Receiver<()>, mpsc::Sender<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (arrived_tx, arrived) = mpsc::channel();
    let (release, release_rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let mut reader = BufReader::new(conn);
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                if line != "\r\n" {
                    continue;
                }
                // A whole head (GETs only: no body) is in.
                let _ = arrived_tx.send(());
                if release_rx.recv().is_err() {
                    return;
                }
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\ndone";
                if reader.get_mut().write_all(answer).is_err() {
                    break;
                }
            }
        }
    });
    (addr, arrived, release)
}

#[test]
fn a_request_in_flight_when_x_is_denied_finishes_and_its_connection_takes_no_other() {
    let (web_app, arrived, release) = held_app();
    let dir = tempfile::tempdir().unwrap();
    let web = WebPair::start_with(dir.path(), web_app, &[]);
    let (server, policy_file, x_web) = (&web.server, &web.policy_file, web.x_web);

    let conn = TcpStream::connect(x_web).unwrap();
    conn.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut http = Http(BufReader::new(conn));
    let req = b"GET /slow HTTP/1.1\r\nHost: app\r\n\r\n";
    http.0.get_mut().write_all(req).unwrap();
    arrived
        .recv_timeout(PATIENCE)
        .expect("the request reached the app");
    // X is denied while its request is at the app.
    reload_policy(server, policy_file, &web.policy(&[Y]));
    std::thread::sleep(Duration::from_millis(300));
    release.send(()).unwrap();
    let mut status = String::new();
    http.0.read_line(&mut status).unwrap();
    assert!(
        status.starts_with("HTTP/1.1 200"),
        "the request in flight got its response: {status:?}"
    );
    let mut rest = String::new();
    while http.0.read_line(&mut rest).unwrap() > 0 && rest != "\r\n" {
        rest.clear();
    }
    let mut body = [0u8; 4];
    http.0.read_exact(&mut body).unwrap();
    assert_eq!(&body, b"done");
    // The connection then takes no other request: closed, or a 403 at most.
    assert_ne!(http.get(), Some(200), "no new request after the deny");
    assert_eq!(fresh_status(x_web), 403, "a new request from X is denied");
}

#[test]
fn an_answer_that_never_ends_is_cut_at_the_grace_when_x_is_denied() {
    // Before, an answer without end (a WebSocket, a stream) kept a denied
    // or revoked peer's connection for as long as it lasted: with
    // `--no-tunnel`, the HTTP/1 relay at the server saw the change only
    // between requests.
    for x_flags in [&[][..], &["--no-tunnel"]] {
        let (web_app, arrived, _release) = held_app();
        let dir = tempfile::tempdir().unwrap();
        let web = WebPair::start_with(dir.path(), web_app, x_flags);
        let mut http = Http(BufReader::new(TcpStream::connect(web.x_web).unwrap()));
        http.0.get_ref().set_read_timeout(Some(PATIENCE)).unwrap();
        let req = b"GET /slow HTTP/1.1\r\nHost: app\r\n\r\n";
        http.0.get_mut().write_all(req).unwrap();
        arrived.recv_timeout(PATIENCE).expect("at the app");
        let denied = reload_policy(&web.server, &web.policy_file, &web.policy(&[Y]));
        let mut status = String::new();
        let _ = http.0.read_line(&mut status);
        let (took, grace) = (denied.elapsed(), stepmesh::proxy::closing::REVOKED_GRACE);
        assert!(
            !status.starts_with("HTTP/1.1 200"),
            "{x_flags:?}: {status:?}"
        );
        assert!(took >= grace, "{x_flags:?}: cut before its grace: {took:?}");
        let limit = grace + REVOKE_WITHIN + Duration::from_secs(1);
        assert!(took < limit, "{x_flags:?}: {took:?}");
    }
}
