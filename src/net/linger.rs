//! A lingering close for connections we serve and end ourselves (nginx's
//! `lingering_close`): after our side is shut down, what the peer still
//! sends is read and discarded until it closes too, or [`CLOSE_TIMEOUT`].
//!
//! Why: a socket closed with bytes unread makes the kernel answer with a
//! reset and throw away whatever of ours it has not sent yet. A drained
//! HTTP/2 server closes once its last stream ends, while the client may
//! still be sending `WINDOW_UPDATE`s for the data it is reading: the tail of
//! that last stream was lost and the client saw "broken pipe" (the CI run
//! that found it: a tunnel in flight through a drain, reset at the app).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use super::CLOSE_TIMEOUT;

/// `io` whose shutdown lingers: it ends our side, then reads until the
/// peer's end (or the deadline) before reporting done. Reads and writes
/// pass straight through; the only state is the deadline, made at shutdown.
pub struct Lingering<I> {
    io: I,
    /// Set once our side is shut down: when to stop waiting for the peer's.
    closing: Option<Pin<Box<Sleep>>>,
}

impl<I> Lingering<I> {
    /// Wraps a connection about to be served.
    pub fn new(io: I) -> Self {
        Self { io, closing: None }
    }
}

impl<I: AsyncRead + Unpin> Lingering<I> {
    /// Discards the peer's bytes until its end, an error, or the deadline.
    fn poll_peer_end(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(deadline) = self.closing.as_mut() else {
            return Poll::Ready(());
        };
        if deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        // On the stack, and only while closing: an idle connection holds no
        // buffer for this.
        let mut scratch = [0u8; 512];
        loop {
            let mut discard = ReadBuf::new(&mut scratch);
            match ready!(Pin::new(&mut self.io).poll_read(cx, &mut discard)) {
                Ok(()) if discard.filled().is_empty() => return Poll::Ready(()),
                Ok(()) => {}
                Err(_) => return Poll::Ready(()),
            }
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Lingering<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Lingering<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.closing.is_none() {
            ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
            this.closing = Some(Box::pin(tokio::time::sleep(CLOSE_TIMEOUT)));
        }
        ready!(this.poll_peer_end(cx));
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests;
