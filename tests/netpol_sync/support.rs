//! What tests/netpol_sync.rs reads the cluster and the controller with.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::envtest::{Envtest, Supervised};

const BIN: &str = env!("CARGO_BIN_EXE_stepmesh");
const OWNED: &str = "stepmesh.io/netpol-owner=sync";

/// A ConfigMap the controller reads, holding `policy`.
pub fn configmap(ns: &str, name: &str, policy: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels: {{stepmesh.io/policy: netpol}}\ndata:\n  policy.yaml: {}\n",
        serde_json::to_string(policy).unwrap()
    )
}

/// Every owned NetworkPolicy, as kubectl's `-o output` prints them.
fn owned_as(k8s: &Envtest, output: &str) -> String {
    k8s.kubectl_ok(&["get", "networkpolicies", "-A", "-l", OWNED, "-o", output])
}

/// `ns/name` of every owned NetworkPolicy.
pub fn owned(k8s: &Envtest) -> BTreeSet<String> {
    let names = "jsonpath={range .items[*]}{.metadata.namespace}/{.metadata.name}{\"\\n\"}{end}";
    owned_as(k8s, names).lines().map(str::to_owned).collect()
}

/// What `policy netpol` prints for `files`, as `ns/name`.
pub fn expected(dir: &Path, policies: &[(&str, &str, String)]) -> BTreeSet<String> {
    let mut args = vec!["policy".to_owned(), "netpol".to_owned()];
    for (ns, name, text) in policies {
        let f = dir.join(format!("{ns}-{name}.yaml"));
        std::fs::write(&f, text).unwrap();
        args.push(f.to_str().unwrap().to_owned());
    }
    let out = Command::new(BIN).args(&args).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .split("---\n")
        .filter(|d| d.contains("kind:"))
        .map(|d| {
            let v: serde_json::Value = serde_norway::from_str(d).unwrap();
            format!(
                "{}/{}",
                v["metadata"]["namespace"].as_str().unwrap(),
                v["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect()
}

/// A policy that fails validation (and names no workload).
pub const BROKEN: &str = "trustDomain: cluster.local\ninbound: {ports: [{port: 0}]}\n";
pub const BLOCKED: &str = "stepmesh_netpol_blocked_configmaps";

/// Every owned NetworkPolicy, `ns/name` → its metadata (resourceVersion,
/// generation, labels, annotations) and spec: equal means untouched.
pub fn snapshot(k8s: &Envtest) -> BTreeMap<String, serde_json::Value> {
    let list: serde_json::Value = serde_json::from_str(&owned_as(k8s, "json")).unwrap();
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            let m = &o["metadata"];
            let key = format!(
                "{}/{}",
                m["namespace"].as_str().unwrap(),
                m["name"].as_str().unwrap()
            );
            let kept = serde_json::json!({
                "resourceVersion": m["resourceVersion"], "generation": m["generation"],
                "labels": m["labels"], "annotations": m["annotations"], "spec": o["spec"],
            });
            (key, kept)
        })
        .collect()
}

/// The messages of the InvalidPolicy Events on ConfigMap `ns/name`.
pub fn events(k8s: &Envtest, ns: &str, name: &str) -> String {
    k8s.kubectl_ok(&[
        "get",
        "events",
        "-n",
        ns,
        "--field-selector",
        &format!("involvedObject.name={name},reason=InvalidPolicy"),
        "-o",
        "jsonpath={.items[*].message}",
    ])
}

/// Polls `ok` every 100 ms; fails naming `what` after `within`.
pub fn wait(what: &str, within: Duration, mut ok: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}

/// The value of metric `name` on admin port `port` (-1: not there).
pub fn metric(port: u16, name: &str) -> f64 {
    let out = Command::new("curl")
        .args(["-sf", &format!("http://127.0.0.1:{port}/metrics")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{name} "))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(-1.0)
}

/// A loopback port free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `netpol sync` as replica `id`, quick intervals and a 4 s Lease.
pub fn controller(k8s: &Envtest, dir: &Path, token: &Path, id: &str, admin: u16) -> Supervised {
    let args: Vec<String> = [
        "netpol",
        "sync",
        "--server",
        &k8s.url,
        "--ca-file",
        k8s.ca_file.to_str().unwrap(),
        "--token-file",
        token.to_str().unwrap(),
        "--identity",
        id,
        "--interval",
        "300ms",
        "--lease-duration",
        "4s",
        "--lease-namespace",
        "stepmesh-system",
        "--admin",
        &format!("127.0.0.1:{admin}"),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    Supervised::spawn(
        id,
        Path::new(BIN),
        &args,
        &dir.join(format!("{id}.log")),
        None,
    )
}
