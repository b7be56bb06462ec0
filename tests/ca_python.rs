//! A foreign client: Python grpcio with stubs generated from proto/ at test
//! time, verifying the CA with bundle.pem alone; an admin call it makes with
//! no credential at all is refused and changes nothing.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use common::ca::CaProcess;
use common::ca_mesh::{admin as admin_cli, admin_token, text, ADMIN_TOKEN};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use stepmesh_ca::client::make_csr;
use stepmesh_ca::svid::{verify, TrustBundle};

const ID: &str = "spiffe://td.test/vm/build-agent";

fn python_grpc() -> bool {
    Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn python_grpcio_client_gets_the_bundle_and_an_svid() {
    if !python_grpc() {
        eprintln!("skipping: python3 with grpcio and grpcio-tools is not installed (pip install -r tests/python/requirements.txt)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let admin = admin_token(dir.path(), ADMIN_TOKEN);
    let ca = CaProcess::start_with(
        "td.test",
        &[("vm-token-1", ID)],
        &["--admin-token-file", admin.to_str().unwrap()],
    );
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = dir.path().join("req.pem");
    std::fs::write(&csr, make_csr(&key, None).unwrap()).unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("python3")
        .arg(format!("{root}/tests/python/ca_client.py"))
        .args(["--addr", &ca.grpc_host_port(), "--token", "vm-token-1"])
        .arg("--bundle")
        .arg(&ca.bundle_path)
        .arg("--csr")
        .arg(&csr)
        .arg("--proto-dir")
        .arg(format!("{root}/proto"))
        .args(["--revoke-id", ID])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

    assert_eq!(got["trust_domain"], "td.test");
    assert_eq!(got["bundle_pem"], ca.bundle_pem.as_str());
    assert_eq!(got["sequence"], 1);
    assert_eq!(got["bad_token_code"], "UNAUTHENTICATED");
    let unauthenticated = &got["revoke_without_credential"];
    assert_eq!(unauthenticated["code"], "UNAUTHENTICATED", "{got}");
    assert!(
        unauthenticated["details"]
            .as_str()
            .unwrap()
            .contains("admin calls need `authorization: Bearer <admin token>`"),
        "{got}"
    );
    let listed = admin_cli(
        &ca.grpc_host_port(),
        &ca.bundle_path,
        &admin,
        "revocations",
        &[],
    );
    assert!(listed.status.success(), "{}", text(&listed));
    assert!(
        !String::from_utf8_lossy(&listed.stdout).contains(ID),
        "the refused revoke changed nothing: {}",
        text(&listed)
    );
    let chain: Vec<CertificateDer> = got["cert_chain_pem"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| CertificateDer::from_pem_slice(p.as_str().unwrap().as_bytes()).unwrap())
        .collect();
    let bundle = TrustBundle::from_pem(
        "td.test".parse().unwrap(),
        got["trust_bundle_pem"].as_str().unwrap(),
    )
    .unwrap();
    let svid = verify(&chain, &bundle, UnixTime::now()).unwrap();
    assert_eq!(svid.id.as_str(), ID);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let expires = got["expires_at"].as_i64().unwrap();
    assert!(
        (now + 3600 - expires) >= 0 && (now + 3600 - expires) < 120,
        "ttl_seconds 3600 honoured: {}",
        expires - now
    );
}
