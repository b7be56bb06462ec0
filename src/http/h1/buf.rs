//! A connection side's read buffer: bytes read but not yet relayed, kept
//! in one allocation for the connection's life (grown only for a head
//! larger than the initial size, up to the head limit).

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

use super::message::MAX_HEAD;

/// The initial size: a typical head and a TLS record's worth of body.
pub const INITIAL: usize = 16 * 1024;

/// Read bytes in `data[start..end]`.
#[derive(Debug)]
pub struct Buf {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl Buf {
    /// A buffer holding `prefix` (bytes protocol detection already read).
    pub fn with_prefix(prefix: &[u8]) -> Buf {
        let mut data = vec![0; INITIAL.max(prefix.len())];
        data[..prefix.len()].copy_from_slice(prefix);
        Buf {
            data,
            start: 0,
            end: prefix.len(),
        }
    }

    /// The unconsumed bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    /// Whether no bytes wait.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Marks `n` bytes relayed.
    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads once from `io` after the bytes already held; `Ok(0)` is EOF.
    /// A full buffer is compacted first, then grown while under the head
    /// limit (a head that does not fit must still be parsed whole); at the
    /// limit it is an error the caller reports as a head too large.
    /// Cancel-safe: what a read returned is in the buffer.
    pub async fn fill<R: AsyncRead + Unpin + ?Sized>(&mut self, io: &mut R) -> io::Result<usize> {
        if self.end == self.data.len() {
            if self.start > 0 {
                self.data.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else if self.data.len() < MAX_HEAD + 1 {
                let grown = (self.data.len() * 2).min(MAX_HEAD + 1);
                self.data.resize(grown, 0);
            } else {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "buffer full"));
            }
        }
        let n = io.read(&mut self.data[self.end..]).await?;
        self.end += n;
        Ok(n)
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
    }
}
