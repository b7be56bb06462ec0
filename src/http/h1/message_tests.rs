//! Head parsing tests: framing, limits, clean heads, writing back.

use super::*;
use crate::http::headers::names;

fn req(text: &str) -> Result<Option<(RequestHead, usize)>, HeadError> {
    parse_request(text.as_bytes(), Detail::Full, HeadLimits::default())
}

fn framing(text: &str) -> Result<Framing, HeadError> {
    req(text).map(|r| r.expect("complete").0.framing)
}

/// Why a `POST` whose one field besides `Host` is `name: value` is
/// refused (`value` as bytes: it may not be text).
fn refused(name: &str, value: impl AsRef<[u8]>) -> HeadError {
    let mut head = format!("POST / HTTP/1.1\r\nHost: a\r\n{name}: ").into_bytes();
    head.extend_from_slice(value.as_ref());
    head.extend_from_slice(b"\r\n\r\n");
    let parsed = parse_request(&head, Detail::Full, HeadLimits::default());
    parsed.expect_err("refused")
}

#[test]
fn head_limits_are_the_configured_ones() {
    let limits = HeadLimits {
        bytes: 64,
        fields: 3,
    };
    let parse = |t: &str| parse_request(t.as_bytes(), Detail::Full, limits);
    assert!(parse("GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\n\r\n").is_ok());
    assert_eq!(
        parse("GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n").err(),
        Some(HeadError::TooLarge)
    );
    let long = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "x".repeat(64));
    assert_eq!(parse(&long).err(), Some(HeadError::TooLarge));
    // Still incomplete and already over: refused without waiting.
    assert_eq!(parse(&long[..70]).err(), Some(HeadError::TooLarge));
    // The ceiling holds whatever is configured.
    let many: String = (0..300).map(|i| format!("x{i}: 1\r\n")).collect();
    let wide = HeadLimits {
        bytes: usize::MAX,
        fields: usize::MAX,
    };
    let text = format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n");
    assert_eq!(
        parse_request(text.as_bytes(), Detail::Full, wide).err(),
        Some(HeadError::TooLarge)
    );
}

#[test]
fn a_plain_get_parses_and_writes_back() {
    let text = "GET /a?b=c HTTP/1.1\r\nHost: api\r\nX-Thing: 1\r\n\r\nrest";
    let (head, len) = req(text).unwrap().unwrap();
    assert_eq!(len, text.len() - 4);
    assert_eq!(head.parts.method, Method::GET);
    assert_eq!(head.parts.uri.path(), "/a");
    assert_eq!(head.framing, Framing::Empty);
    assert!(head.keep_alive);
    assert!(!head.expect_continue);
    let mut out = Vec::new();
    write_request(&head.parts, &mut out);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "GET /a?b=c HTTP/1.1\r\nhost: api\r\nx-thing: 1\r\n\r\n"
    );
}

#[test]
fn incomplete_heads_wait_and_oversized_ones_are_refused() {
    assert!(req("GET / HTTP/1.1\r\nHost: a\r\n").unwrap().is_none());
    let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD));
    assert_eq!(req(&huge).unwrap_err(), HeadError::TooLarge);
    let many: String = (0..=MAX_HEADERS).map(|i| format!("x{i}: 1\r\n")).collect();
    let text = format!("GET / HTTP/1.1\r\n{many}\r\n");
    assert_eq!(req(&text).unwrap_err(), HeadError::TooLarge);
}

