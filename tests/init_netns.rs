//! `stepmesh init` for real: rules installed by the binary inside fresh
//! network namespaces joined by a veth pair, then connections that prove
//! what is redirected and what is not. Needs root, `ip` and iptables; skips
//! with a printed reason otherwise.
#![allow(unsafe_code)] // getsockopt(SO_ORIGINAL_DST) in the test harness only.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::netns::{check, Link, Netns};

/// `--non-tcp`: what passes beside the sidecar.
#[path = "init_netns/non_tcp.rs"]
mod non_tcp;

const BIN: &str = env!("CARGO_BIN_EXE_stepmesh");
const A_IP: Ipv4Addr = Link::A_IP;
const B_IP: Ipv4Addr = Link::B_IP;
const A_IP6: Ipv6Addr = Link::A_IP6;
const B_IP6: Ipv6Addr = Link::B_IP6;
const TIMEOUT: Duration = Duration::from_secs(20);

/// Namespaces A (a peer) and B (the pod) joined by a veth pair, IPv4 and
/// IPv6; `None` with a printed reason when this machine cannot run the test.
fn pair() -> Option<Link> {
    let tools = [
        "iptables-restore",
        "iptables-save",
        "ip6tables-restore",
        "setpriv",
        "bash",
    ];
    Link::create("smi", &tools)?.with_ipv6()
}

/// A listener in `ns`; an IPv6 one is v6-only so it can share its port
/// with the IPv4 one.
fn listen(ns: &Netns, addr: &str) -> TcpListener {
    let addr: SocketAddr = addr.parse().unwrap();
    let l: TcpListener = ns.enter(|| {
        let domain = socket2::Domain::for_address(addr);
        let s = socket2::Socket::new(domain, socket2::Type::STREAM, None).unwrap();
        if addr.is_ipv6() {
            s.set_only_v6(true).unwrap();
        }
        s.bind(&addr.into()).unwrap();
        s.listen(16).unwrap();
        s.into()
    });
    l.set_nonblocking(true).unwrap();
    l
}

fn connect(ns: &Netns, ip: impl Into<IpAddr>, port: u16, payload: &str) -> TcpStream {
    let addr = SocketAddr::new(ip.into(), port);
    let mut s = ns.enter(|| TcpStream::connect_timeout(&addr, TIMEOUT).unwrap());
    s.write_all(payload.as_bytes()).unwrap();
    s
}

/// The next connection on `l`, polled until `TIMEOUT`, with what it sent.
fn accept(l: &TcpListener, payload: &str) -> TcpStream {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match l.accept() {
            Ok((mut s, _)) => {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(TIMEOUT)).unwrap();
                let mut buf = vec![0; payload.len()];
                s.read_exact(&mut buf).unwrap();
                assert_eq!(String::from_utf8_lossy(&buf), payload);
                return s;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("no connection on {:?}: {e}", l.local_addr()),
        }
    }
}

/// Asserts no connection is queued on `l` (a completed connect lands in
/// exactly one accept queue, so checking after the right one accepted is exact).
fn assert_idle(l: &TcpListener) {
    match l.accept() {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => panic!("unexpected connection on {:?}: {other:?}", l.local_addr()),
    }
}

/// The pre-redirect destination, as the sidecar reads it.
fn original_dst(s: &TcpStream) -> SocketAddr {
    if s.local_addr().unwrap().is_ipv6() {
        // SAFETY: zeroed sockaddr_in6 is a valid value to be overwritten.
        let mut addr: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        getsockopt(s, libc::SOL_IPV6, libc::IP6T_SO_ORIGINAL_DST, &mut addr);
        let ip = Ipv6Addr::from(addr.sin6_addr.s6_addr);
        return SocketAddr::new(ip.into(), u16::from_be(addr.sin6_port));
    }
    // SAFETY: zeroed sockaddr_in is a valid value to be overwritten.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    getsockopt(s, libc::SOL_IP, libc::SO_ORIGINAL_DST, &mut addr);
    let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
    SocketAddr::new(ip.into(), u16::from_be(addr.sin_port))
}

