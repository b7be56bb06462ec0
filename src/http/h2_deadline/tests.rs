use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::http::detect::H2_PREFACE;

const TIMEOUT: Duration = Duration::from_millis(300);

fn frame(kind: u8, flags: u8, len: usize) -> Vec<u8> {
    let mut f = (len as u32).to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags, 0, 0, 0, 1]);
    f.resize(9 + len, 0);
    f
}

fn opening() -> Vec<u8> {
    let mut wire = H2_PREFACE.to_vec();
    wire.extend(frame(0x4, 0, 0));
    wire
}

/// The served end, and the client's.
fn pair() -> (
    HeaderDeadline<tokio::io::DuplexStream>,
    tokio::io::DuplexStream,
    Counter,
) {
    let (served, client) = tokio::io::duplex(1 << 16);
    let refusals = Counter::default();
    let io = HeaderDeadline::new(served, TIMEOUT, refusals.clone(), "inbound");
    (io, client, refusals)
}

/// Reads until an error or EOF; the error, if any.
async fn read_to_error(io: &mut HeaderDeadline<tokio::io::DuplexStream>) -> Option<io::Error> {
    let mut buf = [0u8; 1024];
    loop {
        match io.read(&mut buf).await {
            Ok(0) => return None,
            Ok(_) => {}
            Err(e) => return Some(e),
        }
    }
}

#[tokio::test]
async fn a_trickled_header_block_fails_the_reads_and_is_counted_once() {
    let (mut io, mut client, refusals) = pair();
    client.write_all(&opening()).await.unwrap();
    let mut block = frame(0x1, 0, 8);
    block.extend(frame(0x9, 0x4, 8));
    let started = Instant::now();
    let trickle = tokio::spawn(async move {
        for b in block {
            if client.write_all(&[b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Keep the connection open.
        std::future::pending::<()>().await;
    });
    let e = read_to_error(&mut io)
        .await
        .expect("the deadline ends the reads");
    assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    assert!(started.elapsed() >= TIMEOUT, "not before the deadline");
    assert_eq!(refusals.get(), 1);
    // Later reads and writes fail too, uncounted.
    assert!(io.read(&mut [0u8; 8]).await.is_err());
    assert!(io.write_all(b"x").await.is_err());
    assert_eq!(refusals.get(), 1);
    trickle.abort();
}

#[tokio::test]
async fn a_half_frame_header_is_timed_too() {
    let (mut io, mut client, refusals) = pair();
    let mut wire = opening();
    wire.extend_from_slice(&frame(0x0, 0, 100)[..4]);
    client.write_all(&wire).await.unwrap();
    let e = read_to_error(&mut io)
        .await
        .expect("the deadline ends the reads");
    assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    assert_eq!(refusals.get(), 1);
    drop(client);
}

#[tokio::test]
async fn a_silent_connection_between_whole_frames_is_not_timed() {
    let (mut io, mut client, refusals) = pair();
    let writer = tokio::spawn(async move {
        client.write_all(&opening()).await.unwrap();
        for _ in 0..2 {
            tokio::time::sleep(TIMEOUT * 2).await;
            client.write_all(&frame(0x6, 0, 8)).await.unwrap();
        }
        let mut block = frame(0x1, 0, 20);
        block.extend(frame(0x9, 0x4, 4));
        client.write_all(&block).await.unwrap();
        tokio::time::sleep(TIMEOUT * 2).await;
    });
    assert!(read_to_error(&mut io).await.is_none(), "read to EOF");
    writer.await.unwrap();
    assert_eq!(refusals.get(), 0);
    assert!(io.timer.is_none(), "no timer was ever needed");
}

#[tokio::test]
async fn bytes_that_are_not_http2_are_passed_through_untimed() {
    let (mut io, mut client, refusals) = pair();
    client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let writer = tokio::spawn(async move {
        tokio::time::sleep(TIMEOUT * 2).await;
        client.write_all(b"Host: x\r\n\r\n").await.unwrap();
    });
    assert!(read_to_error(&mut io).await.is_none());
    writer.await.unwrap();
    assert_eq!(refusals.get(), 0);
}

#[tokio::test]
async fn a_write_that_waits_on_a_client_that_does_not_read_meets_the_deadline_too() {
    let (served, mut client) = tokio::io::duplex(256);
    let refusals = Counter::default();
    let mut io = HeaderDeadline::new(served, TIMEOUT, refusals.clone(), "outbound");
    let mut wire = opening();
    wire.extend_from_slice(&frame(0x1, 0, 64)[..20]);
    client.write_all(&wire).await.unwrap();
    let mut buf = [0u8; 1024];
    let n = io.read(&mut buf).await.unwrap();
    assert_eq!(n, wire.len());
    // The client reads nothing: the writes wait, and the open header
    // block's deadline ends them.
    let e = io.write_all(&[0u8; 4096]).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    assert_eq!(refusals.get(), 1);
    drop(client);
}

/// What the deadline adds to every served HTTP/2 connection, inline (the
/// timer, made on first need, is on the heap).
#[test]
fn the_deadline_state_stays_small() {
    let added = std::mem::size_of::<HeaderDeadline<tokio::io::DuplexStream>>()
        - std::mem::size_of::<tokio::io::DuplexStream>();
    let timer = std::mem::size_of::<Sleep>();
    eprintln!("HTTP/2 header deadline: {added} B inline, timer {timer} B on the heap when made");
    assert!(added <= 96, "HTTP/2 header deadline: {added} B inline");
}
