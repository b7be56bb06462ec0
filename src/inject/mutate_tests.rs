//! Unit tests of [`super::mutate`]; patches applied with the json-patch
//! crate, an implementation that is not ours.

use serde_json::{json, Value};

use super::*;

fn apply(pod: &Value, config: &InjectorConfig) -> Value {
    let Mutation::Patch(ops) = mutate(pod, config, "apps").unwrap() else {
        panic!("expected a patch");
    };
    let patch: json_patch::Patch =
        serde_json::from_value(serde_json::to_value(&ops).unwrap()).unwrap();
    let mut out = pod.clone();
    json_patch::patch(&mut out, &patch).unwrap();
    out
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect()
}

fn bare() -> Value {
    json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "app", "image": "x"}], "futureField": {"kept": 1}}})
}

#[test]
fn bare_pod_gets_everything_with_containers_created() {
    let out = apply(&bare(), &InjectorConfig::default());
    assert_eq!(
        names(&out["spec"]["initContainers"]),
        ["stepmesh-init", "stepmesh-proxy"]
    );
    assert_eq!(names(&out["spec"]["containers"]), ["app"]);
    assert_eq!(names(&out["spec"]["volumes"]), VOLUMES);
    let proxy = &out["spec"]["initContainers"][1];
    assert_eq!(proxy["restartPolicy"], "Always");
    assert_eq!(proxy["securityContext"]["runAsUser"], 1337);
    assert_eq!(proxy["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        proxy["securityContext"]["capabilities"]["drop"],
        json!(["ALL"])
    );
    assert_eq!(proxy["readinessProbe"]["httpGet"]["path"], "/ready");
    let init = &out["spec"]["initContainers"][0];
    assert_eq!(
        init["securityContext"]["capabilities"]["add"],
        json!(["NET_ADMIN", "NET_RAW"])
    );
    assert_eq!(init["securityContext"]["runAsUser"], 0);
    let ann = &out["metadata"]["annotations"];
    assert_eq!(ann["stepmesh.io/injected"], "true");
    assert_eq!(ann["stepmesh.io/sidecar-mode"], "native");
    assert_eq!(
        out["metadata"]["labels"]["stepmesh.io/service-account"],
        "default"
    );
    assert_eq!(
        out["spec"]["futureField"],
        json!({"kept": 1}),
        "unknown fields survive"
    );
    let token = &out["spec"]["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(token["audience"], "stepmesh-ca");
}

#[test]
fn existing_init_containers_run_after_init_and_proxy() {
    let mut pod = bare();
    pod["metadata"]["annotations"] = json!({"a/b": "c"});
    pod["metadata"]["labels"] = json!({"app": "x", "stepmesh.io/service-account": "payments"});
    pod["spec"]["initContainers"] = json!([{"name": "migrate", "image": "m"}]);
    pod["spec"]["volumes"] = json!([{"name": "data", "emptyDir": {}}]);
    pod["spec"]["serviceAccountName"] = json!("api");
    let out = apply(&pod, &InjectorConfig::default());
    assert_eq!(
        names(&out["spec"]["initContainers"]),
        ["stepmesh-init", "stepmesh-proxy", "migrate"]
    );
    assert_eq!(names(&out["spec"]["volumes"])[0], "data");
    assert_eq!(out["spec"]["volumes"].as_array().unwrap().len(), 4);
    assert_eq!(out["metadata"]["annotations"]["a/b"], "c");
    assert_eq!(out["metadata"]["labels"]["app"], "x");
    assert_eq!(
        out["metadata"]["labels"]["stepmesh.io/service-account"],
        "api"
    );
    pod["spec"]["serviceAccountName"] = json!("s".repeat(64));
    let out = apply(&pod, &InjectorConfig::default());
    assert_eq!(out["metadata"]["labels"]["stepmesh.io/service-account"], "");
}

#[test]
fn classic_mode_puts_proxy_first_and_init_last() {
    let mut pod = bare();
    pod["spec"]["initContainers"] = json!([{"name": "migrate", "image": "m"}]);
    let config = InjectorConfig {
        native_sidecar: false,
        ..InjectorConfig::default()
    };
    let out = apply(&pod, &config);
    assert_eq!(
        names(&out["spec"]["initContainers"]),
        ["migrate", "stepmesh-init"]
    );
    assert_eq!(names(&out["spec"]["containers"]), ["stepmesh-proxy", "app"]);
    assert!(out["spec"]["containers"][0].get("restartPolicy").is_none());
    let ann = &out["metadata"]["annotations"];
    assert_eq!(ann["kubectl.kubernetes.io/default-container"], "app");
    assert_eq!(ann["stepmesh.io/sidecar-mode"], "classic");

    // The annotation switches a native-default injector to classic, and back.
    let mut pod = bare();
    pod["metadata"]["annotations"] = json!({"stepmesh.io/native-sidecar": "false"});
    let out = apply(&pod, &InjectorConfig::default());
    assert_eq!(names(&out["spec"]["containers"]), ["stepmesh-proxy", "app"]);
    pod["metadata"]["annotations"] = json!({"stepmesh.io/native-sidecar": "true"});
    let out = apply(&pod, &config);
    assert_eq!(names(&out["spec"]["containers"]), ["app"]);
}

#[test]
fn exclusions_reach_the_init_container_args() {
    let mut pod = bare();
    pod["metadata"]["annotations"] = json!({
        "stepmesh.io/exclude-inbound-ports": "9090",
        "stepmesh.io/exclude-outbound-ports": "5432,6379",
        "stepmesh.io/exclude-outbound-cidrs": "169.254.169.254/32",
    });
    let out = apply(&pod, &InjectorConfig::default());
    let args: Vec<&str> = out["spec"]["initContainers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let after = |flag: &str| args[args.iter().position(|a| *a == flag).unwrap() + 1];
    assert_eq!(after("--exclude-inbound-ports"), "9090");
    assert_eq!(after("--exclude-outbound-ports"), "5432,6379");
    assert_eq!(after("--exclude-outbound-cidrs"), "169.254.169.254/32");
}

#[test]
fn drain_timeout_reaches_the_sidecar_args_only_when_set() {
    let proxy_args = |pod: &Value, config: &InjectorConfig| {
        apply(pod, config)["spec"]["initContainers"][1]["args"].clone()
    };
    let default = proxy_args(&bare(), &InjectorConfig::default());
    assert!(
        !default.to_string().contains("--drain-timeout"),
        "{default}"
    );
    let config = InjectorConfig {
        proxy_drain_timeout: Some(std::time::Duration::from_millis(2500)),
        ..InjectorConfig::default()
    };
    let args = proxy_args(&bare(), &config);
    assert!(
        args.to_string().ends_with(r#""--drain-timeout","2.5s"]"#),
        "{args}"
    );
    // The annotation wins over the configuration.
    let mut pod = bare();
    pod["metadata"]["annotations"] = json!({"stepmesh.io/proxy-drain-timeout": "1m30s"});
    let args = proxy_args(&pod, &config);
    assert!(
        args.to_string().ends_with(r#""--drain-timeout","90s"]"#),
        "{args}"
    );
}

#[test]
fn probe_ports_are_excluded_only_when_asked() {
    let mut pod = bare();
    pod["spec"]["containers"][0]["readinessProbe"] =
        json!({"httpGet": {"path": "/healthz", "port": 8080}});
    let init_args = |out: &Value| out["spec"]["initContainers"][0]["args"].to_string();
    let out = apply(&pod, &InjectorConfig::default());
    assert!(
        !init_args(&out).contains("--exclude-inbound-ports"),
        "off by default"
    );
    // Asked for, with rewriting on: the probe went to the admin port, so
    // its port needs no exclusion (it keeps mTLS).
    pod["metadata"]["annotations"] = json!({
        "stepmesh.io/exclude-probe-ports": "true",
        "stepmesh.io/exclude-inbound-ports": "9090",
    });
    let out = apply(&pod, &InjectorConfig::default());
    assert!(
        init_args(&out).contains(r#""--exclude-inbound-ports","9090""#),
        "{}",
        init_args(&out)
    );
    // ... with rewriting off, the probed port is excluded.
    pod["metadata"]["annotations"] = json!({
        "stepmesh.io/exclude-probe-ports": "true",
        "stepmesh.io/rewrite-probes": "false",
        "stepmesh.io/exclude-inbound-ports": "9090",
    });
    let out = apply(&pod, &InjectorConfig::default());
    assert!(
        init_args(&out).contains(r#""--exclude-inbound-ports","9090,8080""#),
        "{}",
        init_args(&out)
    );
    let config = InjectorConfig {
        exclude_probe_ports: true,
        rewrite_probes: false,
        ..InjectorConfig::default()
    };
    pod["metadata"]["annotations"] = json!({"stepmesh.io/exclude-probe-ports": "false"});
    let out = apply(&pod, &config);
    assert!(
        !init_args(&out).contains("--exclude-inbound-ports"),
        "the annotation wins"
    );
}

#[test]
fn skips_and_idempotence() {
    let config = InjectorConfig::default();
    let injected = apply(&bare(), &config);
    assert_eq!(
        mutate(&injected, &config, "apps").unwrap(),
        Mutation::Skipped(Skip::AlreadyInjected)
    );
    let mut opted_out = bare();
    opted_out["metadata"]["annotations"] = json!({"stepmesh.io/inject": "false"});
    assert_eq!(
        mutate(&opted_out, &config, "apps").unwrap(),
        Mutation::Skipped(Skip::OptedOut)
    );
    let mut host = bare();
    host["spec"]["hostNetwork"] = json!(true);
    assert_eq!(
        mutate(&host, &config, "apps").unwrap(),
        Mutation::Skipped(Skip::HostNetwork)
    );
    assert_eq!(
        mutate(&bare(), &config, "kube-system").unwrap(),
        Mutation::Skipped(Skip::ExcludedNamespace)
    );
    let mut windows = bare();
    windows["spec"]["os"] = json!({"name": "windows"});
    assert_eq!(
        mutate(&windows, &config, "apps").unwrap(),
        Mutation::Skipped(Skip::Windows)
    );
}

#[test]
fn no_metadata_and_bad_input() {
    let out = apply(
        &json!({"spec": {"containers": [{"name": "a", "image": "x"}]}}),
        &InjectorConfig::default(),
    );
    assert_eq!(
        out["metadata"]["annotations"]["stepmesh.io/injected"],
        "true"
    );
    assert_eq!(
        out["metadata"]["labels"]["stepmesh.io/service-account"],
        "default"
    );
    let config = InjectorConfig::default();
    assert_eq!(
        mutate(&json!({"spec": {"containers": []}}), &config, "a"),
        Err(MutateError::NotAPod("no containers"))
    );
    assert_eq!(
        mutate(&json!({"kind": "Service"}), &config, "a"),
        Err(MutateError::NotAPod("no spec"))
    );
    let mut taken = bare();
    taken["spec"]["volumes"] = json!([{"name": "stepmesh-token", "emptyDir": {}}]);
    assert!(matches!(
        mutate(&taken, &config, "a"),
        Err(MutateError::VolumeNameTaken(_))
    ));
    let mut bad = bare();
    bad["metadata"]["annotations"] = json!({"stepmesh.io/exclude-inbound-ports": "http"});
    let err = mutate(&bad, &config, "a").unwrap_err().to_string();
    assert!(err.contains("stepmesh.io/exclude-inbound-ports"), "{err}");
}

/// Every combination of present, empty, null and absent targets, in both
/// modes: the patch applies (json-patch crate), our containers land where
/// they belong, nothing of the pod is lost, and a second pass is a no-op.
#[test]
fn patch_applies_over_every_shape_of_pod() {
    let shapes = |present: Value| [None, Some(Value::Null), Some(json!([])), Some(present)];
    let maps = [
        None,
        Some(Value::Null),
        Some(json!({})),
        Some(json!({"k/x": "v"})),
    ];
    let mut cases = 0;
    for native in [true, false] {
        let config = InjectorConfig {
            native_sidecar: native,
            ..InjectorConfig::default()
        };
        for init in shapes(json!([{"name": "migrate", "image": "m"}])) {
            for volumes in shapes(json!([{"name": "data", "emptyDir": {}}])) {
                for annotations in &maps {
                    for labels in &maps {
                        for metadata in [true, false] {
                            let mut pod = bare();
                            set(&mut pod["spec"], "initContainers", init.clone());
                            set(&mut pod["spec"], "volumes", volumes.clone());
                            if metadata {
                                set(&mut pod["metadata"], "annotations", annotations.clone());
                                set(&mut pod["metadata"], "labels", labels.clone());
                            } else {
                                pod.as_object_mut().unwrap().remove("metadata");
                            }
                            let out = apply(&pod, &config);
                            check(&pod, &out, native);
                            assert_eq!(
                                mutate(&out, &config, "apps").unwrap(),
                                Mutation::Skipped(Skip::AlreadyInjected)
                            );
                            cases += 1;
                        }
                    }
                }
            }
        }
    }
    assert_eq!(cases, 2 * 4 * 4 * 4 * 4 * 2);
}

fn set(target: &mut Value, key: &str, value: Option<Value>) {
    let map = target.as_object_mut().unwrap();
    match value {
        Some(v) => map.insert(key.to_owned(), v),
        None => map.remove(key),
    };
}

fn check(before: &Value, after: &Value, native: bool) {
    let init = names(&after["spec"]["initContainers"]);
    let had_migrate = before["spec"]["initContainers"]
        .as_array()
        .is_some_and(|a| !a.is_empty());
    let expected: Vec<&str> = match (native, had_migrate) {
        (true, true) => vec!["stepmesh-init", "stepmesh-proxy", "migrate"],
        (true, false) => vec!["stepmesh-init", "stepmesh-proxy"],
        (false, true) => vec!["migrate", "stepmesh-init"],
        (false, false) => vec!["stepmesh-init"],
    };
    assert_eq!(init, expected, "{before}");
    let volumes = names(&after["spec"]["volumes"]);
    assert_eq!(&volumes[volumes.len() - 3..], VOLUMES, "{before}");
    if before["spec"]["volumes"]
        .as_array()
        .is_some_and(|a| !a.is_empty())
    {
        assert_eq!(volumes[0], "data");
    }
    if before.pointer("/metadata/annotations/k~1x").is_some() {
        assert_eq!(after["metadata"]["annotations"]["k/x"], "v");
    }
    if before.pointer("/metadata/labels/k~1x").is_some() {
        assert_eq!(after["metadata"]["labels"]["k/x"], "v");
    }
    assert_eq!(
        after["metadata"]["annotations"]["stepmesh.io/injected"],
        "true"
    );
    assert_eq!(
        after["metadata"]["labels"]["stepmesh.io/service-account"],
        "default"
    );
    let app = names(&after["spec"]["containers"]);
    assert_eq!(app.last(), Some(&"app"));
}

/// An app with every kind of probe: HTTP on a named port with headers,
/// TCP, gRPC, exec (never moved) and an HTTP probe with a host (not moved).
fn probed() -> Value {
    json!({"metadata": {"name": "p"}, "spec": {"containers": [
        {"name": "web", "image": "x",
         "ports": [{"name": "http", "containerPort": 8080}, {"name": "grpc", "containerPort": 9090}],
         "readinessProbe": {"httpGet": {"path": "/ready", "port": "http", "scheme": "HTTP",
                            "httpHeaders": [{"name": "X-Probe", "value": "1"}]},
                            "periodSeconds": 3, "timeoutSeconds": 2, "failureThreshold": 4,
                            "successThreshold": 1, "initialDelaySeconds": 5},
         "livenessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 10},
         "startupProbe": {"grpc": {"port": 9090, "service": "web"}, "failureThreshold": 30}},
        {"name": "worker", "image": "y",
         "readinessProbe": {"exec": {"command": ["true"]}},
         "livenessProbe": {"httpGet": {"host": "example.com", "path": "/", "port": 80}}},
    ]}})
}

fn probe_table(out: &Value, native: bool) -> Option<Value> {
    let proxy = if native {
        &out["spec"]["initContainers"][1]
    } else {
        &out["spec"]["containers"][0]
    };
    assert_eq!(proxy["name"], PROXY_NAME);
    let env = proxy["env"].as_array().unwrap();
    let value = env
        .iter()
        .find(|e| e["name"] == "STEPMESH_APP_PROBES")?
        .get("value")?
        .as_str()?;
    // Exactly what the sidecar accepts.
    crate::appprobe::parse(value).unwrap();
    Some(serde_json::from_str(value).unwrap())
}

#[test]
fn probes_move_to_the_admin_port_and_the_originals_to_the_sidecar() {
    for native in [true, false] {
        let config = InjectorConfig {
            native_sidecar: native,
            ..InjectorConfig::default()
        };
        let out = apply(&probed(), &config);
        let web = out["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "web")
            .unwrap();
        assert_eq!(
            web["readinessProbe"],
            json!({"httpGet": {"path": "/app-health/web/readyz", "port": 15020, "scheme": "HTTP"},
                   "periodSeconds": 3, "timeoutSeconds": 2, "failureThreshold": 4,
                   "successThreshold": 1, "initialDelaySeconds": 5}),
            "timing kept, handler replaced"
        );
        assert_eq!(
            web["livenessProbe"],
            json!({"httpGet": {"path": "/app-health/web/livez", "port": 15020, "scheme": "HTTP"},
                   "periodSeconds": 10})
        );
        assert_eq!(
            web["startupProbe"],
            json!({"httpGet": {"path": "/app-health/web/startupz", "port": 15020, "scheme": "HTTP"},
                   "failureThreshold": 30})
        );
        let table = probe_table(&out, native).unwrap();
        assert_eq!(
            table,
            json!({
                "/app-health/web/readyz": {"httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTP",
                    "httpHeaders": [{"name": "X-Probe", "value": "1"}]}, "timeoutSeconds": 2},
                "/app-health/web/livez": {"tcpSocket": {"port": 8080}, "timeoutSeconds": 1},
                "/app-health/web/startupz": {"grpc": {"port": 9090, "service": "web"}, "timeoutSeconds": 1},
            }),
            "named port resolved; exec and host probes not in the table"
        );
        let worker = out["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "worker")
            .unwrap();
        assert_eq!(
            worker["readinessProbe"],
            probed()["spec"]["containers"][1]["readinessProbe"]
        );
        assert_eq!(
            worker["livenessProbe"],
            probed()["spec"]["containers"][1]["livenessProbe"]
        );
        assert_eq!(
            mutate(&out, &config, "apps").unwrap(),
            Mutation::Skipped(Skip::AlreadyInjected)
        );
    }
}

#[test]
fn probe_rewriting_is_switched_off_by_annotation_or_config() {
    let original = net_raw::dropped(&probed()["spec"]["containers"]);
    let mut pod = probed();
    pod["metadata"]["annotations"] = json!({"stepmesh.io/rewrite-probes": "false"});
    let out = apply(&pod, &InjectorConfig::default());
    assert_eq!(out["spec"]["containers"], original, "as left");
    assert_eq!(probe_table(&out, true), None);

    let off = InjectorConfig {
        rewrite_probes: false,
        ..InjectorConfig::default()
    };
    let out = apply(&probed(), &off);
    assert_eq!(out["spec"]["containers"], original);
    assert_eq!(probe_table(&out, true), None);
    // ... and the annotation turns it back on.
    pod["metadata"]["annotations"] = json!({"stepmesh.io/rewrite-probes": "true"});
    let out = apply(&pod, &off);
    assert!(probe_table(&out, true).is_some());

    // Nothing to rewrite: no env entry at all.
    assert_eq!(
        probe_table(&apply(&bare(), &InjectorConfig::default()), true),
        None
    );

    pod["metadata"]["annotations"] = json!({"stepmesh.io/rewrite-probes": "no"});
    let err = mutate(&pod, &InjectorConfig::default(), "a")
        .unwrap_err()
        .to_string();
    assert!(err.contains("stepmesh.io/rewrite-probes"), "{err}");
}

#[test]
fn probes_the_sidecar_would_refuse_are_left_alone() {
    let mut pod = bare();
    pod["spec"]["containers"][0]["readinessProbe"] =
        json!({"httpGet": {"path": "/", "port": "nope"}});
    pod["spec"]["containers"][0]["livenessProbe"] =
        json!({"httpGet": {"path": "/", "port": 8080, "scheme": "FTP"}});
    pod["spec"]["containers"][0]["startupProbe"] = json!({"tcpSocket": {"port": 0}});
    let out = apply(&pod, &InjectorConfig::default());
    let untouched = net_raw::dropped(&pod["spec"]["containers"]);
    assert_eq!(out["spec"]["containers"], untouched);
    assert_eq!(probe_table(&out, true), None);
}

#[test]
fn the_workload_api_is_mounted_and_announced_only_when_the_pod_opts_in() {
    let pod = |annotations: Value| {
        json!({"metadata": {"annotations": annotations}, "spec": {"containers": [
            {"name": "app", "image": "x"},
            {"name": "worker", "image": "y", "env": [{"name": "A", "value": "1"}],
             "volumeMounts": [{"name": "d", "mountPath": "/d"}]},
            {"name": "own", "image": "z", "env": [{"name": "SPIFFE_ENDPOINT_SOCKET", "value": "x"}]},
        ]}})
    };
    let off = apply(&pod(json!({})), &InjectorConfig::default());
    assert_eq!(names(&off["spec"]["volumes"]), VOLUMES);
    assert!(!off.to_string().contains("/run/spiffe"), "{off}");
    let ro = json!({"name": "stepmesh-workload-api", "mountPath": "/run/spiffe", "readOnly": true});
    let env =
        json!({"name": "SPIFFE_ENDPOINT_SOCKET", "value": "unix:///run/spiffe/workload.sock"});
    for native in [true, false] {
        let config = InjectorConfig {
            native_sidecar: native,
            ..InjectorConfig::default()
        };
        let out = apply(
            &pod(json!({"stepmesh.io/workload-api": "enabled"})),
            &config,
        );
        let apps = &out["spec"]["containers"];
        let proxy = &out["spec"][if native {
            "initContainers"
        } else {
            "containers"
        }][native as usize];
        let args = proxy["args"].to_string();
        assert!(
            args.contains(r#""--workload-api","/run/spiffe/workload.sock""#),
            "{args}"
        );
        let rw = json!({"name": "stepmesh-workload-api", "mountPath": "/run/spiffe"});
        assert_eq!(proxy["volumeMounts"].as_array().unwrap().last(), Some(&rw));
        let volume = json!({"name": "stepmesh-workload-api", "emptyDir": {}});
        assert_eq!(out["spec"]["volumes"][3], volume);
        let app = |name: &str| {
            apps.as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == name)
                .unwrap()
        };
        assert_eq!(
            (&app("app")["volumeMounts"], &app("app")["env"]),
            (&json!([ro]), &json!([env]))
        );
        assert_eq!(app("worker")["volumeMounts"][1], ro);
        assert_eq!(
            app("worker")["env"],
            json!([{"name": "A", "value": "1"}, env])
        );
        assert_eq!(
            (
                &app("own")["env"][0]["value"],
                &app("own")["volumeMounts"][0]
            ),
            (&json!("x"), &ro)
        );
        let status = &out["metadata"]["annotations"]["stepmesh.io/status"];
        assert!(status.as_str().unwrap().contains("stepmesh-workload-api"));
    }
}
