//! Limits and refusals of `stepmesh proxy`: the connection limit, the idle
//! timeout, bad flags and bad SVID files.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::mesh::*;
use stepmesh_ca::testing::Defect;

#[test]
fn connection_limit_closes_the_excess_and_counts_it() {
    let app = echo_server();
    let mesh = Mesh::start(app, &[], &["--max-connections".into(), "2".into()]);
    let held = hold(mesh.outbound, 2);
    let over = roundtrip(mesh.outbound, b"third").unwrap_or_default();
    assert!(over.is_empty(), "a third connection got through");
    let series =
        r#"stepmesh_connections_rejected_total{direction="outbound",reason="connection_limit"}"#;
    eventually(series, || (mesh.client.metric(series) >= 1.0).then_some(()));
    drop(held);
    // Permits come back when connections end.
    eventually("a slot again", || {
        (roundtrip(mesh.outbound, b"again").unwrap_or_default() == b"again").then_some(())
    });
}

/// A sidecar with one outbound listener to `peer`, started under
/// `prlimit --nofile=SOFT:HARD` as a container runtime would start it.
fn sidecar_with_nofile(nofile: &str, peer: std::net::SocketAddr) -> (Sidecar, tempfile::TempDir) {
    let pki = stepmesh_ca::testing::Pki::new("mesh.test");
    let dir = tempfile::tempdir().unwrap();
    let args = outbound_args(dir.path(), &pki, peer);
    let wrapper = ["prlimit".into(), format!("--nofile={nofile}"), "--".into()];
    (Sidecar::spawn_wrapped(&wrapper, None, &args), dir)
}

