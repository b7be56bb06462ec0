//! The HTTP/1 relay parses every request head a client sends and every
//! response head an app sends (`http::h1::message`, through
//! `stepmesh::fuzzing`). Parsing is strict so that the proxy and the next hop
//! agree on where a message ends; a disagreement is request smuggling.
//! Properties besides "no panic":
//!
//! - a head is never longer than the input, and its target lies inside it;
//! - the scan-only parse (`Detail::Scan`) and the full parse agree on
//!   length, framing, keep-alive, expect-continue, upgrade and cleanliness;
//! - a clean head ends every line with CRLF (no bare LF inside);
//! - the target-only parse (`Detail::Target`, the inbound side's on a port
//!   without routes) accepts exactly what the full parse accepts;
//! - a head the relay rewrites (`write_request` / `write_response`) parses
//!   back to the same method / status, headers and framing;
//! - a clean head spliced (`splice_request`) parses back to the same
//!   request line and the same fields in the same order, less the ones
//!   dropped (in any case, any byte but a letter or digit for `-`: `reads_as`) and
//!   `Transfer-Encoding`.
//!
//! Input: byte 0 picks request or response (and the request method a
//! response answers, or for a request default or small `HeadLimits`); the
//! rest is the wire.
#![no_main]

use http::Method;
use libfuzzer_sys::fuzz_target;
use stepmesh::fuzzing::{
    parse_request, parse_response, splice_request, write_request, write_response, Detail,
    HeadLimits, RequestHead,
};
use stepmesh::policy::target::reads_as;

const METHODS: [Method; 4] = [Method::GET, Method::HEAD, Method::POST, Method::CONNECT];

fn request(wire: &[u8], limits: HeadLimits) {
    let scanned = parse_request(wire, Detail::Scan, limits);
    let full = parse_request(wire, Detail::Full, limits);
    let target = parse_request(wire, Detail::Target(&DROPS), limits);
    assert_eq!(
        full.is_ok(),
        target.is_ok(),
        "the target-only parse accepts what the full one does: {full:?} / {target:?}"
    );
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
    if head.clean {
        // Clean means every line ends in CRLF (a bare LF inside would end
        // a line for us and not for gunicorn before 22); leading empty
        // lines are skipped, not passed on.
        let skipped = wire
            .iter()
            .take_while(|b| matches!(b, b'\r' | b'\n'))
            .count();
        let text = &wire[skipped.min(*len)..*len];
        let lf = text.iter().filter(|&&b| b == b'\n').count();
        let crlf = text.windows(2).filter(|w| w == b"\r\n").count();
        assert_eq!(
            lf,
            crlf,
            "a clean head with a bare LF: {:?}",
            String::from_utf8_lossy(text)
        );
    }
    assert_eq!(scan.target, head.target);
    assert_eq!(scan.parts.method, head.parts.method);

    if let (true, Ok(Some((target, _)))) = (head.clean, &target) {
        assert_eq!(target.parts.uri, head.parts.uri);
        spliced(&wire[..*len], head, target);
    }
    let mut out = Vec::new();
    write_request(&head.parts, &mut out);
    let (again, again_len) = match parse_request(&out, Detail::Full, HeadLimits::default()) {
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

/// The fields dropped from every spliced head here (the inbound side's).
const DROPS: [&str; 2] = ["x-forwarded-client-cert", "x-stepup-sub"];

/// `raw`, a clean head (`head` its full parse, `target` its target-only
/// one), spliced with nothing added: the same request line, the same
/// fields but the dropped ones.
fn spliced(raw: &[u8], head: &RequestHead, target: &RequestHead) {
    let mut out = raw.to_vec();
    splice_request(&mut out, target);
    let (again, again_len) = match parse_request(&out, Detail::Full, HeadLimits::default()) {
        Ok(Some(x)) => x,
        other => panic!(
            "a spliced head does not parse: {other:?}\n{}",
            String::from_utf8_lossy(&out)
        ),
    };
    assert_eq!(again_len, out.len(), "the spliced head is one whole head");
    assert_eq!(again.parts.method, head.parts.method);
    assert_eq!(again.parts.version, head.parts.version);
    assert_eq!(&out[again.target.clone()], &raw[head.target.clone()]);
    let dropped = |n: &http::HeaderName| DROPS.iter().any(|d| reads_as(n.as_str().as_bytes(), d));
    let kept = |h: &http::HeaderMap| -> Vec<(String, Vec<u8>)> {
        h.iter()
            .filter(|(n, _)| !dropped(n) && *n != http::header::TRANSFER_ENCODING)
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect()
    };
    assert_eq!(kept(&again.parts.headers), kept(&head.parts.headers));
    assert!(
        !again.parts.headers.keys().any(dropped),
        "a dropped field passed"
    );
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
