//! What a stolen SVID key or a greedy client can get from a real `stepmesh
//! ca serve`: an SVID renewing itself gets a new key, never more time; one
//! source address cannot take every connection, nor send requests
//! without end, nor make the CA hold the bodies of calls it never
//! finishes.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::time::Duration;

use common::ca::{sign_request, CaProcess};
use stepmesh_ca::client::Credential;

const TD: &str = "td.test";
const WEB: &str = "spiffe://td.test/ns/default/sa/web";

fn ca() -> CaProcess {
    CaProcess::start(TD, &[("tok-web", WEB)])
}

/// An SVID renewing itself gets a new key and serial, never more time: a
/// stolen key would otherwise renew forever, each serial revoked too late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_by_an_svid_never_outlives_it() {
    let ca = ca();
    let client = ca.client();
    let first = client
        .issue(
            &Credential::Token("tok-web".to_owned()),
            Some(Duration::from_secs(120)),
        )
        .await
        .unwrap();
    let mut cred = Credential::Svid {
        chain: first.chain.clone(),
        key: first.key.clone_key(),
    };
    for round in 0..3 {
        let next = client
            .issue(&cred, Some(Duration::from_secs(3600)))
            .await
            .unwrap();
        assert_ne!(next.serial, first.serial);
        assert!(
            next.not_after <= first.not_after,
            "round {round}: {:?} outlives {:?}",
            next.not_after,
            first.not_after
        );
        cred = Credential::Svid {
            chain: next.chain.clone(),
            key: next.key.clone_key(),
        };
    }
}

/// One source address cannot take every connection slot: past
/// `MAX_PER_SOURCE` its next connection is closed at once (before any
/// handshake), another source is still served, and closing gives the
/// places back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_cannot_take_every_connection() {
    use std::io::Read;
    use stepmesh_ca::MAX_PER_SOURCE;
    let ca = ca();
    let from = |ip: &str| {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.bind(
            &format!("{ip}:0")
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
        s.connect(&ca.grpc_addr.into()).unwrap();
        let tcp = std::net::TcpStream::from(s);
        tcp.set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        tcp
    };
    let closed_at_once = |mut tcp: std::net::TcpStream| match tcp.read(&mut [0; 16]) {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    };
    let held: Vec<_> = (0..MAX_PER_SOURCE).map(|_| from("127.0.0.2")).collect();
    assert!(
        closed_at_once(from("127.0.0.2")),
        "a connection past the cap was kept"
    );
    let svid = ca.issue("tok-web").await;
    assert_eq!(svid.id.as_str(), WEB, "another source is served");
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!closed_at_once(from("127.0.0.2")), "places not given back");
}

/// One source address sending forged tokens is slowed before they are
/// verified: past its burst even a good token from it is refused, with
/// the source named, before authentication (no identity in the audit
/// line), while a request of the same kind was served before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_is_rate_limited_before_authentication() {
    let ca = CaProcess::start_with(
        TD,
        &[("tok-web", WEB)],
        &["--source-rate", "0.01", "--source-burst", "4"],
    );
    let mut grpc = ca.client().grpc();
    assert!(grpc.sign(sign_request("tok-web")).await.is_ok());
    for _ in 0..3 {
        let forged = grpc.sign(sign_request("forged")).await.unwrap_err();
        assert_eq!(forged.code(), tonic::Code::Unauthenticated, "{forged:?}");
    }
    let limited = grpc.sign(sign_request("tok-web")).await.unwrap_err();
    assert_eq!(
        limited.code(),
        tonic::Code::ResourceExhausted,
        "{limited:?}"
    );
    assert!(
        limited
            .message()
            .starts_with("too many requests from 127.0.0.1"),
        "{limited:?}"
    );
    let line = ca.wait_audit(|l| l["reason"] == "source_rate_limited");
    assert_eq!(
        line["identity"], "",
        "refused before authentication: {line}"
    );
}

/// JWT-SVIDs asked for without end run out their own bucket, not the
/// identity's X.509 signings: a pod whose app loops on its Workload API
/// cannot hold back every pod of its identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_svids_without_end_do_not_hold_back_x509_svids() {
    let ca = CaProcess::start_with(
        TD,
        &[("tok-web", WEB)],
        &["--sign-rate", "0.01", "--sign-burst", "2"],
    );
    let client = ca.client();
    let audience = ["db".to_owned()];
    for _ in 0..2 {
        client
            .sign_jwt_svid("tok-web", &audience, None)
            .await
            .unwrap();
    }
    let limited = client.sign_jwt_svid("tok-web", &audience, None).await;
    assert!(
        format!("{limited:?}").contains("rate limit"),
        "a third JWT-SVID at a burst of two: {limited:?}"
    );
    let svid = ca.issue("tok-web").await;
    assert_eq!(svid.id.as_str(), WEB, "the X.509 bucket is untouched");
}

