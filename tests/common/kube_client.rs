//! Talking to the envtest API server byte-exactly, and reading what it
//! recorded: a blocking HTTPS/1.1 client that sends the request target as
//! given (no normalisation: dot segments, `//` and escapes reach the
//! server as written), and the audit log parsed from its JSON lines.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::Deserialize;

use super::envtest::ClientCert;

/// A TLS client of one API server (the admin's, or another identity's).
#[derive(Clone)]
pub struct KubeClient {
    port: u16,
    config: Arc<rustls::ClientConfig>,
}

/// One response, read until the server closed the connection.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    /// Names lower-cased.
    pub headers: Vec<(String, String)>,
    /// De-chunked.
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The `Audit-Id` the API server gave this request.
    pub fn audit_id(&self) -> Option<&str> {
        self.header("audit-id")
    }

    /// The body as (lossy) text.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl KubeClient {
    /// A client of `127.0.0.1:port` trusting `ca_pem`, presenting `cert`.
    pub fn new(port: u16, ca_pem: &str, cert: Option<&ClientCert>) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let config = match cert {
            Some(c) => {
                let chain = CertificateDer::pem_slice_iter(c.cert_pem.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap();
                let key = PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes()).unwrap();
                builder.with_client_auth_cert(chain, key).unwrap()
            }
            None => builder.with_no_client_auth(),
        };
        KubeClient {
            port,
            config: Arc::new(config),
        }
    }

    /// Sends `method target` with `headers` and `body`, reads the whole
    /// response; panics on a transport error.
    pub fn request(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> RawResponse {
        self.try_request(method, target, headers, body)
            .unwrap_or_else(|e| panic!("{method} {target}: {e}"))
    }

    /// As [`KubeClient::request`], but reads only the status line and
    /// headers, then closes: for watches and other streams.
    pub fn request_head(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
    ) -> RawResponse {
        self.exchange(method, target, headers, b"", true)
            .unwrap_or_else(|e| panic!("{method} {target}: {e}"))
    }

    /// As [`KubeClient::request`], with transport errors returned.
    pub fn try_request(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<RawResponse, String> {
        self.exchange(method, target, headers, body, false)
    }

    fn exchange(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        head_only: bool,
    ) -> Result<RawResponse, String> {
        let tcp = TcpStream::connect(("127.0.0.1", self.port)).map_err(|e| e.to_string())?;
        tcp.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        // The TLS Finished and the request go in separate writes: Nagle
        // would hold the second for the server's delayed ACK (40 ms).
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        let name = ServerName::try_from("127.0.0.1").map_err(|e| e.to_string())?;
        let conn =
            rustls::ClientConnection::new(self.config.clone(), name).map_err(|e| e.to_string())?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let mut head = format!(
            "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\
             User-Agent: stepmesh-envtest\r\n",
            self.port
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() || !matches!(method, "GET" | "HEAD") {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(body);
        tls.write_all(&bytes).map_err(|e| e.to_string())?;
        tls.flush().map_err(|e| e.to_string())?;

        let mut raw = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        let (status, headers, body_start) = loop {
            let n = read_some(&mut tls, &mut buf)?;
            if n == 0 {
                return Err(format!("closed after {} bytes of head", raw.len()));
            }
            raw.extend_from_slice(&buf[..n]);
            let mut fields = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut fields);
            if let httparse::Status::Complete(len) = resp.parse(&raw).map_err(|e| e.to_string())? {
                let headers = resp
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect::<Vec<_>>();
                break (resp.code.unwrap_or(0), headers, len);
            }
        };
        let mut response = RawResponse {
            status,
            headers,
            body: Vec::new(),
        };
        if head_only || method == "HEAD" {
            return Ok(response);
        }
        let mut body = raw.split_off(body_start);
        loop {
            let n = read_some(&mut tls, &mut buf)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&buf[..n]);
        }
        response.body = if response.header("transfer-encoding") == Some("chunked") {
            dechunk(&body)?
        } else {
            body
        };
        Ok(response)
    }
}

/// A read where a close without `close_notify` counts as the end.
fn read_some(tls: &mut impl std::io::Read, buf: &mut [u8]) -> Result<usize, String> {
    match tls.read(buf) {
        Ok(n) => Ok(n),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(0),
        Err(e) => Err(e.to_string()),
    }
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("chunk size line unterminated")?;
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|e| e.to_string())?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = data.get(..size).ok_or("chunk truncated")?;
        out.extend_from_slice(chunk);
        data = data.get(size + 2..).ok_or("chunk truncated")?;
    }
}

