//! grpc-core clients (py-spiffe, and the C++, Ruby, PHP and C# libraries on
//! it) name a Unix socket's path, percent-encoded, as the HTTP/2
//! `:authority` of every call (`tmp%2Fspiffe%2Fworkload.sock`). The `h2`
//! crate under tonic refuses such an authority (`%` is valid there only in
//! an IPv6 zone) with a stream reset, so without help those clients cannot
//! call the Workload API at all. Go's and Java's clients send `localhost`.
//!
//! [`AuthorityFix`] sits between the socket and tonic on the client's bytes:
//! frames pass through unchanged except header blocks, which are decoded
//! (HPACK, with the connection's dynamic table) and re-encoded as literals,
//! with an `:authority` that is not a valid authority replaced by
//! `localhost`. The authority means nothing on a Unix socket; nothing else
//! is changed. Only the Workload API's connections go through it.

use std::borrow::Cow;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tonic::transport::server::{Connected, UdsConnectInfo};

const PREFACE_LEN: usize = 24;
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Largest frame a client may send: the server advertises HTTP/2's default.
const MAX_FRAME: usize = 16_384;
/// Largest header block (its frames together) and decoded header list; a
/// Workload API call's headers are a few hundred bytes.
const MAX_HEADERS: usize = 64 * 1024;
/// The HPACK dynamic table a client may size: HTTP/2's default
/// `SETTINGS_HEADER_TABLE_SIZE`, which the server (tonic's h2) keeps. Past
/// it, a table size update is refused: the decoder's own bound is 2^28
/// bytes per connection, before any call is authorized.
const TABLE_SIZE: usize = 4096;
/// What replaces an authority the server would refuse.
const LOCALHOST: &[u8] = b"localhost";

/// A Workload API connection with its client's header blocks mended (see
/// the module doc); writes go straight to the socket.
pub struct AuthorityFix<S> {
    inner: S,
    preface_left: usize,
    /// From the client, not yet a whole frame.
    raw: BytesMut,
    /// Processed, for the server.
    ready: BytesMut,
    /// A header block waiting for its CONTINUATION frames.
    block: Option<Block>,
    decoder: loona_hpack::Decoder<'static>,
    eof: bool,
    /// Held while the connection lives: its place among those of refused
    /// UIDs (see `workload::serve`).
    _place: Option<crate::net::caps::Spent>,
}

struct Block {
    stream_id: u32,
    end_stream: bool,
    fragment: Vec<u8>,
}

