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

/// The name of the route a request target takes (through the one
/// canonicalisation), or why it was refused.
fn route(
    p: &Policy,
    port: u16,
    method: &http::Method,
    target: &str,
) -> Result<Option<String>, String> {
    let uri = super::target::parse(target).map_err(|r| r.reason().to_owned())?;
    p.route_request(port, method, &uri, &http::HeaderMap::new())
        .map(|r| r.map(|r| r.name.to_string()))
        .map_err(|r| r.reason().to_owned())
}

#[test]
fn routes_match_method_and_path() {
    let p = policy();
    let post = http::Method::POST;
    let named = |m: &http::Method, t: &str| route(&p, 8080, m, t).unwrap();
    assert_eq!(named(&post, "/refunds/42").as_deref(), Some("refunds"));
    assert_eq!(named(&post, "/refunds").as_deref(), Some("refunds"));
    assert_eq!(
        named(&http::Method::DELETE, "/refunds/1?x=y").as_deref(),
        Some("refunds")
    );
    assert_eq!(named(&http::Method::GET, "/refunds/42"), None);
    assert_eq!(named(&post, "/refundsX"), None);
    assert_eq!(
        named(&http::Method::GET, "/healthz").as_deref(),
        Some("health")
    );
    assert_eq!(named(&http::Method::GET, "/healthz/x"), None);
    assert_eq!(route(&p, 5432, &post, "/refunds/1").unwrap(), None);
    let uri = http::Uri::from_static("/refunds/1");
    let r = p
        .route_request(8080, &post, &uri, &http::HeaderMap::new())
        .unwrap()
        .unwrap();
    let s = r.step_up.as_ref().unwrap();
    assert_eq!(s.header.as_str(), "x-step-up-token");
    assert_eq!(s.max_age, Some(std::time::Duration::from_secs(300)));
    assert_eq!(s.bind, BindToPeer::Azp);
    assert_eq!(s.claims, vec![("acrs".to_owned(), serde_json::json!("c1"))]);
    assert!(!s.forward);
}

#[test]
fn routes_match_every_reading_an_app_may_make() {
    let p = policy();
    let post = http::Method::POST;
    let named = |m: &http::Method, t: &str| route(&p, 8080, m, t);
    for (method, target, want) in [
        // Case folded (ASP.NET, Express), `;` stripped (Tomcat), escapes
        // decoded, one trailing slash: the route still applies.
        (&post, "/REFUNDS/1", Ok(Some("refunds"))),
        (&post, "/Refunds", Ok(Some("refunds"))),
        (&post, "/refunds;jsessionid=1/2", Ok(Some("refunds"))),
        (&post, "/refunds;x", Ok(Some("refunds"))),
        (&post, "/refunds/", Ok(Some("refunds"))),
        (&post, "/%72efunds/1", Ok(Some("refunds"))),
        (&http::Method::GET, "/healthz/", Ok(Some("health"))),
        // Methods without case; HEAD takes GET routes.
        (
            &http::Method::from_bytes(b"post").unwrap(),
            "/refunds/1",
            Ok(Some("refunds")),
        ),
        (&http::Method::HEAD, "/healthz", Ok(Some("health"))),
        // Refused before matching.
        (&post, "//refunds/1", Err("path_empty_segment")),
        (&post, "/x/../refunds/1", Err("path_dot_segment")),
        (&post, "/x/%2e%2e/refunds/1", Err("path_dot_segment")),
        (&post, "/x/..;/refunds/1", Err("path_dot_segment")),
        (&post, "/refunds%2F1", Err("path_encoded_delimiter")),
        (&post, "/refunds%5c1", Err("path_encoded_delimiter")),
        (&post, "/refunds%001", Err("path_encoded_control")),
        (&post, "/%c0%ae%c0%ae/refunds", Err("path_invalid_utf8")),
        (&post, "/refunds#x", Err("target_fragment")),
        (&post, "*", Err("target_not_a_path")),
        // An unprotected path with parameters is left alone.
        (&http::Method::GET, "/public;jsessionid=1", Ok(None)),
    ] {
        let got = named(method, target);
        let want = want.map(|r| r.map(str::to_owned)).map_err(str::to_owned);
        assert_eq!(got, want, "{method} {target}");
    }
    // Without routes on the port, targets are not the policy's business.
    assert_eq!(route(&p, 5432, &post, "//x/../y").unwrap(), None);
}

