//! The SPIFFE Workload API (`--workload-api PATH`): the app behind the
//! sidecar fetches the pod's X.509-SVID, key and bundle over a Unix socket
//! with any SPIFFE library, and gets a new message on every rotation. Off
//! the data path: its own listener and tasks, reading the cert store the TLS
//! layer reads. See docs/WORKLOAD-API.md.

mod authority;
pub mod jwt;
pub mod proto;
mod service;

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use futures_util::StreamExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::net::UnixListener;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Status};

use crate::identity::store::CertStore;
pub use service::WorkloadService;

/// The metadata every Workload API call must carry (the SPIFFE spec's
/// guard against a browser or SSRF reaching the socket).
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// Who may call: the UIDs listed with `--workload-api-uid` (empty: any
/// process that can reach the socket, i.e. the pod's containers).
#[derive(Debug, Clone, Default)]
pub struct Callers {
    uids: Vec<u32>,
}

impl Callers {
    /// Callers limited to `uids` (empty: anyone who can open the socket).
    pub fn new(uids: Vec<u32>) -> Self {
        Self { uids }
    }

    fn allows(&self, uid: u32) -> bool {
        self.uids.is_empty() || self.uids.contains(&uid)
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// Workload API metrics: calls admitted by method, calls refused by reason.
#[derive(Debug, Clone)]
pub struct WorkloadMetrics {
    calls: Family<MethodLabels, Counter>,
    refused: Family<ReasonLabels, Counter>,
}

impl WorkloadMetrics {
    /// Registers the Workload API metrics.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            calls: Family::default(),
            refused: Family::default(),
        };
        registry.register(
            "stepmesh_workload_api_calls",
            "SPIFFE Workload API calls admitted, by method",
            m.calls.clone(),
        );
        registry.register(
            "stepmesh_workload_api_refused",
            "SPIFFE Workload API calls refused, by reason (no_header, no_peer_cred, uid)",
            m.refused.clone(),
        );
        m
    }

    fn call(&self, method: &'static str) {
        self.calls.get_or_create(&MethodLabels { method }).inc();
    }

    fn refuse(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabels { reason }).inc();
    }
}

/// Binds the socket at `path`: a stale socket left by an earlier run is
/// removed, any other file there is an error (never deleted). The socket is
/// made connectable by every UID (mode 0666): the app may run as another
/// user than the sidecar; who may call is decided by the volume the socket
/// lives in and by [`Callers`], per call.
pub async fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    match tokio::fs::symlink_metadata(path).await {
        Ok(meta) if meta.file_type().is_socket() => tokio::fs::remove_file(path)
            .await
            .with_context(|| format!("removing the stale socket {}", path.display()))?,
        Ok(_) => anyhow::bail!("{} exists and is not a socket", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(anyhow::Error::new(e).context(path.display().to_string())),
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    tokio::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .await
        .with_context(|| format!("chmod 0666 {}", path.display()))?;
    Ok(listener)
}

/// Connections open at once from UIDs `--workload-api-uid` does not list:
/// served up to this many (each call answered `PERMISSION_DENIED`, which
/// says why), more closed at accept. Each may hold a header block being
/// read (up to 80 KiB), so a process the list does not trust cannot grow
/// the sidecar past about 1.3 MiB this way.
const REFUSED_CONNECTIONS: usize = 16;

/// Serves the Workload API on `listener` until the process ends.
pub async fn serve(
    listener: UnixListener,
    store: Arc<CertStore>,
    callers: Callers,
    metrics: WorkloadMetrics,
    jwt: Option<Arc<jwt::JwtMinter>>,
) -> Result<(), tonic::transport::Error> {
    let service = WorkloadService::new(store, metrics.clone(), jwt);
    let refused = crate::net::caps::ConnectionBudget::new(REFUSED_CONNECTIONS);
    let (listed, counted) = (callers.clone(), metrics.clone());
    let incoming =
        tokio_stream::wrappers::UnixListenerStream::new(listener).filter_map(move |accepted| {
            let admitted = accepted.map(|stream| {
                let allowed = stream.peer_cred().is_ok_and(|c| listed.allows(c.uid()));
                if allowed {
                    return Some(authority::AuthorityFix::new(stream));
                }
                let Some(place) = refused.try_spend() else {
                    counted.refuse("uid_connections");
                    tracing::debug!(
                        "Workload API: too many connections of refused UIDs; closing one"
                    );
                    return None;
                };
                Some(authority::AuthorityFix::new(stream).holding(place))
            });
            futures_util::future::ready(admitted.transpose())
        });
    let admit = move |request: Request<()>| admit(request, &callers, &metrics);
    tonic::transport::Server::builder()
        .add_service(
            proto::spiffe_workload_api_server::SpiffeWorkloadApiServer::with_interceptor(
                service, admit,
            ),
        )
        .serve_with_incoming(incoming)
        .await
}

/// Every call, before its method: the security header, then the caller's
/// UID (`SO_PEERCRED` of the connection). A refusal says what is wrong with
/// the call, nothing about the SVID or the allowed UIDs.
fn admit(
    request: Request<()>,
    callers: &Callers,
    metrics: &WorkloadMetrics,
) -> Result<Request<()>, Status> {
    let header = request.metadata().get(SECURITY_HEADER);
    if header.and_then(|v| v.to_str().ok()) != Some("true") {
        metrics.refuse("no_header");
        tracing::warn!("Workload API call refused: no `{SECURITY_HEADER}: true` metadata");
        return Err(Status::invalid_argument(
            "security header missing from request",
        ));
    }
    let cred = request
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|info| info.peer_cred);
    let Some(cred) = cred else {
        metrics.refuse("no_peer_cred");
        tracing::warn!("Workload API call refused: the caller's credentials are unknown");
        return Err(Status::permission_denied("caller not identified"));
    };
    if !callers.allows(cred.uid()) {
        metrics.refuse("uid");
        tracing::warn!(
            uid = cred.uid(),
            pid = cred.pid(),
            "Workload API call refused: UID not in --workload-api-uid"
        );
        return Err(Status::permission_denied("caller not permitted"));
    }
    tracing::debug!(
        uid = cred.uid(),
        pid = cred.pid(),
        "Workload API call admitted"
    );
    Ok(request)
}
