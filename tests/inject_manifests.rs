//! Manifests: `stepmesh inject -f` on every supported kind, `kubectl
//! kustomize deploy/` and the bootstrap overlay, each object validated with
//! kubernetes-validate; the bootstrap's serving certificate served for real.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod inject_support;

use std::path::Path;
use std::process::Command;

use base64::Engine as _;
use inject_support::{
    bootstrap, client_config, docs, have, inject_stdin, request_to, run_stdin, validate, Webhook,
    BIN,
};
use serde_json::json;

/// `kubectl kustomize DIR`, which must succeed without a deprecation
/// warning (`bases`, `patchesJson6902`, ... print one on stderr).
fn kustomize(dir: &Path) -> String {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stderr.to_lowercase().contains("deprecated"),
        "{}: {stderr}",
        dir.display()
    );
    String::from_utf8(out.stdout).unwrap()
}

const POD_SPEC: &str = "
      restartPolicy: Never
      containers:
        - name: app
          image: registry.k8s.io/pause:3.10";

fn every_kind() -> String {
    let template = format!("\n    metadata:\n      labels: {{app: x}}\n    spec:{POD_SPEC}");
    let always = template.replace("restartPolicy: Never", "restartPolicy: Always");
    format!(
        "# a comment, then documents of every kind
apiVersion: v1
kind: Pod
metadata: {{name: pod, namespace: apps}}
spec:{pod}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: deploy}}
spec:
  selector: {{matchLabels: {{app: x}}}}
  template:{always}
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {{name: sts}}
spec:
  serviceName: sts
  selector: {{matchLabels: {{app: x}}}}
  template:{always}
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {{name: ds}}
spec:
  selector: {{matchLabels: {{app: x}}}}
  template:{always}
---
apiVersion: batch/v1
kind: Job
metadata: {{name: job}}
spec:
  template:{template}
---
apiVersion: batch/v1
kind: CronJob
metadata: {{name: cron}}
spec:
  schedule: '*/5 * * * *'
  jobTemplate:
    spec:
      template:{nested}
---
apiVersion: v1
kind: Service
metadata: {{name: svc, annotations: {{stepmesh.io/inject: 'true'}}}}
spec:
  selector: {{app: x}}
  ports: [{{port: 80, targetPort: 8080}}]
",
        pod = POD_SPEC.replace("\n      ", "\n  "),
        nested = template.replace('\n', "\n    "),
    )
}

