//! Opaque TCP between two real sidecars rides HTTP/2 CONNECT tunnels on one
//! pooled mTLS connection: many app connections, one connection at the
//! inbound side (its TLS handshakes counted), a second one past 1,008,
//! both let go once that burst has drained;
//! half-close and 16 MiB intact; resets end the other side's connection;
//! each stream decided by its own port (a stand-in outbound sidecar, an h2
//! client with a real SVID, opens an allowed and a denied stream on one
//! connection, and is refused an HTTP request there); and the fallback to
//! a connection per app connection when either side has tunnels off
//! (`--no-tunnel`, as a sidecar without them).

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;

use bytes::Bytes;
use common::mesh::*;
use stepmesh::http::TUNNEL_ALPN;

const MIB: usize = 1024 * 1024;

#[test]
fn two_hundred_app_connections_share_one_mtls_connection() {
    let app = echo_server();
    let mesh = Mesh::start(app, &[], &[]);
    // All open at once, each proven through by one echoed byte.
    let mut conns = hold(mesh.outbound, 200);
    for (i, conn) in conns.iter_mut().enumerate() {
        let msg = format!("connection {i} says hello");
        assert_eq!(echo(conn, msg.as_bytes()), msg.as_bytes());
    }
    assert_eq!(
        inbound_handshakes_of(&mesh.server),
        1.0,
        "200 app connections: one mTLS connection between the sidecars"
    );
    let open = mesh
        .server
        .metric(r#"stepmesh_connections_open{direction="inbound"}"#);
    assert!(
        open >= 200.0,
        "each tunnel counts as an open connection: {open}"
    );
    drop(conns);
    // One access-log line per app connection at the inbound side, each
    // decided for the client's identity.
    eventually("200 inbound tunnel lines", || {
        let lines: Vec<_> = mesh
            .server
            .access_log()
            .into_iter()
            .filter(|l| l["direction"] == "inbound" && l["bytes_in"].as_u64() > Some(1))
            .collect();
        (lines.len() == 200).then_some(())
    });
    let line = mesh
        .server
        .wait_access("a tunnel line", |l| l["bytes_in"].as_u64() > Some(1));
    assert_eq!(line["peer_id"], CLIENT_ID);
    assert_eq!(line["decision"], "allow");
    assert_eq!(line["dst"], app.to_string());
    // 200 at once is no burst to give back: the next rides the same one.
    let mut again = hold(mesh.outbound, 1);
    assert_eq!(echo(&mut again[0], b"again"), b"again");
    assert_eq!(inbound_handshakes_of(&mesh.server), 1.0);
}

/// The established TCP connections to 127.0.0.1:`port` (rows of
/// /proc/net/tcp): the mesh connections an outbound sidecar keeps to its
/// peer's inbound listener, the only process that dials it. (Its
/// descriptors are not listed: the sidecar is not dumpable, so only root
/// could list them.)
fn connections_to(port: u16) -> usize {
    let remote = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() > 3 && f[2] == remote && f[3] == "01")
        .count()
}

#[test]
fn past_a_tunnels_only_connections_limit_a_second_one_carries_the_rest() {
    // 1,100 app connections held at once: this process holds 1,100
    // descriptors, each sidecar 2,200 (each sidecar raises its own limit).
    let limit = stepmesh::net::fdlimit::raise();
    if limit.now < 4096 {
        println!(
            "skipped: the descriptor limit is {} (hard), below the 4,096 this test holds",
            limit.now
        );
        return;
    }
    let app = echo_server();
    let mesh = Mesh::start(app, &[], &[]);
    let inbound = mesh.server.listener("inbound").port();
    let mesh_conns = || connections_to(inbound);
    let mut conns = hold(mesh.outbound, 1100);
    for (i, conn) in conns.iter_mut().enumerate() {
        let msg = format!("connection {i} of 1,100");
        assert_eq!(echo(conn, msg.as_bytes()), msg.as_bytes());
    }
    assert_eq!(
        inbound_handshakes_of(&mesh.server),
        2.0,
        "1,100 app connections: two mTLS connections (1,008 tunnels each at most)"
    );
    assert_eq!(mesh_conns(), 2, "the outbound side holds both");
    // Once their tunnels have ended, both are let go: the extra one as
    // always, the first because it carried more than 256 tunnels at once
    // (h2 keeps a slot for each of them for the connection's life, on both
    // sides). The next app connection dials anew.
    drop(conns);
    eventually("both mesh connections closed", || {
        (mesh_conns() == 0).then_some(())
    });
    let mut again = hold(mesh.outbound, 1);
    assert_eq!(echo(&mut again[0], b"after the burst"), b"after the burst");
    assert_eq!(inbound_handshakes_of(&mesh.server), 3.0);
}

