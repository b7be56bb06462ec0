//! A connection side's read buffer: bytes read but not yet relayed. None
//! at all while the connection waits between messages (an idle connection
//! is paid for in KiB: the wait reads into the thread's scratch buffer,
//! `net::forward::poll_read_scratch`, and the buffer is allocated when
//! bytes arrive); small while a connection only carries small messages;
//! grown while reads fill it (a body streaming through is read a TLS
//! record's worth at a time) or a head does not fit (up to the head
//! limit), and given back once the connection is between messages.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

use super::message::MAX_HEAD;
use crate::net::forward::poll_read_scratch;

/// The size a buffer starts at when bytes arrive: a typical head fits.
pub const INITIAL: usize = 4 * 1024;
/// The size reads grow to while they fill the buffer: one maximal TLS
/// record of plaintext, so a full read becomes one record.
pub const STREAMING: usize = 16 * 1024;

/// Read bytes in `data[start..]`; reads go into `data`'s spare capacity,
/// which is never zeroed (a 4 KiB `calloc` per request and side was 1.5 %
/// of the sidecars' CPU on the HTTP path: docs/BENCHMARKS.md).
#[derive(Debug)]
pub struct Buf {
    data: Vec<u8>,
    start: usize,
}

impl Buf {
    /// A buffer holding `prefix` (bytes protocol detection already read);
    /// none allocated for an empty one.
    pub fn with_prefix(prefix: &[u8]) -> Buf {
        let mut b = Buf {
            data: Vec::new(),
            start: 0,
        };
        if !prefix.is_empty() {
            b.hold(prefix);
        }
        b
    }

    /// Takes `bytes` into a released buffer: a read that filled the scratch
    /// means more is coming, so the buffer starts at a record's size.
    fn hold(&mut self, bytes: &[u8]) {
        let size = if bytes.len() >= crate::net::forward::BUF_SIZE {
            STREAMING.max(bytes.len())
        } else {
            INITIAL.max(bytes.len())
        };
        let mut data = Vec::with_capacity(size);
        data.extend_from_slice(bytes);
        self.data = data;
        self.start = 0;
    }

    /// The unconsumed bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.data[self.start..]
    }

    /// Whether no bytes wait.
    pub fn is_empty(&self) -> bool {
        self.start == self.data.len()
    }

    /// Marks `n` bytes relayed.
    pub fn consume(&mut self, n: usize) {
        // Saturating: `usize::MAX` means everything held.
        self.start = self.start.saturating_add(n).min(self.data.len());
        if self.is_empty() {
            self.start = 0;
            self.data.clear();
        }
    }

    /// Reads once from `io` after the bytes already held; `Ok(0)` is EOF.
    /// A full buffer is compacted first, then grown while under the head
    /// limit (a head that does not fit must still be parsed whole); at the
    /// limit it is an error the caller reports as a head too large.
    /// Cancel-safe: what a read returned is in the buffer.
    pub async fn fill<R: AsyncRead + Unpin + ?Sized>(&mut self, io: &mut R) -> io::Result<usize> {
        if self.data.capacity() == 0 {
            // Released: wait without a buffer, take what arrives.
            return std::future::poll_fn(|cx| {
                poll_read_scratch(io, cx, |bytes| {
                    if !bytes.is_empty() {
                        self.hold(bytes);
                    }
                    bytes.len()
                })
            })
            .await;
        }
        if self.data.len() == self.data.capacity() {
            if self.start > 0 {
                self.data.drain(..self.start);
                self.start = 0;
            } else if self.data.capacity() < MAX_HEAD + 1 {
                let grown = (self.data.capacity() * 2).min(MAX_HEAD + 1);
                self.data.reserve_exact(grown - self.data.len());
            } else {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "buffer full"));
            }
        }
        let spare = self.data.capacity() - self.data.len();
        // Into the spare capacity as it is (tokio's `ReadBuf` tracks what
        // the read initialised): nothing to zero first.
        let n = io.read_buf(&mut self.data).await?;
        if n == spare && self.data.capacity() < STREAMING {
            // The read took all there was room for: more is coming.
            self.data.reserve_exact(STREAMING - self.data.len());
        }
        Ok(n)
    }

    /// Gives the buffer back once it is empty (the connection is between
    /// messages): the next read allocates what it needs.
    pub fn relax(&mut self) {
        if self.is_empty() {
            self.data = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fills_consumes_compacts_and_grows_to_the_head_limit() {
        let mut b = Buf::with_prefix(b"ab");
        assert_eq!(b.bytes(), b"ab");
        let mut src: &[u8] = b"cdef";
        assert_eq!(b.fill(&mut src).await.unwrap(), 4);
        assert_eq!(b.bytes(), b"abcdef");
        b.consume(2);
        assert_eq!(b.bytes(), b"cdef");
        b.consume(10);
        assert!(b.is_empty());
        // Everything held, after part was relayed: no overflow, all gone.
        let mut src: &[u8] = b"ghij";
        assert_eq!(b.fill(&mut src).await.unwrap(), 4);
        b.consume(1);
        b.consume(usize::MAX);
        assert!(b.is_empty());
        assert_eq!(b.bytes(), b"");
        b.relax();
        let big = vec![7u8; MAX_HEAD * 2];
        let mut src: &[u8] = &big;
        let mut total = 0;
        loop {
            match b.fill(&mut src).await {
                Ok(n) => total += n,
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
                    break;
                }
            }
        }
        assert_eq!(total, MAX_HEAD + 1);
        assert_eq!(b.bytes().len(), MAX_HEAD + 1);
        b.consume(usize::MAX);
        b.relax();
        assert_eq!(b.data.capacity(), 0, "an idle buffer is given back");
    }

    #[tokio::test]
    async fn reads_that_fill_the_buffer_grow_it_to_a_record() {
        let mut b = Buf::with_prefix(&[]);
        assert_eq!(b.data.capacity(), 0, "nothing held before bytes arrive");
        let body = vec![1u8; 3 * STREAMING];
        let mut src: &[u8] = &body;
        // A released buffer reads a scratch's worth and keeps a record's.
        assert_eq!(b.fill(&mut src).await.unwrap(), STREAMING);
        assert_eq!(b.data.capacity(), STREAMING);
        b.consume(usize::MAX);
        assert_eq!(b.fill(&mut src).await.unwrap(), STREAMING);
        b.consume(usize::MAX);
        b.relax();
        assert_eq!(b.data.capacity(), 0);
        // A small message: a head's worth, bytes intact; EOF holds nothing.
        let mut src: &[u8] = b"GET / HTTP/1.1\r\n\r\n";
        assert_eq!(b.fill(&mut src).await.unwrap(), 18);
        assert_eq!(b.bytes(), b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(b.data.capacity(), INITIAL);
        b.consume(usize::MAX);
        b.relax();
        assert_eq!(b.fill(&mut src).await.unwrap(), 0);
        assert_eq!(b.data.capacity(), 0);
    }
}
