//! A real `stepmesh ca serve` process for tests: temp state dir, a
//! join-tokens file, free ports chosen by the CA itself (it binds
//! 127.0.0.1:0 and logs the addresses as JSON, which we read back).
//!
//! ```ignore
//! let ca = CaProcess::start("cluster.local", &[("tok-web", "spiffe://cluster.local/ns/default/sa/web")]);
//! let svid = ca.issue("tok-web").await;        // an IssuedSvid from the real CA
//! // ca.grpc_addr, ca.admin_addr, ca.bundle_path, ca.bundle_pem, ca.logs()
//! ```

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use stepmesh_ca::client::{CaClient, Credential, IssuedSvid};

/// How long a CA may take to start on a loaded machine.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running CA process; killed on drop.
pub struct CaProcess {
    /// The gRPC (TLS) address.
    pub grpc_addr: SocketAddr,
    /// The admin address (/healthz, /ready, /metrics).
    pub admin_addr: SocketAddr,
    /// The trust domain.
    pub trust_domain: String,
    /// `<state-dir>/bundle.pem`.
    pub bundle_path: PathBuf,
    /// Its contents at start.
    pub bundle_pem: String,
    /// The state dir (kept when the process restarts).
    pub state_dir: PathBuf,
    /// The join-tokens file.
    pub join_tokens_path: PathBuf,
    // Owns the temp dir; `None` when the caller gave the state dir.
    _tmp: Option<Arc<tempfile::TempDir>>,
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
}

impl CaProcess {
    /// A CA for `trust_domain` accepting the `(token, spiffe-id)` join tokens.
    pub fn start(trust_domain: &str, tokens: &[(&str, &str)]) -> Self {
        Self::start_with(trust_domain, tokens, &[])
    }

    /// As [`CaProcess::start`], with extra `ca serve` flags.
    pub fn start_with(trust_domain: &str, tokens: &[(&str, &str)], extra: &[&str]) -> Self {
        let tmp = Arc::new(tempfile::tempdir().unwrap());
        let state = tmp.path().join("state");
        let join = tmp.path().join("join-tokens");
        let text: String = tokens.iter().map(|(t, id)| format!("{t} {id}\n")).collect();
        std::fs::write(&join, format!("# test tokens\n{text}")).unwrap();
        let mut ca = Self::spawn(trust_domain, &state, &join, extra);
        ca._tmp = Some(tmp);
        ca
    }

    /// A CA verifying bearer tokens by TokenReview at `url` (an API server
    /// trusted through `ca_pem`), asking with `own_token`; its files in
    /// `dir`.
    pub fn start_reviewing(
        trust_domain: &str,
        url: &str,
        dir: &Path,
        ca_pem: &str,
        own_token: &str,
    ) -> Self {
        let ca_file = dir.join("api-ca.pem");
        let token_file = dir.join("token");
        std::fs::write(&ca_file, ca_pem).unwrap();
        std::fs::write(&token_file, format!("{own_token}\n")).unwrap();
        let args = [
            "--k8s-tokenreview",
            url,
            "--k8s-tokenreview-ca",
            ca_file.to_str().unwrap(),
            "--k8s-tokenreview-token-file",
            token_file.to_str().unwrap(),
        ];
        Self::start_with(trust_domain, &[], &args)
    }

