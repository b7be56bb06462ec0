//! In-process harness of the HTTP layer: an inbound and an outbound "sidecar"
//! built from `stepmesh::http` with real TLS and real SVIDs (the rustls
//! configs are the test's own, verifying with `stepmesh_ca::svid`), a test
//! app that reports what it received, and clients for HTTP/1.1 and HTTP/2.

#![allow(dead_code, clippy::unwrap_used)] // tests: a panic is the failure report

pub mod app;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use stepmesh::http::inbound::InboundConn;
use stepmesh::http::outbound::OutboundConn;
use stepmesh::http::{HttpLayer, HttpMetrics, MeshConnectors, RequestLog, MESH_ALPN};
use stepmesh::identity::store::{CertStore, Svid};
use stepmesh::policy::{Policy, PolicyWatch, SpiffeId, SpiffeIdPattern};
use stepmesh::stepup::{x5t_s256, StepUp, StepUpMetrics};
use stepmesh::tls::verify::Expected;
use stepmesh::tls::TlsSettings;
use stepmesh_ca::testing::{Leaf, Pki};
use tokio::net::TcpListener;

pub const TD: &str = "cluster.local";
pub const FRONTEND: &str = "spiffe://cluster.local/ns/web/sa/frontend";
pub const API: &str = "spiffe://cluster.local/ns/payments/sa/api";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

pub fn layer(policy: Policy) -> Arc<HttpLayer> {
    layer_with_log(policy, RequestLog::disabled())
}

pub fn layer_with_log(policy: Policy, log: RequestLog) -> Arc<HttpLayer> {
    let stepup = Arc::new(StepUp::new(StepUpMetrics::default()));
    Arc::new(HttpLayer::new(
        PolicyWatch::fixed(policy),
        stepup,
        HttpMetrics::default(),
        log,
    ))
}

/// As [`layer`], counting app connections against `budget` and `peers`.
pub fn layer_with_limits(
    policy: Policy,
    budget: Arc<stepmesh::net::caps::ConnectionBudget>,
    peers: Arc<stepmesh::net::caps::PerKeyCap<Arc<stepmesh::policy::SpiffeId>>>,
) -> Arc<HttpLayer> {
    let stepup = Arc::new(StepUp::new(StepUpMetrics::default()));
    let layer = HttpLayer::new(
        PolicyWatch::fixed(policy),
        stepup,
        HttpMetrics::default(),
        RequestLog::disabled(),
    );
    Arc::new(layer.with_connection_limits(budget, peers))
}

/// The inbound side: mTLS (client SVID required), then `http::inbound::serve`.
pub async fn start_inbound(
    pki: &Pki,
    layer: Arc<HttpLayer>,
    port: u16,
    app: SocketAddr,
) -> SocketAddr {
    start_inbound_draining(pki, layer, port, app, tokio::sync::watch::channel(false).1).await
}

/// As [`start_inbound`]; connections drain gracefully once `drain` says true.
pub async fn start_inbound_draining(
    pki: &Pki,
    layer: Arc<HttpLayer>,
    port: u16,
    app: SocketAddr,
    drain: tokio::sync::watch::Receiver<bool>,
) -> SocketAddr {
    let leaf = pki.leaf(API);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.root.cert.clone()).unwrap();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(leaf.chain.clone(), leaf.key())
        .unwrap();
    config.alpn_protocols = vec![MESH_ALPN.to_vec(), b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let bundle = pki.bundle();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, client)) = listener.accept().await else {
                return;
            };
            let (acceptor, layer, bundle) = (acceptor.clone(), layer.clone(), bundle.clone());
            let mut drain = drain.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let session = tls.get_ref().1;
                let chain: Vec<_> = session.peer_certificates().unwrap().to_vec();
                let peer = stepmesh_ca::svid::verify(&chain, &bundle, UnixTime::now())
                    .unwrap()
                    .id;
                let conn = InboundConn {
                    peer: Arc::new(peer),
                    x5t: x5t_s256(&chain[0]),
                    own: Some(API.to_owned()),
                    port,
                    app: app.to_string().into(),
                    client,
                    mesh: session.alpn_protocol() == Some(MESH_ALPN),
                    tunnels_only: false,
                    tunnels: None,
                    closing: Default::default(),
                };
                let drained = async move {
                    // A dropped trigger means "never drain".
                    if drain.wait_for(|d| *d).await.is_err() {
                        std::future::pending::<()>().await;
                    }
                };
                let _ = stepmesh::http::inbound::serve(layer, Arc::new(conn), tls, drained).await;
            });
        }
    });
    addr
}

/// The outbound side: plaintext from the app, mesh HTTP/2 to `peer` as `me`.
pub async fn start_outbound(
    pki: &Pki,
    me: &Leaf,
    layer: Arc<HttpLayer>,
    peer: SocketAddr,
) -> SocketAddr {
    // The sidecar's own client side: our SVID out, the server's SVID
    // verified against the bundle and `API`.
    let store = Arc::new(CertStore::new(provider(), None));
    store
        .publish(Svid {
            chain: me.chain.clone(),
            key: me.key(),
            bundle: pki.bundle(),
        })
        .unwrap();
    let expected = Expected::Pattern(SpiffeIdPattern::parse(API).unwrap());
    let settings = TlsSettings {
        tls12: false,
        session_resumption: true,
    };
    let config = stepmesh::tls::client_config(
        &provider(),
        &store,
        expected,
        vec![MESH_ALPN.to_vec()],
        settings,
    )
    .unwrap();
    let connector = MeshConnectors::new(&config, false);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let key: Arc<str> = format!("{}@{peer}", me.id).into();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, client)) = listener.accept().await else {
                return;
            };
            let conn = Arc::new(OutboundConn {
                key: key.clone(),
                dst: peer.to_string().into(),
                port: peer.port(),
                connector: connector.clone(),
                server_name: ServerName::IpAddress(peer.ip().into()),
                connect_timeout: Duration::from_secs(10),
                handshake_timeout: Duration::from_secs(10),
                client,
            });
            let layer = layer.clone();
            tokio::spawn(async move {
                stepmesh::http::outbound::connect(&layer, &conn)
                    .await
                    .unwrap();
                let _ =
                    stepmesh::http::outbound::serve(layer, conn, tcp, std::future::pending()).await;
            });
        }
    });
    addr
}

/// A whole pair: app ← inbound ← mesh ← outbound (as `caller`).
pub struct Pair {
    pub pki: Pki,
    pub outbound: SocketAddr,
    pub app: app::TestApp,
}

impl Pair {
    pub async fn start(policy: Policy, caller: &str, app_h2: bool) -> Pair {
        Pair::start_with(layer(policy), caller, app_h2).await
    }

    /// As [`Pair::start`], the inbound side's layer given.
    pub async fn start_with(inbound_layer: Arc<HttpLayer>, caller: &str, app_h2: bool) -> Pair {
        let pki = Pki::new(TD);
        let app = app::TestApp::start(app_h2).await;
        let port = 8080;
        let inbound = start_inbound(&pki, inbound_layer, port, app.addr).await;
        let me = pki.leaf(caller);
        let outbound = start_outbound(
            &pki,
            &me,
            layer(Policy::allow_authenticated(TD.parse().unwrap())),
            inbound,
        )
        .await;
        Pair { pki, outbound, app }
    }
}

pub fn spiffe(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}
