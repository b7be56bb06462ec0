//! Where a client's HTTP/2 frames begin and end, told from the 9-byte frame
//! headers alone (RFC 9113 §4.1: 24-bit length, type, flags, stream ID) as
//! the bytes go by: what the header deadline ([`super::h2_deadline`])
//! times. A few bytes of state, no buffer: payloads are skipped by count.
//!
//! Hand-written rather than taken from `h2`: h2 parses frames only once
//! they are whole, and what is timed here is precisely how long a frame (or
//! a header block) takes to become whole. Frame validity (the length
//! limit, what may follow a HEADERS without END_HEADERS, the preface's
//! bytes past its length) stays h2's to judge.

use super::detect::H2_PREFACE;

/// HEADERS (RFC 9113 §6.2).
const HEADERS: u8 = 0x1;
/// CONTINUATION (RFC 9113 §6.10).
const CONTINUATION: u8 = 0x9;
/// The END_HEADERS flag of HEADERS and CONTINUATION.
const END_HEADERS: u8 = 0x4;
/// The frame header's length (RFC 9113 §4.1).
const FRAME_HEAD: u8 = 9;
/// The preface's length (24 bytes, which fits).
const PREFACE_LEN: u8 = H2_PREFACE.len() as u8;

/// What the bytes the tracker has seen are in the middle of: the span a
/// deadline runs over, from its first byte until it is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    /// The connection preface and the frame after it (the client's
    /// SETTINGS).
    Preface,
    /// A header block: a HEADERS frame and any CONTINUATION frames up to
    /// the one with END_HEADERS.
    HeaderBlock,
    /// Any other frame.
    Frame,
}

impl Open {
    /// The log and metric word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Open::Preface => "preface",
            Open::HeaderBlock => "header_block",
            Open::Frame => "frame",
        }
    }
}

/// The tracker's position in a client's HTTP/2 byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameTracker {
    /// Preface bytes still to come: the full length before the first byte.
    preface_left: u8,
    /// The first frame after the preface is complete.
    opened: bool,
    /// Bytes of the current frame header seen (0: none, or in the payload).
    head_seen: u8,
    /// The current frame's length, type and flags, as far as seen.
    length: u32,
    kind: u8,
    flags: u8,
    /// Payload bytes of the current frame still to come.
    payload_left: u32,
    /// A HEADERS or CONTINUATION frame without END_HEADERS was the last
    /// header-block frame: the block goes on.
    in_block: bool,
    /// The bytes were not an HTTP/2 preface: not HTTP/2, nothing tracked.
    off: bool,
}

impl Default for FrameTracker {
    fn default() -> Self {
        FrameTracker {
            preface_left: PREFACE_LEN,
            opened: false,
            head_seen: 0,
            length: 0,
            kind: 0,
            flags: 0,
            payload_left: 0,
            in_block: false,
            off: false,
        }
    }
}

/// What one [`FrameTracker::feed`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fed {
    /// What is incomplete after the bytes (`None`: they ended on a
    /// boundary with no header block open).
    pub open: Option<Open>,
    /// The open span began within these bytes (its clock starts now); else
    /// it is the one open before them.
    pub started: bool,
}

impl FrameTracker {
    /// What is incomplete, if anything.
    pub fn open(&self) -> Option<Open> {
        if self.off || self.preface_left == PREFACE_LEN {
            return None;
        }
        if self.preface_left > 0 || !self.opened {
            return Some(Open::Preface);
        }
        let mid_frame = self.head_seen > 0 || self.payload_left > 0;
        // `kind` is 0 (DATA) until the current frame's type byte is seen.
        let header_frame = matches!(self.kind, HEADERS | CONTINUATION);
        if self.in_block || (mid_frame && header_frame) {
            return Some(Open::HeaderBlock);
        }
        mid_frame.then_some(Open::Frame)
    }

    /// Takes the next bytes the client sent.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Fed {
        let mut started = false;
        while let Some(&byte) = bytes.first() {
            if self.off {
                break;
            }
            if self.open().is_none() {
                started = true;
            }
            if self.preface_left > 0 {
                let at = usize::from(PREFACE_LEN - self.preface_left);
                let n = bytes.len().min(usize::from(self.preface_left));
                if bytes[..n] != H2_PREFACE[at..at + n] {
                    // Not HTTP/2 (the server will say so): nothing to time.
                    self.off = true;
                    return Fed {
                        open: None,
                        started: false,
                    };
                }
                // `n` is at most `preface_left`, a u8.
                self.preface_left -= n as u8;
                bytes = &bytes[n..];
            } else if self.payload_left > 0 {
                let n = bytes.len().min(self.payload_left as usize);
                // `n` is at most `payload_left`, a u32.
                self.payload_left -= n as u32;
                bytes = &bytes[n..];
                if self.payload_left == 0 {
                    self.frame_done();
                }
            } else {
                self.head_byte(byte);
                bytes = &bytes[1..];
            }
        }
        Fed {
            open: self.open(),
            started,
        }
    }

    fn head_byte(&mut self, byte: u8) {
        match self.head_seen {
            0..=2 => self.length = self.length << 8 | u32::from(byte),
            3 => self.kind = byte,
            4 => self.flags = byte,
            // The stream ID: h2's to check.
            _ => {}
        }
        self.head_seen += 1;
        if self.head_seen == FRAME_HEAD {
            self.head_seen = 0;
            self.payload_left = std::mem::take(&mut self.length);
            if self.payload_left == 0 {
                self.frame_done();
            }
        }
    }

    fn frame_done(&mut self) {
        self.opened = true;
        if matches!(self.kind, HEADERS | CONTINUATION) {
            self.in_block = self.flags & END_HEADERS == 0;
        }
        // A frame ended: `kind` describes the next one only once its
        // header is seen.
        self.kind = 0;
    }
}

#[cfg(test)]
mod tests;