/// Calls whose bodies never finish cannot make the CA hold their memory:
/// one source's calls in flight are capped, each message at 16 KiB, each
/// connection's streams at 16 (before, 16 connections of 256 calls, each
/// declaring 64 KiB, took a CA from 17 to 343 MB: found by review), and
/// another source is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_that_never_finish_do_not_hold_the_cas_memory() {
    let ca = ca();
    let before = ca.rss_kib();
    let (mut held, mut clients, mut refused) = (Vec::new(), Vec::new(), 0);
    for _ in 0..16 {
        let (client, conn) = h2::client::handshake(tls_from(&ca, "127.0.0.2").await)
            .await
            .unwrap();
        tokio::spawn(conn);
        for declared in [64 << 10, 16 << 10].into_iter().cycle().take(64) {
            let ready = tokio::time::timeout(Duration::from_millis(200), client.clone().ready());
            let Ok(Ok(mut client)) = ready.await else {
                break;
            };
            let req = http::Request::post("/stepmesh.ca.v1.CertificateAuthority/Sign")
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(())
                .unwrap();
            let Ok((answer, mut body)) = client.send_request(req, false) else {
                refused += 1;
                continue;
            };
            // A message of `declared` bytes, all but its last sent.
            let mut frame = vec![0x41u8; 4 + declared];
            frame[0] = 0;
            frame[1..5].copy_from_slice(&u32::try_from(declared).unwrap().to_be_bytes());
            body.reserve_capacity(frame.len());
            let _ = body.send_data(frame.into(), false);
            held.push((answer, body));
        }
        clients.push(client);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let svid = ca.issue("tok-web").await;
    assert_eq!(svid.id.as_str(), WEB, "another source is served");
    let grown = ca.rss_kib().saturating_sub(before);
    // Past the source's 32 calls in flight, answered at once, unread.
    let mut exhausted = 0;
    for (answer, _body) in held.iter_mut() {
        let now = tokio::time::timeout(Duration::from_millis(5), answer);
        if let Ok(Ok(answer)) = now.await {
            let code = answer.headers().get("grpc-status");
            exhausted += usize::from(code.is_some_and(|c| c == "8"));
        }
    }
    println!(
        "{} calls started, {refused} not sent, {exhausted} RESOURCE_EXHAUSTED; CA memory +{grown} KiB",
        held.len()
    );
    assert!(
        exhausted >= 64,
        "calls past the source's cap: {exhausted} refused"
    );
    assert!(grown < 24 << 10, "the CA grew by {grown} KiB");
}

/// Each pod of an identity has its own signing bucket (per identity and
/// source address): one that ran out its burst leaves another pod of the
/// same identity served. Before, one pod calling in a loop locked every pod
/// of its service account out (found by review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_pod_cannot_use_up_its_identitys_signings() {
    let ca = CaProcess::start_with(
        TD,
        &[("tok-web", WEB)],
        &["--sign-rate", "0.01", "--sign-burst", "2"],
    );
    for _ in 0..2 {
        assert_eq!(
            sign_from(&ca, "127.0.0.2", "tok-web").await,
            tonic::Code::Ok
        );
    }
    let limited = sign_from(&ca, "127.0.0.2", "tok-web").await;
    assert_eq!(limited, tonic::Code::ResourceExhausted);
    let other = sign_from(&ca, "127.0.0.3", "tok-web").await;
    assert_eq!(
        other,
        tonic::Code::Ok,
        "another pod of the identity is served"
    );
}

/// A TLS connection (ALPN h2) to the CA from source address `ip`.
async fn tls_from(
    ca: &CaProcess,
    ip: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in stepmesh_ca::pem::decode_certs(ca.bundle_pem.as_bytes()).unwrap() {
        roots.add(cert).unwrap();
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    let tcp = socket.connect(ca.grpc_addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap()
}

/// The gRPC status of a Sign call with `token` from source address `ip`,
/// made by hand on h2: tonic's client cannot pick its source address.
async fn sign_from(ca: &CaProcess, ip: &str, token: &str) -> tonic::Code {
    let (client, conn) = h2::client::handshake(tls_from(ca, ip).await).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let message = prost::Message::encode_to_vec(sign_request(token).get_ref());
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&message);
    let req = http::Request::post("/stepmesh.ca.v1.CertificateAuthority/Sign")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", format!("Bearer {token}"))
        .body(())
        .unwrap();
    let (answer, mut body) = client.send_request(req, false).unwrap();
    body.send_data(frame.into(), true).unwrap();
    let answer = answer.await.unwrap();
    let status = |v: &http::HeaderValue| tonic::Code::from_bytes(v.as_bytes());
    if let Some(code) = answer.headers().get("grpc-status") {
        return status(code);
    }
    let mut body = answer.into_body();
    while let Some(data) = body.data().await {
        let _ = body.flow_control().release_capacity(data.unwrap().len());
    }
    status(&body.trailers().await.unwrap().unwrap()["grpc-status"])
}
