//! Each lint code on a policy made to trip it, and silence on clean ones.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use super::super::Policy;
use super::*;

const PROVIDERS: &str = r#"
trustDomain: cluster.local
stepUp:
  providers:
    idp:
      issuer: https://idp.example.com
      jwks: {file: /nonexistent/jwks.json}
      audiences: [a]
      algorithms: [ES256]
"#;

fn findings(body: &str) -> Vec<(String, String)> {
    let p = Policy::from_yaml(&format!("{PROVIDERS}{body}")).unwrap();
    lint(&p)
        .into_iter()
        .map(|f| (f.code.to_owned(), f.field))
        .collect()
}

fn pairs(want: &[(&str, &str)]) -> Vec<(String, String)> {
    want.iter()
        .map(|(c, f)| ((*c).to_owned(), (*f).to_owned()))
        .collect()
}

#[test]
fn inbound_risks_name_their_fields() {
    let got = findings(
        r#"
mode: audit
inbound:
  default: allow-authenticated
  ports:
    - port: 8080
      protocol: http
      allow:
        - from: [spiffe://cluster.local/ns/web/sa/a, spiffe://cluster.local/*]
      routes:
        - {name: refunds, match: {methods: [POST], path: /refunds/*}, stepUp: {provider: idp, bindToPeer: azp}}
        - {name: wipe, match: {methods: [delete], path: /admin/wipe}}
        - {name: one-refund, match: {methods: [POST], path: /refunds/7}, stepUp: {provider: idp}}
        - {name: reads, match: {methods: [GET], path: /refunds/*}, from: ["spiffe://cluster.local/ns/*"]}
        - {name: heads, match: {methods: [HEAD], path: /refunds/x}}
    - port: 9000
      allow: [{from: ["spiffe://cluster.local/ns/ops/*"]}]
      protocol: http
      routes:
        - {name: posts, match: {methods: [POST], path: /x}}
"#,
    );
    assert_eq!(
        got,
        pairs(&[
            ("SM003", "mode"),
            ("SM001", "inbound.default"),
            ("SM004", "inbound.ports[0].allow[0].from[1]"),
            ("SM002", "inbound.ports[0].routes[1].match.methods"),
            ("SM009", "inbound.ports[0].routes[2].stepUp.bindToPeer"),
            ("SM005", "inbound.ports[0].routes[2]"),
            ("SM004", "inbound.ports[0].routes[3].from[0]"),
            ("SM005", "inbound.ports[0].routes[4]"),
        ])
    );
}

#[test]
fn outbound_and_kubernetes_risks_name_their_fields() {
    let got = findings(
        r#"
outbound:
  default: passthrough
  rules:
    - {to: {cidrs: [10.0.0.0/8]}, action: passthrough}
    - {to: {cidrs: ["0.0.0.0/0"], ports: [443]}, action: passthrough}
    - {to: {ports: [25]}, action: passthrough}
    - {to: {cidrs: ["::/0"]}, action: deny}
kubernetes:
  authentication: {provider: idp}
  rules:
    - {name: tunnels-free, verbs: [connect], resources: [pods/exec]}
    - {name: reads-free, verbs: [get], resources: ["*"]}
    - {name: list-free, verbs: [list], resources: [configmaps], namespaces: ["dev-*"]}
    - {name: secrets, verbs: [get, list], resources: [secrets], stepUp: {provider: idp}}
    - {name: prod-lists, verbs: [list], resources: ["*"], namespaces: ["prod-*"], stepUp: {provider: idp}}
    - {name: all-free, verbs: ["*"], resources: [pods]}
"#,
    );
    assert_eq!(
        got,
        pairs(&[
            ("SM006", "outbound.rules[1].to.cidrs"),
            ("SM006", "outbound.rules[2].to.cidrs"),
            ("SM006", "outbound.default"),
            ("SM007", "kubernetes.rules[0].verbs"),
            ("SM008", "kubernetes.rules[1]"),
            ("SM007", "kubernetes.rules[5].verbs"),
        ])
    );
}

#[test]
fn clean_policies_are_quiet() {
    assert_eq!(
        findings(
            r#"
inbound:
  ports:
    - port: 8080
      protocol: http
      allow: [{from: [spiffe://cluster.local/ns/web/sa/a, "spiffe://cluster.local/ns/ops/*"]}]
      routes:
        - {name: one, match: {methods: [DELETE], path: /refunds/7}, stepUp: {provider: idp, bindToPeer: cnf}}
        - {name: refunds, match: {methods: [POST, DELETE], path: /refunds/*}, stepUp: {provider: idp, bindToPeer: azp}}
        - {name: reads, match: {methods: [GET], path: /refunds/*}}
outbound:
  rules:
    - {to: {cidrs: [10.96.0.0/12], ports: [53]}, action: passthrough}
kubernetes:
  authentication: {provider: idp}
  rules:
    - {name: exec, verbs: [connect], resources: [pods/exec], stepUp: {provider: idp}}
    - {name: reads, verbs: [get, list, watch], resources: ["*"], namespaces: ["dev-*"]}
    - {name: prod, verbs: [get], resources: ["*"], namespaces: ["prod-*"], stepUp: {provider: idp}}
"#
        ),
        []
    );
    assert_eq!(CODES.len(), 9);
}
