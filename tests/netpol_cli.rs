//! `stepmesh policy netpol F...` on a set of policies: the callers' egress
//! derived from the callees' inbound rules, the outbound rules as egress,
//! the mesh's needs, `--egress open`; the output passes the Kubernetes
//! schemas (kubernetes-validate) and a real API server's dry-run.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::envtest::Envtest;
use serde_json::Value;

fn stepmesh(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stepmesh"))
        .args(args)
        .output()
        .unwrap()
}

/// Three workloads in two namespaces: payments admits web/frontend on 8080
/// and all of ops on 9090; frontend reaches the internet on 443 except the
/// metadata address; ops-tools calls the API server.
const FILES: [(&str, &str); 3] = [
    (
        "payments.yaml",
        r#"trustDomain: cluster.local
workload: {namespace: payments, serviceAccount: api}
inbound:
  ports:
    - port: 8080
      allow: [{from: [spiffe://cluster.local/ns/web/sa/frontend]}]
    - port: 9090
      allow: [{from: [spiffe://cluster.local/ns/ops/*]}]
"#,
    ),
    (
        "frontend.yaml",
        r#"trustDomain: cluster.local
workload: {namespace: web, serviceAccount: frontend}
outbound:
  rules:
    - {name: no-metadata, to: {cidrs: [169.254.169.254/32]}, action: deny}
    - {name: internet, to: {cidrs: [0.0.0.0/0], ports: [443]}, action: passthrough}
"#,
    ),
    (
        "ops.yaml",
        r#"trustDomain: cluster.local
workload: {namespace: ops, selector: {app: tools}, apiServer: true}
"#,
    ),
];

fn write_set(dir: &Path) -> Vec<String> {
    FILES
        .iter()
        .map(|(name, text)| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path.to_str().unwrap().to_owned()
        })
        .collect()
}

fn objects(yaml: &str) -> Vec<Value> {
    yaml.split("---\n")
        .filter(|d| d.contains("kind:"))
        .map(|d| serde_norway::from_str(d).unwrap())
        .collect()
}

fn named<'a>(objs: &'a [Value], name: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {objs:#?}"))
}

fn netpol(files: &[String], extra: &[&str]) -> String {
    let mut args = vec!["policy", "netpol"];
    args.extend(files.iter().map(String::as_str));
    args.extend(extra);
    let o = stepmesh(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn a_set_derives_egress_and_passes_the_schemas_and_the_api_server() {
    let dir = tempfile::tempdir().unwrap();
    let files = write_set(dir.path());
    let out = netpol(&files, &["--api-server", "10.0.0.1/32"]);
    let objs = objects(&out);

    // frontend → payments:8080, derived from payments' inbound rule.
    let calls = named(&objs, "stepmesh-frontend-egress-calls");
    assert_eq!(calls["metadata"]["namespace"], "web");
    let to = &calls["spec"]["egress"][0];
    assert_eq!(
        to["to"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "payments"
    );
    assert_eq!(
        to["to"][0]["podSelector"]["matchLabels"]["stepmesh.io/service-account"],
        "api"
    );
    assert_eq!(
        to["ports"],
        serde_json::json!([{"port": 8080, "protocol": "TCP"}])
    );
    // ops-tools (no service account) → payments:9090 through `ns/ops/*`.
    let ops = named(&objs, "stepmesh-tools-egress-calls");
    assert_eq!(ops["spec"]["egress"][0]["ports"][0]["port"], 9090);
    // Outbound: 443 to the internet but the metadata address.
    let outbound = &named(&objs, "stepmesh-frontend-egress-outbound")["spec"]["egress"][0];
    assert_eq!(outbound["to"][0]["ipBlock"]["cidr"], "0.0.0.0/0");
    assert_eq!(
        outbound["to"][0]["ipBlock"]["except"][0],
        "169.254.169.254/32"
    );
    assert_eq!(outbound["ports"][0]["port"], 443);
    // Every workload: default deny both ways, DNS, the CA, probes.
    for base in ["stepmesh-api", "stepmesh-frontend", "stepmesh-tools"] {
        let deny = named(&objs, &format!("{base}-default-deny"));
        assert_eq!(
            deny["spec"]["policyTypes"],
            serde_json::json!(["Ingress", "Egress"])
        );
        let mesh = &named(&objs, &format!("{base}-mesh"))["spec"];
        assert_eq!(mesh["ingress"][0]["ports"][0]["port"], 15020);
        assert_eq!(
            mesh["egress"][0]["to"][0]["podSelector"]["matchLabels"]["k8s-app"],
            "kube-dns"
        );
        assert_eq!(mesh["egress"][1]["ports"][0]["port"], 15012);
        let api = mesh["egress"].as_array().unwrap().len() == 3;
        assert_eq!(api, base == "stepmesh-tools", "{base}: API server egress");
    }
    assert_eq!(objs.len(), 11, "{out}");

    // The Kubernetes schemas.
    let file = dir.path().join("netpol.yaml");
    std::fs::write(&file, &out).unwrap();
    let o = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict", "--kubernetes-version", "1.33.0"])
        .arg(&file)
        .output()
        .expect("python3 with kubernetes-validate is needed (pip install -r tests/python/requirements.txt)");
    let report = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        report.matches("passed for resource networkpolicy/").count(),
        11,
        "{report}"
    );

    // A real API server's dry-run (skipped without KUBEBUILDER_ASSETS).
    let Some(k8s) = Envtest::shared() else { return };
    for ns in ["payments", "web", "ops"] {
        k8s.create_namespace(ns);
    }
    let o = k8s.kubectl_with_stdin(&["apply", "--dry-run=server", "-f", "-"], out.as_bytes());
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(stdout.matches("(server dry run)").count(), 11, "{stdout}");
}

#[test]
fn egress_open_leaves_egress_alone() {
    let dir = tempfile::tempdir().unwrap();
    let files = write_set(dir.path());
    let objs = objects(&netpol(&files, &["--egress", "open"]));
    assert!(!objs.is_empty());
    for o in &objs {
        assert_eq!(
            o["spec"]["policyTypes"],
            serde_json::json!(["Ingress"]),
            "{o}"
        );
    }
    assert!(!objs
        .iter()
        .any(|o| o["metadata"]["name"].as_str().unwrap().contains("egress")));
}

#[test]
fn bad_sets_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let files = write_set(dir.path());
    let bare = dir.path().join("bare.yaml");
    std::fs::write(&bare, "trustDomain: cluster.local\n").unwrap();
    let bare = bare.to_str().unwrap();
    let refused = |args: &[&str], want: &str| {
        let o = stepmesh(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(64), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(o.stdout.is_empty());
    };
    refused(
        &["policy", "netpol", &files[0], bare],
        "bare.yaml: no workload",
    );
    refused(
        &[
            "policy",
            "netpol",
            &files[0],
            &files[1],
            "--namespace",
            "a",
            "--selector",
            "b=c",
        ],
        "give one file",
    );
    refused(
        &["policy", "netpol", &files[0], &files[0]],
        "one policy per workload",
    );
    refused(
        &[
            "policy",
            "netpol",
            &files[0],
            "--namespace",
            "other",
            "--selector",
            "stepmesh.io/service-account=api",
        ],
        "other pods than its workload",
    );
    refused(
        &["policy", "netpol", &files[0], "--dns", "kube-dns"],
        "--dns",
    );
    // One file without `workload:` still takes the flags.
    let one = netpol(
        &[bare.to_owned()],
        &["--namespace", "a", "--selector", "app=x"],
    );
    assert!(one.contains("name: stepmesh-x-default-deny"), "{one}");
}