#[test]
fn half_close_and_16_mib_cross_a_tunnel_intact() {
    let up = random_bytes(16 * MIB, 7);
    let down = random_bytes(16 * MIB, 8);
    let (expect_up, answer) = (up.clone(), down.clone());
    // The app answers only after EOF: the answer proves the client's
    // half-close (END_STREAM) crossed without closing the way back.
    let app = answer_after_eof_server(move |got| {
        if got == expect_up {
            answer.clone()
        } else {
            format!("got {} bytes, not the ones sent", got.len()).into_bytes()
        }
    });
    let mesh = Mesh::start(app, &[], &[]);
    let back = roundtrip(mesh.outbound, &up).unwrap();
    assert_eq!(
        back.len(),
        down.len(),
        "{}",
        String::from_utf8_lossy(&back[..back.len().min(200)])
    );
    assert!(back == down, "answer differs from what the app sent");

    // Shut down write, still read the reply, on a second app connection.
    let mut conn = TcpStream::connect(mesh.outbound).unwrap();
    conn.set_read_timeout(Some(PATIENCE)).unwrap();
    conn.write_all(&up[..1000]).unwrap();
    conn.shutdown(Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    conn.read_to_end(&mut reply).unwrap();
    assert!(
        reply.starts_with(b"got 1000 bytes"),
        "{}",
        String::from_utf8_lossy(&reply)
    );

    assert_eq!(
        inbound_handshakes_of(&mesh.server),
        1.0,
        "both rode the pooled connection"
    );
    let line = mesh
        .server
        .wait_access("the bulk line", |l| l["bytes_in"] == 16 * MIB);
    assert_eq!(line["bytes_out"], 16 * MIB);
    assert_eq!(line["peer_id"], CLIENT_ID);
}

/// Closes `conn` with a reset (`SO_LINGER` 0).
fn reset(conn: TcpStream) {
    socket2::SockRef::from(&conn)
        .set_linger(Some(std::time::Duration::ZERO))
        .unwrap();
    drop(conn);
}

#[test]
fn a_reset_on_either_side_ends_the_other_sides_connection() {
    // The app resets each connection once it has read 5 bytes; it reports
    // how each connection it kept open ended.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let app = listener.local_addr().unwrap();
    let (ended_tx, ended_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for (i, conn) in listener.incoming().enumerate() {
            let mut conn = conn.unwrap();
            let mut buf = [0u8; 5];
            conn.read_exact(&mut buf).unwrap();
            if i == 0 {
                reset(conn);
                continue;
            }
            // The second connection: the client resets; the app's read ends.
            conn.set_read_timeout(Some(PATIENCE)).unwrap();
            let mut rest = Vec::new();
            let ended = conn
                .read_to_end(&mut rest)
                .map(|_| "eof")
                .unwrap_or("error");
            ended_tx.send(ended).unwrap();
        }
    });
    let mesh = Mesh::start(app, &[], &[]);

    // The app resets: the client's connection ends (no hang), and a
    // write after that fails or the read says so.
    let mut conn = TcpStream::connect(mesh.outbound).unwrap();
    conn.set_read_timeout(Some(PATIENCE)).unwrap();
    conn.write_all(b"hello").unwrap();
    let mut buf = [0u8; 16];
    let read = conn.read(&mut buf);
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the app's reset ends the client's connection: {read:?}"
    );
    assert!(
        !matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "no hang"
    );

    // The client resets: the app's connection ends.
    let mut conn = TcpStream::connect(mesh.outbound).unwrap();
    conn.write_all(b"hello").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    reset(conn);
    let ended = ended_rx.recv_timeout(PATIENCE).unwrap();
    eprintln!("the app saw the client's reset as: {ended}");
    assert_eq!(
        inbound_handshakes_of(&mesh.server),
        1.0,
        "both were tunnels"
    );
}

