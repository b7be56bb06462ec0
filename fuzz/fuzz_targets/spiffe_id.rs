//! SPIFFE IDs come from certificates and policy files written by others:
//! `SpiffeId::parse`, `SpiffeIdPattern::parse` and `TrustDomain`'s `FromStr`
//! must refuse what the spec refuses without panicking, and what they accept
//! must round-trip exactly (a parsed ID's text re-parses to an equal ID).
#![no_main]

use libfuzzer_sys::fuzz_target;
use stepmesh_ca::spiffe_id::{SpiffeId, SpiffeIdPattern, TrustDomain};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };

    if let Ok(id) = SpiffeId::parse(text) {
        assert_eq!(id.as_str(), text, "an ID keeps its text");
        let again = SpiffeId::parse(id.as_str()).expect("a parsed ID re-parses");
        assert_eq!(again, id);
        assert_eq!(
            format!("spiffe://{}{}", id.trust_domain(), id.path()),
            text,
            "trust domain and path are the whole ID"
        );
        let td: TrustDomain = id
            .trust_domain()
            .as_str()
            .parse()
            .expect("an ID's trust domain parses on its own");
        assert_eq!(&td, id.trust_domain());
        let exact = SpiffeIdPattern::parse(id.as_str()).expect("an ID is an exact pattern");
        assert!(exact.matches(&id));
    }

    if let Ok(pattern) = SpiffeIdPattern::parse(text) {
        let shown = pattern.to_string();
        assert_eq!(shown, text, "a pattern displays as written");
        assert_eq!(SpiffeIdPattern::parse(&shown).as_ref(), Ok(&pattern));
        match &pattern {
            SpiffeIdPattern::Exact(id) => assert!(pattern.matches(id)),
            SpiffeIdPattern::Prefix(prefix) => {
                assert!(!pattern.matches(prefix), "a prefix never matches itself");
                if let Ok(child) = SpiffeId::parse(&format!("{prefix}/x")) {
                    assert!(pattern.matches(&child), "one segment more matches");
                }
            }
        }
    }

    if let Ok(td) = text.parse::<TrustDomain>() {
        let again: TrustDomain = td
            .id_string()
            .parse()
            .expect("spiffe://<td> is a trust domain");
        assert_eq!(again, td);
    }
});
