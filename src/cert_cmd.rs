//! `stepmesh cert ...`: certificate tools.

use std::path::PathBuf;

use clap::Subcommand;

/// `stepmesh cert` subcommands.
#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Print SPIFFE ID, issuer, validity and key type of a PEM certificate.
    Inspect {
        /// PEM file (the first certificate is inspected).
        file: PathBuf,
    },
}

/// Runs a `stepmesh cert` subcommand.
pub fn run(cmd: CertCommand) -> anyhow::Result<()> {
    match cmd {
        CertCommand::Inspect { file } => anyhow::bail!("cert inspect is not built yet ({file:?})"),
    }
}