#[test]
fn each_stream_is_decided_by_its_own_port() {
    let app = echo_server();
    let (allowed, denied) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "trustDomain: mesh.test\ninbound:\n  default: deny\n  ports:\n\
             \x20   - port: {allowed}\n      protocol: tcp\n      allow: [{{from: [\"{CLIENT_ID}\"]}}]\n\
             \x20   - port: {denied}\n      protocol: tcp\n      allow: [{{from: [\"spiffe://mesh.test/ns/other/sa/x\"]}}]\n"
        ),
    )
    .unwrap();
    let extra = [
        "--inbound".to_owned(),
        format!("127.0.0.1:{denied}={app}"),
        "--policy".to_owned(),
        policy.display().to_string(),
    ];
    let mesh = Mesh::start_on(allowed, app, &extra, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client = StandIn::connect(&mesh.pki, mesh.inbound).await;
        let (mut first, status) = client.open(allowed).await;
        assert_eq!(status, 200);
        assert_eq!(first.echo(b"before").await, b"before");
        let (_, status) = client.open(denied).await;
        assert_eq!(status, 403, "the denied port is refused for this stream");
        // The other stream on the same connection goes on, and so do new ones.
        assert_eq!(first.echo(b"after").await, b"after");
        let (mut second, status) = client.open(allowed).await;
        assert_eq!(status, 200);
        assert_eq!(second.echo(b"second").await, b"second");
        // A `tcp` port's connection carries tunnels only: an HTTP request
        // on it is refused, and the tunnels on it go on.
        assert_eq!(client.get(allowed).await, 421);
        assert_eq!(first.echo(b"after a GET").await, b"after a GET");
    });
    assert_eq!(inbound_handshakes_of(&mesh.server), 1.0);
    let line = mesh
        .server
        .wait_access("the denied stream's line", |l| l["port"] == denied);
    assert_eq!(line["decision"], "deny");
    assert_eq!(line["peer_id"], CLIENT_ID);
    let refused = mesh.server.metric(&format!(
        r#"stepmesh_connections_total{{direction="inbound",peer="{CLIENT_ID}",decision="deny"}}"#
    ));
    assert!(refused >= 1.0, "{refused}");
}

#[test]
fn tunnels_off_on_either_side_fall_back_to_a_connection_each() {
    let app = echo_server();
    for (server_extra, client_extra) in [
        (vec![], vec!["--no-tunnel".to_owned()]),
        // A sidecar without tunnels: its mesh ALPN is HTTP only.
        (vec!["--no-tunnel".to_owned()], vec![]),
    ] {
        let mesh = Mesh::start(app, &server_extra, &client_extra);
        for i in 0..5 {
            let mut conn = TcpStream::connect(mesh.outbound).unwrap();
            conn.set_read_timeout(Some(PATIENCE)).unwrap();
            let msg = format!("fallback {i}");
            assert_eq!(echo(&mut conn, msg.as_bytes()), msg.as_bytes());
        }
        let handshakes = inbound_handshakes_of(&mesh.server);
        // One per app connection (plus, towards a sidecar without tunnels,
        // the pooled HTTP connection that told it so).
        assert!(
            (5.0..=6.0).contains(&handshakes),
            "server {server_extra:?}, client {client_extra:?}: {handshakes} handshakes"
        );
    }
}

