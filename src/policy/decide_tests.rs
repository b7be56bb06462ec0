//! Decision tests: every branch of authorize, routes and outbound.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::net::SocketAddr;

use super::super::*;

const POLICY: &str = r#"
trustDomain: cluster.local
mode: enforce
stepUp:
  providers:
    corp-idp:
      issuer: https://idp.example.com
      jwks: {file: /etc/stepmesh/idp-jwks.json}
      audiences: [payments]
      algorithms: [ES256, RS256]
inbound:
  default: deny
  ports:
    - port: 8080
      protocol: http
      allow:
        - from: [spiffe://cluster.local/ns/web/sa/frontend, spiffe://cluster.local/ns/ops/*]
        - name: partners
          from: [spiffe://partner.example/ns/x/sa/y]
      routes:
        - name: refunds
          match: {methods: [POST, DELETE], path: /refunds/*}
          from: [spiffe://cluster.local/ns/web/sa/frontend]
          stepUp:
            provider: corp-idp
            header: x-step-up-token
            acr: [urn:stepmesh:acr:mfa]
            amr: [mfa]
            claims: {acrs: c1}
            maxAge: 300s
            bindToPeer: azp
        - name: health
          match: {path: /healthz}
    - port: 5432
      protocol: tcp
      allow:
        - from: [spiffe://cluster.local/ns/payments/sa/api]
outbound:
  default: mtls
  rules:
    - to: {cidrs: [10.96.0.0/12], ports: [53]}
      action: passthrough
    - name: no-https-out
      to: {cidrs: [0.0.0.0/0], ports: [443]}
      action: deny
"#;

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn policy() -> Policy {
    Policy::from_yaml(POLICY).unwrap()
}

#[test]
fn exact_and_prefix_allow() {
    let p = policy();
    let d = p.authorize(&id("spiffe://cluster.local/ns/web/sa/frontend"), 8080);
    assert_eq!(
        (d.allow, d.would_deny, &*d.rule, d.reason),
        (true, false, "inbound.ports[0].allow[0]", "allowed")
    );
    let d = p.authorize(&id("spiffe://cluster.local/ns/ops/sa/oncall"), 8080);
    assert!(d.allow);
    let d = p.authorize(&id("spiffe://partner.example/ns/x/sa/y"), 8080);
    assert_eq!((d.allow, &*d.rule), (true, "partners"));
}

#[test]
fn not_on_the_list_is_denied_by_the_port() {
    let p = policy();
    for peer in [
        "spiffe://cluster.local/ns/web/sa/other",
        "spiffe://cluster.local/ns/ops",
        "spiffe://cluster.local/ns/opsx/sa/a",
        "spiffe://evil.local/ns/web/sa/frontend",
    ] {
        let d = p.authorize(&id(peer), 8080);
        assert_eq!(
            (d.allow, &*d.rule, d.reason),
            (false, "inbound.ports[0]", "not_allowed"),
            "{peer}"
        );
    }
    let d = p.authorize(&id("spiffe://cluster.local/ns/web/sa/frontend"), 5432);
    assert!(!d.allow);
    assert!(
        p.authorize(&id("spiffe://cluster.local/ns/payments/sa/api"), 5432)
            .allow
    );
}

#[test]
fn unlisted_port_follows_the_default() {
    let p = policy();
    let d = p.authorize(&id("spiffe://cluster.local/ns/web/sa/frontend"), 9999);
    assert_eq!(
        (d.allow, &*d.rule, d.reason),
        (false, "inbound.default", "default_deny")
    );

    let p =
        Policy::from_yaml("trustDomain: cluster.local\ninbound: {default: allow-authenticated}\n")
            .unwrap();
    let d = p.authorize(&id("spiffe://cluster.local/ns/a/sa/b"), 9999);
    assert_eq!((d.allow, d.reason), (true, "authenticated"));
    let d = p.authorize(&id("spiffe://other.local/ns/a/sa/b"), 9999);
    assert_eq!((d.allow, d.reason), (false, "foreign_trust_domain"));
}

#[test]
fn allow_authenticated_without_a_file() {
    let p = Policy::allow_authenticated("cluster.local".parse().unwrap());
    assert!(
        p.authorize(&id("spiffe://cluster.local/ns/a/sa/b"), 1)
            .allow
    );
    assert!(!p.authorize(&id("spiffe://x.local/ns/a/sa/b"), 1).allow);
    assert_eq!(p.port_protocol(8080), Protocol::Tcp);
    assert_eq!(
        p.outbound("10.0.0.1:80".parse().unwrap()).0,
        OutboundAction::Mtls
    );
    assert_eq!(p.digest().len(), 64);
}

#[test]
fn audit_mode_allows_and_reports() {
    let p = Policy::from_yaml(&POLICY.replace("mode: enforce", "mode: audit")).unwrap();
    assert_eq!(p.mode(), Mode::Audit);
    let d = p.authorize(&id("spiffe://cluster.local/ns/web/sa/other"), 8080);
    assert_eq!(
        (d.allow, d.would_deny, d.reason),
        (true, true, "not_allowed")
    );
    let d = p.authorize(&id("spiffe://cluster.local/ns/web/sa/frontend"), 8080);
    assert_eq!((d.allow, d.would_deny), (true, false));
}

#[test]
fn port_protocols() {
    let p = policy();
    assert_eq!(p.port_protocol(8080), Protocol::Http);
    assert_eq!(p.port_protocol(5432), Protocol::Tcp);
    assert_eq!(p.port_protocol(1), Protocol::Tcp);
}

#[test]
fn routes_match_method_and_path() {
    let p = policy();
    let post = http::Method::POST;
    assert_eq!(
        p.route(8080, &post, "/refunds/42").unwrap().name.as_ref(),
        "refunds"
    );
    assert_eq!(
        p.route(8080, &post, "/refunds").unwrap().name.as_ref(),
        "refunds"
    );
    assert_eq!(
        p.route(8080, &http::Method::DELETE, "/refunds/1?x=y")
            .unwrap()
            .name
            .as_ref(),
        "refunds"
    );
    assert!(p.route(8080, &http::Method::GET, "/refunds/42").is_none());
    assert!(p.route(8080, &post, "/refundsX").is_none());
    assert_eq!(
        p.route(8080, &http::Method::GET, "/healthz")
            .unwrap()
            .name
            .as_ref(),
        "health"
    );
    assert!(p.route(8080, &http::Method::GET, "/healthz/x").is_none());
    assert!(p.route(5432, &post, "/refunds/1").is_none());
    let r = p.route(8080, &post, "/refunds/1").unwrap();
    let s = r.step_up.as_ref().unwrap();
    assert_eq!(s.header.as_str(), "x-step-up-token");
    assert_eq!(s.max_age, Some(std::time::Duration::from_secs(300)));
    assert_eq!(s.bind, BindToPeer::Azp);
    assert_eq!(s.claims, vec![("acrs".to_owned(), serde_json::json!("c1"))]);
    assert!(!s.forward);
}

#[test]
fn route_from_narrows_the_port() {
    let p = policy();
    let ops = id("spiffe://cluster.local/ns/ops/sa/oncall");
    let m = p.authorize_request(&ops, 8080, &http::Method::POST, "/refunds/1");
    assert_eq!(
        (m.decision.allow, &*m.decision.rule, m.decision.reason),
        (false, "refunds", "route_not_allowed")
    );
    let m = p.authorize_request(&ops, 8080, &http::Method::GET, "/healthz");
    assert!(m.decision.allow);
    assert_eq!(m.route.unwrap().name.as_ref(), "health");
    let fe = id("spiffe://cluster.local/ns/web/sa/frontend");
    let m = p.authorize_request(&fe, 8080, &http::Method::POST, "/refunds/1");
    assert!(m.decision.allow);
    assert_eq!(m.route.unwrap().name.as_ref(), "refunds");
    // Listed in the route but not on the port: the port decides first.
    let stranger = id("spiffe://cluster.local/ns/x/sa/y");
    let m = p.authorize_request(&stranger, 8080, &http::Method::GET, "/other");
    assert_eq!(
        (m.decision.allow, m.decision.reason),
        (false, "not_allowed")
    );
    assert!(m.route.is_none());
}

#[test]
fn outbound_first_match_wins() {
    let p = policy();
    let a = |s: &str| s.parse::<SocketAddr>().unwrap();
    let (act, rule) = p.outbound(a("10.96.0.10:53"));
    assert_eq!(
        (act, &*rule),
        (OutboundAction::Passthrough, "outbound.rules[0]")
    );
    let (act, rule) = p.outbound(a("10.96.0.10:443"));
    assert_eq!((act, &*rule), (OutboundAction::Deny, "no-https-out"));
    let (act, rule) = p.outbound(a("8.8.8.8:443"));
    assert_eq!((act, &*rule), (OutboundAction::Deny, "no-https-out"));
    let (act, rule) = p.outbound(a("10.96.0.10:8080"));
    assert_eq!((act, &*rule), (OutboundAction::Mtls, "outbound.default"));
    let (act, _) = p.outbound(a("[2001:db8::1]:443"));
    assert_eq!(
        act,
        OutboundAction::Mtls,
        "an IPv4 CIDR does not match IPv6"
    );
}

#[test]
fn digest_follows_content() {
    let a = policy();
    let b = Policy::from_yaml(&format!("{POLICY}\n# comment\n")).unwrap();
    assert_eq!(a.digest(), policy().digest());
    assert_ne!(a.digest(), b.digest());
}
