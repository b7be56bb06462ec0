//! Validation tests: each refusal names the field path.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use super::super::*;

const BASE: &str = r#"
trustDomain: cluster.local
stepUp:
  providers:
    idp:
      issuer: https://idp.example.com
      jwks: {url: "https://idp.example.com/jwks", refresh: 5m}
      audiences: [payments]
      algorithms: [ES256]
inbound:
  ports:
    - port: 8080
      protocol: http
      allow:
        - from: [spiffe://cluster.local/ns/web/sa/frontend]
      routes:
        - name: r
          match: {path: /x/*}
          stepUp: {provider: idp}
"#;

fn refused(yaml: &str) -> String {
    Policy::from_yaml(yaml)
        .expect_err("must be refused")
        .to_string()
}

fn with(from: &str, to: &str) -> String {
    assert!(BASE.contains(from), "{from}");
    BASE.replacen(from, to, 1)
}

#[test]
fn base_is_valid_with_defaults() {
    let p = Policy::from_yaml(BASE).unwrap();
    assert_eq!(p.mode(), Mode::Enforce);
    assert_eq!(p.inbound_default(), InboundDefault::Deny);
    let prov = p.provider("idp").unwrap();
    assert_eq!(prov.refresh, std::time::Duration::from_secs(300));
    assert_eq!(prov.token.leeway, std::time::Duration::from_secs(30));
    assert!(matches!(prov.jwks, JwksSource::Url { .. }));
    let r = &p.port(8080).unwrap().routes[0];
    assert_eq!(r.path, PathMatch::Prefix("/x".into()));
    assert_eq!(
        r.step_up.as_ref().unwrap().header,
        http::header::AUTHORIZATION
    );
}

#[test]
fn unknown_fields_are_refused_with_their_path() {
    let e = refused(&with(
        "      protocol: http",
        "      protocol: http\n      colour: red",
    ));
    assert!(
        e.contains("inbound.ports[0]") && e.contains("colour"),
        "{e}"
    );
    let e = refused(&with(
        "stepUp: {provider: idp}",
        "stepUp: {provider: idp, acrr: [x]}",
    ));
    assert!(
        e.contains("inbound.ports[0].routes[0].stepUp") && e.contains("acrr"),
        "{e}"
    );
    let e = refused(&format!("{BASE}extra: 1\n"));
    assert!(e.contains("extra"), "{e}");
}

#[test]
fn bad_enums_name_the_field() {
    let e = refused(&with("protocol: http", "protocol: udp"));
    assert!(
        e.contains("inbound.ports[0].protocol") && e.contains("udp"),
        "{e}"
    );
    let e = refused(&format!("mode: loud\n{BASE}"));
    assert!(e.contains("mode"), "{e}");
}

#[test]
fn value_errors_name_the_field() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "trustDomain: cluster.local",
            "trustDomain: Cluster.Local",
            "trustDomain",
        ),
        (
            "spiffe://cluster.local/ns/web/sa/frontend]",
            "spiffe://cluster.local/ns/web/sa/frontend, http://x]",
            "inbound.ports[0].allow[0].from[1]",
        ),
        (
            "spiffe://cluster.local/ns/web/sa/frontend]",
            "]",
            "inbound.ports[0].allow[0].from",
        ),
        (
            "algorithms: [ES256]",
            "algorithms: [ES256, HS256]",
            "stepUp.providers.idp.algorithms[1]",
        ),
        (
            "algorithms: [ES256]",
            "algorithms: [none]",
            "stepUp.providers.idp.algorithms[0]",
        ),
        (
            "algorithms: [ES256]",
            "algorithms: []",
            "stepUp.providers.idp.algorithms",
        ),
        (
            "audiences: [payments]",
            "audiences: []",
            "stepUp.providers.idp.audiences",
        ),
        (
            "refresh: 5m",
            "refresh: soon",
            "stepUp.providers.idp.jwks.refresh",
        ),
        (
            "url: \"https://idp.example.com/jwks\"",
            "url: \"http://idp.example.com/jwks\"",
            "stepUp.providers.idp.jwks.url",
        ),
        (
            "url: \"https://idp.example.com/jwks\"",
            "file: /a, url: \"https://idp.example.com/jwks\"",
            "stepUp.providers.idp.jwks",
        ),
        (
            "stepUp: {provider: idp}",
            "stepUp: {provider: nobody}",
            "inbound.ports[0].routes[0].stepUp.provider",
        ),
        (
            "stepUp: {provider: idp}",
            "stepUp: {provider: idp, maxAge: 5y}",
            "inbound.ports[0].routes[0].stepUp.maxAge",
        ),
        (
            "stepUp: {provider: idp}",
            "stepUp: {provider: idp, header: \"bad header\"}",
            "inbound.ports[0].routes[0].stepUp.header",
        ),
        (
            "stepUp: {provider: idp}",
            "stepUp: {provider: idp, claims: {a: [1]}}",
            "inbound.ports[0].routes[0].stepUp.claims.a",
        ),
        (
            "match: {path: /x/*}",
            "match: {path: x}",
            "inbound.ports[0].routes[0].match.path",
        ),
        (
            "match: {path: /x/*}",
            "match: {path: /x/*/y}",
            "inbound.ports[0].routes[0].match.path",
        ),
        (
            "match: {path: /x/*}",
            "match: {path: /x/../y}",
            "inbound.ports[0].routes[0].match.path",
        ),
        (
            "match: {path: /x/*}",
            "match: {path: /x, methods: [\"GE T\"]}",
            "inbound.ports[0].routes[0].match.methods[0]",
        ),
        ("protocol: http", "protocol: tcp", "inbound.ports[0].routes"),
        ("- port: 8080", "- port: 0", "inbound.ports[0].port"),
        ("- port: 8080", "- port: 70000", "inbound.ports[0].port"),
    ];
    for (from, to, path) in cases {
        let e = refused(&with(from, to));
        assert!(e.contains(path), "{to:?}: expected {path} in {e}");
    }
}

