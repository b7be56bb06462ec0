//! `stepmesh policy`: check a file, explain a decision, compile NetworkPolicies.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;

use super::Policy;

/// `stepmesh policy` subcommands.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy file (exit 1 with the field path on error).
    Check {
        /// Policy file.
        file: PathBuf,
    },
}

/// Runs a `stepmesh policy` subcommand.
pub async fn run(cmd: PolicyCommand) -> anyhow::Result<()> {
    match cmd {
        PolicyCommand::Check { file } => {
            let policy = load(&file)?;
            println!(
                "{}: ok (trust domain {}, {} ports, {} step-up providers, digest {})",
                file.display(),
                policy.trust_domain(),
                policy.ports().len(),
                policy.providers().len(),
                policy.digest()
            );
            Ok(())
        }
    }
}

fn load(file: &std::path::Path) -> anyhow::Result<Policy> {
    Policy::from_file(file).with_context(|| format!("policy {}", file.display()))
}
