//! JSON objects written field by field, for the line every HTTP request
//! logs. Written by hand, not with serde_json, because a measurement said
//! so: serializing the request line through serde (its string escaping,
//! float formatting and field dispatch) was about 2.5 % of both sidecars' CPU
//! at saturation on the HTTP path (docs/BENCHMARKS.md). Strings are escaped
//! as RFC 8259 requires and as serde_json does (`"`, `\`, control
//! characters; everything else as it is); field names are the caller's
//! literals and are not escaped.

/// One JSON object being written into `out`; [`Object::end`] closes it.
pub struct Object<'a> {
    out: &'a mut Vec<u8>,
    empty: bool,
}

impl<'a> Object<'a> {
    /// Opens an object at the end of `out`.
    pub fn new(out: &'a mut Vec<u8>) -> Object<'a> {
        out.push(b'{');
        Object { out, empty: true }
    }

    // Inlined, as every field method: each caller's literal name then
    // copies as a constant, not through a `memcpy` call per field.
    #[inline(always)]
    fn key(&mut self, name: &str) {
        debug_assert!(
            name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            "field names are plain literals"
        );
        if !self.empty {
            self.out.push(b',');
        }
        self.empty = false;
        self.out.push(b'"');
        self.out.extend_from_slice(name.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    /// A string field whose value is one of the program's own literals
    /// (a direction, a decision): nothing in it needs escaping, so it is
    /// not scanned.
    #[inline(always)]
    pub fn known(&mut self, name: &str, value: &'static str) -> &mut Self {
        debug_assert!(
            !value.bytes().any(needs_escape),
            "a known value needs no escape"
        );
        self.unscanned(name, value.as_bytes())
    }

    /// A time field: digits and separators only, not scanned.
    #[inline(always)]
    pub fn time(&mut self, name: &str, value: &super::Timestamp) -> &mut Self {
        self.unscanned(name, value.as_bytes())
    }

    /// A string field whose value the caller knows needs no escape.
    #[inline(always)]
    fn unscanned(&mut self, name: &str, value: &[u8]) -> &mut Self {
        self.key(name);
        self.out.push(b'"');
        self.out.extend_from_slice(value);
        self.out.push(b'"');
        self
    }

    /// A string field.
    #[inline(always)]
    pub fn str(&mut self, name: &str, value: &str) -> &mut Self {
        self.key(name);
        put_str(self.out, value);
        self
    }

    /// A string field, `null` when absent.
    #[inline(always)]
    pub fn opt_str(&mut self, name: &str, value: Option<&str>) -> &mut Self {
        match value {
            Some(value) => self.str(name, value),
            None => {
                self.key(name);
                self.out.extend_from_slice(b"null");
                self
            }
        }
    }

    /// An unsigned integer field.
    #[inline(always)]
    pub fn u64(&mut self, name: &str, value: u64) -> &mut Self {
        self.key(name);
        self.out
            .extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
        self
    }

    /// Milliseconds to the microsecond (`12.345`): the precision a request
    /// time is read at, in a fixed form that needs no float formatting.
    /// A negative or non-finite value (no clock does that) is written 0.
    #[inline(always)]
    pub fn millis(&mut self, name: &str, ms: f64) -> &mut Self {
        self.key(name);
        let micros = if ms.is_finite() && ms > 0.0 {
            // Saturating cast: a finite positive f64 beyond u64 is u64::MAX.
            (ms * 1000.0).round() as u64
        } else {
            0
        };
        let mut digits = itoa::Buffer::new();
        self.out
            .extend_from_slice(digits.format(micros / 1000).as_bytes());
        let frac = micros % 1000;
        self.out.extend_from_slice(&[
            b'.',
            b'0' + (frac / 100) as u8,
            b'0' + (frac / 10 % 10) as u8,
            b'0' + (frac % 10) as u8,
        ]);
        self
    }

    /// Closes the object.
    pub fn end(self) {
        self.out.push(b'}');
    }
}

/// Writes `s` as a JSON string. Nearly every string logged needs no
/// escape: the whole string is checked first with a branch-free scan (which
/// the compiler vectorises) and copied at once; byte by byte, as serde_json
/// goes, this was most of the line's instructions under callgrind.
fn put_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.push(b'"');
    if bytes.iter().fold(false, |any, &b| any | needs_escape(b)) {
        let mut run = 0;
        for (i, &b) in bytes.iter().enumerate() {
            if needs_escape(b) {
                out.extend_from_slice(&bytes[run..i]);
                put_escape(out, b);
                run = i + 1;
            }
        }
        out.extend_from_slice(&bytes[run..]);
    } else {
        out.extend_from_slice(bytes);
    }
    out.push(b'"');
}

/// What RFC 8259 requires escaped in a string (serde_json escapes no more).
const fn needs_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// The escape of one byte [`needs_escape`] picked: the short forms
/// serde_json uses, `\u00XX` for the other control characters.
fn put_escape(out: &mut Vec<u8>, b: u8) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    match b {
        b'"' => out.extend_from_slice(b"\\\""),
        b'\\' => out.extend_from_slice(b"\\\\"),
        b'\n' => out.extend_from_slice(b"\\n"),
        b'\r' => out.extend_from_slice(b"\\r"),
        b'\t' => out.extend_from_slice(b"\\t"),
        0x08 => out.extend_from_slice(b"\\b"),
        0x0c => out.extend_from_slice(b"\\f"),
        _ => out.extend_from_slice(&[
            b'\\',
            b'u',
            b'0',
            b'0',
            HEX[usize::from(b >> 4)],
            HEX[usize::from(b & 0xf)],
        ]),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn strings_read_back_as_serde_json_reads_them_and_are_written_as_it_writes_them() {
        let all_controls: String = (0u8..0x20).map(char::from).collect();
        // Escapes amid long clean runs, at the start and at the end.
        let long = format!("{}\"{}\n{}", "a".repeat(40), "b".repeat(17), "é".repeat(9));
        let boundary = format!("\\{}\u{1f}", "c".repeat(31));
        for s in [
            "",
            "plain /path",
            "quote \" and backslash \\ end",
            "tab\tline\nreturn\r",
            all_controls.as_str(),
            "\u{7f} é 日本 🦀",
            "\\u0000 literally",
            long.as_str(),
            boundary.as_str(),
        ] {
            let mut out = Vec::new();
            let mut o = Object::new(&mut out);
            o.str("s", s);
            o.end();
            let expected = serde_json::to_vec(&serde_json::json!({ "s": s })).unwrap();
            assert_eq!(
                String::from_utf8(out).unwrap(),
                String::from_utf8(expected).unwrap(),
                "{s:?}"
            );
        }
    }

    #[test]
    fn random_strings_are_written_as_serde_json_writes_them() {
        let alphabet: Vec<char> = "ab\"\\\n\t\u{0}\u{1b}\u{7f}é🦀/ ".chars().collect();
        let mut rng = fastrand::Rng::with_seed(14);
        for _ in 0..2_000 {
            let len = rng.usize(0..70);
            let s: String = (0..len)
                .map(|_| alphabet[rng.usize(..alphabet.len())])
                .collect();
            let mut out = Vec::new();
            put_str(&mut out, &s);
            assert_eq!(out, serde_json::to_vec(&s).unwrap(), "{s:?}");
        }
    }

    #[test]
    fn fields_make_one_object_numbers_and_nulls_included() {
        let mut out = Vec::new();
        let mut o = Object::new(&mut out);
        o.str("a", "x")
            .opt_str("b", None)
            .opt_str("c", Some("y"))
            .u64("n", u64::MAX)
            .millis("ms", 12.3456)
            .millis("small", 0.0004)
            .millis("neg", -1.0)
            .millis("nan", f64::NAN)
            .millis("big", 1e300);
        o.end();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["a"], "x");
        assert!(v["b"].is_null());
        assert_eq!(v["c"], "y");
        assert_eq!(v["n"], u64::MAX);
        assert_eq!(v["ms"], 12.346);
        assert_eq!(v["small"], 0.0);
        assert_eq!(v["neg"], 0.0);
        assert_eq!(v["nan"], 0.0);
        assert!(v["big"].as_f64().unwrap() > 1e15);
        assert!(std::str::from_utf8(&out)
            .unwrap()
            .contains("\"ms\":12.346,"));
    }
}
