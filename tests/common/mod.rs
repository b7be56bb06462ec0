//! Helpers shared by the integration tests (each test binary includes this
//! module with `mod common;` and uses what it needs).

#![allow(dead_code, clippy::unwrap_used)]

pub mod ca;
pub mod capture;
pub mod mesh;
pub mod netns;
