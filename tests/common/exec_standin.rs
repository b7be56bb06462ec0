//! The far end for `kubectl exec`/`attach`/`port-forward` tests: the Python
//! STAND-IN for the API server's exec endpoints (`tests/python/exec_standin.py`
//! with `exec_standin_spdy.py` and `exec_standin_command.py`, Python stdlib
//! only; its docstring lists the protocols, commands and log lines; every
//! request's `Impersonate-*` headers and a token fingerprint are logged, for
//! assertions on what a gateway sent upstream), started with
//! a test CA and server certificate made here with rcgen, killed on drop; and
//! a runner for a real kubectl pointed at any server (the stand-in itself, or
//! `stepmesh gateway serve` in front of it).
//!
//! ```ignore
//! #[path = "common/exec_standin.rs"]
//! mod exec_standin;
//! use exec_standin::{kubectl, ExecStandin, KubectlTarget, Transport};
//!
//! let Some(kubectl) = kubectl() else { return }; // prints why it skips
//! let standin = ExecStandin::start();            // standin.port, standin.ca_file
//! let target = standin.target();                 // or KubectlTarget::token(gateway_url, gateway_ca, tok)
//! let run = exec_stdin(&kubectl, &target, Transport::Spdy, &["cat"], &input);
//! assert_eq!(run.stdout, input);
//! let session = standin.wait_session(0);         // what the far end saw: transport, protocol, bytes
//! ```

#![allow(dead_code, clippy::unwrap_used)] // shared by several test crates; tests may panic

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long one kubectl run may take before the test kills it and fails.
pub const KUBECTL_TIMEOUT: Duration = Duration::from_secs(90);

/// The Python stand-in, serving HTTPS on 127.0.0.1; killed on drop.
pub struct ExecStandin {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// PEM of the CA that signed its certificate (for `127.0.0.1` and `localhost`).
    pub ca_file: PathBuf,
    child: Child,
    dir: tempfile::TempDir,
    logs: Arc<Mutex<Vec<String>>>,
}

impl ExecStandin {
    /// Starts `python3 tests/python/exec_standin.py` with a fresh CA and certificate.
    pub fn start() -> ExecStandin {
        let dir = tempfile::tempdir().unwrap();
        let (ca_pem, cert_pem, key_pem) = test_tls();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca_pem).unwrap();
        std::fs::write(dir.path().join("cert.pem"), cert_pem).unwrap();
        write_private(&dir.path().join("key.pem"), &key_pem);
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/exec_standin.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(dir.path().join("cert.pem"))
            .arg(dir.path().join("key.pem"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 is needed for the exec stand-in");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok());
        let Some(port) = port else {
            let _ = child.kill();
            std::thread::sleep(Duration::from_millis(200));
            panic!(
                "exec_standin.py printed {line:?}; stderr:\n{}",
                logs.lock().unwrap().join("\n")
            );
        };
        ExecStandin {
            port,
            ca_file,
            child,
            dir,
            logs,
        }
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// kubectl straight at the stand-in, with bearer token `t`.
    pub fn target(&self) -> KubectlTarget {
        KubectlTarget::token(&self.url(), &self.ca_file, "t")
    }

    /// Every log line so far (JSON, one per request, session or error).
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Parsed log lines with `"event": event`.
    pub fn events(&self, event: &str) -> Vec<serde_json::Value> {
        self.logs()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["event"] == event)
            .collect()
    }

    /// Waits for session number `index` (0-based, in the order they ended):
    /// transport, protocol, command, stdin bytes and sha256, stdout bytes.
    pub fn wait_session(&self, index: usize) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.events("session").into_iter().nth(index) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "no session #{index} in the stand-in's log:\n{}",
                self.logs().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ExecStandin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A CA, and a certificate it signed for 127.0.0.1 and localhost: (ca, cert, key) PEM.
fn test_tls() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "stepmesh test exec stand-in CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let names = vec!["127.0.0.1".to_owned(), "localhost".to_owned()];
    let mut leaf = rcgen::CertificateParams::new(names).unwrap();
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, "exec-standin.test");
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

fn write_private(path: &Path, pem: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(pem.as_bytes()).unwrap();
}

/// The kubectl to test with: `$KUBEBUILDER_ASSETS/kubectl`, else `kubectl` on
/// PATH; `None` (after printing why, for a skipping test) when there is none.
pub fn kubectl() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("KUBEBUILDER_ASSETS") {
        let k = Path::new(&dir).join("kubectl");
        if k.is_file() {
            return Some(k);
        }
        println!(
            "KUBEBUILDER_ASSETS has no kubectl ({}); trying PATH",
            k.display()
        );
    }
    let on_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("kubectl"))
            .find(|k| k.is_file())
    });
    if on_path.is_none() {
        println!("skipped: no kubectl (set KUBEBUILDER_ASSETS, see ../shared/envtest/install.sh)");
    }
    on_path
}

