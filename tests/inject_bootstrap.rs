//! The CA as deploy/ runs it: the PKI of deploy/scripts/bootstrap.sh,
//! mounted the way the CA Deployment mounts Secret `stepmesh-ca-pki`, with
//! the Deployment's own flags. A client trusting only the
//! `stepmesh-ca-bundle` ConfigMap the script writes gets an SVID, and
//! `openssl verify` accepts that SVID against the bootstrap root.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;
mod inject_support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::ca::CaProcess;
use inject_support::{bootstrap, docs, have};
use rustls::pki_types::{pem::PemObject, CertificateDer};
use stepmesh_ca::client::{CaClient, Credential};

const TOKEN: &str = "join-frontend";
const ID: &str = "spiffe://cluster.local/ns/stepmesh-demo/sa/frontend";
/// The pki volume's `defaultMode` in deploy/ca/deployment.yaml.
const SECRET_MODE: u32 = 0o440;

fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(Result::unwrap)
        .collect()
}

/// `openssl verify` of `leaf` (with `untrusted` intermediates) against `root`.
fn openssl_verify(root: &Path, untrusted: &Path, leaf: &Path, purpose: &str) -> (bool, String) {
    let out = Command::new("openssl")
        .args(["verify", "-x509_strict", "-purpose", purpose, "-CAfile"])
        .arg(root)
        .arg("-untrusted")
        .arg(untrusted)
        .arg(leaf)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_signs_under_the_bootstrap_intermediate_with_the_deployments_flags() {
    if !have("openssl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("overlay");
    bootstrap(&pki, &[]);

    // The Secret volume: each data key a file, mode 0440.
    let deployment = &docs(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/ca/deployment.yaml"),
        )
        .unwrap(),
    )[0];
    let pod = &deployment["spec"]["template"]["spec"];
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["secret"]["secretName"] == "stepmesh-ca-pki")
        .unwrap();
    let container = &pod["containers"][0];
    let mount_path = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == volume["name"])
        .unwrap()["mountPath"]
        .as_str()
        .unwrap();
    let mount = dir.path().join("pki-volume");
    std::fs::create_dir(&mount).unwrap();
    let secret =
        &docs(&std::fs::read_to_string(pki.join("secret-stepmesh-ca-pki.yaml")).unwrap())[0];
    for (key, value) in secret["data"].as_object().unwrap() {
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(value.as_str().unwrap())
            .unwrap();
        let file = mount.join(key);
        std::fs::write(&file, bytes).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(SECRET_MODE)).unwrap();
    }

    // The Deployment's flags, paths moved to the local volume. Addresses,
    // state dir and trust domain come from CaProcess; TokenReview (no API
    // server here) is replaced by a join token.
    let args: Vec<String> = serde_json::from_value(container["args"].clone()).unwrap();
    let trust_domain = args
        .iter()
        .find_map(|a| a.strip_prefix("--trust-domain="))
        .unwrap();
    let kept = [
        "--intermediate-cert=",
        "--intermediate-key=",
        "--root-bundle=",
        "--audience=",
        "--dns-name=",
    ];
    let flags: Vec<String> = args
        .iter()
        .filter(|a| kept.iter().any(|k| a.starts_with(k)))
        .map(|a| a.replace(mount_path, &mount.display().to_string()))
        .collect();
    assert_eq!(
        flags
            .iter()
            .filter(|f| f.contains(&*mount.to_string_lossy()))
            .count(),
        3,
        "the Deployment names the intermediate, its key and the roots: {flags:?}"
    );
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let ca = CaProcess::start_with(trust_domain, &[(TOKEN, ID)], &flags);

    // The CA serves the bootstrap root as its bundle.
    let root_pem = std::fs::read_to_string(pki.join("root.crt")).unwrap();
    assert_eq!(certs(&ca.bundle_pem), certs(&root_pem));

    // A sidecar's view: only the ConfigMap's bundle.pem is trusted.
    let config_map =
        &docs(&std::fs::read_to_string(pki.join("ca-bundle-stepmesh-demo.yaml")).unwrap())[0];
    let bundle = config_map["data"]["bundle.pem"].as_str().unwrap();
    assert_eq!(certs(bundle), certs(&root_pem));
    let client = CaClient::connect(&ca.grpc_host_port(), bundle).unwrap();
    let svid = client
        .issue(&Credential::Token(TOKEN.into()), None)
        .await
        .unwrap();
    assert_eq!(svid.id.as_str(), ID);
    let intermediate = std::fs::read_to_string(pki.join("intermediate.crt")).unwrap();
    assert_eq!(svid.chain.len(), 2, "leaf then the intermediate");
    assert_eq!(svid.chain[1..], certs(&intermediate)[..]);

    let leaf = dir.path().join("leaf.pem");
    let chain = dir.path().join("untrusted.pem");
    std::fs::write(
        &leaf,
        stepmesh_ca::pem::encode_certs([svid.chain[0].as_ref()]),
    )
    .unwrap();
    std::fs::write(
        &chain,
        stepmesh_ca::pem::encode_certs([svid.chain[1].as_ref()]),
    )
    .unwrap();
    for purpose in ["sslclient", "sslserver"] {
        let (ok, text) = openssl_verify(&pki.join("root.crt"), &chain, &leaf, purpose);
        assert!(ok && text.contains(": OK"), "{purpose}: {text}");
    }
    // The control: another root does not verify it.
    let (ok, text) = openssl_verify(&pki.join("webhook-ca.crt"), &chain, &leaf, "sslclient");
    assert!(!ok, "verified against the wrong root: {text}");
}
