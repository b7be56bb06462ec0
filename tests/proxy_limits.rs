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

#[test]
fn idle_connections_are_closed() {
    let app = echo_server();
    let mesh = Mesh::start(app, &[], &["--idle-timeout".into(), "300ms".into()]);
    let mut c = TcpStream::connect(mesh.outbound).unwrap();
    c.set_read_timeout(Some(PATIENCE)).unwrap();
    c.write_all(b"hi").unwrap();
    let mut b = [0u8; 2];
    c.read_exact(&mut b).unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert!(started.elapsed() < Duration::from_secs(20));
    let series = r#"stepmesh_connection_errors_total{direction="outbound",reason="idle_timeout"}"#;
    eventually(series, || (mesh.client.metric(series) == 1.0).then_some(()));
    let line = mesh
        .client
        .wait_access("idle line", |l| l["error"].is_string());
    assert!(line["error"].as_str().unwrap().contains("idle"), "{line}");
}

#[test]
fn bad_flags_exit_with_a_reason() {
    let cases: [(&[&str], &str); 4] = [
        (&["--inbound", "127.0.0.1:0"], "LISTEN=APP_ADDR"),
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
