//! The sidecar: identity, listeners, forwarding.

use clap::Args;

/// Flags of `stepmesh proxy`.
#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// Tokio worker threads (default: one per core).
    #[arg(long, env = "STEPMESH_WORKERS")]
    pub workers: Option<usize>,
}

/// Builds the runtime the proxy runs on (`--workers`).
pub fn runtime(args: &ProxyArgs) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = args.workers {
        builder.worker_threads(workers);
    }
    Ok(builder.enable_all().build()?)
}

/// Runs the sidecar until SIGTERM/SIGINT and the drain end.
pub async fn run(args: ProxyArgs) -> anyhow::Result<()> {
    anyhow::bail!("proxy is not built yet ({args:?})")
}
