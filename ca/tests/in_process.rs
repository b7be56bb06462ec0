//! The CA embedded in-process through `server::start` (as `stepmesh demo`
//! embeds it): health service, join-token reload, refusal of unsafe state.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use stepmesh_ca::client::{CaClient, Credential};
use stepmesh_ca::server::{start, CaConfig};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn config(dir: &std::path::Path) -> CaConfig {
    let join = dir.join("join");
    std::fs::write(&join, "tok-a spiffe://td/ns/a/sa/a\n").unwrap();
    let mut c = CaConfig::new("td".parse().unwrap(), dir.join("state"));
    c.join_tokens = Some(join);
    c.poll_interval = Duration::from_millis(50);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_service_reports_serving() {
    let dir = tempfile::tempdir().unwrap();
    let ca = start(config(dir.path())).await.unwrap();
    let client = CaClient::connect(
        &format!("localhost:{}", ca.grpc_addr.port()),
        &ca.bundle_pem(),
    )
    .unwrap();
    let mut health = HealthClient::new(client.channel());
    for service in ["", "stepmesh.ca.v1.CertificateAuthority"] {
        let resp = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap();
        assert_eq!(
            resp.get_ref().status(),
            ServingStatus::Serving,
            "{service:?}"
        );
    }
    let svid = client
        .issue(&Credential::Token("tok-a".into()), None)
        .await
        .unwrap();
    assert_eq!(svid.id.as_str(), "spiffe://td/ns/a/sa/a");
    ca.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_token_file_is_reloaded_while_serving() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let join = cfg.join_tokens.clone().unwrap();
    let ca = start(cfg).await.unwrap();
    let client = CaClient::connect(
        &format!("localhost:{}", ca.grpc_addr.port()),
        &ca.bundle_pem(),
    )
    .unwrap();
    let issue = |t: &str| {
        let cred = Credential::Token(t.to_owned());
        let client = client.clone();
        async move { client.issue(&cred, None).await }
    };
    assert!(issue("tok-b").await.is_err());

    std::fs::write(
        &join,
        "tok-a spiffe://td/ns/a/sa/a\ntok-b spiffe://td/ns/b/sa/b\n",
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match issue("tok-b").await {
            Ok(svid) => {
                assert_eq!(svid.id.as_str(), "spiffe://td/ns/b/sa/b");
                break;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "tok-b never accepted: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    ca.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_or_foreign_state_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = start(config(dir.path())).await.unwrap();
    ca.shutdown().await;
    let key = dir.path().join("state/ca-key.pem");

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = start(config(dir.path())).await.err().unwrap().to_string();
    assert!(
        err.contains("chmod 600") && err.contains("ca-key.pem"),
        "{err}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    let mut other = config(dir.path());
    other.trust_domain = "other.td".parse().unwrap();
    let err = start(other).await.err().unwrap().to_string();
    assert!(err.contains("trust domain \"td\""), "{err}");

    std::fs::remove_file(dir.path().join("state/ca-cert.pem")).unwrap();
    let err = start(config(dir.path())).await.err().unwrap().to_string();
    assert!(err.contains("refusing to make a new root"), "{err}");
    assert!(key.exists(), "the old key is left untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_open_watch_streams_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let ca = start(config(dir.path())).await.unwrap();
    let client = CaClient::connect(
        &format!("localhost:{}", ca.grpc_addr.port()),
        &ca.bundle_pem(),
    )
    .unwrap();
    let mut watch = client.watch_trust_bundle().await.unwrap();
    assert_eq!(watch.next().await.unwrap().unwrap().sequence, 1);
    let started = Instant::now();
    ca.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "shutdown took {:?}",
        started.elapsed()
    );
    let end = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .unwrap();
    assert!(end.is_none_or(|r| r.is_err()), "the stream ends");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_svids_verify_against_the_published_jwks_and_the_key_survives_a_restart() {
    use jsonwebtoken::{decode, decode_header, jwk::JwkSet, DecodingKey, Validation};
    let dir = tempfile::tempdir().unwrap();
    let ca = start(config(dir.path())).await.unwrap();
    let client = CaClient::connect(
        &format!("localhost:{}", ca.grpc_addr.port()),
        &ca.bundle_pem(),
    )
    .unwrap();
    let aud = vec!["db".to_owned(), "queue".to_owned()];
    let jwt = client
        .sign_jwt_svid("tok-a", &aud, Some(Duration::from_secs(3600)))
        .await
        .unwrap();
    assert_eq!(jwt.spiffe_id, "spiffe://td/ns/a/sa/a");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(jwt.expires_at <= now + 301, "capped at 5 minutes");
    let jwks = client.trust_bundle().await.unwrap().jwks_json;
    let set: JwkSet = serde_json::from_str(&jwks).unwrap();
    let header = decode_header(&jwt.token).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::ES256);
    let key = set.find(header.kid.as_deref().unwrap()).unwrap();
    let mut v = Validation::new(jsonwebtoken::Algorithm::ES256);
    v.set_audience(&["queue"]);
    let claims = decode::<serde_json::Value>(&jwt.token, &DecodingKey::from_jwk(key).unwrap(), &v)
        .unwrap()
        .claims;
    assert_eq!(claims["sub"], "spiffe://td/ns/a/sa/a");
    assert_eq!(claims["aud"], serde_json::json!(["db", "queue"]));

    let err = client.sign_jwt_svid("tok-a", &[], None).await.unwrap_err();
    assert!(err.to_string().contains("audience"), "{err}");
    let err = client.sign_jwt_svid("nope", &aud, None).await.unwrap_err();
    assert!(
        err.to_string().to_lowercase().contains("unauthenticated"),
        "{err}"
    );
    let mode = std::fs::metadata(dir.path().join("state/jwt-svid-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    ca.shutdown().await;

    let again = start(config(dir.path())).await.unwrap();
    let client = CaClient::connect(
        &format!("localhost:{}", again.grpc_addr.port()),
        &again.bundle_pem(),
    )
    .unwrap();
    assert_eq!(
        client.trust_bundle().await.unwrap().jwks_json,
        jwks,
        "same key"
    );
    again.shutdown().await;
}
