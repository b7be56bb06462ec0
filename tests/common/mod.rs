//! Helpers shared by the integration tests (each test binary uses a subset).
#![allow(dead_code, clippy::unwrap_used)]

pub mod mesh;
