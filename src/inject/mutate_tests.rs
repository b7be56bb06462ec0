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
    pod["metadata"]["labels"] = json!({"app": "x"});
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
