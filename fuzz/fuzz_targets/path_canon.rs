//! Request-target canonicalisation (`stepmesh::policy::target`) is what
//! stands between a hostile path and a route's requirements: the app behind
//! the sidecar must not be able to read a path as a route the matcher did
//! not pick. Properties, for every `pathMatch` setting:
//!
//! - a refused target (refused by `target::parse`, `target::request_path` or
//!   `Readings::of`) never yields a route: `route_request` and
//!   `authorize_request` answer it with the same refusal;
//! - canonicalisation is idempotent: re-reading any reading of a path gives
//!   nothing new: with an exact `pathMatch` (no `any`), only readings the
//!   path had, folded flag included (so a reading alone never routes
//!   elsewhere); with `any`, only paths equal up to case to one of the
//!   path's readings; and case folding is a fixed point
//!   (`fold(fold(x)) == fold(x)`);
//! - routing agrees with a plain oracle over every method the app may read
//!   the request as and every reading of its path: the route chosen is the
//!   first route matching some pair and no pair's first match is another
//!   route; "no route" means no pair matches any; "ambiguous" (or "method
//!   override") names two routes that two pairs really match;
//! - the methods an app may read the request as (`method_readings`) start
//!   with its own, hold no method twice, take every method token a
//!   method-override field holds (in either spelling of its name), and
//!   nothing that no override field or the query holds.
//!
//! Input: byte 0 picks `pathMatch` (case × params) and the method; the rest
//! is UTF-8: the request target, then two optional `Host` values, then
//! fields, one a line (names taken in turn from [`FIELDS`]).
#![no_main]

use std::sync::OnceLock;

use http::header::{HeaderValue, HOST};
use http::{HeaderMap, Method};
use libfuzzer_sys::fuzz_target;
use stepmesh::policy::target::{self, CaseMatch, ParamsMatch, Reading, Readings, Refusal};
use stepmesh::policy::{Policy, Route};

