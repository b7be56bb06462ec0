//! Binds the listeners the flags ask for and starts their accept loops.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use rustls::crypto::CryptoProvider;
use stepmesh_ca::spiffe_id::{SpiffeIdPattern, TrustDomain};
use tokio::net::TcpListener;

use super::args::ProxyArgs;
use super::conn::Shared;
use super::inbound::{Inbound, InboundConfigs, InboundTarget};
use super::listener::accept_loop;
use super::outbound::{Outbound, OutboundTarget};
use crate::drain::DrainWatch;
use crate::metrics::Direction;
use crate::tls::verify::Expected;
use crate::tls::{self, TlsSettings};

/// A bound listener, for `/config` and logs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ListenerInfo {
    /// `inbound`, `outbound`, `transparent-inbound`, `transparent-outbound`.
    pub kind: &'static str,
    /// The bound address.
    pub listen: SocketAddr,
    /// Where its connections go.
    pub target: String,
    /// The identity an outbound peer must present.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_id: Option<String>,
}

/// Starts every listener of `args`; the accept loops hold clones of `watch`.
pub async fn listeners(
    args: &ProxyArgs,
    expected: Vec<SpiffeIdPattern>,
    td: &TrustDomain,
    provider: &Arc<CryptoProvider>,
    shared: &Arc<Shared>,
    watch: &DrainWatch,
) -> anyhow::Result<Vec<ListenerInfo>> {
    let settings = TlsSettings {
        tls12: args.tls12,
        session_resumption: !args.no_session_resumption,
    };
    let store = &shared.store;
    let tunnel = shared.tunnel;
    let server_config =
        tls::server_config(provider, store, super::seam::server_alpn(tunnel), settings)?;
    // `tcp` ports negotiate no HTTP ALPN: a peer sidecar's HTTP/2 requests
    // cannot reach them, so a `tcp` port stays L4 end to end; with tunnels
    // they take `stepmesh/tunnel` (CONNECT streams only). Same ticketer and
    // session cache: resumption works across a pod's ports.
    let tcp_config = {
        let mut config = (*server_config).clone();
        config.alpn_protocols = super::seam::tcp_alpn(tunnel);
        Arc::new(config)
    };
    let configs = InboundConfigs {
        http: server_config,
        tcp: tcp_config,
    };
    let mut launcher = Launcher {
        shared: shared.clone(),
        watch: watch.clone(),
        infos: Vec::new(),
    };
    let mut inbound = Vec::with_capacity(args.inbound.len());
    for spec in &args.inbound {
        let listener = bind(spec.listen, "--inbound").await?;
        let port = listener.local_addr()?.port();
        inbound.push((listener, port, Arc::<str>::from(spec.app.as_str())));
    }
    // Known before the first connection: a tunnel names its port.
    let apps = inbound.iter().map(|(_, port, app)| (*port, app.clone()));
    let _ = shared.inbound_apps.set(apps.collect());
    for (listener, port, app) in inbound {
        let info = (listener.local_addr()?, "inbound", app.to_string(), None);
        let target = InboundTarget::App { port, app };
        launcher.inbound(listener, &configs, target, info);
    }
    for (spec, pattern) in args.outbound.iter().zip(expected) {
        let config = tls::client_config(
            provider,
            store,
            Expected::Pattern(pattern),
            Vec::new(),
            settings,
        )?;
        let listener = bind(spec.listen, "--outbound").await?;
        let target = OutboundTarget::Peer {
            peer: spec.peer.as_str().into(),
            expected: spec.expected_id.as_str().into(),
        };
        let expected = Some(spec.expected_id.clone());
        let info = (
            listener.local_addr()?,
            "outbound",
            spec.peer.clone(),
            expected,
        );
        launcher.outbound(listener, config, target, info);
    }
    if args.transparent {
        let listener = bind_dual_stack(args.inbound_port, "--inbound-port")?;
        let info = (
            listener.local_addr()?,
            "transparent-inbound",
            "original destination".into(),
            None,
        );
        launcher.inbound(listener, &configs, InboundTarget::OriginalDst, info);
        let config = tls::client_config(
            provider,
            store,
            Expected::AnyInTrustDomain,
            Vec::new(),
            settings,
        )?;
        let listener = bind_dual_stack(args.outbound_port, "--outbound-port")?;
        let info = (
            listener.local_addr()?,
            "transparent-outbound",
            "original destination (policy outbound rules)".into(),
            Some(format!("spiffe://{td}/*")),
        );
        launcher.outbound(listener, config, OutboundTarget::OriginalDst, info);
    }
    Ok(launcher.infos)
}

