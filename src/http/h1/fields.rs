//! A message head's fields as the framing and hop-by-hop rules read them
//! (`message.rs`): the names those rules ask for are known, so one pass
//! over the head's names records which of them came ([`Fields::new`]),
//! and a rule's own pass over the fields runs only for a name the head
//! carries. Most heads carry two of the eleven (`Host`, `Content-Length`);
//! each rule looked through every field before (about 400 instructions a
//! head under callgrind).

/// A field name a rule asks for, with its bit in [`Fields::present`].
#[derive(Debug, Clone, Copy)]
pub(super) struct Name {
    text: &'static str,
    bit: u16,
}

pub(super) const HOST: Name = Name::new("host", 0);
pub(super) const CONTENT_LENGTH: Name = Name::new("content-length", 1);
pub(super) const TRANSFER_ENCODING: Name = Name::new("transfer-encoding", 2);
pub(super) const EXPECT: Name = Name::new("expect", 3);
pub(super) const CONNECTION: Name = Name::new("connection", 4);
pub(super) const UPGRADE: Name = Name::new("upgrade", 5);
const KEEP_ALIVE: Name = Name::new("keep-alive", 6);
const PROXY_CONNECTION: Name = Name::new("proxy-connection", 7);
const PROXY_AUTHENTICATE: Name = Name::new("proxy-authenticate", 8);
const PROXY_AUTHORIZATION: Name = Name::new("proxy-authorization", 9);
const TE: Name = Name::new("te", 10);

/// The fields hop-by-hop stripping would touch (RFC 9110 §7.6.1;
/// `Transfer-Encoding` is relayed with its body, so it does not count).
const HOP_BY_HOP: [Name; 7] = [
    CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
    TE,
    UPGRADE,
];

impl Name {
    const fn new(text: &'static str, index: u16) -> Name {
        Name {
            text,
            bit: 1 << index,
        }
    }
}

/// `name`'s bit (any case), 0 for a name no rule asks for. By length
/// first: one comparison at most for most names (the unit test holds
/// this table to every name).
fn tracked_bit(name: &str) -> u16 {
    let candidates: &[Name] = match name.len() {
        2 => &[TE],
        4 => &[HOST],
        6 => &[EXPECT],
        7 => &[UPGRADE],
        10 => &[CONNECTION, KEEP_ALIVE],
        14 => &[CONTENT_LENGTH],
        16 => &[PROXY_CONNECTION],
        17 => &[TRANSFER_ENCODING],
        18 => &[PROXY_AUTHENTICATE],
        19 => &[PROXY_AUTHORIZATION],
        _ => return 0,
    };
    candidates
        .iter()
        .find(|n| n.text.eq_ignore_ascii_case(name))
        .map_or(0, |n| n.bit)
}

/// Request or response header fields, and which [`Name`]s came.
pub(super) struct Fields<'a> {
    pub(super) list: &'a [httparse::Header<'a>],
    present: u16,
}

impl<'a> Fields<'a> {
    pub(super) fn new(list: &'a [httparse::Header<'a>]) -> Self {
        let present = list.iter().fold(0, |bits, f| bits | tracked_bit(f.name));
        Fields { list, present }
    }

    /// Whether any hop-by-hop field came.
    pub(super) fn has_hop_by_hop(&self) -> bool {
        HOP_BY_HOP.iter().any(|n| self.present & n.bit != 0)
    }
}

/// The values of every `name` field.
pub(super) fn values<'a>(fields: &'a Fields<'a>, name: Name) -> impl Iterator<Item = &'a [u8]> {
    let list = if fields.present & name.bit != 0 {
        fields.list
    } else {
        &[]
    };
    list.iter()
        .filter(move |f| f.name.eq_ignore_ascii_case(name.text))
        .map(|f| f.value)
}

pub(super) fn has_field(fields: &Fields<'_>, name: Name) -> bool {
    fields.present & name.bit != 0
}

/// Whether the comma-separated `Connection` values hold `token`.
pub(super) fn has_token(fields: &Fields<'_>, token: &str) -> bool {
    has_field(fields, CONNECTION)
        && list(fields, CONNECTION).any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

/// The comma-separated elements of every `name` field, trimmed of
/// optional whitespace. Bytes, not text: a value that is not UTF-8 still
/// has its elements (none of them a token a rule looks for). Skipped as
/// it was, `Transfer-Encoding: chunked<0x92>` read as no coding at all,
/// the body's length taken from elsewhere (found by the fuzz smoke in CI).
pub(super) fn list<'a>(fields: &'a Fields<'a>, name: Name) -> impl Iterator<Item = &'a [u8]> {
    values(fields, name)
        .flat_map(|v| v.split(|&b| b == b','))
        .map(trim_ows_bytes)
        .filter(|t| !t.is_empty())
}

/// `bytes` without leading and trailing optional whitespace: spaces and
/// tabs only (RFC 9110 §5.6.3). `str::trim` would also take Unicode
/// blanks off (U+00A0, U+0085…), reading `5<NBSP>` as a length an app
/// behind us may read otherwise: a smuggling shape.
pub(super) fn trim_ows_bytes(mut bytes: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = bytes {
        bytes = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = bytes {
        bytes = rest;
    }
    bytes
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Every name with a bit.
    const TRACKED: [Name; 11] = [
        HOST,
        CONTENT_LENGTH,
        TRANSFER_ENCODING,
        EXPECT,
        CONNECTION,
        UPGRADE,
        KEEP_ALIVE,
        PROXY_CONNECTION,
        PROXY_AUTHENTICATE,
        PROXY_AUTHORIZATION,
        TE,
    ];

    #[test]
    fn a_name_is_recorded_whatever_its_case_and_only_its_own() {
        for name in TRACKED {
            for spelled in [
                name.text.to_owned(),
                name.text.to_ascii_uppercase(),
                name.text[..1].to_ascii_uppercase() + &name.text[1..],
            ] {
                let list = [
                    httparse::Header {
                        name: "x-other",
                        value: b"1",
                    },
                    httparse::Header {
                        name: &spelled,
                        value: b"v",
                    },
                ];
                let fields = Fields::new(&list);
                for other in TRACKED {
                    let same = other.text == name.text;
                    assert_eq!(
                        has_field(&fields, other),
                        same,
                        "{spelled} / {}",
                        other.text
                    );
                    assert_eq!(values(&fields, other).count(), usize::from(same));
                }
                assert_eq!(
                    fields.has_hop_by_hop(),
                    HOP_BY_HOP.iter().any(|h| h.text == name.text),
                    "{spelled}"
                );
            }
        }
        // Near misses are not the name.
        let list = [
            httparse::Header {
                name: "content-lengths",
                value: b"1",
            },
            httparse::Header {
                name: "hos",
                value: b"1",
            },
            httparse::Header {
                name: "t",
                value: b"1",
            },
        ];
        assert_eq!(Fields::new(&list).present, 0);
    }
}
