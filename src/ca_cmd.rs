//! `stepmesh ca ...`: runs the certificate authority of the `stepmesh-ca` crate.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Subcommand};

/// `stepmesh ca` subcommands.
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Serve the gRPC certificate authority.
    Serve(CaServeArgs),
}

/// Flags of `stepmesh ca serve`.
#[derive(Debug, Args)]
pub struct CaServeArgs {
    /// gRPC (TLS) listen address.
    #[arg(long, default_value = "127.0.0.1:15012", env = "STEPMESH_CA_LISTEN")]
    pub listen: SocketAddr,
    /// Admin listen address (/healthz, /ready, /metrics).
    #[arg(long, default_value = "127.0.0.1:15014", env = "STEPMESH_CA_ADMIN")]
    pub admin: SocketAddr,
    /// Trust domain of every issued SPIFFE ID.
    #[arg(long, default_value = "cluster.local", env = "STEPMESH_TRUST_DOMAIN")]
    pub trust_domain: String,
    /// Directory holding the root key (0600) and bundle.pem.
    #[arg(long, env = "STEPMESH_CA_STATE_DIR")]
    pub state_dir: PathBuf,
}

/// Runs a `stepmesh ca` subcommand.
pub async fn run(cmd: CaCommand) -> anyhow::Result<()> {
    match cmd {
        CaCommand::Serve(args) => anyhow::bail!("ca serve is not built yet ({args:?})"),
    }
}
