//! Helpers of tests/login_plugin.rs: the test OpenID provider in process
//! over HTTPS, the real `stepmesh login` (or kubectl running it) with a
//! thread standing in for the person who enters the user code, and small
//! HTTPS stand-ins for the gateway and the API server.

#![allow(dead_code, clippy::unwrap_used)] // tests fail loudly by design

#[path = "../common/idp.rs"]
mod idp_support;

use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{json, Value};
use stepmesh::demo::idp::{Idp, IdpConfig, ServerTls};
use stepmesh_ca::https::HttpsClient;

use idp_support::TestTls;

pub const STEPMESH: &str = env!("CARGO_BIN_EXE_stepmesh");

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// What the stand-in person does with a code.
#[derive(Clone, Copy)]
pub enum Act {
    Approve {
        mfa: bool,
    },
    /// Approve without MFA first (expected to be refused), then with.
    MfaAfterRefusal,
    Deny,
    /// The code flow: curl as the browser posts the authorization request
    /// to the provider's login page (`/authorize/approve`, or `/deny`) and
    /// follows the redirect to the plugin's loopback port.
    Browser {
        mfa: bool,
    },
    BrowserDeny,
}

/// One run of a command whose stderr carries the plugin's lines.
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// The user codes the plugin asked the person to enter.
    pub codes: Vec<String>,
    /// The status of each approve/deny call made.
    pub decisions: Vec<u16>,
}

pub struct Fixture {
    pub rt: tokio::runtime::Runtime,
    pub idp: Idp,
    pub dir: tempfile::TempDir,
    pub idp_ca: PathBuf,
    pub client: HttpsClient,
}

impl Fixture {
    pub fn new(id_token_ttl: Duration) -> Fixture {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let tls = TestTls::new();
        let idp_ca = dir.path().join("idp-ca.pem");
        std::fs::write(&idp_ca, &tls.ca_pem).unwrap();
        let idp = rt
            .block_on(Idp::serve(IdpConfig {
                tls: Some(ServerTls {
                    cert_pem: tls.cert_pem,
                    key_pem: tls.key_pem,
                }),
                id_token_ttl,
                poll_interval: Duration::from_secs(1),
                device_code_ttl: Duration::from_secs(30),
                ..IdpConfig::default()
            }))
            .unwrap();
        let client = HttpsClient::new(&idp_ca).unwrap();
        Fixture {
            rt,
            idp,
            dir,
            idp_ca,
            client,
        }
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.dir.path().join("cache/stepmesh")
    }

    /// `login --issuer .. --client-id kubectl --ca-file .. --cache-dir ..`
    pub fn login_args(&self) -> Vec<String> {
        [
            "login",
            "--issuer",
            self.idp.issuer(),
            "--client-id",
            "kubectl",
            "--ca-file",
            self.idp_ca.to_str().unwrap(),
            "--cache-dir",
            self.cache_dir().to_str().unwrap(),
        ]
        .map(str::to_owned)
        .to_vec()
    }

