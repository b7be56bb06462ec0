//! Protocol detection from the first bytes a client sends: the HTTP/2
//! connection preface, or an HTTP/1 request line. Used on `auto` ports and
//! on outbound connections, with a deadline so a silent client falls back
//! to opaque TCP.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The most bytes detection looks at.
const MAX_SNIFF: usize = 8192;

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the first bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// An HTTP/1.x request line.
    Http1,
    /// The HTTP/2 preface.
    Http2,
    /// Anything else: opaque TCP.
    Opaque,
    /// Too few bytes to tell yet.
    NeedMore,
}

impl Detected {
    /// HTTP of either version.
    pub fn is_http(self) -> bool {
        matches!(self, Detected::Http1 | Detected::Http2)
    }
}

/// Classifies a prefix of the client's first bytes.
pub fn classify(bytes: &[u8]) -> Detected {
    // RFC 9112 §2.2: servers may skip empty lines before a request line, so
    // they must not hide one from detection.
    let skipped = bytes
        .iter()
        .take_while(|b| matches!(b, b'\r' | b'\n'))
        .count();
    let bytes = &bytes[skipped..];
    if bytes.is_empty() {
        return Detected::NeedMore;
    }
    let n = bytes.len().min(H2_PREFACE.len());
    if bytes[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Detected::Http2
        } else {
            Detected::NeedMore
        };
    }
    // METHOD SP target SP HTTP/1.x. The method is any token, in any case
    // and of any length, as Go's server reads it (`get`, a made-up verb),
    // once a space follows it: what an app would serve as HTTP must not
    // pass as opaque bytes, with the caller's identity fields in it.
    let method_len = bytes.iter().take_while(|b| is_tchar(**b)).count();
    // More bytes are waited for only after a common method (upper case, 16
    // at most): an opaque protocol whose first message is a word or a line
    // that then waits for an answer (`000123`, `hello world`) would
    // otherwise wait for the detection deadline. Any other token is a
    // method when the request line shows ` HTTP/1.` in what came.
    let common = method_len <= 16 && bytes[..method_len].iter().all(u8::is_ascii_uppercase);
    if method_len == bytes.len() {
        return if common {
            Detected::NeedMore
        } else {
            Detected::Opaque
        };
    }
    if method_len == 0 || bytes[method_len] != b' ' {
        return Detected::Opaque;
    }
    // Look for " HTTP/1." before the end of the first line.
    let line_end = bytes.iter().position(|b| *b == b'\n');
    let line = &bytes[..line_end.unwrap_or(bytes.len())];
    if line.windows(8).any(|w| w == b" HTTP/1.") {
        return Detected::Http1;
    }
    match line_end {
        None if common => still_http(bytes),
        _ => Detected::Opaque,
    }
}

/// A first line that may still be a request line when no more bytes come:
/// more are needed, or, past what detection looks at, it is taken as
/// HTTP/1 (Go reads a request line of up to 1 MiB, Node of 16 KiB), so the
/// relay refuses it (431) instead of letting it through unread. A protocol
/// whose first 8 KiB are one such line belongs on a `tcp` port.
fn still_http(bytes: &[u8]) -> Detected {
    if bytes.len() < MAX_SNIFF {
        Detected::NeedMore
    } else {
        Detected::Http1
    }
}

/// RFC 9110 §5.6.2 `tchar`: what a method (a token) is made of.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Reads from `io` until the bytes classify (or EOF, or 8 KiB), returning
/// the verdict and the bytes read, to be replayed with [`Prefixed`].
pub async fn sniff<I: AsyncRead + Unpin>(io: &mut I) -> io::Result<(Detected, Bytes)> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        let mut chunk = [0u8; 1024];
        let n = io.read(&mut chunk).await?;
        buf.extend_from_slice(&chunk[..n]);
        let d = classify(&buf);
        if n == 0 || d != Detected::NeedMore || buf.len() >= MAX_SNIFF {
            let d = if d == Detected::NeedMore {
                Detected::Opaque
            } else {
                d
            };
            return Ok((d, Bytes::from(buf)));
        }
    }
}

