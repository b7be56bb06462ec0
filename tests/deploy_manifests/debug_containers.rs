//! deploy/injector/debug-containers.yaml on a real API server (envtest):
//! in every namespace, `kubectl debug` on a pod running the sidecar adds
//! only ephemeral containers held as its app containers are (NET_RAW
//! dropped, no NET_ADMIN or other capability beyond baseline's, not
//! privileged, not the sidecar's UID); a pod without the sidecar is
//! debugged as before. Skips with a printed reason without
//! `KUBEBUILDER_ASSETS`.

use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::pod_security::{create, deployed, injected_pod};
use crate::common::envtest::Envtest;

/// Not labelled for injection, as a namespace unlabelled after its pods
/// were injected: neither the webhook nor the Pod Security policy is
/// called here.
const NAMESPACE: &str = "debug-unlabelled";

/// `kubectl debug` of `pod` with kubectl's `profile`.
fn debug(env: &Envtest, pod: &str, container: &str, profile: &str) -> Output {
    env.kubectl(&[
        "-n",
        NAMESPACE,
        "debug",
        pod,
        "--image=busybox",
        &format!("--container={container}"),
        &format!("--profile={profile}"),
    ])
}

fn refused(out: &Output) -> bool {
    let stderr = String::from_utf8_lossy(&out.stderr);
    !out.status.success() && stderr.contains("stepmesh-debug-containers")
}

#[test]
fn a_debug_container_is_held_as_an_app_container_in_any_namespace() {
    let Some(env) = Envtest::shared() else { return };
    env.apply(&deployed("debug-containers.yaml"));
    env.create_namespace(NAMESPACE);
    create(env, NAMESPACE, injected_pod());
    create(
        env,
        NAMESPACE,
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "plain"},
            "spec": {"containers": [{"name": "app", "image": "nginx"}]},
        }),
    );

    // kubectl's `baseline` profile leaves the runtime's NET_RAW: refused
    // once the policy takes effect (shortly after it is created; a session
    // admitted before then does not block the next).
    let deadline = Instant::now() + Duration::from_secs(30);
    for n in 0.. {
        let out = debug(env, "web", &format!("early-{n}"), "baseline");
        if refused(&out) {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains("--profile=restricted"), "{stderr}");
            break;
        }
        assert!(
            out.status.success() && Instant::now() < deadline,
            "the policy never took effect: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // `netadmin` adds it; `restricted` drops ALL.
    assert!(refused(&debug(env, "web", "sniffer", "netadmin")));
    let out = debug(env, "web", "debugger", "restricted");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Custom profiles: a drop of NET_RAW with baseline's capabilities is
    // enough; each rule's breach is refused by its own message.
    let patch = |container: &str, context: Value| {
        let body = json!({"spec": {"ephemeralContainers": [{
            "name": container, "image": "busybox", "securityContext": context,
        }]}});
        env.kubectl(&[
            "-n",
            NAMESPACE,
            "patch",
            "pod",
            "web",
            "--subresource",
            "ephemeralcontainers",
            "--type",
            "strategic",
            "-p",
            &body.to_string(),
        ])
    };
    let drop = json!(["CHOWN", "NET_RAW"]);
    for (context, why) in [
        (json!({"capabilities": {"add": ["KILL"]}}), "drops NET_RAW"),
        (
            json!({"capabilities": {"drop": ["net_raw"]}}),
            "drops NET_RAW",
        ),
        (
            json!({"capabilities": {"drop": ["ALL"], "add": ["NET_RAW"]}}),
            "beyond Pod Security baseline",
        ),
        (
            json!({"capabilities": {"drop": drop, "add": ["NET_ADMIN"]}}),
            "beyond Pod Security baseline",
        ),
        (
            json!({"capabilities": {"drop": drop}, "privileged": true}),
            "is not privileged",
        ),
        (
            json!({"capabilities": {"drop": drop}, "runAsUser": 1337}),
            "the sidecar's UID",
        ),
    ] {
        let out = patch("custom", context.clone());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(refused(&out) && stderr.contains(why), "{context}: {stderr}");
    }
    let out = patch(
        "custom",
        json!({"capabilities": {"add": ["KILL"], "drop": drop}, "runAsUser": 1000}),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A pod without the sidecar is not the policy's.
    let out = debug(env, "plain", "debugger", "baseline");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
