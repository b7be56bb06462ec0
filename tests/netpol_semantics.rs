//! The compiled NetworkPolicies mean what the identity policies mean. A
//! fixture cluster (five workloads in four namespaces, plus DNS, the CA, a
//! node and the internet) and an evaluator of NetworkPolicy semantics as
//! the Kubernetes docs state them: a pod is isolated for a direction when
//! some policy selecting it has that policy type; then a flow is allowed
//! when any rule of any such policy admits it (additive); peers are pod and
//! namespace selectors (ANDed in one entry) or ipBlocks minus `except`;
//! a flow needs the source's egress and the destination's ingress. For
//! every (source, destination, port) the generated objects admit the flow
//! exactly when the destination's policy authorizes the source's identity;
//! DNS, the CA and probes are always admitted.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde_json::Value;
use stepmesh::policy::netpol::{compile, Input, Options};
use stepmesh::policy::{Cidr, Policy, SpiffeId};

struct Pod {
    ns: &'static str,
    labels: BTreeMap<String, String>,
    ip: IpAddr,
}

fn pod(ns: &'static str, labels: &[(&str, &str)], ip: &str) -> Pod {
    Pod {
        ns,
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect(),
        ip: ip.parse().unwrap(),
    }
}

fn selects(selector: &Value, labels: &BTreeMap<String, String>) -> bool {
    selector["matchLabels"].as_object().is_none_or(|m| {
        m.iter()
            .all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str())
    })
}

/// Whether one `from`/`to` entry admits `peer` (`None`: outside the cluster
/// at `ip`).
fn peer_admits(entry: &Value, peer: Option<&Pod>, ip: IpAddr) -> bool {
    if let Some(block) = entry.get("ipBlock") {
        let inside = |c: &Value| c.as_str().unwrap().parse::<Cidr>().unwrap().contains(ip);
        return inside(&block["cidr"])
            && !block["except"]
                .as_array()
                .is_some_and(|e| e.iter().any(inside));
    }
    let Some(peer) = peer else { return false };
    let ns_labels =
        BTreeMap::from([("kubernetes.io/metadata.name".to_owned(), peer.ns.to_owned())]);
    let ns_ok = entry
        .get("namespaceSelector")
        .is_none_or(|s| selects(s, &ns_labels));
    let pod_ok = entry
        .get("podSelector")
        .is_none_or(|s| selects(s, &peer.labels));
    // Without namespaceSelector a podSelector means the policy's namespace.
    let same_ns = entry.get("namespaceSelector").is_some() || entry["__ns"] == peer.ns;
    ns_ok && pod_ok && same_ns
}

fn port_admits(rule: &Value, port: u16, proto: &str) -> bool {
    rule["ports"].as_array().is_none_or(|ps| {
        ps.iter()
            .any(|p| p["port"] == port && p["protocol"].as_str().unwrap_or("TCP") == proto)
    })
}

