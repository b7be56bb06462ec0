//! The sidecar (`stepmesh proxy`): listeners, mTLS in and out, L4
//! authorization, forwarding, drain. See docs/PROXY.md.

pub mod args;
pub mod conn;
pub mod forward;
pub mod inbound;
pub mod listener;
pub mod outbound;
mod run;
pub mod transparent;

pub use args::ProxyArgs;
pub use run::run;

use crate::identity::IdentitySource;

/// Builds the runtime the proxy runs on (`--workers`).
pub fn runtime(args: &ProxyArgs) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = args.workers {
        builder.worker_threads(workers);
    }
    Ok(builder.enable_all().build()?)
}

/// The identity source the flags select.
fn identity_source(args: &ProxyArgs) -> anyhow::Result<IdentitySource> {
    match (&args.ca, &args.cert, &args.key, &args.bundle) {
        (None, Some(cert), Some(key), Some(bundle)) => {
            Ok(IdentitySource::Files(crate::identity::files::FileSource {
                cert: cert.clone(),
                key: key.clone(),
                bundle: bundle.clone(),
                poll: args.file_poll_interval,
            }))
        }
        (Some(_), None, None, None) => anyhow::bail!("--ca needs stepmesh_ca::client (not merged yet)"),
        _ => anyhow::bail!(
            "identity: give either --ca --ca-bundle --token-file --trust-domain, or --cert --key --bundle"
        ),
    }
}
