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
//! interception rules. The rig (identities, policies, the namespaced
//! sidecar, socket helpers) is tests/transparent_support.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;
mod transparent_support;

use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::process::Command;

use common::ca::CaProcess;
use common::capture::{find_bytes, Capture};
use common::mesh::{metric_value, random_bytes, PATIENCE};
use common::netns::{check, Link, Netns};
use transparent_support::*;

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

/// A neighbour on B's link holding an allowed identity routes an address
/// that is not B's through B (as any host on a bridge can): B's REDIRECT
/// catches the connection, and forwarding it to its original destination
/// would make B's sidecar dial a host of the neighbour's choosing (V, which
/// only B can reach) from B's address. It is refused and counted; V gets
/// nothing; B's own address still works.
#[test]
fn the_sidecar_never_forwards_to_an_address_not_its_own() {
    let Some(link) = Link::create("smtf", &["iptables", "iptables-restore", "setpriv"]) else {
        return;
    };
    let v = Netns::add(format!("smtfV{}", std::process::id())).unwrap();
    check(Command::new("ip").args([
        "link",
        "add",
        "veth-bv",
        "netns",
        link.b.name(),
        "type",
        "veth",
        "peer",
        "name",
        "veth-v",
        "netns",
        v.name(),
    ]));
    for (ns, dev, cidr) in [
        (link.b.name(), "veth-bv", "10.204.0.2/24"),
        (v.name(), "veth-v", "10.204.0.9/24"),
    ] {
        check(Command::new("ip").args(["-n", ns, "addr", "add", cidr, "dev", dev]));
        check(Command::new("ip").args(["-n", ns, "link", "set", dev, "up"]));
    }
    let behind_b = Ipv4Addr::new(10, 204, 0, 9);
    check(Command::new("ip").args([
        "-n",
        link.a.name(),
        "route",
        "add",
        "10.204.0.0/24",
        "via",
        &Link::B_IP.to_string(),
    ]));
    let ca = CaProcess::start(TD, &[("a-token", A_ID), ("b-token", B_ID)]);
    let files = SidecarFiles::new(&ca);
    check(link.a.command(&files.bin).arg("init"));
    check(link.b.command(&files.bin).arg("init"));
    let mut sidecar_a = NsSidecar::spawn(&link.a, &files, "a", Some("a-policy.yaml"), &[]);
    // No --policy: inbound allows every SVID of the trust domain, A's too.
    let mut sidecar_b = NsSidecar::spawn(&link.b, &files, "b", None, &[]);
    sidecar_a.wait_ready();
    sidecar_b.wait_ready();
    let victim = listen(&v, APP_PORT);
    victim.set_nonblocking(true).unwrap();

    let mut conn = connect(&link.a, behind_b, APP_PORT);
    let _ = conn.write_all(b"GET /internal HTTP/1.0\r\n\r\n");
    assert_closed(&mut conn, "A's connection to an address behind B");
    let foreign =
        r#"stepmesh_connection_errors_total{direction="inbound",reason="foreign_original_dst"}"#;
    assert_eq!(metric_value(&sidecar_b.get("/metrics"), foreign), 1.0);
    assert_idle(&victim, "the host behind B");

    // B's own address is still served.
    let got = answer_once(listen(&link.b, APP_PORT), b"ok".to_vec());
    let back = exchange(&link.a, Link::B_IP, APP_PORT, b"hello").unwrap();
    assert_eq!(got.recv_timeout(PATIENCE).unwrap(), b"hello");
    assert_eq!(back, b"ok");
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
