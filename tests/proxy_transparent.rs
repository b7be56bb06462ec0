//! Transparent mode end to end: two network namespaces joined by a veth
//! pair, `stepmesh init` rules in each, a `stepmesh proxy --transparent`
//! sidecar in each running as UID 1337 with an SVID from a real
//! `stepmesh ca serve`. The app in A dials B's plain IP:port; a capture on
//! B's veth shows TLS and no plaintext; B's app gets the exact bytes; the
//! policies of both sidecars apply. Needs root; skips with a reason otherwise.
//!
//! Identity: the CA listens on the root namespace's loopback, which the
//! namespaces cannot reach, so the test issues both SVIDs from the real CA
//! beforehand and hands them to the sidecars as `--cert/--key/--bundle`
//! files (the outside-issuer source). The veth between A and B then carries
//! only the traffic under test, and no CA traffic has to cross the
//! interception rules.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{chown, PermissionsExt};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;

use common::ca::CaProcess;
use common::capture::{collect_lines, find_bytes, Capture};
use common::mesh::{eventually, http_get, metric_value, random_bytes, PATIENCE};
use common::netns::{check, Link, Netns};
use rustls::pki_types::PrivateKeyDer;
use serde_json::Value;

const TD: &str = "mesh.test";
const A_ID: &str = "spiffe://mesh.test/ns/a/sa/client";
const B_ID: &str = "spiffe://mesh.test/ns/b/sa/server";
/// The only identity B lets in on `DENIED_PORT`.
const OPS_ID: &str = "spiffe://mesh.test/ns/ops/sa/admin";
const PROXY_UID: u32 = 1337;
/// B's app port; A's identity is allowed there.
const APP_PORT: u16 = 8080;
/// B's port whose allow list does not name A.
const DENIED_PORT: u16 = 9090;
/// Plaintext on purpose (A: outbound passthrough, B: inbound excluded): the
/// capture's positive control.
const PLAIN_PORT: u16 = 7070;
/// A's outbound rules deny this destination.
const BLOCKED_PORT: u16 = 6000;
/// Each sidecar's admin address (every namespace has its own loopback).
const ADMIN: &str = "127.0.0.1:15020";

