//! In-process handshakes over `tokio::io::duplex` with the testing PKI:
//! verifiers, failure reasons, rotation through the store, resumption.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use stepmesh_ca::spiffe_id::SpiffeIdPattern;
use stepmesh_ca::testing::{Defect, Leaf, Pki};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::verify::Expected;
use super::*;
use crate::identity::store::{CertStore, StoreError, Svid};

const SERVER: &str = "spiffe://t.test/ns/a/sa/server";
const CLIENT: &str = "spiffe://t.test/ns/a/sa/client";

fn svid(pki: &Pki, leaf: &Leaf) -> Svid {
    Svid {
        chain: leaf.chain.clone(),
        key: leaf.key(),
        bundle: pki.bundle(),
    }
}

fn store(pki: &Pki, leaf: &Leaf) -> Arc<CertStore> {
    let store = Arc::new(CertStore::new(provider(), None));
    store.publish(svid(pki, leaf)).unwrap();
    store
}

const SETTINGS: TlsSettings = TlsSettings {
    tls12: false,
    session_resumption: true,
};

/// Failure reasons of each side (`None`: that side did not fail).
#[derive(Debug)]
struct Failed {
    client: Option<&'static str>,
    server: Option<&'static str>,
}

/// One handshake plus a byte each way: (server serial seen by the client,
/// client ID seen by the server, resumed), or each side's failure reason.
async fn handshake(
    server: &Arc<ServerConfig>,
    client: &Arc<ClientConfig>,
) -> Result<(String, String, bool), Failed> {
    let (c, s) = tokio::io::duplex(64 * 1024);
    let acceptor = TlsAcceptor::from(server.clone());
    let connector = TlsConnector::from(client.clone());
    let name = rustls::pki_types::ServerName::try_from("peer.test").unwrap();
    let server_side = tokio::spawn(async move {
        let mut tls = acceptor.accept(s).await?;
        let id = spiffe_id_of(&tls.get_ref().1.peer_certificates().unwrap()[0]).unwrap();
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).await?;
        tls.write_all(&b).await?;
        tls.flush().await?;
        Ok::<_, std::io::Error>(id.to_string())
    });
    let client_side = async {
        let mut tls = connector.connect(name, c).await?;
        let conn = tls.get_ref().1;
        let leaf = conn.peer_certificates().unwrap()[0].clone();
        let resumed = conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        tls.write_all(b"x").await?;
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).await?;
        let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
        Ok::<_, std::io::Error>((cert.raw_serial_as_string(), resumed))
    };
    let client_result = client_side.await;
    // A refused client drops its end, so the server task ends too.
    let server_result = server_side.await.unwrap();
    match (client_result, server_result) {
        (Ok((serial, resumed)), Ok(id)) => Ok((serial, id, resumed)),
        (c, s) => Err(Failed {
            client: c.err().map(|e| failure::reason(&e)),
            server: s.err().map(|e| failure::reason(&e)),
        }),
    }
}

fn configs(
    pki: &Pki,
    server_leaf: &Leaf,
    client_leaf: &Leaf,
    expected: &str,
) -> (Arc<CertStore>, Arc<ServerConfig>, Arc<ClientConfig>) {
    let p = provider();
    let server_store = store(pki, server_leaf);
    let client_store = store(pki, client_leaf);
    let server = server_config(&p, &server_store, Vec::new(), SETTINGS).unwrap();
    let pattern = Expected::Pattern(SpiffeIdPattern::parse(expected).unwrap());
    let client = client_config(&p, &client_store, pattern, Vec::new(), SETTINGS).unwrap();
    (server_store, server, client)
}

#[tokio::test]
async fn mutual_handshake_rotation_and_resumption() {
    let pki = Pki::new("t.test");
    let (server_store, server, client) =
        configs(&pki, &pki.leaf(SERVER), &pki.leaf(CLIENT), SERVER);
    let (first, peer, resumed) = handshake(&server, &client).await.unwrap();
    assert_eq!(peer, CLIENT);
    assert!(!resumed);
    let (again, _, resumed) = handshake(&server, &client).await.unwrap();
    assert!(resumed, "second connection resumes the session");
    assert_eq!(again, first);

    server_store.publish(svid(&pki, &pki.leaf(SERVER))).unwrap();
    let fresh = client_config(
        &provider(),
        &store(&pki, &pki.leaf(CLIENT)),
        Expected::Pattern(SpiffeIdPattern::parse(SERVER).unwrap()),
        Vec::new(),
        SETTINGS,
    )
    .unwrap();
    let (rotated, _, _) = handshake(&server, &fresh).await.unwrap();
    assert_ne!(
        rotated, first,
        "a new handshake presents the rotated certificate"
    );
}