fn getsockopt<T>(s: &TcpStream, level: libc::c_int, name: libc::c_int, out: &mut T) {
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: fd is open for the life of `s`; out/len describe a writable buffer.
    let rc =
        unsafe { libc::getsockopt(s.as_raw_fd(), level, name, (out as *mut T).cast(), &mut len) };
    assert_eq!(
        rc,
        0,
        "getsockopt({name}): {}",
        std::io::Error::last_os_error()
    );
}

fn init(ns: &Netns, args: &[&str]) -> Output {
    check(ns.command(BIN).arg("init").args(args))
}

/// Runs the bash `script` in `ns` as the sidecar's UID (1337).
fn as_proxy_uid(ns: &Netns, script: &str) {
    let uid = ["--reuid", "1337", "--regid", "1337", "--clear-groups"];
    check(ns.command("setpriv").args(uid).args(["bash", "-c", script]));
}

/// The nat tables (IPv4 then IPv6) without comments and counters.
fn nat_rules(ns: &Netns) -> String {
    saved(ns, "nat")
}

/// `table` of both families (IPv4, a `# v6` line, IPv6) without comments
/// and counters.
fn saved(ns: &Netns, table: &str) -> String {
    let script = format!("iptables-save -t {table} && echo '# v6' && ip6tables-save -t {table}");
    let out = check(ns.command("sh").args(["-c", &script]));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("# ") || *l == "# v6")
        .map(|l| l.split(" [").next().unwrap_or(l).to_owned() + "\n")
        .collect()
}

const ARGS: [&str; 6] = [
    "--exclude-inbound-ports",
    "9090",
    "--exclude-outbound-ports",
    "5432",
    "--exclude-outbound-cidrs",
    "10.96.0.0/12,fd00:96::/108",
];

