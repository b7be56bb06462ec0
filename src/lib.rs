//! stepmesh: a service-mesh sidecar that terminates and originates mTLS with
//! SPIFFE X.509-SVIDs, authorizes by workload identity and demands step-up
//! JWTs on sensitive HTTP routes. See ARCHITECTURE.md for the map.

pub mod app;
pub mod ca_cmd;
pub mod cert_cmd;
pub mod cli;
pub mod demo;
pub mod http;
pub mod init;
pub mod inject;
pub mod policy;
pub mod proxy;
pub mod stepup;
pub mod telemetry;
