//! The HTTP/1 relay passes chunked bodies through untouched and only scans
//! for their end (`http::h1::body::Remaining`, through `stepmesh::fuzzing`).
//! Where that scan says a body ends is where the next request begins, so it
//! must not depend on how TCP happened to cut the bytes: feeding the same
//! wire in one piece, in arbitrary pieces, or a byte at a time must give the
//! same end (or the same error, or "not ended yet").
//!
//! Input: two bytes of cut points, then the wire.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stepmesh::fuzzing::{BodyError, Framing, Remaining};

/// Feeds `wire` cut at `cuts` (ascending, within the wire); returns where
/// the body ended, if it did.
fn body_end(wire: &[u8], cuts: &[usize]) -> Result<Option<usize>, BodyError> {
    let mut rest = Remaining::of(Framing::Chunked);
    let mut at = 0;
    let mut bounds = cuts.to_vec();
    bounds.push(wire.len());
    for end in bounds {
        while at < end {
            let took = rest.take(&wire[at..end])?;
            assert!(took <= end - at, "took more than it was given");
            at += took;
            if rest.is_done() {
                return Ok(Some(at));
            }
            assert_eq!(at, end, "an unfinished body takes every byte it is given");
        }
    }
    Ok(None)
}

fuzz_target!(|data: &[u8]| {
    let Some((cut, wire)) = data.split_first_chunk::<2>() else {
        return;
    };
    let n = wire.len().max(1);
    let mut cuts = vec![usize::from(cut[0]) * n / 256, usize::from(cut[1]) * n / 256];
    cuts.sort_unstable();
    cuts.retain(|c| *c <= wire.len());

    let whole = body_end(wire, &[]);
    let split = body_end(wire, &cuts);
    assert_eq!(whole, split, "cut at {cuts:?}");
    if wire.len() <= 4096 {
        let bytewise: Vec<usize> = (1..wire.len()).collect();
        assert_eq!(whole, body_end(wire, &bytewise), "a byte at a time");
    }
    if let Ok(Some(end)) = whole {
        assert!(end <= wire.len());
        // The body is complete on its own: nothing after it is needed.
        assert_eq!(body_end(&wire[..end], &[]), Ok(Some(end)));
    }
});
