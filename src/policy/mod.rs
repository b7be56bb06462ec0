//! Authorization policy: model, loading, decisions, NetworkPolicy compiler.

use std::path::PathBuf;

use clap::Subcommand;

/// `stepmesh policy` subcommands.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy file.
    Check {
        /// Policy file.
        file: PathBuf,
    },
}

/// Runs a `stepmesh policy` subcommand.
pub async fn run(cmd: PolicyCommand) -> anyhow::Result<()> {
    anyhow::bail!("policy tools are not built yet ({cmd:?})")
}
