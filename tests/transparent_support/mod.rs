//! The transparent-mode rig of tests/proxy_transparent.rs: the two
//! namespaces' identities, ports and policies, the sidecar files owned by
//! the proxy UID, a `stepmesh proxy --transparent` process inside a
//! namespace with its admin port and access log, and the socket helpers
//! that talk across the veth from inside a namespace.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{chown, PermissionsExt};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;

use crate::common::ca::CaProcess;
use crate::common::capture::collect_lines;
use crate::common::mesh::{eventually, http_get, metric_value, PATIENCE};
use crate::common::netns::{Link, Netns};
use rustls::pki_types::PrivateKeyDer;
use serde_json::Value;

pub const TD: &str = "mesh.test";
pub const A_ID: &str = "spiffe://mesh.test/ns/a/sa/client";
pub const B_ID: &str = "spiffe://mesh.test/ns/b/sa/server";
/// The only identity B lets in on `DENIED_PORT`.
pub const OPS_ID: &str = "spiffe://mesh.test/ns/ops/sa/admin";
pub const PROXY_UID: u32 = 1337;
/// B's app port; A's identity is allowed there.
pub const APP_PORT: u16 = 8080;
/// B's port whose allow list does not name A.
pub const DENIED_PORT: u16 = 9090;
/// Plaintext on purpose (A: outbound passthrough, B: inbound excluded): the
/// capture's positive control.
pub const PLAIN_PORT: u16 = 7070;
/// A's outbound rules deny this destination.
pub const BLOCKED_PORT: u16 = 6000;
/// Each sidecar's admin address (every namespace has its own loopback).
pub const ADMIN: &str = "127.0.0.1:15020";

/// B's policy: A on the app port, only OPS_ID on the denied port, the
/// rest denied. A's: outbound mTLS by default, plaintext to the control
/// port, the blocked port denied.
pub fn policies(b_ip: Ipv4Addr) -> (String, String) {
    let a = format!(
        "trustDomain: {TD}\nmode: enforce\ninbound:\n  default: deny\noutbound:\n  default: mtls\n  rules:\n    - to: {{cidrs: [{b_ip}/32], ports: [{PLAIN_PORT}]}}\n      action: passthrough\n    - name: block-6000\n      to: {{cidrs: [{b_ip}/32], ports: [{BLOCKED_PORT}]}}\n      action: deny\n"
    );
    let b = format!(
        "trustDomain: {TD}\nmode: enforce\ninbound:\n  default: deny\n  ports:\n    - port: {APP_PORT}\n      protocol: tcp\n      allow:\n        - from: [{A_ID}]\n    - port: {DENIED_PORT}\n      protocol: tcp\n      allow:\n        - from: [{OPS_ID}]\n"
    );
    (a, b)
}

/// What the sidecars read, owned by the proxy UID in a directory it can
/// enter: SVIDs issued by the real CA (keys 0600), bundles, policies; and
/// the binary, copied there when UID 1337 cannot run the built one (a
/// build tree under /root, say).
pub struct SidecarFiles {
    pub dir: tempfile::TempDir,
    pub bin: PathBuf,
}

impl SidecarFiles {
    pub fn new(ca: &CaProcess) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let built = PathBuf::from(env!("CARGO_BIN_EXE_stepmesh"));
        let uid = PROXY_UID.to_string();
        let runnable = Command::new("setpriv")
            .args(["--reuid", &uid, "--regid", &uid, "--clear-groups"])
            .arg(&built)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        let bin = if runnable {
            built
        } else {
            let copy = dir.path().join("stepmesh");
            std::fs::copy(&built, &copy).unwrap();
            chown(&copy, Some(PROXY_UID), Some(PROXY_UID)).unwrap();
            copy
        };
        let files = Self { bin, dir };
        let rt = tokio::runtime::Runtime::new().unwrap();
        for (name, token) in [("a", "a-token"), ("b", "b-token")] {
            let svid = rt.block_on(ca.issue(token));
            let chain = stepmesh_ca::pem::encode_certs(svid.chain.iter().map(|c| c.as_ref()));
            let label = match &svid.key {
                PrivateKeyDer::Pkcs8(_) => "PRIVATE KEY",
                PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
                PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
                other => panic!("unexpected key format {other:?}"),
            };
            let key = stepmesh_ca::pem::encode(label, svid.key.secret_der());
            files.write(&format!("{name}.key"), &key, 0o600);
            files.write(&format!("{name}.crt"), &chain, 0o644);
            files.write(&format!("{name}-bundle.pem"), &svid.bundle.to_pem(), 0o644);
        }
        let (policy_a, policy_b) = policies(Link::B_IP);
        files.write("a-policy.yaml", &policy_a, 0o644);
        files.write("b-policy.yaml", &policy_b, 0o644);
        chown(files.dir.path(), Some(PROXY_UID), Some(PROXY_UID)).unwrap();
        std::fs::set_permissions(files.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        files
    }

