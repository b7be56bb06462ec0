//! JWKS documents come over the network from identity providers and the
//! Kubernetes API server: the one parser (`stepmesh_ca::jwt::KeySet::parse`,
//! behind both the sidecar's step-up providers and the CA's k8s-jwks
//! verifier) must survive any body. Properties: a loaded set is never
//! empty; no symmetric algorithm ever finds a key; the lookup is consistent
//! (a kid-less lookup never reports an unknown kid).
#![no_main]

use jsonwebtoken::Algorithm;
use libfuzzer_sys::fuzz_target;
use stepmesh_ca::jwt::{KeySet, Lookup};

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
});
