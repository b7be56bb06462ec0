//! The pure heart of injection: a pod (or pod template) in, JSON Patch
//! operations out. No I/O, no AdmissionReview: the webhook and offline
//! injection both call [`mutate`].

use serde_json::{json, Map, Value};

use super::config::InjectorConfig;
use super::net_raw;
use super::overrides::{self as ann, BadAnnotation, PodSettings};
use super::patch::{escape, PatchOp};
use super::probes::{self, probe_ports};
use super::template::{
    self, INIT_NAME, PROXY_NAME, SPIFFE_ENDPOINT_SOCKET, VOLUMES, WORKLOAD_API_DIR,
    WORKLOAD_API_VOLUME,
};

/// Why a pod was left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// It carries `stepmesh.io/injected` or our containers already.
    AlreadyInjected,
    /// `stepmesh.io/inject: "false"`.
    OptedOut,
    /// `hostNetwork: true`: iptables would rewrite the node's traffic.
    HostNetwork,
    /// The namespace is on the configuration's exclusion list.
    ExcludedNamespace,
    /// `spec.os.name: windows`: no iptables, no Linux sidecar.
    Windows,
}

impl Skip {
    /// A short reason for logs and `inject -f` output.
    pub fn reason(self) -> &'static str {
        match self {
            Self::AlreadyInjected => "already injected",
            Self::OptedOut => "opted out (stepmesh.io/inject: \"false\")",
            Self::HostNetwork => "hostNetwork pod",
            Self::ExcludedNamespace => "namespace excluded from injection",
            Self::Windows => "Windows pod",
        }
    }
}

/// What [`mutate`] decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Mutation {
    /// Left alone, and why.
    Skipped(Skip),
    /// The operations that inject stepmesh.
    Patch(Vec<PatchOp>),
}

