//! Generated protobuf and gRPC code for `stepmesh.ca.v1` (see `proto/`).

#![allow(missing_docs, clippy::all, clippy::pedantic, clippy::unwrap_used)]

/// `stepmesh.ca.v1`: the certificate authority API.
pub mod v1 {
    tonic::include_proto!("stepmesh.ca.v1");
}
