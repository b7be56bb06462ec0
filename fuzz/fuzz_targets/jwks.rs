//! JWKS documents come over the network from identity providers and the
//! Kubernetes API server: the step-up parser (`stepup::jwks::KeySet::parse`)
//! and the CA's k8s-jwks loader (`k8s_jwks::usable_keys`) must survive any
//! body. Properties: a loaded set is never empty; every key the CA keeps
//! has a `kid` and an asymmetric algorithm (never HMAC); the step-up set's
//! lookup is consistent (a kid-less lookup finds keys for an algorithm
//! exactly when some key fits it).
#![no_main]

use jsonwebtoken::Algorithm;
use libfuzzer_sys::fuzz_target;
use stepmesh::stepup::jwks::{KeySet, Lookup};
use stepmesh_ca::authn::k8s_jwks;

const ALGS: [Algorithm; 10] = [
    Algorithm::HS256,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::EdDSA,
];

fuzz_target!(|data: &[u8]| {
    if let Ok(set) = KeySet::parse(data) {
        assert!(!set.is_empty() && set.len() > 0, "an empty key set loaded");
        let _ = format!("{set:?}");
        for alg in ALGS {
            let any = match set.find(None, alg) {
                Lookup::Found(keys) => {
                    assert!(!keys.is_empty(), "Found with no key");
                    true
                }
                Lookup::NoKeyForAlg => false,
                Lookup::UnknownKid => panic!("a kid-less lookup cannot miss a kid"),
            };
            if matches!(alg, Algorithm::HS256) {
                assert!(!any, "a symmetric algorithm found a key");
            }
            let _ = set.find(Some(""), alg);
            let _ = set.find(Some("kid"), alg);
        }
    }
    if let Ok(keys) = k8s_jwks::usable_keys(data) {
        assert!(!keys.is_empty(), "an empty k8s key set loaded");
        for (_kid, alg) in &keys {
            assert!(
                !matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512),
                "an HMAC key was kept"
            );
        }
        assert!(
            keys.windows(2).all(|w| w[0].0 < w[1].0),
            "kids unique and sorted"
        );
    }
});
