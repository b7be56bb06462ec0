//! The HTTP/1 relay parses every request head a client sends and every
//! response head an app sends (`http::h1::message`, through
//! `stepmesh::fuzzing`). Parsing is strict so that the proxy and the next hop
//! agree on where a message ends; a disagreement is request smuggling.
//! Properties besides "no panic":
//!
//! - a head is never longer than the input, and its target lies inside it;
//! - the scan-only parse (`full = false`) and the full parse agree on
//!   length, framing, keep-alive, expect-continue, upgrade and cleanliness;
//! - a head the relay rewrites (`write_request` / `write_response`) parses
//!   back to the same method / status, headers and framing.
//!
//! Input: byte 0 picks request or response (and the request method a
//! response answers, or for a request default or small `HeadLimits`); the
//! rest is the wire.
#![no_main]

use http::Method;
use libfuzzer_sys::fuzz_target;
use stepmesh::fuzzing::{parse_request, parse_response, write_request, write_response, HeadLimits};

const METHODS: [Method; 4] = [Method::GET, Method::HEAD, Method::POST, Method::CONNECT];

fn request(wire: &[u8], limits: HeadLimits) {
    let scanned = parse_request(wire, false, limits);
    let full = parse_request(wire, true, limits);
    let (Ok(Some((scan, scan_len))), Ok(Some((head, len)))) = (&scanned, &full) else {
        // The full parse may refuse a target or field the scan never looked at;
        // it never accepts what the scan refuses.
        if let Ok(Some(_)) = full {
            panic!("full parse accepted what the scan refused: {scanned:?}");
        }
        if let (Ok(None), r) | (r, Ok(None)) = (&scanned, &full) {
            assert!(
                matches!(r, Ok(None)),
                "incomplete for one parse only: {scanned:?} / {full:?}"
            );
        }
        return;
    };
    assert_eq!(scan_len, len);
    assert!(*len <= wire.len());
    assert!(head.target.end <= *len && head.target.start <= head.target.end);
    assert_eq!(scan.framing, head.framing);
    assert_eq!(scan.keep_alive, head.keep_alive);
    assert_eq!(scan.expect_continue, head.expect_continue);
    assert_eq!(scan.upgrade, head.upgrade);
    assert_eq!(scan.clean, head.clean);
    assert_eq!(scan.target, head.target);
    assert_eq!(scan.parts.method, head.parts.method);

    let mut out = Vec::new();
    write_request(&head.parts, &mut out);
    let (again, again_len) = match parse_request(&out, true, HeadLimits::default()) {
        Ok(Some(x)) => x,
        other => panic!(
            "a rewritten head does not parse: {other:?}\n{}",
            String::from_utf8_lossy(&out)
        ),
    };
    assert_eq!(again_len, out.len(), "the rewritten head is one whole head");
    assert_eq!(again.parts.method, head.parts.method);
    assert_eq!(again.parts.version, head.parts.version);
    assert_eq!(again.parts.headers, head.parts.headers);
    assert_eq!(again.framing, head.framing);
    assert_eq!(again.keep_alive, head.keep_alive);
}

fn response(wire: &[u8], method: &Method) {
    let Ok(Some((head, len))) = parse_response(wire, method) else {
        return;
    };
    assert!(len <= wire.len());
    if head.clean {
        assert!(
            head.parts.headers.is_empty(),
            "a clean head collects no headers"
        );
        return;
    }
    let mut out = Vec::new();
    write_response(&head.parts, &mut out);
    let (again, again_len) = match parse_response(&out, method) {
        Ok(Some(x)) => x,
        other => panic!(
            "a rewritten head does not parse: {other:?}\n{}",
            String::from_utf8_lossy(&out)
        ),
    };
    assert_eq!(again_len, out.len(), "the rewritten head is one whole head");
    assert_eq!(again.parts.status, head.parts.status);
    assert_eq!(again.parts.version, head.parts.version);
    assert_eq!(again.framing, head.framing);
    assert_eq!(again.keep_alive, head.keep_alive);
    if !again.clean {
        assert_eq!(again.parts.headers, head.parts.headers);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, wire)) = data.split_first() else {
        return;
    };
    if pick % 2 == 0 {
        // Bit 1: the configurable limits at their smallest useful setting.
        let limits = if pick & 2 == 0 {
            HeadLimits::default()
        } else {
            HeadLimits {
                bytes: 256,
                fields: 4,
            }
        };
        request(wire, limits);
    } else {
        response(wire, &METHODS[usize::from(pick / 2) % METHODS.len()]);
    }
});
