//! Transparent mode end to end: two network namespaces joined by a veth
//! pair, each with `stepmesh init` rules and a sidecar running as UID 1337.
//! The app in A dials B's plain IP:port; the bytes on the veth are TLS (a
//! packet capture on B's veth never sees the payload, while a passthrough
//! payload is seen, proving the capture works); B's policy applies; A's
//! outbound rules apply. Needs root, iptables, ip and python3 (the programs
//! inside the namespaces); skipped with the reason otherwise.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::mesh::*;
use stepmesh_ca::testing::Pki;

const A_IP: &str = "10.77.0.1";
const B_IP: &str = "10.77.0.2";
const PROXY_UID: u32 = 1337;

const HELPER: &str = r#"
import socket, sys, threading, time
mode = sys.argv[1]
if mode == "echo":
    host = sys.argv[2]
    def handle(c):
        while True:
            d = c.recv(65536)
            if not d:
                break
            c.sendall(d)
        c.shutdown(socket.SHUT_WR)
        c.close()
    def serve(port):
        l = socket.socket()
        l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        l.bind((host, port))
        l.listen(64)
        while True:
            c, _ = l.accept()
            threading.Thread(target=handle, args=(c,), daemon=True).start()
    for p in sys.argv[3:]:
        threading.Thread(target=serve, args=(int(p),), daemon=True).start()
    time.sleep(0.5)
    print("ready", flush=True)
    while True:
        time.sleep(3600)
elif mode == "client":
    host, port, payload = sys.argv[2], int(sys.argv[3]), sys.argv[4].encode()
    try:
        c = socket.create_connection((host, port), timeout=30)
        c.settimeout(30)
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            d = c.recv(65536)
            if not d:
                break
            got += d
        sys.stdout.write(got.decode(errors="replace"))
    except Exception as e:
        sys.stdout.write("ERROR " + repr(e))
elif mode == "sniff":
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(3))
    s.bind((sys.argv[2], 0))
    s.settimeout(0.2)
    out = open(sys.argv[3], "wb")
    print("ready", flush=True)
    while True:
        try:
            out.write(s.recv(65535))
            out.flush()
        except socket.timeout:
            pass
"#;

fn skip_reason() -> Option<String> {
    if unsafe_free_uid() != 0 {
        return Some("not root".into());
    }
    for tool in ["iptables", "ip", "python3", "setpriv", "curl"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !found {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

/// The effective UID, read from /proc (no libc call needed).
fn unsafe_free_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|u| u.parse().ok())
        .unwrap_or(u32::MAX)
}

fn run(cmd: &[&str]) {
    let out = Command::new(cmd[0]).args(&cmd[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces and a veth pair, removed on drop.
struct Netns {
    a: String,
    b: String,
    veth_b: String,
}

impl Netns {
    fn create() -> Self {
        let id = std::process::id();
        let n = Self {
            a: format!("smA{id}"),
            b: format!("smB{id}"),
            veth_b: format!("smb{id}"),
        };
        let veth_a = format!("sma{id}");
        run(&["ip", "netns", "add", &n.a]);
        run(&["ip", "netns", "add", &n.b]);
        run(&[
            "ip", "link", "add", &veth_a, "type", "veth", "peer", "name", &n.veth_b,
        ]);
        run(&["ip", "link", "set", &veth_a, "netns", &n.a]);
        run(&["ip", "link", "set", &n.veth_b, "netns", &n.b]);
        for (ns, dev, ip) in [(&n.a, &veth_a, A_IP), (&n.b, &n.veth_b, B_IP)] {
            run(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                dev,
            ]);
            run(&["ip", "-n", ns, "link", "set", dev, "up"]);
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        n
    }

    fn exec(&self, ns: &str) -> Vec<String> {
        vec!["ip".into(), "netns".into(), "exec".into(), ns.into()]
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.a]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.b]).status();
    }
}

/// A python helper in a namespace, killed on drop.
struct Helper(Child);

impl Helper {
    fn start(ns: &str, script: &Path, args: &[&str]) -> Self {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "python3"])
            .arg(script)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "ready", "helper {args:?} did not start");
        Self(child)
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn client(ns: &str, script: &Path, port: u16, payload: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "python3"])
        .arg(script)
        .args(["client", B_IP, &port.to_string(), payload])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// SVID files readable by the proxy UID (key 0600, owned by it).
fn proxy_files(dir: &Path, name: &str, pki: &Pki, id: &str) -> SvidFiles {
    let files = SvidFiles::write(dir, name, pki, &pki.leaf(id));
    for path in [&files.cert, &files.key, &files.bundle] {
        std::os::unix::fs::chown(path, Some(PROXY_UID), Some(PROXY_UID)).unwrap();
    }
    files
}