type Info = (SocketAddr, &'static str, String, Option<String>);

struct Launcher {
    shared: Arc<Shared>,
    watch: DrainWatch,
    infos: Vec<ListenerInfo>,
}

impl Launcher {
    fn inbound(
        &mut self,
        listener: TcpListener,
        configs: &InboundConfigs,
        target: InboundTarget,
        info: Info,
    ) {
        let handler = Arc::new(Inbound::new(self.shared.clone(), configs, target));
        let (watch, budget) = (self.watch.clone(), self.shared.connections.clone());
        let metrics = self.shared.metrics.clone();
        tokio::spawn(accept_loop(
            listener,
            Direction::Inbound,
            watch,
            budget,
            metrics,
            move |tcp, client, guard| handler.clone().handle(tcp, client, guard),
        ));
        self.record(info);
    }

    fn outbound(
        &mut self,
        listener: TcpListener,
        config: Arc<rustls::ClientConfig>,
        target: OutboundTarget,
        info: Info,
    ) {
        let handler = Arc::new(Outbound::new(self.shared.clone(), config, target));
        let (watch, budget) = (self.watch.clone(), self.shared.connections.clone());
        let metrics = self.shared.metrics.clone();
        tokio::spawn(accept_loop(
            listener,
            Direction::Outbound,
            watch,
            budget,
            metrics,
            move |tcp, client, guard| handler.clone().handle(tcp, client, guard),
        ));
        self.record(info);
    }

    fn record(&mut self, (listen, kind, target, expected_id): Info) {
        tracing::info!(kind, %listen, upstream = %target, "listening");
        self.infos.push(ListenerInfo {
            kind,
            listen,
            target,
            expected_id,
        });
    }
}

async fn bind(addr: SocketAddr, flag: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("{flag}: binding {addr}"))
}

/// Binds `[::]:port` with `IPV6_V6ONLY` off, so one listener takes both the
/// IPv4 and the IPv6 connections `stepmesh init` redirects (IPv4 ones
/// arrive as v4-mapped addresses). On a host with IPv6 disabled it falls
/// back to `0.0.0.0:port`, logged; there is no IPv6 traffic to take then.
fn bind_dual_stack(port: u16, flag: &str) -> anyhow::Result<TcpListener> {
    let v6 = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port));
    match listen_socket(v6, false) {
        Ok(listener) => Ok(listener),
        // The port is taken (or not ours to take): IPv4 would fail alike.
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::AddrInUse | std::io::ErrorKind::PermissionDenied
            ) =>
        {
            Err(anyhow::Error::new(e).context(format!("{flag}: binding {v6}")))
        }
        Err(e) => {
            let v4 = SocketAddr::from(([0, 0, 0, 0], port));
            tracing::warn!(error = %e, %v4, "IPv6 unavailable: listening on IPv4 only");
            listen_socket(v4, true).with_context(|| format!("{flag}: binding {v4}"))
        }
    }
}

/// A listening socket on `addr` (with `SO_REUSEADDR`, as tokio's `bind`);
/// `v6_only` matters for IPv6 addresses only.
fn listen_socket(addr: SocketAddr, v6_only: bool) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(v6_only)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}
