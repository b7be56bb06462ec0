//! The HTTP/2 header deadline times spans of a client's byte stream (the
//! preface with the first frame, a header block, any other frame) that
//! `http::h2_frames::FrameTracker` (through `stepmesh::fuzzing`) finds from
//! the 9-byte frame headers as the bytes are read. Where a span ends must
//! not depend on how TCP cut the bytes, and must be where the frames say.
//! Properties:
//!
//! - fed whole, cut at two arbitrary points, or a byte at a time, the
//!   tracker ends in the same state;
//! - after every byte, what is open is what a plain frame-by-frame reading
//!   of the whole wire says (an oracle written separately below);
//! - a byte fed at rest starts a span, a byte fed inside one does not.
//!
//! Input: two bytes of cut points, then the frames (the preface is put
//! before them: without it nothing is tracked).
#![no_main]

use libfuzzer_sys::fuzz_target;
use stepmesh::fuzzing::{FrameTracker, Open, H2_PREFACE};

/// What is open after each byte of `wire` (which starts with the preface),
/// read frame by frame.
fn oracle(wire: &[u8]) -> Vec<Option<Open>> {
    let mut open = vec![Some(Open::Preface); H2_PREFACE.len()];
    let (mut at, mut opened, mut in_block) = (H2_PREFACE.len(), false, false);
    while at < wire.len() {
        let head = &wire[at..wire.len().min(at + 9)];
        let len = match head {
            [a, b, c, ..] => usize::from(*a) << 16 | usize::from(*b) << 8 | usize::from(*c),
            _ => usize::MAX,
        };
        let end = at.saturating_add(9).saturating_add(len);
        let kind = head.get(3).copied();
        let flags = head.get(4).copied().unwrap_or(0);
        for k in at..wire.len().min(end) {
            let last = k + 1 == end;
            if last && matches!(kind, Some(0x1 | 0x9)) {
                in_block = flags & 0x4 == 0;
            }
            let header_frame = k >= at + 3 && matches!(kind, Some(0x1 | 0x9));
            open.push(if !opened && !last {
                Some(Open::Preface)
            } else if last {
                in_block.then_some(Open::HeaderBlock)
            } else if in_block || header_frame {
                Some(Open::HeaderBlock)
            } else {
                Some(Open::Frame)
            });
            opened |= last;
        }
        at = end;
    }
    open
}

fuzz_target!(|data: &[u8]| {
    let Some((cuts, frames)) = data.split_first_chunk::<2>() else {
        return;
    };
    let mut wire = H2_PREFACE.to_vec();
    wire.extend_from_slice(frames);

    let mut whole = FrameTracker::default();
    let fed = whole.feed(&wire);
    assert!(fed.started, "the first byte starts the preface's span");

    let expected = oracle(&wire);
    let mut single = FrameTracker::default();
    for (k, byte) in wire.iter().enumerate() {
        let before = single.open();
        let fed = single.feed(std::slice::from_ref(byte));
        assert_eq!(fed.open, expected[k], "after byte {k}");
        assert_eq!(fed.started, before.is_none(), "byte {k} started a span");
    }
    assert_eq!(single, whole, "byte by byte ends where whole does");
    assert_eq!(whole.open(), fed.open);

    let mut bounds = [usize::from(cuts[0]), usize::from(cuts[1])].map(|c| c % (wire.len() + 1));
    bounds.sort_unstable();
    let mut cut = FrameTracker::default();
    cut.feed(&wire[..bounds[0]]);
    cut.feed(&wire[bounds[0]..bounds[1]]);
    let last = cut.feed(&wire[bounds[1]..]);
    assert_eq!(cut, whole, "cut at {bounds:?} ends where whole does");
    assert_eq!(last.open, fed.open);
});