/// The transports `kubectl` can be made to use: SPDY always; WebSocket from
/// 1.31 on (exec and port-forward over WebSocket on by default there); for an
/// older kubectl, prints that the WebSocket half is skipped.
pub fn transports(kubectl: &Path) -> Vec<Transport> {
    let out = Command::new(kubectl)
        .args(["version", "--client", "-o", "json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let minor = v["clientVersion"]["minor"].as_str().unwrap_or("");
    let digits: String = minor.chars().take_while(char::is_ascii_digit).collect();
    let version = (v["clientVersion"]["major"].as_str(), digits.parse::<u32>());
    if let (Some("1"), Ok(minor)) = version {
        if minor >= 31 {
            return Transport::ALL.to_vec();
        }
    }
    println!("WebSocket half skipped: kubectl {minor:?} is older than 1.31 or unknown");
    vec![Transport::Spdy]
}

/// How kubectl carries exec/attach/port-forward streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// WebSocket (`v5.channel.k8s.io`; port-forward `SPDY/3.1+portforward.k8s.io`).
    /// kubectl falls back to SPDY if the upgrade fails: check the far end's log.
    WebSocket,
    /// SPDY/3.1 (`KUBECTL_REMOTE_COMMAND_WEBSOCKETS=false`).
    Spdy,
}

impl Transport {
    /// Both, for tests that run each.
    pub const ALL: [Transport; 2] = [Transport::WebSocket, Transport::Spdy];

    fn env(self) -> &'static str {
        match self {
            Transport::WebSocket => "true",
            Transport::Spdy => "false",
        }
    }

    /// The `transport` field the stand-in logs for a session.
    pub fn logged_as(self) -> &'static str {
        match self {
            Transport::WebSocket => "websocket",
            Transport::Spdy => "spdy",
        }
    }
}

/// Where kubectl connects and how it authenticates.
pub struct KubectlTarget {
    /// `https://host:port` of the server (stand-in or gateway).
    pub server: String,
    /// The CA that signed the server's certificate.
    pub ca_file: PathBuf,
    /// Credential flags: `--token T`, or `--kubeconfig F` with an exec plugin.
    pub auth: Vec<String>,
}

impl KubectlTarget {
    /// A target authenticated with a static bearer token.
    pub fn token(server: &str, ca_file: &Path, token: &str) -> KubectlTarget {
        KubectlTarget {
            server: server.to_owned(),
            ca_file: ca_file.to_owned(),
            auth: vec!["--token".to_owned(), token.to_owned()],
        }
    }
}

/// One finished kubectl process.
pub struct KubectlRun {
    /// Exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: String,
    /// From spawn to exit, discovery and pod lookup included.
    pub elapsed: Duration,
}

/// Builds `kubectl --server .. --certificate-authority .. AUTH ARGS`, isolated
/// from any user kubeconfig, with `transport` chosen by kubectl's env switches.
pub fn kubectl_command(
    kubectl: &Path,
    target: &KubectlTarget,
    transport: Transport,
    cache_dir: &Path,
) -> Command {
    let mut cmd = Command::new(kubectl);
    cmd.arg("--server")
        .arg(&target.server)
        .arg("--certificate-authority")
        .arg(&target.ca_file)
        .arg("--cache-dir")
        .arg(cache_dir)
        .args(&target.auth)
        .env("KUBECONFIG", cache_dir.join("no-kubeconfig"))
        .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", transport.env())
        .env("KUBECTL_PORT_FORWARD_WEBSOCKETS", transport.env());
    cmd
}

/// Runs kubectl with `args` (e.g. `["exec", "-i", "-n", "ns", "pod", "--", "cat"]`),
/// feeding `stdin` from a thread and closing it; kills it after [`KUBECTL_TIMEOUT`].
pub fn run_kubectl(
    kubectl: &Path,
    target: &KubectlTarget,
    transport: Transport,
    args: &[&str],
    stdin: &[u8],
) -> KubectlRun {
    let input = stdin.to_vec();
    // A broken pipe is fine: commands like `echo` do not read stdin.
    let feed = move |mut pipe: ChildStdin| drop(pipe.write_all(&input));
    run_kubectl_feeding(kubectl, target, transport, args, feed)
}

