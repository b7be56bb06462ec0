//! `NET_RAW` taken from the app's containers. Container runtimes grant it by
//! default (containerd and CRI-O do), and Pod Security `baseline` allows
//! that. With it an app opens packet sockets, whose frames pass no iptables
//! rule, and raw IP sockets, whose hand-made TCP conntrack finds invalid
//! and the nat table never sees: both go around the sidecar's interception
//! and the `--non-tcp` rules alike, in and out. The sidecar and the init
//! container are ours and made without it (the init container adds it back
//! for iptables).

use serde_json::{json, Value};

use super::patch::PatchOp;

/// The capability taken.
const NET_RAW: &str = "NET_RAW";

/// Why `NET_RAW` cannot be dropped from a container.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetRawError {
    /// It adds the capability, which the mesh cannot allow.
    #[error("container {0:?} adds NET_RAW: raw and packet sockets send around the sidecar; remove it (ping works without it where net.ipv4.ping_group_range allows), or opt the pod out with the annotation stepmesh.io/inject: \"false\"")]
    Adds(String),
    /// A field on the way to its capabilities has the wrong type (no API
    /// server sends one; a file given to `inject -f` may).
    #[error("container {container:?}: {field} is not {expected}")]
    Malformed {
        /// The container.
        container: String,
        /// The field.
        field: &'static str,
        /// What it must be.
        expected: &'static str,
    },
}

/// `v`'s member `key`; a field left empty in a YAML file (null) is absent:
/// the patch sets it.
fn field<'a>(v: Option<&'a Value>, key: &str) -> Option<&'a Value> {
    v?.get(key).filter(|f| !f.is_null())
}

/// The operations that drop `NET_RAW` from each container of `list`
/// (`containers` or `initContainers`, as the pod has them now), whatever
/// of `securityContext.capabilities.drop` exists; none for a container that
/// already drops it or `ALL`. Refused when a container adds it.
pub fn drop_ops(list: &str, containers: &[Value]) -> Result<Vec<PatchOp>, NetRawError> {
    let mut ops = Vec::new();
    for (i, c) in containers.iter().enumerate() {
        ops.extend(drop_op(list, i, c)?);
    }
    Ok(ops)
}