/// `user.username` / `impersonatedUser` of an audit event.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct AuditUser {
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub extra: BTreeMap<String, Vec<String>>,
}

/// `objectRef` of an audit event: exactly the API server's RequestInfo
/// (for requests whose body was not decoded into an object).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectRef {
    #[serde(default)]
    pub resource: String,
    #[serde(default)]
    pub subresource: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub api_group: String,
    #[serde(default)]
    pub api_version: String,
}

/// `responseStatus` of an audit event.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ResponseStatus {
    #[serde(default)]
    pub code: u16,
    #[serde(default)]
    pub message: String,
}

/// One `audit.k8s.io/v1` Event.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEvent {
    #[serde(rename = "auditID")]
    pub audit_id: String,
    pub stage: String,
    #[serde(rename = "requestURI")]
    pub request_uri: String,
    /// Empty for a resource request of a method RequestInfo does not map.
    #[serde(default)]
    pub verb: String,
    pub user: AuditUser,
    pub impersonated_user: Option<AuditUser>,
    pub object_ref: Option<ObjectRef>,
    pub response_status: Option<ResponseStatus>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub user_agent: String,
    /// Where the API server reads the request came from (`X-Forwarded-For`
    /// first, then the connection's peer).
    #[serde(default, rename = "sourceIPs")]
    pub source_ips: Vec<String>,
}

/// The API server's audit log file.
pub struct AuditLog {
    path: PathBuf,
}

impl AuditLog {
    /// The log at `path` (written by `--audit-log-path`).
    pub fn new(path: &Path) -> Self {
        AuditLog {
            path: path.to_path_buf(),
        }
    }

    /// Every event written so far (a torn last line is skipped).
    pub fn events(&self) -> Vec<AuditEvent> {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The events of each of `audit_ids` (in that order), waiting up to
    /// `timeout` for every one to have at least one; reads the log once a
    /// round.
    pub fn wait_all(&self, audit_ids: &[&str], timeout: Duration) -> Vec<Vec<AuditEvent>> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut by_id: BTreeMap<String, Vec<AuditEvent>> = BTreeMap::new();
            for e in self.events() {
                by_id.entry(e.audit_id.clone()).or_default().push(e);
            }
            let complete = audit_ids.iter().all(|id| by_id.contains_key(*id));
            if complete || Instant::now() > deadline {
                return audit_ids
                    .iter()
                    .map(|id| by_id.remove(*id).unwrap_or_default())
                    .collect();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The events of request `audit_id`, waiting up to 10 s for the first.
    pub fn wait(&self, audit_id: &str) -> Vec<AuditEvent> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let found: Vec<AuditEvent> = self
                .events()
                .into_iter()
                .filter(|e| e.audit_id == audit_id)
                .collect();
            if !found.is_empty() || Instant::now() > deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Who a kubeconfig's user is.
pub enum KubeconfigUser {
    /// A client certificate and key (PEM files).
    ClientCert { cert: PathBuf, key: PathBuf },
    /// A bearer token.
    Token(String),
    /// An exec credential plugin (`client.authentication.k8s.io/v1`),
    /// e.g. `stepmesh login ...`.
    Exec { command: PathBuf, args: Vec<String> },
}

/// A one-context kubeconfig for `server` (HTTPS, CA `ca_file`) as `user`.
pub fn kubeconfig(server: &str, ca_file: &Path, user: &KubeconfigUser) -> String {
    let json = |s: &str| serde_json::to_string(s).unwrap();
    let path = |p: &Path| json(&p.display().to_string());
    let user = match user {
        KubeconfigUser::ClientCert { cert, key } => format!(
            "    client-certificate: {}\n    client-key: {}\n",
            path(cert),
            path(key)
        ),
        KubeconfigUser::Token(token) => format!("    token: {}\n", json(token)),
        KubeconfigUser::Exec { command, args } => format!(
            "    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      \
             command: {}\n      args: {}\n      interactiveMode: IfAvailable\n",
            path(command),
            serde_json::to_string(args).unwrap()
        ),
    };
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: envtest
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: envtest-user
  user:
{user}contexts:
- name: envtest
  context:
    cluster: envtest
    user: envtest-user
current-context: envtest
",
        server = json(server),
        ca = path(ca_file),
    )
}

/// `ASSETS/kubectl --kubeconfig KUBECONFIG args...` with `stdin`.
pub fn run_kubectl(assets: &Path, kubeconfig: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(assets.join("kubectl"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}