fn soft_nofile(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

#[test]
fn the_descriptor_limit_is_raised_and_the_connection_limit_fits_it() {
    if Command::new("prlimit").arg("--version").output().is_err() {
        println!("skipped: no prlimit (util-linux) to start the sidecar under a low limit");
        return;
    }
    // A peer that accepts and never answers: every app connection waits in
    // its handshake, holding its connection permit.
    let peer = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let peer_addr = peer.local_addr().unwrap();

    // Soft 512 under hard 4,096: raised to 4,096, and 16,384 connections
    // would need more, so the limit becomes (4,096 - 256) / 2.
    let (raised, _dir) = sidecar_with_nofile("512:4096", peer_addr);
    raised.wait_log("raised", |l| {
        (l["message"] == "descriptor limit raised to the hard limit"
            && l["from"] == 512
            && l["to"] == 4096)
            .then_some(())
    });
    assert_eq!(soft_nofile(raised.pid()), 4096);
    raised.wait_log("connection limit", |l| (l["carried"] == 1920).then_some(()));

    // Hard 300: 22 connections at once, the 23rd closed at accept.
    let (tight, _dir) = sidecar_with_nofile("300:300", peer_addr);
    tight.wait_log("connection limit", |l| (l["carried"] == 22).then_some(()));
    let outbound = tight.listener("outbound");
    let held: Vec<TcpStream> = (0..22)
        .map(|_| TcpStream::connect(outbound).unwrap())
        .collect();
    let series =
        r#"stepmesh_connections_rejected_total{direction="outbound",reason="connection_limit"}"#;
    // Accepted in order: the 22 hold their permits when the 23rd comes.
    let mut over = TcpStream::connect(outbound).unwrap();
    over.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut byte = [0u8; 1];
    assert_eq!(over.read(&mut byte).unwrap_or(0), 0, "the 23rd is closed");
    eventually(series, || (tight.metric(series) >= 1.0).then_some(()));
    assert_eq!(tight.metric(series), 1.0, "only the 23rd was refused");
    for mut c in held {
        c.set_nonblocking(true).unwrap();
        let still_open =
            matches!(c.read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
        assert!(still_open, "a connection within the limit was closed");
    }
    drop(peer);
}

/// Sends one byte pair through `mesh` and waits for the connection to be
/// closed as idle by its `direction` side (`closer`): counted, logged, and
/// how long after its last byte.
fn closed_when_idle(mesh: &Mesh, closer: &Sidecar, direction: &str) -> Duration {
    let mut c = TcpStream::connect(mesh.outbound).unwrap();
    c.set_read_timeout(Some(PATIENCE)).unwrap();
    c.write_all(b"hi").unwrap();
    let mut b = [0u8; 2];
    c.read_exact(&mut b).unwrap();
    let last_byte = Instant::now();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    let closed_after = last_byte.elapsed();
    assert!(rest.is_empty());
    assert!(closed_after < PATIENCE, "closed {closed_after:?} after");
    let series = format!(
        r#"stepmesh_connection_errors_total{{direction="{direction}",reason="idle_timeout"}}"#
    );
    eventually(&series, || (closer.metric(&series) == 1.0).then_some(()));
    let line = closer.wait_access("idle line", |l| l["error"].is_string());
    assert!(line["error"].as_str().unwrap().contains("idle"), "{line}");
    closed_after
}

#[test]
fn idle_connections_are_closed() {
    let app = echo_server();
    let mesh = Mesh::start(app, &[], &["--idle-timeout".into(), "300ms".into()]);
    closed_when_idle(&mesh, &mesh.client, "outbound");
}

/// The inbound side's copy counts the process's idle periods (no timer of
/// its own): a connection idle at the server's `--idle-timeout` is closed
/// there, between one and two periods after its last byte, whether it came
/// as a tunnel on the pooled mesh connection or on its own mTLS connection.
#[test]
fn idle_connections_are_closed_by_the_inbound_side() {
    let idle = Duration::from_millis(300);
    for client_extra in [vec![], vec!["--no-tunnel".to_owned()]] {
        let app = echo_server();
        let server_extra = ["--idle-timeout".to_owned(), "300ms".to_owned()];
        let mesh = Mesh::start(app, &server_extra, &client_extra);
        let closed_after = closed_when_idle(&mesh, &mesh.server, "inbound");
        assert!(
            closed_after >= idle - Duration::from_millis(50),
            "{client_extra:?}: closed {closed_after:?} after the last byte"
        );
    }
}

#[test]
fn bad_flags_exit_with_a_reason() {
    let cases: [(&[&str], &str); 5] = [
        (&["--inbound", "127.0.0.1:0"], "LISTEN=APP_ADDR"),
        (&["--idle-timeout", "0"], "above 0"),
        (
            &["--outbound", "127.0.0.1:0=127.0.0.1:1@spiffe://td/a/*/b"],
            "SPIFFE_ID",
        ),
        (&["--drain-timeout", "5 parsecs"], "--drain-timeout"),
        (
            &["--cert", "x", "--inbound", "127.0.0.1:0=127.0.0.1:1"],
            "--key",
        ),
    ];
    for (args, want) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_stepmesh"))
            .arg("proxy")
            .args(["--admin", "127.0.0.1:0"])
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn bad_svid_files_keep_the_old_svid() {
    let app = echo_server();
    let mesh = Mesh::start(app, &[], &[]);
    let serial = mesh.server.config()["serial"].clone();
    let failures = r#"stepmesh_svid_renewals_total{source="files",outcome="failure"}"#;

    // Garbage, then an expired SVID: both refused, counted, old one kept.
    atomic_write(&mesh.server_files.cert, b"not a certificate");
    eventually("garbage refused", || {
        (mesh.server.metric(failures) >= 1.0).then_some(())
    });
    mesh.server_files
        .replace(&mesh.pki.leaf_with(SERVER_ID, Defect::Expired));
    eventually("expired refused", || {
        (mesh.server.metric(failures) >= 2.0).then_some(())
    });
    assert_eq!(mesh.server.config()["serial"], serial);
    assert_eq!(roundtrip(mesh.outbound, b"still").unwrap(), b"still");

    // A good one is picked up.
    mesh.server_files.replace(&mesh.pki.leaf(SERVER_ID));
    eventually("new SVID loaded", || {
        (mesh.server.config()["serial"] != serial).then_some(())
    });
    assert_eq!(roundtrip(mesh.outbound, b"fresh").unwrap(), b"fresh");
}