    /// The one file in the cache dir.
    pub fn cache_file(&self) -> PathBuf {
        let mut files: Vec<_> = std::fs::read_dir(self.cache_dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");
        files.pop().unwrap()
    }

    pub fn plugin(&self, extra: &[&str], exec_info: Option<&str>, act: Act) -> Run {
        let mut cmd = Command::new(STEPMESH);
        cmd.args(self.login_args()).args(extra);
        match exec_info {
            Some(info) => cmd.env("KUBERNETES_EXEC_INFO", info),
            None => cmd.env_remove("KUBERNETES_EXEC_INFO"),
        };
        self.run(cmd, act)
    }

    /// Runs `cmd`; each user code on its stderr gets `act`.
    pub fn run(&self, mut cmd: Command, act: Act) -> Run {
        cmd.env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (client, issuer, handle, idp_ca) = (
            self.client.clone(),
            self.idp.issuer().to_owned(),
            self.rt.handle().clone(),
            self.idp_ca.clone(),
        );
        let reader = std::thread::spawn(move || {
            let (mut text, mut codes, mut decisions) = (String::new(), vec![], vec![]);
            for line in BufReader::new(stderr).lines() {
                let line = line.unwrap();
                text.push_str(&line);
                text.push('\n');
                if let Some(query) = browser_query(&line) {
                    let (page, mfa) = match act {
                        Act::Browser { mfa } => ("approve", mfa),
                        _ => ("deny", false),
                    };
                    let out = Command::new("curl")
                        .args(["-sS", "-L", "-o", "/dev/null", "-w", "%{http_code}"])
                        .arg("--cacert")
                        .arg(&idp_ca)
                        .arg("--data-raw")
                        .arg(format!("{query}&user=alice&mfa={mfa}"))
                        .arg(format!("{issuer}/authorize/{page}"))
                        .output()
                        .unwrap();
                    decisions.push(String::from_utf8_lossy(&out.stdout).parse().unwrap_or(0));
                    codes.push("browser".to_owned());
                    continue;
                }
                let Some(code) = user_code(&line) else {
                    continue;
                };
                let decide = |path: &str, form: &[(&str, &str)]| {
                    let url = format!("{issuer}{path}");
                    handle
                        .block_on(client.post_form(&url, form))
                        .unwrap()
                        .status
                        .as_u16()
                };
                let approve = |mfa: &str| {
                    decide(
                        "/device/approve",
                        &[("user_code", &code), ("user", "alice"), ("mfa", mfa)],
                    )
                };
                match act {
                    Act::Approve { mfa } => decisions.push(approve(&mfa.to_string())),
                    Act::MfaAfterRefusal => {
                        decisions.push(approve("false"));
                        decisions.push(approve("true"));
                    }
                    Act::Deny | Act::Browser { .. } | Act::BrowserDeny => {
                        decisions.push(decide("/device/deny", &[("user_code", &code)]))
                    }
                }
                codes.push(code);
            }
            (text, codes, decisions)
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                child.kill().unwrap();
                panic!("{cmd:?} still running after 60 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stdout = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut stdout)
            .unwrap();
        let (stderr, codes, decisions) = reader.join().unwrap();
        Run {
            code: status.code(),
            stdout,
            stderr,
            codes,
            decisions,
        }
    }

    /// The ExecCredential of a successful run, its token verified against
    /// the provider's JWKS; returns the token and its claims.
    pub fn credential(&self, run: &Run) -> (String, Value) {
        assert_eq!(run.code, Some(0), "stderr:\n{}", run.stderr);
        assert_eq!(run.stdout.lines().count(), 1, "one line: {}", run.stdout);
        let cred: Value = serde_json::from_str(&run.stdout).unwrap();
        assert_eq!(cred["apiVersion"], "client.authentication.k8s.io/v1");
        assert_eq!(cred["kind"], "ExecCredential");
        let token = cred["status"]["token"].as_str().unwrap().to_owned();
        let claims = verify(&self.idp, &token);
        let exp = UNIX_EPOCH + Duration::from_secs(claims["exp"].as_u64().unwrap());
        assert_eq!(
            cred["status"]["expirationTimestamp"],
            stepmesh::accesslog::rfc3339(exp)
        );
        assert!(
            !run.stderr.contains(&token),
            "the token is never logged:\n{}",
            run.stderr
        );
        (token, claims)
    }
}

/// "stepmesh login: open URL (code XXXX-XXXX)" → the code.
pub fn user_code(line: &str) -> Option<String> {
    let rest = line.split("stepmesh login: open ").nth(1)?;
    let code = rest.split("(code ").nth(1)?.strip_suffix(')')?;
    Some(code.to_owned())
}

/// "stepmesh login: open https://idp/authorize?QUERY" → QUERY.
pub fn browser_query(line: &str) -> Option<String> {
    let url = line.strip_prefix("stepmesh login: open ")?;
    if url.contains(" (code ") {
        return None;
    }
    Some(url.split_once("/authorize?")?.1.to_owned())
}

/// Whether `name` runs from PATH.
pub fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(name).is_file()))
}

pub fn verify(idp: &Idp, token: &str) -> Value {
    let jwks: Value = serde_json::from_str(idp.jwks()).unwrap();
    let jwk = &jwks["keys"][0];
    let header = jsonwebtoken::decode_header(token).unwrap();
    assert_eq!(header.kid.as_deref(), jwk["kid"].as_str());
    let key =
        DecodingKey::from_ec_components(jwk["x"].as_str().unwrap(), jwk["y"].as_str().unwrap())
            .unwrap();
    let mut validation = Validation::new(Algorithm::ES256);
    validation.set_audience(&["kubectl"]);
    validation.set_issuer(&[idp.issuer()]);
    validation.leeway = 0;
    jsonwebtoken::decode::<Value>(token, &key, &validation)
        .unwrap()
        .claims
}

pub fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

pub fn cached_entry(f: &Fixture) -> Value {
    serde_json::from_slice(&std::fs::read(f.cache_file()).unwrap()).unwrap()
}

/// Sleeps until the Unix time `at` (whole seconds).
pub fn sleep_until(at: u64) {
    let target = UNIX_EPOCH + Duration::from_secs(at);
    if let Ok(wait) = target.duration_since(SystemTime::now()) {
        std::thread::sleep(wait);
    }
}

/// method, path and Authorization header; answers with `respond`.
pub struct StandIn {
    pub url: String,
    pub ca_pem: String,
    pub ca_file: PathBuf,
    pub seen: Arc<Mutex<Vec<(String, String, String)>>>,
}

pub type Respond = dyn Fn(&str, &str) -> (u16, String) + Send + Sync;

impl StandIn {
    pub fn start(f: &Fixture, name: &str, respond: Arc<Respond>) -> StandIn {
        let tls = TestTls::new();
        let ca_file = f.dir.path().join(format!("{name}-ca.pem"));
        std::fs::write(&ca_file, &tls.ca_pem).unwrap();
        let acceptor = {
            let certs = stepmesh_ca::pem::decode_certs(tls.cert_pem.as_bytes()).unwrap();
            let key = stepmesh_ca::pem::decode_private_key(tls.key_pem.as_bytes()).unwrap();
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            let mut config = rustls::ServerConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .unwrap();
            config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            tokio_rustls::TlsAcceptor::from(Arc::new(config))
        };
        let listener =
            f.rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
                .unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recorded = seen.clone();
        f.rt.spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let (acceptor, respond, seen) =
                    (acceptor.clone(), respond.clone(), recorded.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let path = req.uri().path().to_owned();
                            let auth = req
                                .headers()
                                .get("authorization")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_owned();
                            seen.lock().unwrap().push((
                                req.method().to_string(),
                                path.clone(),
                                auth,
                            ));
                            let (status, body) = respond(req.method().as_str(), &path);
                            let mut resp = Response::new(Full::new(Bytes::from(body)));
                            *resp.status_mut() = StatusCode::from_u16(status).unwrap();
                            resp.headers_mut()
                                .insert("content-type", "application/json".parse().unwrap());
                            async move { Ok::<_, Infallible>(resp) }
                        });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        StandIn {
            url,
            ca_pem: tls.ca_pem,
            ca_file,
            seen,
        }
    }

    /// KUBERNETES_EXEC_INFO as kubectl sends it with provideClusterInfo.
    pub fn exec_info(&self) -> String {
        json!({
            "kind": "ExecCredential",
            "apiVersion": "client.authentication.k8s.io/v1",
            "spec": {
                "cluster": {
                    "server": self.url,
                    "certificate-authority-data":
                        base64::engine::general_purpose::STANDARD.encode(&self.ca_pem),
                },
                "interactive": false,
            },
        })
        .to_string()
    }

    pub fn requests(&self) -> Vec<(String, String, String)> {
        self.seen.lock().unwrap().clone()
    }
}

/// `$KUBEBUILDER_ASSETS/kubectl`, else `kubectl` on PATH.
pub fn kubectl() -> Option<PathBuf> {
    let assets = std::env::var_os("KUBEBUILDER_ASSETS")
        .map(|d| PathBuf::from(d).join("kubectl"))
        .filter(|p| p.is_file());
    assets.or_else(|| {
        std::env::split_paths(&std::env::var_os("PATH")?)
            .map(|d| d.join("kubectl"))
            .find(|p| p.is_file())
    })
}
