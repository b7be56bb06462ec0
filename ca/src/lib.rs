//! stepmesh's identity authority: SPIFFE IDs, X.509-SVID issuance and
//! validation, trust bundles, credential verification and the gRPC CA.
//!
//! The sidecar (`stepmesh` crate) uses [`spiffe_id`] and [`svid`] in its TLS
//! verifiers and `client` to obtain its SVID; `stepmesh ca serve` runs
//! `server`.

pub mod admin;
pub mod authn;
pub mod calls;
pub mod client;
mod conn;
/// The gRPC port's connection caps (documented in docs/CA.md; tests hold them).
pub use conn::{MAX_CONNECTIONS, MAX_PER_SOURCE};
pub mod https;
pub mod jwt;
pub mod jwtsvid;
pub mod kube;
pub mod metrics;
pub mod pem;
pub mod proto;
pub mod ratelimit;
pub mod revocation;
pub mod server;
pub mod service;
pub mod shared_state;
pub mod signer;
pub mod spiffe_id;
pub mod store;
pub mod svid;
mod tasks;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tls;
