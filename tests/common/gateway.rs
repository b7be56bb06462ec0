//! `stepmesh gateway serve` in front of a real API server ([`Envtest`]):
//! its own serving certificate (rcgen), a ServiceAccount that may only
//! impersonate (the RBAC of deploy/gateway), a policy file, and the test
//! identity provider's keys as the policy's JWKS file. The process runs
//! under the envtest watchdog, so it never outlives the test binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use stepmesh::stepup::testing::TestIdp;

use super::envtest::{Envtest, KubeClient, Supervised};

/// The impersonate-only ClusterRole of deploy/gateway, bound to the
/// gateway's ServiceAccount.
pub const GATEWAY_RBAC: &str = include_str!("../../deploy/gateway/rbac.yaml");

/// A running gateway.
pub struct Gateway {
    /// The process (its stdout, audit lines included, is in `proc.log`).
    pub proc: Supervised,
    /// kubectl's port.
    pub port: u16,
    /// /healthz, /ready, /metrics.
    pub admin_port: u16,
    /// The CA of the serving certificate (PEM) and its file.
    pub ca_pem: String,
    /// File form of `ca_pem`.
    pub ca_file: PathBuf,
    /// The policy file (rewrite it to hot-reload).
    pub policy_file: PathBuf,
    /// Working directory (certificates, token, policy).
    pub dir: tempfile::TempDir,
}

impl Gateway {
    /// Starts a gateway to `upstream` (its CA in `upstream_ca`) with
    /// `policy`; the ServiceAccount token comes from `k8s`.
    pub fn start(k8s: &Envtest, upstream: &str, upstream_ca: &Path, policy: &str) -> Gateway {
        Self::start_with(k8s, upstream, upstream_ca, policy, &[])
    }

    /// As [`Gateway::start`], with `extra` flags.
    pub fn start_with(
        k8s: &Envtest,
        upstream: &str,
        upstream_ca: &Path,
        policy: &str,
        extra: &[&str],
    ) -> Gateway {
        k8s.apply("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: stepmesh-system\n");
        k8s.apply(GATEWAY_RBAC);
        let token = k8s.service_account_token("stepmesh-system", "stepmesh-gateway", "");
        Self::spawn(&token, upstream, Some(upstream_ca), policy, extra)
    }

    /// A gateway with `token` as its ServiceAccount token, trusting
    /// `upstream_ca` for `upstream` (None: its own serving CA, for an
    /// upstream never reached), with `policy` and `extra` flags.
    pub fn spawn(
        token: &str,
        upstream: &str,
        upstream_ca: Option<&Path>,
        policy: &str,
        extra: &[&str],
    ) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "stepmesh test gateway CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let path = |name: &str| dir.path().join(name);
        std::fs::write(path("ca.pem"), ca_cert.pem()).unwrap();
        std::fs::write(path("cert.pem"), leaf.pem()).unwrap();
        std::fs::write(path("key.pem"), key.serialize_pem()).unwrap();
        std::fs::write(path("token"), token).unwrap();
        std::fs::write(path("policy.yaml"), policy).unwrap();
        let upstream_ca = upstream_ca.map_or_else(|| path("ca.pem"), Path::to_path_buf);
        let args: Vec<String> = [
            "gateway",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--upstream",
            upstream,
            "--reload-interval",
            "200ms",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(
            [
                ("--cert", "cert.pem"),
                ("--key", "key.pem"),
                ("--token-file", "token"),
                ("--policy", "policy.yaml"),
            ]
            .iter()
            .flat_map(|(flag, file)| [flag.to_string(), path(file).display().to_string()]),
        )
        .chain([
            "--upstream-ca".to_owned(),
            upstream_ca.display().to_string(),
        ])
        .chain(extra.iter().map(|s| s.to_string()))
        .collect();
        let proc = Supervised::spawn(
            "stepmesh gateway",
            Path::new(env!("CARGO_BIN_EXE_stepmesh")),
            &args,
            &path("gateway.log"),
            None,
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        let (port, admin_port) = loop {
            let log = std::fs::read_to_string(&proc.log).unwrap_or_default();
            if let Some(line) = log.lines().find(|l| l.starts_with("listening on ")) {
                let addr = |s: &str| s.rsplit(':').next().unwrap().parse::<u16>().unwrap();
                let mut words = line.split_whitespace();
                let main = words.nth(2).unwrap();
                let admin = words.nth(1).unwrap();
                break (addr(main), addr(admin));
            }
            assert!(
                proc.exited().is_none() && Instant::now() < deadline,
                "gateway did not start:\n{}",
                proc.log_tail(30)
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Gateway {
            proc,
            port,
            admin_port,
            ca_pem: ca_cert.pem(),
            ca_file: path("ca.pem"),
            policy_file: path("policy.yaml"),
            dir,
        }
    }

    /// The gateway's URL.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// A raw HTTPS client to the gateway (no client certificate).
    pub fn client(&self) -> KubeClient {
        KubeClient::new(self.port, &self.ca_pem, None)
    }

    /// The real kubectl against the gateway with `token`.
    pub fn kubectl(&self, k8s: &Envtest, token: &str, args: &[&str]) -> Output {
        self.kubectl_command(k8s, token, args).output().unwrap()
    }

    /// The command [`Gateway::kubectl`] runs (for streaming tests).
    pub fn kubectl_command(&self, k8s: &Envtest, token: &str, args: &[&str]) -> Command {
        let empty = self.dir.path().join("empty-kubeconfig");
        if !empty.exists() {
            std::fs::write(&empty, "apiVersion: v1\nkind: Config\n").unwrap();
        }
        let mut c = Command::new(k8s.assets.join("kubectl"));
        c.arg("--kubeconfig")
            .arg(&empty)
            .arg("--server")
            .arg(self.url())
            .arg("--certificate-authority")
            .arg(&self.ca_file)
            .arg("--token")
            .arg(token)
            .args(args);
        c
    }

    /// The gateway's audit lines so far (JSON objects of kind `gateway`).
    pub fn audit_lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.proc.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["kind"] == "gateway")
            .collect()
    }

    /// The latest audit line matching `pred`, waited for up to 10 s: the
    /// gateway writes it once the response has ended, which kubectl may
    /// see first.
    pub fn wait_audit_line(
        &self,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let found = self.audit_lines().into_iter().rev().find(&pred);
            if found.is_some() || Instant::now() > deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A test identity provider for `issuer`, and a file holding its JWK set
/// for the gateway's policy (kept: the gateway reads it for its life).
pub fn idp_with_jwks(issuer: &str) -> (TestIdp, PathBuf) {
    let idp = TestIdp::new(issuer).unwrap();
    let jwks = tempfile::NamedTempFile::new()
        .unwrap()
        .into_temp_path()
        .keep()
        .unwrap();
    std::fs::write(&jwks, idp.jwks().to_string()).unwrap();
    (idp, jwks)
}