/// A stand-in for an outbound sidecar: one mTLS connection (ALPN
/// `stepmesh/tunnel`, the client's SVID) and CONNECT streams on it.
struct StandIn {
    send: h2::client::SendRequest<Bytes>,
}

/// One open tunnel of the stand-in.
struct Stream {
    tx: h2::SendStream<Bytes>,
    rx: h2::RecvStream,
}

impl StandIn {
    async fn connect(pki: &stepmesh_ca::testing::Pki, addr: SocketAddr) -> StandIn {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let leaf = pki.leaf(CLIENT_ID);
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(common::any_server::AnyServer))
            .with_client_auth_cert(leaf.chain.clone(), leaf.key())
            .unwrap();
        config.alpn_protocols = vec![TUNNEL_ALPN.to_vec()];
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(TUNNEL_ALPN));
        let (send, conn) = h2::client::handshake(tls).await.unwrap();
        tokio::spawn(conn);
        StandIn { send }
    }

    /// A GET request on the connection: the answer's status.
    async fn get(&mut self, port: u16) -> u16 {
        let req = http::Request::builder()
            .uri(format!("http://127.0.0.1:{port}/"))
            .body(())
            .unwrap();
        let mut send = self.send.clone().ready().await.unwrap();
        let (resp, _) = send.send_request(req, true).unwrap();
        resp.await.unwrap().status().as_u16()
    }

    /// A CONNECT stream to `port`: the stream and the answer's status.
    async fn open(&mut self, port: u16) -> (Stream, u16) {
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(format!("127.0.0.1:{port}"))
            .body(())
            .unwrap();
        let mut send = self.send.clone().ready().await.unwrap();
        let (resp, tx) = send.send_request(req, false).unwrap();
        let resp = resp.await.unwrap();
        let status = resp.status().as_u16();
        let rx = resp.into_body();
        (Stream { tx, rx }, status)
    }
}

impl Stream {
    async fn echo(&mut self, msg: &[u8]) -> Vec<u8> {
        self.tx
            .send_data(Bytes::copy_from_slice(msg), false)
            .unwrap();
        let mut back = Vec::new();
        while back.len() < msg.len() {
            let data = self.rx.data().await.unwrap().unwrap();
            let _ = self.rx.flow_control().release_capacity(data.len());
            back.extend_from_slice(&data);
        }
        back
    }
}

#[test]
fn thousands_of_app_connections_reset_mid_stream_leave_the_mesh_connection_up() {
    // An app that streams to every connection without pause; clients that
    // reset theirs while data is in flight both ways. Each reset ends its
    // own tunnel only: the shared mesh connection, and a tunnel held
    // across them all, go on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let app = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let chunk = [7u8; 16 * 1024];
                while conn.write_all(&chunk).is_ok() {}
            });
        }
    });
    let mesh = Mesh::start(app, &[], &[]);
    let open = |first: bool| {
        let mut c = TcpStream::connect(mesh.outbound).unwrap();
        c.set_read_timeout(Some(PATIENCE)).unwrap();
        // Not HTTP: the outbound side decides at once (no detection wait).
        c.write_all(&[0]).unwrap();
        let mut got = vec![0; if first { 64 * 1024 } else { 1024 }];
        c.read_exact(&mut got).unwrap();
        c
    };
    let mut held = open(true);
    for i in 0..2600 {
        let c = open(false);
        reset(c);
        if i % 100 == 0 {
            // The held tunnel keeps streaming throughout.
            let mut more = vec![0; 64 * 1024];
            held.read_exact(&mut more)
                .unwrap_or_else(|e| panic!("after {i} resets: {e}"));
        }
    }
    let mut more = vec![0; 64 * 1024];
    held.read_exact(&mut more).unwrap();
    assert_eq!(
        inbound_handshakes_of(&mesh.server),
        1.0,
        "one mesh connection carried them all"
    );
}