/// Peeks (without consuming) at a plaintext socket's first bytes until they
/// classify, EOF, or `wait` passes; a silent client (a server-speaks-first
/// protocol) is `Opaque` after `wait`. Up to 8 KiB are examined: an HTTP/1
/// request line shows ` HTTP/1.` within them, or is still a method and a
/// target at their end (then taken as HTTP/1: see `classify`).
pub async fn peek(tcp: &tokio::net::TcpStream, wait: std::time::Duration) -> Detected {
    // On the heap, and only during detection: the connection's task keeps
    // no buffer. Not zeroed: the kernel writes what is peeked, and only
    // that is read (the 8 KiB zeroed per new connection were 8,200 of the
    // outbound side's 75,000 instructions under callgrind, which counts
    // `rep stosb` byte by byte: less in time than that, but for nothing).
    let mut buf = Vec::<u8>::with_capacity(MAX_SNIFF);
    let look = async {
        let mut seen = 0;
        loop {
            let mut window = ReadBuf::uninit(buf.spare_capacity_mut());
            let n = match std::future::poll_fn(|cx| tcp.poll_peek(cx, &mut window)).await {
                Ok(0) | Err(_) => return Detected::Opaque,
                Ok(n) => n,
            };
            match classify(window.filled()) {
                Detected::NeedMore if n >= MAX_SNIFF => return Detected::Opaque,
                // peek returns at once while the same bytes wait: pause
                // until more arrive.
                Detected::NeedMore => {
                    if n == seen {
                        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                    }
                    seen = n;
                }
                d => return d,
            }
        }
    };
    tokio::time::timeout(wait, look)
        .await
        .unwrap_or(Detected::Opaque)
}

pin_project_lite::pin_project! {
    /// An I/O whose first reads replay bytes already consumed by detection.
    #[derive(Debug)]
    pub struct Prefixed<I> {
        prefix: Bytes,
        #[pin]
        inner: I,
    }
}

impl<I> Prefixed<I> {
    /// Replays `prefix`, then reads `inner`.
    pub fn new(prefix: Bytes, inner: I) -> Prefixed<I> {
        Prefixed { prefix, inner }
    }
}

impl<I: AsyncRead> AsyncRead for Prefixed<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if this.prefix.has_remaining() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        this.inner.poll_read(cx, buf)
    }
}