#[test]
fn duplicates_are_refused() {
    let dup_port = format!("{BASE}    - port: 8080\n      allow: []\n");
    assert!(refused(&dup_port).contains("inbound.ports[1].port"));
    let dup_route = with(
        "          stepUp: {provider: idp}",
        "          stepUp: {provider: idp}\n        - name: r\n          match: {path: /y}",
    );
    assert!(refused(&dup_route).contains("inbound.ports[0].routes[1].name"));
}

#[test]
fn outbound_rules_are_checked() {
    let bad_cidr = format!(
        "{BASE}outbound:\n  rules:\n    - to: {{cidrs: [10.0.0.1/8]}}\n      action: deny\n"
    );
    assert!(refused(&bad_cidr).contains("outbound.rules[0].to.cidrs[0]"));
    let empty = format!("{BASE}outbound:\n  rules:\n    - to: {{}}\n      action: deny\n");
    assert!(refused(&empty).contains("outbound.rules[0].to"));
    let bad_action = format!("{BASE}outbound:\n  default: drop\n");
    assert!(refused(&bad_action).contains("outbound.default"));
}

#[test]
fn opaque_ports_are_read_and_checked() {
    let ok = format!("{BASE}outbound:\n  opaquePorts: [5432, 6379]\n");
    let policy = Policy::from_yaml(&ok).unwrap();
    assert!(policy.opaque_port(5432) && policy.opaque_port(6379));
    assert!(!policy.opaque_port(8080));
    let zero = format!("{BASE}outbound:\n  opaquePorts: [0]\n");
    assert!(refused(&zero).contains("outbound.opaquePorts[0]"));
    let twice = format!("{BASE}outbound:\n  opaquePorts: [5432, 5432]\n");
    assert!(refused(&twice).contains("outbound.opaquePorts[1]: port 5432 appears twice"));
    let bad = format!("{BASE}outbound:\n  opaquePorts: [http]\n");
    assert!(refused(&bad).contains("opaquePorts"));
}

#[test]
fn not_yaml_is_refused() {
    assert!(refused("{{{").contains("does not parse"));
    assert!(refused("").contains("does not parse"));
    assert!(refused("inbound: {}").contains("trustDomain"));
}

/// BASE's provider made a mesh (JWT-SVID) provider, with `route` as the
/// route's stepUp.
fn mesh(provider: &str, route: &str) -> String {
    with(
        "      issuer: https://idp.example.com\n      jwks: {url: \"https://idp.example.com/jwks\", refresh: 5m}",
        provider,
    )
    .replacen("stepUp: {provider: idp}", route, 1)
}

#[test]
fn mesh_providers_take_no_issuer_and_their_routes_name_workloads() {
    let ok = mesh(
        "      jwks: {mesh: true}",
        "stepUp: {provider: idp, from: [spiffe://cluster.local/ns/jobs/*]}",
    );
    let p = Policy::from_yaml(&ok).unwrap();
    let prov = p.provider("idp").unwrap();
    assert_eq!(prov.jwks, JwksSource::Mesh);
    assert_eq!(prov.token.issuer, None);
    let rule = p.port(8080).unwrap().routes[0].step_up.as_ref().unwrap();
    let from = rule.from.as_ref().unwrap();
    assert!(from[0].matches(&SpiffeId::parse("spiffe://cluster.local/ns/jobs/sa/x").unwrap()));

    let e = refused(&mesh(
        "      issuer: https://idp.example.com\n      jwks: {mesh: true}",
        "stepUp: {provider: idp, from: [spiffe://cluster.local/a]}",
    ));
    assert!(e.starts_with("stepUp.providers.idp.issuer:"), "{e}");
    let e = refused(&mesh("      jwks: {mesh: true}", "stepUp: {provider: idp}"));
    assert!(
        e.starts_with("inbound.ports[0].routes[0].stepUp.from:"),
        "{e}"
    );
    let e = refused(&mesh(
        "      jwks: {mesh: true, url: \"https://idp.example.com/jwks\"}",
        "stepUp: {provider: idp, from: [spiffe://cluster.local/a]}",
    ));
    assert!(e.contains("exactly one of file, url or mesh"), "{e}");
    // `from` on a provider whose `sub` is not a SPIFFE ID.
    let e = refused(&with(
        "stepUp: {provider: idp}",
        "stepUp: {provider: idp, from: [spiffe://cluster.local/a]}",
    ));
    assert!(
        e.contains("only applies to a provider with jwks: {mesh: true}"),
        "{e}"
    );
    let e = refused(&with("      issuer: https://idp.example.com\n", ""));
    assert!(e.starts_with("stepUp.providers.idp.issuer: missing"), "{e}");
}
