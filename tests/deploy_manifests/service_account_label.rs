//! deploy/injector/service-account-label.yaml on a real API server
//! (envtest): in every namespace, a pod's `stepmesh.io/service-account`
//! label names its own ServiceAccount, as the injector writes it, when the
//! pod is created and when it is relabelled; the NetworkPolicies compiled
//! from the identity policies select on it. Skips with a printed reason
//! without `KUBEBUILDER_ASSETS`.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::pod_security::{admit, deployed, injected_pod};
use crate::common::envtest::Envtest;

/// Not labelled for injection: the policy is bound everywhere.
const NAMESPACE: &str = "sa-label";
const LABEL: &str = "stepmesh.io/service-account";

/// A plain pod running as `sa` (the API's default when `None`), labelled
/// `label` when given.
fn pod(name: &str, sa: Option<&str>, label: Option<&str>) -> Value {
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"containers": [{"name": "app", "image": "nginx"}]},
    });
    if let Some(sa) = sa {
        pod["spec"]["serviceAccountName"] = json!(sa);
    }
    if let Some(label) = label {
        pod["metadata"]["labels"] = json!({ LABEL: label });
    }
    pod
}

/// Waits until the policy refuses `forged`: it takes effect shortly after
/// it is created (another error, such as the namespace not there yet, is
/// not the policy).
fn in_force(env: &Envtest, forged: &Value) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match admit(env, NAMESPACE, forged) {
            Err(e) if e.contains("stepmesh-service-account-label") => return,
            other => assert!(
                Instant::now() < deadline,
                "the policy never took effect: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_pods_label_names_only_its_own_service_account() {
    let Some(env) = Envtest::shared() else { return };
    env.apply(&deployed("service-account-label.yaml"));
    env.create_namespace(NAMESPACE);
    // Longer than a label value may be: the injector labels it "".
    let long = "s".repeat(64);
    for sa in ["web", "db", long.as_str()] {
        env.apply(&format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: {sa}\n  namespace: {NAMESPACE}\n"
        ));
    }
    in_force(env, &pod("forged", Some("web"), Some("db")));

    let cut = &long[..63];
    let cases: &[(&str, Option<&str>, Option<&str>, bool)] = &[
        ("its own account", Some("web"), Some("web"), true),
        ("no label", Some("web"), None, true),
        ("the default account", None, Some("default"), true),
        ("another account", Some("web"), Some("db"), false),
        ("another, by default", None, Some("web"), false),
        ("empty for a short name", Some("web"), Some(""), false),
        ("empty for a long name", Some(long.as_str()), Some(""), true),
        (
            "a long name cut short",
            Some(long.as_str()),
            Some(cut),
            false,
        ),
    ];
    for &(what, sa, label, admitted) in cases {
        let result = admit(env, NAMESPACE, &pod("p", sa, label));
        match (admitted, result) {
            (true, Err(e)) => panic!("{what}: refused: {e}"),
            (false, Ok(())) => panic!("{what}: admitted"),
            (false, Err(e)) => assert!(
                e.contains("stepmesh-service-account-label")
                    && e.contains("must name the pod's own ServiceAccount"),
                "{what}: {e}"
            ),
            (true, Ok(())) => {}
        }
    }
    // A static pod's mirror runs as no account: only the empty value.
    for (label, admitted) in [("default", false), ("", true)] {
        let mut mirror = pod("mirror", None, Some(label));
        mirror["metadata"]["annotations"] = json!({"kubernetes.io/config.mirror": "hash"});
        mirror["spec"]["nodeName"] = json!("node-1");
        let result = admit(env, NAMESPACE, &mirror);
        assert_eq!(
            result.is_ok(),
            admitted,
            "a mirror pod labelled {label:?}: {result:?}"
        );
    }
    // The injector's own output (its default account) passes.
    let injected = injected_pod();
    assert_eq!(injected["metadata"]["labels"][LABEL], "default");
    admit(env, NAMESPACE, &injected).expect("the injected pod is admitted");
}

#[test]
fn a_live_pod_cannot_be_relabelled_as_another_account() {
    let Some(env) = Envtest::shared() else { return };
    env.apply(&deployed("service-account-label.yaml"));
    env.create_namespace(NAMESPACE);
    // Created for real (no kubelet here: it stays Pending), as soon as the
    // policy holds (a forged creation refused).
    in_force(env, &pod("live", None, Some("db")));
    let live = pod("live", None, Some("default"));
    let out = env.kubectl_with_stdin(&["create", "-f", "-"], live.to_string().as_bytes());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let relabel = |value: Value| {
        let body = json!({"metadata": {"labels": { LABEL: value }}});
        env.kubectl(&[
            "-n",
            NAMESPACE,
            "patch",
            "pod",
            "live",
            "--type",
            "merge",
            "-p",
            &body.to_string(),
        ])
    };
    let refused = |out: std::process::Output| {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("must name the pod's own ServiceAccount"),
            "{stderr}"
        );
    };
    let ok = |out: std::process::Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    refused(relabel(json!("db")));
    // Through the status subresource, which keeps new labels.
    let body = json!({"metadata": {"labels": { LABEL: "db" }}}).to_string();
    refused(env.kubectl(&[
        "-n",
        NAMESPACE,
        "patch",
        "pod",
        "live",
        "--subresource",
        "status",
        "--type",
        "merge",
        "-p",
        &body,
    ]));
    // Other labels change freely; the account's stays.
    ok(env.kubectl(&["-n", NAMESPACE, "label", "pod", "live", "tier=web"]));
    // Dropped (no allow selects it), then back only as its own.
    ok(relabel(Value::Null));
    refused(relabel(json!("db")));
    ok(relabel(json!("default")));
    let shown = env.kubectl_ok(&[
        "-n",
        NAMESPACE,
        "get",
        "pod",
        "live",
        "-o",
        "jsonpath={.metadata.labels.stepmesh\\.io/service-account}",
    ]);
    assert_eq!(shown.trim(), "default");
}
