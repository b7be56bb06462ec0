//! The sidecar's identity: where its SVID comes from (the CA or files), how
//! it is rotated, and the store the TLS layer reads it from.

pub mod ca;
pub mod files;
pub mod store;

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix seconds of a time (0 before the epoch), for metrics.
pub fn unix_secs(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Where the SVID comes from.
#[derive(Debug)]
pub enum IdentitySource {
    /// `--cert --key --bundle`.
    Files(files::FileSource),
    /// `--ca --ca-bundle --token-file --trust-domain`.
    Ca(ca::CaSource),
}

impl IdentitySource {
    /// Obtains the SVID and keeps it fresh, forever.
    pub async fn run(
        self,
        store: std::sync::Arc<store::CertStore>,
        metrics: crate::metrics::IdentityMetrics,
    ) {
        match self {
            Self::Files(files) => files.run(store, metrics).await,
            Self::Ca(ca) => ca.run(store, metrics).await,
        }
    }
}