#[test]
fn transparent_mtls_between_two_network_namespaces() {
    let Some(link) = Link::create(
        "smtp",
        &["iptables", "iptables-restore", "setpriv", "tcpdump"],
    ) else {
        return;
    };
    let b_ip = Link::B_IP;
    let ca = CaProcess::start(TD, &[("a-token", A_ID), ("b-token", B_ID)]);
    let files = SidecarFiles::new(&ca);

    // `stepmesh init` in both: A's outbound and B's inbound are intercepted;
    // B leaves the control port alone.
    let plain = PLAIN_PORT.to_string();
    check(link.a.command(&files.bin).arg("init"));
    check(
        link.b
            .command(&files.bin)
            .args(["init", "--exclude-inbound-ports", &plain]),
    );

    let mut sidecar_a = NsSidecar::spawn(&link.a, &files, "a", Some("a-policy.yaml"), &[]);
    let mut sidecar_b = NsSidecar::spawn(&link.b, &files, "b", Some("b-policy.yaml"), &[]);
    sidecar_a.wait_ready();
    sidecar_b.wait_ready();
    for sidecar in [&sidecar_a, &sidecar_b] {
        assert_eq!(
            sidecar.uid(),
            PROXY_UID,
            "the sidecar must run as the proxy UID"
        );
    }
    let capture = Capture::start(&link.b, Link::B_DEV);

    // 1. Allowed: A's app → A:15001 → mTLS over the veth → B:15006 → B's app.
    let secret = format!("STEPMESH-SECRET-{:032x}", fastrand::u128(..));
    let secret_reply = format!("STEPMESH-REPLY-{:032x}", fastrand::u128(..));
    let request = with_marker(random_bytes(1 << 20, 1), &secret);
    let reply = with_marker(random_bytes(256 << 10, 2), &secret_reply);
    let app_b = listen(&link.b, APP_PORT);
    let got = answer_once(app_b, reply.clone());
    let back = exchange(&link.a, b_ip, APP_PORT, &request).unwrap();
    let received = got
        .recv_timeout(PATIENCE)
        .expect("B's app got no connection");
    assert!(
        received == request,
        "B's app got {} bytes, not the {} sent",
        received.len(),
        request.len()
    );
    assert!(
        back == reply,
        "A's app got {} bytes back, not the {} answered",
        back.len(),
        reply.len()
    );

    let line = sidecar_b.wait_access("B: inbound allow on the app port", |l| {
        l["direction"] == "inbound" && l["port"] == APP_PORT
    });
    assert_eq!(line["peer_id"], A_ID, "{line}");
    assert_eq!(line["decision"], "allow", "{line}");
    assert_eq!(line["dst"], format!("{b_ip}:{APP_PORT}"), "{line}");
    assert_eq!(line["bytes_in"], request.len() as u64, "{line}");
    assert_eq!(line["bytes_out"], reply.len() as u64, "{line}");
    let line = sidecar_a.wait_access("A: outbound mTLS to B", |l| {
        l["direction"] == "outbound" && l["dst"] == format!("{b_ip}:{APP_PORT}")
    });
    assert_eq!(line["peer_id"], B_ID, "{line}");
    assert_eq!(
        (&line["decision"], &line["reason"]),
        (&"allow".into(), &"mtls".into()),
        "{line}"
    );

    // 2. Control: plaintext through A's passthrough rule to B's excluded
    //    port. Once the capture holds this marker it holds everything sent
    //    before it on the veth (and `stop` checks tcpdump dropped nothing),
    //    so the absence of the secrets is real.
    let control = format!("STEPMESH-CONTROL-{:032x}", fastrand::u128(..));
    let got = answer_once(listen(&link.b, PLAIN_PORT), Vec::new());
    exchange(&link.a, b_ip, PLAIN_PORT, control.as_bytes()).unwrap();
    assert_eq!(got.recv_timeout(PATIENCE).unwrap(), control.as_bytes());
    let line = sidecar_a.wait_access("A: passthrough", |l| l["port"] == PLAIN_PORT);
    assert_eq!(
        (&line["decision"], &line["reason"]),
        (&"allow".into(), &"passthrough".into()),
        "{line}"
    );
    capture.wait_for(control.as_bytes());
    let pcap = capture.stop();
    for marker in [&secret, &secret_reply] {
        assert!(
            find_bytes(&pcap, marker.as_bytes()).is_none(),
            "plaintext {marker} on the veth"
        );
    }
    assert!(
        pcap.len() > request.len() + reply.len(),
        "the transfer did not cross the veth ({} bytes captured)",
        pcap.len()
    );
    // A TLS ClientHello (record 0x16, legacy version 0x0301, type 1) and
    // TLS 1.3 application data records (0x17 0x0303) crossed the veth.
    let hello = pcap
        .windows(6)
        .any(|w| w[..3] == [0x16, 0x03, 0x01] && w[5] == 0x01);
    assert!(hello, "no TLS ClientHello in the capture");
    assert!(
        find_bytes(&pcap, &[0x17, 0x03, 0x03]).is_some(),
        "no TLS application data in the capture"
    );

    // 3. Inbound policy: B's port 9090 allows only OPS_ID, so A is refused
    //    after the handshake: connection closed, access log and metric say deny.
    let app_b_denied = listen(&link.b, DENIED_PORT);
    app_b_denied.set_nonblocking(true).unwrap();
    let mut conn = connect(&link.a, b_ip, DENIED_PORT);
    conn.write_all(b"let me in").unwrap();
    assert_closed(&mut conn, "A's app on B's denied port");
    let line = sidecar_b.wait_access("B: inbound deny", |l| l["port"] == DENIED_PORT);
    assert_eq!(line["direction"], "inbound", "{line}");
    assert_eq!(line["peer_id"], A_ID, "{line}");
    assert_eq!(line["decision"], "deny", "{line}");
    assert_eq!(line["reason"], "not_allowed", "{line}");
    assert_eq!(line["rule"], "inbound.ports[1]", "{line}");
    let metrics = sidecar_b.get("/metrics");
    let denied = metrics.lines().find(|l| {
        l.starts_with("stepmesh_connections_total{")
            && l.contains(&format!("peer=\"{A_ID}\""))
            && l.contains("decision=\"deny\"")
    });
    assert!(
        denied.is_some_and(|l| l.ends_with(" 1")),
        "deny not counted: {denied:?}\n{metrics}"
    );
    assert_idle(&app_b_denied, "B's app on the denied port");

    // 4. Outbound policy: A's rules deny B:6000; A's sidecar closes the
    //    connection itself and nothing reaches B.
    let app_b_blocked = listen(&link.b, BLOCKED_PORT);
    app_b_blocked.set_nonblocking(true).unwrap();
    let mut conn = connect(&link.a, b_ip, BLOCKED_PORT);
    let _ = conn.write_all(b"anyone there?");
    assert_closed(&mut conn, "A's app to a denied destination");
    let line = sidecar_a.wait_access("A: outbound deny", |l| l["port"] == BLOCKED_PORT);
    assert_eq!(line["direction"], "outbound", "{line}");
    assert_eq!(line["dst"], format!("{b_ip}:{BLOCKED_PORT}"), "{line}");
    assert_eq!(
        (&line["decision"], &line["reason"]),
        (&"deny".into(), &"outbound_deny".into()),
        "{line}"
    );
    assert_eq!(line["rule"], "block-6000", "{line}");
    assert_idle(&app_b_blocked, "B's app on the blocked port");
    assert!(
        !sidecar_b
            .access_log()
            .iter()
            .any(|l| l["port"] == BLOCKED_PORT),
        "a denied destination reached B's sidecar"
    );

    for sidecar in [&mut sidecar_a, &mut sidecar_b] {
        assert!(
            sidecar.child.try_wait().unwrap().is_none(),
            "a sidecar exited"
        );
    }
}