#[test]
fn transparent_mesh_between_two_namespaces() {
    if let Some(reason) = skip_reason() {
        eprintln!("skipped: {reason}");
        return;
    }
    let net = Netns::create();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = dir.path().join("helper.py");
    std::fs::write(&script, HELPER).unwrap();
    let pki = Pki::new("mesh.test");
    let files_a = proxy_files(dir.path(), "a", &pki, CLIENT_ID);
    let files_b = proxy_files(dir.path(), "b", &pki, SERVER_ID);
    let policy_a = dir.path().join("policy-a.yaml");
    std::fs::write(
        &policy_a,
        "trustDomain: mesh.test\ninbound:\n  default: deny\noutbound:\n  default: mtls\n  rules:\n    - to: {cidrs: [10.77.0.0/24], ports: [9090]}\n      action: passthrough\n    - to: {cidrs: [10.77.0.0/24], ports: [9091]}\n      action: deny\n",
    )
    .unwrap();
    let policy_b = dir.path().join("policy-b.yaml");
    std::fs::write(
        &policy_b,
        format!("trustDomain: mesh.test\ninbound:\n  default: deny\n  ports:\n    - port: 8080\n      protocol: tcp\n      allow:\n        - from: [{CLIENT_ID}]\n    - port: 8081\n      protocol: tcp\n      allow:\n        - from: [spiffe://mesh.test/ns/other/sa/x]\n"),
    )
    .unwrap();

    let bin = env!("CARGO_BIN_EXE_stepmesh");
    let mut exec_a = net.exec(&net.a);
    exec_a.push(bin.into());
    exec_a.push("init".into());
    run(&exec_a.iter().map(String::as_str).collect::<Vec<_>>());
    let mut exec_b = net.exec(&net.b);
    exec_b.extend([
        bin.into(),
        "init".into(),
        "--exclude-inbound-ports".into(),
        "9090".into(),
    ]);
    run(&exec_b.iter().map(String::as_str).collect::<Vec<_>>());

    let _apps = Helper::start(
        &net.b,
        &script,
        &["echo", B_IP, "8080", "8081", "9090", "9091"],
    );
    let capture = dir.path().join("veth-b.bin");
    let _sniffer = Helper::start(
        &net.b,
        &script,
        &["sniff", &net.veth_b, capture.to_str().unwrap()],
    );

    let sidecar = |ns: &str, files: &SvidFiles, policy: &Path| {
        let mut wrapper = net.exec(ns);
        wrapper.extend(
            [
                "setpriv",
                "--reuid",
                "1337",
                "--regid",
                "1337",
                "--clear-groups",
                "--",
            ]
            .map(String::from),
        );
        let mut args = files.args();
        args.extend([
            "--transparent".into(),
            "--policy".into(),
            policy.display().to_string(),
            "--admin".into(),
            "0.0.0.0:15020".into(),
        ]);
        let s = Sidecar::spawn_wrapped(&wrapper, Some(ns), &args);
        s.wait_ready();
        s
    };
    let side_a = sidecar(&net.a, &files_a, &policy_a);
    let side_b = sidecar(&net.b, &files_b, &policy_b);

    let secret = format!("MESHED-PAYLOAD-{}", std::process::id());
    assert_eq!(client(&net.a, &script, 8080, &secret), secret);
    let line = side_b.wait_access("B inbound line", |l| l["port"] == 8080);
    assert_eq!(line["peer_id"], CLIENT_ID);
    assert_eq!(line["decision"], "allow");
    let line = side_a.wait_access("A outbound line", |l| l["port"] == 8080);
    assert_eq!(line["peer_id"], SERVER_ID, "A's sidecar verified B's SVID");

    // B's policy applies to port 8081.
    let denied = client(&net.a, &script, 8081, "denied-payload");
    assert!(!denied.contains("denied-payload"), "{denied}");
    let line = side_b.wait_access("B deny line", |l| l["port"] == 8081);
    assert_eq!(line["decision"], "deny");
    assert_eq!(line["peer_id"], CLIENT_ID);

    // A's outbound rules: passthrough stays plaintext, deny is refused.
    let plain = format!("PASSTHROUGH-PAYLOAD-{}", std::process::id());
    assert_eq!(client(&net.a, &script, 9090, &plain), plain);
    let refused = client(&net.a, &script, 9091, "refused-payload");
    assert!(!refused.contains("refused-payload"), "{refused}");
    let line = side_a.wait_access("A deny line", |l| l["port"] == 9091);
    assert_eq!(line["decision"], "deny");

    // On the wire: the passthrough payload is visible (the capture works),
    // the meshed one never is, and TLS application records are there.
    let wire = eventually("the capture to see the passthrough payload", || {
        let wire = std::fs::read(&capture).unwrap_or_default();
        contains(&wire, plain.as_bytes()).then_some(wire)
    });
    assert!(
        !contains(&wire, secret.as_bytes()),
        "meshed payload seen in plaintext on the veth"
    );
    assert!(
        contains(&wire, &[0x17, 0x03, 0x03]),
        "no TLS application data record on the veth"
    );
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