/// Ports 8000 + 3 × case + params, one per `pathMatch`, each with the same
/// routes (mixed case, prefixes nested and overlapping, method-specific).
fn policy() -> &'static Policy {
    static POLICY: OnceLock<Policy> = OnceLock::new();
    POLICY.get_or_init(|| {
        let mut yaml =
            String::from("trustDomain: td\nmode: enforce\ninbound:\n  default: deny\n  ports:\n");
        for (i, case) in ["any", "sensitive", "insensitive"].iter().enumerate() {
            for (j, params) in ["any", "kept", "stripped"].iter().enumerate() {
                let port = 8000 + 3 * i + j;
                yaml.push_str(&format!(
                    "    - port: {port}
      protocol: http
      pathMatch: {{case: {case}, params: {params}}}
      allow: [{{from: [spiffe://td/*]}}]
      routes:
        - name: admin
          match: {{path: /admin/*}}
          from: [spiffe://td/ns/ops/sa/admin]
        - name: api-v1
          match: {{path: /API/v1/*}}
        - name: users-read
          match: {{methods: [GET], path: /users}}
        - name: users-write
          match: {{methods: [POST, DELETE], path: /users/*}}
        - name: login
          match: {{path: /Login}}
        - name: cafe
          match: {{path: /café/*}}
        - name: root
          match: {{path: /}}
"
                ));
            }
        }
        // A fixed document: a failure is a broken fixture, not a finding.
        Policy::from_yaml(&yaml).unwrap_or_else(|e| panic!("fixture policy: {e}\n{yaml}"))
    })
}

/// The names the fields of the input's later lines take in turn: override
/// fields spelled both ways, and one that is no override.
const FIELDS: [&str; 4] = [
    "x-http-method-override",
    "x_http_method",
    "x-method-override",
    "x-forwarded-method",
];

/// The methods an app may read the request as, checked against the fields
/// and the query they came from.
fn check_method_readings(method: &Method, uri: &http::Uri, headers: &HeaderMap) {
    let readings = target::method_readings(method, uri, headers);
    assert_eq!(&readings[0], method, "the request's own method first");
    for (i, m) in readings.iter().enumerate() {
        assert!(!readings[..i].contains(m), "{m} read twice: {readings:?}");
    }
    let overrides: Vec<&[u8]> = headers
        .iter()
        .filter(|(name, _)| {
            target::METHOD_OVERRIDES
                .iter()
                .any(|o| target::reads_as(name.as_str().as_bytes(), o))
        })
        .map(|(_, v)| v.as_bytes())
        .collect();
    // A token needs no trim: each one an override field holds is read.
    for element in overrides.iter().flat_map(|v| v.split(|&b| b == b',')) {
        if let Ok(m) = Method::from_bytes(element) {
            assert!(readings.contains(&m), "{m} missed: {readings:?}");
        }
    }
    // And nothing else: each reading is in a field or in the query (the
    // whole query decoded at once, which holds each part decoded).
    let query = decode_query(uri.query().unwrap_or(""));
    let holds = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    for m in &readings[1..] {
        let m = m.as_str().as_bytes();
        assert!(
            overrides.iter().any(|v| holds(v, m)) || holds(&query, m),
            "{} read from nowhere",
            String::from_utf8_lossy(m)
        );
    }
}

/// `+` as a space and each `%XX` as its byte (others kept), independently
/// of the code under test.
fn decode_query(query: &str) -> Vec<u8> {
    let bytes = query.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

fn first_match<'p>(
    routes: &'p [Route],
    method: &Method,
    reading: &Reading<'_>,
) -> Option<&'p Route> {
    routes
        .iter()
        .find(|r| r.matches_method(method) && r.matches_path(reading))
}

fn pairs(readings: &Readings<'_>) -> Vec<(String, bool)> {
    readings
        .iter()
        .map(|r| (r.path.to_string(), r.folded))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let port = 8000 + u16::from(pick % 9);
    let methods = [
        Method::GET,
        Method::POST,
        Method::DELETE,
        Method::HEAD,
        Method::CONNECT,
    ];
    let method = &methods[usize::from(pick / 9) % methods.len()];
    let mut lines = text.split('\n');
    let raw = lines.next().unwrap_or_default();
    let mut headers = HeaderMap::new();
    for host in lines.by_ref().take(2) {
        if let Ok(v) = HeaderValue::from_str(host) {
            headers.append(HOST, v);
        }
    }
    for (name, value) in FIELDS.iter().cycle().zip(lines) {
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.append(*name, v);
        }
    }

    let policy = policy();
    let port_policy = policy.port(port).expect("fixture port");
    let options = port_policy.path_match;
    let routes = &port_policy.routes;

    let Ok(uri) = target::parse(raw) else {
        // Refused before any Uri exists: nothing can be routed.
        return;
    };
    check_method_readings(method, &uri, &headers);
    let checked: Result<Readings<'_>, Refusal> =
        target::request_path(method, &uri, &headers).and_then(|p| Readings::of(p, options));
    let routed = policy.route_request(port, method, &uri, &headers);
    let peer = stepmesh::policy::SpiffeId::parse("spiffe://td/ns/ops/sa/admin").expect("fixed ID");
    let authorized = policy.authorize_request(&peer, port, method, &uri, &headers);

    let readings = match checked {
        Err(refusal) => {
            assert_eq!(
                routed.err(),
                Some(refusal.clone()),
                "a refused target was routed"
            );
            assert_eq!(
                authorized.err(),
                Some(refusal),
                "a refused target was authorized"
            );
            return;
        }
        Ok(readings) => readings,
    };
    assert!(
        readings.iter().next().is_some(),
        "an accepted path has a reading"
    );

    // Routing against the oracle, over every method the app may read the
    // request as and every reading of its path.
    let methods = target::method_readings(method, &uri, &headers);
    let firsts: Vec<Option<&Route>> = methods
        .iter()
        .flat_map(|m| readings.iter().map(move |r| first_match(routes, m, r)))
        .collect();
    match &routed {
        Ok(Some(route)) => {
            assert!(
                firsts
                    .iter()
                    .any(|f| f.is_some_and(|f| std::ptr::eq(f, *route))),
                "the route chosen matches no reading"
            );
            for f in firsts.iter().flatten() {
                assert!(
                    std::ptr::eq(*f, *route),
                    "reading matches {:?} but {:?} was chosen",
                    f.name,
                    route.name
                );
            }
        }
        Ok(None) => assert!(
            firsts.iter().all(Option::is_none),
            "a matching route was missed"
        ),
        Err(Refusal::Ambiguous(a, b) | Refusal::MethodOverride(a, b)) => {
            assert_ne!(a, b);
            for name in [a, b] {
                assert!(
                    firsts.iter().flatten().any(|f| &*f.name == name.as_str()),
                    "ambiguous names a route no reading matches"
                );
            }
        }
        Err(other) => panic!("an accepted path was refused by routing: {other:?}"),
    }
    match (&routed, &authorized) {
        (Ok(r), Ok(m)) => assert_eq!(r.map(|r| &r.name), m.route.map(|r| &r.name)),
        (Err(a), Err(b)) => assert_eq!(a, b),
        _ => panic!("route_request and authorize_request disagree"),
    }

    // Idempotence. A reading is a path the app may see plus whether it is
    // compared folded. Re-read as a path, it may only give paths the
    // original already had; when `pathMatch` says exactly how the app reads
    // (no `any`), it gives only readings the original had, flags included,
    // and so can route nowhere but where the original did.
    let exact = options.case != CaseMatch::Any && options.params != ParamsMatch::Any;
    let all = pairs(&readings);
    for reading in readings.iter() {
        let folded = target::fold(&reading.path);
        assert_eq!(target::fold(&folded), folded, "folding is a fixed point");
        if reading.folded {
            assert_eq!(folded, reading.path, "a folded reading is folded");
        }
        let Ok(again) = Readings::of(&reading.path, options) else {
            // A decoded reading may hold bytes no target may carry raw
            // (a space, `#`, non-ASCII): it is never re-read.
            continue;
        };
        for pair in pairs(&again) {
            // With `case: any` the re-read may mix readings (ASCII folded
            // by the raw reading, then decoded, not folded again): it is
            // new only if no reading is the same up to case, which the
            // folded readings compare against folded patterns.
            let known = if exact {
                all.contains(&pair)
            } else {
                let folded = target::fold(&pair.0);
                all.iter().any(|(p, _)| target::fold(p) == folded)
            };
            assert!(
                known,
                "re-reading {:?} gave {pair:?}, not among {all:?}",
                reading.path
            );
        }
        if !exact {
            continue;
        }
        if let Ok(chosen) = &routed {
            match (chosen, policy.route(port, method, &again)) {
                (_, Ok(None)) => {}
                (Some(a), Ok(Some(b))) => {
                    assert!(std::ptr::eq(*a, b), "a reading routes elsewhere")
                }
                (c, r) => panic!(
                    "a reading of a path routed {:?} routes {:?}",
                    c.map(|c| &c.name),
                    r.map(|r| r.map(|r| r.name.clone()))
                ),
            }
        }
    }
});
