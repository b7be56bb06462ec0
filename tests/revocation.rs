//! Revocation end to end: a real `stepmesh ca serve` with an admin token,
//! sidecars with SVIDs from it, and the `stepmesh ca revoke | unrevoke |
//! revocations` command lines. A revoked serial closes the workload's live
//! connections (two tunnels on one mesh connection) within 2 s and is
//! refused in handshakes until it renews; a revoked ID cannot renew
//! (PERMISSION_DENIED, audited) until unrevoked; a CA restart keeps both;
//! bad input changes nothing.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::ca::CaProcess;
use common::ca_mesh::*;
use common::mesh::*;

/// How soon sidecars must close a revoked workload's connections.
const REVOKE_WITHIN: Duration = Duration::from_secs(2);

fn start_ca(token_file: &Path) -> CaProcess {
    CaProcess::start_with(
        TD,
        &PAIR_TOKENS,
        &["--admin-token-file", token_file.to_str().unwrap()],
    )
}

fn echoes(outbound: SocketAddr) -> bool {
    roundtrip(outbound, b"ping").unwrap_or_default() == b"ping"
}

#[test]
fn a_revoked_serial_closes_live_connections_and_is_refused_until_renewal() {
    let dir = tempfile::tempdir().unwrap();
    let token = admin_token(dir.path(), ADMIN_TOKEN);
    let ca = start_ca(&token);
    // X renews every ~10 s: long enough to see the refusal, short enough
    // to see the renewal end it.
    let (server, client, outbound) = mesh(&ca.grpc_host_port(), &ca.bundle_path, dir.path(), "20s");
    let serial = client.config()["serial"].as_str().unwrap().to_owned();
    let mut conn = live(outbound);
    // A second app connection: a second tunnel on the same mesh connection.
    let mut tunnel = live(outbound);
    let handshakes =
        server.metric(r#"stepmesh_tls_handshakes_total{direction="inbound",kind="full"}"#);
    assert_eq!(handshakes, 1.0, "two app connections, one mTLS connection");

    let addr = ca.grpc_host_port();
    // Timed from before the command starts (it returns once the CA has
    // the entry; the sidecars may already have closed by then).
    let revoked = Instant::now();
    let out = admin(
        &addr,
        &ca.bundle_path,
        &token,
        "revoke",
        &["--serial", &serial, "--reason", "key leaked"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("serial={serial} id={CLIENT_ID}")),
        "{}",
        text(&out)
    );
    let took = closed_at(&mut conn).duration_since(revoked);
    assert!(
        took < REVOKE_WITHIN,
        "X's live connection closed {took:?} after the revoke"
    );
    let took_tunnel = closed_at(&mut tunnel).duration_since(revoked);
    assert!(
        took_tunnel < REVOKE_WITHIN,
        "X's second tunnel closed {took_tunnel:?} after the revoke"
    );
    eprintln!(
        "revoked serial {serial}: X's live connections closed after {took:?}, {took_tunnel:?}"
    );
    let list = admin(&addr, &ca.bundle_path, &token, "revocations", &[]);
    let listed = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(listed.contains("reason=\"key leaked\""), "{}", text(&list));

    // Refused in the handshake while X still holds that SVID.
    if client.config()["serial"] == serial.as_str() {
        assert!(
            !echoes(outbound),
            "a new connection with the revoked SVID is refused"
        );
        eventually("the refusal counted by reason", || {
            (server.metric(
                r#"stepmesh_tls_handshake_failures_total{direction="inbound",reason="revoked"}"#,
            ) >= 1.0)
                .then_some(())
        });
    }
    // X renews (its token is not revoked) and is served again.
    eventually("X renewed and is served", || {
        (client.config()["serial"] != serial.as_str() && echoes(outbound)).then_some(())
    });
    eprintln!(
        "X renewed and served {:?} after the revoke",
        revoked.elapsed()
    );
    // The two tunnels (the mesh connection they rode closes too, quietly:
    // it is not an app connection).
    assert_eq!(
        server.metric(
            r#"stepmesh_connections_revoked_total{reason="revoked",rule="revocation_list"}"#
        ),
        2.0
    );
    ca.wait_audit(|v| {
        v["decision"] == "revoke" && v["outcome"] == "ok" && v["serial"] == serial.as_str()
    });
}

#[test]
fn a_revoked_server_loses_the_connections_already_made_to_it() {
    // The client side's pooled mesh connection to a server whose serial is
    // revoked ends, with the tunnels on it, and a new one is refused in the
    // handshake: the revocation reaches connections made before it.
    let dir = tempfile::tempdir().unwrap();
    let token = admin_token(dir.path(), ADMIN_TOKEN);
    let ca = start_ca(&token);
    let (server, client, outbound) = mesh(&ca.grpc_host_port(), &ca.bundle_path, dir.path(), "1h");
    let serial = server.config()["serial"].as_str().unwrap().to_owned();
    let mut conns = [live(outbound), live(outbound)];
    let revoked = Instant::now();
    let out = admin(
        &ca.grpc_host_port(),
        &ca.bundle_path,
        &token,
        "revoke",
        &["--serial", &serial, "--reason", "server key leaked"],
    );
    assert!(out.status.success(), "{}", text(&out));
    for conn in &mut conns {
        let took = closed_at(conn).duration_since(revoked);
        assert!(
            took < REVOKE_WITHIN,
            "a tunnel to the revoked server closed {took:?} after the revoke"
        );
    }
    assert!(
        !echoes(outbound),
        "a new connection to the revoked server is refused"
    );
    eventually("the client's refusal counted", || {
        (client.metric(
            r#"stepmesh_tls_handshake_failures_total{direction="outbound",reason="revoked"}"#,
        ) >= 1.0)
            .then_some(())
    });
}

/// `stepmesh ca serve` again on the stopped CA's port and state; its log
/// lines are collected.
fn restart_on_same_port(ca: &CaProcess, token: &Path) -> (Child, Arc<Mutex<Vec<String>>>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_stepmesh"))
        .args(["--log-format", "json", "ca", "serve", "--listen"])
        .arg(ca.grpc_addr.to_string())
        .args([
            "--admin",
            "127.0.0.1:0",
            "--trust-domain",
            TD,
            "--state-dir",
        ])
        .arg(&ca.state_dir)
        .arg("--join-tokens")
        .arg(&ca.join_tokens_path)
        .arg("--admin-token-file")
        .arg(token)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let logs = Arc::new(Mutex::new(Vec::new()));
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    loop {
        let line = lines.next().expect("CA exited").unwrap();
        let serving = line.contains("\"CA serving\"");
        logs.lock().unwrap().push(line);
        if serving {
            break;
        }
    }
    let sink = logs.clone();
    std::thread::spawn(move || {
        lines
            .map_while(Result::ok)
            .for_each(|l| sink.lock().unwrap().push(l))
    });
    (child, logs)
}

#[test]
fn a_revoked_id_cannot_renew_until_unrevoked_and_a_restart_keeps_both() {
    let dir = tempfile::tempdir().unwrap();
    let token = admin_token(dir.path(), ADMIN_TOKEN);
    let mut ca = start_ca(&token);
    // X renews every ~3 s.
    let (server, client, outbound) = mesh(&ca.grpc_host_port(), &ca.bundle_path, dir.path(), "6s");
    let addr = ca.grpc_host_port();
    let mut conn = live(outbound);

    let revoked = Instant::now();
    let out = admin(
        &addr,
        &ca.bundle_path,
        &token,
        "revoke",
        &["--id", CLIENT_ID, "--reason", "compromised"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let took = closed_at(&mut conn).duration_since(revoked);
    assert!(
        took < REVOKE_WITHIN,
        "X's live connection closed {took:?} after the revoke"
    );
    // Its last SVID by serial too (still valid: X renewed it at half-life).
    let serial = client.config()["serial"].as_str().unwrap().to_owned();
    let out = admin(
        &addr,
        &ca.bundle_path,
        &token,
        "revoke",
        &["--serial", &serial],
    );
    assert!(out.status.success(), "{}", text(&out));

    // Renewal refused with PERMISSION_DENIED and an audit line; X stays out.
    let denied = ca.wait_audit(|v| {
        v["decision"] == "sign" && v["reason"] == "revoked" && v["identity"] == CLIENT_ID
    });
    assert_eq!(denied["outcome"], "denied");
    assert!(
        denied["detail"].as_str().unwrap().contains("compromised"),
        "{denied}"
    );
    let failed = r#"stepmesh_svid_renewals_total{source="ca",outcome="failure"}"#;
    eventually("X's renewals fail", || {
        (client.metric(failed) >= 1.0).then_some(())
    });
    assert!(
        !echoes(outbound),
        "a revoked ID is refused in the handshake"
    );

    // A restart keeps both entries and the lockout.
    ca.stop();
    let (mut again, logs) = restart_on_same_port(&ca, &token);
    let list = admin(&addr, &ca.bundle_path, &token, "revocations", &[]);
    let listed = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(
        listed.contains(&format!("serial={serial} id={CLIENT_ID}")),
        "{}",
        text(&list)
    );
    assert!(
        listed.contains(&format!("serial=* id={CLIENT_ID}")),
        "{}",
        text(&list)
    );
    let before = logs.lock().unwrap().len();
    eventually("a renewal refused by the restarted CA", || {
        logs.lock().unwrap()[before..]
            .iter()
            .any(|l| l.contains("\"reason\":\"revoked\"") && l.contains(CLIENT_ID))
            .then_some(())
    });
    assert!(!echoes(outbound), "still refused after the CA restart");

    // Unrevoked: X renews and is served.
    let out = admin(
        &addr,
        &ca.bundle_path,
        &token,
        "unrevoke",
        &["--id", CLIENT_ID],
    );
    assert!(out.status.success(), "{}", text(&out));
    eventually("X renews and is served again", || {
        (client.config()["serial"] != serial.as_str() && echoes(outbound)).then_some(())
    });
    // (The serial entry lapses with its 6 s certificate.)
    let list = admin(&addr, &ca.bundle_path, &token, "revocations", &[]);
    let listed = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(!listed.contains("serial=*"), "{}", text(&list));
    drop(server);
    let _ = again.kill();
    let _ = again.wait();
}

#[test]
fn bad_revocation_input_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let token = admin_token(dir.path(), ADMIN_TOKEN);
    let ca = start_ca(&token);
    let addr = ca.grpc_host_port();
    let svid = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(ca.issue("client-token"));
    let wrong = admin_token(dir.path(), "not-the-admin-token-but-long-enough-000");
    let cases: [(&Path, &[&str], i32, &str); 5] = [
        (
            &token,
            &["--serial", "ffffffffff"],
            64,
            "is not a certificate this CA issued",
        ),
        (
            &token,
            &["--serial", "zz:top"],
            64,
            "is not a hex serial number",
        ),
        (
            &token,
            &["--id", "spiffe:/mesh.test/x"],
            64,
            "id \"spiffe:/mesh.test/x\"",
        ),
        (
            &token,
            &["--id", "spiffe://other.test/ns/a/sa/b"],
            64,
            "not of trust domain mesh.test",
        ),
        (
            &wrong,
            &["--serial", &svid.serial],
            1,
            "the admin token is not the CA's",
        ),
    ];
    for (file, args, code, message) in cases {
        let out = admin(&addr, &ca.bundle_path, file, "revoke", args);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(message),
            "{args:?}: {}",
            text(&out)
        );
    }
    let out = admin(&addr, &ca.bundle_path, &wrong, "revocations", &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let out = admin(
        &addr,
        &ca.bundle_path,
        &token,
        "unrevoke",
        &["--id", CLIENT_ID],
    );
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not revoked"),
        "{}",
        text(&out)
    );
    let out = admin(&addr, &ca.bundle_path, &token, "revocations", &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "no revocations",
        "state unchanged"
    );
    ca.wait_audit(|v| {
        v["decision"] == "revoke"
            && v["outcome"] == "unauthenticated"
            && v["reason"] == "bad_admin_token"
    });
    ca.wait_audit(|v| v["decision"] == "revoke" && v["outcome"] == "refused");
    // The CA kept serving throughout.
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(ca.issue("client-token"));
}
