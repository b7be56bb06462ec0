//! Two real sidecars with SVID files: bytes, half-close, identity checks,
//! L4 policy (allow list, audit, hot reload) and drain.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use common::mesh::*;

const MIB: usize = 1024 * 1024;

#[test]
fn carries_64_mib_each_way_byte_exact_with_half_close() {
    let up = random_bytes(64 * MIB, 1);
    let down = random_bytes(64 * MIB, 2);
    let (expect_up, answer) = (up.clone(), down.clone());
    // The app answers only after it saw EOF: the answer arriving proves the
    // client's half-close crossed both sidecars without closing the return path.
    let app = answer_after_eof_server(move |got| {
        if got == expect_up {
            answer.clone()
        } else {
            format!("got {} bytes, not the ones sent", got.len()).into_bytes()
        }
    });
    let mesh = Mesh::start(app, &[], &[]);
    let started = Instant::now();
    let back = roundtrip(mesh.outbound, &up).unwrap();
    let took = started.elapsed();
    assert_eq!(
        back.len(),
        down.len(),
        "{}",
        String::from_utf8_lossy(&back[..back.len().min(200)])
    );
    assert!(back == down, "answer differs from what the app sent");
    eprintln!("128 MiB through two sidecars in {took:?}");

    let line = mesh
        .server
        .wait_access("inbound line", |l| l["bytes_in"] == 64 * MIB);
    assert_eq!(line["peer_id"], CLIENT_ID);
    assert_eq!(line["decision"], "allow");
    assert_eq!(line["bytes_out"], 64 * MIB);
    let line = mesh
        .client
        .wait_access("outbound line", |l| l["bytes_in"] == 64 * MIB);
    assert_eq!(line["peer_id"], SERVER_ID);
    assert_eq!(line["direction"], "outbound");
    let sent = mesh
        .client
        .metric(r#"stepmesh_tcp_bytes_total{direction="outbound",flow="client_to_server"}"#);
    assert!(sent >= (64 * MIB) as f64, "{sent}");
}

#[test]
fn outbound_refuses_a_peer_with_another_identity() {
    let app = echo_server();
    let pki = stepmesh_ca::testing::Pki::new("mesh.test");
    let dir = tempfile::tempdir().unwrap();
    let server_files = SvidFiles::write(dir.path(), "server", &pki, &pki.leaf(SERVER_ID));
    let client_files = SvidFiles::write(dir.path(), "client", &pki, &pki.leaf(CLIENT_ID));
    let mut args = server_files.args();
    args.extend(["--inbound".into(), format!("127.0.0.1:0={app}")]);
    let server = Sidecar::spawn(&args);
    let inbound = server.listener("inbound");
    let mut args = client_files.args();
    args.extend([
        "--outbound".into(),
        format!("127.0.0.1:0={inbound}@spiffe://mesh.test/ns/shop/sa/payments"),
        "--outbound".into(),
        format!("127.0.0.1:0={inbound}@spiffe://mesh.test/ns/shop/*"),
    ]);
    let client = Sidecar::spawn(&args);
    client.wait_ready();
    let listeners: Vec<std::net::SocketAddr> = eventually("two outbound listeners", || {
        let found: Vec<_> = client
            .logs()
            .iter()
            .filter(|l| l["message"] == "listening" && l["kind"] == "outbound")
            .map(|l| l["listen"].as_str().unwrap().parse().unwrap())
            .collect();
        (found.len() == 2).then_some(found)
    });
    let wrong = roundtrip(listeners[0], b"secret").unwrap_or_default();
    assert!(
        wrong.is_empty(),
        "bytes reached a peer with the wrong identity"
    );
    eventually("wrong_peer_id counted", || {
        (client.metric(
            r#"stepmesh_tls_handshake_failures_total{direction="outbound",reason="wrong_peer_id"}"#,
        ) >= 1.0)
            .then_some(())
    });
    // The prefix pattern accepts the same peer.
    assert_eq!(roundtrip(listeners[1], b"hello").unwrap(), b"hello");
}

#[test]
fn allow_list_denies_and_audit_mode_logs_would_deny() {
    let app = echo_server();
    // An `auto` port sniffs the first bytes before its L4 decision: a
    // denied opaque connection there must close just as cleanly.
    for (mode, protocol) in [("enforce", "tcp"), ("audit", "tcp"), ("enforce", "auto")] {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("policy.yaml");
        std::fs::write(
            &policy,
            l4_policy(port, mode, &["spiffe://mesh.test/ns/shop/sa/web"])
                .replace("protocol: tcp", &format!("protocol: {protocol}")),
        )
        .unwrap();
        let pki = stepmesh_ca::testing::Pki::new("mesh.test");
        let server_files = SvidFiles::write(dir.path(), "server", &pki, &pki.leaf(SERVER_ID));
        let client_files = SvidFiles::write(dir.path(), "client", &pki, &pki.leaf(CLIENT_ID));
        let mut args = server_files.args();
        args.extend([
            "--inbound".into(),
            format!("127.0.0.1:{port}={app}"),
            "--policy".into(),
            policy.display().to_string(),
        ]);
        let server = Sidecar::spawn(&args);
        let inbound = server.listener("inbound");
        let mut args = client_files.args();
        args.extend([
            "--outbound".into(),
            format!("127.0.0.1:0={inbound}@{SERVER_ID}"),
        ]);
        let client = Sidecar::spawn(&args);
        let outbound = client.listener("outbound");
        client.wait_ready();
        server.wait_ready();

        let back = roundtrip(outbound, b"hello").unwrap_or_default();
        let line = server.wait_access("decision line", |l| l["peer_id"] == CLIENT_ID);
        assert!(
            !line["rule"].as_str().unwrap_or_default().is_empty(),
            "{line}"
        );
        assert_eq!(line["port"], port);
        if mode == "enforce" {
            assert!(back.is_empty(), "denied peer got bytes back");
            assert_eq!(line["decision"], "deny", "{line}");
            let denied = server.metric(&format!(
                r#"stepmesh_connections_total{{direction="inbound",peer="{CLIENT_ID}",decision="deny"}}"#
            ));
            assert_eq!(denied, 1.0);
            // The client side sees a deliberate close (TLS close_notify),
            // logged as the peer's refusal, not as a broken connection.
            let line = client.wait_access("outbound line", |l| l["direction"] == "outbound");
            assert_eq!(
                (&line["decision"], &line["reason"]),
                (&"refused".into(), &"peer_refused".into()),
                "{line}"
            );
            assert!(line["error"].is_null(), "{line}");
            let errors = client.metrics();
            assert!(!errors.contains("reason=\"io_error\""), "{errors}");
            let refused = client.metric(
                r#"stepmesh_connections_rejected_total{direction="outbound",reason="peer_refused"}"#,
            );
            assert_eq!(refused, 1.0);
        } else {
            assert_eq!(back, b"hello", "audit mode lets the peer through");
            assert_eq!(line["decision"], "would_deny", "{line}");
        }
    }
}

#[test]
fn policy_hot_reload_keeps_old_on_bad_file_and_closes_denied_live_connections() {
    let app = echo_server();
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, l4_policy(port, "enforce", &[CLIENT_ID])).unwrap();
    let policy_arg = policy.display().to_string();
    let pki = stepmesh_ca::testing::Pki::new("mesh.test");
    let server_files = SvidFiles::write(dir.path(), "server", &pki, &pki.leaf(SERVER_ID));
    let client_files = SvidFiles::write(dir.path(), "client", &pki, &pki.leaf(CLIENT_ID));
    let mut args = server_files.args();
    args.extend([
        "--inbound".into(),
        format!("127.0.0.1:{port}={app}"),
        "--policy".into(),
        policy_arg,
    ]);
    let server = Sidecar::spawn(&args);
    let inbound = server.listener("inbound");
    let mut args = client_files.args();
    args.extend([
        "--outbound".into(),
        format!("127.0.0.1:0={inbound}@{SERVER_ID}"),
    ]);
    let client = Sidecar::spawn(&args);
    let outbound = client.listener("outbound");
    client.wait_ready();
    server.wait_ready();
    assert_eq!(roundtrip(outbound, b"one").unwrap(), b"one");

    // A connection established under the old policy.
    let mut live = TcpStream::connect(outbound).unwrap();
    live.set_read_timeout(Some(PATIENCE)).unwrap();
    live.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    live.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");

    let digest = server.config()["policy_digest"].clone();
    std::fs::write(
        &policy,
        "trustDomain: mesh.test\ninbound: {default: nonsense}\n",
    )
    .unwrap();
    eventually("the bad policy refused and counted", || {
        let m = server.metrics();
        (m.lines().any(|l| {
            l.starts_with("stepmesh_policy_reloads_total")
                && l.contains("error")
                && !l.ends_with(" 0")
        }))
        .then_some(())
    });
    assert_eq!(
        server.config()["policy_digest"],
        digest,
        "bad file must not replace the policy"
    );
    assert_eq!(
        roundtrip(outbound, b"two").unwrap(),
        b"two",
        "old decisions hold"
    );

    std::fs::write(
        &policy,
        l4_policy(port, "enforce", &["spiffe://mesh.test/ns/other/sa/x"]),
    )
    .unwrap();
    let swapped = Instant::now();
    eventually("new policy denies", || {
        roundtrip(outbound, b"three")
            .unwrap_or_default()
            .is_empty()
            .then_some(())
    });
    assert!(
        swapped.elapsed() < Duration::from_secs(2),
        "took {:?}",
        swapped.elapsed()
    );

    // The established connection is now denied too: closed, not served
    // (live re-authorization; tests/live_reauth.rs has the whole story).
    let mut rest = Vec::new();
    let _ = live.write_all(b"pong");
    let _ = live.read_to_end(&mut rest);
    assert!(rest.is_empty(), "a revoked connection carries nothing more");
}

