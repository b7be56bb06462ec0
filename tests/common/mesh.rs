//! Real `stepmesh proxy` processes for tests: SVID files from the testing
//! PKI, spawn with JSON logs, find the bound addresses in the log, admin
//! queries, access-log lines, apps (echo, greeter) on 127.0.0.1:0.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use stepmesh_ca::testing::{Leaf, Pki};

/// Generous deadline for anything a loaded 2-core machine must do.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// TLS handshakes `sidecar` completed as the inbound side: mTLS
/// connections it accepted (from peer sidecars or other clients).
pub fn inbound_handshakes_of(sidecar: &Sidecar) -> f64 {
    sidecar
        .metrics()
        .lines()
        .filter(|l| l.starts_with("stepmesh_tls_handshakes_total{"))
        .filter(|l| l.contains("direction=\"inbound\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Polls `f` until it returns `Some` or `PATIENCE` passes.
pub fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(25));
    }
}

/// SVID files on disk (what `--cert --key --bundle` read).
pub struct SvidFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundle: PathBuf,
}

impl SvidFiles {
    /// Writes `leaf` and the bundle of `pki` under `dir` (key 0600).
    pub fn write(dir: &Path, name: &str, pki: &Pki, leaf: &Leaf) -> Self {
        let files = Self {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
            bundle: dir.join(format!("{name}-bundle.pem")),
        };
        files.replace(leaf);
        atomic_write(&files.bundle, pki.bundle_pem().as_bytes());
        files
    }

    /// Swaps in a new leaf (key first, then cert, each by rename).
    pub fn replace(&self, leaf: &Leaf) {
        atomic_write(&self.key, leaf.key_pem.as_bytes());
        std::fs::set_permissions(&self.key, std::fs::Permissions::from_mode(0o600)).unwrap();
        atomic_write(&self.cert, leaf.chain_pem.as_bytes());
    }

    /// The identity flags for `stepmesh proxy`.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--cert".into(),
            self.cert.display().to_string(),
            "--key".into(),
            self.key.display().to_string(),
            "--bundle".into(),
            self.bundle.display().to_string(),
            "--file-poll-interval".into(),
            "100ms".into(),
        ]
    }
}

/// Write-then-rename, as Kubernetes and cert tools do.
pub fn atomic_write(path: &Path, data: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A running `stepmesh proxy`.
pub struct Sidecar {
    child: Child,
    pub admin: SocketAddr,
    /// Network namespace the sidecar runs in (admin queried through it).
    netns: Option<String>,
    logs: Arc<Mutex<Vec<Value>>>,
    access: Arc<Mutex<Vec<Value>>>,
}

impl Sidecar {
    /// Starts `stepmesh proxy ARGS` (admin on 127.0.0.1:0 unless given) and
    /// waits until the admin address is logged.
    pub fn spawn(args: &[String]) -> Self {
        Self::spawn_wrapped(&[], None, args)
    }

    /// As [`Sidecar::spawn`], under a wrapper command (`ip netns exec NS
    /// setpriv ...`); `netns` names the namespace the admin port lives in.
    pub fn spawn_wrapped(wrapper: &[String], netns: Option<&str>, args: &[String]) -> Self {
        // STEPMESH_BIN points measurements at a release build.
        let bin = std::env::var("STEPMESH_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_stepmesh").to_owned());
        Self::spawn_bin(Path::new(&bin), wrapper, netns, args)
    }

    /// As [`Sidecar::spawn_wrapped`], running the `stepmesh` binary `bin`
    /// (a copy another UID may run: `netns::runnable_by`).
    pub fn spawn_bin(bin: &Path, wrapper: &[String], netns: Option<&str>, args: &[String]) -> Self {
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut cmd = Command::new(first);
                cmd.args(rest).arg(bin);
                cmd
            }
            None => Command::new(bin),
        };
        cmd.arg("--log-format").arg("json").arg("proxy");
        if !args.iter().any(|a| a == "--admin") {
            cmd.args(["--admin", "127.0.0.1:0"]);
        }
        cmd.args(args)
            .env("RUST_LOG", "info,stepmesh=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn stepmesh proxy");
        let logs = collect_json(child.stderr.take().unwrap(), true);
        let access = collect_json(child.stdout.take().unwrap(), false);
        let mut sidecar = Self {
            child,
            admin: "0.0.0.0:0".parse().unwrap(),
            netns: netns.map(str::to_owned),
            logs,
            access,
        };
        let admin = sidecar.wait_log("admin address", |l| {
            (l["message"] == "admin listening")
                .then(|| l["admin"].as_str().unwrap().parse().unwrap())
        });
        sidecar.admin = admin;
        sidecar
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time used so far (user + system), from /proc.
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        // Fields after the command name (which may hold spaces): utime is the
        // 14th field overall, stime the 15th; clock ticks of 1/100 s.
        let rest = stat.rsplit_once(')').unwrap().1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        Duration::from_millis(ticks * 10)
    }

    /// Resident set size now, KiB (from /proc).
    pub fn rss_kib(&self) -> u64 {
        super::ca::rss_kib_of(self.child.id())
    }

    /// Whether the process has exited, and how.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Waits for the process to exit (at most PATIENCE).
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        eventually("the sidecar to exit", || self.try_wait())
    }

    /// Sends a signal (`libc::SIGTERM`, ...).
    pub fn signal(&self, sig: i32) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// The first log line `f` maps to `Some`, waiting for it.
    pub fn wait_log<T>(&self, what: &str, mut f: impl FnMut(&Value) -> Option<T>) -> T {
        eventually(what, || self.logs.lock().unwrap().iter().find_map(&mut f))
    }

    /// Diagnostic log lines so far (stderr).
    pub fn logs(&self) -> Vec<Value> {
        self.logs.lock().unwrap().clone()
    }

    /// Access-log lines so far (stdout).
    pub fn access_log(&self) -> Vec<Value> {
        self.access.lock().unwrap().clone()
    }

    /// Waits for an access-log line matching `f`.
    pub fn wait_access(&self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        eventually(what, || {
            self.access.lock().unwrap().iter().find(|l| f(l)).cloned()
        })
    }

    /// GET on the admin port: (status, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        let Some(ns) = &self.netns else {
            return http_get(self.admin, path);
        };
        let url = format!("http://127.0.0.1:{}{path}", self.admin.port());
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "curl",
                "-s",
                "-o",
                "-",
                "-w",
                "\n%{http_code}",
                &url,
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    }

    /// Waits for `/ready` to say 200.
    pub fn wait_ready(&self) {
        eventually("/ready", || {
            (self.admin_get("/ready").0 == 200).then_some(())
        });
    }

    /// The address of the first listener of `kind` (`inbound`, `outbound`, ...).
    pub fn listener(&self, kind: &str) -> SocketAddr {
        self.wait_log(&format!("{kind} listener"), |l| {
            (l["message"] == "listening" && l["kind"] == kind)
                .then(|| l["listen"].as_str().unwrap().parse().unwrap())
        })
    }

    /// `/metrics` text.
    pub fn metrics(&self) -> String {
        let (status, body) = self.admin_get("/metrics");
        assert_eq!(status, 200);
        body
    }

    /// The value of the sample whose line starts with `series` (name and
    /// labels as rendered), 0 when absent.
    pub fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics(), series)
    }

    /// `/config` as JSON.
    pub fn config(&self) -> Value {
        let (status, body) = self.admin_get("/config");
        assert_eq!(status, 200);
        serde_json::from_str(&body).unwrap()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of the first sample line starting with `series`, 0 if none.
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .map(|v| v.parse().unwrap())
        .unwrap_or(0.0)
}