impl<I: AsyncWrite> AsyncWrite for Prefixed<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify(H2_PREFACE), Detected::Http2);
        assert_eq!(classify(&H2_PREFACE[..10]), Detected::NeedMore);
        assert_eq!(classify(b"GET / HTTP/1.1\r\nHost: x\r\n"), Detected::Http1);
        assert_eq!(classify(b"POST /refunds/1 HTTP/1.0\r\n"), Detected::Http1);
        assert_eq!(
            classify(b"\r\n\r\nGET /refunds HTTP/1.1\r\n"),
            Detected::Http1
        );
        assert_eq!(classify(b"\r\n"), Detected::NeedMore);
        assert_eq!(classify(b"GET /long/path"), Detected::NeedMore);
        assert_eq!(classify(b"GE"), Detected::NeedMore);
        assert_eq!(
            classify(b"\x16\x03\x01\x02"),
            Detected::Opaque,
            "a TLS ClientHello"
        );
        assert_eq!(classify(b"SSH-2.0-OpenSSH\r\n"), Detected::Opaque);
        // Any token is a method to Go: lower case, made up, long.
        assert_eq!(classify(b"get / HTTP/1.1\r\n"), Detected::Http1);
        assert_eq!(classify(b"hello world"), Detected::Opaque);
        assert_eq!(classify(b"M-SEARCH * HTTP/1.1\r\n"), Detected::Http1);
        let long_method = [&[b'A'; 40][..], b" / HTTP/1.1\r\n"].concat();
        assert_eq!(classify(&long_method), Detected::Http1);
        // A request line longer than detection looks at is HTTP to the
        // relay, which refuses it; as long a run of token bytes too.
        let long_line = [&b"GET /"[..], &[b'a'; MAX_SNIFF]].concat();
        assert_eq!(classify(&long_line), Detected::Http1);
        // A word with no space yet: waited for only while it may be a
        // common method, so a word-long opaque message is not held.
        assert_eq!(classify(b"DELE"), Detected::NeedMore);
        assert_eq!(classify(b"000123"), Detected::Opaque);
        assert_eq!(classify(b"hello"), Detected::Opaque);
        assert_eq!(classify(&[b'A'; 17]), Detected::Opaque);
        // Not a request line: no space after the token, or no HTTP/1.
        assert_eq!(classify(b"HELO mail.example.com\r\n"), Detected::Opaque);
        assert_eq!(classify(b"*1\r\n$4\r\nPING\r\n"), Detected::Opaque);
        assert_eq!(classify(b"GET / FOO\r\n"), Detected::Opaque);
        assert_eq!(
            classify(b"PRX"),
            Detected::NeedMore,
            "could still be a method"
        );
        assert_eq!(classify(b"PRX\r\n"), Detected::Opaque);
    }

    #[tokio::test]
    async fn sniffed_bytes_are_replayed() {
        let (mut a, b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, b"GET /x HTTP/1.1\r\n\r\nrest")
            .await
            .unwrap();
        drop(a);
        let mut b = b;
        let (d, prefix) = sniff(&mut b).await.unwrap();
        assert_eq!(d, Detected::Http1);
        let mut p = Prefixed::new(prefix, b);
        let mut all = Vec::new();
        p.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"GET /x HTTP/1.1\r\n\r\nrest");
    }

    #[tokio::test]
    async fn peeks_without_consuming() {
        use tokio::io::AsyncWriteExt;
        use tokio::net::{TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let wait = std::time::Duration::from_secs(10);
        for (sent, want) in [
            (&b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"[..], Detected::Http1),
            (H2_PREFACE, Detected::Http2),
            (&b"\x16\x03\x01"[..], Detected::Opaque),
        ] {
            let mut client = TcpStream::connect(addr).await.unwrap();
            let (mut server, _) = listener.accept().await.unwrap();
            client.write_all(sent).await.unwrap();
            assert_eq!(peek(&server, wait).await, want);
            let mut got = vec![0; sent.len()];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(got, sent, "peek consumed nothing");
        }
        // Not HTTP: a method-like start and a space, then no request line
        // (random payloads look like this one time in ~2,500).
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let mut junk = b"Q ".to_vec();
        junk.extend(std::iter::repeat_n(0xAAu8, 510));
        client.write_all(&junk).await.unwrap();
        let d = peek(&server, std::time::Duration::from_millis(300)).await;
        assert_eq!(d, Detected::Opaque);
        // A request line in two pieces: peeked again, from the start, once
        // more bytes came.
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        client.write_all(b"GET /split").await.unwrap();
        let detected = tokio::spawn(async move { peek(&server, wait).await });
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        client.write_all(b" HTTP/1.1\r\n\r\n").await.unwrap();
        assert_eq!(detected.await.unwrap(), Detected::Http1);
        // A first line longer than detection looks: HTTP at 8 KiB (for the
        // relay to refuse), not bytes passed on unread.
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let mut long = b"GET /".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_SNIFF));
        client.write_all(&long).await.unwrap();
        assert_eq!(peek(&server, wait).await, Detected::Http1);
        // A silent client: opaque once the wait is over.
        let _client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let d = peek(&server, std::time::Duration::from_millis(100)).await;
        assert_eq!(d, Detected::Opaque);
    }
}
