//! Where a message body ends on the wire. Bodies pass through byte for
//! byte (chunked encoding included: no re-framing, no copy into frames);
//! this only finds the end, strictly, so the proxy and the next hop agree
//! on it.

use super::message::Framing;

/// The longest chunk-size line or trailer field accepted.
const MAX_LINE: usize = 4096;
/// The most trailer bytes accepted.
const MAX_TRAILERS: usize = 16 * 1024;

/// Why a body's framing is broken.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BodyError {
    /// A malformed chunk-size line, a missing CRLF, an oversized line.
    #[error("malformed chunked body: {0}")]
    Chunked(&'static str),
}

/// The part of a body still to come.
#[derive(Debug)]
pub enum Remaining {
    /// This many bytes.
    Length(u64),
    /// The rest of a chunked body.
    Chunked(Chunked),
    /// Everything until the sender closes.
    UntilClose,
    /// Nothing: the body is complete.
    Done,
}

impl Remaining {
    /// The whole body of a message with `framing`.
    pub fn of(framing: Framing) -> Remaining {
        match framing {
            Framing::Empty | Framing::Length(0) => Remaining::Done,
            Framing::Length(n) => Remaining::Length(n),
            Framing::Chunked => Remaining::Chunked(Chunked::default()),
            Framing::UntilClose => Remaining::UntilClose,
        }
    }

    /// Whether the body is complete.
    pub fn is_done(&self) -> bool {
        matches!(self, Remaining::Done)
    }

    /// How many of `bytes` (the next bytes on the wire) belong to the body;
    /// afterwards [`Remaining::is_done`] says whether it ended there.
    pub fn take(&mut self, bytes: &[u8]) -> Result<usize, BodyError> {
        match self {
            Remaining::Done => Ok(0),
            Remaining::UntilClose => Ok(bytes.len()),
            Remaining::Length(n) => {
                let take = (*n).min(bytes.len() as u64);
                *n -= take;
                if *n == 0 {
                    *self = Remaining::Done;
                }
                // At most bytes.len(), which is a usize.
                Ok(take as usize)
            }
            Remaining::Chunked(chunked) => {
                let take = chunked.scan(bytes)?;
                if chunked.state == State::Done {
                    *self = Remaining::Done;
                }
                Ok(take)
            }
        }
    }
}

/// A chunked body's parse state, carried across reads.
#[derive(Debug, Default)]
pub struct Chunked {
    state: State,
    /// Bytes of the current size line or trailer field.
    line: usize,
    /// Trailer bytes so far.
    trailers: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    /// In the hex digits of a chunk size.
    #[default]
    SizeStart,
    Size {
        size: u64,
    },
    /// In a chunk extension (or whitespace before it), up to CR.
    Extension {
        size: u64,
    },
    SizeLf {
        size: u64,
    },
    Data {
        left: u64,
    },
    DataCr,
    DataLf,
    /// At the start of a trailer field line or the final CRLF.
    TrailerStart,
    TrailerField,
    TrailerLf,
    EndLf,
    Done,
}

impl Chunked {
    /// Scans `bytes`, returning how many belong to the body (all of them,
    /// unless the body ends inside).
    fn scan(&mut self, bytes: &[u8]) -> Result<usize, BodyError> {
        let mut i = 0;
        while i < bytes.len() {
            if let State::Data { left } = self.state {
                let take = left.min((bytes.len() - i) as u64);
                // take ≤ bytes.len() - i, a usize.
                i += take as usize;
                self.state = if take == left {
                    State::DataCr
                } else {
                    State::Data { left: left - take }
                };
                continue;
            }
            if self.state == State::Done {
                break;
            }
            self.step(bytes[i])?;
            i += 1;
        }
        Ok(i)
    }

    fn line_byte(&mut self) -> Result<(), BodyError> {
        self.line += 1;
        if self.line > MAX_LINE {
            return Err(BodyError::Chunked("line too long"));
        }
        Ok(())
    }

