//! Key-set tests (`stepmesh_ca::jwt::KeySet`), here where the test IdP is.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use crate::stepup::testing::TestIdp;
use jsonwebtoken::Algorithm;
use serde_json::json;
use stepmesh_ca::jwt::{JwksError, KeySet, Lookup};

#[test]
fn keeps_signature_keys_and_skips_the_rest() {
    let idp = TestIdp::with_kids("https://idp", "e1", "r1").unwrap();
    let mut doc = idp.jwks();
    let keys = doc["keys"].as_array_mut().unwrap();
    keys.push(json!({"kty": "oct", "kid": "h1", "k": "c2VjcmV0"}));
    keys.push(json!({"kty": "RSA", "use": "enc", "kid": "enc1", "n": "AQAB", "e": "AQAB"}));
    keys.push(json!({"kty": "XYZ", "kid": "odd"}));
    let set = KeySet::parse(doc.to_string().as_bytes()).unwrap();
    assert_eq!(set.len(), 2);
    assert!(matches!(set.find(Some("e1"), Algorithm::ES256), Lookup::Found(v) if v.len() == 1));
    assert!(matches!(
        set.find(Some("r1"), Algorithm::RS256),
        Lookup::Found(_)
    ));
    assert!(matches!(
        set.find(Some("r1"), Algorithm::ES256),
        Lookup::NoKeyForAlg
    ));
    assert!(matches!(
        set.find(Some("e1"), Algorithm::RS256),
        Lookup::NoKeyForAlg
    ));
    assert!(matches!(
        set.find(Some("h1"), Algorithm::HS256),
        Lookup::UnknownKid
    ));
    assert!(matches!(
        set.find(Some("zz"), Algorithm::ES256),
        Lookup::UnknownKid
    ));
    assert!(matches!(set.find(None, Algorithm::ES256), Lookup::Found(v) if v.len() == 1));
    assert!(matches!(
        set.find(None, Algorithm::HS256),
        Lookup::NoKeyForAlg
    ));
}

#[test]
fn empty_and_garbage_are_errors() {
    assert_eq!(
        KeySet::parse(b"{\"keys\": []}").unwrap_err(),
        JwksError::Empty
    );
    assert_eq!(
        KeySet::parse(b"{\"keys\": [{\"kty\": \"oct\", \"k\": \"AA\"}]}").unwrap_err(),
        JwksError::Empty
    );
    assert!(matches!(
        KeySet::parse(b"<html>").unwrap_err(),
        JwksError::Malformed(_)
    ));
    assert!(matches!(
        KeySet::parse(b"{\"k\": 1}").unwrap_err(),
        JwksError::Malformed(_)
    ));
}
