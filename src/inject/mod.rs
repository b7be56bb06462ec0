//! Sidecar injection: the admission webhook and offline injection.

pub mod config;
pub mod mutate;
pub mod overrides;
pub mod patch;
pub mod template;

use clap::Args;

/// Flags of `stepmesh inject`.
#[derive(Debug, Args)]
pub struct InjectArgs {
    /// Inject offline into the objects of this YAML file (`-` for stdin).
    #[arg(short = 'f', long)]
    pub file: Option<std::path::PathBuf>,
}

/// Runs the webhook or offline injection.
pub async fn run(args: InjectArgs) -> anyhow::Result<()> {
    anyhow::bail!("inject is not built yet ({args:?})")
}
