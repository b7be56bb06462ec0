//! Helpers shared by the injector's integration tests: a run-time PKI, the
//! real `stepmesh inject serve` process, an HTTPS client, and the Kubernetes
//! schema validator (kubernetes-validate from PyPI).
#![allow(dead_code)] // each test binary uses a subset

use std::io::{BufRead, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use serde::Deserialize as _;
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_stepmesh");
/// The sidecar-only binary the injected sidecar container runs.
pub const PROXY_BIN: &str = env!("CARGO_BIN_EXE_stepmesh-proxy");
/// Kubernetes version the validator checks against (native sidecars need >= 1.29).
pub const K8S_VERSION: &str = "1.33.0";

/// A CA and a serving pair for `localhost` / 127.0.0.1, written to `dir`.
pub struct Pki {
    pub ca_pem: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub fn pki(dir: &Path, tag: &str) -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("test webhook CA {tag}"));
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params
        .subject_alt_names
        .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let leaf = params.signed_by(&leaf_key, &ca).unwrap();
    let cert = dir.join(format!("tls-{tag}.crt"));
    let key = dir.join(format!("tls-{tag}.key"));
    std::fs::write(&cert, leaf.pem()).unwrap();
    std::fs::write(&key, leaf_key.serialize_pem()).unwrap();
    Pki {
        ca_pem: ca.pem(),
        cert,
        key,
    }
}

/// A running `stepmesh inject serve`, killed on drop.
pub struct Webhook {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Webhook {
    pub fn start(cert: &Path, key: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(BIN)
            .args([
                "inject",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--reload-interval",
                "100ms",
            ])
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        // Blocks until the server prints its address (or exits: then panics).
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        Self { child, addr }
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn client_config(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in stepmesh_ca::pem::decode_certs(ca_pem.as_bytes()).unwrap() {
        roots.add(cert).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// One HTTPS request on a fresh connection to `localhost`: status and body.
pub async fn request(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> Result<(u16, Vec<u8>), String> {
    request_to("localhost", addr, tls, method, path, content_type, body).await
}

/// One HTTPS request, verifying the server as `server_name`.
pub async fn request_to(
    server_name: &str,
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> Result<(u16, Vec<u8>), String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from(server_name.to_owned()).unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", server_name);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let req = req.body(Full::new(Bytes::from(body))).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(30), sender.send_request(req))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body.to_vec()))
}

/// POSTs an AdmissionReview and returns status and parsed JSON body.
pub async fn post_review(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    review: &Value,
) -> (u16, Value) {
    let (status, body) = request(
        addr,
        tls,
        "POST",
        "/inject",
        Some("application/json"),
        serde_json::to_vec(review).unwrap(),
    )
    .await
    .unwrap();
    (status, serde_json::from_slice(&body).unwrap())
}

/// Validates objects with kubernetes-validate (strict schema of
/// [`K8S_VERSION`]); `Ok(false)` when the tool is not installed.
pub fn validate(objects: &[Value]) -> Result<bool, String> {
    if Command::new("kubernetes-validate")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("kubernetes-validate not installed: schema validation skipped (CI installs it)");
        return Ok(false);
    }
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for (i, object) in objects.iter().enumerate() {
        // JSON, not YAML: PyYAML would read unquoted timestamps as datetimes.
        let path = dir.path().join(format!("object-{i}.json"));
        let mut object = object.clone();
        if object.pointer("/metadata/name").is_none() {
            // generateName only: the API server names the pod after admission,
            // and kubernetes-validate needs a name to report on.
            let prefix = object.pointer("/metadata/generateName").cloned();
            let name = format!(
                "{}x7k2p",
                prefix.as_ref().and_then(Value::as_str).unwrap_or("object-")
            );
            object["metadata"]["name"] = Value::String(name);
        }
        std::fs::write(&path, serde_json::to_string_pretty(&object).unwrap()).unwrap();
        files.push(path);
    }
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--quiet", "-k", K8S_VERSION])
        .args(&files)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(true)
    } else {
        Err(format!(
            "kubernetes-validate failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A request written by hand so the server may answer before the body is
/// fully sent (as it does for oversized bodies): the body is written on a
/// separate task whose errors are ignored, and the response is read to EOF.
pub async fn raw_request(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    head: String,
    body: Vec<u8>,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .unwrap();
    let (mut rd, mut wr) = tokio::io::split(stream);
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(head.as_bytes()).await;
        let _ = wr.write_all(&body).await;
        let _ = wr.flush().await;
        wr
    });
    let mut response = Vec::new();
    let mut buf = vec![0; 16 << 10];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let read = tokio::time::timeout_at(deadline, rd.read(&mut buf)).await;
        match read {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => response.extend_from_slice(&buf[..n]),
        }
        if complete(&response) {
            break;
        }
    }
    writer.abort();
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP response: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Whether `response` holds the head and a `content-length` body.
fn complete(response: &[u8]) -> bool {
    let text = String::from_utf8_lossy(response);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .is_some_and(|len| body.len() >= len)
}

/// The documents of a multi-document YAML text (empty ones dropped).
pub fn docs(yaml: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

/// Whether `tool` runs here; prints the skip reason when not.
pub fn have(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("version")
        .arg("--client")
        .output()
        .is_ok()
        || Command::new(tool).arg("version").output().is_ok();
    if !ok {
        eprintln!("skipped: {tool} is not installed");
    }
    ok
}

/// `stepmesh ARGS` with `stdin` written to its standard input.
pub fn run_stdin(args: &[&str], stdin: &str) -> std::process::Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// `stepmesh inject -f -` with `input` on stdin: (stdout, stderr).
pub fn inject_stdin(input: &str) -> (String, String) {
    let out = run_stdin(&["inject", "-f", "-"], input);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "{stderr}");
    (String::from_utf8(out.stdout).unwrap(), stderr)
}

/// Runs deploy/scripts/bootstrap.sh into `out` with `extra` flags (offline:
/// openssl only).
pub fn bootstrap(out: &Path, extra: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/scripts/bootstrap.sh");
    let status = Command::new("bash")
        .arg(&script)
        .arg(out)
        .args(extra)
        .status()
        .unwrap();
    assert!(status.success(), "{} failed: {status}", script.display());
}
