//! The sidecar's identity: where its SVID comes from (the CA or files), how
//! it is rotated, and the store the TLS layer reads it from.

pub mod ca;
pub mod files;
pub mod store;

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use store::CertStore;

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
    /// Obtains the SVID and keeps it fresh, forever. Returns only when the
    /// configuration cannot work (a configuration error, exit 64): a file
    /// missing past `--wait-for-files`, or one that exists but cannot be
    /// used, before the first SVID.
    pub async fn run(
        self,
        store: std::sync::Arc<CertStore>,
        metrics: crate::metrics::IdentityMetrics,
    ) -> anyhow::Result<Infallible> {
        match self {
            Self::Files(files) => files.run(store, metrics).await,
            Self::Ca(ca) => ca.run(store, metrics).await,
        }
    }
}

/// At start, the wait for files that may appear after the container starts
/// (a CSI driver, a projected volume, a helper writing an `emptyDir`): a
/// missing file is waited for until `--wait-for-files` has passed, with a
/// log line and `/ready` saying which; then it is a configuration error.
#[derive(Debug)]
struct StartWait {
    wait: Duration,
    deadline: Instant,
    poll: Duration,
    /// The file last said to be waited for (said once per file).
    announced: Option<PathBuf>,
}

impl StartWait {
    fn new(wait: Duration, poll: Duration) -> Self {
        Self {
            wait,
            deadline: Instant::now() + wait,
            poll,
            announced: None,
        }
    }

    /// `path` (the value of `flag`) does not exist: sleeps one poll while
    /// there is time left, else the configuration error naming it.
    async fn missing(&mut self, flag: &str, path: &Path, store: &CertStore) -> anyhow::Result<()> {
        let now = Instant::now();
        if now >= self.deadline {
            let why = if self.wait.is_zero() {
                "no such file (--wait-for-files 0s: not waited for)".to_owned()
            } else {
                format!(
                    "still no such file after waiting {:?} (--wait-for-files)",
                    self.wait
                )
            };
            return Err(crate::exit::config(anyhow::anyhow!(
                "{flag} {}: {why}",
                path.display()
            )));
        }
        if self.announced.as_deref() != Some(path) {
            let why = format!(
                "waiting for {flag} {} to appear (mounted later?)",
                path.display()
            );
            tracing::warn!(gives_up_in = ?self.deadline - now, "{why}");
            store.set_trouble(why);
            self.announced = Some(path.to_owned());
        }
        tokio::time::sleep(self.poll.min(self.deadline - now)).await;
        Ok(())
    }
}

/// Whether an I/O error says the file (or a directory above it) is absent.
fn is_missing(err: &std::io::Error) -> bool {
    err.kind() == std::io::ErrorKind::NotFound
}

/// The SPIFFE ID in a (verified) leaf certificate's URI SAN.
pub fn spiffe_id_of(
    leaf: &rustls_pki_types::CertificateDer<'_>,
) -> Option<stepmesh_ca::spiffe_id::SpiffeId> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
    id_in(&cert)
}

/// The SPIFFE ID and the serial (hex, as the CA records it) of a verified
/// leaf, from one parse.
pub fn id_and_serial_of(
    leaf: &rustls_pki_types::CertificateDer<'_>,
) -> Option<(stepmesh_ca::spiffe_id::SpiffeId, String)> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
    let serial = stepmesh_ca::svid::serial_hex(cert.raw_serial());
    Some((id_in(&cert)?, serial))
}

fn id_in(
    cert: &x509_parser::certificate::X509Certificate<'_>,
) -> Option<stepmesh_ca::spiffe_id::SpiffeId> {
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::URI(uri) => {
            stepmesh_ca::spiffe_id::SpiffeId::parse(uri).ok()
        }
        _ => None,
    })
}
