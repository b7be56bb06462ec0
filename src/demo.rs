//! `stepmesh demo`: a whole mesh on loopback.

use clap::Args;

/// Flags of `stepmesh demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep running after the walkthrough and print curl commands.
    #[arg(long)]
    pub serve: bool,
}

/// Runs the walkthrough.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    anyhow::bail!("demo is not built yet ({args:?})")
}