/// A connection that was not redirected has no destination but the
/// listener itself, so it must be closed and counted, never forwarded: the
/// sidecar (UID 1337, exempt from the rules) would dial its own listener,
/// which would accept and dial again, and again. Two ways in: a local
/// process dialling 127.0.0.1:15001 (loopback is never redirected), and a
/// mesh peer dialling the pod's IP on port 15001 (redirected to 15006,
/// allowed by the default policy, then dialled by the sidecar unredirected).
#[test]
fn the_sidecar_never_dials_its_own_listener() {
    let Some(link) = Link::create("smtl", &["iptables", "iptables-restore", "setpriv"]) else {
        return;
    };
    let ca = CaProcess::start(TD, &[("a-token", A_ID), ("b-token", B_ID)]);
    let files = SidecarFiles::new(&ca);
    check(link.a.command(&files.bin).arg("init"));
    check(link.b.command(&files.bin).arg("init"));
    let limit = ["--max-connections", "64"];
    let mut sidecar_a = NsSidecar::spawn(&link.a, &files, "a", Some("a-policy.yaml"), &limit);
    // No --policy: inbound allows every SVID of the trust domain.
    let mut sidecar_b = NsSidecar::spawn(&link.b, &files, "b", None, &limit);
    sidecar_a.wait_ready();
    sidecar_b.wait_ready();

    let mut conn = connect(&link.a, Ipv4Addr::LOCALHOST, 15001);
    let _ = conn.write_all(b"where am I going?");
    assert_closed(&mut conn, "a local connection straight to 15001");
    sidecar_a.assert_refused_once("a local connection straight to 15001");

    let mut conn = connect(&link.a, Link::B_IP, 15001);
    let _ = conn.write_all(b"and over there?");
    assert_closed(&mut conn, "a peer's connection to B's port 15001");
    sidecar_b.assert_refused_once("a peer's connection to B's port 15001");

    for sidecar in [&mut sidecar_a, &mut sidecar_b] {
        assert!(
            sidecar.child.try_wait().unwrap().is_none(),
            "a sidecar exited"
        );
    }
}

