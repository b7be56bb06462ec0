//! The integration tests' envtest and gateway harness, shared as is.

#![allow(dead_code, missing_docs)]

#[path = "../../tests/common/envtest.rs"]
pub mod envtest;
#[path = "../../tests/common/gateway.rs"]
pub mod gateway;
#[path = "../../tests/common/kube_client.rs"]
pub mod kube_client;
