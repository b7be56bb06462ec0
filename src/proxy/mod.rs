//! The sidecar (`stepmesh proxy`): listeners, mTLS in and out, L4
//! authorization, forwarding, drain. See docs/PROXY.md.

pub mod args;
pub mod closing;
pub mod conn;
pub mod inbound;
mod launch;
pub mod listener;
pub mod outbound;
pub mod reauth;
mod run;
pub mod seam;
pub mod transparent;
mod tunnel;

pub use args::ProxyArgs;
pub use run::run;

use crate::identity::IdentitySource;

/// Builds the runtime the proxy runs on (`--workers`). One worker means a
/// current-thread runtime: every task on one thread, no cross-thread wakeups
/// or work stealing to pay for.
pub fn runtime(args: &ProxyArgs) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = match args.workers {
        Some(0) => {
            return Err(crate::exit::config(anyhow::anyhow!(
                "--workers must be at least 1"
            )))
        }
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(workers) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(workers);
            builder
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    Ok(crate::alloc::release_when_idle(&mut builder)
        .enable_all()
        .build()?)
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
                wait: args.wait_for_files,
            }))
        }
        (Some(ca), None, None, None) => {
            let missing = |flag: &str| anyhow::anyhow!("--ca needs {flag}");
            let td = args.trust_domain.as_deref().ok_or_else(|| missing("--trust-domain"))?;
            Ok(IdentitySource::Ca(crate::identity::ca::CaSource {
                addr: ca.clone(),
                ca_bundle: args.ca_bundle.clone().ok_or_else(|| missing("--ca-bundle"))?,
                token_file: args.token_file.clone().ok_or_else(|| missing("--token-file"))?,
                trust_domain: td
                    .parse()
                    .map_err(|e| anyhow::anyhow!("--trust-domain {td:?}: {e}"))?,
                ttl: args.svid_ttl,
                wait: args.wait_for_files,
            }))
        }
        _ => anyhow::bail!(
            "identity: give either --ca --ca-bundle --token-file --trust-domain, or --cert --key --bundle"
        ),
    }
}
