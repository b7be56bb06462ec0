//! `stepmesh init` for real: rules installed by the binary inside fresh
//! network namespaces joined by a veth pair, then connections that prove
//! what is redirected and what is not. Needs root, `ip` and iptables; skips
//! with a printed reason otherwise.
#![allow(unsafe_code)] // setns(2) and getsockopt(SO_ORIGINAL_DST) in the test harness only.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_stepmesh");
const A_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
const B_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);
const TIMEOUT: Duration = Duration::from_secs(20);

/// A named network namespace, deleted on drop.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok()
}

/// Two namespaces, A (a peer) and B (the pod), joined by a veth pair; `None`
/// with a printed reason when this machine cannot run the test.
fn pair() -> Option<(Netns, Netns)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root (network namespaces and iptables)");
        return None;
    }
    for tool in ["ip", "iptables-restore", "iptables-save", "setpriv", "bash"] {
        if !have(tool) {
            eprintln!("skipped: {tool} is not installed");
            return None;
        }
    }
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let id = format!("{}x{n}", std::process::id());
    let a = Netns(format!("smA{id}"));
    if !Command::new("ip")
        .args(["netns", "add", &a.0])
        .status()
        .unwrap()
        .success()
    {
        eprintln!("skipped: `ip netns add` is not permitted here");
        return None;
    }
    let b = Netns(format!("smB{id}"));
    run(Command::new("ip").args(["netns", "add", &b.0]));
    run(Command::new("ip").args([
        "link", "add", "va", "netns", &a.0, "type", "veth", "peer", "name", "vb", "netns", &b.0,
    ]));
    for (ns, dev, ip) in [(&a, "va", A_IP), (&b, "vb", B_IP)] {
        run(Command::new("ip").args(["-n", &ns.0, "addr", "add", &format!("{ip}/24"), "dev", dev]));
        run(Command::new("ip").args(["-n", &ns.0, "link", "set", dev, "up"]));
        run(Command::new("ip").args(["-n", &ns.0, "link", "set", "lo", "up"]));
    }
    Some((a, b))
}

/// Runs `f` on a thread that has entered `ns`; sockets made there stay there.
fn in_ns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(format!("/var/run/netns/{}", ns.0)).unwrap();
            // SAFETY: a valid namespace fd; setns affects only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    })
}

fn listen(ns: &Netns, addr: &str) -> TcpListener {
    let addr: SocketAddr = addr.parse().unwrap();
    let l = in_ns(ns, || TcpListener::bind(addr).unwrap());
    l.set_nonblocking(true).unwrap();
    l
}

fn connect(ns: &Netns, ip: Ipv4Addr, port: u16, payload: &str) -> TcpStream {
    let mut s = in_ns(ns, || {
        TcpStream::connect_timeout(&SocketAddrV4::new(ip, port).into(), TIMEOUT).unwrap()
    });
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

fn original_dst(s: &TcpStream) -> SocketAddrV4 {
    // SAFETY: zeroed sockaddr_in is a valid value to be overwritten.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: fd is open for the life of `s`; addr/len describe a writable buffer.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_IP,
            libc::SO_ORIGINAL_DST,
            (&mut addr as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    assert_eq!(
        rc,
        0,
        "SO_ORIGINAL_DST: {}",
        std::io::Error::last_os_error()
    );
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
        u16::from_be(addr.sin_port),
    )
}

fn init(ns: &Netns, args: &[&str]) -> Output {
    run(Command::new("ip")
        .args(["netns", "exec", &ns.0, BIN, "init"])
        .args(args))
}

/// The nat table without comments and counters, for comparisons.
fn nat_rules(ns: &Netns) -> String {
    let out = run(Command::new("ip").args(["netns", "exec", &ns.0, "iptables-save", "-t", "nat"]));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(" [").next().unwrap_or(l).to_owned() + "\n")
        .collect()
}

const ARGS: [&str; 6] = [
    "--exclude-inbound-ports",
    "9090",
    "--exclude-outbound-ports",
    "5432",
    "--exclude-outbound-cidrs",
    "10.96.0.0/12",
];

#[test]
fn dry_run_prints_restore_input_without_root() {
    let out = run(Command::new(BIN).args(["init", "--dry-run"]).args(ARGS));
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
    let Some((_a, b)) = pair() else { return };
    let before = nat_rules(&b);
    init(&b, &ARGS);
    let once = nat_rules(&b);
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
        "--uid-owner 1337 -j RETURN",
    ] {
        assert!(once.contains(rule), "{rule} missing:\n{once}");
    }
    init(&b, &ARGS);
    assert_eq!(nat_rules(&b), once, "applying twice changed the rules");

    // Changed flags rebuild the chains rather than adding to them.
    init(&b, &["--exclude-inbound-ports", "7070"]);
    let changed = nat_rules(&b);
    assert!(changed.contains("--dport 7070 -j RETURN") && !changed.contains("--dport 9090"));
    assert_eq!(
        changed.matches("-j STEPMESH_INBOUND").count(),
        1,
        "{changed}"
    );

    init(&b, &["--cleanup"]);
    let after = nat_rules(&b);
    assert!(!after.contains("STEPMESH"), "left behind:\n{after}");
    assert_eq!(after, before);
    init(&b, &["--cleanup"]); // nothing to remove is not an error
}

#[test]
fn connections_are_redirected_except_exclusions_and_proxy_uid() {
    let Some((a, b)) = pair() else { return };
    init(&b, &ARGS);

    let inbound = listen(&b, "0.0.0.0:15006");
    let outbound = listen(&b, "0.0.0.0:15001");
    let app = listen(&b, "0.0.0.0:8080");
    let excluded_in = listen(&b, "0.0.0.0:9090");
    let admin = listen(&b, "0.0.0.0:15020");
    let local = listen(&b, "127.0.0.1:7000");
    let peer = listen(&a, "0.0.0.0:8080");
    let peer_db = listen(&a, "0.0.0.0:5432");

    // Inbound to the app's port lands on 15006 with the original destination.
    let _c = connect(&a, B_IP, 8080, "in-8080");
    let s = accept(&inbound, "in-8080");
    assert_eq!(original_dst(&s), SocketAddrV4::new(B_IP, 8080));
    assert_idle(&app);

    // Excluded inbound port and the admin port reach their listeners directly.
    let _c = connect(&a, B_IP, 9090, "in-9090");
    accept(&excluded_in, "in-9090");
    let _c = connect(&a, B_IP, 15020, "in-admin");
    accept(&admin, "in-admin");
    assert_idle(&inbound);

    // Outbound from the app lands on 15001 with the original destination.
    let _c = connect(&b, A_IP, 8080, "out-8080");
    let s = accept(&outbound, "out-8080");
    assert_eq!(original_dst(&s), SocketAddrV4::new(A_IP, 8080));
    assert_idle(&peer);

    // Excluded outbound port goes straight out; so does loopback.
    let _c = connect(&b, A_IP, 5432, "out-5432");
    accept(&peer_db, "out-5432");
    let _c = connect(&b, Ipv4Addr::LOCALHOST, 7000, "loopback");
    accept(&local, "loopback");
    assert_idle(&outbound);

    // The proxy's own traffic (UID 1337) is never redirected.
    let script = format!("exec 3<>/dev/tcp/{A_IP}/8080 && printf proxy-uid >&3");
    run(Command::new("ip").args([
        "netns",
        "exec",
        &b.0,
        "setpriv",
        "--reuid",
        "1337",
        "--regid",
        "1337",
        "--clear-groups",
        "bash",
        "-c",
        &script,
    ]));
    accept(&peer, "proxy-uid");
    assert_idle(&outbound);
}
