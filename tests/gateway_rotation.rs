//! `stepmesh gateway` picks up what the kubelet and cert-manager rotate
//! under it, without a restart: the ServiceAccount token it forwards with
//! (`--token-file`) and its serving certificate (`--cert/--key`). Against a
//! real kube-apiserver (envtest); skips, printing why, without
//! `KUBEBUILDER_ASSETS`.

#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use std::path::Path;
use std::process::Command;

use common::ca_mesh::text;
use common::envtest::Envtest;
use common::gateway::Gateway;
use common::mesh::{atomic_write, eventually};
use serde_json::json;
use stepmesh::stepup::testing::{base_claims, now, TestIdp};

const ISSUER: &str = "https://idp.stepmesh.test";
const ALICE: &str = "alice-rotation@example.com";

fn policy(jwks: &Path) -> String {
    format!(
        r#"trustDomain: example.org
stepUp:
  providers:
    corp:
      issuer: {ISSUER}
      jwks: {{file: {jwks}}}
      audiences: [kubectl]
      algorithms: [ES256]
kubernetes:
  authentication: {{provider: corp, usernameClaim: email}}
  rules: []
"#,
        jwks = jwks.display()
    )
}

fn alice(idp: &TestIdp) -> String {
    let mut c = base_claims(ISSUER, "kubectl", "alice");
    c["email"] = json!(ALICE);
    c["acr"] = json!("urn:stepmesh:acr:pwd");
    c["auth_time"] = json!(now() - 60);
    idp.es256(&c).unwrap()
}

#[test]
fn a_rotated_token_is_forwarded_without_a_restart() {
    let Some(k8s) = Envtest::shared() else { return };
    let idp = TestIdp::new(ISSUER).unwrap();
    let jwks = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    std::fs::write(&jwks, idp.jwks().to_string()).unwrap();
    k8s.apply(&format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  name: alice-rotation-admin\n\
         roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: cluster-admin}}\n\
         subjects:\n- {{apiGroup: rbac.authorization.k8s.io, kind: User, name: \"{ALICE}\"}}\n"
    ));
    let gateway = Gateway::start(k8s, &k8s.url, &k8s.ca_file, &policy(&jwks));
    let get = || gateway.kubectl(k8s, &alice(&idp), &["get", "pods", "-n", "default"]);
    let out = get();
    assert!(out.status.success(), "{}", text(&out));

    // A token of a ServiceAccount that may not impersonate: the API server
    // refuses what the gateway forwards with it, which shows it is used.
    let token_file = gateway.dir.path().join("token");
    let unprivileged = k8s.service_account_token("stepmesh-system", "not-the-gateway", "");
    atomic_write(&token_file, unprivileged.as_bytes());
    eventually("the gateway forwards with the new token", || {
        let out = get();
        let refused = !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("cannot impersonate");
        refused.then_some(())
    });

    // The kubelet's next token for the gateway's own account: served again.
    let renewed = k8s.service_account_token("stepmesh-system", "stepmesh-gateway", "");
    atomic_write(&token_file, renewed.as_bytes());
    eventually("the renewed token is used", || {
        let out = get();
        out.status.success().then_some(())
    });
    let log = std::fs::read_to_string(&gateway.proc.log).unwrap();
    assert_eq!(
        log.matches("ServiceAccount token re-read").count(),
        2,
        "one log line per change:\n{log}"
    );
    assert!(
        !log.contains(&unprivileged) && !log.contains(&renewed),
        "no token in the log"
    );
}

/// A new CA and a serving certificate for 127.0.0.1 under it (PEM: CA,
/// certificate, key).
fn serving_cert() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name.push(
        rcgen::DnType::CommonName,
        "stepmesh test gateway CA, renewed",
    );
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".into()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (ca_cert.pem(), leaf.pem(), key.serialize_pem())
}

/// The status of `GET /version` with curl trusting only `ca`, or curl's
/// exit code (60: the certificate did not verify) as an error.
fn status_trusting(gateway: &Gateway, ca: &Path) -> Result<String, String> {
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(ca)
        .arg(format!("{}/version", gateway.url()))
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(text(&out))
    }
}

#[test]
fn a_renewed_serving_certificate_is_served_without_a_restart() {
    let Some(k8s) = Envtest::shared() else { return };
    if Command::new("curl").arg("--version").output().is_err() {
        println!("skipping: curl is not installed");
        return;
    }
    let jwks = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    std::fs::write(&jwks, TestIdp::new(ISSUER).unwrap().jwks().to_string()).unwrap();
    let gateway = Gateway::start(k8s, &k8s.url, &k8s.ca_file, &policy(&jwks));
    let dir = gateway.dir.path();
    let (new_ca, cert, key) = serving_cert();
    let new_ca_file = dir.join("new-ca.pem");
    std::fs::write(&new_ca_file, new_ca).unwrap();
    // No credential: the gateway's own 401 is proof enough of a handshake.
    assert_eq!(status_trusting(&gateway, &gateway.ca_file).unwrap(), "401");
    assert!(
        status_trusting(&gateway, &new_ca_file).is_err(),
        "not yet the new certificate"
    );

    atomic_write(&dir.join("key.pem"), key.as_bytes());
    atomic_write(&dir.join("cert.pem"), cert.as_bytes());
    eventually("the new certificate is served", || {
        let status = status_trusting(&gateway, &new_ca_file).ok()?;
        assert_eq!(status, "401");
        Some(())
    });
    assert!(
        status_trusting(&gateway, &gateway.ca_file).is_err(),
        "the old certificate is no longer served"
    );
}