/// `stepmesh init` also redirects IPv6 TCP, so the sidecar must listen on
/// IPv6 too: otherwise a meshed pod's IPv6 connections are refused (or, with
/// the rules missing, would bypass the sidecar). A's app dials B's IPv6
/// address; the bytes arrive through both sidecars and both log the
/// connection with its IPv6 original destination.
#[test]
fn transparent_mtls_over_ipv6() {
    let Some(link) = Link::create(
        "smt6",
        &[
            "iptables-restore",
            "ip6tables",
            "ip6tables-restore",
            "setpriv",
        ],
    ) else {
        return;
    };
    if let Err(why) = add_ipv6(&link) {
        eprintln!("skipped: no IPv6 in the namespaces: {why}");
        return;
    }
    let ca = CaProcess::start(TD, &[("a-token", A_ID), ("b-token", B_ID)]);
    let files = SidecarFiles::new(&ca);
    check(link.a.command(&files.bin).arg("init"));
    check(link.b.command(&files.bin).arg("init"));
    let v6_rules = check(link.b.command("ip6tables-save").args(["-t", "nat"]));
    assert!(
        String::from_utf8_lossy(&v6_rules.stdout).contains("STEPMESH_REDIRECT_IN"),
        "stepmesh init installed no IPv6 rules"
    );
    let mut sidecar_a = NsSidecar::spawn(&link.a, &files, "a", Some("a-policy.yaml"), &[]);
    let mut sidecar_b = NsSidecar::spawn(&link.b, &files, "b", Some("b-policy.yaml"), &[]);
    sidecar_a.wait_ready();
    sidecar_b.wait_ready();

    let request = random_bytes(256 << 10, 3);
    let reply = random_bytes(64 << 10, 4);
    let app_b = link.b.enter(|| {
        let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).unwrap();
        s.set_only_v6(true).unwrap();
        s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, APP_PORT)).into())
            .unwrap();
        s.listen(16).unwrap();
        TcpListener::from(s)
    });
    let got = answer_once(app_b, reply.clone());
    let back = exchange(&link.a, B_IP6, APP_PORT, &request)
        .unwrap_or_else(|e| panic!("A's app to [{B_IP6}]:{APP_PORT}: {e}"));
    let received = got
        .recv_timeout(PATIENCE)
        .expect("B's app got no connection");
    assert!(received == request, "B's app got {} bytes", received.len());
    assert!(back == reply, "A's app got {} bytes back", back.len());

    let dst = format!("[{B_IP6}]:{APP_PORT}");
    let line = sidecar_a.wait_access("A: outbound mTLS over IPv6", |l| {
        l["direction"] == "outbound" && l["dst"] == dst.as_str()
    });
    assert_eq!(line["peer_id"], B_ID, "{line}");
    assert_eq!(line["reason"], "mtls", "{line}");
    let line = sidecar_b.wait_access("B: inbound over IPv6", |l| {
        l["direction"] == "inbound" && l["dst"] == dst.as_str()
    });
    assert_eq!(line["peer_id"], A_ID, "{line}");
    assert_eq!(line["decision"], "allow", "{line}");
    assert_eq!(line["bytes_in"], request.len() as u64, "{line}");
    assert_eq!(line["bytes_out"], reply.len() as u64, "{line}");

    // Not redirected over IPv6 either (loopback is exempt): refused, not looped.
    let mut conn = connect(&link.a, Ipv6Addr::LOCALHOST, 15001);
    let _ = conn.write_all(b"where am I going?");
    assert_closed(&mut conn, "a local IPv6 connection straight to 15001");
    sidecar_a.assert_refused_once("a local IPv6 connection straight to 15001");
    for sidecar in [&mut sidecar_a, &mut sidecar_b] {
        assert!(
            sidecar.child.try_wait().unwrap().is_none(),
            "a sidecar exited"
        );
    }
}

/// A's and B's IPv6 addresses on the veth (ULA, like a dual-stack pod's).
const A_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x203, 0, 0, 0, 0, 0, 1);
const B_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x203, 0, 0, 0, 0, 0, 2);

