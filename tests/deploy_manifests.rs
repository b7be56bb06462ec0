//! Every manifest directory of deploy/ (the base and each directory with a
//! kustomization: ca, injector, gateway, example, netpol, and any added
//! later) is rendered with `kubectl kustomize`, validated against the
//! Kubernetes schemas (kubernetes-validate) and accepted by a real API
//! server's server-side dry-run (envtest). Each test skips with a printed
//! reason when its tool is missing. The generated file
//! deploy/example/networkpolicies.yaml is compared with what
//! `stepmesh policy netpol` prints in tests/inject_manifests.rs; the
//! policies deploy/ ships pass `stepmesh policy check` here.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;
mod inject_support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::envtest::Envtest;
use inject_support::{docs, have, validate, BIN};
use serde_json::Value;

/// deploy/injector/pod-security.yaml admits the injected pod, refuses the rest.
#[path = "deploy_manifests/pod_security.rs"]
mod pod_security;

/// deploy/injector/service-account-label.yaml keeps the label the
/// NetworkPolicies select on true.
#[path = "deploy_manifests/service_account_label.rs"]
mod service_account_label;

/// deploy/injector/debug-containers.yaml: an ephemeral container of a pod
/// with the sidecar is held as its app containers are, in any namespace.
#[path = "deploy_manifests/debug_containers.rs"]
mod debug_containers;

/// The webhook called by the API server: a pod injected, a debug
/// container's NET_RAW dropped.
#[path = "deploy_manifests/webhook_live.rs"]
mod webhook_live;

/// Files in a manifest directory that no kustomization lists, and why.
const NOT_APPLIED: &[(&str, &str)] = &[(
    "gateway/kubeconfig-example.yaml",
    "a person's kubeconfig, not a cluster object",
)];

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// `deploy/...`, for messages.
fn shown(dir: &Path) -> String {
    dir.strip_prefix(env!("CARGO_MANIFEST_DIR"))
        .unwrap_or(dir)
        .display()
        .to_string()
}

/// deploy/ and each of its directories holding manifests; every directory
/// but `scripts` must have a kustomization, so none is left unchecked.
fn manifest_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![deploy()];
    let mut subdirs: Vec<PathBuf> = std::fs::read_dir(deploy())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir() && !p.ends_with("scripts"))
        .collect();
    subdirs.sort();
    for dir in &subdirs {
        assert!(
            dir.join("kustomization.yaml").is_file(),
            "{} has no kustomization.yaml: its manifests would go unchecked",
            dir.display()
        );
    }
    dirs.extend(subdirs);
    dirs
}

/// Every YAML file of `dir` is named by its kustomization (as a resource
/// or a generator's file) or listed in [`NOT_APPLIED`].
fn assert_all_listed(dir: &Path) {
    let kustomization = std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if !name.ends_with(".yaml") || name == "kustomization.yaml" {
            continue;
        }
        let relative = path.strip_prefix(deploy()).unwrap().to_str().unwrap();
        let listed = kustomization
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .any(|l| l.contains(&name));
        assert!(
            listed || NOT_APPLIED.iter().any(|(f, _)| *f == relative),
            "deploy/{relative} is in no kustomization: list it, or in NOT_APPLIED with why"
        );
    }
}

/// `kubectl kustomize dir` with the given kubectl; its objects.
fn render(kubectl: &Path, dir: &Path) -> (String, Vec<Value>) {
    let out = Command::new(kubectl)
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let objects = docs(&text);
    assert!(!objects.is_empty(), "{} renders nothing", dir.display());
    (text, objects)
}

#[test]
fn every_deploy_directory_matches_the_kubernetes_schemas() {
    if !have("kubectl") {
        return;
    }
    for dir in manifest_dirs() {
        assert_all_listed(&dir);
        let (_, objects) = render(Path::new("kubectl"), &dir);
        match validate(&objects) {
            Ok(true) => println!("{}: {} objects valid", shown(&dir), objects.len()),
            Ok(false) => {
                println!("skip: kubernetes-validate is not installed (pip install -r tests/python/requirements.txt)");
                return;
            }
            Err(e) => panic!("{}: {e}", shown(&dir)),
        }
    }
}

#[test]
fn every_deploy_directory_passes_a_server_side_dry_run() {
    let Some(k8s) = Envtest::shared() else { return };
    let kubectl = k8s.assets.join("kubectl");
    let rendered: Vec<(PathBuf, String, Vec<Value>)> = manifest_dirs()
        .into_iter()
        .map(|dir| {
            let (text, objects) = render(&kubectl, &dir);
            (dir, text, objects)
        })
        .collect();
    // A dry-run creates no namespace: the ones the objects live in exist.
    let namespaces: BTreeSet<&str> = rendered
        .iter()
        .flat_map(|(_, _, objects)| objects)
        .filter_map(|o| o["metadata"]["namespace"].as_str())
        .collect();
    for ns in namespaces {
        k8s.create_namespace(ns);
    }
    for (dir, text, objects) in &rendered {
        let out =
            k8s.kubectl_with_stdin(&["apply", "--dry-run=server", "-f", "-"], text.as_bytes());
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}: the API server refused:\n{}{stdout}",
            shown(dir),
            String::from_utf8_lossy(&out.stderr)
        );
        let accepted = stdout
            .lines()
            .filter(|l| l.ends_with("(server dry run)"))
            .count();
        assert_eq!(accepted, objects.len(), "{}:\n{stdout}", shown(dir));
        println!("{}: {accepted} objects accepted", shown(dir));
    }
}

/// The policies deploy/ ships (every `policy*.yaml`: the example's, the
/// gateway's) load.
#[test]
fn the_policies_in_deploy_pass_policy_check() {
    let mut checked = 0;
    for dir in manifest_dirs() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap();
            if !(name.starts_with("policy") && name.ends_with(".yaml")) {
                continue;
            }
            let out = Command::new(BIN)
                .args(["policy", "check"])
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                shown(&path),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 3, "the example's two policies and the gateway's");
}