#[test]
fn sigterm_drains_in_flight_and_refuses_new() {
    let app = echo_server();
    let mesh = Mesh::start(app, &["--drain-timeout".into(), "30s".into()], &[]);
    let mut live = TcpStream::connect(mesh.outbound).unwrap();
    live.set_read_timeout(Some(PATIENCE)).unwrap();
    live.write_all(b"before").unwrap();
    let mut buf = [0u8; 6];
    live.read_exact(&mut buf).unwrap();

    let mut server = mesh.server;
    server.signal(libc::SIGTERM);
    server.wait_log("draining", |l| (l["message"] == "draining").then_some(()));
    eventually("/ready 503 while draining", || {
        (http_get(server.admin, "/ready").0 == 503).then_some(())
    });
    // New connections are refused at the inbound listener.
    eventually("inbound refuses", || {
        TcpStream::connect(mesh.inbound).is_err().then_some(())
    });

    // The in-flight transfer still completes.
    let payload = random_bytes(4 * 1024 * 1024, 3);
    let mut writer = live.try_clone().unwrap();
    let sent = payload.clone();
    let t = std::thread::spawn(move || {
        writer.write_all(&sent).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut back = vec![0u8; 0];
    live.read_to_end(&mut back).unwrap();
    t.join().unwrap();
    assert!(back == payload, "in-flight transfer changed during drain");
    let status = server.wait_exit();
    assert!(status.success(), "{status:?}");
    server.wait_log("drained", |l| (l["message"] == "drained").then_some(()));
    // Its access-log line was written before the exit.
    let total = (payload.len() + 6) as u64;
    let line = server.wait_access("in-flight line", |l| l["bytes_in"] == total);
    assert_eq!(line["bytes_out"], total);
}

#[test]
fn idle_connections_cost_little_memory() {
    const N: usize = 2000;
    let app = echo_server();
    let mesh = Mesh::start(
        app,
        &["--workers".into(), "1".into()],
        &["--workers".into(), "1".into()],
    );
    // Warm up (first handshake, session ticket, allocator arenas).
    assert_eq!(roundtrip(mesh.outbound, b"warm").unwrap(), b"warm");
    let before = (mesh.client.rss_kib(), mesh.server.rss_kib());
    let mut conns = Vec::with_capacity(N);
    for i in 0..N {
        let mut c = TcpStream::connect(mesh.outbound).unwrap();
        c.set_read_timeout(Some(PATIENCE)).unwrap();
        let msg = format!("{i:06}");
        c.write_all(msg.as_bytes()).unwrap();
        let mut back = [0u8; 6];
        c.read_exact(&mut back).unwrap();
        assert_eq!(&back, msg.as_bytes());
        conns.push(c);
    }
    let after = (mesh.client.rss_kib(), mesh.server.rss_kib());
    let per_conn = |b: u64, a: u64| (a.saturating_sub(b)) as f64 / N as f64;
    let (out_kib, in_kib) = (per_conn(before.0, after.0), per_conn(before.1, after.1));
    eprintln!(
        "{N} idle connections: outbound sidecar {} -> {} KiB ({out_kib:.1} KiB/conn), inbound {} -> {} KiB ({in_kib:.1} KiB/conn)",
        before.0, after.0, before.1, after.1
    );
    // No per-connection forwarding buffers while idle: what is left is the
    // task, rustls' own 4 KiB read buffer and the TLS state. (The benchmark
    // target, 10,000 idle connections in 64 MiB, is 6.5 KiB: see
    // docs/PROXY.md for where the rest goes.) Debug build, loaded machine:
    // a generous bound that still catches per-connection buffers coming back.
    assert!(
        out_kib < 18.0 && in_kib < 18.0,
        "{out_kib:.1} / {in_kib:.1} KiB per idle connection"
    );
    drop(conns);
}

#[test]
fn a_second_signal_ends_the_drain_at_once() {
    let app = echo_server();
    let mesh = Mesh::start(app, &["--drain-timeout".into(), "10m".into()], &[]);
    let mut live = TcpStream::connect(mesh.outbound).unwrap();
    live.set_read_timeout(Some(PATIENCE)).unwrap();
    live.write_all(b"held").unwrap();
    let mut buf = [0u8; 4];
    live.read_exact(&mut buf).unwrap();

    let mut server = mesh.server;
    server.signal(libc::SIGTERM);
    server.wait_log("draining", |l| (l["message"] == "draining").then_some(()));
    assert!(
        server.try_wait().is_none(),
        "the held connection keeps the drain going"
    );
    let started = Instant::now();
    server.signal(libc::SIGINT);
    let status = server.wait_exit();
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(30));
    server.wait_log("forced", |l| {
        (l["message"] == "second signal: closing the remaining connections now").then_some(())
    });
}

#[test]
fn sidecars_resume_sessions_unless_told_not_to() {
    let app = echo_server();
    for resume in [true, false] {
        // A connection per app connection (no tunnels), so that each one
        // is a handshake.
        let mut extra: Vec<String> = vec!["--no-tunnel".into()];
        if !resume {
            extra.push("--no-session-resumption".into());
        }
        let mesh = Mesh::start(app, &[], &extra);
        for _ in 0..3 {
            assert_eq!(roundtrip(mesh.outbound, b"again").unwrap(), b"again");
        }
        let series = |kind: &str| {
            format!(r#"stepmesh_tls_handshakes_total{{direction="outbound",kind="{kind}"}}"#)
        };
        let (full, resumed) = (
            mesh.client.metric(&series("full")),
            mesh.client.metric(&series("resumed")),
        );
        assert_eq!(full + resumed, 3.0);
        if resume {
            assert!(
                resumed >= 1.0,
                "no resumed session: {full} full, {resumed} resumed"
            );
        } else {
            assert_eq!(resumed, 0.0);
        }
        let inbound_resumed = mesh
            .server
            .metric(r#"stepmesh_tls_handshakes_total{direction="inbound",kind="resumed"}"#);
        assert_eq!(inbound_resumed, resumed, "both ends agree");
    }
}
