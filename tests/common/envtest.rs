//! A real Kubernetes API server for tests (the envtest convention): `etcd`
//! and `kube-apiserver` from `$KUBEBUILDER_ASSETS`, on free loopback ports,
//! with certificates made here (rcgen), an audit log of every request at
//! level Metadata, and an admin kubeconfig for the real `kubectl` found
//! beside them. When `KUBEBUILDER_ASSETS` is unset the test prints why and
//! returns.
//!
//! ```ignore
//! let Some(k8s) = Envtest::shared() else { return };   // one per test binary
//! k8s.kubectl_ok(&["get", "namespaces"]);
//! let r = k8s.admin().request("GET", "/api/v1/namespaces", &[], b"");
//! let event = k8s.audit().wait(r.audit_id().unwrap());  // its audit event
//! // kubectl through something else (a gateway), as another user:
//! let cfg = kubeconfig(&gateway_url, &gateway_ca, &KubeconfigUser::Exec { command, args });
//! run_kubectl(&k8s.assets, &cfg_path, &["get", "pods"], b"");
//! ```
//!
//! No orphans: each process runs under a small `sh` watchdog ([`WATCHDOG`])
//! whose stdin is a pipe from the test process. However the test process
//! ends (returns, panics, SIGKILL), the kernel closes that pipe; the
//! watchdog reads EOF, kills its process and removes the temporary
//! directory. A static's `Drop` never runs and
//! `PR_SET_PDEATHSIG` needs `unsafe` (`pre_exec`), which the crate denies.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, SanType,
};

pub use super::kube_client::{kubeconfig, run_kubectl, AuditLog, KubeClient, KubeconfigUser};

/// How long etcd plus kube-apiserver may take to become ready on a loaded
/// machine (about 3 s when idle).
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// Runs `"$@"` (after the cleanup dir `$1`) and kills it when stdin, a pipe
/// held only by the test process, reaches EOF; exits with its status.
/// SIGKILL at once: the data is thrown away, and kube-apiserver's graceful
/// shutdown takes more than 5 s.
pub const WATCHDOG: &str = r#"
cleanup=$1; shift
exec 3<&0 </dev/null
"$@" 3<&- &
child=$!
( while read -r _ <&3; do :; done; kill -KILL "$child" 2>/dev/null ) &
watchdog=$!
exec 3<&-
wait "$child"; status=$?
kill "$watchdog" 2>/dev/null
[ -n "$cleanup" ] && rm -rf "$cleanup"
exit "$status"
"#;

/// A process under [`WATCHDOG`]: stopped when this is dropped or when the
/// test process dies, whichever comes first.
pub struct Supervised {
    /// What it is, for messages.
    pub name: String,
    child: Mutex<Child>,
    pipe: Mutex<Option<ChildStdin>>,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
}