#[test]
fn smuggling_shapes_are_refused() {
    let both =
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
    assert_eq!(framing(both).unwrap_err(), HeadError::TransferAndLength);
    let not_last = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n";
    assert_eq!(framing(not_last).unwrap_err(), HeadError::TransferEncoding);
    let twice = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n";
    assert_eq!(framing(twice).unwrap_err(), HeadError::TransferEncoding);
    let two_lengths =
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n";
    assert_eq!(framing(two_lengths).unwrap_err(), HeadError::ContentLength);
    let signed = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n";
    assert_eq!(framing(signed).unwrap_err(), HeadError::ContentLength);
    let http10 = "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n";
    assert_eq!(framing(http10).unwrap_err(), HeadError::TransferEncoding);
    // Only a space or a tab is optional whitespace (RFC 9110 §5.6.3): a
    // length padded with any other blank (here U+00A0 and U+0085, which
    // `str::trim` would take off) is not one an app must read as we
    // would. Nor is one past u64, or a list with an empty element.
    for bad in [
        "5\u{a0}",
        "\u{a0}5",
        "5\u{85}",
        "18446744073709551616",
        "99999999999999999999999",
        "",
        " ",
        "5,",
        ",5",
        "5,,5",
    ] {
        assert_eq!(
            refused("Content-Length", bad),
            HeadError::ContentLength,
            "{bad:?}"
        );
    }
    let max = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 18446744073709551615\r\n\r\n";
    assert_eq!(framing(max).unwrap(), Framing::Length(u64::MAX));
    let padded = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\u{a0}\r\n\r\n";
    assert_eq!(framing(padded).unwrap_err(), HeadError::TransferEncoding);
    // A coding that is not text (obs-text bytes) is a coding all the same,
    // and not `chunked`: it was skipped, and the head read as having no
    // coding at all (the fuzz smoke's find).
    for coding in [
        &b"chunked\x92"[..],
        b"gzip, $chu\x92\x94",
        b"\xff",
        b"chunked, \x80",
    ] {
        assert_eq!(
            refused("Transfer-Encoding", coding),
            HeadError::TransferEncoding,
            "{coding:?}"
        );
    }
    // `Connection: close` beside an element that is not text still closes.
    let close = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close, \xe9\r\n\r\n";
    let (head, _) = parse_request(close, Detail::Full, HeadLimits::default())
        .unwrap()
        .unwrap();
    assert!(!head.keep_alive);
    let tabbed = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\t, 5 \r\n\r\n";
    assert_eq!(framing(tabbed).unwrap(), Framing::Length(5));
    let folded = "GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n 2\r\n\r\n";
    assert!(matches!(req(folded), Err(HeadError::Malformed(_))));
    assert_eq!(
        req("GET / HTTP/1.1\r\n\r\n").unwrap_err(),
        HeadError::NoHost
    );
}

#[test]
fn request_framing_follows_rfc_9112() {
    let same = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n";
    assert_eq!(framing(same).unwrap(), Framing::Length(5));
    let chunked = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n";
    assert_eq!(framing(chunked).unwrap(), Framing::Chunked);
    // Another coding before it: the app would be told `chunked` alone.
    for coded in ["gzip, Chunked", "gzip,chunked", "identity, chunked"] {
        assert_eq!(
            refused("Transfer-Encoding", coded),
            HeadError::UnsupportedCoding,
            "{coded}"
        );
    }
    let split = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n";
    assert_eq!(framing(split).unwrap_err(), HeadError::UnsupportedCoding);
    let zero = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n";
    assert_eq!(framing(zero).unwrap(), Framing::Empty);
}

#[test]
fn a_length_given_as_a_list_or_in_copies_is_relayed_as_one_number() {
    for (text, n) in [
        (
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n",
            5,
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            5,
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0, 0\r\n\r\n",
            0,
        ),
    ] {
        let (mut head, _) = parse_request(
            text.as_bytes(),
            Detail::Target(&["x-forwarded-client-cert"]),
            HeadLimits::default(),
        )
        .unwrap()
        .unwrap();
        assert!(
            head.fields && head.splice.is_none(),
            "not spliced: {text:?}"
        );
        super::super::response::restore_framing(&mut head, true);
        let mut out = Vec::new();
        write_request(&head.parts, &mut out);
        let written = String::from_utf8(out).unwrap();
        assert_eq!(
            written
                .to_ascii_lowercase()
                .matches("content-length")
                .count(),
            1,
            "{written:?}"
        );
        let one = format!("content-length: {n}\r\n");
        assert!(written.contains(&one), "{written:?}");
    }
}

