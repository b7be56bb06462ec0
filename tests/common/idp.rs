//! Test identity provider pieces that live outside the library: a JWKS
//! endpoint served over HTTPS by a separate Python process (so the fetcher
//! meets a foreign TLS stack), with behaviour the test switches at will.
//! Token minting and key generation are in `stepmesh::stepup::testing`.

#![allow(dead_code, clippy::unwrap_used)] // shared by several test crates; tests may panic

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A TLS root and a server certificate for 127.0.0.1/localhost, as PEM files.
pub struct TestTls {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestTls {
    pub fn new() -> TestTls {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "stepmesh test JWKS CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut leaf =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .unwrap();
        leaf.distinguished_name
            .push(rcgen::DnType::CommonName, "jwks.test");
        let cert = leaf.signed_by(&key, &issuer).unwrap();
        TestTls {
            ca_pem: ca_cert.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// `python3 tests/python/jwks_server.py DIR`, killed on drop.
pub struct JwksServer {
    child: Child,
    dir: tempfile::TempDir,
    pub port: u16,
    pub ca_file: PathBuf,
}

impl JwksServer {
    /// Starts the server answering 200 with `body`.
    pub fn start(body: &str) -> JwksServer {
        let dir = tempfile::tempdir().unwrap();
        let tls = TestTls::new();
        std::fs::write(dir.path().join("cert.pem"), &tls.cert_pem).unwrap();
        write_private(&dir.path().join("key.pem"), &tls.key_pem);
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, &tls.ca_pem).unwrap();
        std::fs::write(dir.path().join("hits"), "").unwrap();
        let server = JwksServer {
            child: spawn(dir.path()),
            dir,
            port: 0,
            ca_file,
        };
        server.answer(200, body);
        server.wait_for_port()
    }

    fn wait_for_port(mut self) -> JwksServer {
        let out = self.child.stdout.take().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(out).read_line(&mut line).unwrap();
        self.port = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("jwks_server.py printed {line:?}"));
        self
    }

    /// The URL of the key set.
    pub fn url(&self) -> String {
        format!("https://localhost:{}/jwks", self.port)
    }

    /// From now on answer `status` with `body` (swapped atomically).
    pub fn answer(&self, status: u16, body: &str) {
        let d = self.dir.path();
        std::fs::write(d.join("body.tmp"), body).unwrap();
        std::fs::rename(d.join("body.tmp"), d.join("body")).unwrap();
        std::fs::write(d.join("status.tmp"), status.to_string()).unwrap();
        std::fs::rename(d.join("status.tmp"), d.join("status")).unwrap();
    }

    /// Requests served so far.
    pub fn hits(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("hits"))
            .unwrap()
            .lines()
            .count()
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(dir: &Path) -> Child {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/jwks_server.py");
    Command::new("python3")
        .arg(script)
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 is needed for the JWKS-over-HTTPS tests")
}

/// Writes a private key readable by its owner only.
pub fn write_private(path: &Path, pem: &str) {
    use std::io::Write;
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