#[test]
fn dry_run_prints_restore_input_without_root() {
    let out = check(Command::new(BIN).args(["init", "--dry-run"]).args(ARGS));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with("*nat\n") && text.ends_with("COMMIT\n"),
        "{text}"
    );
    for line in [
        "-A STEPMESH_INBOUND -p tcp --dport 15020 -j RETURN",
        "-A STEPMESH_INBOUND -p tcp --dport 9090 -j RETURN",
        "-A STEPMESH_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A STEPMESH_OUTPUT -d 10.96.0.0/12 -j RETURN",
        "-A STEPMESH_OUTPUT -d fd00:96::/108 -j RETURN",
        "-A STEPMESH_OUTPUT -d ::1/128 -j RETURN",
        "-A STEPMESH_REDIRECT_IN -p tcp -j REDIRECT --to-ports 15006",
        "-A STEPMESH_REDIRECT_OUT -p tcp -j REDIRECT --to-ports 15001",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    let bad = Command::new(BIN)
        .args([
            "init",
            "--dry-run",
            "--exclude-outbound-cidrs",
            "10.0.0.1/8",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("host bits"));
}

#[test]
fn install_is_idempotent_and_cleanup_removes_everything() {
    let Some(link) = pair() else { return };
    let b = &link.b;
    // Someone else's rules (a CNI's, kube-proxy's) must survive us.
    check(
        b.command("iptables")
            .args(["-t", "nat", "-N", "OTHER_CHAIN"]),
    );
    check(b.command("iptables").args([
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "udp",
        "-j",
        "OTHER_CHAIN",
    ]));
    let before = nat_rules(b);
    init(b, &ARGS);
    let once = nat_rules(b);
    for chain in [
        "STEPMESH_INBOUND",
        "STEPMESH_REDIRECT_IN",
        "STEPMESH_OUTPUT",
        "STEPMESH_REDIRECT_OUT",
    ] {
        assert!(
            once.contains(&format!(":{chain} -")),
            "{chain} missing:\n{once}"
        );
    }
    for rule in [
        "-A PREROUTING -p tcp -j STEPMESH_INBOUND",
        "-A OUTPUT -p tcp -j STEPMESH_OUTPUT",
        "--dport 9090 -j RETURN",
        "--dport 15020 -j RETURN",
        "--dport 5432 -j RETURN",
        "-d 10.96.0.0/12 -j RETURN",
        "-d fd00:96::/108 -j RETURN",
        "--uid-owner 1337 -j RETURN",
    ] {
        assert!(once.contains(rule), "{rule} missing:\n{once}");
    }
    let (v4, v6) = once.split_once("# v6").unwrap();
    for table in [v4, v6] {
        assert_eq!(
            table
                .matches("-A PREROUTING -p tcp -j STEPMESH_INBOUND")
                .count(),
            1,
            "{table}"
        );
    }
    assert!(once.contains("-A OUTPUT -p udp -j OTHER_CHAIN"), "{once}");
    init(b, &ARGS);
    assert_eq!(nat_rules(b), once, "applying twice changed the rules");

    // Changed flags rebuild the chains rather than adding to them.
    init(b, &["--exclude-inbound-ports", "7070"]);
    let changed = nat_rules(b);
    assert!(changed.contains("--dport 7070 -j RETURN") && !changed.contains("--dport 9090"));
    assert_eq!(
        changed.matches("-j STEPMESH_INBOUND").count(),
        2,
        "one jump per family: {changed}"
    );

    init(b, &["--cleanup"]);
    let after = nat_rules(b);
    assert!(!after.contains("STEPMESH"), "left behind:\n{after}");
    assert_eq!(
        after, before,
        "cleanup must restore the table exactly, foreign rules included"
    );
    init(b, &["--cleanup"]); // nothing to remove is not an error
}

#[test]
fn connections_are_redirected_except_exclusions_and_proxy_uid() {
    let Some(link) = pair() else { return };
    let (a, b) = (&link.a, &link.b);
    init(b, &ARGS);

    let inbound = listen(b, "0.0.0.0:15006");
    let outbound = listen(b, "0.0.0.0:15001");
    let app = listen(b, "0.0.0.0:8080");
    let excluded_in = listen(b, "0.0.0.0:9090");
    let admin = listen(b, "0.0.0.0:15020");
    let local = listen(b, "127.0.0.1:7000");
    let peer = listen(a, "0.0.0.0:8080");
    let peer_db = listen(a, "0.0.0.0:5432");

    // Inbound to the app's port lands on 15006 with the original destination.
    let _c = connect(a, B_IP, 8080, "in-8080");
    let s = accept(&inbound, "in-8080");
    assert_eq!(original_dst(&s), SocketAddr::new(B_IP.into(), 8080));
    assert_idle(&app);

    // Excluded inbound port and the admin port reach their listeners directly.
    let _c = connect(a, B_IP, 9090, "in-9090");
    accept(&excluded_in, "in-9090");
    let _c = connect(a, B_IP, 15020, "in-admin");
    accept(&admin, "in-admin");
    assert_idle(&inbound);

    // Outbound from the app lands on 15001 with the original destination.
    let _c = connect(b, A_IP, 8080, "out-8080");
    let s = accept(&outbound, "out-8080");
    assert_eq!(original_dst(&s), SocketAddr::new(A_IP.into(), 8080));
    assert_idle(&peer);

    // Excluded outbound port goes straight out; so does loopback.
    let _c = connect(b, A_IP, 5432, "out-5432");
    accept(&peer_db, "out-5432");
    let _c = connect(b, Ipv4Addr::LOCALHOST, 7000, "loopback");
    accept(&local, "loopback");
    assert_idle(&outbound);

    // The proxy's own traffic (UID 1337) is never redirected.
    as_proxy_uid(
        b,
        &format!("exec 3<>/dev/tcp/{A_IP}/8080 && printf proxy-uid >&3"),
    );
    accept(&peer, "proxy-uid");
    assert_idle(&outbound);

    // IPv6 is intercepted too: inbound and outbound, original destinations kept.
    let inbound6 = listen(b, "[::]:15006");
    let outbound6 = listen(b, "[::]:15001");
    let excluded_in6 = listen(b, "[::]:9090");
    let _c = connect(a, B_IP6, 8080, "in6-8080");
    let s = accept(&inbound6, "in6-8080");
    assert_eq!(original_dst(&s), SocketAddr::new(B_IP6.into(), 8080));
    let _c = connect(a, B_IP6, 9090, "in6-9090");
    accept(&excluded_in6, "in6-9090");
    let _c = connect(b, A_IP6, 8080, "out6-8080");
    let s = accept(&outbound6, "out6-8080");
    assert_eq!(original_dst(&s), SocketAddr::new(A_IP6.into(), 8080));
    assert_idle(&inbound);
    assert_idle(&outbound);
}
