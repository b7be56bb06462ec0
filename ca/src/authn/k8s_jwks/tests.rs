//! The JWKS verifier in-process: key rotation through an unknown `kid`,
//! last good keys kept, unusable key sets refused.

#![allow(clippy::unwrap_used)]

use base64::Engine;
use jsonwebtoken::{EncodingKey, Header};
use serde_json::json;

use super::*;

const ISS: &str = "https://issuer.test";
const AUD: &str = "stepmesh-ca";

struct EcKey {
    kid: String,
    enc: EncodingKey,
    jwk: serde_json::Value,
}

fn ec_key(kid: &str) -> EcKey {
    let key = rcgen::KeyPair::generate().unwrap();
    let raw = key.public_key_raw();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwk = json!({"kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
                     "x": b64(&raw[1..33]), "y": b64(&raw[33..65])});
    EcKey {
        kid: kid.into(),
        enc: EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap(),
        jwk,
    }
}

fn token(key: &EcKey, ns: &str, sa: &str) -> String {
    let now = jsonwebtoken::get_current_timestamp();
    let claims = json!({"iss": ISS, "aud": [AUD], "exp": now + 600, "nbf": now - 10, "iat": now - 10,
                        "sub": format!("system:serviceaccount:{ns}:{sa}"),
                        "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": "u"}}});
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(key.kid.clone());
    jsonwebtoken::encode(&header, &claims, &key.enc).unwrap()
}

async fn verifier(path: &std::path::Path) -> Result<K8sJwks, JwksError> {
    K8sJwks::new(
        JwksSource::File(path.into()),
        ISS.into(),
        AUD.into(),
        "td".parse().unwrap(),
    )
    .await
}

fn write_jwks(path: &std::path::Path, keys: &[&EcKey]) {
    let keys: Vec<_> = keys.iter().map(|k| k.jwk.clone()).collect();
    std::fs::write(path, json!({"keys": keys}).to_string()).unwrap();
}

#[tokio::test]
async fn rotation_is_picked_up_through_an_unknown_kid() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    let (a, b) = (ec_key("a"), ec_key("b"));
    write_jwks(&path, &[&a]);
    let v = verifier(&path).await.unwrap();
    let id = v.verify(&token(&a, "ns1", "sa1")).await.unwrap();
    assert_eq!(id.as_str(), "spiffe://td/ns/ns1/sa/sa1");

    // The issuer rotates to key b; the first token with kid b triggers a fetch.
    write_jwks(&path, &[&a, &b]);
    let id = v.verify(&token(&b, "ns2", "sa2")).await.unwrap();
    assert_eq!(id.as_str(), "spiffe://td/ns/ns2/sa/sa2");

    // Another unknown kid right after does not fetch again (rate limit)...
    let c = ec_key("c");
    write_jwks(&path, &[&a, &b, &c]);
    let err = v.verify(&token(&c, "ns", "sa")).await.unwrap_err();
    assert_eq!(err.reason(), "unknown_kid");
    // ...until the scheduled refresh.
    v.refresh().await.unwrap();
    assert!(v.verify(&token(&c, "ns", "sa")).await.is_ok());
}

#[tokio::test]
async fn a_broken_or_empty_fetch_keeps_the_last_good_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    let a = ec_key("a");
    write_jwks(&path, &[&a]);
    let v = verifier(&path).await.unwrap();
    for broken in [
        "not json",
        r#"{"keys": []}"#,
        r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "a"}]}"#,
    ] {
        std::fs::write(&path, broken).unwrap();
        assert!(v.refresh().await.is_err(), "{broken}");
        assert!(
            v.verify(&token(&a, "ns", "sa")).await.is_ok(),
            "{broken}: old key lost"
        );
    }
}

#[tokio::test]
async fn symmetric_only_key_sets_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::write(
        &path,
        r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h", "alg": "HS256"}]}"#,
    )
    .unwrap();
    let err = verifier(&path).await.err().unwrap().to_string();
    assert!(err.contains("no usable signature keys"), "{err}");
}

#[tokio::test]
async fn token_algorithm_must_match_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    let a = ec_key("a");
    write_jwks(&path, &[&a]);
    let v = verifier(&path).await.unwrap();
    // Claim ES384 with an ES256 key's kid.
    let t = token(&a, "ns", "sa");
    let mut parts: Vec<&str> = t.split('.').collect();
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(json!({"alg": "ES384", "kid": "a"}).to_string());
    parts[0] = &header;
    let err = v.verify(&parts.join(".")).await.unwrap_err();
    assert_eq!(err.reason(), "alg_not_allowed");
}
