//! Network namespaces for root-only tests: two fresh namespaces joined by a
//! veth pair, commands and threads run inside them, everything deleted on
//! drop (also when the test panics).
//!
//! ```ignore
//! let Some(link) = netns::Link::create("tp", &["iptables-restore"]) else { return };
//! let out = netns::check(link.b.command("iptables-save").args(["-t", "nat"]));
//! let listener = link.b.enter(|| std::net::TcpListener::bind("0.0.0.0:8080").unwrap());
//! ```
#![allow(unsafe_code)] // geteuid(2) and setns(2): the harness only.

use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Why this machine cannot run a namespace test (printed as the skip
/// reason), or `None` when it can: root, `ip`, and every tool of `tools`.
pub fn unsupported(tools: &[&str]) -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (network namespaces, iptables)".into());
    }
    ["ip"]
        .iter()
        .chain(tools)
        .find(|tool| Command::new(tool).arg("--version").output().is_err())
        .map(|tool| format!("{tool} is not installed"))
}

/// Runs `cmd`, panicking with its output unless it succeeds.
pub fn check(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A named network namespace (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Adds the namespace `name`; the error is `ip`'s message.
    pub fn add(name: String) -> Result<Self, String> {
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .map_err(|e| format!("ip netns add: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        Ok(Self { name })
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip netns exec NAME program`: `ip` execs the program in place, so
    /// the child's pid is the program's.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Gives programs started by [`Netns::command`] this `/etc/hosts`
    /// (`ip netns exec` bind-mounts `/etc/netns/NAME/hosts` over it), so a
    /// cluster DNS name can resolve to an address here. Removed on drop.
    pub fn set_hosts(&self, text: &str) -> std::io::Result<()> {
        let dir = format!("/etc/netns/{}", self.name);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(format!("{dir}/hosts"), text)
    }

    /// Runs `f` on a thread that has entered this namespace. Sockets made
    /// there belong to the namespace for their whole life, whichever thread
    /// uses them afterwards.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = std::fs::File::open(format!("/var/run/netns/{}", self.name)).unwrap();
                // SAFETY: a valid namespace fd; setns changes only this thread.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // The hosts file of `set_hosts`, if any.
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.name));
        // Also removes the veth end inside it (and so its peer).
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Two namespaces, A and B, joined by a veth pair `veth-a`/`veth-b`
/// carrying 10.203.0.1/24 (A) and 10.203.0.2/24 (B); loopback up in both.
#[derive(Debug)]
pub struct Link {
    /// Namespace A.
    pub a: Netns,
    /// Namespace B.
    pub b: Netns,
}

impl Link {
    /// A's address on the veth.
    pub const A_IP: Ipv4Addr = Ipv4Addr::new(10, 203, 0, 1);
    /// B's address on the veth.
    pub const B_IP: Ipv4Addr = Ipv4Addr::new(10, 203, 0, 2);
    /// A's veth device.
    pub const A_DEV: &'static str = "veth-a";
    /// B's veth device.
    pub const B_DEV: &'static str = "veth-b";

    /// Fresh namespaces named `<tag>A<pid>x<n>`/`<tag>B...` (unique per
    /// process and call), or `None` after printing why this machine cannot
    /// run the test: not root, a tool of `tools` missing, namespaces not
    /// permitted, or no iptables nat table in a namespace.
    pub fn create(tag: &str, tools: &[&str]) -> Option<Self> {
        if let Some(why) = unsupported(tools) {
            eprintln!("skipped: {why}");
            return None;
        }
        static N: AtomicUsize = AtomicUsize::new(0);
        let id = format!(
            "{}x{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let a = match Netns::add(format!("{tag}A{id}")) {
            Ok(a) => a,
            Err(why) => {
                eprintln!("skipped: `ip netns add` is not permitted here: {why}");
                return None;
            }
        };
        let b = Netns::add(format!("{tag}B{id}")).unwrap();
        let nat = b
            .command("iptables")
            .args(["-t", "nat", "-L", "-n"])
            .output();
        if !nat.as_ref().is_ok_and(|o| o.status.success()) {
            eprintln!("skipped: no iptables nat table in a network namespace here: {nat:?}");
            return None;
        }
        check(Command::new("ip").args([
            "link",
            "add",
            Self::A_DEV,
            "netns",
            a.name(),
            "type",
            "veth",
            "peer",
            "name",
            Self::B_DEV,
            "netns",
            b.name(),
        ]));
        for (ns, dev, ip) in [(&a, Self::A_DEV, Self::A_IP), (&b, Self::B_DEV, Self::B_IP)] {
            let cidr = format!("{ip}/24");
            check(Command::new("ip").args(["-n", ns.name(), "addr", "add", &cidr, "dev", dev]));
            check(Command::new("ip").args(["-n", ns.name(), "link", "set", dev, "up"]));
            check(Command::new("ip").args(["-n", ns.name(), "link", "set", "lo", "up"]));
        }
        Some(Self { a, b })
    }
    /// A's IPv6 address on the veth (after [`Link::with_ipv6`]).
    pub const A_IP6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd00, 0x203, 0, 0, 0, 0, 0, 1);
    /// B's IPv6 address on the veth (after [`Link::with_ipv6`]).
    pub const B_IP6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd00, 0x203, 0, 0, 0, 0, 0, 2);

    /// Adds fd00:203::1/64 (A) and fd00:203::2/64 (B) to the veth, or
    /// `None` after printing why not (no ip6tables nat table in B).
    pub fn with_ipv6(self) -> Option<Self> {
        let nat = self
            .b
            .command("ip6tables")
            .args(["-t", "nat", "-L", "-n"])
            .output();
        if !nat.as_ref().is_ok_and(|o| o.status.success()) {
            eprintln!("skipped: no ip6tables nat table in a network namespace here: {nat:?}");
            return None;
        }
        for (ns, dev, ip) in [
            (&self.a, Self::A_DEV, Self::A_IP6),
            (&self.b, Self::B_DEV, Self::B_IP6),
        ] {
            // nodad: usable at once, no duplicate address detection delay.
            let cidr = format!("{ip}/64");
            check(Command::new("ip").args([
                "-n",
                ns.name(),
                "addr",
                "add",
                &cidr,
                "dev",
                dev,
                "nodad",
            ]));
        }
        Some(self)
    }
}

/// Forwards every connection accepted on `listener` (made in any namespace)
/// to `to` (dialled from the root namespace), bytes both ways, on
/// background threads for the rest of the test process.
pub fn relay(listener: std::net::TcpListener, to: std::net::SocketAddr) {
    use std::net::{Shutdown, TcpStream};
    fn pipe(mut from: TcpStream, mut to: TcpStream) {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Write);
    }
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let Ok(upstream) = TcpStream::connect(to) else {
                continue;
            };
            let (c2, u2) = (conn.try_clone().unwrap(), upstream.try_clone().unwrap());
            std::thread::spawn(move || pipe(conn, upstream));
            std::thread::spawn(move || pipe(u2, c2));
        }
    });
}

/// `bin`, or a copy of it in `dir` owned by `uid` when `uid` cannot run the
/// built one (a build tree under /root, say).
pub fn runnable_by(uid: u32, bin: &std::path::Path, dir: &std::path::Path) -> std::path::PathBuf {
    let id = uid.to_string();
    let runnable = Command::new("setpriv")
        .args(["--reuid", &id, "--regid", &id, "--clear-groups"])
        .arg(bin)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if runnable {
        return bin.to_owned();
    }
    let copy = dir.join(bin.file_name().unwrap());
    std::fs::copy(bin, &copy).unwrap();
    std::os::unix::fs::chown(&copy, Some(uid), Some(uid)).unwrap();
    copy
}