    pub fn write(&self, name: &str, text: &str, mode: u32) {
        let path = self.path(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        chown(&path, Some(PROXY_UID), Some(PROXY_UID)).unwrap();
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// `stepmesh proxy --transparent` inside a namespace as UID 1337; killed
/// on drop.
pub struct NsSidecar<'a> {
    pub ns: &'a Netns,
    pub child: Child,
    pub access: Arc<Mutex<Vec<String>>>,
}

impl<'a> NsSidecar<'a> {
    /// `name` picks the SVID files; `policy` a policy file by name (`None`:
    /// no `--policy`, so inbound allows any SVID of the trust domain).
    pub fn spawn(
        ns: &'a Netns,
        files: &SidecarFiles,
        name: &str,
        policy: Option<&str>,
        extra: &[&str],
    ) -> Self {
        let uid = PROXY_UID.to_string();
        let mut cmd = ns.command("setpriv");
        cmd.args(["--reuid", &uid, "--regid", &uid, "--clear-groups"])
            .arg(&files.bin)
            .args(["--log-format", "json", "proxy", "--transparent"])
            .args(["--admin", ADMIN])
            .arg("--cert")
            .arg(files.path(&format!("{name}.crt")))
            .arg("--key")
            .arg(files.path(&format!("{name}.key")))
            .arg("--bundle")
            .arg(files.path(&format!("{name}-bundle.pem")));
        if let Some(policy) = policy {
            cmd.arg("--policy").arg(files.path(policy));
        }
        let mut child = cmd
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        collect_lines(
            child.stderr.take().unwrap(),
            Some(format!("[sidecar {name}]")),
        );
        let access = collect_lines(
            child.stdout.take().unwrap(),
            Some(format!("[access {name}]")),
        );
        Self { ns, child, access }
    }

    /// GET on the admin port inside the namespace: the body of a 200.
    pub fn get(&self, path: &str) -> String {
        let (status, body) = self.ns.enter(|| http_get(ADMIN.parse().unwrap(), path));
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    pub fn wait_ready(&mut self) {
        eventually("the sidecar's /ready", || {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the sidecar in {} exited: {status}", self.ns.name());
            }
            let (status, _) = self.ns.enter(|| http_get(ADMIN.parse().unwrap(), "/ready"));
            (status == 200).then_some(())
        });
    }

    /// The real UID of the sidecar process.
    pub fn uid(&self) -> u32 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// Exactly one outbound connection was closed for want of an original
    /// destination, none is open, and none was forwarded (a loop would
    /// count many, hit the connection limit and log line after line).
    pub fn assert_refused_once(&self, what: &str) {
        let errors =
            r#"stepmesh_connection_errors_total{direction="outbound",reason="original_dst"}"#;
        let open = r#"stepmesh_connections_open{direction="outbound"}"#;
        let limit = r#"stepmesh_connections_rejected_total{direction="outbound",reason="connection_limit"}"#;
        eventually(&format!("{what}: closed as not redirected"), || {
            let metrics = self.get("/metrics");
            let counted = metric_value(&metrics, errors) == 1.0;
            (counted && metric_value(&metrics, open) == 0.0).then_some(metrics)
        });
        let metrics = self.get("/metrics");
        assert_eq!(metric_value(&metrics, errors), 1.0, "{what}:\n{metrics}");
        assert_eq!(
            metric_value(&metrics, limit),
            0.0,
            "{what}: the sidecar dialled itself:\n{metrics}"
        );
        let forwarded = self
            .access_log()
            .into_iter()
            .filter(|l| l["direction"] == "outbound")
            .count();
        assert!(
            forwarded <= 1,
            "{what}: {forwarded} outbound access-log lines"
        );
    }

    pub fn access_log(&self) -> Vec<Value> {
        let lines = self.access.lock().unwrap();
        lines
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn wait_access(&self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        eventually(what, || self.access_log().into_iter().find(&f))
    }
}

impl Drop for NsSidecar<'_> {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `data` with `marker` written at its start, middle and end.
pub fn with_marker(mut data: Vec<u8>, marker: &str) -> Vec<u8> {
    let m = marker.as_bytes();
    for at in [0, data.len() / 2, data.len() - m.len()] {
        data[at..at + m.len()].copy_from_slice(m);
    }
    data
}

/// A listener on 0.0.0.0:`port` inside `ns`.
pub fn listen(ns: &Netns, port: u16) -> TcpListener {
    ns.enter(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap())
}

/// Serves one connection: reads to EOF (so the client's half-close must
/// arrive), sends what it read on the channel, answers `reply`, closes.
pub fn answer_once(listener: TcpListener, reply: Vec<u8>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut got = Vec::new();
        conn.read_to_end(&mut got).unwrap();
        tx.send(got).unwrap();
        conn.write_all(&reply).unwrap();
        conn.shutdown(Shutdown::Write).unwrap();
    });
    rx
}

/// Connects from inside `ns` to the plain `ip:port`.
pub fn connect(ns: &Netns, ip: impl Into<IpAddr>, port: u16) -> TcpStream {
    let addr = SocketAddr::new(ip.into(), port);
    let conn = ns.enter(|| TcpStream::connect_timeout(&addr, PATIENCE).unwrap());
    conn.set_read_timeout(Some(PATIENCE)).unwrap();
    conn
}

/// Sends `data` from inside `ns`, half-closes, returns the whole answer.
pub fn exchange(
    ns: &Netns,
    ip: impl Into<IpAddr>,
    port: u16,
    data: &[u8],
) -> std::io::Result<Vec<u8>> {
    let conn = connect(ns, ip, port);
    let mut writer = conn.try_clone()?;
    let data = data.to_vec();
    let sender = thread::spawn(move || -> std::io::Result<()> {
        writer.write_all(&data)?;
        writer.shutdown(Shutdown::Write)
    });
    let mut back = Vec::new();
    let read = (&conn).read_to_end(&mut back);
    sender.join().unwrap()?;
    read.map(|_| back)
}

/// The peer closed `conn` (EOF or reset) without sending a byte.
pub fn assert_closed(conn: &mut TcpStream, what: &str) {
    let mut buf = [0; 64];
    match conn.read(&mut buf) {
        Ok(0) => {}
        Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {}
        Ok(n) => panic!("{what}: got {n} bytes, expected the connection closed"),
        Err(e) => panic!("{what}: not closed: {e}"),
    }
}

/// No connection is waiting on the (non-blocking) `listener`.
pub fn assert_idle(listener: &TcpListener, what: &str) {
    match listener.accept() {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => panic!("{what}: unexpected connection {other:?}"),
    }
}