    fn step(&mut self, b: u8) -> Result<(), BodyError> {
        self.state = match (self.state, b) {
            (State::SizeStart, _) => {
                self.line = 0;
                self.line_byte()?;
                let digit = hex(b).ok_or(BodyError::Chunked("chunk size is not hex"))?;
                State::Size {
                    size: u64::from(digit),
                }
            }
            (State::Size { size }, _) if hex(b).is_some() => {
                self.line_byte()?;
                let digit = u64::from(hex(b).unwrap_or(0));
                let size = size
                    .checked_mul(16)
                    .and_then(|s| s.checked_add(digit))
                    .ok_or(BodyError::Chunked("chunk size overflows"))?;
                State::Size { size }
            }
            (State::Size { size }, b'\r') | (State::Extension { size }, b'\r') => {
                State::SizeLf { size }
            }
            (State::Size { size }, b';' | b' ' | b'\t') => {
                self.line_byte()?;
                State::Extension { size }
            }
            (State::Extension { size }, _) if b != b'\n' => {
                self.line_byte()?;
                State::Extension { size }
            }
            (State::SizeLf { size: 0 }, b'\n') => {
                self.trailers = 0;
                State::TrailerStart
            }
            (State::SizeLf { size }, b'\n') => State::Data { left: size },
            (State::DataCr, b'\r') => State::DataLf,
            (State::DataLf, b'\n') => State::SizeStart,
            (State::TrailerStart, b'\r') => State::EndLf,
            (State::TrailerStart | State::TrailerField, _) if b != b'\n' && b != b'\r' => {
                self.trailers += 1;
                if self.trailers > MAX_TRAILERS {
                    return Err(BodyError::Chunked("trailers too large"));
                }
                State::TrailerField
            }
            (State::TrailerField, b'\r') => State::TrailerLf,
            (State::TrailerLf, b'\n') => State::TrailerStart,
            (State::EndLf, b'\n') => State::Done,
            (State::Size { .. } | State::Extension { .. }, _) => {
                return Err(BodyError::Chunked("bad chunk-size line"))
            }
            _ => return Err(BodyError::Chunked("missing CRLF")),
        };
        Ok(())
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `wire` in pieces of `step` bytes; returns the body length found.
    fn body_len(wire: &[u8], step: usize) -> Result<Option<usize>, BodyError> {
        let mut rest = Remaining::of(Framing::Chunked);
        let mut at = 0;
        while at < wire.len() {
            let end = (at + step).min(wire.len());
            at += rest.take(&wire[at..end])?;
            if rest.is_done() {
                return Ok(Some(at));
            }
            if at < end {
                unreachable!("an unfinished body takes every byte");
            }
        }
        Ok(None)
    }

    #[test]
    fn chunked_bodies_end_where_they_end_whatever_the_reads() {
        let body = b"5\r\nhello\r\n1a;ext=\"x\"\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\ngrpc-status: 0\r\n\r\n";
        let wire = [&body[..], b"GET /next HTTP/1.1\r\n"].concat();
        for step in [1, 2, 3, 7, 64, 4096] {
            assert_eq!(
                body_len(&wire, step).unwrap(),
                Some(body.len()),
                "step {step}"
            );
        }
        assert_eq!(body_len(b"0\r\n\r\n", 1).unwrap(), Some(5));
        assert_eq!(body_len(b"A\r\n0123456789\r\n", 4).unwrap(), None);
    }

    #[test]
    fn broken_chunked_bodies_are_refused() {
        for wire in [
            &b"x\r\n"[..],
            b"5\r\nhelloX\r\n",
            b"5\nhello\r\n",
            b"fffffffffffffffff\r\n",
            b"0\r\n\n",
            b"\r\n",
        ] {
            assert!(
                body_len(wire, 1).is_err(),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
        let long = [b"1;".as_slice(), &[b'a'; MAX_LINE], b"\r\n"].concat();
        assert!(body_len(&long, 100).is_err());
    }

    #[test]
    fn lengths_count_down() {
        let mut rest = Remaining::of(Framing::Length(5));
        assert_eq!(rest.take(b"abc").unwrap(), 3);
        assert!(!rest.is_done());
        assert_eq!(rest.take(b"defgh").unwrap(), 2);
        assert!(rest.is_done());
        assert!(Remaining::of(Framing::Empty).is_done());
        let mut rest = Remaining::of(Framing::UntilClose);
        assert_eq!(rest.take(b"abc").unwrap(), 3);
        assert!(!rest.is_done());
    }
}
