//! An `auto` port decides a connection at its handshake, and again once its
//! first bytes turn out opaque (a denied handshake only makes it wait for
//! them: HTTP would be answered 403 request by request). Allowed by a
//! reload in between, the opaque bytes are forwarded under a grant made
//! then, so a reload that denies the peer again closes the connection
//! within 2 s, as any live connection's. Real sidecars; the client with
//! `--no-tunnel` (an mTLS connection of its own per app connection: a
//! tunnel would be refused at its own decision).
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::mesh::*;
use stepmesh_ca::testing::Pki;

const X: &str = "spiffe://mesh.test/ns/shop/sa/x";
const Y: &str = "spiffe://mesh.test/ns/shop/sa/y";
const SERVER: &str = "spiffe://mesh.test/ns/shop/sa/server";

fn policy(port: u16, from: &str) -> String {
    format!("trustDomain: mesh.test\ninbound:\n  default: deny\n  ports:\n    - port: {port}\n      protocol: auto\n      allow:\n        - name: clients\n          from: [{from}]\n")
}

#[test]
fn opaque_bytes_allowed_after_a_denied_handshake_are_closed_by_the_next_deny() {
    let echo = echo_server();
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("mesh.test");
    let policy_file = dir.path().join("policy.yaml");
    std::fs::write(&policy_file, policy(port, Y)).unwrap();
    let files = SvidFiles::write(dir.path(), "server", &pki, &pki.leaf(SERVER));
    let mut args = files.args();
    args.extend([
        "--inbound".into(),
        format!("127.0.0.1:{port}={echo}"),
        "--policy".into(),
        policy_file.display().to_string(),
    ]);
    let server = Sidecar::spawn(&args);
    server.wait_ready();
    let files = SvidFiles::write(dir.path(), "x", &pki, &pki.leaf(X));
    let mut args = files.args();
    args.extend([
        "--no-tunnel".into(),
        "--outbound".into(),
        format!("127.0.0.1:0=127.0.0.1:{port}@{SERVER}"),
    ]);
    let client = Sidecar::spawn(&args);
    client.wait_ready();
    let out: SocketAddr = client.listener("outbound");

    // X's connection is denied at its handshake; it sends nothing yet, so
    // the server waits for its first bytes.
    let mut conn = TcpStream::connect(out).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    eventually("X's handshake at the server", || {
        (inbound_handshakes_of(&server) >= 1.0).then_some(())
    });
    reload_policy(&server, &policy_file, &policy(port, X));
    conn.write_all(b"opaque, now allowed").unwrap();
    let mut back = [0u8; 19];
    conn.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"opaque, now allowed");

    let denied = reload_policy(&server, &policy_file, &policy(port, Y));
    let mut buf = [0u8; 16];
    let closed = loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break Instant::now(),
            Ok(_) => {}
        }
    };
    let took = closed.duration_since(denied);
    assert!(
        took < Duration::from_secs(2),
        "X's connection closed {took:?} after the deny"
    );
}
