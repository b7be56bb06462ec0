//! The inbound listener against a standard TLS client (openssl s_client):
//! a valid SVID gets through; no certificate, an expired one, one of another
//! trust domain, a self-signed one and one with two URI SANs are refused in
//! the handshake and counted by reason in /metrics.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::mesh::*;
use stepmesh_ca::testing::{Defect, Leaf, Pki};

const GREETING: &str = "hello from the app";

/// An app that greets every connection, closes its write side, and drains.
fn greeter() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let _ = conn.write_all(GREETING.as_bytes());
                let _ = conn.shutdown(Shutdown::Write);
                let _ = conn.read_to_end(&mut Vec::new());
            });
        }
    });
    addr
}

/// Runs `openssl s_client` against `addr` with the leaf (or none); returns stdout.
fn s_client(addr: SocketAddr, dir: &Path, name: &str, pki: &Pki, leaf: Option<&Leaf>) -> String {
    s_client_version(addr, dir, name, pki, leaf, "-tls1_3")
}

/// As [`s_client`], with the TLS version flag (`-tls1_2`, `-tls1_3`).
fn s_client_version(
    addr: SocketAddr,
    dir: &Path,
    name: &str,
    pki: &Pki,
    leaf: Option<&Leaf>,
    version: &str,
) -> String {
    let mut cmd = Command::new("openssl");
    cmd.args([
        "s_client",
        "-connect",
        &addr.to_string(),
        "-quiet",
        "-ign_eof",
        version,
    ]);
    if let Some(leaf) = leaf {
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        let chain = dir.join(format!("{name}-chain.crt"));
        // Leaf alone in -cert; whatever else the leaf came with in -cert_chain.
        let leaf_pem = stepmesh_ca::pem::encode("CERTIFICATE", leaf.cert());
        std::fs::write(&cert, &leaf_pem).unwrap();
        std::fs::write(&key, &leaf.key_pem).unwrap();
        std::fs::write(&chain, pki.intermediate.cert_pem.as_bytes()).unwrap();
        cmd.arg("-cert").arg(&cert).arg("-key").arg(&key);
        if leaf.chain.len() > 1 {
            cmd.arg("-cert_chain").arg(&chain);
        }
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl s_client");
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn handshake_refusals_are_counted_by_reason() {
    if Command::new("openssl").arg("version").output().is_err() {
        eprintln!("skipped: openssl is not installed");
        return;
    }
    let app = greeter();
    let pki = Pki::new("mesh.test");
    let dir = tempfile::tempdir().unwrap();
    let files = SvidFiles::write(dir.path(), "server", &pki, &pki.leaf(SERVER_ID));
    let mut args = files.args();
    args.extend(["--inbound".into(), format!("127.0.0.1:0={app}")]);
    let server = Sidecar::spawn(&args);
    let inbound = server.listener("inbound");
    server.wait_ready();

    let valid = pki.leaf(CLIENT_ID);
    let out = s_client(inbound, dir.path(), "valid", &pki, Some(&valid));
    assert!(out.contains(GREETING), "a valid SVID gets through: {out:?}");

    let cases: [(&str, Option<Leaf>); 5] = [
        ("no_client_cert", None),
        ("expired", Some(pki.leaf_with(CLIENT_ID, Defect::Expired))),
        (
            "wrong_trust_domain",
            Some(pki.leaf_with(CLIENT_ID, Defect::OtherTrustDomain)),
        ),
        (
            "unknown_issuer",
            Some(pki.leaf_with(CLIENT_ID, Defect::SelfSigned)),
        ),
        (
            "bad_san",
            Some(pki.leaf_with(CLIENT_ID, Defect::TwoUriSans)),
        ),
    ];
    for (reason, leaf) in &cases {
        let out = s_client(inbound, dir.path(), reason, &pki, leaf.as_ref());
        assert!(
            !out.contains(GREETING),
            "{reason}: the app was reached: {out:?}"
        );
        let series = format!(
            r#"stepmesh_tls_handshake_failures_total{{direction="inbound",reason="{reason}"}}"#
        );
        eventually(&series, || (server.metric(&series) == 1.0).then_some(()));
        let line = server.wait_access(reason, |l| l["reason"] == *reason);
        assert_eq!(line["decision"], "handshake_failed");
    }
    // The valid connection was the only one allowed.
    let allowed = server.metric(&format!(
        r#"stepmesh_connections_total{{direction="inbound",peer="{CLIENT_ID}",decision="allow"}}"#
    ));
    assert_eq!(allowed, 1.0);
}

#[test]
fn plaintext_and_silent_clients_fail_the_handshake() {
    let app = greeter();
    let pki = Pki::new("mesh.test");
    let dir = tempfile::tempdir().unwrap();
    let files = SvidFiles::write(dir.path(), "server", &pki, &pki.leaf(SERVER_ID));
    let mut args = files.args();
    args.extend([
        "--inbound".into(),
        format!("127.0.0.1:0={app}"),
        "--handshake-timeout".into(),
        "300ms".into(),
    ]);
    let server = Sidecar::spawn(&args);
    let inbound = server.listener("inbound");
    server.wait_ready();

    let mut plain = std::net::TcpStream::connect(inbound).unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    plain.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut got = Vec::new();
    let _ = plain.read_to_end(&mut got);
    assert!(!String::from_utf8_lossy(&got).contains(GREETING));
    let series = r#"stepmesh_tls_handshake_failures_total{direction="inbound",reason="not_tls"}"#;
    eventually(series, || (server.metric(series) == 1.0).then_some(()));

    let silent = std::net::TcpStream::connect(inbound).unwrap();
    silent.set_read_timeout(Some(PATIENCE)).unwrap();
    let started = std::time::Instant::now();
    let _ = (&silent).read_to_end(&mut Vec::new());
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "handshake timeout not applied"
    );
    let series = r#"stepmesh_tls_handshake_failures_total{direction="inbound",reason="timeout"}"#;
    eventually(series, || (server.metric(series) == 1.0).then_some(()));
}

#[test]
fn tls12_only_with_the_flag() {
    if Command::new("openssl").arg("version").output().is_err() {
        eprintln!("skipped: openssl is not installed");
        return;
    }
    let app = greeter();
    let pki = Pki::new("mesh.test");
    let dir = tempfile::tempdir().unwrap();
    let files = SvidFiles::write(dir.path(), "server", &pki, &pki.leaf(SERVER_ID));
    let client = pki.leaf(CLIENT_ID);
    for (flag, works) in [(None, false), (Some("--tls12"), true)] {
        let mut args = files.args();
        args.extend(["--inbound".into(), format!("127.0.0.1:0={app}")]);
        args.extend(flag.map(String::from));
        let server = Sidecar::spawn(&args);
        let inbound = server.listener("inbound");
        server.wait_ready();
        let out = s_client_version(inbound, dir.path(), "c12", &pki, Some(&client), "-tls1_2");
        assert_eq!(out.contains(GREETING), works, "{flag:?}: {out:?}");
        if !works {
            let series = r#"stepmesh_tls_handshake_failures_total{direction="inbound",reason="incompatible"}"#;
            eventually(series, || (server.metric(series) == 1.0).then_some(()));
        }
    }
}
