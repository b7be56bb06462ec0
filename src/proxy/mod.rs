//! The sidecar: identity, listeners, forwarding.

pub mod args;
pub mod forward;
pub mod listener;

pub use args::ProxyArgs;

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