/// Whether `policies` let `subject` (the isolated side) talk to `other`.
fn direction(
    policies: &[Value],
    subject: &Pod,
    other: Option<&Pod>,
    other_ip: IpAddr,
    port: u16,
    proto: &str,
    kind: &str,
) -> bool {
    let (field, peers) = if kind == "Egress" {
        ("egress", "to")
    } else {
        ("ingress", "from")
    };
    let mine: Vec<&Value> = policies
        .iter()
        .filter(|p| {
            p["metadata"]["namespace"] == subject.ns
                && selects(&p["spec"]["podSelector"], &subject.labels)
        })
        .filter(|p| {
            p["spec"]["policyTypes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t == kind)
        })
        .collect();
    if mine.is_empty() {
        return true;
    }
    mine.iter().any(|p| {
        p["spec"][field]
            .as_array()
            .into_iter()
            .flatten()
            .any(|rule| {
                let peer_ok = rule[peers].as_array().is_none_or(|entries| {
                    entries.iter().any(|e| {
                        let mut e = e.clone();
                        e["__ns"] = p["metadata"]["namespace"].clone();
                        peer_admits(&e, other, other_ip)
                    })
                });
                peer_ok && port_admits(rule, port, proto)
            })
    })
}

fn flow(
    policies: &[Value],
    src: Option<&Pod>,
    src_ip: IpAddr,
    dst: Option<&Pod>,
    dst_ip: IpAddr,
    port: u16,
    proto: &str,
) -> bool {
    src.is_none_or(|s| direction(policies, s, dst, dst_ip, port, proto, "Egress"))
        && dst.is_none_or(|d| direction(policies, d, src, src_ip, port, proto, "Ingress"))
}

const SA: &str = "stepmesh.io/service-account";

/// (namespace, service account, policy body)
const WORKLOADS: [(&str, &str, &str); 5] = [
    ("payments", "api", "inbound:\n  ports:\n    - port: 8080\n      allow: [{from: [spiffe://cluster.local/ns/web/sa/frontend]}]\n    - port: 9090\n      allow: [{from: [\"spiffe://cluster.local/ns/ops/*\"]}]\n"),
    ("web", "frontend", "outbound:\n  rules:\n    - {to: {cidrs: [169.254.169.254/32]}, action: deny}\n    - {to: {cidrs: [0.0.0.0/0], ports: [443]}, action: passthrough}\n"),
    ("ops", "tools", ""),
    ("shared", "cache", "inbound: {default: allow-authenticated}\n"),
    ("payments", "ledger", "inbound:\n  ports:\n    - port: 5432\n      allow: [{from: [spiffe://cluster.local/ns/payments/sa/api, spiffe://cluster.local/ns/payments/sa/ledger]}]\n"),
];

#[test]
fn every_flow_is_admitted_exactly_when_the_identity_policy_allows_it() {
    let policies: Vec<Policy> = WORKLOADS
        .iter()
        .map(|(ns, sa, body)| {
            Policy::from_yaml(&format!("trustDomain: cluster.local\nworkload: {{namespace: {ns}, serviceAccount: {sa}}}\n{body}")).unwrap()
        })
        .collect();
    let inputs: Vec<Input<'_>> = policies
        .iter()
        .enumerate()
        .map(|(i, p)| Input::new(format!("w{i}"), p, None).unwrap())
        .collect();
    let objects: Vec<Value> = compile(&inputs, &Options::default())
        .unwrap()
        .into_iter()
        .map(|o| o.value)
        .filter(|v| !v.is_null())
        .collect();
    let pods: Vec<Pod> = WORKLOADS
        .iter()
        .enumerate()
        .map(|(i, (ns, sa, _))| {
            pod(
                ns,
                &[(SA, sa), ("app", "x")],
                &format!("10.244.0.{}", i + 10),
            )
        })
        .collect();
    let dns = pod("kube-system", &[("k8s-app", "kube-dns")], "10.244.9.1");
    let ca = pod(
        "stepmesh-system",
        &[("app.kubernetes.io/name", "stepmesh-ca")],
        "10.244.9.2",
    );
    let node: IpAddr = "192.168.1.5".parse().unwrap();

    let mut checked = 0;
    for (s, src) in pods.iter().enumerate() {
        let id = SpiffeId::for_service_account(policies[s].trust_domain(), src.ns, WORKLOADS[s].1)
            .unwrap();
        for (d, dst) in pods.iter().enumerate() {
            for port in [8080, 9090, 5432, 6379] {
                let identity = policies[d].authorize(&id, port).allow;
                let network = flow(&objects, Some(src), src.ip, Some(dst), dst.ip, port, "TCP");
                assert_eq!(
                    network, identity,
                    "{}/{} → {}/{} :{port}",
                    src.ns, WORKLOADS[s].1, dst.ns, WORKLOADS[d].1
                );
                checked += 1;
            }
        }
        // The mesh's needs, always.
        for proto in ["UDP", "TCP"] {
            assert!(
                flow(&objects, Some(src), src.ip, Some(&dns), dns.ip, 53, proto),
                "{} DNS {proto}",
                src.ns
            );
        }
        assert!(
            flow(&objects, Some(src), src.ip, Some(&ca), ca.ip, 15012, "TCP"),
            "{} CA",
            src.ns
        );
        assert!(
            flow(&objects, None, node, Some(src), src.ip, 15020, "TCP"),
            "{} probes",
            src.ns
        );
        assert!(
            !flow(&objects, None, node, Some(src), src.ip, 8080, "TCP"),
            "{} node on 8080",
            src.ns
        );
        assert!(
            !flow(&objects, Some(src), src.ip, Some(&ca), ca.ip, 15013, "TCP"),
            "{} CA other port",
            src.ns
        );
    }
    assert_eq!(checked, 100);
    // The outbound rules: frontend reaches the internet on 443 but not the
    // metadata address; nobody else reaches it.
    let internet: IpAddr = "1.1.1.1".parse().unwrap();
    let metadata: IpAddr = "169.254.169.254".parse().unwrap();
    let frontend = &pods[1];
    assert!(flow(
        &objects,
        Some(frontend),
        frontend.ip,
        None,
        internet,
        443,
        "TCP"
    ));
    assert!(!flow(
        &objects,
        Some(frontend),
        frontend.ip,
        None,
        internet,
        80,
        "TCP"
    ));
    assert!(!flow(
        &objects,
        Some(frontend),
        frontend.ip,
        None,
        metadata,
        443,
        "TCP"
    ));
    for (i, p) in pods.iter().enumerate().filter(|(i, _)| *i != 1) {
        assert!(
            !flow(&objects, Some(p), p.ip, None, internet, 443, "TCP"),
            "workload {i} reached the internet"
        );
    }
}
