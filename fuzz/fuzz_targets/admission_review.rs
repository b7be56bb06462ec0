//! The injector's webhook decodes AdmissionReviews that carry pods written
//! by any user who can create one: `inject::review::review` must answer any
//! body with an error or a review, never a panic. Properties of an answer:
//! it echoes the request's uid; an injection's patch is base64 of a JSON
//! Patch that applies cleanly to the pod it was made for; and the patched
//! pod is recognised as injected (injection is idempotent).
#![no_main]

use std::sync::OnceLock;

use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use stepmesh::inject::config::InjectorConfig;
use stepmesh::inject::mutate::{mutate, Mutation, Skip};
use stepmesh::inject::review::{review, Outcome};

fn config() -> &'static InjectorConfig {
    static CONFIG: OnceLock<InjectorConfig> = OnceLock::new();
    CONFIG.get_or_init(InjectorConfig::default)
}

fuzz_target!(|data: &[u8]| {
    let Ok((answer, outcome)) = review(data, config()) else {
        return;
    };
    // review() only answers a body that parsed as JSON with a request.
    let request: Value = serde_json::from_slice(data).expect("answered bodies are JSON");
    let request = &request["request"];
    assert_eq!(
        answer["response"]["uid"], request["uid"],
        "the uid is echoed"
    );
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    match outcome {
        Outcome::Injected => {
            let pod = patched(&answer, request);
            let namespace = request["namespace"]
                .as_str()
                .or_else(|| {
                    request
                        .pointer("/object/metadata/namespace")
                        .and_then(Value::as_str)
                })
                .expect("an injected pod has a namespace")
                .to_owned();
            match mutate(&pod, config(), &namespace) {
                Ok(Mutation::Skipped(Skip::AlreadyInjected)) => {}
                other => panic!("the injected pod is not seen as injected: {other:?}"),
            }
        }
        Outcome::Debugged => {
            // The new ephemeral containers' drop, once: the pod it leaves
            // asks for none.
            let mut again: Value = serde_json::from_slice(data).expect("answered bodies are JSON");
            again["request"]["object"] = patched(&answer, request);
            let body = serde_json::to_vec(&again).expect("a JSON value serializes");
            match review(&body, config()) {
                Ok((_, Outcome::Unchanged(_))) => {}
                other => panic!("a debugged pod asks for another drop: {other:?}"),
            }
        }
        Outcome::Unchanged(_) => {
            assert_eq!(answer["response"]["allowed"], true);
            assert!(answer["response"].get("patch").is_none());
        }
        Outcome::Denied(_) => {
            assert_eq!(answer["response"]["allowed"], false);
        }
    }
});

/// The pod of `request` with the answer's patch applied, which must be a
/// base64 JSON Patch that applies cleanly.
fn patched(answer: &Value, request: &Value) -> Value {
    assert_eq!(answer["response"]["allowed"], true);
    assert_eq!(answer["response"]["patchType"], "JSONPatch");
    let b64 = answer["response"]["patch"]
        .as_str()
        .expect("a patch string");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("the patch is base64");
    let patch: json_patch::Patch =
        serde_json::from_slice(&bytes).expect("the patch is a JSON Patch");
    let mut pod = request["object"].clone();
    json_patch::patch(&mut pod, &patch)
        .unwrap_or_else(|e| panic!("the patch does not apply to its pod: {e}"));
    pod
}