#[test]
fn inject_f_injects_every_workload_kind_and_leaves_a_service_alone() {
    let input = every_kind();
    let before = docs(&input);
    assert_eq!(before.len(), 7, "{input}");
    let (output, stderr) = inject_stdin(&input);
    let after = docs(&output);
    assert_eq!(after.len(), 7);
    let pointers = [
        "/spec",
        "/spec/template/spec",
        "/spec/template/spec",
        "/spec/template/spec",
        "/spec/template/spec",
        "/spec/jobTemplate/spec/template/spec",
    ];
    for (object, pointer) in after.iter().zip(pointers) {
        let spec = object.pointer(pointer).unwrap();
        assert_eq!(
            spec["initContainers"][0]["name"], "stepmesh-init",
            "{object}"
        );
        assert_eq!(
            spec["initContainers"][1]["name"], "stepmesh-proxy",
            "{object}"
        );
        assert_eq!(spec["containers"][0]["name"], "app");
    }
    assert_eq!(after[6], before[6], "the Service is unchanged");
    for line in [
        "pod/pod injected",
        "cronjob/cron injected",
        "service/svc unchanged",
    ] {
        assert!(stderr.contains(line), "{line} not in {stderr}");
    }
    validate(&after).unwrap();

    // Injecting the output again changes nothing.
    let (again, stderr) = inject_stdin(&output);
    assert_eq!(docs(&again), after);
    assert!(
        stderr.contains("deployment/deploy skipped: already injected"),
        "{stderr}"
    );

    // From a file, classic mode by config: the proxy becomes a container.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("in.yaml");
    let config = dir.path().join("config.yaml");
    std::fs::write(&file, &input).unwrap();
    std::fs::write(&config, "nativeSidecar: false\n").unwrap();
    let out = Command::new(BIN)
        .args(["inject", "-f"])
        .arg(&file)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success());
    let classic = docs(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(
        classic[1]["spec"]["template"]["spec"]["containers"][0]["name"],
        "stepmesh-proxy"
    );
    validate(&classic).unwrap();

    // A pod that opts in to the Workload API, both modes: still valid.
    let opted = input.replacen(
        "metadata: {name: pod, namespace: apps}",
        "metadata: {name: pod, namespace: apps, annotations: {stepmesh.io/workload-api: enabled}}",
        1,
    );
    assert_ne!(opted, input);
    let config_arg = config.to_str().unwrap();
    for args in [
        vec!["inject", "-f", "-"],
        vec!["inject", "-f", "-", "--config", config_arg],
    ] {
        let out = run_stdin(&args, &opted);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pods = docs(&String::from_utf8(out.stdout).unwrap());
        let app = pods[0]["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "app")
            .unwrap()
            .clone();
        assert_eq!(app["env"][0]["value"], "unix:///run/spiffe/workload.sock");
        assert_eq!(app["volumeMounts"][0]["mountPath"], "/run/spiffe");
        validate(&pods).unwrap();
    }
}

#[test]
fn inject_f_refuses_bad_input_with_a_reason() {
    let run = |args: &[&str], stdin: &str| {
        let out = run_stdin(args, stdin);
        assert!(!out.status.success());
        assert!(out.stdout.is_empty(), "nothing printed on failure");
        String::from_utf8(out.stderr).unwrap()
    };
    let bad_annotation = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations: {stepmesh.io/exclude-inbound-ports: '80,x'}\nspec:\n  containers: [{name: a, image: b}]\n";
    let err = run(&["inject", "-f", "-"], bad_annotation);
    assert!(
        err.contains("pod/p: annotation stepmesh.io/exclude-inbound-ports"),
        "{err}"
    );
    let taken = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations: {stepmesh.io/workload-api: enabled}\nspec:\n  containers: [{name: a, image: b, volumeMounts: [{name: v, mountPath: /run/spiffe/}]}]\n  volumes: [{name: v, emptyDir: {}}]\n";
    let err = run(&["inject", "-f", "-"], taken);
    assert!(
        err.contains(r#"pod/p: container "a" already mounts /run/spiffe"#),
        "{err}"
    );
    let bad = bad_annotation.replace("exclude-inbound-ports: '80,x'", "workload-api: 'yes'");
    let err = run(&["inject", "-f", "-"], &bad);
    assert!(
        err.contains("annotation stepmesh.io/workload-api: \"yes\" is not enabled or disabled"),
        "{err}"
    );
    let err = run(&["inject", "-f", "-"], "kind: [unclosed");
    assert!(err.contains("document 1"), "{err}");
    let err = run(&["inject", "-f", "/nonexistent/x.yaml"], "");
    assert!(err.contains("/nonexistent/x.yaml"), "{err}");
    let err = run(
        &["inject", "-f", "-", "--config", "/nonexistent/c.yaml"],
        "",
    );
    assert!(err.contains("/nonexistent/c.yaml"), "{err}");
}

#[test]
fn kustomize_base_renders_validates_and_is_scoped_safely() {
    if !have("kubectl") {
        return;
    }
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let rendered = kustomize(&base);
    let objects = docs(&rendered);
    assert!(objects.len() >= 20, "{} objects", objects.len());
    validate(&objects).unwrap();
    let find = |kind: &str, name: &str| {
        objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{kind}/{name} missing"))
    };
    let hook = &find("MutatingWebhookConfiguration", "stepmesh-injector")["webhooks"][0];
    assert_eq!(hook["failurePolicy"], "Fail");
    assert_eq!(hook["sideEffects"], "None");
    assert_eq!(hook["admissionReviewVersions"], json!(["v1"]));
    assert!(hook["timeoutSeconds"].as_u64().unwrap() <= 10);
    assert_eq!(hook["clientConfig"]["service"]["path"], "/inject");
    let exprs = hook["namespaceSelector"]["matchExpressions"]
        .as_array()
        .unwrap();
    assert!(exprs
        .contains(&json!({"key": "stepmesh.io/inject", "operator": "In", "values": ["enabled"]})));
    assert!(exprs.contains(
        &json!({"key": "kubernetes.io/metadata.name", "operator": "NotIn",
                                   "values": ["stepmesh-system", "kube-system"]})
    ));
    assert_eq!(
        find("ClusterRole", "stepmesh-ca-tokenreview")["rules"],
        json!([{"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}])
    );
    // The gateway may impersonate people and nothing else.
    let impersonate = find("ClusterRole", "stepmesh-gateway-impersonator")["rules"]
        .as_array()
        .unwrap()
        .clone();
    assert!(
        impersonate
            .iter()
            .all(|r| r["verbs"] == json!(["impersonate"])),
        "{impersonate:?}"
    );
    // The CA replicas' shared state: that one ConfigMap, by name (create
    // cannot be limited by name).
    assert_eq!(
        find("Role", "stepmesh-ca-state")["rules"],
        json!([
            {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["stepmesh-ca-state"],
             "verbs": ["get", "update"]},
            {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
        ])
    );
    let ca = &find("Deployment", "stepmesh-ca")["spec"];
    assert_eq!(ca["replicas"], 2);
    assert!(ca["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .contains(&json!(
            "--shared-state=configmap/stepmesh-system/stepmesh-ca-state"
        )));
    assert_eq!(
        find("PodDisruptionBudget", "stepmesh-ca")["spec"]["minAvailable"],
        1
    );
    assert_eq!(
        find("Service", "stepmesh-ca-replicas")["spec"]["clusterIP"],
        "None"
    );
    assert_eq!(
        objects
            .iter()
            .filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role")
            .count(),
        3
    );
    let gateway_policy = find("ConfigMap", "stepmesh-gateway-policy")["data"]["policy.yaml"]
        .as_str()
        .unwrap();
    let policy = stepmesh::policy::Policy::from_yaml(gateway_policy).unwrap();
    let rules: Vec<&str> = policy
        .kubernetes()
        .unwrap()
        .rules
        .iter()
        .map(|r| &*r.name)
        .collect();
    assert_eq!(
        rules,
        [
            "exec-in-prod",
            "debug-in-prod",
            "node-proxy",
            "change-workloads-in-prod",
            "change-in-prod",
            "delete-in-prod",
            "evict-in-prod",
            "read-secrets"
        ]
    );
    assert_eq!(
        find("Namespace", "stepmesh-demo")["metadata"]["labels"]["stepmesh.io/inject"],
        "enabled"
    );
    assert!(
        find("ConfigMap", "stepmesh-policy-backend")["data"]["policy.yaml"]
            .as_str()
            .unwrap()
            .contains("spiffe://cluster.local/ns/stepmesh-demo/sa/frontend")
    );
    find("NetworkPolicy", "stepmesh-backend-default-deny");
    find("NetworkPolicy", "stepmesh-backend-port-8080");
    find("NetworkPolicy", "stepmesh-frontend-default-deny");

    // The rendered base through the offline injector: the example workloads
    // are injected, the control plane (stepmesh-system) is not.
    let (output, stderr) = inject_stdin(&rendered);
    let injected = docs(&output);
    let backend = injected
        .iter()
        .find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == "backend")
        .unwrap();
    assert_eq!(
        backend["spec"]["template"]["spec"]["volumes"][2]["configMap"]["name"],
        "stepmesh-policy-backend"
    );
    assert!(
        stderr.contains("deployment/stepmesh-injector skipped: namespace excluded"),
        "{stderr}"
    );
    validate(&injected).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_overlay_validates_and_its_serving_cert_works() {
    if !have("kubectl") || !have("openssl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("overlay");
    bootstrap(&out, &[]);
    for key in [
        "root.key",
        "intermediate.key",
        "webhook-ca.key",
        "webhook.key",
    ] {
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(out.join(key)).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }
    let objects = docs(&kustomize(&out));
    validate(&objects).unwrap();
    let webhook_ca = std::fs::read_to_string(out.join("webhook-ca.crt")).unwrap();
    let hook = objects
        .iter()
        .find(|o| o["kind"] == "MutatingWebhookConfiguration")
        .unwrap();
    let ca_bundle = base64::engine::general_purpose::STANDARD
        .decode(
            hook["webhooks"][0]["clientConfig"]["caBundle"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
    assert_eq!(String::from_utf8(ca_bundle).unwrap(), webhook_ca);
    let bundles: Vec<&str> = objects
        .iter()
        .filter(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == "stepmesh-ca-bundle")
        .map(|o| o["metadata"]["namespace"].as_str().unwrap())
        .collect();
    assert_eq!(bundles, ["stepmesh-demo", "stepmesh-system"]);
    assert!(objects
        .iter()
        .any(|o| o["kind"] == "Secret" && o["metadata"]["name"] == "stepmesh-ca-pki"));

    // The API server's view: caBundle as the only root, the Service's DNS name.
    let hook = Webhook::start(&out.join("webhook.crt"), &out.join("webhook.key"), &[]);
    let tls = client_config(&webhook_ca);
    let (status, _) = request_to(
        "stepmesh-injector.stepmesh-system.svc",
        hook.addr,
        tls,
        "GET",
        "/ready",
        None,
        Vec::new(),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);

    // Re-running keeps the keys; --rotate-webhook replaces only the serving pair.
    let root_before = std::fs::read(out.join("root.key")).unwrap();
    let leaf_before = std::fs::read(out.join("webhook.crt")).unwrap();
    bootstrap(&out, &["--rotate-webhook"]);
    assert_eq!(std::fs::read(out.join("root.key")).unwrap(), root_before);
    assert_ne!(std::fs::read(out.join("webhook.crt")).unwrap(), leaf_before);
}

/// deploy/example/networkpolicies.yaml is exactly what the `stepmesh policy
/// netpol` commands in its header print, so the example's L3/L4 layer
/// cannot drift from its identity policies. `STEPMESH_BLESS=1` rewrites it.
#[test]
fn example_networkpolicies_are_what_policy_netpol_prints() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/example");
    let path = example.join("networkpolicies.yaml");
    let checked_in = std::fs::read_to_string(&path).unwrap();
    let header: String = checked_in
        .lines()
        .take_while(|l| l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    let commands: Vec<Vec<&str>> = header
        .lines()
        .filter_map(|l| l.strip_prefix("#   stepmesh "))
        .map(|c| c.split_whitespace().collect())
        .collect();
    // Every policy the kustomization publishes has its command.
    let kustomization = std::fs::read_to_string(example.join("kustomization.yaml")).unwrap();
    let published: Vec<&str> = kustomization
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- policy.yaml="))
        .collect();
    assert_eq!(published.len(), 2, "{kustomization}");
    for policy in &published {
        assert!(
            commands
                .iter()
                .any(|c| c[..2] == ["policy", "netpol"] && c.contains(policy)),
            "no netpol command for {policy} in the header of {}",
            path.display()
        );
    }
    let mut expected = header.clone();
    for args in &commands {
        let out = Command::new(BIN)
            .args(args)
            .current_dir(&example)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "stepmesh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        expected.push_str(&String::from_utf8(out.stdout).unwrap());
    }
    if checked_in != expected && std::env::var_os("STEPMESH_BLESS").is_some() {
        std::fs::write(&path, &expected).unwrap();
        return;
    }
    assert!(
        checked_in == expected,
        "{} is stale: re-run the commands in its header, or this test with \
         STEPMESH_BLESS=1; expected:\n{expected}",
        path.display()
    );
}
