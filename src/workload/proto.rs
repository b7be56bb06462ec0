//! Generated protobuf and gRPC code for the SPIFFE Workload API
//! (`proto/spiffe/workload.proto`, which has no package).

#![allow(missing_docs, clippy::all, clippy::pedantic, clippy::unwrap_used)]

tonic::include_proto!("_");