impl<S> AuthorityFix<S> {
    /// Wraps a freshly accepted connection (nothing read from it yet).
    pub fn new(inner: S) -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_SIZE);
        Self {
            inner,
            preface_left: PREFACE_LEN,
            raw: BytesMut::new(),
            ready: BytesMut::new(),
            block: None,
            decoder,
            eof: false,
            _place: None,
        }
    }

    /// Holds `place` for as long as the connection lives.
    pub fn holding(mut self, place: crate::net::caps::Spent) -> Self {
        self._place = Some(place);
        self
    }

    /// Moves every whole frame of `raw` to `ready`, header blocks mended.
    fn process(&mut self) -> io::Result<()> {
        if self.preface_left > 0 {
            let n = self.preface_left.min(self.raw.len());
            self.ready.extend_from_slice(&self.raw.split_to(n));
            self.preface_left -= n;
            if self.preface_left > 0 {
                return Ok(());
            }
        }
        while self.raw.len() >= FRAME_HEADER {
            let len = usize::from(self.raw[0]) << 16
                | usize::from(self.raw[1]) << 8
                | usize::from(self.raw[2]);
            if len > MAX_FRAME {
                return Err(invalid("a frame larger than SETTINGS_MAX_FRAME_SIZE"));
            }
            if self.raw.len() < FRAME_HEADER + len {
                break;
            }
            let frame = self.raw.split_to(FRAME_HEADER + len);
            let (kind, flags) = (frame[3], frame[4]);
            let stream_id =
                u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
            let payload = &frame[FRAME_HEADER..];
            match kind {
                HEADERS if self.block.is_none() => {
                    self.block = Some(Block {
                        stream_id,
                        end_stream: flags & END_STREAM != 0,
                        fragment: fragment(payload, flags)?.to_vec(),
                    });
                }
                CONTINUATION => match &mut self.block {
                    Some(block) if block.stream_id == stream_id => {
                        block.fragment.extend_from_slice(payload);
                    }
                    _ => return Err(invalid("CONTINUATION without its HEADERS")),
                },
                _ if self.block.is_some() => {
                    return Err(invalid("a frame inside a header block"));
                }
                _ => {
                    self.ready.extend_from_slice(&frame);
                    continue;
                }
            }
            if self
                .block
                .as_ref()
                .is_some_and(|b| b.fragment.len() > MAX_HEADERS)
            {
                return Err(invalid("header block too large"));
            }
            if flags & END_HEADERS != 0 {
                self.finish_block()?;
            }
        }
        Ok(())
    }

    /// Decodes the complete header block and writes it out again as
    /// literals (no dynamic table on the server's side), authority mended.
    fn finish_block(&mut self) -> io::Result<()> {
        let Some(block) = self.block.take() else {
            return Ok(());
        };
        let mut out = Vec::with_capacity(block.fragment.len() + 64);
        let mut decoded = 0usize;
        self.decoder
            .decode_with_cb(&block.fragment, |name, value| {
                decoded += name.len() + value.len() + 32;
                if decoded > MAX_HEADERS {
                    return;
                }
                let value = if &*name == b":authority" && !valid_authority(&value) {
                    Cow::Borrowed(LOCALHOST)
                } else {
                    value
                };
                encode_literal(&mut out, &name, &value);
            })
            .map_err(|e| invalid(&format!("HPACK: {e}")))?;
        if decoded > MAX_HEADERS {
            return Err(invalid("header list too large"));
        }
        let mut chunks = out.chunks(MAX_FRAME).peekable();
        let mut first = true;
        loop {
            let chunk = chunks.next().unwrap_or_default();
            let last = chunks.peek().is_none();
            let (kind, mut flags) = if first {
                (HEADERS, if block.end_stream { END_STREAM } else { 0 })
            } else {
                (CONTINUATION, 0)
            };
            if last {
                flags |= END_HEADERS;
            }
            // chunk.len() <= MAX_FRAME < 2^24: the three bytes hold it.
            let len = chunk.len() as u32;
            self.ready.extend_from_slice(&len.to_be_bytes()[1..]);
            self.ready.extend_from_slice(&[kind, flags]);
            self.ready.extend_from_slice(&block.stream_id.to_be_bytes());
            self.ready.extend_from_slice(chunk);
            first = false;
            if last {
                return Ok(());
            }
        }
    }
}

/// A HEADERS payload without its padding and priority fields.
fn fragment(payload: &[u8], flags: u8) -> io::Result<&[u8]> {
    let mut p = payload;
    let mut pad = 0;
    if flags & PADDED != 0 {
        let (&n, rest) = p.split_first().ok_or_else(|| invalid("short HEADERS"))?;
        pad = usize::from(n);
        p = rest;
    }
    if flags & PRIORITY != 0 {
        p = p.get(5..).ok_or_else(|| invalid("short HEADERS"))?;
    }
    p.get(..p.len().saturating_sub(pad))
        .filter(|_| pad <= p.len())
        .ok_or_else(|| invalid("HEADERS padding longer than the frame"))
}

fn valid_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// RFC 7541 6.2.2: literal header field without indexing, new name, no
/// Huffman coding.
fn encode_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    encode_length(out, name.len());
    out.extend_from_slice(name);
    encode_length(out, value.len());
    out.extend_from_slice(value);
}

