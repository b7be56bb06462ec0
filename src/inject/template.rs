//! The objects injected into a pod: the init container, the sidecar and
//! their volumes, as Kubernetes JSON.

use serde_json::{json, Value};

use super::config::InjectorConfig;
use super::overrides::PodSettings;
use crate::appprobe::{self, ProbeTable};

/// Name of the init container that runs `stepmesh init`.
pub const INIT_NAME: &str = "stepmesh-init";
/// Name of the sidecar container.
pub const PROXY_NAME: &str = "stepmesh-proxy";
/// Projected ServiceAccount token volume (audience of the CA).
pub const TOKEN_VOLUME: &str = "stepmesh-token";
/// CA bundle ConfigMap volume.
pub const CA_BUNDLE_VOLUME: &str = "stepmesh-ca-bundle";
/// Policy ConfigMap volume.
pub const POLICY_VOLUME: &str = "stepmesh-policy";
/// Every volume the injector adds, in order.
pub const VOLUMES: [&str; 3] = [TOKEN_VOLUME, CA_BUNDLE_VOLUME, POLICY_VOLUME];
/// The `emptyDir` holding the Workload API socket (pods that opt in).
pub const WORKLOAD_API_VOLUME: &str = "stepmesh-workload-api";
/// Where the Workload API volume is mounted, in the proxy and the apps.
pub const WORKLOAD_API_DIR: &str = "/run/spiffe";
/// The socket the proxy serves the Workload API on.
pub const WORKLOAD_API_SOCKET: &str = "/run/spiffe/workload.sock";
/// The variable SPIFFE libraries read the Workload API's address from.
pub const SPIFFE_ENDPOINT_SOCKET: &str = "SPIFFE_ENDPOINT_SOCKET";

const TOKEN_DIR: &str = "/var/run/secrets/stepmesh";
const CA_BUNDLE_DIR: &str = "/var/run/stepmesh/ca";
const POLICY_DIR: &str = "/etc/stepmesh/policy";

/// The init container: installs the interception rules, with NET_ADMIN and
/// NET_RAW and nothing else.
pub fn init_container(config: &InjectorConfig, s: &PodSettings) -> Value {
    let mut args = vec![
        "init".to_owned(),
        "--proxy-uid".into(),
        config.proxy_uid.to_string(),
        "--inbound-port".into(),
        config.inbound_port.to_string(),
        "--outbound-port".into(),
        config.outbound_port.to_string(),
        "--admin-port".into(),
        config.admin_port.to_string(),
        "--non-tcp".into(),
        s.non_tcp.as_str().into(),
    ];
    let joined = |items: Vec<String>| items.join(",");
    if !s.exclude_inbound_ports.is_empty() {
        args.push("--exclude-inbound-ports".into());
        args.push(joined(
            s.exclude_inbound_ports.iter().map(u16::to_string).collect(),
        ));
    }
    if !s.exclude_outbound_ports.is_empty() {
        args.push("--exclude-outbound-ports".into());
        args.push(joined(
            s.exclude_outbound_ports
                .iter()
                .map(u16::to_string)
                .collect(),
        ));
    }
    if !s.allow_udp_ports.is_empty() {
        args.push("--allow-udp-ports".into());
        args.push(joined(
            s.allow_udp_ports.iter().map(u16::to_string).collect(),
        ));
    }
    if !s.exclude_outbound_cidrs.is_empty() {
        args.push("--exclude-outbound-cidrs".into());
        args.push(joined(
            s.exclude_outbound_cidrs
                .iter()
                .map(|c| c.to_string())
                .collect(),
        ));
    }
    json!({
        "name": INIT_NAME,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "command": config.command,
        "args": args,
        "resources": config.init_resources.to_json(),
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": false,
            "privileged": false,
            "allowPrivilegeEscalation": false,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
    })
}

