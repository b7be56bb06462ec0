//! Canonicalisation tests: what is refused, and the readings of what is not.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use super::*;

fn readings(path: &str, options: PathOptions) -> Result<Vec<(String, bool)>, &'static str> {
    Readings::of(path, options)
        .map(|r| r.iter().map(|r| (r.path.to_string(), r.folded)).collect())
        .map_err(|e| e.reason())
}

#[test]
fn common_paths_have_one_reading_and_borrow() {
    let r = Readings::of("/refunds/1", PathOptions::default()).unwrap();
    let all: Vec<_> = r.iter().collect();
    // Kept and folded are the same string: one reading, not allocated.
    assert_eq!(all.len(), 2, "{all:?}");
    assert!(all
        .iter()
        .all(|r| matches!(r.path, Cow::Borrowed("/refunds/1"))));
}

#[test]
fn a_format_suffix_is_read_with_and_without_it() {
    let options = |format| PathOptions {
        case: CaseMatch::Sensitive,
        format,
        ..PathOptions::default()
    };
    let paths = |path, format| -> Vec<String> {
        readings(path, options(format))
            .unwrap()
            .into_iter()
            .map(|r| r.0)
            .collect()
    };
    assert_eq!(
        paths("/refunds.json", FormatMatch::Any),
        ["/refunds.json", "/refunds"]
    );
    assert_eq!(
        paths("/refunds/1.json/", FormatMatch::Any),
        ["/refunds/1.json", "/refunds/1"]
    );
    assert_eq!(paths("/refunds.json", FormatMatch::Kept), ["/refunds.json"]);
    assert_eq!(paths("/refunds.json", FormatMatch::Stripped), ["/refunds"]);
    assert_eq!(paths("/refunds", FormatMatch::Stripped), ["/refunds"]);
    // From the first `.`: read again, nothing more goes.
    assert_eq!(paths("/a.tar.gz", FormatMatch::Any), ["/a.tar.gz", "/a"]);
    assert_eq!(paths("/a", FormatMatch::Any), ["/a"]);
    // Only the last segment; a dot-file is a name.
    assert_eq!(paths("/v1.2/x", FormatMatch::Any), ["/v1.2/x"]);
    assert_eq!(paths("/x/.env", FormatMatch::Any), ["/x/.env"]);
    // Encoded, the decoded reading loses its format too; and the raw
    // reading is cut at the encoded dot, so that decoding it gives a
    // path among the readings (found by the fuzz smoke).
    assert!(paths("/refunds%2Ejson", FormatMatch::Any).contains(&"/refunds".to_owned()));
    assert_eq!(
        paths("/a%2eb.c", FormatMatch::Any),
        ["/a%2eb.c", "/a", "/a.b.c"]
    );
}

#[test]
fn readings_cover_case_params_and_escapes() {
    let got = readings("/A;x/caf%C3%A9/", PathOptions::default()).unwrap();
    for want in [
        ("/A;x/caf%C3%A9", false),
        ("/a;x/caf%c3%a9", true),
        ("/A/caf%C3%A9", false),
        ("/a/caf%c3%a9", true),
        ("/A;x/café", false),
        ("/a;x/café", true),
        ("/A/café", false),
        ("/a/café", true),
    ] {
        assert!(
            got.contains(&(want.0.to_owned(), want.1)),
            "{want:?} not in {got:?}"
        );
    }
    assert_eq!(got.len(), 8);
    let exact = PathOptions {
        case: CaseMatch::Sensitive,
        params: ParamsMatch::Kept,
        format: FormatMatch::Kept,
    };
    assert_eq!(
        readings("/A;x/b", exact).unwrap(),
        vec![("/A;x/b".to_owned(), false)]
    );
    let tomcat_iis = PathOptions {
        case: CaseMatch::Insensitive,
        params: ParamsMatch::Stripped,
        format: FormatMatch::Any,
    };
    assert_eq!(
        readings("/A;x/b", tomcat_iis).unwrap(),
        vec![("/a/b".to_owned(), true)]
    );
}