/// RFC 7541 5.1 with a 7-bit prefix (the H bit, 0, above it).
fn encode_length(out: &mut Vec<u8>, mut n: usize) {
    if n < 0x7f {
        out.push(n as u8);
        return;
    }
    out.push(0x7f);
    n -= 0x7f;
    while n >= 0x80 {
        out.push((n & 0x7f) as u8 | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn invalid(why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("Workload API client: {why}"),
    )
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.ready.is_empty() {
                let n = buf.remaining().min(this.ready.len());
                buf.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 4096];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                // A partial frame at EOF goes on as it is: the server sees it cut.
                this.eof = true;
                let rest = this.raw.split();
                this.ready.extend_from_slice(&rest);
                continue;
            }
            this.raw.extend_from_slice(read.filled());
            this.process()?;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl Connected for AuthorityFix<UnixStream> {
    type ConnectInfo = UdsConnectInfo;

    fn connect_info(&self) -> UdsConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// Splits `bytes` (after the preface) into frames: (kind, flags, stream, payload).
    fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let len =
                usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
            let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
            out.push((bytes[3], bytes[4], stream, bytes[9..9 + len].to_vec()));
            bytes = &bytes[9 + len..];
        }
        out
    }

    async fn through(input: Vec<u8>) -> io::Result<Vec<u8>> {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        client.write_all(&input).await.unwrap();
        drop(client);
        let mut fixed = AuthorityFix::new(server);
        let mut out = Vec::new();
        fixed.read_to_end(&mut out).await?;
        Ok(out)
    }

    #[tokio::test]
    async fn a_percent_encoded_authority_becomes_localhost_even_when_indexed() {
        let mut encoder = loona_hpack::Encoder::new();
        let call = |authority: &'static [u8]| {
            vec![
                (&b":method"[..], &b"POST"[..]),
                (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
                (b":authority", authority),
                (b"workload.spiffe.io", b"true"),
            ]
        };
        let first = encoder.encode(call(b"tmp%2Fspiffe%2Fworkload.sock"));
        // The second call's authority comes from the dynamic table.
        let second = encoder.encode(call(b"tmp%2Fspiffe%2Fworkload.sock"));
        let third = encoder.encode(call(b"example.org:443"));
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        input.extend(frame(HEADERS, END_HEADERS, 1, &first));
        input.extend(frame(0x0, END_STREAM, 1, b"\0\0\0\0\0")); // DATA
        let (a, b) = second.split_at(second.len() / 2);
        input.extend(frame(
            HEADERS,
            PADDED | END_STREAM,
            3,
            &[[2].as_slice(), a, &[0, 0]].concat(),
        ));
        input.extend(frame(CONTINUATION, END_HEADERS, 3, b));
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 5, &third));

        let out = through(input).await.unwrap();
        assert_eq!(&out[..24], PREFACE);
        let frames = frames(&out[24..]);
        let kinds: Vec<(u8, u8, u32)> = frames.iter().map(|f| (f.0, f.1, f.2)).collect();
        assert_eq!(
            kinds,
            [
                (0x4, 0, 0),
                (HEADERS, END_HEADERS, 1),
                (0x0, END_STREAM, 1),
                (HEADERS, END_HEADERS | END_STREAM, 3),
                (HEADERS, END_HEADERS | END_STREAM, 5),
            ]
        );
        assert_eq!(frames[2].3, b"\0\0\0\0\0", "DATA untouched");
        let mut decoder = loona_hpack::Decoder::new();
        let authority = |block: &[u8], decoder: &mut loona_hpack::Decoder<'_>| {
            let headers = decoder.decode(block).unwrap();
            assert_eq!(headers.len(), 4, "every header kept");
            assert_eq!(
                headers[3],
                (b"workload.spiffe.io".to_vec(), b"true".to_vec())
            );
            headers
                .into_iter()
                .find(|(n, _)| n == b":authority")
                .unwrap()
                .1
        };
        assert_eq!(authority(&frames[1].3, &mut decoder), b"localhost");
        assert_eq!(authority(&frames[3].3, &mut decoder), b"localhost");
        assert_eq!(
            authority(&frames[4].3, &mut decoder),
            b"example.org:443",
            "a valid one is kept"
        );
    }

    #[tokio::test]
    async fn broken_framing_is_refused() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(CONTINUATION, END_HEADERS, 1, b"x"));
        assert!(through(input).await.is_err());
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &[0x82]));
        input.extend(frame(0x0, 0, 1, b"data inside a header block"));
        assert!(through(input).await.is_err());
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &[0xff, 0xff, 0xff, 0xff, 0x0f],
        ));
        assert!(through(input).await.is_err(), "bad HPACK");
        let mut input = PREFACE.to_vec();
        input.extend(&[0x01, 0x00, 0x00, 0x0, 0, 0, 0, 0, 1]);
        assert!(through(input).await.is_err(), "64 KiB frame");
    }

    #[tokio::test]
    async fn the_dynamic_table_stays_within_the_default_size() {
        // A table size update (RFC 7541 §6.3) to the default, then an
        // indexed `:method: GET`: passed on.
        let block = |update: &[u8]| {
            let mut input = PREFACE.to_vec();
            input.extend(frame(HEADERS, END_HEADERS, 1, &[update, &[0x82]].concat()));
            input
        };
        assert!(through(block(&[0x3f, 0xe1, 0x1f])).await.is_ok(), "4,096");
        // 4,097, and the 2^28 a hostile client would fill entry by entry.
        assert!(through(block(&[0x3f, 0xe2, 0x1f])).await.is_err(), "4,097");
        assert!(through(block(&[0x3f, 0xff, 0xff, 0xff, 0x7f]))
            .await
            .is_err());
    }
}
