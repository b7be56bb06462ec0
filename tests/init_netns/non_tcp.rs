//! `stepmesh init --non-tcp` for real: the rules installed by the binary in
//! namespace B (the pod), then UDP and TCP from and to A (the rest of the
//! network) that prove what passes beside the sidecar and what does not.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use super::{init, pair, A_IP, A_IP6, BIN, B_IP, B_IP6};
use crate::common::netns::{check, Link, Netns};

/// How long a datagram that was let through takes at most on a veth; one
/// not seen by then was dropped.
const WAIT: Duration = Duration::from_millis(700);

/// A UDP socket bound in `ns`, with `WAIT` as its read timeout.
fn udp(ns: &Netns, addr: SocketAddr) -> UdpSocket {
    let s = ns.enter(|| UdpSocket::bind(addr).unwrap());
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

/// What `s` received within `WAIT`, or `None`.
fn received(s: &UdpSocket) -> Option<(String, SocketAddr)> {
    let mut buf = [0; 64];
    match s.recv_from(&mut buf) {
        Ok((n, from)) => Some((String::from_utf8_lossy(&buf[..n]).into_owned(), from)),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => None,
        Err(e) => panic!("recv on {:?}: {e}", s.local_addr()),
    }
}

/// Sends `payload` from a fresh socket in B to `to`: `Ok` with the socket
/// (to read an answer on) or the send's error.
fn send_from_b(b: &Netns, to: SocketAddr, payload: &str) -> std::io::Result<UdpSocket> {
    let any: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
        .parse()
        .unwrap();
    let s = udp(b, any);
    s.send_to(payload.as_bytes(), to).map(|_| s)
}

/// The filter tables (IPv4 then IPv6) without comments and counters.
fn filter_rules(ns: &Netns) -> String {
    super::saved(ns, "filter")
}

#[test]
fn dns_mode_lets_out_dns_to_the_nameservers_and_nothing_else() {
    let Some(link) = pair() else { return };
    let (a, b) = (&link.a, &link.b);
    let dns_servers = format!("{A_IP},{A_IP6}");
    init(
        b,
        &[
            "--non-tcp",
            "dns",
            "--dns-servers",
            &dns_servers,
            "--exclude-inbound-ports",
            "9090",
        ],
    );

    // A DNS query to a nameserver goes out and its answer comes back.
    for ip in [IpAddr::from(A_IP), IpAddr::from(A_IP6)] {
        let server = udp(a, SocketAddr::new(ip, 53));
        let client = send_from_b(b, server.local_addr().unwrap(), "query").unwrap();
        let (query, from) = received(&server).expect("the query reached the nameserver");
        assert_eq!(query, "query");
        server.send_to(b"answer", from).unwrap();
        let (answer, _) = received(&client).expect("the answer came back");
        assert_eq!(answer, "answer");
    }

    // Any other UDP out is refused at the send, on both families: another
    // port of the nameserver, port 53 of a host that is not one.
    let other = udp(a, SocketAddr::new(A_IP.into(), 5353));
    let other6 = udp(a, SocketAddr::new(A_IP6.into(), 5353));
    for to in [other.local_addr().unwrap(), other6.local_addr().unwrap()] {
        let err = send_from_b(b, to, "exfiltrate").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PermissionDenied, "to {to}: {err}");
    }
    check(
        a.command("ip")
            .args(["addr", "add", "10.203.0.9/24", "dev", Link::A_DEV]),
    );
    let not_dns = udp(a, "10.203.0.9:53".parse().unwrap());
    let err = send_from_b(b, not_dns.local_addr().unwrap(), "tunnel").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    assert_eq!(received(&other), None);
    assert_eq!(received(&not_dns), None);

    // The sidecar's UID is exempt, as from interception.
    super::as_proxy_uid(b, &format!("printf proxy-uid > /dev/udp/{A_IP}/5353"));
    assert_eq!(
        received(&other).map(|(text, _)| text).as_deref(),
        Some("proxy-uid")
    );

    // Nothing comes in that B did not ask for, on either family.
    let app = udp(b, SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 7000));
    let app6 = udp(b, SocketAddr::new(B_IP6.into(), 7000));
    let from_a = udp(a, "0.0.0.0:0".parse().unwrap());
    from_a.send_to(b"unasked", (B_IP, 7000)).unwrap();
    let from_a6 = udp(a, "[::]:0".parse().unwrap());
    from_a6.send_to(b"unasked", (B_IP6, 7000)).unwrap();
    assert_eq!(received(&app), None);
    assert_eq!(received(&app6), None);

    // Loopback is the pod's own business.
    let local = udp(b, "127.0.0.1:7001".parse().unwrap());
    send_from_b(b, local.local_addr().unwrap(), "local").unwrap();
    assert_eq!(
        received(&local).map(|(text, _)| text).as_deref(),
        Some("local")
    );

    // TCP still works over IPv6 with the neighbour caches emptied: neighbour
    // discovery passes both ways (excluded port, so no sidecar is needed).
    for ns in [a, b] {
        check(ns.command("ip").args(["-6", "neigh", "flush", "all"]));
    }
    let listener = b.enter(|| TcpListener::bind((Ipv6Addr::UNSPECIFIED, 9090)).unwrap());
    let mut client = a.enter(|| {
        TcpStream::connect_timeout(
            &SocketAddr::new(B_IP6.into(), 9090),
            Duration::from_secs(10),
        )
        .unwrap()
    });
    client.write_all(b"tcp6").unwrap();
    let (mut served, _) = listener.accept().unwrap();
    let mut buf = [0; 4];
    served.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"tcp6");
}

