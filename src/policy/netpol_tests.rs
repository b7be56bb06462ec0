//! The compiler on sets of policies: ingress from identities, egress
//! derived from callees, outbound rules as IP blocks, the mesh's needs.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use super::*;

const P: &str = r#"
trustDomain: cluster.local
inbound:
  default: deny
  ports:
    - port: 8080
      protocol: http
      allow:
        - from: [spiffe://cluster.local/ns/web/sa/frontend, spiffe://cluster.local/ns/ops/*]
    - port: 5432
      allow:
        - from: [spiffe://other.td/ns/a/sa/b]
    - port: 9000
      allow: []
"#;

fn docs(yaml: &str) -> Vec<serde_norway::Value> {
    yaml.split("---\n")
        .filter(|d| d.contains("kind"))
        .map(|d| serde_norway::from_str(d).unwrap())
        .collect()
}

fn named<'a>(d: &'a [serde_norway::Value], name: &str) -> Option<&'a serde_norway::Value> {
    d.iter().find(|o| o["metadata"]["name"] == name)
}

#[test]
fn identities_become_label_selectors() {
    let p = Policy::from_yaml(P).unwrap();
    let out = render(&p, "payments", "app=api").unwrap();
    let d = docs(&out);
    assert_eq!(d[0]["metadata"]["name"], "stepmesh-api-default-deny");
    assert_eq!(d[0]["spec"]["ingress"].as_sequence().unwrap().len(), 0);
    assert_eq!(d[0]["spec"]["egress"].as_sequence().unwrap().len(), 0);
    assert_eq!(d[0]["spec"]["policyTypes"][1], "Egress");
    assert_eq!(d[0]["spec"]["podSelector"]["matchLabels"]["app"], "api");
    let from = &d[1]["spec"]["ingress"][0]["from"];
    assert_eq!(from[0]["namespaceSelector"]["matchLabels"][NS_LABEL], "web");
    assert_eq!(from[0]["podSelector"]["matchLabels"][SA_LABEL], "frontend");
    assert_eq!(from[1]["namespaceSelector"]["matchLabels"][NS_LABEL], "ops");
    assert!(from[1].get("podSelector").is_none());
    assert_eq!(d[1]["spec"]["ingress"][0]["ports"][0]["port"], 8080);
    // Another trust domain: open port, explained.
    assert!(d[2]["spec"]["ingress"][0].get("from").is_none());
    assert!(
        out.contains("# Open to all sources: spiffe://other.td/ns/a/sa/b: another trust domain.")
    );
    assert!(
        out.contains("No identity may connect"),
        "port 9000 gets no allow"
    );
}

#[test]
fn a_peer_whose_names_are_no_label_values_is_not_selected() {
    // Valid SPIFFE IDs, but `-x` and a 64-character name are no label
    // values: the API server would refuse the object (and the
    // controller's round with it).
    let long = "s".repeat(64);
    let p = Policy::from_yaml(&format!(
        "trustDomain: cluster.local\ninbound:\n  default: deny\n  ports:\n    - port: 8080\n      allow:\n        - from: [spiffe://cluster.local/ns/-x/sa/y, spiffe://cluster.local/ns/ok/sa/{long}, spiffe://cluster.local/ns/-x/*]\n"
    ))
    .unwrap();
    let out = render(&p, "payments", "app=api").unwrap();
    let d = docs(&out);
    assert!(d[1]["spec"]["ingress"][0].get("from").is_none(), "{out}");
    assert!(
        out.contains("spiffe://cluster.local/ns/-x/sa/y: its namespace or service account is not a label value"),
        "{out}"
    );
}

#[test]
fn bad_arguments() {
    let p = Policy::from_yaml(P).unwrap();
    assert!(render(&p, "Payments", "app=api").is_err());
    assert!(render(&p, "payments", "app").is_err());
    assert!(render(&p, "payments", "=x").is_err());
    // A set needs every workload named, once.
    let e = Input::new("p.yaml".into(), &p, None).unwrap_err();
    assert!(e.to_string().starts_with("p.yaml: no workload"), "{e}");
    let w = Policy::from_yaml(&format!(
        "{P}workload: {{namespace: a, serviceAccount: x}}\n"
    ))
    .unwrap();
    assert!(matches!(
        Input::new("w".into(), &w, Some(("b", "stepmesh.io/service-account=x"))),
        Err(NetpolError::Conflict(_))
    ));
    let same = [
        Input::new("one".into(), &w, None).unwrap(),
        Input::new("two".into(), &w, None).unwrap(),
    ];
    let e = compile(&same, &Options::default()).unwrap_err().to_string();
    assert_eq!(
        e,
        "one and two both protect a/stepmesh-x: one policy per workload"
    );
}

