//! deploy/injector/pod-security.yaml on a real API server (envtest): Pod
//! Security baseline for meshed namespaces, with exactly the injected init
//! container's NET_ADMIN and NET_RAW let through. The pod is the injector's
//! own output (`stepmesh inject`); each hostile variant is refused with its
//! reason, and the same variant is admitted where the policy is not bound.
//! Skips with a printed reason without `KUBEBUILDER_ASSETS`.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::envtest::Envtest;
use crate::inject_support::{docs, run_stdin};

const MESHED: &str = "psa-meshed";
const PLAIN: &str = "psa-plain";

pub(super) fn deployed(file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/injector")
        .join(file);
    std::fs::read_to_string(path).unwrap()
}

/// An app pod as the injector deploy/ ships (its config.yaml) injects it.
pub(super) fn injected_pod() -> Value {
    let app = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\nspec:\n  containers:\n  \
               - name: app\n    image: nginx\n    ports:\n    - containerPort: 80\n";
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/injector/config.yaml");
    let out = run_stdin(
        &["inject", "-f", "-", "--config", config.to_str().unwrap()],
        app,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    docs(&String::from_utf8(out.stdout).unwrap()).remove(0)
}

/// `kubectl create --dry-run=server` of `pod` in `namespace`: `Ok` when
/// admitted, else what the server said.
pub(super) fn admit(env: &Envtest, namespace: &str, pod: &Value) -> Result<(), String> {
    let mut pod = pod.clone();
    pod["metadata"]["namespace"] = json!(namespace);
    let out = env.kubectl_with_stdin(
        &["create", "--dry-run=server", "-f", "-"],
        pod.to_string().as_bytes(),
    );
    if out.status.success() {
        return Ok(());
    }
    Err(String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Creates `pod` in `namespace` for real (no kubelet here: it stays
/// Pending, which updates allow), retried while the namespace is new.
pub(super) fn create(env: &Envtest, namespace: &str, mut pod: Value) {
    pod["metadata"]["namespace"] = json!(namespace);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = env.kubectl_with_stdin(&["create", "-f", "-"], pod.to_string().as_bytes());
        if out.status.success() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until the policy holds in `namespace`: it takes effect shortly
/// after it is created, and after the namespace's label is seen.
fn in_force(env: &Envtest, namespace: &str, pod: &Value) {
    let mut host_network = pod.clone();
    host_network["spec"]["hostNetwork"] = json!(true);
    let deadline = Instant::now() + Duration::from_secs(30);
    while admit(env, namespace, &host_network).is_ok() {
        assert!(Instant::now() < deadline, "the policy never took effect");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn container<'a>(pod: &'a mut Value, list: &str, name: &str) -> &'a mut Value {
    pod["spec"][list]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {list} {name}"))
}

#[test]
fn meshed_namespaces_get_baseline_but_for_the_injected_init_container() {
    let Some(env) = Envtest::shared() else { return };
    env.apply(&deployed("pod-security.yaml"));
    for namespace in [MESHED, PLAIN] {
        env.create_namespace(namespace);
    }
    env.kubectl_ok(&["label", "namespace", MESHED, "stepmesh.io/inject=enabled"]);

    let pod = injected_pod();
    let init = container(&mut pod.clone(), "initContainers", "stepmesh-init").clone();
    assert_eq!(
        init["securityContext"]["capabilities"]["add"],
        json!(["NET_ADMIN", "NET_RAW"])
    );

    in_force(env, MESHED, &pod);
    admit(env, MESHED, &pod).expect("the injected pod is admitted");

    type Change = fn(&mut Value);
    let hostile: &[(&str, Change, &str)] = &[
        (
            "hostNetwork",
            |p| p["spec"]["hostNetwork"] = json!(true),
            "host namespaces",
        ),
        (
            "hostPID",
            |p| p["spec"]["hostPID"] = json!(true),
            "host namespaces",
        ),
        (
            "a privileged app",
            |p| container(p, "containers", "app")["securityContext"] = json!({"privileged": true}),
            "privileged containers",
        ),
        (
            "NET_ADMIN for the app",
            |p| {
                container(p, "containers", "app")["securityContext"] =
                    json!({"capabilities": {"add": ["NET_ADMIN"]}})
            },
            "beyond Pod Security baseline",
        ),
        (
            "SYS_ADMIN beside the init container's two",
            |p| {
                let init = container(p, "initContainers", "stepmesh-init");
                init["securityContext"]["capabilities"]["add"] =
                    json!(["NET_ADMIN", "NET_RAW", "SYS_ADMIN"])
            },
            "beyond Pod Security baseline",
        ),
        (
            "another image as stepmesh-init",
            |p| container(p, "initContainers", "stepmesh-init")["image"] = json!("evil:latest"),
            "beyond Pod Security baseline",
        ),
        (
            "another command in the injector's image",
            |p| container(p, "initContainers", "stepmesh-init")["command"] = json!(["sh"]),
            "beyond Pod Security baseline",
        ),
        (
            "the injector's binary, not `init`",
            |p| container(p, "initContainers", "stepmesh-init")["args"] = json!(["proxy"]),
            "beyond Pod Security baseline",
        ),
        (
            "the init container's capabilities under another name",
            |p| container(p, "initContainers", "stepmesh-init")["name"] = json!("net-setup"),
            "beyond Pod Security baseline",
        ),
        (
            "a hostPath volume",
            |p| {
                let volumes = p["spec"]["volumes"].as_array_mut().unwrap();
                volumes.push(json!({"name": "root", "hostPath": {"path": "/"}}))
            },
            "hostPath volumes",
        ),
        (
            "a hostPort",
            |p| {
                container(p, "containers", "app")["ports"] =
                    json!([{"containerPort": 80, "hostPort": 80}])
            },
            "hostPort",
        ),
        (
            "seccomp Unconfined",
            |p| p["spec"]["securityContext"] = json!({"seccompProfile": {"type": "Unconfined"}}),
            "Unconfined seccomp",
        ),
        (
            "an unsafe sysctl",
            |p| {
                p["spec"]["securityContext"] =
                    json!({"sysctls": [{"name": "kernel.msgmax", "value": "1"}]})
            },
            "safe sysctls",
        ),
        (
            "an SELinux user",
            |p| {
                container(p, "containers", "app")["securityContext"] =
                    json!({"seLinuxOptions": {"user": "system_u"}})
            },
            "SELinux",
        ),
        (
            "PATH pointed elsewhere in stepmesh-init",
            |p| {
                container(p, "initContainers", "stepmesh-init")["env"] =
                    json!([{"name": "PATH", "value": "/x"}])
            },
            "beyond Pod Security baseline",
        ),
        (
            "stepmesh-init kept running with a hook",
            |p| {
                let init = container(p, "initContainers", "stepmesh-init");
                init["restartPolicy"] = json!("Always");
                init["lifecycle"] = json!({"postStart": {"exec": {"command": ["sh"]}}})
            },
            "beyond Pod Security baseline",
        ),
        (
            "the app keeping NET_RAW",
            |p| container(p, "containers", "app")["securityContext"] = json!({}),
            "drops NET_RAW",
        ),
        (
            "the app as the sidecar's UID",
            |p| container(p, "containers", "app")["securityContext"]["runAsUser"] = json!(1337),
            "sidecar's UID",
        ),
        (
            "a probe aimed at another host",
            |p| {
                container(p, "containers", "app")["readinessProbe"] =
                    json!({"tcpSocket": {"port": 80, "host": "10.0.0.1"}})
            },
            "probe or lifecycle hook with a host",
        ),
    ];
    // Not injected: refused unless opted out (the webhook skips a pod
    // marked injected; envtest has no webhook, as if it had skipped).
    let mut bare = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bare"},
        "spec": {"containers": [{"name": "app", "image": "nginx"}]}});
    for marked in [json!({}), json!({"stepmesh.io/injected": "true"})] {
        bare["metadata"]["annotations"] = marked;
        let refused = admit(env, MESHED, &bare).expect_err("a pod without the sidecar");
        assert!(
            refused.contains("runs the injected stepmesh-init"),
            "{refused}"
        );
    }
    bare["metadata"]["annotations"] = json!({"stepmesh.io/inject": "false"});
    admit(env, MESHED, &bare).expect("an opted-out pod is admitted");
    // A Windows pod, which the injector skips.
    bare["metadata"]["annotations"] = json!({});
    bare["spec"]["os"] = json!({"name": "windows"});
    admit(env, MESHED, &bare).expect("a Windows pod is admitted");
    let mut impostor = pod.clone();
    container(&mut impostor, "initContainers", "stepmesh-proxy")["image"] = json!("evil:latest");
    let refused = admit(env, MESHED, &impostor).expect_err("a stepmesh-proxy of another image");
    assert!(
        refused.contains("runs the injected stepmesh-init"),
        "{refused}"
    );

    for &(what, change, reason) in hostile {
        let mut bad = pod.clone();
        change(&mut bad);
        let refused = admit(env, MESHED, &bad).expect_err(what);
        assert!(
            refused.contains("stepmesh-pod-security") && refused.contains(reason),
            "{what}: {refused}"
        );
        admit(env, PLAIN, &bad)
            .unwrap_or_else(|e| panic!("{what} outside a meshed namespace: {e}"));
    }

    // What baseline allows stays allowed: a safe sysctl, baseline's own
    // capabilities.
    let mut fine = pod.clone();
    fine["spec"]["securityContext"] =
        json!({"sysctls": [{"name": "net.ipv4.tcp_syncookies", "value": "1"}]});
    container(&mut fine, "containers", "app")["securityContext"]["capabilities"]["add"] =
        json!(["NET_BIND_SERVICE", "CHOWN"]);
    admit(env, MESHED, &fine).expect("baseline's own settings are admitted");
}

#[test]
fn the_exception_names_the_injectors_image_and_command() {
    let policy = deployed("pod-security.yaml");
    let config: Value = serde_norway::from_str(&deployed("config.yaml")).unwrap();
    let image = config["image"].as_str().unwrap();
    assert!(
        policy.contains(&format!("expression: \"'{image}'\"")),
        "initImage in pod-security.yaml is not config.yaml's image {image}"
    );
    // A command of config.yaml as the policy's CEL list spells it.
    let cel_list = |key: &str| -> String {
        let items: Vec<String> = config[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| format!("'{}'", c.as_str().unwrap()))
            .collect();
        format!("expression: \"[{}]\"", items.join(", "))
    };
    for (key, variable) in [("command", "initCommand"), ("proxyCommand", "proxyCommand")] {
        let want = cel_list(key);
        assert!(
            policy.contains(&want),
            "{variable} in pod-security.yaml is not config.yaml's {key}: {want}"
        );
    }
    let uid = &config["proxyUid"];
    for file in ["pod-security.yaml", "debug-containers.yaml"] {
        assert!(
            deployed(file).contains(&format!("expression: \"{uid}\"")),
            "proxyUid in {file} is not config.yaml's {uid}"
        );
    }
    let injected = injected_pod();
    let init = &injected["spec"]["initContainers"][0];
    assert_eq!(init["name"], "stepmesh-init");
    assert_eq!(init["args"][0], "init");
}

#[test]
fn a_live_pod_keeps_its_init_image_and_is_debugged_under_baseline() {
    let Some(env) = Envtest::shared() else { return };
    env.apply(&deployed("pod-security.yaml"));
    let namespace = "psa-live";
    env.create_namespace(namespace);
    env.kubectl_ok(&[
        "label",
        "namespace",
        namespace,
        "stepmesh.io/inject=enabled",
    ]);
    let pod = injected_pod();
    in_force(env, namespace, &pod);
    create(env, namespace, pod.clone());
    let patch = |kind: &str, body: &str, sub: Option<&str>| {
        let mut args = vec![
            "-n", namespace, "patch", "pod", "web", "--type", kind, "-p", body,
        ];
        if let Some(sub) = sub {
            args.extend(["--subresource", sub]);
        }
        env.kubectl(&args)
    };
    let ok = |out: std::process::Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let refused = |out: std::process::Output, reason: &str| {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(reason), "{stderr}");
    };
    ok(patch(
        "merge",
        r#"{"metadata":{"labels":{"tier":"web"}}}"#,
        None,
    ));
    ok(patch(
        "json",
        r#"[{"op":"replace","path":"/spec/containers/0/image","value":"nginx:2"}]"#,
        None,
    ));
    for swapped in ["stepmesh-init", "stepmesh-proxy"] {
        let at = pod["spec"]["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .position(|c| c["name"] == swapped)
            .unwrap();
        let body = format!(
            r#"[{{"op":"replace","path":"/spec/initContainers/{at}/image","value":"evil:1"}}]"#
        );
        refused(patch("json", &body, None), "cannot be changed");
    }
    let debug = |pod: &str, capabilities: Value| {
        let body = json!({"spec": {"ephemeralContainers": [
            {"name": "debugger", "image": "busybox", "securityContext": {"capabilities": capabilities}}
        ]}});
        env.kubectl(&[
            "-n",
            namespace,
            "patch",
            "pod",
            pod,
            "--type",
            "strategic",
            "-p",
            &body.to_string(),
            "--subresource",
            "ephemeralcontainers",
        ])
    };
    let drops = json!(["NET_RAW"]);
    // (debug-containers.yaml, if another test applied it, refuses this in a
    // pod with the sidecar too, and that NET_RAW is dropped: debug_containers.rs.)
    refused(
        debug("web", json!({"add": ["NET_ADMIN"], "drop": drops})),
        "beyond Pod Security baseline",
    );
    ok(debug("web", json!({"add": ["KILL"], "drop": drops})));
    // This policy's own refusal: a pod opted out has no sidecar, which
    // debug-containers.yaml leaves alone.
    let plain = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "opted-out", "annotations": {"stepmesh.io/inject": "false"}},
        "spec": {"containers": [{"name": "app", "image": "nginx"}]},
    });
    create(env, namespace, plain);
    let out = debug("opted-out", json!({"add": ["NET_ADMIN"]}));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("stepmesh-pod-security"),
        "{stderr}"
    );
}
