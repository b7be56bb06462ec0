//! Generates the gRPC client and server for `proto/stepmesh/ca/v1/ca.proto`
//! with a vendored protoc, so no protoc needs installing by hand.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=../proto/stepmesh/ca/v1/ca.proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&["../proto/stepmesh/ca/v1/ca.proto"], &["../proto"])?;
    Ok(())
}
