//! Child processes that cannot outlive their owner: output to a log file,
//! killed and reaped on drop, readiness polled on an admin `/ready`.
//! Used by `stepmesh demo` and by the end-to-end benchmark.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Why a child could not be started or did not become ready.
#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    /// The log file or the process could not be created.
    #[error("starting {name}: {source}")]
    Spawn {
        /// The child's name.
        name: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The process ended before it was ready (or while it was needed).
    #[error("{name} exited ({status}); last log lines:\n{log}")]
    Exited {
        /// The child's name.
        name: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// The tail of its log.
        log: String,
    },
    /// `/ready` did not answer 200 in time.
    #[error("{name} not ready after {timeout:?}; last log lines:\n{log}")]
    NotReady {
        /// The child's name.
        name: String,
        /// How long we waited.
        timeout: Duration,
        /// The tail of its log.
        log: String,
    },
}

/// A child process killed (SIGKILL) and reaped when dropped, so neither a
/// failure nor Ctrl-C leaves it running.
pub struct Child {
    name: String,
    child: std::process::Child,
    started: Instant,
    log: PathBuf,
}

impl Child {
    /// Spawns `cmd` with stdin closed and stdout + stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Child, ChildError> {
        let spawn_err = |source| ChildError::Spawn {
            name: name.to_owned(),
            source,
        };
        let out = File::create(log).map_err(spawn_err)?;
        let err = out.try_clone().map_err(spawn_err)?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let started = Instant::now();
        let child = cmd.spawn().map_err(spawn_err)?;
        Ok(Child {
            name: name.to_owned(),
            child,
            started,
            log: log.to_owned(),
        })
    }

    /// The child's name, as given to `spawn`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The file its output goes to.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything it has written so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last 15 lines of its output.
    pub fn log_tail(&self) -> String {
        let text = self.log();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// An error if the process has exited.
    pub fn check_alive(&mut self) -> Result<(), ChildError> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(ChildError::Exited {
                name: self.name.clone(),
                status,
                log: self.log_tail(),
            }),
            _ => Ok(()),
        }
    }

    /// Polls `GET /ready` on `admin` every millisecond until it answers
    /// 200; returns the time since the process was spawned.
    pub async fn wait_ready(
        &mut self,
        admin: SocketAddr,
        timeout: Duration,
    ) -> Result<Duration, ChildError> {
        let deadline = Instant::now() + timeout;
        loop {
            if http_status(admin, "/ready").await == Some(200) {
                return Ok(self.started.elapsed());
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                let name = self.name.clone();
                return Err(ChildError::NotReady {
                    name,
                    timeout,
                    log: self.log_tail(),
                });
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        // Already exited is fine; a failed kill leaves nothing to clean up.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The status code of a plain-HTTP `GET path`, or None if nothing answers.
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

/// A free loopback address: bound, read and released, for a child to bind
/// a moment later (the children take addresses only on their command line).
/// Never one this process was given before: the kernel may hand the port
/// just released to the next bind, and two children told the same address
/// fail (a benchmark run did: a sidecar's admin and outbound listeners).
pub fn free_port() -> std::io::Result<SocketAddr> {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    for _ in 0..64 {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let mut given = GIVEN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if given.insert(addr.port()) {
            return Ok(addr);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no loopback port this process was not given before, in 64 tries",
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    /// However the kernel picks ports, no address is handed out twice.
    #[test]
    fn free_ports_are_never_given_twice() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..500 {
            let port = super::free_port().unwrap().port();
            assert!(seen.insert(port), "port {port} given twice");
        }
    }
}
