//! Child processes of the benchmark, observed through /proc (CPU time, RSS).

use std::process::Command;
use std::time::Duration;

use anyhow::Context;

/// The child processes: the demo's kill-on-drop children.
pub use stepmesh::demo::child::{free_port, Child as Proc};

/// CPU time of a child so far.
pub fn cpu(proc: &Proc) -> anyhow::Result<Duration> {
    cpu_time(proc.pid())
}

/// Current and peak resident memory of a child.
pub fn mem(proc: &Proc) -> anyhow::Result<Memory> {
    memory(proc.pid())
}

/// Resident memory of a process, in bytes.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Memory {
    /// VmRSS: resident now.
    pub rss: u64,
    /// VmHWM: the peak resident set since start.
    pub hwm: u64,
    /// RssAnon: the private part of `rss` (heap and stacks; the rest is
    /// the binary's pages, shared with every process mapping them).
    pub anon: u64,
}

/// Reads VmRSS and VmHWM from /proc/PID/status.
pub fn memory(pid: u32) -> anyhow::Result<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .context("reading /proc/PID/status")?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        let kib: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .with_context(|| format!("bad {name} line {line:?}"))?;
        Ok(kib * 1024)
    };
    Ok(Memory {
        rss: field("VmRSS:")?,
        hwm: field("VmHWM:")?,
        anon: field("RssAnon:")?,
    })
}

/// utime + stime of /proc/PID/stat, converted from clock ticks.
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).context("reading /proc/PID/stat")?;
    // The command name (field 2) may hold spaces; fields after its ')' are fixed.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let ticks: u64 = fields
        .get(11..13)
        .context("short /proc/PID/stat")?
        .iter()
        .map(|f| f.parse::<u64>())
        .sum::<Result<u64, _>>()
        .context("bad utime/stime")?;
    Ok(Duration::from_nanos(ticks * 1_000_000_000 / clock_ticks()))
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on every Linux we know).
fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}

/// Raises this process's open-file limit (inherited by every child started
/// afterwards), so the idle-connections scenario can hold tens of thousands
/// of sockets. Uses util-linux `prlimit`; without CAP_SYS_RESOURCE the hard
/// limit cannot move, and the soft limit is raised to it. Never lowers
/// it. Returns the soft limit in force afterwards (at least `want` when it
/// already was).
pub fn raise_nofile(want: u64) -> u64 {
    let pid = std::process::id().to_string();
    let read = |which: &str| -> Option<u64> {
        let out = Command::new("prlimit")
            .args(["--pid", &pid, "--nofile", "--raw", "--noheadings"])
            .arg(format!("--output={which}"))
            .output()
            .ok()?;
        String::from_utf8(out.stdout).ok()?.trim().parse().ok()
    };
    let set = |soft: u64, hard: u64| {
        Command::new("prlimit")
            .args(["--pid", &pid, &format!("--nofile={soft}:{hard}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if let Some(soft) = read("SOFT").filter(|soft| *soft >= want) {
        return soft;
    }
    if !set(want, want) {
        if let Some(hard) = read("HARD") {
            set(want.min(hard), hard);
        }
    }
    read("SOFT").unwrap_or(1024)
}

/// Open descriptors of a process (entries of /proc/PID/fd).
pub fn fds(pid: u32) -> anyhow::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| {
            format!(
                "listing /proc/{pid}/fd (stepmesh is not dumpable: needs root or CAP_SYS_PTRACE)"
            )
        })?
        .count())
}

/// The soft open-file limit of a process ("Max open files" in
/// /proc/PID/limits), None if unreadable or unlimited.
pub fn nofile_limit(pid: u32) -> Option<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// "fds/limit" of a process, for error messages about descriptor exhaustion.
pub fn fd_usage(pid: u32) -> String {
    let used = fds(pid).map_or_else(|_| "?".to_owned(), |n| n.to_string());
    let limit = nofile_limit(pid).map_or_else(|| "?".to_owned(), |n| n.to_string());
    format!("{used}/{limit}")
}