impl Supervised {
    /// Starts `program args` under the watchdog, output to `log`; `cleanup`
    /// (if any) is removed once it has exited.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        log: &Path,
        cleanup: Option<&Path>,
    ) -> Self {
        let out = std::fs::File::create(log).unwrap();
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg("envtest-watchdog")
            .arg(cleanup.map_or(PathBuf::new(), Path::to_path_buf))
            .arg(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning sh for {name}: {e}"));
        let pipe = child.stdin.take();
        Supervised {
            name: name.to_owned(),
            child: Mutex::new(child),
            pipe: Mutex::new(pipe),
            log: log.to_path_buf(),
        }
    }

    /// The PID of the program itself (the watchdog's child), read from
    /// `/proc`; `None` once it has exited.
    pub fn program_pid(&self) -> Option<u32> {
        let sh = self.child.lock().unwrap().id();
        let children = std::fs::read_to_string(format!("/proc/{sh}/task/{sh}/children")).ok()?;
        // The watchdog subshell is also a child; the program is the one
        // whose command line is not `sh`.
        children
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
            .find(|p| {
                std::fs::read(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| !c.starts_with(b"sh\0") && !c.starts_with(b"envtest-watchdog"))
            })
    }

    /// `Some(status)` if it has exited.
    pub fn exited(&self) -> Option<std::process::ExitStatus> {
        self.child.lock().unwrap().try_wait().unwrap()
    }

    /// The last `lines` lines of its output, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Closes the pipe (the watchdog stops the program) and waits up to
    /// 10 s for the watchdog, then kills it.
    pub fn stop(&self) {
        drop(self.pipe.lock().unwrap().take());
        let mut child = self.child.lock().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if child.try_wait().unwrap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The binaries of `$KUBEBUILDER_ASSETS`, or why the test must skip.
pub fn assets() -> Result<PathBuf, String> {
    let dir = std::env::var_os("KUBEBUILDER_ASSETS")
        .ok_or("KUBEBUILDER_ASSETS is unset (see ../shared/envtest/README.md)")?;
    let dir = PathBuf::from(dir);
    for bin in ["etcd", "kube-apiserver", "kubectl"] {
        if !dir.join(bin).is_file() {
            return Err(format!(
                "KUBEBUILDER_ASSETS has no {bin}: {}",
                dir.display()
            ));
        }
    }
    Ok(dir)
}

/// A test client identity signed by the API server's client CA.
pub struct ClientCert {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The certificates and keys the API server is started with.
struct Pki {
    serving_ca: CertifiedIssuer<'static, KeyPair>,
    client_ca: CertifiedIssuer<'static, KeyPair>,
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

impl Pki {
    fn new() -> Pki {
        Pki {
            serving_ca: ca("envtest serving CA"),
            client_ca: ca("envtest client CA"),
        }
    }

    fn serving(&self) -> ClientCert {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        params
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.serving_ca).unwrap();
        ClientCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    fn client(&self, user: &str, groups: &[&str]) -> ClientCert {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, user);
        for g in groups {
            params.distinguished_name.push(DnType::OrganizationName, *g);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.client_ca).unwrap();
        ClientCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// Free loopback ports, distinct (all held until all are chosen).
fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    std::array::from_fn(|i| held[i].local_addr().unwrap().port())
}

/// Level Metadata for every request; the RequestReceived stage is omitted
/// (each request then has one event, ResponseStarted for a watch too).
const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
";

/// A running etcd + kube-apiserver pair.
pub struct Envtest {
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    /// The API server's port.
    pub port: u16,
    /// The CA of the API server's serving certificate (PEM file).
    pub ca_file: PathBuf,
    /// Its contents.
    pub ca_pem: String,
    /// A kubeconfig for the admin (client certificate, `system:masters`).
    pub kubeconfig: PathBuf,
    /// The admin's certificate and key.
    pub admin_cert: ClientCert,
    /// The JSON-lines audit log.
    pub audit_log: PathBuf,
    /// The ServiceAccount token issuer (`--service-account-issuer`).
    pub sa_issuer: String,
    /// Where `kubectl` and the servers are.
    pub assets: PathBuf,
    /// The temporary directory holding certificates, data and logs.
    pub dir: PathBuf,
    /// From spawning etcd to `/readyz` answering `ok`.
    pub startup: Duration,
    pki: Pki,
    // Stopped in this order on drop: the API server before its etcd.
    apiserver: Supervised,
    etcd: Supervised,
}

static SHARED: OnceLock<Envtest> = OnceLock::new();

impl Envtest {
    /// The test binary's shared instance, started on first use; `None`
    /// (after printing why) when the binaries are not available.
    pub fn shared() -> Option<&'static Envtest> {
        match assets() {
            Ok(dir) => Some(SHARED.get_or_init(|| Envtest::start_in(&dir, &[]))),
            Err(why) => {
                println!("skip: {why}");
                None
            }
        }
    }

    /// A fresh instance with extra `kube-apiserver` flags, stopped on drop;
    /// `None` (after printing why) when the binaries are not available.
    pub fn start(extra_apiserver_args: &[&str]) -> Option<Envtest> {
        match assets() {
            Ok(dir) => Some(Envtest::start_in(&dir, extra_apiserver_args)),
            Err(why) => {
                println!("skip: {why}");
                None
            }
        }
    }

    fn start_in(assets: &Path, extra: &[&str]) -> Envtest {
        let mut last = String::new();
        // A port chosen free can be taken before the server binds it: retry.
        for _ in 0..3 {
            match Envtest::try_start(assets, extra) {
                Ok(env) => return env,
                Err(why) => {
                    eprintln!("envtest: start failed, retrying: {why}");
                    last = why;
                }
            }
        }
        panic!("envtest did not start: {last}");
    }

    fn try_start(assets: &Path, extra: &[&str]) -> Result<Envtest, String> {
        let dir = tempfile::Builder::new()
            .prefix("stepmesh-envtest-")
            .tempdir()
            .unwrap()
            .keep();
        let path = |name: &str| dir.join(name);
        let write = |name: &str, text: &str| {
            std::fs::write(dir.join(name), text).unwrap();
            dir.join(name)
        };
        let pki = Pki::new();
        let serving = pki.serving();
        let admin_cert = pki.client("envtest-admin", &["system:masters"]);
        let sa_key = KeyPair::generate().unwrap();
        let ca_file = write("serving-ca.crt", &pki.serving_ca.pem());
        write("client-ca.crt", &pki.client_ca.pem());
        write("apiserver.crt", &serving.cert_pem);
        write("apiserver.key", &serving.key_pem);
        write("admin.crt", &admin_cert.cert_pem);
        write("admin.key", &admin_cert.key_pem);
        write("sa.key", &sa_key.serialize_pem());
        write("sa.pub", &sa_key.public_key_pem());
        write("audit-policy.yaml", AUDIT_POLICY);
        let [etcd_port, peer_port, port] = free_ports::<3>();
        let url = format!("https://127.0.0.1:{port}");
        let admin_user = KubeconfigUser::ClientCert {
            cert: path("admin.crt"),
            key: path("admin.key"),
        };
        let kubeconfig = write("admin.kubeconfig", &kubeconfig(&url, &ca_file, &admin_user));

        let began = Instant::now();
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd_args: Vec<String> = [
            "--name=envtest".to_owned(),
            format!("--data-dir={}", path("etcd").display()),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=envtest={peer_url}"),
            // Test data: losing it in a power cut costs nothing.
            "--unsafe-no-fsync".to_owned(),
            "--log-level=warn".to_owned(),
        ]
        .into();
        // etcd's watchdog removes the whole directory once etcd has exited.
        let etcd = Supervised::spawn(
            "etcd",
            &assets.join("etcd"),
            &etcd_args,
            &path("etcd.log"),
            Some(&dir),
        );
        let audit_log = path("audit.log");
        let sa_issuer = format!("https://127.0.0.1:{port}");
        let mut args: Vec<String> = vec![
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".to_owned(),
            "--advertise-address=127.0.0.1".to_owned(),
            format!("--secure-port={port}"),
            format!("--tls-cert-file={}", path("apiserver.crt").display()),
            format!("--tls-private-key-file={}", path("apiserver.key").display()),
            format!("--client-ca-file={}", path("client-ca.crt").display()),
            format!("--cert-dir={}", path("certs").display()),
            format!("--service-account-issuer={sa_issuer}"),
            format!("--service-account-key-file={}", path("sa.pub").display()),
            format!(
                "--service-account-signing-key-file={}",
                path("sa.key").display()
            ),
            "--service-cluster-ip-range=10.0.0.0/24".to_owned(),
            "--authorization-mode=Node,RBAC".to_owned(),
            "--endpoint-reconciler-type=none".to_owned(),
            "--enable-admission-plugins=MutatingAdmissionWebhook,ValidatingAdmissionWebhook"
                .to_owned(),
            "--allow-privileged=true".to_owned(),
            format!(
                "--audit-policy-file={}",
                path("audit-policy.yaml").display()
            ),
            format!("--audit-log-path={}", audit_log.display()),
            "--audit-log-format=json".to_owned(),
            // Written before the response is finished (the default for
            // the log backend, stated): a test can read its event at once.
            "--audit-log-mode=blocking".to_owned(),
            "--audit-log-maxbackup=0".to_owned(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let apiserver = Supervised::spawn(
            "kube-apiserver",
            &assets.join("kube-apiserver"),
            &args,
            &path("kube-apiserver.log"),
            None,
        );
        let env = Envtest {
            url,
            port,
            ca_pem: pki.serving_ca.pem(),
            ca_file,
            kubeconfig,
            admin_cert,
            audit_log,
            sa_issuer,
            assets: assets.to_path_buf(),
            dir: dir.clone(),
            startup: Duration::ZERO,
            pki,
            apiserver,
            etcd,
        };
        env.wait_ready(began)
            .map(|startup| Envtest { startup, ..env })
    }

    /// Polls `GET /readyz` as the admin until it answers `ok`.
    fn wait_ready(&self, began: Instant) -> Result<Duration, String> {
        let admin = self.admin();
        let mut last = String::new();
        while began.elapsed() < START_TIMEOUT {
            for p in [&self.etcd, &self.apiserver] {
                if let Some(status) = p.exited() {
                    return Err(format!("{} exited ({status}):\n{}", p.name, p.log_tail(30)));
                }
            }
            match admin.try_request("GET", "/readyz", &[], b"") {
                Ok(r) if r.status == 200 && r.body_text() == "ok" => {
                    let startup = began.elapsed();
                    println!("envtest: ready in {startup:?} at {}", self.url);
                    return Ok(startup);
                }
                Ok(r) => last = format!("{} {}", r.status, r.body_text()),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!(
            "not ready within {START_TIMEOUT:?} (last /readyz: {last}):\n{}",
            self.apiserver.log_tail(30)
        ))
    }

    /// An HTTPS client presenting the admin's certificate.
    pub fn admin(&self) -> KubeClient {
        self.client(Some(&self.admin_cert))
    }

    /// An HTTPS client trusting the API server, with this client
    /// certificate (or none: then only bearer tokens authenticate).
    pub fn client(&self, cert: Option<&ClientCert>) -> KubeClient {
        KubeClient::new(self.port, &self.ca_pem, cert)
    }

    /// A client certificate for `user` in `groups` (its O fields), signed by
    /// the CA the API server trusts for clients.
    pub fn client_cert(&self, user: &str, groups: &[&str]) -> ClientCert {
        self.pki.client(user, groups)
    }

    /// The audit log's events.
    pub fn audit(&self) -> AuditLog {
        AuditLog::new(&self.audit_log)
    }

    /// PIDs of etcd and kube-apiserver themselves (not their watchdogs).
    pub fn pids(&self) -> (Option<u32>, Option<u32>) {
        (self.etcd.program_pid(), self.apiserver.program_pid())
    }

    /// `kubectl --kubeconfig ADMIN args...`.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_with_stdin(args, b"")
    }

    /// [`Envtest::kubectl`] with `stdin` (for `-f -`).
    pub fn kubectl_with_stdin(&self, args: &[&str], stdin: &[u8]) -> Output {
        run_kubectl(&self.assets, &self.kubeconfig, args, stdin)
    }

    /// `kubectl` that must succeed; its stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `kubectl apply -f -` of `yaml`, which must succeed. Tests of one
    /// binary share the API server and may apply the same object at once:
    /// kubectl's client-side apply is get-then-create, so the loser of that
    /// race sees AlreadyExists; applying again then patches, as intended.
    pub fn apply(&self, yaml: &str) -> String {
        let mut out = self.kubectl_with_stdin(&["apply", "-f", "-"], yaml.as_bytes());
        for _ in 0..3 {
            if out.status.success()
                || !String::from_utf8_lossy(&out.stderr).contains("AlreadyExists")
            {
                break;
            }
            out = self.kubectl_with_stdin(&["apply", "-f", "-"], yaml.as_bytes());
        }
        assert!(
            out.status.success(),
            "kubectl apply: {}\n{yaml}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// A namespace and its `default` ServiceAccount (no controller-manager
    /// makes it; pods need it). Namespaces never finish deleting here: use
    /// a fresh name per test.
    pub fn create_namespace(&self, name: &str) {
        self.apply(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n---\n\
             apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: default\n  namespace: {name}\n"
        ));
    }

    /// A ConfigMap `name` in `namespace` with `data`.
    pub fn create_configmap(&self, namespace: &str, name: &str, data: &[(&str, &str)]) {
        let data: String = data
            .iter()
            .map(|(k, v)| format!("  {k}: {}\n", serde_json::to_string(v).unwrap()))
            .collect();
        self.apply(&format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: {namespace}\ndata:\n{data}"
        ));
    }

    /// A token for a ServiceAccount (created if missing), from the
    /// TokenRequest API (`kubectl create token`).
    pub fn service_account_token(&self, namespace: &str, name: &str, audience: &str) -> String {
        self.apply(&format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: {name}\n  namespace: {namespace}\n"
        ));
        let mut args = vec!["create", "token", name, "-n", namespace];
        if !audience.is_empty() {
            args.extend(["--audience", audience]);
        }
        self.kubectl_ok(&args).trim().to_owned()
    }
}