#[test]
fn path_match_narrows_the_readings() {
    let yaml = |options: &str| {
        POLICY.replace(
            "      protocol: http\n",
            &format!("      protocol: http\n      pathMatch: {options}\n"),
        )
    };
    let post = http::Method::POST;
    let sensitive = Policy::from_yaml(&yaml("{case: sensitive, params: kept}")).unwrap();
    assert_eq!(route(&sensitive, 8080, &post, "/REFUNDS/1").unwrap(), None);
    assert_eq!(route(&sensitive, 8080, &post, "/refunds;x").unwrap(), None);
    let folding = Policy::from_yaml(&yaml("{case: insensitive, params: stripped}")).unwrap();
    assert_eq!(
        route(&folding, 8080, &post, "/REFUNDS;x/1")
            .unwrap()
            .as_deref(),
        Some("refunds")
    );
    assert!(Policy::from_yaml(&yaml("{case: maybe}")).is_err());
}

#[test]
fn readings_that_pick_different_routes_are_refused() {
    let p = Policy::from_yaml(
        "trustDomain: td\ninbound:\n  ports:\n    - port: 80\n      protocol: http\n      allow: [{from: [spiffe://td/*]}]\n      routes:\n        - name: public\n          match: {path: /Admin/public}\n        - name: admin\n          match: {path: /admin/*}\n",
    )
    .unwrap();
    let get = http::Method::GET;
    // As sent: "admin" (a case-sensitive app); folded, as ASP.NET reads
    // it: "public", first in the list.
    assert_eq!(
        route(&p, 80, &get, "/admin/public"),
        Err("path_ambiguous".to_owned())
    );
    assert_eq!(
        route(&p, 80, &get, "/Admin/public").unwrap().as_deref(),
        Some("public")
    );
    assert_eq!(
        route(&p, 80, &get, "/ADMIN/x").unwrap().as_deref(),
        Some("admin")
    );
}

#[test]
fn a_method_override_field_is_read_as_an_app_may_read_it() {
    let p = Policy::from_yaml(
        "trustDomain: td\ninbound:\n  ports:\n    - port: 80\n      protocol: http\n      allow: [{from: [spiffe://td/*]}]\n      routes:\n        - name: read\n          match: {methods: [GET], path: /orders/*}\n        - name: cancel\n          match: {methods: [DELETE], path: /orders/*}\n        - name: refund\n          match: {methods: [DELETE], path: /refunds/*}\n",
    )
    .unwrap();
    let routed =
        |method: http::Method, target: &'static str, fields: &[(&'static str, &'static str)]| {
            let mut headers = http::HeaderMap::new();
            for (name, value) in fields {
                headers.append(*name, value.parse().unwrap());
            }
            p.route_request(80, &method, &http::Uri::from_static(target), &headers)
                .map(|r| r.map(|r| r.name.to_string()))
                .map_err(|r| r.reason())
        };
    let (get, post) = (http::Method::GET, http::Method::POST);
    // A POST no route names, read as the DELETE it says it is: the
    // DELETE's route, in any of the fields, any case, first or last.
    for fields in [
        [("x-http-method-override", "DELETE")],
        [("X-HTTP-Method", "delete")],
        [("x-method-override", " PUT , DELETE ")],
        // Spelled with `_`: the dashed name's key to CGI-style servers.
        [("X_HTTP_Method_Override", "DELETE")],
        [("x_method-override", "DELETE")],
    ] {
        assert_eq!(
            routed(post.clone(), "/refunds/1", &fields),
            Ok(Some("refund".to_owned())),
            "{fields:?}"
        );
    }
    assert_eq!(routed(post.clone(), "/refunds/1", &[]), Ok(None));
    // A GET whose override takes another route: the app may read either.
    assert_eq!(
        routed(
            get.clone(),
            "/orders/1",
            &[("x-http-method-override", "DELETE")]
        ),
        Err("method_override_ambiguous")
    );
    // An override that takes the same route, or none, or is no method.
    for value in ["GET", "HEAD", "PATCH", "DEL ETE", "", ","] {
        assert_eq!(
            routed(
                get.clone(),
                "/orders/1",
                &[("x-http-method-override", value)]
            ),
            Ok(Some("read".to_owned())),
            "{value:?}"
        );
    }
    // Padded as Node and WSGI decode it (0xA0: NBSP, which their trim
    // takes away): still the DELETE.
    for padded in [&b"\xa0DELETE"[..], b"DELETE\x85", b"\xa0 DELETE\t"] {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "x-http-method-override",
            http::HeaderValue::from_bytes(padded).unwrap(),
        );
        let uri = http::Uri::from_static("/refunds/1");
        let route = p.route_request(80, &post, &uri, &headers).unwrap();
        assert_eq!(
            route.map(|r| r.name.to_string()).as_deref(),
            Some("refund"),
            "{padded:?}"
        );
    }
    // `_method` in the query (Express's methodOverride('_method'),
    // gorilla/handlers), however it is escaped; other keys are not it.
    for target in [
        "/refunds/1?_method=DELETE",
        "/refunds/1?a=1&_method=delete",
        "/refunds/1?_m%65thod=DEL%45TE",
        "/refunds/1?_method=+DELETE+",
    ] {
        assert_eq!(
            routed(post.clone(), target, &[]),
            Ok(Some("refund".to_owned())),
            "{target}"
        );
    }
    for target in [
        "/refunds/1?method=DELETE",
        "/refunds/1?_method",
        "/refunds/1?x=_method=DELETE",
    ] {
        assert_eq!(routed(post.clone(), target, &[]), Ok(None), "{target}");
    }
    assert_eq!(
        routed(get.clone(), "/orders/1?_method=DELETE", &[]),
        Err("method_override_ambiguous")
    );
}

