//! JWKS over HTTPS from a separate process: a flood of made-up kids stays
//! within the refetch rate; a rotated key is accepted after one refetch,
//! and a token cached under the key it replaced is refused; a
//! 500, an empty set and garbage never replace the last good keys.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

#[path = "common/idp.rs"]
mod idp;

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;
use serde_json::json;
use stepmesh::policy::{Policy, ProviderConfig};
use stepmesh::stepup::testing::{base_claims, TestIdp};
use stepmesh::stepup::{StepUp, StepUpMetrics, TokenError};

const ISS: &str = "https://idp.test";

fn provider_config(server: &idp::JwksServer, refresh: &str, min: &str) -> Arc<ProviderConfig> {
    let yaml = format!(
        "trustDomain: t.test\nstepUp:\n  providers:\n    idp:\n      issuer: {ISS}\n      jwks: {{url: \"{}\", caFile: {}, refresh: {refresh}, minRefreshInterval: {min}}}\n      audiences: [api]\n      algorithms: [ES256, RS256]\n",
        server.url(),
        server.ca_file.display()
    );
    Policy::from_yaml(&yaml)
        .unwrap()
        .provider("idp")
        .unwrap()
        .clone()
}

fn now() -> u64 {
    stepmesh::stepup::gate::unix_now()
}

fn token(idp: &TestIdp) -> String {
    idp.es256(&base_claims(ISS, "api", "alice")).unwrap()
}

