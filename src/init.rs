//! `stepmesh init`: iptables rules of transparent interception.

use clap::Args;

/// Flags of `stepmesh init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Print the rules instead of installing them.
    #[arg(long)]
    pub dry_run: bool,
}

/// Installs, prints or removes the rules.
pub fn run(args: InitArgs) -> anyhow::Result<()> {
    anyhow::bail!("init is not built yet ({args:?})")
}