    /// Starts a CA on an existing state dir and join-tokens file.
    pub fn spawn(trust_domain: &str, state_dir: &Path, join_tokens: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_stepmesh"))
            .args(["--log-format", "json", "ca", "serve"])
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(["--trust-domain", trust_domain])
            .arg("--state-dir")
            .arg(state_dir)
            .arg("--join-tokens")
            .arg(join_tokens)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning stepmesh ca serve");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if v["message"] == "CA serving" {
                        let _ = tx.send((
                            v["grpc"].as_str().unwrap().to_owned(),
                            v["admin"].as_str().unwrap().to_owned(),
                        ));
                    }
                }
                sink.lock().unwrap().push(line);
            }
        });
        let (grpc, admin) = match rx.recv_timeout(START_TIMEOUT) {
            Ok(addrs) => addrs,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().ok();
                panic!(
                    "CA did not start within {START_TIMEOUT:?} (exit {status:?}); logs:\n{}",
                    logs.lock().unwrap().join("\n")
                );
            }
        };
        let bundle_path = state_dir.join("bundle.pem");
        let bundle_pem = std::fs::read_to_string(&bundle_path).unwrap();
        Self {
            grpc_addr: grpc.parse().unwrap(),
            admin_addr: admin.parse().unwrap(),
            trust_domain: trust_domain.to_owned(),
            bundle_path,
            bundle_pem,
            state_dir: state_dir.to_owned(),
            join_tokens_path: join_tokens.to_owned(),
            _tmp: None,
            child,
            logs,
        }
    }

    /// Stops this process and starts another on the same state dir and tokens.
    pub fn restart(mut self, extra: &[&str]) -> Self {
        self.stop();
        let mut next = Self::spawn(
            &self.trust_domain,
            &self.state_dir,
            &self.join_tokens_path,
            extra,
        );
        next._tmp = self._tmp.take();
        next
    }

    /// Kills the process and waits for it.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// [`enrol_args`] for this CA: its address, bundle and trust domain.
    pub fn enrol_args(&self, dir: &Path, token: &str, ttl: Option<&str>) -> Vec<String> {
        let addr = self.grpc_host_port();
        enrol_args(
            &addr,
            &self.bundle_path,
            &self.trust_domain,
            dir,
            token,
            ttl,
        )
    }

    /// The process's resident memory, in KiB (Linux `/proc`).
    pub fn rss_kib(&self) -> u64 {
        rss_kib_of(self.child.id())
    }

    /// The gRPC address as `localhost:<port>`, the name its certificate carries.
    pub fn grpc_host_port(&self) -> String {
        format!("localhost:{}", self.grpc_addr.port())
    }

    /// Every log line so far (JSON).
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Audit lines so far (target `stepmesh_ca::audit`), parsed.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        self.logs()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "stepmesh_ca::audit")
            .collect()
    }

    /// Waits until an audit line matching `pred` appears (logs are read by a thread).
    pub fn wait_audit(&self, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(v) = self.audit().into_iter().find(&pred) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "no matching audit line; logs:\n{}",
                self.logs().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A client of this CA trusting bundle.pem alone.
    pub fn client(&self) -> CaClient {
        CaClient::connect(&self.grpc_host_port(), &self.bundle_pem).unwrap()
    }

    /// An SVID for the identity of join token `token`.
    pub async fn issue(&self, token: &str) -> IssuedSvid {
        self.client()
            .issue(&Credential::Token(token.to_owned()), None)
            .await
            .unwrap()
    }

    /// GET on the admin port; returns (status, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin_addr, path)
    }
}

impl Drop for CaProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `stepmesh proxy` flags enrolling with the CA at `ca_addr` (one address,
/// or several replicas) whose roots are `bundle`, for `trust_domain`, by
/// join token `token` (written to a file in `dir`), asking SVIDs of `ttl`
/// when given.
pub fn enrol_args(
    ca_addr: &str,
    bundle: &Path,
    trust_domain: &str,
    dir: &Path,
    token: &str,
    ttl: Option<&str>,
) -> Vec<String> {
    let token_file = dir.join(format!("{token}.jwt"));
    std::fs::write(&token_file, token).unwrap();
    let mut args: Vec<String> = [
        "--ca",
        ca_addr,
        "--ca-bundle",
        &bundle.display().to_string(),
        "--token-file",
        &token_file.display().to_string(),
        "--trust-domain",
        trust_domain,
    ]
    .map(String::from)
    .to_vec();
    if let Some(ttl) = ttl {
        args.extend(["--svid-ttl".into(), ttl.into()]);
    }
    args
}

/// `stepmesh ca serve` on loopback ports with `--state-dir state_dir` and
/// `args`, for a start that must be refused: its output once it exits.
pub fn serve_refused<A: AsRef<OsStr>>(state_dir: &Path, args: &[A]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stepmesh"))
        .args([
            "ca",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ])
        .arg("--state-dir")
        .arg(state_dir)
        .args(args)
        .output()
        .unwrap()
}

/// A minimal blocking HTTP/1.1 GET (admin endpoints are plain HTTP).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A Sign request for a fresh key, authenticated by bearer `token`.
pub fn sign_request(token: &str) -> tonic::Request<stepmesh_ca::proto::v1::SignRequest> {
    let csr_pem =
        stepmesh_ca::client::make_csr(&rcgen::KeyPair::generate().unwrap(), None).unwrap();
    let mut req = tonic::Request::new(stepmesh_ca::proto::v1::SignRequest {
        csr_pem,
        ttl_seconds: 0,
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

/// Process `pid`'s resident set size now, KiB (from /proc).
pub fn rss_kib_of(pid: u32) -> u64 {
    proc_status(pid, "VmRSS:")
}

/// The first number of a field of /proc/PID/status (`VmRSS:` and
/// `VmHWM:` in KiB, `Uid:` the real UID).
pub fn proc_status(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}