/// Puts `A_IP6`/`B_IP6` on the veth ends (`nodad`: usable at once), or says
/// why IPv6 is not available here.
fn add_ipv6(link: &Link) -> Result<(), String> {
    if !std::path::Path::new("/proc/net/if_inet6").exists() {
        return Err("the kernel has IPv6 disabled (no /proc/net/if_inet6)".into());
    }
    for (ns, dev, ip) in [(&link.a, Link::A_DEV, A_IP6), (&link.b, Link::B_DEV, B_IP6)] {
        let cidr = format!("{ip}/64");
        let out = Command::new("ip")
            .args(["-n", ns.name(), "addr", "add", &cidr, "dev", dev, "nodad"])
            .output()
            .map_err(|e| format!("ip addr add: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
    }
    Ok(())
}

/// B's policy: A on the app port, only OPS_ID on the denied port, the
/// rest denied. A's: outbound mTLS by default, plaintext to the control
/// port, the blocked port denied.
fn policies(b_ip: Ipv4Addr) -> (String, String) {
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
struct SidecarFiles {
    dir: tempfile::TempDir,
    bin: PathBuf,
}

impl SidecarFiles {
    fn new(ca: &CaProcess) -> Self {
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

    fn write(&self, name: &str, text: &str, mode: u32) {
        let path = self.path(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        chown(&path, Some(PROXY_UID), Some(PROXY_UID)).unwrap();
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// `stepmesh proxy --transparent` inside a namespace as UID 1337; killed
/// on drop.
struct NsSidecar<'a> {
    ns: &'a Netns,
    child: Child,
    access: Arc<Mutex<Vec<String>>>,
}

impl<'a> NsSidecar<'a> {
    /// `name` picks the SVID files; `policy` a policy file by name (`None`:
    /// no `--policy`, so inbound allows any SVID of the trust domain).
    fn spawn(
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
    fn get(&self, path: &str) -> String {
        let (status, body) = self.ns.enter(|| http_get(ADMIN.parse().unwrap(), path));
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    fn wait_ready(&mut self) {
        eventually("the sidecar's /ready", || {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the sidecar in {} exited: {status}", self.ns.name());
            }
            let (status, _) = self.ns.enter(|| http_get(ADMIN.parse().unwrap(), "/ready"));
            (status == 200).then_some(())
        });
    }

    /// The real UID of the sidecar process.
    fn uid(&self) -> u32 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// Exactly one outbound connection was closed for want of an original
    /// destination, none is open, and none was forwarded (a loop would
    /// count many, hit the connection limit and log line after line).
    fn assert_refused_once(&self, what: &str) {
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

    fn access_log(&self) -> Vec<Value> {
        let lines = self.access.lock().unwrap();
        lines
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn wait_access(&self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
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
fn with_marker(mut data: Vec<u8>, marker: &str) -> Vec<u8> {
    let m = marker.as_bytes();
    for at in [0, data.len() / 2, data.len() - m.len()] {
        data[at..at + m.len()].copy_from_slice(m);
    }
    data
}

/// A listener on 0.0.0.0:`port` inside `ns`.
fn listen(ns: &Netns, port: u16) -> TcpListener {
    ns.enter(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap())
}

/// Serves one connection: reads to EOF (so the client's half-close must
/// arrive), sends what it read on the channel, answers `reply`, closes.
fn answer_once(listener: TcpListener, reply: Vec<u8>) -> mpsc::Receiver<Vec<u8>> {
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
fn connect(ns: &Netns, ip: impl Into<IpAddr>, port: u16) -> TcpStream {
    let addr = SocketAddr::new(ip.into(), port);
    let conn = ns.enter(|| TcpStream::connect_timeout(&addr, PATIENCE).unwrap());
    conn.set_read_timeout(Some(PATIENCE)).unwrap();
    conn
}

/// Sends `data` from inside `ns`, half-closes, returns the whole answer.
fn exchange(ns: &Netns, ip: impl Into<IpAddr>, port: u16, data: &[u8]) -> std::io::Result<Vec<u8>> {
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
fn assert_closed(conn: &mut TcpStream, what: &str) {
    let mut buf = [0; 64];
    match conn.read(&mut buf) {
        Ok(0) => {}
        Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {}
        Ok(n) => panic!("{what}: got {n} bytes, expected the connection closed"),
        Err(e) => panic!("{what}: not closed: {e}"),
    }
}

/// No connection is waiting on the (non-blocking) `listener`.
fn assert_idle(listener: &TcpListener, what: &str) {
    match listener.accept() {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => panic!("{what}: unexpected connection {other:?}"),
    }
}
