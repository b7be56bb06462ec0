//! Bearer tokens reach the one JWT verifier (`stepmesh_ca::jwt`) from the
//! outside twice: through the step-up gate (`stepmesh::stepup::verify::{peek,
//! verify}`, the provider's rules) and through the CA's offline
//! ServiceAccount-token verifier (`stepmesh_ca::authn::k8s_jwks::K8sJwks`,
//! the CA's rules and the `kubernetes.io` mapping). Both parse the JOSE
//! header and the claims of tokens anyone can send.
//!
//! - raw mode: the input is the token. Neither verifier may ever accept it:
//!   the fixed JWKS holds keys made fresh in this process, so no valid
//!   signature is possible.
//! - signed mode: the input is the claims JSON of a token that IS properly
//!   signed (ES256, the JWKS's own key), so the claim checks run. What is
//!   accepted must meet the rules: issuer, audience, not expired, not from
//!   the future, and (k8s) `sub` agreeing with the `kubernetes.io` claim and
//!   the SPIFFE ID made from it.
//!
//! Input: byte 0 picks the mode.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use jsonwebtoken::Algorithm;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use stepmesh::policy::{JwksSource, ProviderConfig};
use stepmesh::stepup::gate::unix_now;
use stepmesh::stepup::jwks::KeySet;
use stepmesh::stepup::testing::TestIdp;
use stepmesh::stepup::verify::{peek, verify};
use stepmesh_ca::authn::k8s_jwks::{self, K8sJwks};

const ISS: &str = "https://idp.fuzz.test";
const AUD: &str = "stepmesh-fuzz";
const LEEWAY: u64 = 30;

struct Fixture {
    idp: TestIdp,
    keys: KeySet,
    stepup: ProviderConfig,
    stepup_typ: ProviderConfig,
    k8s: K8sJwks,
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

fn provider(typ: Option<Vec<String>>) -> ProviderConfig {
    ProviderConfig {
        name: Arc::from("fuzz"),
        token: stepmesh_ca::jwt::Rules {
            issuer: Some(ISS.into()),
            audiences: vec![AUD.into(), "other".into()],
            algorithms: vec![
                Algorithm::ES256,
                Algorithm::RS256,
                Algorithm::PS256,
                Algorithm::EdDSA,
            ],
            typ,
            leeway: Duration::from_secs(LEEWAY),
        },
        jwks: JwksSource::File("/nonexistent/jwks.json".into()),
        refresh: Duration::from_secs(300),
        min_refresh_interval: Duration::from_secs(10),
    }
}

// Fixture setup: a failure is a broken environment, not a finding.
#[allow(clippy::unwrap_used)]
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let idp = TestIdp::new(ISS).unwrap();
        let jwks = idp.jwks().to_string();
        let keys = KeySet::parse(jwks.as_bytes()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, &jwks).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let k8s = rt
            .block_on(K8sJwks::new(
                k8s_jwks::JwksSource::File(path),
                ISS.into(),
                AUD.into(),
                "td.fuzz".parse().unwrap(),
            ))
            .unwrap();
        Fixture {
            idp,
            keys,
            stepup: provider(None),
            stepup_typ: provider(Some(vec!["at+jwt".into(), "application/JWT".into()])),
            k8s,
            rt,
            _dir: dir,
        }
    })
}

fn raw(token: &str) {
    let fx = fixture();
    let now = unix_now();
    for cfg in [&fx.stepup, &fx.stepup_typ] {
        if let Ok(peeked) = peek(token, &cfg.token) {
            let verdict = verify(token, &peeked, &cfg.token, &fx.keys, now);
            assert!(
                verdict.is_err(),
                "step-up accepted a forged token: {verdict:?}"
            );
        }
    }
    let _ = fx.k8s.claims_issuer(token);
    let verdict = fx.rt.block_on(fx.k8s.verify(token));
    assert!(
        verdict.is_err(),
        "k8s-jwks accepted a forged token: {verdict:?}"
    );
}

fn seconds(v: Option<&Value>) -> Option<u64> {
    let n = v?.as_number()?;
    n.as_u64()
        .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
}

fn audience_ok(claims: &Value, want: &[&str]) -> bool {
    match claims.get("aud") {
        Some(Value::String(a)) => want.contains(&a.as_str()),
        Some(Value::Array(list)) => list
            .iter()
            .filter_map(Value::as_str)
            .any(|a| want.contains(&a)),
        _ => false,
    }
}

fn signed(claims_json: &[u8]) {
    let Ok(input) = serde_json::from_slice::<Value>(claims_json) else {
        return;
    };
    let fx = fixture();
    let Ok(token) = fx.idp.es256(&input) else {
        return;
    };
    // The reference is the claims as signed (the minter's JSON text) read
    // back by the same parser, not the input value: serde_json's default
    // float parsing is best-effort (its `float_roundtrip` feature is off),
    // so a long decimal may land one ULP away on the second reading.
    let claims: Value = serde_json::from_str(&input.to_string()).expect("serialized JSON parses");
    let now = unix_now();
    let peeked = peek(&token, &fx.stepup.token).expect("our own header passes peek");
    if let Ok(v) = verify(&token, &peeked, &fx.stepup.token, &fx.keys, now) {
        assert_eq!(claims.get("iss").and_then(Value::as_str), Some(ISS));
        assert!(
            audience_ok(&claims, &[AUD, "other"]),
            "accepted aud {:?}",
            claims.get("aud")
        );
        let exp = seconds(claims.get("exp")).expect("accepted without a numeric exp");
        assert_eq!(v.exp, exp);
        assert!(
            now < exp.saturating_add(LEEWAY),
            "accepted an expired token"
        );
        for name in ["nbf", "iat"] {
            if let Some(t) = seconds(claims.get(name)) {
                assert!(t <= now + LEEWAY, "accepted {name} in the future");
            }
        }
        assert_eq!(Value::Object(v.claims.clone()), claims);
    }
    if let Ok(id) = fx.rt.block_on(fx.k8s.verify(&token)) {
        assert_eq!(claims.get("iss").and_then(Value::as_str), Some(ISS));
        assert!(
            audience_ok(&claims, &[AUD]),
            "accepted aud {:?}",
            claims.get("aud")
        );
        let k8s = &claims["kubernetes.io"];
        let ns = k8s["namespace"]
            .as_str()
            .expect("accepted without a namespace");
        let sa = k8s["serviceaccount"]["name"]
            .as_str()
            .expect("accepted without a name");
        assert_eq!(
            claims.get("sub").and_then(Value::as_str),
            Some(format!("system:serviceaccount:{ns}:{sa}").as_str())
        );
        assert_eq!(id.as_str(), format!("spiffe://td.fuzz/ns/{ns}/sa/{sa}"));
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        if let Ok(token) = std::str::from_utf8(rest) {
            raw(token);
        }
    } else {
        signed(rest);
    }
});
