//! The CA end to end: a real `stepmesh ca serve` process, real gRPC over TLS.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::{Duration, SystemTime};

use common::ca::CaProcess;
use rustls_pki_types::CertificateDer;
use stepmesh_ca::client::{make_csr, Credential};
use stepmesh_ca::proto::v1::SignRequest;
use stepmesh_ca::spiffe_id::SpiffeId;
use stepmesh_ca::testing::Pki;
use x509_parser::prelude::*;

const TD: &str = "td.test";
const WEB: &str = "spiffe://td.test/ns/default/sa/web";

fn ca() -> CaProcess {
    CaProcess::start(TD, &[("tok-web", WEB)])
}

fn openssl() -> bool {
    Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn signed(ca: &CaProcess, token: &str, csr_pem: String) -> tonic::Request<SignRequest> {
    let _ = ca;
    let mut req = tonic::Request::new(SignRequest {
        csr_pem,
        ttl_seconds: 0,
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

fn fresh_csr() -> String {
    make_csr(&rcgen::KeyPair::generate().unwrap(), None).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issued_chain_passes_openssl_verify_and_carries_only_the_proven_identity() {
    let ca = ca();
    let svid = ca.issue("tok-web").await;
    assert_eq!(svid.id.as_str(), WEB);

    let (_, leaf) = X509Certificate::from_der(&svid.chain[0]).unwrap();
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    let uris: Vec<_> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    assert_eq!(uris, vec![WEB], "exactly one URI SAN, the proven identity");
    assert!(!leaf.is_ca());
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign() && !ku.crl_sign());
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert!(leaf.raw_serial().len() >= 16, "128-bit random serial");
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let nb = leaf.validity().not_before.timestamp();
    let na = leaf.validity().not_after.timestamp();
    assert!(
        (now - 300..=now - 59).contains(&nb),
        "notBefore backdated 60 s: {nb} vs now {now}"
    );
    assert!(
        (na - nb - 24 * 3600 - 60).abs() <= 5,
        "default TTL 24h: {}",
        na - nb
    );

    let audit = ca.wait_audit(|v| v["outcome"] == "issued");
    assert_eq!(audit["identity"], WEB);
    assert_eq!(audit["serial"], svid.serial.as_str());
    assert_eq!(audit["verifier"], "join-token");
    assert_eq!(audit["not_after"], na);
    assert!(
        !ca.logs().join("\n").contains("tok-web"),
        "the token must never be logged"
    );

    if !openssl() {
        eprintln!("skipping the openssl check: openssl is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let leaf_path = dir.path().join("leaf.pem");
    std::fs::write(
        &leaf_path,
        stepmesh_ca::pem::encode("CERTIFICATE", &svid.chain[0]),
    )
    .unwrap();
    let out = Command::new("openssl")
        .args(["verify", "-purpose", "sslclient", "-CAfile"])
        .arg(&ca.bundle_path)
        .arg(&leaf_path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains(": OK"),
        "openssl verify: {text}"
    );

    // And `stepmesh cert inspect` on the same file.
    let out = Command::new(env!("CARGO_BIN_EXE_stepmesh"))
        .args(["cert", "inspect"])
        .arg(&leaf_path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains(&format!("SPIFFE ID:  {WEB}")), "{text}");
    assert!(text.contains("Key type:   ECDSA P-256"), "{text}");
    assert!(
        text.contains(&format!("Serial:     {}", svid.serial)),
        "{text}"
    );
    assert!(text.contains("stepmesh root CA td.test"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csr_for_another_identity_is_permission_denied_and_nothing_is_issued() {
    let ca = ca();
    let other = SpiffeId::parse("spiffe://td.test/ns/kube-system/sa/admin").unwrap();
    let csr = make_csr(&rcgen::KeyPair::generate().unwrap(), Some(&other)).unwrap();
    let err = ca
        .client()
        .grpc()
        .sign(signed(&ca, "tok-web", csr))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("kube-system"), "{}", err.message());
    let audit = ca.wait_audit(|v| v["outcome"] == "denied");
    assert_eq!(audit["reason"], "identity_mismatch");
    assert_eq!(audit["identity"], WEB);
    assert!(
        ca.audit().iter().all(|v| v["outcome"] != "issued"),
        "nothing issued"
    );
    let (_, metrics) = ca.admin_get("/metrics");
    assert!(!metrics.contains("outcome=\"issued\""), "{metrics}");
    assert!(metrics.contains("outcome=\"denied\""), "{metrics}");

    // Asking for exactly the proven identity is fine.
    let own = SpiffeId::parse(WEB).unwrap();
    let csr = make_csr(&rcgen::KeyPair::generate().unwrap(), Some(&own)).unwrap();
    let ok = ca
        .client()
        .grpc()
        .sign(signed(&ca, "tok-web", csr))
        .await
        .unwrap();
    assert_eq!(ok.get_ref().cert_chain_pem.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_are_unauthenticated() {
    let ca = ca();
    let mut grpc = ca.client().grpc();
    // No credential at all.
    let err = grpc
        .sign(tonic::Request::new(SignRequest {
            csr_pem: fresh_csr(),
            ttl_seconds: 0,
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("no credential"), "{}", err.message());
    // A join token not in the file, and a malformed header.
    for (token, reason) in [
        ("tok-unknown", "unknown_token"),
        ("", "malformed_authorization"),
    ] {
        let err = grpc
            .sign(signed(&ca, token, fresh_csr()))
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            tonic::Code::Unauthenticated,
            "{token:?}: {err:?}"
        );
        ca.wait_audit(|v| v["reason"] == reason && v["outcome"] == "unauthenticated");
    }
    // A client certificate from a foreign PKI.
    let pki = Pki::new(TD);
    let foreign = pki.leaf(WEB);
    let cred = Credential::Svid {
        chain: foreign.chain.clone(),
        key: foreign.key(),
    };
    let err = ca.client().issue(&cred, None).await.unwrap_err();
    assert!(err.to_string().contains("Unauthenticated"), "{err}");
    ca.wait_audit(|v| v["reason"] == "unknown_issuer");
    assert!(
        ca.audit().iter().all(|v| v["outcome"] != "issued"),
        "nothing issued"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_by_a_valid_svid_keeps_the_identity() {
    let ca = ca();
    let first = ca.issue("tok-web").await;
    let cred = Credential::Svid {
        chain: first.chain.clone(),
        key: first.key.clone_key(),
    };
    let second = ca
        .client()
        .issue(&cred, Some(Duration::from_secs(600)))
        .await
        .unwrap();
    assert_eq!(second.id, first.id);
    assert_ne!(second.serial, first.serial);
    let left = second.not_after.duration_since(SystemTime::now()).unwrap();
    assert!(
        left <= Duration::from_secs(600) && left > Duration::from_secs(500),
        "{left:?}"
    );
    ca.wait_audit(|v| v["verifier"] == "svid" && v["outcome"] == "issued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors_and_the_ca_keeps_serving() {
    let ca = ca();
    let mut grpc = ca.client().grpc();
    let good = fresh_csr();
    // A CSR whose self-signature is broken: flip a bit in the signature.
    let der = CertificateDer::from(
        rustls_pki_types::pem::PemObject::from_pem_slice(good.as_bytes())
            .map(|d: rustls_pki_types::CertificateSigningRequestDer| d.as_ref().to_vec())
            .unwrap(),
    );
    let mut bytes = der.as_ref().to_vec();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x01;
    let bad_sig = stepmesh_ca::pem::encode("CERTIFICATE REQUEST", &bytes);

    let mut cases = vec![
        (
            "not a csr".to_owned(),
            tonic::Code::InvalidArgument,
            "malformed CSR",
        ),
        (
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
                .to_owned(),
            tonic::Code::InvalidArgument,
            "malformed CSR",
        ),
        (
            bad_sig,
            tonic::Code::InvalidArgument,
            "signature does not verify",
        ),
        ("x".repeat(1 << 20), tonic::Code::OutOfRange, "too large"),
    ];
    if openssl() {
        cases.push((
            rsa_1024_csr(),
            tonic::Code::InvalidArgument,
            "RSA key of 1024 bits",
        ));
    } else {
        eprintln!("skipping the RSA-1024 case: openssl is not installed");
    }
    for (csr, code, needle) in cases {
        let err = grpc.sign(signed(&ca, "tok-web", csr)).await.unwrap_err();
        assert_eq!(err.code(), code, "{needle}: {err:?}");
        assert!(
            err.message().contains(needle),
            "{needle}: {}",
            err.message()
        );
        // Still serving: a good request right after works.
        let ok = grpc
            .sign(signed(&ca, "tok-web", fresh_csr()))
            .await
            .unwrap();
        assert!(!ok.get_ref().cert_chain_pem.is_empty());
    }
    // A negative TTL is refused too.
    let mut req = signed(&ca, "tok-web", fresh_csr());
    req.get_mut().ttl_seconds = -5;
    let err = grpc.sign(req).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

fn rsa_1024_csr() -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("openssl")
        .args([
            "req", "-new", "-newkey", "rsa:1024", "-nodes", "-subj", "/CN=weak", "-keyout",
        ])
        .arg(dir.path().join("k.pem"))
        .arg("-out")
        .arg(dir.path().join("r.pem"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(dir.path().join("r.pem")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ed25519_and_rsa_2048_csrs_are_signed() {
    let ca = ca();
    let mut grpc = ca.client().grpc();
    for alg in [&rcgen::PKCS_ED25519, &rcgen::PKCS_RSA_SHA256] {
        let key = if alg == &rcgen::PKCS_RSA_SHA256 {
            rcgen::KeyPair::generate_rsa_for(alg, rcgen::RsaKeySize::_2048).unwrap()
        } else {
            rcgen::KeyPair::generate_for(alg).unwrap()
        };
        let resp = grpc
            .sign(signed(&ca, "tok-web", make_csr(&key, None).unwrap()))
            .await
            .unwrap();
        let pem = &resp.get_ref().cert_chain_pem[0];
        let der: CertificateDer =
            rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes()).unwrap();
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        assert_eq!(
            cert.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_the_same_state_dir_serves_the_same_root_with_0600_key() {
    use std::os::unix::fs::PermissionsExt;
    let ca = ca();
    let before = ca.bundle_pem.clone();
    let key = ca.state_dir.join("ca-key.pem");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let ca = ca.restart(&[]);
    assert_eq!(ca.bundle_pem, before, "same root after restart");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let got = ca.client().trust_bundle().await.unwrap();
    assert_eq!(got.bundle.to_pem(), before);
    // An SVID from the restarted CA verifies against the bundle from before.
    let svid = ca.issue("tok-web").await;
    let bundle = stepmesh_ca::svid::TrustBundle::from_pem(TD.parse().unwrap(), &before).unwrap();
    stepmesh_ca::svid::verify(&svid.chain, &bundle, rustls_pki_types::UnixTime::now()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_trust_bundle_sends_the_new_bundle_when_roots_change() {
    let ca = CaProcess::start_with(TD, &[("tok-web", WEB)], &["--poll-interval", "100ms"]);
    let mut watch = ca.client().watch_trust_bundle().await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(30), watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.sequence, 1);
    assert_eq!(first.bundle.roots().len(), 1);

    let next_root = Pki::new(TD);
    std::fs::write(ca.state_dir.join("extra-roots.pem"), next_root.bundle_pem()).unwrap();
    let second = tokio::time::timeout(Duration::from_secs(30), watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(second.sequence, 2);
    assert_eq!(second.bundle.roots().len(), 2);
    assert!(second.bundle.roots().contains(&next_root.root.cert));
    let on_disk = std::fs::read_to_string(&ca.bundle_path).unwrap();
    assert_eq!(on_disk, second.bundle.to_pem(), "bundle.pem follows");
    let got = ca.client().trust_bundle().await.unwrap();
    assert_eq!(got.sequence, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_identity_rate_limit() {
    let ca = CaProcess::start_with(
        TD,
        &[
            ("tok-web", WEB),
            ("tok-db", "spiffe://td.test/ns/default/sa/db"),
        ],
        &["--sign-rate", "0.001", "--sign-burst", "2"],
    );
    let mut grpc = ca.client().grpc();
    for _ in 0..2 {
        grpc.sign(signed(&ca, "tok-web", fresh_csr()))
            .await
            .unwrap();
    }
    let err = grpc
        .sign(signed(&ca, "tok-web", fresh_csr()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("rate limit"), "{}", err.message());
    grpc.sign(signed(&ca, "tok-db", fresh_csr()))
        .await
        .expect("another identity is not limited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints() {
    let ca = ca();
    assert_eq!(ca.admin_get("/healthz"), (200, "ok\n".to_owned()));
    assert_eq!(ca.admin_get("/ready").0, 200);
    assert_eq!(ca.admin_get("/nope").0, 404);
    ca.issue("tok-web").await;
    let (status, metrics) = ca.admin_get("/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains(
            "stepmesh_ca_sign_total{outcome=\"issued\",verifier=\"join-token\",reason=\"ok\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("stepmesh_ca_trust_bundle_sequence 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intermediate_mode_signs_under_the_outside_intermediate() {
    use std::os::unix::fs::PermissionsExt;
    let pki = Pki::new(TD);
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, roots) = (
        dir.path().join("int.pem"),
        dir.path().join("int-key.pem"),
        dir.path().join("roots.pem"),
    );
    std::fs::write(&cert, &pki.intermediate.cert_pem).unwrap();
    std::fs::write(&key, &pki.intermediate.key_pem).unwrap();
    if openssl() {
        // cert-manager and Vault write SEC1 ("EC PRIVATE KEY"); accept that too.
        let out = Command::new("openssl")
            .args(["ec", "-in"])
            .arg(&key)
            .arg("-out")
            .arg(&key)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(std::fs::read_to_string(&key)
            .unwrap()
            .contains("EC PRIVATE KEY"));
    }
    std::fs::write(&roots, pki.bundle_pem()).unwrap();
    let args = [
        "--intermediate-cert",
        cert.to_str().unwrap(),
        "--intermediate-key",
        key.to_str().unwrap(),
        "--root-bundle",
        roots.to_str().unwrap(),
    ];
    // A key others can read is refused, naming the file.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = common::ca::serve_refused(&dir.path().join("state"), &args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("int-key.pem") && err.contains("mode 644"),
        "{err}"
    );
    // Group-readable (a Secret with defaultMode 0440 for fsGroup) is accepted.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let mut with_poll = args.to_vec();
    with_poll.extend(["--poll-interval", "100ms"]);
    let ca = CaProcess::start_with(TD, &[("tok-web", WEB)], &with_poll);
    assert_eq!(ca.bundle_pem, pki.bundle_pem(), "serves the outside roots");
    // The outside PKI adds a root: served and written to bundle.pem.
    let mut watch = ca.client().watch_trust_bundle().await.unwrap();
    assert_eq!(watch.next().await.unwrap().unwrap().sequence, 1);
    let next_root = Pki::new(TD);
    std::fs::write(&roots, pki.bundle_pem() + &next_root.bundle_pem()).unwrap();
    let update = tokio::time::timeout(Duration::from_secs(30), watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((update.sequence, update.bundle.roots().len()), (2, 2));
    assert_eq!(
        std::fs::read_to_string(&ca.bundle_path).unwrap(),
        update.bundle.to_pem()
    );
    let svid = ca.issue("tok-web").await;
    assert_eq!(svid.chain.len(), 2, "leaf + intermediate");
    assert_eq!(svid.chain[1], pki.intermediate.cert);
    stepmesh_ca::svid::verify(
        &svid.chain,
        &pki.bundle(),
        rustls_pki_types::UnixTime::now(),
    )
    .unwrap();
    assert!(
        !ca.state_dir.join("ca-key.pem").exists(),
        "no root made in intermediate mode"
    );

    if openssl() {
        let leaf = dir.path().join("leaf.pem");
        std::fs::write(
            &leaf,
            stepmesh_ca::pem::encode("CERTIFICATE", &svid.chain[0]),
        )
        .unwrap();
        let out = Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(&ca.bundle_path)
            .arg("-untrusted")
            .arg(&cert)
            .arg(&leaf)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn bad_flags_exit_nonzero_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.pem");
    std::fs::write(&key, "junk").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--trust-domain".into(), "Bad.Domain".into()],
            "trust domain",
        ),
        (vec!["--default-ttl".into(), "48h".into()], "--default-ttl"),
        (
            vec!["--join-tokens".into(), "/nonexistent/tokens".into()],
            "/nonexistent/tokens",
        ),
        (vec!["--k8s-jwks".into(), "/x.json".into()], "--k8s-issuer"),
    ];
    for (args, needle) in cases {
        let out = common::ca::serve_refused(&dir.path().join("state"), &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}
