//! A CA address naming several replicas: a comma-separated list, each entry
//! a name that may resolve to several addresses (a headless Service). Every
//! call goes first to the replica that answered last; a replica that cannot
//! answer (refused, reset, UNAVAILABLE, no answer in time) is left for the
//! next one at once, so a replica dying mid-renewal costs one retry, not a
//! backoff. Names are resolved on every call: replicas come and go.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};

use prometheus_client::metrics::counter::Counter;

use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Channel, Endpoint};

use super::connect::{bracket, parse_target, Target, TlsConnector};
use super::{ClientError, CONNECT_TIMEOUT};

/// One replica at one address, with its (lazily connected) channel.
pub(super) struct Replica {
    endpoint: Endpoint,
    target: Target,
    /// The channel without a client certificate.
    pub(super) channel: Channel,
}

impl Replica {
    fn new(target: Target, roots: &Arc<rustls::RootCertStore>) -> Result<Self, ClientError> {
        let endpoint = endpoint(&target)?;
        let connector = TlsConnector::new(target.clone(), roots.clone(), None)?;
        let channel = endpoint.connect_with_connector_lazy(connector);
        Ok(Self {
            endpoint,
            target,
            channel,
        })
    }

    /// A channel presenting `chain` as the TLS client certificate.
    pub(super) fn with_client_cert(
        &self,
        roots: &Arc<rustls::RootCertStore>,
        chain: &[CertificateDer<'static>],
        key: &PrivateKeyDer<'static>,
    ) -> Result<Channel, ClientError> {
        let connector = TlsConnector::new(
            self.target.clone(),
            roots.clone(),
            Some((chain.to_vec(), key.clone_key())),
        )?;
        Ok(self.endpoint.connect_with_connector_lazy(connector))
    }
}

/// The `https://` endpoint of a target (the connector dials it itself).
pub(super) fn endpoint(target: &Target) -> Result<Endpoint, ClientError> {
    let uri = format!("https://{}:{}", bracket(&target.host), target.port);
    Ok(Endpoint::from_shared(uri.clone())
        .map_err(|e| ClientError::Config(format!("CA address {uri}: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true))
}

/// The configured addresses and the replicas found behind them.
pub(super) struct Replicas {
    targets: Vec<Target>,
    roots: Arc<rustls::RootCertStore>,
    open: Mutex<HashMap<SocketAddr, Arc<Replica>>>,
    preferred: Mutex<Option<SocketAddr>>,
    /// Calls moved on from a replica that could not answer (the owner's
    /// metric, once given).
    pub(super) failovers: OnceLock<Counter>,
}

impl Replicas {
    /// `addrs`: `host:port[,host:port...]`.
    pub(super) fn parse(
        addrs: &str,
        roots: Arc<rustls::RootCertStore>,
    ) -> Result<Self, ClientError> {
        let targets = addrs
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(parse_target)
            .collect::<Result<Vec<_>, _>>()?;
        if targets.is_empty() {
            return Err(ClientError::Config(format!(
                "CA address {addrs:?} names no host:port"
            )));
        }
        Ok(Self {
            targets,
            roots,
            open: Mutex::new(HashMap::new()),
            preferred: Mutex::new(None),
            failovers: OnceLock::new(),
        })
    }

    /// The first configured address (dialled by name).
    pub(super) fn first(&self) -> &Target {
        // `parse` refuses an empty list.
        &self.targets[0]
    }

    /// The roots the CA's serving certificate must chain to.
    pub(super) fn roots(&self) -> &Arc<rustls::RootCertStore> {
        &self.roots
    }

    /// Every replica, the one that answered last first.
    async fn resolve(&self) -> Result<Vec<(SocketAddr, Arc<Replica>)>, ClientError> {
        let mut found: Vec<(SocketAddr, Target)> = Vec::new();
        let mut failed = Vec::new();
        for t in &self.targets {
            match tokio::net::lookup_host((t.host.as_str(), t.port)).await {
                Ok(addrs) => {
                    for addr in addrs {
                        if found.iter().all(|(a, _)| *a != addr) {
                            let target = Target {
                                host: addr.ip().to_string(),
                                port: addr.port(),
                                server_name: t.server_name.clone(),
                            };
                            found.push((addr, target));
                        }
                    }
                }
                Err(e) => failed.push(format!("{}: {e}", t.host)),
            }
        }
        if found.is_empty() {
            return Err(ClientError::Rpc {
                code: tonic::Code::Unavailable,
                message: format!("no CA address resolves: {}", failed.join("; ")),
            });
        }
        let preferred = *lock(&self.preferred);
        if let Some(i) = found.iter().position(|(a, _)| Some(*a) == preferred) {
            found.rotate_left(i);
        }
        let mut open = lock(&self.open);
        open.retain(|addr, _| found.iter().any(|(a, _)| a == addr));
        let mut out = Vec::with_capacity(found.len());
        for (addr, target) in found {
            let replica = match open.get(&addr) {
                Some(r) => r.clone(),
                None => {
                    let r = Arc::new(Replica::new(target, &self.roots)?);
                    open.insert(addr, r.clone());
                    r
                }
            };
            out.push((addr, replica));
        }
        Ok(out)
    }

    /// `call` on the replicas in turn until one answers (an answer may be
    /// a refusal: only a replica's own fault moves on).
    pub(super) async fn call<T, F, Fut>(&self, call: F) -> Result<T, ClientError>
    where
        F: FnMut(Arc<Replica>) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        self.call_until(ClientError::is_replica_fault, call).await
    }

    /// [`Self::call`], moving on from every error `next` accepts.
    pub(super) async fn call_until<T, F, Fut>(
        &self,
        next: impl Fn(&ClientError) -> bool,
        mut call: F,
    ) -> Result<T, ClientError>
    where
        F: FnMut(Arc<Replica>) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let replicas = self.resolve().await?;
        let several = replicas.len() > 1;
        let mut last = None;
        for (addr, replica) in replicas {
            match call(replica).await {
                Err(e) if next(&e) => {
                    if several {
                        tracing::info!(replica = %addr, error = %e, "CA replica did not answer; trying the next");
                        if let Some(failovers) = self.failovers.get() {
                            failovers.inc();
                        }
                    }
                    last = Some(e);
                }
                answer => {
                    *lock(&self.preferred) = Some(addr);
                    return answer;
                }
            }
        }
        Err(last.unwrap_or_else(|| ClientError::Config("no CA replica".into())))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Each critical section is one assignment or map update: never torn.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn roots() -> Arc<rustls::RootCertStore> {
        Arc::new(rustls::RootCertStore::empty())
    }

    #[test]
    fn lists_parse_and_empty_ones_are_refused() {
        let r = Replicas::parse("ca-0:1, ca-1:2,", roots()).unwrap();
        assert_eq!(r.targets.len(), 2);
        assert_eq!(r.first().host, "ca-0");
        assert!(Replicas::parse(" , ", roots()).is_err());
        assert!(Replicas::parse("ca-0:1,nope", roots()).is_err());
    }

    #[tokio::test]
    async fn a_replica_that_refuses_connections_is_skipped_at_once() {
        // Two ports, nobody listening on the first: the call moves on.
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead_port = dead.local_addr().unwrap().port();
        drop(dead);
        let r = Replicas::parse(&format!("127.0.0.1:{dead_port},127.0.0.1:9"), roots()).unwrap();
        let mut seen = Vec::new();
        let answer = r
            .call(|replica| {
                seen.push(replica.target.port);
                let port = replica.target.port;
                async move {
                    if port == dead_port {
                        Err(ClientError::Rpc {
                            code: tonic::Code::Unavailable,
                            message: "connection refused".into(),
                        })
                    } else {
                        Ok(port)
                    }
                }
            })
            .await
            .unwrap();
        assert_eq!(answer, 9);
        assert_eq!(seen, [dead_port, 9]);
        // The replica that answered is tried first next time.
        let first = r
            .call(|replica| async move { Ok(replica.target.port) })
            .await
            .unwrap();
        assert_eq!(first, 9);
        // A refusal is an answer: no other replica is asked.
        let mut asked = 0;
        let err = r
            .call(|_| {
                asked += 1;
                async {
                    Err::<(), _>(ClientError::Rpc {
                        code: tonic::Code::PermissionDenied,
                        message: "revoked".into(),
                    })
                }
            })
            .await
            .unwrap_err();
        assert!(err.to_string().contains("revoked"));
        assert_eq!(asked, 1);
    }
}