#[tokio::test]
async fn refusals_carry_their_reason() {
    let pki = Pki::new("t.test");
    let cases = [
        (Defect::Expired, "expired"),
        (Defect::OtherTrustDomain, "wrong_trust_domain"),
        (Defect::SelfSigned, "unknown_issuer"),
        (Defect::TwoUriSans, "bad_san"),
    ];
    for (defect, reason) in cases {
        // Build the client store by hand: the store itself refuses bad SVIDs.
        let p = provider();
        let server_store = store(&pki, &pki.leaf(SERVER));
        let server = server_config(&p, &server_store, Vec::new(), SETTINGS).unwrap();
        let bad = pki.leaf_with(CLIENT, defect);
        let client = ClientConfig::builder_with_provider(p.clone())
            .with_protocol_versions(TLS13_ONLY)
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verify::SvidServerVerifier::new(
                server_store.clone(),
                p.clone(),
                Expected::AnyInTrustDomain,
            )))
            .with_client_auth_cert(bad.chain.clone(), bad.key())
            .unwrap();
        let failed = handshake(&server, &Arc::new(client)).await.unwrap_err();
        assert_eq!(failed.server, Some(reason), "{defect:?}: {failed:?}");
    }
}

#[tokio::test]
async fn client_refuses_the_wrong_server_identity() {
    let pki = Pki::new("t.test");
    let (_, server, client) = configs(
        &pki,
        &pki.leaf(SERVER),
        &pki.leaf(CLIENT),
        "spiffe://t.test/ns/b/*",
    );
    let failed = handshake(&server, &client).await.unwrap_err();
    assert_eq!(failed.client, Some("wrong_peer_id"), "{failed:?}");
    assert_eq!(failed.server, Some("peer_alert"), "{failed:?}");
    let (_, server, client) = configs(
        &pki,
        &pki.leaf(SERVER),
        &pki.leaf(CLIENT),
        "spiffe://t.test/ns/a/*",
    );
    handshake(&server, &client).await.unwrap();
}

#[test]
fn store_refuses_bad_material_and_keeps_the_old() {
    let pki = Pki::new("t.test");
    let store = CertStore::new(provider(), None);
    let good = pki.leaf(SERVER);
    let info = store.publish(svid(&pki, &good)).unwrap();
    assert_eq!(info.id.as_str(), SERVER);

    let other = pki.leaf(CLIENT);
    let mismatched = Svid {
        chain: good.chain.clone(),
        key: other.key(),
        bundle: pki.bundle(),
    };
    assert!(matches!(store.publish(mismatched), Err(StoreError::Key(_))));
    let stranger = Pki::new("other.test");
    let foreign = stranger.leaf("spiffe://other.test/ns/a/sa/x");
    assert!(matches!(
        store.publish(svid(&stranger, &foreign)),
        Err(StoreError::TrustDomain { .. })
    ));
    let expired = pki.leaf_with(SERVER, Defect::Expired);
    assert!(matches!(
        store.publish(svid(&pki, &expired)),
        Err(StoreError::Invalid(_))
    ));
    assert_eq!(
        store.info().unwrap().serial,
        info.serial,
        "the old SVID stays"
    );
}

/// A handshake whose server side runs `check_resumed`: (resumed, verdict).
async fn resumed_verdict(
    server: &Arc<ServerConfig>,
    client: &Arc<ClientConfig>,
    store: &Arc<CertStore>,
) -> (bool, Result<(), &'static str>) {
    let (c, s) = tokio::io::duplex(64 * 1024);
    let acceptor = TlsAcceptor::from(server.clone());
    let connector = TlsConnector::from(client.clone());
    let name = rustls::pki_types::ServerName::try_from("peer.test").unwrap();
    let store = store.clone();
    let server_side = tokio::spawn(async move {
        let mut tls = acceptor.accept(s).await.unwrap();
        let conn = tls.get_ref().1;
        let resumed = conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        let verdict = check_resumed(conn, &store);
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).await.unwrap();
        tls.write_all(&b).await.unwrap();
        tls.flush().await.unwrap();
        (resumed, verdict)
    });
    let mut tls = connector.connect(name, c).await.unwrap();
    tls.write_all(b"x").await.unwrap();
    tls.flush().await.unwrap();
    // Reading takes in the session tickets sent after the handshake.
    let mut b = [0u8; 1];
    tls.read_exact(&mut b).await.unwrap();
    let verdict = server_side.await.unwrap();
    drop(tls);
    verdict
}

