//! Helpers shared by the integration tests (each test binary includes this
//! module with `mod common;` and uses what it needs).

#![allow(dead_code, clippy::unwrap_used)]

pub mod any_server;
pub mod ca;
pub mod ca_mesh;
pub mod capture;
pub mod cli;
pub mod envtest;
pub mod gateway;
pub mod kube_client;
pub mod mesh;
pub mod netns;

/// `stepmesh proxy` with identity files that do not exist, one inbound
/// listener and an admin port: a command line that parses, for tests of
/// what happens after parsing (exit codes, log output, flag grammars).
pub const PROXY_WITHOUT_FILES: [&str; 11] = [
    "proxy",
    "--cert",
    "/nonexistent/c.pem",
    "--key",
    "/nonexistent/k.pem",
    "--bundle",
    "/nonexistent/b.pem",
    "--inbound",
    "127.0.0.1:0=127.0.0.1:1",
    "--admin",
    "127.0.0.1:0",
];
