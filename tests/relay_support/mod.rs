//! The HTTP/1 relay's test rig on raw sockets: an app that answers by
//! path and counts what it saw, a sidecar pair in front of it (server
//! sidecar with a policy, client sidecar dialling it), and a reader of one
//! HTTP/1 message off a socket, so that a test sees every byte on the wire.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::mesh::{free_port, Sidecar, SvidFiles};
use stepmesh_ca::testing::Pki;

pub const SERVER_ID: &str = "spiffe://mesh.test/ns/payments/sa/api";
pub const CLIENT_ID: &str = "spiffe://mesh.test/ns/web/sa/frontend";
pub const ADMIN_ID: &str = "spiffe://mesh.test/ns/ops/sa/admin";

/// One HTTP/1 message as read off a socket.
#[derive(Debug)]
pub struct Message {
    /// Start line and header lines, as sent.
    pub head: String,
    /// The body, de-chunked.
    pub body: Vec<u8>,
    /// Trailer lines of a chunked body.
    pub trailers: Vec<String>,
}

impl Message {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }

    pub fn status(&self) -> u16 {
        self.head.split(' ').nth(1).unwrap().parse().unwrap()
    }
}

/// Reads one message head and its body (Content-Length or chunked; a
/// request with neither has none, a response with neither runs to EOF).
pub fn read_message(r: &mut impl BufRead, response: bool) -> Option<Message> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap() == 0 {
            return None;
        }
        if line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let mut m = Message {
        head,
        body: Vec::new(),
        trailers: Vec::new(),
    };
    let no_body = response && (m.status() / 100 == 1 || m.status() == 204 || m.status() == 304);
    if no_body {
        return Some(m);
    }
    if m.header("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"))
    {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).unwrap();
            let size = usize::from_str_radix(size.trim().split(';').next().unwrap(), 16).unwrap();
            if size == 0 {
                loop {
                    let mut t = String::new();
                    r.read_line(&mut t).unwrap();
                    if t == "\r\n" {
                        return Some(m);
                    }
                    m.trailers.push(t.trim().to_owned());
                }
            }
            let mut chunk = vec![0; size + 2];
            r.read_exact(&mut chunk).unwrap();
            m.body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(len) = m.header("content-length") {
        m.body = vec![0; len.parse().unwrap()];
        r.read_exact(&mut m.body).unwrap();
    } else if response {
        r.read_to_end(&mut m.body).unwrap();
    }
    Some(m)
}

/// The app, on raw sockets: answers by path (see `answer`), counting the
/// requests it saw.
pub struct RawApp {
    pub addr: SocketAddr,
    pub seen: Arc<AtomicUsize>,
    /// Connections it accepted.
    pub accepted: Arc<AtomicUsize>,
}

impl RawApp {
    pub fn start() -> RawApp {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (counter, accepts) = (seen.clone(), accepted.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                accepts.fetch_add(1, Ordering::SeqCst);
                let counter = counter.clone();
                std::thread::spawn(move || serve_app(conn, &counter));
            }
        });
        RawApp {
            addr,
            seen,
            accepted,
        }
    }
}

fn serve_app(conn: TcpStream, seen: &AtomicUsize) {
    let mut w = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    loop {
        // The Expect case needs the 100 before the body is read.
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        seen.fetch_add(1, Ordering::SeqCst);
        let path = head.split(' ').nth(1).unwrap().to_owned();
        if head.to_ascii_lowercase().contains("expect: 100-continue") {
            w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").unwrap();
        }
        // Re-read the body with the message reader, from the head we have.
        let mut replay = std::io::Cursor::new(format!("{head}\r\n").into_bytes()).chain(&mut r);
        let mut replay = BufReader::new(&mut replay);
        let req = read_message(&mut replay, false).unwrap();
        // Whatever the inner reader buffered past the body is lost; the
        // tests send the next request only after the answer.
        match path.as_str() {
            "/ws" => {
                w.write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
                    .unwrap();
                let mut buf = [0u8; 1024];
                loop {
                    let n = replay.read(&mut buf).unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    w.write_all(&buf[..n]).unwrap();
                }
            }
            "/chunked" => {
                let len = req.body.len();
                let text = format!(
                    "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nbytes\r\n{:x}\r\n{}\r\n0\r\nx-received: {len}\r\nx-trailers: {}\r\n\r\n",
                    len.to_string().len(),
                    len,
                    req.trailers.join("|")
                );
                w.write_all(text.as_bytes()).unwrap();
            }
            "/gzip-chunked" => {
                // A coding before `chunked`, and a hop-by-hop field, so
                // the relay rewrites the head.
                w.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nKeep-Alive: timeout=5\r\n\r\n4\r\ngzip\r\n0\r\n\r\n")
                    .unwrap();
            }
            "/extra" => {
                // An answer, and bytes nobody asked for after it.
                w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nforged")
                    .unwrap();
            }
            "/bye" => {
                // An idle keep-alive timeout: the answer, then a close
                // with no `Connection: close` announced.
                w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbye")
                    .unwrap();
                return;
            }
            _ => {
                let body = format!("{head}body={}", req.body.len());
                let text = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                w.write_all(text.as_bytes()).unwrap();
            }
        }
    }
}

pub struct Pair {
    pub app: RawApp,
    _dir: tempfile::TempDir,
    pub server: Sidecar,
    pub client: Sidecar,
}

pub fn pair() -> Pair {
    pair_with(&[])
}

/// [`pair`], the client sidecar started with `client_flags` too.
pub fn pair_with(client_flags: &[&str]) -> Pair {
    pair_on("http", client_flags)
}

/// [`pair_with`], the app's port of `protocol` (`http`, `tcp`, `auto`).
pub fn pair_on(protocol: &str, client_flags: &[&str]) -> Pair {
    let app = RawApp::start();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("mesh.test");
    let port = free_port();
    let policy = dir.path().join("policy.yaml");
    // Routes are HTTP's: a `tcp` port has none.
    let routes = match protocol {
        "tcp" => String::new(),
        _ => format!(
            "      routes:\n        - name: admin\n          match: {{path: /admin/*}}\n          from: [{ADMIN_ID}]\n"
        ),
    };
    std::fs::write(
        &policy,
        format!(
            r#"
trustDomain: mesh.test
inbound:
  default: deny
  ports:
    - port: {port}
      protocol: {protocol}
      allow: [{{from: [{CLIENT_ID}, {ADMIN_ID}]}}]
{routes}"#
        ),
    )
    .unwrap();
    let files = SvidFiles::write(dir.path(), "server", &pki, &pki.leaf(SERVER_ID));
    let mut args = files.args();
    args.extend([
        "--inbound".into(),
        format!("127.0.0.1:{port}={}", app.addr),
        "--policy".into(),
        policy.display().to_string(),
    ]);
    let server = Sidecar::spawn(&args);
    let inbound = server.listener("inbound");
    let files = SvidFiles::write(dir.path(), "client", &pki, &pki.leaf(CLIENT_ID));
    let mut args = files.args();
    args.extend([
        "--outbound".into(),
        format!("127.0.0.1:0={inbound}@{SERVER_ID}"),
    ]);
    args.extend(client_flags.iter().map(|f| f.to_string()));
    let client = Sidecar::spawn(&args);
    server.wait_ready();
    client.wait_ready();
    Pair {
        app,
        _dir: dir,
        server,
        client,
    }
}

impl Pair {
    pub fn connect(&self) -> (TcpStream, BufReader<TcpStream>) {
        let s = TcpStream::connect(self.client.listener("outbound")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let r = BufReader::new(s.try_clone().unwrap());
        (s, r)
    }
}