#[test]
fn a_fold_reads_letters_apps_fold_into_ascii_as_that_ascii() {
    for (path, folded) in [
        ("/REFUNDS", "/refunds"),
        ("/refund\u{17f}", "/refunds"), // ſ: upper case S
        ("/l\u{131}st", "/list"),       // ı (dotless): upper case I
        ("/\u{130}tems", "/items"),     // İ: i to Java's toLowerCase
        ("/\u{212a}eys", "/keys"),      // Kelvin sign: lower case k
        ("/stra\u{df}e", "/strasse"),   // ß: upper case SS
        ("/\u{fb01}les", "/files"),     // ﬁ: upper case FI
        ("/Caf\u{c9}", "/caf\u{e9}"),   // É: no ASCII in its case
        ("/STRA\u{1e9e}E", "/strasse"), // ẞ: lower case ß
    ] {
        assert_eq!(fold(path), folded, "{path}");
    }
    // Its own fixed point, for every character (route patterns are folded
    // once, at load; readings are compared with them).
    for c in (0..=0x10ffff).filter_map(char::from_u32) {
        let once = fold(&c.to_string());
        assert_eq!(fold(&once), once, "U+{:04X}", c as u32);
    }
    let got = readings("/refund%C5%BF/1", PathOptions::default()).unwrap();
    assert!(got.contains(&("/refunds/1".to_owned(), true)), "{got:?}");
}

#[test]
fn hostile_forms_are_refused() {
    for (path, reason) in [
        ("", "target_not_a_path"),
        ("*", "target_not_a_path"),
        ("refunds", "target_not_a_path"),
        ("//refunds", "path_empty_segment"),
        ("/a//b", "path_empty_segment"),
        ("/;x/refunds", "path_empty_segment"),
        ("/./refunds", "path_dot_segment"),
        ("/a/..", "path_dot_segment"),
        ("/a/../refunds", "path_dot_segment"),
        ("/%2e%2e/refunds", "path_dot_segment"),
        ("/%2E/refunds", "path_dot_segment"),
        ("/..;/refunds", "path_dot_segment"),
        ("/a\\b", "path_backslash"),
        ("/a%5Cb", "path_encoded_delimiter"),
        ("/a%2fb", "path_encoded_delimiter"),
        ("/a%3Bb", "path_encoded_delimiter"),
        ("/a%252fb", "path_encoded_delimiter"),
        ("/a%00", "path_encoded_control"),
        ("/a%0d%0a", "path_encoded_control"),
        ("/a%7F", "path_encoded_control"),
        ("/a%", "path_bad_escape"),
        ("/a%4", "path_bad_escape"),
        ("/a%zz", "path_bad_escape"),
        ("/%c0%af", "path_invalid_utf8"),
        ("/%e0%80%ae", "path_invalid_utf8"),
        ("/%ff", "path_invalid_utf8"),
        ("/a#b", "target_fragment"),
        ("/caf\u{e9}", "target_raw_byte"),
        ("/a b", "target_raw_byte"),
    ] {
        assert_eq!(
            readings(path, PathOptions::default()),
            Err(reason),
            "{path:?}"
        );
    }
}

#[test]
fn trailing_slash_is_one_reading() {
    let one = |p: &str| vec![(p.to_owned(), false), (p.to_owned(), true)];
    assert_eq!(readings("/a/", PathOptions::default()).unwrap(), one("/a"));
    assert_eq!(readings("/", PathOptions::default()).unwrap(), one("/"));
}

#[test]
fn readings_are_canonical_themselves() {
    // Idempotence: every reading of an accepted path that is still in
    // request form reads as itself.
    for path in ["/a/b", "/A/B/", "/a;p/b", "/x%41y", "/%E2%82%AC/x"] {
        for r in Readings::of(path, PathOptions::default()).unwrap().iter() {
            if r.path.is_ascii() && !r.path.contains('%') {
                let again = readings(&r.path, PathOptions::default()).unwrap();
                assert!(
                    again.contains(&(r.path.to_string(), false)),
                    "{path} -> {r:?}: {again:?}"
                );
            }
        }
    }
}

#[test]
fn parse_refuses_what_uri_would_drop() {
    assert_eq!(parse("/a#b").unwrap_err(), Refusal::Fragment);
    assert_eq!(parse("/a?b#c").unwrap_err(), Refusal::Fragment);
    assert_eq!(parse("/a b").unwrap_err(), Refusal::Unparsable);
    assert_eq!(parse("http://h/a?q").unwrap().path(), "/a");
    // Whatever http::Uri accepts, the path check then judges.
    for raw in ["/a\\b", "/a\"b", "/a{b}", "/a|b", "/a^b", "/a`b"] {
        match parse(raw) {
            Ok(uri) => assert!(
                Readings::of(uri.path(), PathOptions::default()).is_ok() || raw.contains('\\'),
                "{raw}"
            ),
            Err(r) => assert_eq!(r, Refusal::Unparsable, "{raw}"),
        }
    }
}