/// As [`drop_ops`], for the one container `c` at index `i` of `list`.
pub fn drop_op(list: &str, i: usize, c: &Value) -> Result<Option<PatchOp>, NetRawError> {
    let name = || {
        c.get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let malformed = |field, expected| NetRawError::Malformed {
        container: name(),
        field,
        expected,
    };
    let context = field(Some(c), "securityContext");
    let capabilities = field(context, "capabilities");
    for (value, what) in [
        (context, "securityContext"),
        (capabilities, "securityContext.capabilities"),
    ] {
        if value.is_some_and(|v| !v.is_object()) {
            return Err(malformed(what, "an object"));
        }
    }
    for (key, what) in [
        ("add", "securityContext.capabilities.add"),
        ("drop", "securityContext.capabilities.drop"),
    ] {
        if field(capabilities, key).is_some_and(|v| !v.is_array()) {
            return Err(malformed(what, "a list"));
        }
    }
    let caps = |key: &str| {
        field(capabilities, key)
            .and_then(Value::as_array)
            .map_or(&[][..], Vec::as_slice)
            .iter()
            .filter_map(Value::as_str)
    };
    // Added in any spelling a runtime might take (CRI-O also takes a
    // `CAP_` prefix): refused. Dropped only as Kubernetes spells it:
    // anything else gets our own drop too.
    if caps("add").any(|cap| {
        let cap = cap.to_ascii_uppercase();
        let cap = cap.strip_prefix("CAP_").unwrap_or(&cap);
        cap == NET_RAW || cap == "ALL"
    }) {
        return Err(NetRawError::Adds(name()));
    }
    if caps("drop").any(|cap| cap == NET_RAW || cap == "ALL") {
        return Ok(None);
    }
    let at = format!("/spec/{list}/{i}/securityContext");
    Ok(Some(
        match (context, capabilities, field(capabilities, "drop")) {
            (None, ..) => PatchOp::add(at, json!({"capabilities": {"drop": [NET_RAW]}})),
            (Some(_), None, _) => {
                PatchOp::add(format!("{at}/capabilities"), json!({"drop": [NET_RAW]}))
            }
            (Some(_), Some(_), None) => {
                PatchOp::add(format!("{at}/capabilities/drop"), json!([NET_RAW]))
            }
            (Some(_), Some(_), Some(_)) => {
                PatchOp::add(format!("{at}/capabilities/drop/-"), json!(NET_RAW))
            }
        },
    ))
}

/// The operations that drop `NET_RAW` from the ephemeral containers
/// `kubectl debug` adds to a pod (those `old`, the stored pod, does not
/// have): an ephemeral container joins the pod's network namespace, and
/// with the runtime's `NET_RAW` it sends around the sidecar as an app
/// container would. Those already there are left alone: the API server
/// refuses any change to them. Refused when a new one adds it.
pub fn ephemeral_drop_ops(pod: &Value, old: &Value) -> Result<Vec<PatchOp>, NetRawError> {
    fn list(pod: &Value) -> &[Value] {
        pod.pointer("/spec/ephemeralContainers")
            .and_then(Value::as_array)
            .map_or(&[][..], Vec::as_slice)
    }
    let name = |c: &Value| c.get("name").and_then(Value::as_str).map(str::to_owned);
    let before: Vec<Option<String>> = list(old).iter().map(name).collect();
    let mut ops = Vec::new();
    for (i, c) in list(pod).iter().enumerate() {
        if !before.contains(&name(c)) {
            ops.extend(drop_op("ephemeralContainers", i, c)?);
        }
    }
    Ok(ops)
}

/// `containers` (a pod's array) as the injector leaves them: `NET_RAW`
/// dropped from each. For tests that compare app containers.
#[cfg(test)]
pub(crate) fn dropped(containers: &Value) -> Value {
    let mut pod = json!({"spec": {"containers": containers}});
    let list = containers.as_array().map_or(&[][..], Vec::as_slice);
    // Test fixtures: no container there adds NET_RAW, and the ops apply.
    let ops = drop_ops("containers", list).unwrap_or_default();
    let _ = super::patch::apply(&mut pod, &ops);
    pod["spec"]["containers"].take()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::inject::patch::apply;

    #[test]
    fn every_form_of_security_context_ends_dropping_net_raw() {
        let mut pod = json!({"spec": {"containers": [
            {"name": "bare"},
            {"name": "context", "securityContext": {"runAsUser": 1000}},
            {"name": "caps", "securityContext": {"capabilities": {"add": ["CHOWN"]}}},
            {"name": "drops", "securityContext": {"capabilities": {"drop": ["MKNOD"]}}},
            {"name": "all", "securityContext": {"capabilities": {"drop": ["ALL"]}}},
            {"name": "already", "securityContext": {"capabilities": {"drop": ["NET_RAW"]}}},
        ]}});
        let containers = pod["spec"]["containers"].as_array().unwrap().clone();
        let ops = drop_ops("containers", &containers).unwrap();
        assert_eq!(ops.len(), 4, "{ops:?}");
        apply(&mut pod, &ops).unwrap();
        let drops: Vec<Value> = pod["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["securityContext"]["capabilities"]["drop"].clone())
            .collect();
        assert_eq!(
            drops,
            [
                json!(["NET_RAW"]),
                json!(["NET_RAW"]),
                json!(["NET_RAW"]),
                json!(["MKNOD", "NET_RAW"]),
                json!(["ALL"]),
                json!(["NET_RAW"]),
            ]
        );
        assert_eq!(
            pod["spec"]["containers"][1]["securityContext"]["runAsUser"],
            1000
        );
        assert_eq!(
            pod["spec"]["containers"][2]["securityContext"]["capabilities"]["add"],
            json!(["CHOWN"])
        );
    }

    #[test]
    fn the_injected_pod_drops_net_raw_from_the_apps_containers_only() {
        use crate::inject::config::InjectorConfig;
        use crate::inject::mutate::{mutate, MutateError, Mutation};
        let mut pod = json!({"metadata": {"name": "web"}, "spec": {
            "initContainers": [{"name": "migrate", "image": "app"}],
            "containers": [{"name": "app", "image": "app"}],
        }});
        let Mutation::Patch(ops) = mutate(&pod, &InjectorConfig::default(), "apps").unwrap() else {
            panic!("expected a patch");
        };
        apply(&mut pod, &ops).unwrap();
        let caps =
            |list: &str, i: usize| pod["spec"][list][i]["securityContext"]["capabilities"].clone();
        let names: Vec<&str> = pod["spec"]["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["stepmesh-init", "stepmesh-proxy", "migrate"]);
        assert_eq!(caps("initContainers", 2), json!({"drop": ["NET_RAW"]}));
        assert_eq!(caps("containers", 0), json!({"drop": ["NET_RAW"]}));
        assert_eq!(
            caps("initContainers", 0),
            json!({"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]})
        );

        let adds = json!({"spec": {"containers": [
            {"name": "pinger", "securityContext": {"capabilities": {"add": ["NET_RAW"]}}}
        ]}});
        let err = mutate(&adds, &InjectorConfig::default(), "apps").unwrap_err();
        assert!(matches!(err, MutateError::NetRaw(_)), "{err}");
    }

    #[test]
    fn any_spelling_of_an_added_net_raw_is_refused_and_empty_fields_are_filled() {
        for cap in ["net_raw", "CAP_NET_RAW", "cap_net_raw", "all"] {
            let containers = [
                json!({"name": "c", "securityContext": {"capabilities": {"drop": ["ALL"], "add": [cap]}}}),
            ];
            assert!(drop_ops("containers", &containers).is_err(), "{cap}");
        }
        // A drop spelled otherwise than Kubernetes does gets ours beside it.
        let mut pod = json!({"spec": {"containers": [
            {"name": "lower", "securityContext": {"capabilities": {"drop": ["all"]}}},
            {"name": "null", "securityContext": null},
            {"name": "nulls", "securityContext": {"capabilities": null}},
        ]}});
        let containers = pod["spec"]["containers"].as_array().unwrap().clone();
        let ops = drop_ops("containers", &containers).unwrap();
        apply(&mut pod, &ops).unwrap();
        for (i, drop) in [
            json!(["all", "NET_RAW"]),
            json!(["NET_RAW"]),
            json!(["NET_RAW"]),
        ]
        .iter()
        .enumerate()
        {
            assert_eq!(
                &pod["spec"]["containers"][i]["securityContext"]["capabilities"]["drop"],
                drop
            );
        }
    }

    /// `kubectl debug`: only the ephemeral containers the request adds get
    /// the drop, at their index; those already there cannot change.
    #[test]
    fn new_ephemeral_containers_drop_net_raw_and_old_ones_are_left() {
        let old = json!({"spec": {"ephemeralContainers": [{"name": "debugger-a"}]}});
        let mut pod = json!({"spec": {"ephemeralContainers": [
            {"name": "debugger-a"},
            {"name": "debugger-b", "image": "busybox"},
            {"name": "debugger-c", "securityContext": {"capabilities": {"drop": ["ALL"]}}},
        ]}});
        let ops = ephemeral_drop_ops(&pod, &old).unwrap();
        assert_eq!(ops.len(), 1, "{ops:?}");
        apply(&mut pod, &ops).unwrap();
        let list = &pod["spec"]["ephemeralContainers"];
        assert_eq!(list[0], json!({"name": "debugger-a"}));
        assert_eq!(
            list[1]["securityContext"]["capabilities"]["drop"],
            json!(["NET_RAW"])
        );
        // No ephemeral container before (a first debug session): every one is new.
        assert_eq!(ephemeral_drop_ops(&old, &json!({})).unwrap().len(), 1);
        let adds = json!({"spec": {"ephemeralContainers": [
            {"name": "sniffer", "securityContext": {"capabilities": {"add": ["NET_RAW"]}}},
        ]}});
        let err = ephemeral_drop_ops(&adds, &old).unwrap_err();
        assert_eq!(err, NetRawError::Adds("sniffer".into()));
    }

    #[test]
    fn a_container_adding_net_raw_is_refused_by_name() {
        let containers =
            [json!({"name": "pinger", "securityContext": {"capabilities": {"add": ["NET_RAW"]}}})];
        let err = drop_ops("initContainers", &containers).unwrap_err();
        assert_eq!(err, NetRawError::Adds("pinger".into()));
        // A field of the wrong type is named, not patched.
        for (bad, field) in [
            (
                json!({"securityContext": "x"}),
                "securityContext is not an object",
            ),
            (
                json!({"securityContext": {"capabilities": 1}}),
                "capabilities is not an object",
            ),
            (
                json!({"securityContext": {"capabilities": {"drop": "ALL"}}}),
                "drop is not a list",
            ),
            (
                json!({"securityContext": {"capabilities": {"add": {}}}}),
                "add is not a list",
            ),
        ] {
            let err = drop_ops("containers", &[bad]).unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
        assert!(err.to_string().contains("stepmesh.io/inject"), "{err}");
    }
}
