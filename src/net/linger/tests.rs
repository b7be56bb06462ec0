//! Real loopback sockets: a server that has sent more than the client has
//! read, while the client still sends bytes the server never reads.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use super::Lingering;
use crate::net::CLOSE_TIMEOUT;

const PAYLOAD: usize = 128 * 1024;

/// A connected pair: the client's receive buffer is small, so most of what
/// the server writes waits in the server's send queue.
async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let client = socket
        .connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (server, _) = listener.accept().await.unwrap();
    socket2::SockRef::from(&server)
        .set_send_buffer_size(1 << 20)
        .unwrap();
    (client, server)
}

/// The server's side of the story: the payload written (into the kernel,
/// not yet to the client), the client's late bytes arrived unread, then the
/// server's end: shut down, lingering or not, and dropped. What the client
/// reads.
async fn client_reads(lingering: bool) -> std::io::Result<usize> {
    let (mut client, mut server) = pair().await;
    let written =
        tokio::time::timeout(Duration::from_secs(5), server.write_all(&[7; PAYLOAD])).await;
    assert!(written.is_ok(), "the send buffer did not take the payload");
    client.write_all(b"late window updates").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let server = tokio::spawn(async move {
        if lingering {
            Lingering::new(server).shutdown().await.unwrap();
        } else {
            let mut server = server;
            let _ = server.shutdown().await;
        }
    });
    let mut got = Vec::new();
    let read = client.read_to_end(&mut got).await;
    drop(client);
    server.await.unwrap();
    read.map(|_| got.len())
}

#[tokio::test]
async fn a_lingering_close_delivers_everything_to_a_peer_still_sending() {
    // The hazard first, so this test shows it is real here: a plain close
    // with the late bytes unread resets, and the queued payload is lost.
    let plain = client_reads(false).await;
    assert!(
        !matches!(plain, Ok(n) if n == PAYLOAD),
        "a plain close delivered everything: the setup does not show the hazard"
    );

    assert_eq!(
        client_reads(true).await.unwrap(),
        PAYLOAD,
        "the tail was lost at close"
    );
}

#[tokio::test]
async fn a_peer_that_never_ends_its_side_holds_the_close_only_until_the_deadline() {
    let (mut client, server) = pair().await;
    let mut server = Lingering::new(server);
    let started = Instant::now();
    server.shutdown().await.unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= CLOSE_TIMEOUT && waited < CLOSE_TIMEOUT * 3,
        "waited {waited:?} for a peer that never closes"
    );
    // Our end reached it all the same.
    let mut rest = Vec::new();
    assert_eq!(client.read_to_end(&mut rest).await.unwrap(), 0);
}