/// As [`run_kubectl`], with stdin written by `feed` on its own thread (for
/// input that arrives slowly); kubectl sees EOF when `feed` drops the pipe.
pub fn run_kubectl_feeding(
    kubectl: &Path,
    target: &KubectlTarget,
    transport: Transport,
    args: &[&str],
    feed: impl FnOnce(ChildStdin) + Send,
) -> KubectlRun {
    std::thread::scope(|scope| run_feeding_in(scope, kubectl, target, transport, args, feed))
}

fn run_feeding_in<'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    kubectl: &Path,
    target: &KubectlTarget,
    transport: Transport,
    args: &[&str],
    feed: impl FnOnce(ChildStdin) + Send + 'scope,
) -> KubectlRun {
    let cache = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut child = kubectl_command(kubectl, target, transport, cache.path())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pipe = child.stdin.take().unwrap();
    let writer = scope.spawn(move || feed(pipe));
    let stdout = reader(child.stdout.take().unwrap());
    let stderr = reader(child.stderr.take().unwrap());
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > KUBECTL_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            let err = String::from_utf8_lossy(&stderr.join().unwrap()).into_owned();
            panic!("kubectl {args:?} still running after {KUBECTL_TIMEOUT:?}; stderr:\n{err}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let elapsed = started.elapsed();
    writer.join().unwrap();
    KubectlRun {
        code: status.code(),
        stdout: stdout.join().unwrap(),
        stderr: String::from_utf8_lossy(&stderr.join().unwrap()).into_owned(),
        elapsed,
    }
}

fn reader(mut from: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        from.read_to_end(&mut buf).unwrap();
        buf
    })
}

/// `kubectl exec -i -n ns pod -- COMMAND` with `stdin` fed in: the call the
/// gateway tests make through the gateway.
pub fn exec_stdin(
    kubectl: &Path,
    target: &KubectlTarget,
    transport: Transport,
    command: &[&str],
    stdin: &[u8],
) -> KubectlRun {
    let mut args = vec!["exec", "-i", "-n", "ns", "pod", "--"];
    args.extend_from_slice(command);
    run_kubectl(kubectl, target, transport, &args, stdin)
}

/// `kubectl exec -i -- cat` with `n` pseudo-random bytes (seed `n`): returns
/// what was sent and the run, for a byte-exact comparison of `run.stdout`.
pub fn exec_cat_round_trip(
    kubectl: &Path,
    target: &KubectlTarget,
    transport: Transport,
    n: usize,
) -> (Vec<u8>, KubectlRun) {
    let input = random_bytes(n, n as u64);
    let run = exec_stdin(kubectl, target, transport, &["cat"], &input);
    (input, run)
}

/// `n` pseudo-random bytes (fastrand, seeded from `seed`).
pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut out = vec![0u8; n];
    rng.fill(&mut out);
    out
}

/// Lowercase hex SHA-256, as the stand-in logs `stdin_sha256`.
pub fn sha256_hex(data: &[u8]) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A running `kubectl port-forward -n ns pod 0:REMOTE`; killed on drop.
pub struct PortForward {
    /// The local port kubectl listens on.
    pub local_port: u16,
    child: Child,
    _cache: tempfile::TempDir,
}

impl PortForward {
    /// Starts kubectl and waits for its `Forwarding from 127.0.0.1:N` line.
    pub fn start(
        kubectl: &Path,
        target: &KubectlTarget,
        transport: Transport,
        remote: u16,
    ) -> PortForward {
        let cache = tempfile::tempdir().unwrap();
        let mut child = kubectl_command(kubectl, target, transport, cache.path())
            .args(["port-forward", "-n", "ns", "pod", "--address", "127.0.0.1"])
            .arg(format!("0:{remote}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        // Keep draining: kubectl prints a line per connection and dies of
        // EPIPE if nobody reads them.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        let port = line
            .split("127.0.0.1:")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|p| p.parse().ok());
        let Some(local_port) = port else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kubectl port-forward printed {line:?}");
        };
        PortForward {
            local_port,
            child,
            _cache: cache,
        }
    }

    /// One TCP connection through the forward: sends `data`, half-closes,
    /// returns everything read back until EOF.
    pub fn round_trip(&self, data: &[u8]) -> Vec<u8> {
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", self.local_port)).unwrap();
        conn.set_read_timeout(Some(KUBECTL_TIMEOUT)).unwrap();
        let mut writer = conn.try_clone().unwrap();
        let input = data.to_vec();
        let sender = std::thread::spawn(move || {
            writer.write_all(&input).unwrap();
            writer.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let mut back = Vec::new();
        conn.read_to_end(&mut back).unwrap();
        sender.join().unwrap();
        back
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
