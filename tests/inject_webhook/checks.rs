//! What tests/inject_webhook.rs checks of each injected fixture pod.

use serde_json::{json, Value};

use super::{container, names};

fn app_probes(proxy: &Value) -> Option<Value> {
    let env = proxy["env"].as_array().unwrap();
    let value = env.iter().find(|e| e["name"] == "STEPMESH_APP_PROBES")?["value"]
        .as_str()
        .unwrap();
    stepmesh::appprobe::parse(value).unwrap();
    Some(serde_json::from_str(value).unwrap())
}

/// The probes of the fixtures' pod-probes* app container after rewriting.
fn check_rewritten_probes(pod: &Value, proxy: &Value) {
    let app = container(pod, "containers", "app");
    let admin = |kind: &str| json!({"path": format!("/app-health/app/{kind}"), "port": 15020, "scheme": "HTTP"});
    let ready = &app["readinessProbe"];
    assert_eq!(ready["httpGet"], admin("readyz"));
    assert_eq!(
        (
            ready["timeoutSeconds"].clone(),
            ready["periodSeconds"].clone()
        ),
        (json!(2), json!(5))
    );
    assert_eq!(app["livenessProbe"]["httpGet"], admin("livez"));
    assert!(app["livenessProbe"].get("tcpSocket").is_none());
    assert_eq!(app["livenessProbe"]["initialDelaySeconds"], 15);
    assert_eq!(app["startupProbe"]["httpGet"], admin("startupz"));
    assert!(app["startupProbe"].get("grpc").is_none());
    assert_eq!(app["startupProbe"]["failureThreshold"], 30);
    let logger = container(pod, "containers", "logger");
    assert_eq!(
        logger["readinessProbe"]["exec"]["command"],
        json!(["cat", "/tmp/ready"])
    );
    assert_eq!(
        app_probes(proxy).unwrap(),
        json!({
            "/app-health/app/readyz": {"httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTP",
                "httpHeaders": [{"name": "X-Probe", "value": "kubelet"}]}, "timeoutSeconds": 2},
            "/app-health/app/livez": {"tcpSocket": {"port": 8080}, "timeoutSeconds": 1},
            "/app-health/app/startupz": {"grpc": {"port": 9090}, "timeoutSeconds": 1},
        })
    );
}

/// What each fixture's injected pod must hold.
pub fn case_checks(name: &str, pod: &Value) {
    let init = names(&pod["spec"]["initContainers"]);
    let containers = names(&pod["spec"]["containers"]);
    match name {
        "pod-probes" => {
            assert_eq!(init, ["stepmesh-init", "stepmesh-proxy"]);
            assert_eq!(containers, ["app", "logger"]);
            check_rewritten_probes(pod, container(pod, "initContainers", "stepmesh-proxy"));
        }
        "pod-probes-classic" => {
            // The probe operations indexed the containers before the proxy
            // was put first: they must have landed on the app, not the proxy.
            assert_eq!(containers, ["stepmesh-proxy", "app", "logger"]);
            let proxy = container(pod, "containers", "stepmesh-proxy");
            assert_eq!(proxy["readinessProbe"]["httpGet"]["path"], "/ready");
            check_rewritten_probes(pod, proxy);
        }
        "pod-probes-not-rewritten" => {
            let app = container(pod, "containers", "app");
            assert_eq!(app["readinessProbe"]["httpGet"]["port"], "http");
            assert_eq!(app["livenessProbe"]["tcpSocket"]["port"], 8080);
            assert_eq!(app["startupProbe"]["grpc"]["port"], 9090);
            let proxy = container(pod, "initContainers", "stepmesh-proxy");
            assert_eq!(app_probes(proxy), None);
        }
        "pod-init-and-volumes" => {
            assert_eq!(init, ["stepmesh-init", "stepmesh-proxy", "migrate"]);
            assert_eq!(names(&pod["spec"]["volumes"]).len(), 5);
            assert_eq!(
                pod["metadata"]["annotations"]["example.com/owner"],
                "team-a"
            );
            assert_eq!(
                pod["metadata"]["labels"]["stepmesh.io/service-account"],
                "api"
            );
        }
        "pod-classic-sidecar" => {
            assert_eq!(init, ["stepmesh-init"]);
            assert_eq!(containers, ["stepmesh-proxy", "app"]);
        }
        "pod-exclusions" => {
            let args = pod["spec"]["initContainers"][0]["args"].to_string();
            assert!(
                args.contains(r#""--exclude-inbound-ports","9090,9091""#),
                "{args}"
            );
            assert!(
                args.contains(r#""--exclude-outbound-ports","5432""#),
                "{args}"
            );
            assert!(args.contains("169.254.169.254/32,10.96.0.0/12"), "{args}");
            let proxy = &pod["spec"]["initContainers"][1];
            assert_eq!(proxy["resources"]["limits"]["cpu"], "500m");
            assert_eq!(proxy["resources"]["limits"]["memory"], "128Mi");
            assert!(proxy["env"]
                .to_string()
                .contains(r#""name":"RUST_LOG","value":"debug""#));
        }
        _ => {
            assert_eq!(init, ["stepmesh-init", "stepmesh-proxy"], "{name}");
            assert_eq!(pod["spec"]["initContainers"][1]["restartPolicy"], "Always");
            assert_eq!(containers, ["app"]);
        }
    }
    assert_eq!(
        pod["metadata"]["annotations"]["stepmesh.io/injected"],
        "true"
    );
}
