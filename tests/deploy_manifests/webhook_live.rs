//! The injector's webhook called by a real API server (envtest), with the
//! rules deploy/injector/webhook.yaml ships and the Pod Security policy
//! beside it: a plain pod created with kubectl comes out injected, and
//! `kubectl debug` on it gets an ephemeral container that drops NET_RAW.
//! Skips with a printed reason without `KUBEBUILDER_ASSETS`.

use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use super::pod_security::deployed;
use crate::common::envtest::Envtest;
use crate::inject_support::{docs, pki, Webhook};

/// Its own namespace, and the only one the webhook is bound to here: the
/// other tests of this binary share the API server.
const NAMESPACE: &str = "inject-live";

#[test]
fn the_api_server_injects_a_pod_and_its_debug_container_drops_net_raw() {
    let Some(env) = Envtest::shared() else { return };
    let dir = tempfile::tempdir().unwrap();
    let tls = pki(dir.path(), "live");
    let config =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/injector/config.yaml");
    let webhook = Webhook::start(&tls.cert, &tls.key, &["--config", config.to_str().unwrap()]);

    // The shipped configuration, pointed at this webhook and namespace.
    let mut hook = docs(&deployed("webhook.yaml")).remove(0);
    hook["metadata"]["name"] = json!("stepmesh-injector-live");
    let ca_bundle = base64::engine::general_purpose::STANDARD.encode(&tls.ca_pem);
    hook["webhooks"][0]["clientConfig"] = json!({
        "url": format!("https://{}/inject", webhook.addr),
        "caBundle": ca_bundle,
    });
    hook["webhooks"][0]["namespaceSelector"] =
        json!({"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}});
    env.apply(&hook.to_string());
    env.apply(&deployed("pod-security.yaml"));
    env.apply(&deployed("debug-containers.yaml"));
    env.create_namespace(NAMESPACE);
    env.kubectl_ok(&[
        "label",
        "namespace",
        NAMESPACE,
        "stepmesh.io/inject=enabled",
        "--overwrite",
    ]);

    // Admitted only once injected: the Pod Security policy refuses a
    // meshed namespace's pod without the sidecar, so a pod created before
    // the webhook is called is refused, and retried.
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": NAMESPACE},
        "spec": {"containers": [{"name": "app", "image": "nginx"}]},
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = env.kubectl_with_stdin(&["create", "-f", "-"], pod.to_string().as_bytes());
        if out.status.success() {
            break;
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(Instant::now() < deadline, "never admitted: {stderr}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let get = || -> Value {
        let out = env.kubectl_ok(&["-n", NAMESPACE, "get", "pod", "web", "-o", "json"]);
        serde_json::from_str(&out).unwrap()
    };
    let created = get();
    let names = |list: &str| -> Vec<String> {
        created["spec"][list]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| c["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let all = [names("initContainers"), names("containers")].concat();
    assert!(all.contains(&"stepmesh-init".to_owned()), "{all:?}");
    assert!(all.contains(&"stepmesh-proxy".to_owned()), "{all:?}");
    assert_eq!(
        created["metadata"]["labels"]["stepmesh.io/service-account"],
        "default"
    );
    let app = created["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "app")
        .unwrap();
    assert_eq!(
        app["securityContext"]["capabilities"]["drop"],
        json!(["NET_RAW"])
    );

    // `kubectl debug` with Pod Security baseline's profile: the webhook adds the drop,
    // and debug-containers.yaml (which refuses an ephemeral container keeping
    // NET_RAW in a pod with the sidecar) admits it.
    env.kubectl_ok(&[
        "-n",
        NAMESPACE,
        "debug",
        "web",
        "--image=busybox",
        "--container=debugger",
        "--profile=baseline",
    ]);
    let debugged = get();
    let ephemeral = &debugged["spec"]["ephemeralContainers"];
    assert_eq!(ephemeral.as_array().map(Vec::len), Some(1), "{ephemeral}");
    assert_eq!(ephemeral[0]["name"], "debugger");
    assert_eq!(
        ephemeral[0]["securityContext"]["capabilities"]["drop"],
        json!(["NET_RAW"])
    );
    // kubectl's `general` profile adds SYS_PTRACE, beyond baseline (the
    // policy refuses it); the `netadmin` one NET_RAW (the webhook does).
    for (container, profile, reason) in [
        ("tracer", "general", "beyond Pod Security baseline"),
        ("sniffer", "netadmin", "\"sniffer\" adds NET_RAW"),
    ] {
        let out = env.kubectl(&[
            "-n",
            NAMESPACE,
            "debug",
            "web",
            "--image=busybox",
            &format!("--container={container}"),
            &format!("--profile={profile}"),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(reason),
            "{profile}: {stderr}"
        );
    }

    env.kubectl_ok(&[
        "delete",
        "mutatingwebhookconfiguration",
        "stepmesh-injector-live",
    ]);
}
