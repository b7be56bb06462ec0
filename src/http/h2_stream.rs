//! One HTTP/2 stream as bytes both ways, on the h2 crate directly: a
//! tunnel on a tunnels-only mesh connection (`stepmesh/tunnel`, a `tcp`
//! port's) reads and writes its stream from the app connection's own task.
//!
//! Written by hand rather than taken from hyper's upgrade: hyper hands an
//! HTTP/2 CONNECT stream over as a bridge, a task of its own that owns the
//! stream's send half and a channel each write crosses. That task, its
//! channel and the upgrade's boxes cost about 600 bytes per open tunnel on
//! each side, and every write a task hop (docs/PROXY.md, "What an idle
//! tunnel holds"). Here a write goes straight to h2's send buffer.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// An open stream's two halves and what was received but not yet read.
/// Every open tunnel's task holds one (in more than one place), so it is
/// kept to hyper's upgraded stream's 48 bytes.
pub struct StreamIo {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received data the reader had no room for yet (its flow-control
    /// credit is given back as it is taken). Boxed: a DATA frame is at
    /// most 16 KiB and the relay reads into a larger buffer, so this is
    /// seldom needed, and inline it would cost every tunnel 24 bytes.
    unread: Option<Box<Bytes>>,
}

impl StreamIo {
    /// The stream whose halves are `send` and `recv`.
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> StreamIo {
        StreamIo {
            send,
            recv,
            unread: None,
        }
    }
}

impl std::fmt::Debug for StreamIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamIo")
            .field("stream", &self.send.stream_id())
            .finish_non_exhaustive()
    }
}

/// An h2 error as the I/O error a connection's reader or writer sees.
fn io_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::ErrorKind::Other.into());
    }
    let kind = match e.reason() {
        Some(Reason::STREAM_CLOSED) => io::ErrorKind::BrokenPipe,
        Some(_) if e.is_reset() => io::ErrorKind::ConnectionReset,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e)
}

impl AsyncRead for StreamIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut data = match self.unread.take() {
            Some(unread) => *unread,
            None => loop {
                match ready!(self.recv.poll_data(cx)) {
                    // END_STREAM: the peer's half is closed.
                    None => return Poll::Ready(Ok(())),
                    Some(Ok(data)) if data.is_empty() => {}
                    Some(Ok(data)) => break data,
                    // A stream the peer cancelled ended as a closed one
                    // does (as hyper's upgraded streams read it).
                    Some(Err(e))
                        if matches!(e.reason(), Some(Reason::NO_ERROR | Reason::CANCEL)) =>
                    {
                        return Poll::Ready(Ok(()))
                    }
                    Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                }
            },
        };
        let n = data.len().min(buf.remaining());
        buf.put_slice(&data[..n]);
        data.advance(n);
        if !data.is_empty() {
            self.unread = Some(Box::new(data));
        }
        // The credit goes back as the reader takes the data: a slow reader
        // holds at most one stream window.
        let _ = self.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for StreamIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if let Poll::Ready(reset) = self.send.poll_reset(cx) {
            return Poll::Ready(Err(match reset {
                Ok(reason) => {
                    io::Error::new(io::ErrorKind::ConnectionReset, h2::Error::from(reason))
                }
                Err(e) => io_error(e),
            }));
        }
        // Capacity is asked for only with data in hand: reserved while
        // idle, it would pin the connection's window (hyper#4003).
        self.send.reserve_capacity(buf.len());
        while self.send.capacity() == 0 {
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                // The stream can no longer send: reset, or already ended.
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
        let n = self.send.capacity().min(buf.len());
        // One copy per write, as every HTTP/2 body write in hyper: h2 keeps
        // the data until the connection writes it.
        let data = Bytes::copy_from_slice(&buf[..n]);
        self.send.send_data(data, false).map_err(io_error)?;
        // What was asked for and not sent is given back (see above).
        self.send.reserve_capacity(0);
        Poll::Ready(Ok(n))
    }

    /// h2 sends what it holds as the connection is written: nothing to
    /// wait for here.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Ends our half (END_STREAM); the peer's may stay open.
    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.send.send_data(Bytes::new(), true) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(e) if e.is_io() => Poll::Ready(Err(io_error(e))),
            // Ended already (a second shutdown), or reset: there is no
            // half left to end.
            Err(_) => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A client and server h2 connection over an in-memory pipe, and one
    /// CONNECT stream between them: (client's end, server's end).
    async fn stream_pair() -> (StreamIo, StreamIo) {
        let (c, s) = tokio::io::duplex(64 << 10);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(s).await.expect("server handshake");
            let (req, mut respond) = conn.accept().await.expect("a stream").expect("no error");
            let send = respond
                .send_response(http::Response::new(()), false)
                .expect("response");
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            StreamIo::new(send, req.into_body())
        });
        let (send, conn) = h2::client::handshake(c).await.expect("client handshake");
        tokio::spawn(conn);
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri("127.0.0.1:9")
            .body(())
            .expect("request");
        let mut send = send.ready().await.expect("ready");
        let (resp, tx) = send.send_request(req, false).expect("sent");
        let server = server.await.expect("server task");
        let resp = resp.await.expect("response");
        (StreamIo::new(tx, resp.into_body()), server)
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_and_shutdown_is_the_readers_eof() {
        let (mut client, mut server) = stream_pair().await;
        // Larger than a stream window: the writer waits for credit the
        // reader gives back as it reads.
        let sent: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let writer = {
            let sent = sent.clone();
            tokio::spawn(async move {
                client.write_all(&sent).await.expect("write");
                client.shutdown().await.expect("shutdown");
                client
            })
        };
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("read to EOF");
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "bytes changed on the way");
        // The other half is still open after the client's shutdown.
        server.write_all(b"reply").await.expect("reply");
        server.shutdown().await.expect("server shutdown");
        let mut client = writer.await.expect("writer");
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.expect("read reply");
        assert_eq!(reply, b"reply");
        // A second shutdown is no error.
        client.shutdown().await.expect("second shutdown");
    }

    #[test]
    fn a_stream_is_no_larger_than_hypers_upgraded_stream() {
        let hypers = std::mem::size_of::<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>();
        assert!(std::mem::size_of::<StreamIo>() <= hypers);
    }

    #[tokio::test]
    async fn a_small_read_buffer_takes_a_frame_in_pieces() {
        let (mut client, mut server) = stream_pair().await;
        client.write_all(b"0123456789").await.expect("write");
        client.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        let mut piece = [0u8; 3];
        loop {
            let n = server.read(&mut piece).await.expect("read");
            if n == 0 {
                break;
            }
            assert!(n <= 3);
            got.extend_from_slice(&piece[..n]);
        }
        assert_eq!(got, b"0123456789");
    }

    #[tokio::test]
    async fn a_reset_is_the_writers_error() {
        let (mut client, server) = stream_pair().await;
        let mut send = server.send;
        send.send_reset(Reason::INTERNAL_ERROR);
        let mut failed = None;
        for _ in 0..100 {
            if let Err(e) = client.write_all(b"x").await {
                failed = Some(e);
                break;
            }
            tokio::task::yield_now().await;
        }
        let e = failed.expect("writes to a reset stream fail");
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
    }
}