#[test]
fn connection_semantics() {
    let (h, _) = req("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
    assert!(!h.keep_alive, "HTTP/1.0 closes by default");
    let (h, _) = req("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
        .unwrap()
        .unwrap();
    assert!(h.keep_alive);
    let (h, _) = req("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .unwrap()
        .unwrap();
    assert!(!h.keep_alive);
    let text = "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\nExpect: 100-Continue\r\n\r\n";
    let (h, _) = req(text).unwrap().unwrap();
    assert_eq!(h.upgrade.unwrap(), "websocket");
    assert!(h.expect_continue);
    // An upgrade to HTTP itself is not passed on (an `h2c` app would
    // serve HTTP/2 past every policy after its `101`); others are.
    let asked = |protocol: &str| {
        let text = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: {protocol}\r\n\r\n"
        );
        req(&text).unwrap().unwrap().0.upgrade
    };
    for http in ["h2c", "H2C ", "websocket, h2c", "HTTP/2.0", "h2"] {
        assert!(asked(http).is_none(), "{http}");
    }
    for other in ["WebSocket ", "SPDY/3.1", "tcp", "TLS/1.2"] {
        assert!(asked(other).is_some(), "{other}");
    }
    let no_token = "GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n";
    assert!(req(no_token).unwrap().unwrap().0.upgrade.is_none());
}

#[test]
fn response_framing_follows_rfc_9112() {
    let get = Method::GET;
    let parse = |text: &str, m: &Method| parse_response(text.as_bytes(), m).unwrap().unwrap().0;
    let r = parse("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", &get);
    assert_eq!((r.framing, r.keep_alive), (Framing::Length(2), true));
    let r = parse(
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n",
        &Method::HEAD,
    );
    assert_eq!(r.framing, Framing::Empty);
    let r = parse("HTTP/1.1 204 No Content\r\n\r\n", &get);
    assert_eq!(r.framing, Framing::Empty);
    let r = parse(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n",
        &get,
    );
    assert_eq!(r.framing, Framing::Chunked);
    assert!(!r.parts.headers.contains_key(header::CONTENT_LENGTH));
    let r = parse("HTTP/1.1 200 OK\r\n\r\n", &get);
    assert_eq!((r.framing, r.keep_alive), (Framing::UntilClose, false));
    let r = parse("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", &get);
    assert!(!r.keep_alive);
    let bad = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", &get);
    assert_eq!(bad.unwrap_err(), HeadError::ContentLength);
    let mut out = Vec::new();
    let r = parse(
        "HTTP/1.1 404 Nope\r\nKeep-Alive: timeout=5\r\nContent-Length: 0\r\n\r\n",
        &get,
    );
    assert!(!r.clean, "a hop-by-hop field must be stripped");
    write_response(&r.parts, &mut out);
    assert_eq!(
        out,
        b"HTTP/1.1 404 Not Found\r\nkeep-alive: timeout=5\r\ncontent-length: 0\r\n\r\n"
    );
}

#[test]
fn clean_heads_are_only_scanned() {
    let text = "GET /a?b HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: chunked\r\n\r\n";
    let (head, _) = parse_request(text.as_bytes(), Detail::Scan, HeadLimits::default())
        .unwrap()
        .unwrap();
    assert!(head.clean);
    assert!(
        head.parts.headers.is_empty(),
        "nothing allocated for a clean head"
    );
    assert_eq!(&text[head.target.clone()], "/a?b");
    assert_eq!(head.framing, Framing::Chunked);
    let (full, _) = parse_request(text.as_bytes(), Detail::Full, HeadLimits::default())
        .unwrap()
        .unwrap();
    assert_eq!(full.parts.headers.len(), 2);
    assert_eq!(full.parts.uri.path(), "/a");
    for dirty in [
        "GET / HTTP/1.1\r\nHost: a\r\nConnection: x-secret\r\nX-Secret: 1\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nTE: trailers\r\n\r\n",
        "GET / HTTP/1.1\nHost: a\n\n",
        // A bare LF inside, CRLFs around it: gunicorn before 22 reads
        // `Content-Length` as part of `X-A`'s value.
        "POST /a HTTP/1.1\r\nHost: app\r\nX-A: b\nContent-Length: 5\r\n\r\n",
        "GET / HTTP/1.1\nHost: a\r\n\r\n",
    ] {
        let (head, _) = parse_request(dirty.as_bytes(), Detail::Scan, HeadLimits::default())
            .unwrap()
            .unwrap();
        assert!(!head.clean, "{dirty:?}");
        assert!(!head.parts.headers.is_empty(), "{dirty:?}: parsed in full");
    }
    // Rewritten, the bare LF is gone: the app reads the head as we did.
    let smuggle = b"POST /a HTTP/1.1\r\nHost: app\r\nX-A: b\nContent-Length: 5\r\n\r\n";
    let (head, _) = parse_request(
        smuggle,
        Detail::Target(&["x-forwarded-client-cert"]),
        HeadLimits::default(),
    )
    .unwrap()
    .unwrap();
    assert!(!head.clean && head.fields && head.splice.is_none());
    let mut out = Vec::new();
    write_request(&head.parts, &mut out);
    let written = String::from_utf8(out).unwrap();
    assert_eq!(
        written.matches('\n').count(),
        written.matches("\r\n").count(),
        "{written:?}"
    );
    assert!(written.contains("\r\ncontent-length: 5\r\n"), "{written:?}");
    let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    let (r, len) = parse_response(resp, &Method::GET).unwrap().unwrap();
    assert!(r.clean && r.parts.headers.is_empty());
    assert_eq!(len, resp.len() - 2);
}

#[test]
fn absolute_form_with_an_empty_path_is_written_with_a_slash() {
    let text = "GET http://a?b HTTP/1.0\r\nConnection: keep-alive\r\n\r\n";
    let (head, _) = req(text).unwrap().unwrap();
    let mut out = Vec::new();
    write_request(&head.parts, &mut out);
    assert!(out.starts_with(b"GET /?b HTTP/1.0\r\n"), "{out:?}");
    assert!(req(std::str::from_utf8(&out).unwrap()).unwrap().is_some());
    for (target, written) in [("http://a", "/"), ("http://a/p?q", "/p?q"), ("*", "*")] {
        let text = format!("OPTIONS {target} HTTP/1.0\r\n\r\n");
        let (head, _) = req(&text).unwrap().unwrap();
        let mut out = Vec::new();
        write_request(&head.parts, &mut out);
        let want = format!("OPTIONS {written} HTTP/1.0\r\n");
        assert!(out.starts_with(want.as_bytes()), "{target}: {out:?}");
    }
}

/// The fields the inbound side sets (`inbound::SET_HERE`).
const DROPS: [&str; 3] = [names::XFCC, names::STEPUP_SUB, names::ORIG_PROTO];

/// A head as the next hop sees it: request line, framing, fields.
type Seen = (String, Framing, Vec<(String, String)>);

/// A clean head as the inbound relay sends it on, both ways: parsed in
/// full and written from its parts, or read with its target only and
/// spliced. `subject`: a step-up subject the decision set. Each as the
/// next hop parses it: request line, framing, and the fields (lower-case
/// names, in order of name: the map groups a name's values).
fn both_ways(text: &str, subject: Option<&str>) -> Option<[Seen; 2]> {
    use crate::http::headers::{
        remove_other_spellings, replace_xfcc, strip_hop_by_hop, ORIG_PROTO, STEPUP_SUB,
    };
    let xfcc = HeaderValue::from_static("By=spiffe://t/ns/a/sa/us;URI=spiffe://t/ns/a/sa/peer");
    let admit = |headers: &mut HeaderMap| {
        strip_hop_by_hop(headers);
        headers.remove(ORIG_PROTO);
        headers.remove(STEPUP_SUB);
        remove_other_spellings(headers, &DROPS);
        if let Some(sub) = subject {
            headers.insert(STEPUP_SUB, HeaderValue::from_str(sub).unwrap());
        }
        replace_xfcc(headers, Some(xfcc.clone()));
    };
    let limits = HeadLimits::default();
    let full = parse_request(text.as_bytes(), Detail::Full, limits);
    let target = parse_request(text.as_bytes(), Detail::Target(&DROPS), limits);
    assert_eq!(
        full.is_ok(),
        target.is_ok(),
        "{text:?}: {full:?} / {target:?}"
    );
    let (Ok(Some((mut full, len))), Ok(Some((mut target, _)))) = (full, target) else {
        return None;
    };
    if !full.clean {
        return None;
    }
    assert!(
        !target.fields && target.parts.headers.is_empty(),
        "{text:?}"
    );
    assert_eq!(target.parts.uri, full.parts.uri);
    admit(&mut full.parts.headers);
    super::super::response::restore_framing(&mut full, true);
    let mut written = Vec::new();
    write_request(&full.parts, &mut written);
    admit(&mut target.parts.headers);
    super::super::response::restore_framing(&mut target, true);
    let mut spliced = text.as_bytes()[..len].to_vec();
    splice_request(&mut spliced, &target);
    let seen = |head: &[u8]| {
        let (again, again_len) = parse_request(head, Detail::Full, limits).unwrap().unwrap();
        assert_eq!(again_len, head.len());
        let line = String::from_utf8_lossy(&head[..head.iter().position(|&b| b == b'\n').unwrap()]);
        let mut fields: Vec<(String, String)> = again
            .parts
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        fields.sort_by(|a, b| a.0.cmp(&b.0));
        (line.into_owned(), again.framing, fields)
    };
    Some([seen(&written), seen(&spliced)])
}

#[test]
fn a_spliced_head_carries_the_fields_a_rewritten_one_does() {
    for (text, subject) in [
        ("GET /a?b HTTP/1.1\r\nHost: api\r\nAccept: */*\r\n\r\n", None),
        (
            "POST /p HTTP/1.1\r\nHost: a\r\nX-Forwarded-Client-Cert: By=evil\r\nx-STEPUP-sub: admin\r\nContent-Length: 2\r\nStepmesh-Orig-Proto: HTTP/2\r\nx-forwarded-client-cert: again\r\n\r\n",
            Some("alice"),
        ),
        ("PUT /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nA: 1\r\nB: 2\r\nA: 3\r\n\r\n", None),
        ("GET / HTTP/1.0\r\nAccept: \u{e9}\t x\r\n\r\n", None),
        ("GET http://a/x HTTP/1.1\r\nHost: a\r\nEmpty:\r\n\r\n", Some("bob")),
        // Empty lines before the request line (the fuzz smoke's find: the
        // spliced head lost every line when a field went).
        ("\n\r\nPOST /e HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", None),
        ("\r\nGET /e HTTP/1.1\r\nHost: a\r\nX-Forwarded-Client-Cert: By=evil\r\n\r\n", None),
        ("\r\n\r\nGET /e HTTP/1.1\r\nHost: a\r\n\r\n", Some("carol")),
        // Underscores for dashes: one key to a CGI-style app.
        (
            "GET /u HTTP/1.1\r\nHost: a\r\nX_Stepup_Sub: admin\r\nx_forwarded_client_cert: By=evil\r\nStepmesh_Orig-Proto: HTTP/2\r\nX_Kept: 1\r\n\r\n",
            Some("dave"),
        ),
        ("GET /u HTTP/1.1\r\nHost: a\r\nx-forwarded_client-cert: By=evil\r\n\r\n", None),
    ] {
        let [written, spliced] = both_ways(text, subject).unwrap_or_else(|| panic!("{text:?}"));
        assert_eq!(spliced.2, written.2, "{text:?}");
        assert_eq!(spliced.1, written.1, "{text:?}");
        assert!(!spliced.2.iter().any(|(n, v)| v == "By=evil" || v == "admin" || n.replace('_', "-") == "stepmesh-orig-proto"), "{text:?}");
    }
    // The request line as it came (the rewritten one is origin-form).
    let [_, spliced] = both_ways("GET /a?b HTTP/1.1\r\nHost: api\r\n\r\n", None).unwrap();
    assert_eq!(spliced.0, "GET /a?b HTTP/1.1\r");
}

#[test]
fn random_clean_heads_splice_as_they_are_rewritten() {
    let names = [
        "Host",
        "host",
        "Accept",
        "X-Forwarded-Client-Cert",
        "x-forwarded-client-cert",
        "X-Stepup-Sub",
        "X_Stepup_Sub",
        "stepmesh-orig-proto",
        "stepmesh_orig_proto",
        "Content-Length",
        "Transfer-Encoding",
        "X-A",
        "x-a",
        "Cookie",
        "Expect",
    ];
    let values = [
        "1",
        "chunked",
        "gzip, chunked",
        "",
        "a b\tc",
        "0",
        "100-continue",
        "\u{e9}",
    ];
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    let mut compared = 0;
    for _ in 0..3000 {
        let version = if next(4) == 0 { "1.0" } else { "1.1" };
        let empty_lines = ["", "", "\r\n", "\n"][next(4)];
        let mut text = format!("{empty_lines}POST /x?{} HTTP/{version}\r\n", next(100));
        for _ in 0..next(8) {
            text += &format!(
                "{}: {}\r\n",
                names[next(names.len())],
                values[next(values.len())]
            );
        }
        text += "\r\n";
        let subject = (next(2) == 0).then_some("sub");
        if let Some([written, spliced]) = both_ways(&text, subject) {
            assert_eq!(spliced.2, written.2, "{text:?}");
            assert_eq!(spliced.1, written.1, "{text:?}");
            compared += 1;
        }
    }
    assert!(compared > 500, "only {compared} heads were clean and valid");
}
