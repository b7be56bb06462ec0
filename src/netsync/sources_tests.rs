use serde_json::json;

use super::*;

const PAYMENTS: &str = "trustDomain: cluster.local\nworkload: {namespace: a, serviceAccount: api}\ninbound:\n  ports:\n    - port: 8080\n      allow: [{from: [spiffe://cluster.local/ns/b/sa/frontend]}]\n";
const FRONTEND: &str =
    "trustDomain: cluster.local\nworkload: {namespace: b, serviceAccount: frontend}\n";
const BROKEN: &str = "trustDomain: cluster.local\ninbound: {ports: [{port: 0}]}\n";

fn cm(ns: &str, name: &str, version: &str, policy: &str) -> Value {
    json!({"metadata": {"namespace": ns, "name": name, "uid": "u", "resourceVersion": version},
           "data": {"policy.yaml": policy}})
}

fn active() -> BTreeSet<String> {
    ["a", "b"].iter().map(|s| (*s).to_owned()).collect()
}

fn names(c: &Collected) -> Vec<String> {
    c.policies
        .iter()
        .map(|(s, p)| format!("{}/{}@{}", s.namespace, s.name, &p.digest()[..8]))
        .collect()
}

#[test]
fn a_broken_policy_is_replaced_by_its_last_valid_version() {
    let mut last = LastGood::default();
    let good = last.collect(
        &[
            cm("a", "payments", "1", PAYMENTS),
            cm("b", "frontend", "1", FRONTEND),
        ],
        &active(),
        "policy.yaml",
    );
    assert!(good.refused.is_empty());
    let broken = last.collect(
        &[
            cm("a", "payments", "2", BROKEN),
            cm("b", "frontend", "1", FRONTEND),
        ],
        &active(),
        "policy.yaml",
    );
    assert_eq!(
        names(&broken),
        names(&good),
        "the last valid payments stands"
    );
    assert_eq!(broken.refused.len(), 1);
    assert!(broken.refused[0].last_good);
    assert!(
        broken.refused[0].why.contains("inbound.ports[0].port"),
        "{}",
        broken.refused[0].why
    );
    assert_eq!(broken.blocking().count(), 0);
}

#[test]
fn a_policy_first_seen_broken_blocks_the_round() {
    let mut last = LastGood::default();
    let c = last.collect(
        &[
            cm("a", "payments", "2", BROKEN),
            cm("b", "frontend", "1", FRONTEND),
        ],
        &active(),
        "policy.yaml",
    );
    let blocking: Vec<_> = c.blocking().map(|r| r.source.name.as_str()).collect();
    assert_eq!(blocking, ["payments"]);
    // A ConfigMap deleted and made again broken is first seen broken too.
    last.collect(
        &[cm("a", "payments", "3", PAYMENTS)],
        &active(),
        "policy.yaml",
    );
    last.collect(&[], &active(), "policy.yaml");
    let again = last.collect(
        &[cm("a", "payments", "5", BROKEN)],
        &active(),
        "policy.yaml",
    );
    assert_eq!(
        again.blocking().count(),
        1,
        "a deleted ConfigMap's policy is forgotten"
    );
}

#[test]
fn namespace_and_duplicate_checks_refuse_and_inactive_namespaces_are_skipped() {
    let mut last = LastGood::default();
    let elsewhere = PAYMENTS.replace("namespace: a", "namespace: b");
    // Other pods, but NetworkPolicies of the same names (`stepmesh-api-*`):
    // compiled together they would fail every namespace's round.
    let same_names = PAYMENTS.replace("serviceAccount: api", "selector: {app: API}");
    let c = last.collect(
        &[
            cm("a", "payments", "1", PAYMENTS),
            cm("a", "twin", "1", PAYMENTS),
            cm("a", "same-names", "1", &same_names),
            cm("a", "other-ns", "1", &elsewhere),
            cm("gone", "x", "1", PAYMENTS),
        ],
        &active(),
        "policy.yaml",
    );
    let why: Vec<_> = c.refused.iter().map(|r| r.why.as_str()).collect();
    assert_eq!(why.len(), 3, "{why:?}");
    for twin in &why[..2] {
        assert!(
            twin.contains("named as ConfigMap payments's (stepmesh-api-*)"),
            "{why:?}"
        );
    }
    assert!(why[2].starts_with("workload.namespace"), "{why:?}");
    assert_eq!(names(&c).len(), 1);
}

#[test]
fn a_long_configmap_name_is_a_valid_label_value_of_its_own() {
    let source = |name: &str| Source {
        namespace: "a".into(),
        name: name.into(),
        uid: String::new(),
        version: String::new(),
    };
    assert_eq!(source("payments").label_value(), "payments");
    let long = format!("{}-policy", "x".repeat(40)); // 47: still itself
    assert_eq!(source(&long).label_value(), long.as_str());
    let a = format!("{}.a", "p-".repeat(60));
    let b = format!("{}.b", "p-".repeat(60));
    for name in [&a, &b] {
        let v = source(name).label_value().into_owned();
        assert!(v.len() <= 63, "{v}");
        let ok_end = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
        assert!(ok_end(v.chars().next()) && ok_end(v.chars().last()), "{v}");
        assert!(!v.contains("--"), "the cut's trailing '-' dropped: {v}");
    }
    assert_ne!(source(&a).label_value(), source(&b).label_value());
}