#[test]
fn host_must_agree_with_the_target() {
    let p = policy();
    let post = http::Method::POST;
    let uri = http::Uri::from_static("http://payments/refunds/1");
    let mut headers = http::HeaderMap::new();
    headers.insert(http::header::HOST, "payments".parse().unwrap());
    assert!(p
        .route_request(8080, &post, &uri, &headers)
        .unwrap()
        .is_some());
    headers.insert(http::header::HOST, "other".parse().unwrap());
    assert_eq!(
        p.route_request(8080, &post, &uri, &headers)
            .unwrap_err()
            .reason(),
        "host_mismatch"
    );
    headers.insert(http::header::HOST, "payments".parse().unwrap());
    headers.append(http::header::HOST, "payments".parse().unwrap());
    assert_eq!(
        p.route_request(8080, &post, &uri, &headers)
            .unwrap_err()
            .reason(),
        "duplicate_host"
    );
    let uri = http::Uri::from_static("http://u@payments/refunds/1");
    assert!(p
        .route_request(8080, &post, &uri, &http::HeaderMap::new())
        .is_err());
}

#[test]
fn route_from_narrows_the_port() {
    let p = policy();
    let headers = http::HeaderMap::new();
    let authorize = |peer: &SpiffeId, method: http::Method, target: &'static str| {
        p.authorize_request(
            peer,
            8080,
            &method,
            &http::Uri::from_static(target),
            &headers,
        )
        .unwrap()
    };
    let ops = id("spiffe://cluster.local/ns/ops/sa/oncall");
    let m = authorize(&ops, http::Method::POST, "/refunds/1");
    assert_eq!(
        (m.decision.allow, &*m.decision.rule, m.decision.reason),
        (false, "refunds", "route_not_allowed")
    );
    let m = authorize(&ops, http::Method::GET, "/healthz");
    assert!(m.decision.allow);
    assert_eq!(m.route.unwrap().name.as_ref(), "health");
    let fe = id("spiffe://cluster.local/ns/web/sa/frontend");
    let m = authorize(&fe, http::Method::POST, "/refunds/1");
    assert!(m.decision.allow);
    assert_eq!(m.route.unwrap().name.as_ref(), "refunds");
    // Listed in the route but not on the port: the port decides first.
    let stranger = id("spiffe://cluster.local/ns/x/sa/y");
    let m = authorize(&stranger, http::Method::GET, "/other");
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
