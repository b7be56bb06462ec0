//! Child processes of the benchmark: spawned with their output in log
//! files, killed when dropped, observed through /proc (CPU time, RSS).

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A child process that is killed (and reaped) when dropped, so a failed or
/// interrupted run leaves nothing behind.
pub struct Proc {
    /// What the process is, for messages ("inbound sidecar").
    pub name: String,
    child: Child,
    /// When `spawn` returned: the start of "time to ready".
    pub started: Instant,
    log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr going to `<log_dir>/<name>.log`.
    pub fn spawn(name: &str, mut cmd: Command, log_dir: &Path) -> anyhow::Result<Proc> {
        let log = log_dir.join(format!("{}.log", name.replace(' ', "-")));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("duplicating the log file handle")?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let started = Instant::now();
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {name}: {cmd:?}"))?;
        Ok(Proc {
            name: name.to_owned(),
            child,
            started,
            log,
        })
    }

    /// Wraps an already spawned child (the backend, whose stdout we read).
    pub fn adopt(name: &str, child: Child, log: PathBuf) -> Proc {
        Proc {
            name: name.to_owned(),
            child,
            started: Instant::now(),
            log,
        }
    }

    /// The process id, for /proc readings.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the tail of the log if the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait().context("polling a child")? {
            bail!(
                "{} exited ({status}); last log lines:\n{}",
                self.name,
                self.log_tail()
            );
        }
        Ok(())
    }

    /// The last lines of the process's log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Polls `GET /ready` on `admin` every millisecond until it answers 200;
    /// returns the time since spawn.
    pub async fn wait_ready(
        &mut self,
        admin: SocketAddr,
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        let deadline = Instant::now() + timeout;
        loop {
            if http_status(admin, "/ready").await == Some(200) {
                return Ok(self.started.elapsed());
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                bail!(
                    "{} not ready after {timeout:?}; last log lines:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// CPU time (user + system, all threads, including exited ones) so far.
    pub fn cpu(&self) -> anyhow::Result<Duration> {
        cpu_time(self.pid())
    }

    /// Current and peak resident set size.
    pub fn memory(&self) -> anyhow::Result<Memory> {
        memory(self.pid())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Already exited is fine; a kill error has nothing left to clean.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of a process, in bytes.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Memory {
    /// VmRSS: resident now.
    pub rss: u64,
    /// VmHWM: the peak resident set since start.
    pub hwm: u64,
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

/// The status code of `GET path` on a plain-HTTP admin endpoint, or None if
/// it does not answer (yet).
pub async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let fetch = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(req.as_bytes()).await.ok()?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.ok()?;
        std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(2), fetch)
        .await
        .ok()
        .flatten()
}

/// A free loopback port: bound, read and released. The sidecar binds it a
/// moment later; on a quiet loopback nothing else takes it in between.
pub fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

/// Raises this process's open-file limit (inherited by every child), so the
/// idle-connections scenario can hold tens of thousands of sockets. Uses
/// util-linux `prlimit`; returns the soft limit in force afterwards.
pub fn raise_nofile(want: u64) -> u64 {
    let pid = std::process::id().to_string();
    let limit = format!("--nofile={want}:{want}");
    let _ = Command::new("prlimit")
        .args(["--pid", &pid, &limit])
        .output();
    let out = Command::new("prlimit")
        .args([
            "--pid",
            &pid,
            "--nofile",
            "--raw",
            "--noheadings",
            "--output=SOFT",
        ])
        .output();
    out.ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024)
}
