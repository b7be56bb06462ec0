//! The CA's TokenReview verifier against a real kube-apiserver and etcd
//! (envtest; skipped with a printed reason without KUBEBUILDER_ASSETS).
//! tests/ca_k8s.rs holds the verifiers' other cases, against a local
//! stand-in speaking the TokenReview JSON.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::ca::{sign_request, CaProcess};
use common::envtest::Envtest;
use serde_json::{json, Value};
use stepmesh_ca::client::Credential;

const TD: &str = "td.test";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The TokenReview verifier against a real kube-apiserver (envtest), as the
/// CA's ServiceAccount with exactly deploy/ca/rbac.yaml: a projected token
/// for the CA's audience becomes its ServiceAccount's SVID; a forged one is
/// refused by the API server; tokens a review would refuse (garbage,
/// expired, a real token for the API server's own audience) are refused
/// without one, counted in the API server's audit log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenreview_against_the_real_api_server_reviews_only_plausible_tokens() {
    let Some(k8s) = Envtest::shared() else { return };
    k8s.create_namespace("stepmesh-system");
    k8s.create_namespace("ca-review");
    let rbac =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/ca/rbac.yaml"))
            .unwrap();
    k8s.apply(&rbac);
    let own = k8s.service_account_token("stepmesh-system", "stepmesh-ca", "");
    let dir = tempfile::tempdir().unwrap();
    let ca = CaProcess::start_reviewing(TD, &k8s.url, dir.path(), &k8s.ca_pem, &own);
    let reviews = || {
        k8s.audit()
            .events()
            .iter()
            .filter(|e| {
                e.request_uri
                    .starts_with("/apis/authentication.k8s.io/v1/tokenreviews")
                    && e.user.username == "system:serviceaccount:stepmesh-system:stepmesh-ca"
                    && e.stage == "ResponseComplete"
            })
            .count()
    };
    let web = k8s.service_account_token("ca-review", "web", "stepmesh-ca");
    let svid = ca
        .client()
        .issue(&Credential::Token(web.clone()), None)
        .await
        .unwrap();
    assert_eq!(svid.id.as_str(), "spiffe://td.test/ns/ca-review/sa/web");

    let mut grpc = ca.client().grpc();
    // Forged: the right shape and claims, no valid signature.
    let (head, rest) = web.split_once('.').unwrap();
    let (body, _) = rest.split_once('.').unwrap();
    let forged = format!(
        "{head}.{body}.{}",
        URL_SAFE_NO_PAD.encode(b"not the signature")
    );
    let err = grpc.sign(sign_request(&forged)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    ca.wait_audit(|v| v["reason"] == "not_authenticated");

    let for_the_api_server = k8s.service_account_token("ca-review", "web", "");
    let expired = {
        let mut claims: Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(body)
                .unwrap(),
        )
        .unwrap();
        claims["exp"] = json!(now() - 3600);
        format!(
            "{head}.{}.{}",
            URL_SAFE_NO_PAD.encode(claims.to_string()),
            URL_SAFE_NO_PAD.encode(b"x")
        )
    };
    for (token, reason) in [
        ("a.b.c".to_owned(), "malformed"),
        (expired, "expired"),
        (for_the_api_server, "wrong_audience"),
    ] {
        let err = grpc.sign(sign_request(&token)).await.unwrap_err();
        assert_eq!(
            err.code(),
            tonic::Code::Unauthenticated,
            "{reason}: {err:?}"
        );
        assert!(
            err.message().contains("before review"),
            "{reason}: {}",
            err.message()
        );
        ca.wait_audit(|v| v["reason"] == reason);
    }
    let start = Instant::now();
    while reviews() < 2 && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(reviews(), 2, "the good and the forged token, nothing else");
}