/// The sidecar. As a native sidecar it carries `restartPolicy: Always` and a
/// startup probe, so the containers after it wait until it is ready.
/// `probes` are the app's rewritten probes, handed over in
/// `STEPMESH_APP_PROBES` (absent when empty).
pub fn proxy_container(
    config: &InjectorConfig,
    s: &PodSettings,
    native: bool,
    probes: &ProbeTable,
) -> Value {
    let admin = config.admin_port;
    let field = |path: &str| json!({"fieldRef": {"apiVersion": "v1", "fieldPath": path}});
    let probe = |path: &str, period: u32, failures: u32| {
        json!({
            "httpGet": {"path": path, "port": admin, "scheme": "HTTP"},
            "periodSeconds": period,
            "failureThreshold": failures,
            "timeoutSeconds": 1,
        })
    };
    let mut c = json!({
        "name": PROXY_NAME,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "command": config.proxy_command,
        "args": [
            "--transparent",
            "--ca", config.ca_address,
            "--ca-bundle", format!("{CA_BUNDLE_DIR}/bundle.pem"),
            "--token-file", format!("{TOKEN_DIR}/token"),
            "--trust-domain", config.trust_domain,
            "--policy", format!("{POLICY_DIR}/policy.yaml"),
            "--inbound-port", config.inbound_port.to_string(),
            "--outbound-port", config.outbound_port.to_string(),
            // All interfaces: kubelet probes the pod IP (init never redirects this port).
            "--admin", format!("0.0.0.0:{admin}"),
        ],
        "env": [
            {"name": "POD_NAME", "valueFrom": field("metadata.name")},
            {"name": "POD_NAMESPACE", "valueFrom": field("metadata.namespace")},
            {"name": "SERVICE_ACCOUNT", "valueFrom": field("spec.serviceAccountName")},
            {"name": "POD_IP", "valueFrom": field("status.podIP")},
            {"name": "RUST_LOG", "value": s.log_level},
            {"name": "STEPMESH_LOG_FORMAT", "value": "json"},
        ],
        "ports": [{"name": "stepmesh-admin", "containerPort": admin, "protocol": "TCP"}],
        "readinessProbe": probe("/ready", 2, 3),
        "livenessProbe": probe("/healthz", 10, 3),
        "resources": s.resources.to_json(),
        "securityContext": {
            "runAsUser": config.proxy_uid,
            "runAsGroup": config.proxy_uid,
            "runAsNonRoot": true,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true},
            {"name": CA_BUNDLE_VOLUME, "mountPath": CA_BUNDLE_DIR, "readOnly": true},
            {"name": POLICY_VOLUME, "mountPath": POLICY_DIR, "readOnly": true},
        ],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    });
    if let Some(drain) = s.drain_timeout {
        if let Some(args) = c.get_mut("args").and_then(Value::as_array_mut) {
            args.push(json!("--drain-timeout"));
            args.push(json!(crate::units::format_duration(drain)));
        }
    }
    if s.workload_api {
        if let Some(args) = c.get_mut("args").and_then(Value::as_array_mut) {
            args.extend([json!("--workload-api"), json!(WORKLOAD_API_SOCKET)]);
        }
        if let Some(mounts) = c.get_mut("volumeMounts").and_then(Value::as_array_mut) {
            mounts.push(json!({"name": WORKLOAD_API_VOLUME, "mountPath": WORKLOAD_API_DIR}));
        }
    }
    if !probes.is_empty() {
        // A map of plain structs always serializes.
        let table = serde_json::to_string(probes).unwrap_or_default();
        if let Some(env) = c.get_mut("env").and_then(Value::as_array_mut) {
            env.push(json!({"name": appprobe::ENV, "value": table}));
        }
    }
    if native {
        // Object literal above: the index cannot fail.
        if let Some(obj) = c.as_object_mut() {
            obj.insert("restartPolicy".into(), json!("Always"));
            // Two minutes for the first SVID before kubelet restarts the sidecar.
            obj.insert("startupProbe".into(), probe("/ready", 1, 120));
        }
    }
    c
}

/// The three volumes, in [`VOLUMES`] order.
pub fn volumes(config: &InjectorConfig, s: &PodSettings) -> [Value; 3] {
    [
        json!({
            "name": TOKEN_VOLUME,
            "projected": {"sources": [{"serviceAccountToken": {
                "audience": config.token_audience,
                "expirationSeconds": config.token_expiration_seconds,
                "path": "token",
            }}]},
        }),
        json!({
            "name": CA_BUNDLE_VOLUME,
            "configMap": {"name": config.ca_bundle_config_map,
                          "items": [{"key": "bundle.pem", "path": "bundle.pem"}]},
        }),
        json!({
            "name": POLICY_VOLUME,
            "configMap": {"name": s.policy_config_map,
                          "items": [{"key": "policy.yaml", "path": "policy.yaml"}]},
        }),
    ]
}

/// The Workload API socket's volume: an `emptyDir`, so only the pod's
/// containers can reach the socket.
pub fn workload_api_volume() -> Value {
    json!({"name": WORKLOAD_API_VOLUME, "emptyDir": {}})
}

/// What an app container gets when the pod opts in to the Workload API:
/// the socket's directory, read-only (connecting needs no write access; the
/// app cannot replace the socket), and its address for SPIFFE libraries.
pub fn workload_api_mount() -> Value {
    json!({"name": WORKLOAD_API_VOLUME, "mountPath": WORKLOAD_API_DIR, "readOnly": true})
}

/// `SPIFFE_ENDPOINT_SOCKET=unix:///run/spiffe/workload.sock`.
pub fn workload_api_env() -> Value {
    json!({"name": SPIFFE_ENDPOINT_SOCKET, "value": format!("unix://{WORKLOAD_API_SOCKET}")})
}
