//! Packet capture for namespace tests: tcpdump inside a network namespace,
//! the pcap streamed into memory, searched for byte strings. A capture
//! that dropped packets proves nothing, so [`Capture::stop`] refuses one.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;

use super::mesh::eventually;
use super::netns::{check, Netns};

/// tcpdump on one interface of a namespace, the pcap streamed into memory.
pub struct Capture {
    child: Child,
    pcap: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    reader: Option<thread::JoinHandle<()>>,
}

impl Capture {
    /// Starts capturing TCP on `dev` and waits until tcpdump says it listens.
    /// The 64 MiB ring (`-B`, in KiB) holds the whole test's traffic, so a
    /// busy machine that is slow to run tcpdump does not make it drop.
    pub fn start(ns: &Netns, dev: &str) -> Self {
        let mut child = ns
            .command("tcpdump")
            .args(["-i", dev, "-n", "-U", "--immediate-mode", "-B", "65536"])
            .args(["-s", "0", "-w", "-", "tcp"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = collect_lines(child.stderr.take().unwrap(), Some("[tcpdump]".into()));
        let mut stdout = child.stdout.take().unwrap();
        let pcap = Arc::new(Mutex::new(Vec::new()));
        let sink = pcap.clone();
        let reader = thread::spawn(move || {
            let mut buf = vec![0; 64 << 10];
            while let Ok(n @ 1..) = stdout.read(&mut buf) {
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        let mut capture = Self {
            child,
            pcap,
            stderr,
            reader: Some(reader),
        };
        eventually("tcpdump to listen", || {
            if let Some(status) = capture.child.try_wait().unwrap() {
                panic!(
                    "tcpdump exited: {status}: {:?}",
                    capture.stderr.lock().unwrap()
                );
            }
            capture.stderr_line("listening on").map(|_| ())
        });
        capture
    }

    fn stderr_line(&self, pattern: &str) -> Option<String> {
        let lines = self.stderr.lock().unwrap();
        lines.iter().find(|l| l.contains(pattern)).cloned()
    }

    /// Waits until `needle` shows up in the captured bytes.
    pub fn wait_for(&self, needle: &[u8]) {
        eventually("the marker in the capture", || {
            find_bytes(&self.pcap.lock().unwrap(), needle).map(|_| ())
        });
    }

    /// Stops tcpdump (SIGINT: it flushes and prints its statistics) and
    /// returns the whole pcap, asserting the kernel dropped no packet: a
    /// dropped packet could have held the plaintext we look for.
    pub fn stop(mut self) -> Vec<u8> {
        check(Command::new("kill").args(["-INT", &self.child.id().to_string()]));
        let _ = self.child.wait();
        if let Some(reader) = self.reader.take() {
            reader.join().unwrap();
        }
        let dropped = eventually("tcpdump's statistics", || {
            self.stderr_line("packets dropped by kernel")
        });
        assert!(
            dropped.starts_with("0 "),
            "the capture is incomplete, nothing can be concluded from it: {dropped}"
        );
        std::mem::take(&mut *self.pcap.lock().unwrap())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Lines of `pipe`, collected by a thread (and echoed to stderr after
/// `echo`, when given, for `--nocapture` runs).
pub fn collect_lines(
    pipe: impl Read + Send + 'static,
    echo: Option<String>,
) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if let Some(prefix) = &echo {
                eprintln!("{prefix} {line}");
            }
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

/// Where `needle` first occurs in `haystack`.
pub fn find_bytes(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
