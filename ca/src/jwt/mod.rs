//! The one JWT verifier of stepmesh: JWKS key sets ([`keys`]), the key cache
//! and its refetch discipline ([`cache`]) and token verification against an
//! issuer's rules ([`mod@verify`]), used by the sidecar's step-up
//! providers, by the CA's `k8s-jwks` credential verifier and by the
//! Kubernetes API gateway.

pub mod cache;
pub mod keys;
pub mod verify;

pub use cache::KeyCache;
pub use keys::{alg_name, JwksError, KeySet, Lookup};
pub use verify::{
    check_unsigned, peek, verify, Peeked, Rules, TokenError, VerifiedToken, MAX_TOKEN,
};
