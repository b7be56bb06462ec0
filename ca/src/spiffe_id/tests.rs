//! Table-driven tests of the SPIFFE ID rules, one row per rule.

#![allow(clippy::unwrap_used)]

use super::*;

#[test]
fn valid_ids() {
    let long_ok = format!(
        "spiffe://td/{}",
        "a".repeat(MAX_ID_LEN - "spiffe://td/".len())
    );
    let cases: &[(&str, &str, &str)] = &[
        ("spiffe://cluster.local", "cluster.local", ""),
        (
            "spiffe://cluster.local/ns/default/sa/default",
            "cluster.local",
            "/ns/default/sa/default",
        ),
        (
            "spiffe://a-b_c.9/Upper/CASE.ok-_",
            "a-b_c.9",
            "/Upper/CASE.ok-_",
        ),
        ("spiffe://td/...", "td", "/..."),
        ("spiffe://td/.a/a.", "td", "/.a/a."),
        (&long_ok, "td", &long_ok["spiffe://td".len()..]),
    ];
    for (input, td, path) in cases {
        let id = SpiffeId::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(id.trust_domain().as_str(), *td, "{input}");
        assert_eq!(id.path(), *path, "{input}");
        assert_eq!(id.as_str(), *input);
        assert_eq!(id.to_string(), *input);
        assert_eq!(input.parse::<SpiffeId>().unwrap(), id);
    }
}

#[test]
fn invalid_ids() {
    let too_long = format!("spiffe://td/{}", "a".repeat(MAX_ID_LEN));
    let td_too_long = format!("spiffe://{}", "a".repeat(256));
    use SpiffeIdError as E;
    let cases: &[(&str, SpiffeIdError)] = &[
        ("", E::Empty),
        ("http://td/x", E::WrongScheme),
        ("SPIFFE://td/x", E::WrongScheme),
        ("spiffe:/td/x", E::WrongScheme),
        ("spiffe://", E::MissingTrustDomain),
        ("spiffe:///ns/x", E::MissingTrustDomain),
        ("spiffe://Cluster.local/x", E::BadTrustDomainChar('C')),
        ("spiffe://td!/x", E::BadTrustDomainChar('!')),
        ("spiffe://td:8080/x", E::Port),
        ("spiffe://user@td/x", E::Userinfo),
        ("spiffe://td/x?y=1", E::Query),
        ("spiffe://td?y", E::Query),
        ("spiffe://td/x#frag", E::Fragment),
        ("spiffe://td/a%20b", E::PercentEncoded),
        ("spiffe://t%64/x", E::PercentEncoded),
        ("spiffe://td/", E::EmptySegment),
        ("spiffe://td//x", E::EmptySegment),
        ("spiffe://td/x/", E::EmptySegment),
        ("spiffe://td/./x", E::DotSegment),
        ("spiffe://td/x/..", E::DotSegment),
        ("spiffe://td/a b", E::BadPathChar(' ')),
        ("spiffe://td/ä", E::BadPathChar('ä')),
        ("spiffe://td/a*", E::BadPathChar('*')),
        (&too_long, E::TooLong(too_long.len())),
        (&td_too_long, E::TrustDomainTooLong(256)),
    ];
    for (input, want) in cases {
        assert_eq!(SpiffeId::parse(input).as_ref(), Err(want), "{input:?}");
    }
}

#[test]
fn trust_domains() {
    for (input, want) in [("cluster.local", "cluster.local"), ("spiffe://td", "td")] {
        assert_eq!(input.parse::<TrustDomain>().unwrap().as_str(), want);
    }
    for bad in ["", "Cluster.local", "td:1", "spiffe://td/x", "a/b", "u@td"] {
        assert!(bad.parse::<TrustDomain>().is_err(), "{bad:?} accepted");
    }
}

#[test]
fn service_account_ids() {
    let td: TrustDomain = "td".parse().unwrap();
    let id = SpiffeId::for_service_account(&td, "default", "web").unwrap();
    assert_eq!(id.as_str(), "spiffe://td/ns/default/sa/web");
    assert!(SpiffeId::for_service_account(&td, "", "web").is_err());
    assert!(SpiffeId::for_service_account(&td, "ns", "a/..").is_err());
}

#[test]
fn patterns() {
    let cases: &[(&str, &str, bool)] = &[
        ("spiffe://td/ns/ops/sa/a", "spiffe://td/ns/ops/sa/a", true),
        ("spiffe://td/ns/ops/sa/a", "spiffe://td/ns/ops/sa/ab", false),
        ("spiffe://td/ns/ops/*", "spiffe://td/ns/ops/sa/a", true),
        ("spiffe://td/ns/ops/*", "spiffe://td/ns/ops", false),
        ("spiffe://td/ns/ops/*", "spiffe://td/ns/opsx/sa/a", false),
        ("spiffe://td/ns/ops/*", "spiffe://other/ns/ops/sa/a", false),
        ("spiffe://td/*", "spiffe://td/x", true),
        ("spiffe://td/*", "spiffe://tdx/x", false),
    ];
    for (pattern, id, want) in cases {
        let p = SpiffeIdPattern::parse(pattern).unwrap();
        assert_eq!(p.to_string(), *pattern);
        let id = SpiffeId::parse(id).unwrap();
        assert_eq!(p.matches(&id), *want, "{pattern} vs {id}");
    }
    for bad in [
        "spiffe://td/*/x",
        "spiffe://td/a*",
        "spiffe://td/a/*/*",
        "spiffe://TD/*",
        "*",
    ] {
        assert!(SpiffeIdPattern::parse(bad).is_err(), "{bad:?} accepted");
    }
}

/// Random inputs built from the characters that matter: parsing never
/// panics, and whatever is accepted satisfies every rule and round-trips.
#[test]
fn random_inputs_uphold_the_invariants() {
    const ALPHABET: &[u8] = b"spiffe:/abcAZ09.-_%?#@:/// ..";
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut accepted = 0;
    for _ in 0..20_000 {
        let len = (next() % 40) as usize;
        let body: String = (0..len)
            .map(|_| ALPHABET[(next() % ALPHABET.len() as u64) as usize] as char)
            .collect();
        let input = if next() % 2 == 0 {
            format!("spiffe://{body}")
        } else {
            body
        };
        let Ok(id) = SpiffeId::parse(&input) else {
            continue;
        };
        accepted += 1;
        assert_eq!(id.as_str(), input);
        assert_eq!(SpiffeId::parse(id.as_str()).unwrap(), id);
        let td = id.trust_domain().as_str();
        assert!(!td.is_empty());
        assert!(td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)));
        if !id.path().is_empty() {
            for seg in id.path()[1..].split('/') {
                assert!(!seg.is_empty() && seg != "." && seg != "..", "{input}");
                assert!(
                    seg.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)),
                    "{input}"
                );
            }
        }
        let pattern = SpiffeIdPattern::parse(&format!("{id}/*")).unwrap();
        assert!(
            !pattern.matches(&id),
            "a prefix pattern never matches its own root"
        );
    }
    assert!(
        accepted > 100,
        "the generator should hit valid IDs too ({accepted})"
    );
}