fn collect_json(pipe: impl Read + Send + 'static, echo: bool) -> Arc<Mutex<Vec<Value>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if echo {
                eprintln!("[sidecar] {line}");
            }
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                sink.lock().unwrap().push(v);
            }
        }
    });
    lines
}

/// A minimal HTTP/1.1 GET (Connection: close): (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut resp = String::new();
    if s.read_to_string(&mut resp).is_err() {
        return (0, String::new());
    }
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// An app that, per connection, reads everything until EOF, then answers
/// with `answer(received)` and closes: proof that half-close works.
pub fn answer_after_eof_server(
    answer: impl Fn(Vec<u8>) -> Vec<u8> + Send + Sync + 'static,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = Arc::new(answer);
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let answer = answer.clone();
            thread::spawn(move || {
                let mut got = Vec::new();
                if conn.read_to_end(&mut got).is_ok() {
                    let _ = conn.write_all(&answer(got));
                }
                let _ = conn.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

/// An app that echoes bytes as they come, until EOF.
pub fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            thread::spawn(move || {
                let mut reader = conn.try_clone().unwrap();
                let _ = std::io::copy(&mut reader, &mut conn);
                let _ = conn.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

/// Opens `n` connections to an echo path and holds them, each proven
/// through by one echoed byte: a control character no HTTP request starts
/// with, so that an outbound side's protocol detection passes it on at
/// once (a letter could start a method: it waits for more bytes, up to
/// the detection's timeout).
pub fn hold(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let mut c = TcpStream::connect(addr).unwrap();
            c.set_read_timeout(Some(PATIENCE)).unwrap();
            c.write_all(&[(i % 8) as u8]).unwrap();
            let mut b = [0u8; 1];
            c.read_exact(&mut b).unwrap();
            c
        })
        .collect()
}

/// An HTTP/1 app answering every request `200 ok` (keep-alive), recording
/// each request line it is given.
pub fn http_ok_app() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let log = log.clone();
            thread::spawn(move || {
                let mut w = conn.try_clone().unwrap();
                let mut r = BufReader::new(conn);
                let mut first = true;
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if first {
                        log.lock().unwrap().push(line.trim().to_owned());
                    }
                    first = line == "\r\n";
                    if first
                        && w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                            .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// Sends `data`, half-closes, returns everything read back.
pub fn roundtrip(addr: SocketAddr, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(PATIENCE))?;
    s.set_nodelay(true)?;
    let mut writer = s.try_clone()?;
    let data = data.to_vec();
    let sender = thread::spawn(move || -> std::io::Result<()> {
        writer.write_all(&data)?;
        writer.shutdown(Shutdown::Write)
    });
    let mut back = Vec::new();
    let read = s.read_to_end(&mut back);
    sender.join().unwrap()?;
    read?;
    Ok(back)
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut out = vec![0; len];
    rng.fill(&mut out);
    out
}

/// A two-sidecar mesh: app client → outbound sidecar → mTLS → inbound
/// sidecar → `app`.
pub struct Mesh {
    pub pki: Pki,
    pub dir: tempfile::TempDir,
    pub server: Sidecar,
    pub client: Sidecar,
    pub server_files: SvidFiles,
    pub client_files: SvidFiles,
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
}

/// IDs the mesh's two sidecars run as.
pub const SERVER_ID: &str = "spiffe://mesh.test/ns/shop/sa/db";
pub const CLIENT_ID: &str = "spiffe://mesh.test/ns/shop/sa/api";

impl Mesh {
    /// Starts both sidecars; `server_extra`/`client_extra` add flags.
    pub fn start(app: SocketAddr, server_extra: &[String], client_extra: &[String]) -> Self {
        Self::start_on(0, app, server_extra, client_extra)
    }

    /// As [`Mesh::start`], the inbound listener on `port` (0: any), for a
    /// policy that names it.
    pub fn start_on(
        port: u16,
        app: SocketAddr,
        server_extra: &[String],
        client_extra: &[String],
    ) -> Self {
        let pki = Pki::new("mesh.test");
        let dir = tempfile::tempdir().unwrap();
        let server_files = SvidFiles::write(dir.path(), "server", &pki, &pki.leaf(SERVER_ID));
        let client_files = SvidFiles::write(dir.path(), "client", &pki, &pki.leaf(CLIENT_ID));
        let mut args = server_files.args();
        args.extend(["--inbound".into(), format!("127.0.0.1:{port}={app}")]);
        args.extend_from_slice(server_extra);
        let server = Sidecar::spawn(&args);
        let inbound = server.listener("inbound");
        let mut args = client_files.args();
        args.extend([
            "--outbound".into(),
            format!("127.0.0.1:0={inbound}@{SERVER_ID}"),
        ]);
        args.extend_from_slice(client_extra);
        let client = Sidecar::spawn(&args);
        let outbound = client.listener("outbound");
        server.wait_ready();
        client.wait_ready();
        Self {
            pki,
            dir,
            server,
            client,
            server_files,
            client_files,
            inbound,
            outbound,
        }
    }
}

/// The TLS side of a stand-in peer sidecar: TLS 1.3 as `id`, requiring a
/// client SVID of `pki`, offering `alpn` only.
pub fn peer_acceptor(pki: &Pki, id: &str, alpn: &[u8]) -> tokio_rustls::TlsAcceptor {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let leaf = pki.leaf(id);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.root.cert.clone()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(leaf.chain.clone(), leaf.key())
        .unwrap();
    config.alpn_protocols = vec![alpn.to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// The flags of a sidecar running as `CLIENT_ID` (its SVID files written
/// under `dir`) with one outbound listener to `peer`, expected to be
/// `SERVER_ID`.
pub fn outbound_args(dir: &Path, pki: &Pki, peer: SocketAddr) -> Vec<String> {
    let files = SvidFiles::write(dir, "client", pki, &pki.leaf(CLIENT_ID));
    let mut args = files.args();
    args.extend([
        "--outbound".into(),
        format!("127.0.0.1:0={peer}@{SERVER_ID}"),
    ]);
    args
}

/// Writes `msg` on `conn` and reads as many bytes back (an echo path).
pub fn echo(conn: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    conn.write_all(msg).unwrap();
    let mut back = vec![0; msg.len()];
    conn.read_exact(&mut back).unwrap();
    back
}

/// A port free now on 127.0.0.1 for a later listener, drawn below the
/// ephemeral range (32768+): one from `:0` was often a client's by then.
pub fn free_port() -> u16 {
    let free = |port: &u16| TcpListener::bind(("127.0.0.1", *port)).is_ok();
    let mut ports = std::iter::repeat_with(|| fastrand::u16(20_000..32_768));
    ports.find(free).unwrap() // an endless draw; 12,768 ports to find one in
}

/// An L4 policy for `port`, allowing `from`, in `mode`.
pub fn l4_policy(port: u16, mode: &str, from: &[&str]) -> String {
    let from = from
        .iter()
        .map(|f| format!("\"{f}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "trustDomain: mesh.test\nmode: {mode}\ninbound:\n  default: deny\n  ports:\n    - port: {port}\n      protocol: tcp\n      allow:\n        - from: [{from}]\n"
    )
}

/// Writes `server`'s policy `file`, waits until it is loaded; when written.
pub fn reload_policy(server: &Sidecar, file: &Path, text: &str) -> std::time::Instant {
    let before = server.config()["policy_digest"].clone();
    atomic_write(file, text.as_bytes());
    let written = std::time::Instant::now();
    let loaded = || (server.config()["policy_digest"] != before).then_some(());
    eventually("the policy reloaded", loaded);
    written
}