#[tokio::test]
async fn resumed_sessions_are_rechecked_after_a_roots_change() {
    let pki = Pki::new("t.test");
    let (server_store, server, client) =
        configs(&pki, &pki.leaf(SERVER), &pki.leaf(CLIENT), SERVER);
    assert_eq!(
        resumed_verdict(&server, &client, &server_store).await,
        (false, Ok(()))
    );
    assert_eq!(
        resumed_verdict(&server, &client, &server_store).await,
        (true, Ok(()))
    );

    // The trust domain moves to a new root: sessions of the old chain end.
    let successor = Pki::new("t.test");
    server_store
        .publish(svid(&successor, &successor.leaf(SERVER)))
        .unwrap();
    assert!(server_store.roots_changed_within(std::time::Duration::from_secs(60)));
    assert_eq!(
        resumed_verdict(&server, &client, &server_store).await,
        (true, Err("unknown_issuer"))
    );
}

#[tokio::test]
async fn verification_cache_is_dropped_when_roots_change() {
    let pki = Pki::new("t.test");
    let p = provider();
    let server_store = store(&pki, &pki.leaf(SERVER));
    let server = server_config(&p, &server_store, Vec::new(), SETTINGS).unwrap();
    let no_resume = TlsSettings {
        tls12: false,
        session_resumption: false,
    };
    // The client trusts the old root and its successor.
    let successor = Pki::new("t.test");
    let both = stepmesh_ca::svid::TrustBundle::new(
        pki.bundle().trust_domain().clone(),
        vec![pki.root.cert.clone(), successor.root.cert.clone()],
    )
    .unwrap();
    let client_leaf = pki.leaf(CLIENT);
    let client_store = Arc::new(CertStore::new(p.clone(), None));
    client_store
        .publish(Svid {
            chain: client_leaf.chain.clone(),
            key: client_leaf.key(),
            bundle: both,
        })
        .unwrap();
    let client = client_config(
        &p,
        &client_store,
        Expected::AnyInTrustDomain,
        Vec::new(),
        no_resume,
    )
    .unwrap();
    // Twice: the second full handshake is answered from the cache.
    handshake(&server, &client).await.unwrap();
    handshake(&server, &client).await.unwrap();

    // The server's trust domain moves to the successor root alone.
    server_store
        .publish(svid(&successor, &successor.leaf(SERVER)))
        .unwrap();
    let failed = handshake(&server, &client).await.unwrap_err();
    assert_eq!(failed.server, Some("unknown_issuer"), "{failed:?}");
}

#[test]
fn bundle_updates_keep_the_svid_and_bump_the_roots_generation() {
    let pki = Pki::new("t.test");
    let store = store(&pki, &pki.leaf(SERVER));
    let serial = store.info().unwrap().serial;
    assert_eq!(store.roots_generation(), 0);
    store.update_bundle(pki.bundle()).unwrap();
    assert_eq!(store.roots_generation(), 0, "same roots: no change");

    let successor = Pki::new("t.test");
    let both = stepmesh_ca::svid::TrustBundle::new(
        pki.bundle().trust_domain().clone(),
        vec![pki.root.cert.clone(), successor.root.cert.clone()],
    )
    .unwrap();
    store.update_bundle(both).unwrap();
    assert_eq!(store.roots_generation(), 1);
    assert_eq!(store.bundle().unwrap().roots().len(), 2);
    assert_eq!(store.info().unwrap().serial, serial, "the SVID stays");

    let foreign = Pki::new("other.test");
    assert!(matches!(
        store.update_bundle(foreign.bundle()),
        Err(StoreError::TrustDomain { .. })
    ));
    assert_eq!(store.bundle().unwrap().roots().len(), 2);
}