/// Why a pod cannot be injected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MutateError {
    /// Not a pod: no `spec` object or no containers.
    #[error("not a pod: {0}")]
    NotAPod(&'static str),
    /// A per-pod annotation is unusable.
    #[error(transparent)]
    Annotation(#[from] BadAnnotation),
    /// The pod already uses a name the injector needs.
    #[error("the pod already has a volume named {0:?}")]
    VolumeNameTaken(String),
    /// An app container would run as the proxy's UID, whose traffic the
    /// interception lets through untouched.
    #[error("container {0:?} runs as UID {1}, the sidecar's: its traffic would bypass the mesh; run it as another user, or opt the pod out with the annotation stepmesh.io/inject: \"false\"")]
    ProxyUid(String, u32),
    /// An app container adds `NET_RAW`, which sends around the sidecar, or
    /// its capabilities cannot be read.
    #[error(transparent)]
    NetRaw(#[from] super::net_raw::NetRawError),
    /// An app container already mounts something where the Workload API
    /// socket's volume goes.
    #[error("container {container:?} already mounts {path} (stepmesh.io/workload-api needs it)")]
    MountPathTaken {
        /// The container.
        container: String,
        /// The mount path.
        path: &'static str,
    },
}

/// The JSON Patch that injects stepmesh into `pod` (a Pod, or the `template`
/// of a workload: any object with `metadata` and `spec`). Valid whether or not
/// the arrays and maps it adds to exist; unknown fields are never touched.
pub fn mutate(
    pod: &Value,
    config: &InjectorConfig,
    namespace: &str,
) -> Result<Mutation, MutateError> {
    let empty = Map::new();
    let metadata = pod.get("metadata").and_then(Value::as_object);
    let annotations = metadata
        .and_then(|m| m.get("annotations"))
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let spec = pod
        .get("spec")
        .and_then(Value::as_object)
        .ok_or(MutateError::NotAPod("no spec"))?;
    let containers = spec
        .get("containers")
        .and_then(Value::as_array)
        .filter(|c| !c.is_empty())
        .ok_or(MutateError::NotAPod("no containers"))?;
    let init_containers = spec.get("initContainers").and_then(Value::as_array);

    if let Some(skip) = skip(
        config,
        namespace,
        annotations,
        spec,
        containers,
        init_containers,
    )? {
        return Ok(Mutation::Skipped(skip));
    }
    as_proxy_uid(config, spec, containers, init_containers)?;
    let mut settings = PodSettings::new(config, annotations)?;
    // Probe operations index the containers as they are now: they come
    // before the classic sidecar is inserted at `/spec/containers/0`.
    let probes = if settings.rewrite_probes {
        probes::rewrite(containers, config.admin_port)
    } else {
        probes::Rewrite::default()
    };
    if settings.exclude_probe_ports {
        for port in probe_ports(containers, &probes) {
            if !settings.exclude_inbound_ports.contains(&port) {
                settings.exclude_inbound_ports.push(port);
            }
        }
    }
    let volumes = spec.get("volumes").and_then(Value::as_array);
    for existing in volumes.into_iter().flatten() {
        let name = existing.get("name").and_then(Value::as_str).unwrap_or("");
        if VOLUMES.contains(&name) || (settings.workload_api && name == WORKLOAD_API_VOLUME) {
            return Err(MutateError::VolumeNameTaken(name.to_owned()));
        }
    }

    let native = settings.native_sidecar;
    let init = template::init_container(config, &settings);
    let proxy = template::proxy_container(config, &settings, native, &probes.table);
    let mut ops = probes.ops;
    ops.reserve(12);
    if settings.workload_api {
        // Like the probe operations: before the classic sidecar moves the
        // app containers' indices.
        ops.extend(workload_api_ops(containers)?);
    }
    // The same: before our init containers move the app's.
    ops.extend(net_raw::drop_ops("containers", containers)?);
    ops.extend(net_raw::drop_ops(
        "initContainers",
        init_containers.map_or(&[][..], Vec::as_slice),
    )?);

    // Order matters: the iptables init first; with native sidecars the proxy
    // next, so the app's own init containers already run in the mesh.
    // Classic: the app's init containers run before interception, and the
    // proxy is the first container (kubelet starts containers in order).
    match (native, init_containers) {
        (true, None) => ops.push(PatchOp::add("/spec/initContainers", json!([init, proxy]))),
        (true, Some(_)) => {
            ops.push(PatchOp::add("/spec/initContainers/0", init));
            ops.push(PatchOp::add("/spec/initContainers/1", proxy));
        }
        (false, existing) => {
            ops.push(match existing {
                None => PatchOp::add("/spec/initContainers", json!([init])),
                Some(_) => PatchOp::add("/spec/initContainers/-", init),
            });
            ops.push(PatchOp::add("/spec/containers/0", proxy));
        }
    }
    let mut added: Vec<Value> = template::volumes(config, &settings).into();
    let mut volume_names = VOLUMES.to_vec();
    if settings.workload_api {
        added.push(template::workload_api_volume());
        volume_names.push(WORKLOAD_API_VOLUME);
    }
    match volumes {
        None => ops.push(PatchOp::add("/spec/volumes", Value::Array(added))),
        Some(_) => ops.extend(
            added
                .into_iter()
                .map(|v| PatchOp::add("/spec/volumes/-", v)),
        ),
    }

    let mode = if native { "native" } else { "classic" };
    let status = json!({
        "initContainers": if native { vec![INIT_NAME, PROXY_NAME] } else { vec![INIT_NAME] },
        "containers": if native { vec![] } else { vec![PROXY_NAME] },
        "volumes": volume_names,
    });
    let mut add_annotations = vec![
        (ann::INJECTED, json!("true")),
        (ann::SIDECAR_MODE, json!(mode)),
        (ann::PROXY_IMAGE, json!(config.image)),
        (ann::STATUS, json!(status.to_string())),
    ];
    let default_container = "kubectl.kubernetes.io/default-container";
    if !native && !annotations.contains_key(default_container) {
        // The proxy is now first; keep `kubectl logs/exec` on the app.
        let app = containers[0].get("name").cloned().unwrap_or(Value::Null);
        add_annotations.push((default_container, app));
    }
    let label = service_account_label(spec);
    let labels = vec![(ann::SERVICE_ACCOUNT_LABEL, json!(label))];
    if metadata.is_none() {
        ops.push(PatchOp::add("/metadata", json!({})));
    }
    add_map_entries(&mut ops, metadata, "annotations", add_annotations);
    add_map_entries(&mut ops, metadata, "labels", labels);
    Ok(Mutation::Patch(ops))
}

/// The `stepmesh.io/service-account` label of a pod running as `spec`'s
/// ServiceAccount, read as the API server reads it (the deprecated
/// `serviceAccount` when `serviceAccountName` is empty or absent; `default`
/// without either). A label value is at most 63 characters: a longer name
/// gets the empty value, which no NetworkPolicy allow selects (deny, the
/// safe side), over whatever value the pod brought (it must not choose its
/// own). deploy/injector/service-account-label.yaml holds every pod to it.
fn service_account_label(spec: &Map<String, Value>) -> &str {
    let named = |key: &str| {
        spec.get(key)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let sa = named("serviceAccountName")
        .or_else(|| named("serviceAccount"))
        .unwrap_or("default");
    if sa.len() <= 63 {
        sa
    } else {
        ""
    }
}

/// Refuses a pod with an app container (or app init container) running as
/// the proxy's UID, by its own `runAsUser` or the pod's: the iptables rules
/// let that UID's traffic out untouched, so it would leave the mesh and the
/// outbound policy behind. (A UID only the image's `USER` names is not seen
/// here.)
fn as_proxy_uid(
    config: &InjectorConfig,
    spec: &Map<String, Value>,
    containers: &[Value],
    init_containers: Option<&Vec<Value>>,
) -> Result<(), MutateError> {
    let uid = |v: &Value| {
        v.pointer("/securityContext/runAsUser")
            .and_then(Value::as_u64)
    };
    let pod_uid = spec
        .get("securityContext")
        .and_then(|s| s.get("runAsUser"))
        .and_then(Value::as_u64);
    for c in containers
        .iter()
        .chain(init_containers.into_iter().flatten())
    {
        if uid(c).or(pod_uid) == Some(u64::from(config.proxy_uid)) {
            let name = c.get("name").and_then(Value::as_str).unwrap_or_default();
            return Err(MutateError::ProxyUid(name.to_owned(), config.proxy_uid));
        }
    }
    Ok(())
}

/// Mounts the Workload API socket's directory into every app container and
/// points SPIFFE libraries at it; a container that sets
/// `SPIFFE_ENDPOINT_SOCKET` itself keeps its own value.
fn workload_api_ops(containers: &[Value]) -> Result<Vec<PatchOp>, MutateError> {
    let mut ops = Vec::new();
    for (i, c) in containers.iter().enumerate() {
        let mounts = c.get("volumeMounts").and_then(Value::as_array);
        let taken = mounts.into_iter().flatten().any(|m| {
            m.get("mountPath")
                .and_then(Value::as_str)
                .map(|p| p.trim_end_matches('/'))
                == Some(WORKLOAD_API_DIR)
        });
        if taken {
            let name = c.get("name").and_then(Value::as_str).unwrap_or("?");
            return Err(MutateError::MountPathTaken {
                container: name.to_owned(),
                path: WORKLOAD_API_DIR,
            });
        }
        let mount = template::workload_api_mount();
        ops.push(match mounts {
            Some(_) => PatchOp::add(format!("/spec/containers/{i}/volumeMounts/-"), mount),
            None => PatchOp::add(format!("/spec/containers/{i}/volumeMounts"), json!([mount])),
        });
        let env = c.get("env").and_then(Value::as_array);
        let own = env
            .into_iter()
            .flatten()
            .any(|e| e.get("name").and_then(Value::as_str) == Some(SPIFFE_ENDPOINT_SOCKET));
        if own {
            continue;
        }
        let var = template::workload_api_env();
        ops.push(match env {
            Some(_) => PatchOp::add(format!("/spec/containers/{i}/env/-"), var),
            None => PatchOp::add(format!("/spec/containers/{i}/env"), json!([var])),
        });
    }
    Ok(ops)
}

fn skip(
    config: &InjectorConfig,
    namespace: &str,
    annotations: &Map<String, Value>,
    spec: &Map<String, Value>,
    containers: &[Value],
    init_containers: Option<&Vec<Value>>,
) -> Result<Option<Skip>, MutateError> {
    let ours = |c: &Value| {
        let name = c.get("name").and_then(Value::as_str);
        name == Some(INIT_NAME) || name == Some(PROXY_NAME)
    };
    if annotations.contains_key(ann::INJECTED)
        || containers.iter().any(ours)
        || init_containers.into_iter().flatten().any(ours)
    {
        return Ok(Some(Skip::AlreadyInjected));
    }
    if ann::opted_out(annotations)? {
        return Ok(Some(Skip::OptedOut));
    }
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Ok(Some(Skip::HostNetwork));
    }
    if spec
        .get("os")
        .and_then(|os| os.get("name"))
        .and_then(Value::as_str)
        == Some("windows")
    {
        return Ok(Some(Skip::Windows));
    }
    if config.excluded_namespaces.iter().any(|n| n == namespace) {
        return Ok(Some(Skip::ExcludedNamespace));
    }
    Ok(None)
}

/// Adds `entries` to `metadata.<map>`, creating the map when absent: adding
/// a member to a missing object is not valid JSON Patch.
fn add_map_entries(
    ops: &mut Vec<PatchOp>,
    metadata: Option<&Map<String, Value>>,
    map: &str,
    entries: Vec<(&str, Value)>,
) {
    if entries.is_empty() {
        return;
    }
    let exists = metadata
        .and_then(|m| m.get(map))
        .is_some_and(Value::is_object);
    if exists {
        for (key, value) in entries {
            ops.push(PatchOp::add(
                format!("/metadata/{map}/{}", escape(key)),
                value,
            ));
        }
        return;
    }
    let whole: Map<String, Value> = entries
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    ops.push(PatchOp::add(
        format!("/metadata/{map}"),
        Value::Object(whole),
    ));
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
#[path = "mutate_tests.rs"]
mod tests;

#[cfg(test)]
mod label_tests {
    use serde_json::{json, Value};

    fn label(spec: Value) -> String {
        super::service_account_label(spec.as_object().unwrap_or(&Default::default())).to_owned()
    }

    #[test]
    fn the_label_is_the_account_the_api_server_runs_the_pod_as() {
        assert_eq!(label(json!({"serviceAccountName": "api"})), "api");
        assert_eq!(label(json!({})), "default");
        assert_eq!(label(json!({"serviceAccount": "old"})), "old");
        let both = json!({"serviceAccountName": "", "serviceAccount": "old"});
        assert_eq!(
            label(both),
            "old",
            "an empty name falls back as the API server does"
        );
        let long = "s".repeat(64);
        assert_eq!(label(json!({"serviceAccountName": long})), "");
        assert_eq!(
            label(json!({"serviceAccountName": &long[..63]})),
            &long[..63]
        );
    }
}