#[test]
fn drop_allow_and_cleanup_change_the_rules_in_place_and_allowed_udp_ports_pass() {
    let Some(link) = pair() else { return };
    let (a, b) = (&link.a, &link.b);
    // Someone else's rules must survive us, and come after our jumps.
    for tool in ["iptables", "ip6tables"] {
        check(b.command(tool).args([
            "-A", "INPUT", "-p", "udp", "--dport", "9999", "-j", "ACCEPT",
        ]));
    }
    let before = filter_rules(b);
    let server = udp(a, SocketAddr::new(A_IP.into(), 53));
    let to = server.local_addr().unwrap();

    // drop: not even DNS (the nameserver given is ignored); an allowed UDP
    // port still goes out.
    let drop = ["--non-tcp", "drop", "--allow-udp-ports", "8125"];
    init(
        b,
        &[&drop[..], &["--dns-servers", &A_IP.to_string()]].concat(),
    );
    let dropped = filter_rules(b);
    assert_eq!(
        send_from_b(b, to, "query").unwrap_err().kind(),
        ErrorKind::PermissionDenied
    );
    let statsd = udp(a, SocketAddr::new(A_IP.into(), 8125));
    send_from_b(b, statsd.local_addr().unwrap(), "metric").unwrap();
    assert_eq!(
        received(&statsd).map(|(text, _)| text).as_deref(),
        Some("metric")
    );
    let foreign = udp(b, SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 9999));
    let from_a = udp(a, "0.0.0.0:0".parse().unwrap());
    from_a.send_to(b"around", (B_IP, 9999)).unwrap();
    assert_eq!(
        received(&foreign),
        None,
        "an earlier ACCEPT does not get around us"
    );
    let (v4, v6) = dropped.split_once("# v6").unwrap();
    for table in [v4, v6] {
        assert_eq!(
            table.matches("-A OUTPUT -j STEPMESH_NONTCP_OUT").count(),
            1,
            "{table}"
        );
        assert_eq!(
            table.matches("-A INPUT -j STEPMESH_NONTCP_IN").count(),
            1,
            "{table}"
        );
    }
    init(b, &drop);
    assert_eq!(filter_rules(b), dropped, "applying twice changed the rules");

    // allow (init's default): our chains go, UDP passes.
    init(b, &[]);
    assert_eq!(filter_rules(b), before);
    send_from_b(b, to, "query").unwrap();
    assert_eq!(
        received(&server).map(|(text, _)| text).as_deref(),
        Some("query")
    );
    from_a.send_to(b"around", (B_IP, 9999)).unwrap();
    assert_eq!(
        received(&foreign).map(|(text, _)| text).as_deref(),
        Some("around")
    );

    // cleanup removes the filter chains with the nat ones.
    init(b, &["--non-tcp", "dns"]);
    assert!(filter_rules(b).contains(":STEPMESH_NONTCP_OUT"));
    init(b, &["--cleanup"]);
    assert_eq!(filter_rules(b), before);
    let nat = check(b.command("iptables-save").args(["-t", "nat"]));
    assert!(!String::from_utf8_lossy(&nat.stdout).contains("STEPMESH"));
}

#[test]
fn dry_run_prints_the_filter_rules_after_the_nat_ones() {
    let out = check(std::process::Command::new(BIN).args([
        "init",
        "--dry-run",
        "--non-tcp",
        "dns",
        "--dns-servers",
        "10.96.0.10,fd00::a",
    ]));
    let text = String::from_utf8(out.stdout).unwrap();
    let (v4, v6) = text.split_once("# IPv6").unwrap();
    assert!(
        v4.starts_with("*nat\n") && v4.contains("COMMIT\n*filter\n"),
        "{v4}"
    );
    assert!(
        v4.contains("-A STEPMESH_NONTCP_OUT -d 10.96.0.10/32 -p udp -m udp --dport 53 -j RETURN\n"),
        "{v4}"
    );
    assert!(
        v6.contains("-A STEPMESH_NONTCP_OUT -d fd00::a/128 -p udp -m udp --dport 53 -j RETURN\n"),
        "{v6}"
    );
    let bad = std::process::Command::new(BIN)
        .args(["init", "--dry-run", "--non-tcp", "udp"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("allow, dns, drop"),
        "{bad:?}"
    );
}