fn policy(workload: &str, body: &str) -> Policy {
    Policy::from_yaml(&format!(
        "trustDomain: cluster.local\nworkload: {workload}\n{body}"
    ))
    .unwrap()
}

fn set(policies: &[(&str, &Policy)], opts: &Options) -> Vec<serde_norway::Value> {
    let inputs: Vec<Input<'_>> = policies
        .iter()
        .map(|(name, p)| Input::new((*name).into(), p, None).unwrap())
        .collect();
    docs(&to_yaml(&compile(&inputs, opts).unwrap()).unwrap())
}

const PAYMENTS: &str = r#"
inbound:
  ports:
    - port: 8080
      allow:
        - name: web
          from: [spiffe://cluster.local/ns/web/sa/frontend]
    - port: 9090
      allow:
        - from: [spiffe://cluster.local/ns/ops/*]
"#;

#[test]
fn callers_get_egress_to_the_callees_that_admit_them() {
    let payments = policy("{namespace: payments, serviceAccount: api}", PAYMENTS);
    let frontend = policy("{namespace: web, serviceAccount: frontend}", "");
    let ops = policy("{namespace: ops, selector: {app: tools}}", "");
    let batch = policy("{namespace: batch, serviceAccount: job}", "");
    let d = set(
        &[
            ("payments", &payments),
            ("frontend", &frontend),
            ("ops", &ops),
            ("batch", &batch),
        ],
        &Options::default(),
    );
    let calls = named(&d, "stepmesh-frontend-egress-calls").unwrap();
    let rule = &calls["spec"]["egress"][0];
    assert_eq!(calls["metadata"]["namespace"], "web");
    assert_eq!(calls["spec"]["policyTypes"][0], "Egress");
    assert_eq!(
        rule["to"][0]["namespaceSelector"]["matchLabels"][NS_LABEL],
        "payments"
    );
    assert_eq!(rule["to"][0]["podSelector"]["matchLabels"][SA_LABEL], "api");
    assert_eq!(rule["ports"].as_sequence().unwrap().len(), 1);
    assert_eq!(rule["ports"][0]["port"], 8080);
    // ops has no service account; `ns/ops/*` admits every identity of ops.
    let ops_calls = named(&d, "stepmesh-tools-egress-calls").unwrap();
    assert_eq!(ops_calls["spec"]["egress"][0]["ports"][0]["port"], 9090);
    // Nobody admits batch; payments calls nobody.
    assert!(named(&d, "stepmesh-job-egress-calls").is_none());
    assert!(named(&d, "stepmesh-api-egress-calls").is_none());
}

#[test]
fn allow_authenticated_callees_take_every_port_of_their_trust_domain() {
    let open = policy(
        "{namespace: shared, serviceAccount: cache}",
        "inbound: {default: allow-authenticated}\n",
    );
    let caller = policy("{namespace: web, serviceAccount: frontend}", "");
    let d = set(&[("open", &open), ("caller", &caller)], &Options::default());
    let rule = &named(&d, "stepmesh-frontend-egress-calls").unwrap()["spec"]["egress"][0];
    assert_eq!(
        rule["to"][0]["podSelector"]["matchLabels"][SA_LABEL],
        "cache"
    );
    assert!(rule.get("ports").is_none(), "{rule:?}");
}

#[test]
fn outbound_rules_become_ip_blocks_with_denies_as_except() {
    let p = policy(
        "{namespace: web, serviceAccount: frontend}",
        r#"
outbound:
  rules:
    - {name: no-meta, to: {cidrs: [169.254.169.254/32]}, action: deny}
    - {name: no-db-port, to: {cidrs: [10.1.0.0/16], ports: [5432]}, action: deny}
    - {name: internet, to: {cidrs: [0.0.0.0/0], ports: [443]}, action: passthrough}
    - {name: lan, to: {cidrs: [10.0.0.0/8]}, action: passthrough}
    - {name: gone, to: {cidrs: [169.254.0.0/16]}, action: deny}
    - {name: late, to: {cidrs: [169.254.169.254/32]}, action: passthrough}
    - {name: peer-mesh, to: {cidrs: [192.168.0.0/24]}, action: mtls}
"#,
    );
    let d = set(&[("p", &p)], &Options::default());
    let egress = &named(&d, "stepmesh-frontend-egress-outbound").unwrap()["spec"]["egress"];
    let internet = &egress[0];
    assert_eq!(internet["to"][0]["ipBlock"]["cidr"], "0.0.0.0/0");
    assert_eq!(
        internet["to"][0]["ipBlock"]["except"][0],
        "169.254.169.254/32"
    );
    assert_eq!(
        internet["to"][0]["ipBlock"]["except"]
            .as_sequence()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(internet["ports"][0]["port"], 443);
    // 5432 is denied on 10.1/16 only: not expressible on an any-port rule.
    let lan = &egress[1];
    assert_eq!(lan["to"][0]["ipBlock"]["cidr"], "10.0.0.0/8");
    assert!(lan["to"][0]["ipBlock"].get("except").is_none());
    assert!(lan.get("ports").is_none());
    // `late` is wholly inside `gone` and `no-meta`: nothing left to allow.
    assert_eq!(egress[2]["to"][0]["ipBlock"]["cidr"], "192.168.0.0/24");
    assert_eq!(egress.as_sequence().unwrap().len(), 3);
    // The default mtls allows no address block of its own.
    let none = policy("{namespace: web, serviceAccount: x}", "");
    assert!(named(
        &set(&[("n", &none)], &Options::default()),
        "stepmesh-x-egress-outbound"
    )
    .is_none());
}

#[test]
fn the_mesh_keeps_dns_the_ca_probes_and_the_api_server_when_asked() {
    let p = policy("{namespace: web, serviceAccount: ctl, apiServer: true}", "");
    let opts = Options {
        api_server: vec!["10.0.0.1/32".parse().unwrap()],
        probe_sources: vec!["192.168.0.0/16".parse().unwrap()],
        ..Options::default()
    };
    let d = set(&[("p", &p)], &opts);
    let mesh = named(&d, "stepmesh-ctl-mesh").unwrap();
    let probe = &mesh["spec"]["ingress"][0];
    assert_eq!(probe["ports"][0]["port"], ADMIN_PORT);
    assert_eq!(probe["from"][0]["ipBlock"]["cidr"], "192.168.0.0/16");
    let e = &mesh["spec"]["egress"];
    assert_eq!(
        e[0]["to"][0]["namespaceSelector"]["matchLabels"][NS_LABEL],
        "kube-system"
    );
    assert_eq!(
        e[0]["to"][0]["podSelector"]["matchLabels"]["k8s-app"],
        "kube-dns"
    );
    assert_eq!(e[0]["ports"][0]["protocol"], "UDP");
    assert_eq!(e[0]["ports"][1]["protocol"], "TCP");
    assert_eq!(
        e[1]["to"][0]["namespaceSelector"]["matchLabels"][NS_LABEL],
        "stepmesh-system"
    );
    assert_eq!(e[1]["ports"][0]["port"], CA_PORT);
    assert_eq!(e[2]["to"][0]["ipBlock"]["cidr"], "10.0.0.1/32");
    assert_eq!(e[2]["ports"][1]["port"], 6443);
    // Without apiServer: no third rule.
    let q = policy("{namespace: web, serviceAccount: plain}", "");
    let d = set(&[("q", &q)], &opts);
    assert_eq!(
        named(&d, "stepmesh-plain-mesh").unwrap()["spec"]["egress"]
            .as_sequence()
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn egress_open_writes_no_egress_at_all() {
    let payments = policy("{namespace: payments, serviceAccount: api}", PAYMENTS);
    let frontend = policy(
        "{namespace: web, serviceAccount: frontend}",
        "outbound: {rules: [{to: {ports: [443]}, action: passthrough}]}\n",
    );
    let opts = Options {
        egress: EgressMode::Open,
        ..Options::default()
    };
    let d = set(&[("payments", &payments), ("frontend", &frontend)], &opts);
    assert!(!d.is_empty());
    for o in &d {
        let types = o["spec"]["policyTypes"].as_sequence().unwrap();
        assert_eq!(types.len(), 1, "{o:?}");
        assert_eq!(types[0], "Ingress");
        assert!(o["spec"].get("egress").is_none());
    }
    assert!(named(&d, "stepmesh-frontend-mesh").is_some());
}