fn metrics(reg: &Registry) -> String {
    let mut s = String::new();
    prometheus_client::encoding::text::encode(&mut s, reg).unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_kids_are_rate_limited_and_a_rotated_key_needs_one_refetch() {
    let idp = TestIdp::new(ISS).unwrap();
    let server = idp::JwksServer::start(&idp.jwks().to_string());
    let mut reg = Registry::default();
    let stepup = Arc::new(StepUp::new(StepUpMetrics::register(&mut reg)));
    let cfg = provider_config(&server, "1h", "1s");
    let provider = stepup.provider(&cfg).await;
    assert_eq!(provider.key_count(), 2);
    assert_eq!(server.hits(), 1, "one fetch at start");
    let old = token(&idp);
    assert!(provider.verify(&old, now()).await.is_ok());

    // Flood: 64 concurrent streams of tokens with made-up kids for ~3 s.
    let started = Instant::now();
    let before = server.hits();
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (provider, idp) = (provider.clone(), TestIdp::with_kids(ISS, "x", "y").unwrap());
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while started.elapsed() < Duration::from_secs(3) {
                let kid = format!("made-up-{}", fastrand::u64(..));
                let t = idp
                    .mint(
                        &json!({"alg": "ES256", "kid": kid}),
                        &base_claims(ISS, "api", "x"),
                    )
                    .unwrap();
                assert_eq!(
                    provider.verify(&t, now()).await.unwrap_err(),
                    TokenError::UnknownKid
                );
                n += 1;
            }
            n
        }));
    }
    let mut tokens = 0;
    for t in tasks {
        tokens += t.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let fetches = server.hits() - before;
    // One refetch per second at most (+1 for the boundary).
    assert!(tokens > 100, "the flood was real: {tokens} tokens");
    assert!(
        fetches as f64 <= elapsed.ceil() + 1.0,
        "{fetches} fetches in {elapsed:.1}s for {tokens} tokens"
    );
    assert!(fetches >= 1, "unknown kids do trigger refetches");

    // Rotation: the provider now publishes only a new key.
    let rotated = TestIdp::new(ISS).unwrap();
    server.answer(200, &rotated.jwks().to_string());
    tokio::time::sleep(Duration::from_millis(1100)).await; // past minRefreshInterval
    let before = server.hits();
    let claims = provider.verify(&token(&rotated), now()).await.unwrap();
    assert_eq!(claims.sub.as_deref(), Some("alice"));
    assert_eq!(
        server.hits() - before,
        1,
        "exactly one refetch for the new kid"
    );
    // The next token with the new kid needs no fetch at all.
    provider.verify(&token(&rotated), now()).await.unwrap();
    assert_eq!(server.hits() - before, 1);
    // A token verified (and cached) under the old key is not valid now.
    assert_eq!(
        provider.verify(&old, now()).await.unwrap_err(),
        TokenError::UnknownKid
    );
    let m = metrics(&reg);
    assert!(m.contains(r#"stepmesh_stepup_jwks_fetches_total{provider="idp",trigger="unknown_kid",result="ok"}"#), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_empty_and_garbage_answers_keep_the_last_good_keys() {
    let idp = TestIdp::new(ISS).unwrap();
    let server = idp::JwksServer::start(&idp.jwks().to_string());
    let mut reg = Registry::default();
    let stepup = StepUp::new(StepUpMetrics::register(&mut reg));
    // Scheduled refresh every second, so the bad answers are really fetched.
    let cfg = provider_config(&server, "1s", "1s");
    let provider = stepup.provider(&cfg).await;
    let bad_answers = [
        (500, "{\"error\": \"boom\"}", "error"),
        (200, "{\"keys\": []}", "empty"),
        (200, "<html>not json</html>", "malformed"),
        (
            200,
            "{\"keys\": [{\"kty\": \"oct\", \"k\": \"c2VjcmV0\", \"kid\": \"h\"}]}",
            "empty",
        ),
    ];
    for (status, body, result) in bad_answers {
        let seen = server.hits();
        server.answer(status, body);
        // Wait for two scheduled fetches of the bad answer (generous deadline).
        let deadline = Instant::now() + Duration::from_secs(30);
        while server.hits() < seen + 2 {
            assert!(Instant::now() < deadline, "no scheduled refresh happened");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // A fresh token (not in the cache) signed with the last good key passes.
        let fresh = idp
            .rs256(&base_claims(ISS, "api", &format!("u{}", fastrand::u32(..))))
            .unwrap();
        assert!(
            provider.verify(&fresh, now()).await.is_ok(),
            "after a {status} {body:?} answer"
        );
        assert_eq!(provider.key_count(), 2);
        let m = metrics(&reg);
        assert!(
            m.contains(&format!("stepmesh_stepup_jwks_fetches_total{{provider=\"idp\",trigger=\"schedule\",result=\"{result}\"}}")),
            "{m}"
        );
    }
    // An unknown kid during the outage refetches (rate-limited) and still fails cleanly.
    let stranger = TestIdp::new(ISS).unwrap();
    assert_eq!(
        provider.verify(&token(&stranger), now()).await.unwrap_err(),
        TokenError::UnknownKid
    );
    // Recovery: good keys again are picked up.
    server.answer(200, &stranger.jwks().to_string());
    let deadline = Instant::now() + Duration::from_secs(30);
    while provider.verify(&token(&stranger), now()).await.is_err() {
        assert!(Instant::now() < deadline, "recovered keys never picked up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_jwks_server_with_an_untrusted_certificate_is_refused() {
    let idp = TestIdp::new(ISS).unwrap();
    let server = idp::JwksServer::start(&idp.jwks().to_string());
    let yaml = format!(
        "trustDomain: t.test\nstepUp:\n  providers:\n    idp:\n      issuer: {ISS}\n      jwks: {{url: \"{}\"}}\n      audiences: [api]\n      algorithms: [ES256]\n",
        server.url()
    );
    let policy = Policy::from_yaml(&yaml).unwrap();
    let stepup = StepUp::new(StepUpMetrics::default());
    let provider = stepup.provider(policy.provider("idp").unwrap()).await;
    assert_eq!(
        provider.key_count(),
        0,
        "no caFile: the test CA is not trusted"
    );
    assert_eq!(
        provider.verify(&token(&idp), now()).await.unwrap_err(),
        TokenError::NoKeys
    );
}
