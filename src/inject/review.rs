//! AdmissionReview (`admission.k8s.io/v1`) decoding and answers, kept apart
//! from the pure mutation. Bad input is the caller's fault and becomes a
//! [`ReviewError`] (HTTP 400); a pod that cannot be injected is denied with a
//! reason the user sees in `kubectl`.

use base64::Engine as _;
use serde_json::{json, Value};

use super::config::InjectorConfig;
use super::mutate::{mutate, Mutation};
use super::net_raw::ephemeral_drop_ops;
use super::patch::PatchOp;
use super::template::PROXY_NAME;

const API_VERSION: &str = "admission.k8s.io/v1";
const KIND: &str = "AdmissionReview";

/// Why a request body is not an AdmissionReview we can answer.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// Nothing was sent.
    #[error("empty body: expected an AdmissionReview")]
    Empty,
    /// The body is not JSON.
    #[error("malformed JSON: {0}")]
    Malformed(serde_json::Error),
    /// Top-level `apiVersion` is not `admission.k8s.io/v1`.
    #[error("apiVersion {0:?} is not supported: expected \"admission.k8s.io/v1\"")]
    ApiVersion(String),
    /// Top-level `kind` is not `AdmissionReview`.
    #[error("kind {0:?} is not supported: expected \"AdmissionReview\"")]
    Kind(String),
    /// A field the API server always sends is missing or has the wrong type.
    #[error("missing or invalid field {0}")]
    Field(&'static str),
}

/// What happened to one review, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A patch was returned.
    Injected,
    /// `kubectl debug`'s new ephemeral containers were made to drop
    /// `NET_RAW`.
    Debugged,
    /// Allowed unchanged, and why.
    Unchanged(String),
    /// Denied, and why.
    Denied(String),
}

/// Answers one AdmissionReview body: the response review and what was done.
pub fn review(body: &[u8], config: &InjectorConfig) -> Result<(Value, Outcome), ReviewError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ReviewError::Empty);
    }
    let doc: Value = serde_json::from_slice(body).map_err(ReviewError::Malformed)?;
    let text = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).map(str::to_owned);
    let api_version = text(&doc, "apiVersion").ok_or(ReviewError::Field("apiVersion"))?;
    if api_version != API_VERSION {
        return Err(ReviewError::ApiVersion(api_version));
    }
    let kind = text(&doc, "kind").ok_or(ReviewError::Field("kind"))?;
    if kind != KIND {
        return Err(ReviewError::Kind(kind));
    }
    let request = doc
        .get("request")
        .filter(|r| r.is_object())
        .ok_or(ReviewError::Field("request"))?;
    let uid = text(request, "uid")
        .filter(|u| !u.is_empty())
        .ok_or(ReviewError::Field("request.uid"))?;

    let resource_kind = request.pointer("/kind/kind").and_then(Value::as_str);
    let group = request.pointer("/kind/group").and_then(Value::as_str);
    if resource_kind != Some("Pod") || group != Some("") {
        let why = format!("not a Pod ({resource_kind:?}); the webhook should only select pods");
        return Ok((allow(&uid, None, Some(&why)), Outcome::Unchanged(why)));
    }
    let operation = text(request, "operation").ok_or(ReviewError::Field("request.operation"))?;
    let sub_resource = text(request, "subResource");
    match (operation.as_str(), sub_resource.as_deref()) {
        ("CREATE", None) => {}
        ("UPDATE", Some("ephemeralcontainers")) => return debugged(&uid, request),
        _ => {
            let why = format!("operation {operation} is not injected");
            return Ok((allow(&uid, None, None), Outcome::Unchanged(why)));
        }
    }
    let pod = request
        .get("object")
        .filter(|o| o.is_object())
        .ok_or(ReviewError::Field("request.object"))?;
    // The API server sets request.namespace for namespaced kinds; a pod made
    // by a controller may carry no metadata.namespace of its own.
    let namespace = text(request, "namespace")
        .or_else(|| {
            pod.pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .ok_or(ReviewError::Field("request.namespace"))?;

    match mutate(pod, config, &namespace) {
        Ok(Mutation::Patch(ops)) => Ok((allow(&uid, Some(encoded(&ops)), None), Outcome::Injected)),
        Ok(Mutation::Skipped(skip)) => Ok((
            allow(&uid, None, None),
            Outcome::Unchanged(skip.reason().to_owned()),
        )),
        Err(err) => Ok(denied(&uid, format!("stepmesh injection: {err}"))),
    }
}

/// `kubectl debug` on a pod (an UPDATE of `pods/ephemeralcontainers`): on a
/// meshed one (the stored pod, `oldObject`, runs our sidecar: its
/// containers cannot change, where an annotation could; the request's own
/// `object` is the caller's until the API server drops what this
/// subresource may not change), the new ephemeral containers drop
/// `NET_RAW`.
fn debugged(uid: &str, request: &Value) -> Result<(Value, Outcome), ReviewError> {
    let object = |key: &'static str, field: &'static str| {
        request
            .get(key)
            .filter(|o| o.is_object())
            .ok_or(ReviewError::Field(field))
    };
    let pod = object("object", "request.object")?;
    let stored = object("oldObject", "request.oldObject")?;
    let meshed = ["containers", "initContainers"].iter().any(|list| {
        stored
            .pointer(&format!("/spec/{list}"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .any(|c| c.get("name").and_then(Value::as_str) == Some(PROXY_NAME))
    });
    if !meshed {
        let why = "ephemeral containers of a pod without the sidecar".to_owned();
        return Ok((allow(uid, None, None), Outcome::Unchanged(why)));
    }
    match ephemeral_drop_ops(pod, stored) {
        Ok(ops) if ops.is_empty() => {
            let why = "no new ephemeral container keeps NET_RAW".to_owned();
            Ok((allow(uid, None, None), Outcome::Unchanged(why)))
        }
        Ok(ops) => Ok((allow(uid, Some(encoded(&ops)), None), Outcome::Debugged)),
        Err(err) => Ok(denied(uid, format!("stepmesh: {err}"))),
    }
}

/// The patch as the response carries it.
fn encoded(ops: &[PatchOp]) -> String {
    // Serializing our own PatchOp values cannot fail.
    let bytes = serde_json::to_vec(ops).unwrap_or_default();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A refusal the user sees in `kubectl`, and its outcome.
fn denied(uid: &str, message: String) -> (Value, Outcome) {
    let response = json!({
        "apiVersion": API_VERSION,
        "kind": KIND,
        "response": {
            "uid": uid,
            "allowed": false,
            "status": {"code": 400, "reason": "BadRequest", "message": message},
        },
    });
    (response, Outcome::Denied(message))
}

fn allow(uid: &str, patch: Option<String>, warning: Option<&str>) -> Value {
    let mut response = json!({"uid": uid, "allowed": true});
    if let Some(patch) = patch {
        response["patchType"] = json!("JSONPatch");
        response["patch"] = json!(patch);
    }
    if let Some(warning) = warning {
        response["warnings"] = json!([format!("stepmesh: {warning}")]);
    }
    json!({"apiVersion": API_VERSION, "kind": KIND, "response": response})
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn fixture() -> Value {
        serde_json::from_str(include_str!(
            "../../tests/fixtures/k8s/admissionreview-pod-create.json"
        ))
        .unwrap()
    }

    #[test]
    fn real_review_gets_a_patch_with_its_uid() {
        let body = serde_json::to_vec(&fixture()).unwrap();
        let (out, outcome) = review(&body, &InjectorConfig::default()).unwrap();
        assert_eq!(outcome, Outcome::Injected);
        assert_eq!(
            out["response"]["uid"],
            "1e4402f9-9381-467b-abcd-ea25cf55cf19"
        );
        assert_eq!(out["response"]["allowed"], true);
        assert_eq!(out["response"]["patchType"], "JSONPatch");
        let patch = base64::engine::general_purpose::STANDARD
            .decode(out["response"]["patch"].as_str().unwrap())
            .unwrap();
        let ops: Vec<Value> = serde_json::from_slice(&patch).unwrap();
        assert!(ops.iter().all(|op| op["op"] == "add"));
    }

    /// `kubectl debug`'s review, made from the captured CREATE review as
    /// the API server sends it for `pods/ephemeralcontainers`: an UPDATE of
    /// the pod with the subresource named and the pod before in
    /// `oldObject`.
    fn debug_review(meshed: bool) -> Value {
        let mut v = fixture();
        let request = &mut v["request"];
        request["operation"] = json!("UPDATE");
        request["subResource"] = json!("ephemeralcontainers");
        if meshed {
            let containers = request["object"]["spec"]["containers"]
                .as_array_mut()
                .unwrap();
            containers.insert(0, json!({"name": PROXY_NAME, "image": "stepmesh"}));
        }
        request["oldObject"] = request["object"].clone();
        if !meshed {
            // The caller's object claims a sidecar the stored pod lacks.
            let containers = request["object"]["spec"]["containers"]
                .as_array_mut()
                .unwrap();
            containers.insert(0, json!({"name": PROXY_NAME, "image": "stepmesh"}));
        }
        request["object"]["spec"]["ephemeralContainers"] =
            json!([{"name": "debugger", "image": "busybox"}]);
        v
    }

    #[test]
    fn a_meshed_pods_new_ephemeral_container_drops_net_raw() {
        let config = InjectorConfig::default();
        let body = serde_json::to_vec(&debug_review(true)).unwrap();
        let (out, outcome) = review(&body, &config).unwrap();
        assert_eq!(outcome, Outcome::Debugged);
        let patch = base64::engine::general_purpose::STANDARD
            .decode(out["response"]["patch"].as_str().unwrap())
            .unwrap();
        let ops: Vec<Value> = serde_json::from_slice(&patch).unwrap();
        assert_eq!(
            ops,
            [
                json!({"op": "add", "path": "/spec/ephemeralContainers/0/securityContext",
                    "value": {"capabilities": {"drop": ["NET_RAW"]}}})
            ]
        );
        // A pod without the sidecar is left as it is, whatever the
        // request's object says; and the stored pod is required.
        let body = serde_json::to_vec(&debug_review(false)).unwrap();
        let (out, outcome) = review(&body, &config).unwrap();
        assert!(matches!(outcome, Outcome::Unchanged(_)), "{outcome:?}");
        assert!(out["response"].get("patch").is_none());
        let mut v = debug_review(true);
        v["request"]["oldObject"] = Value::Null;
        let err = review(&serde_json::to_vec(&v).unwrap(), &config).unwrap_err();
        assert!(err.to_string().contains("request.oldObject"), "{err}");
        // One that adds NET_RAW is refused, by name.
        let mut v = debug_review(true);
        v["request"]["object"]["spec"]["ephemeralContainers"][0]["securityContext"] =
            json!({"capabilities": {"add": ["NET_RAW"]}});
        let (out, outcome) = review(&serde_json::to_vec(&v).unwrap(), &config).unwrap();
        assert!(matches!(outcome, Outcome::Denied(_)), "{outcome:?}");
        assert_eq!(out["response"]["allowed"], false);
        let message = out["response"]["status"]["message"].as_str().unwrap();
        assert!(message.contains("\"debugger\" adds NET_RAW"), "{message}");
        // Other subresources' updates are not ours.
        let mut v = debug_review(true);
        v["request"]["subResource"] = json!("status");
        let (_, outcome) = review(&serde_json::to_vec(&v).unwrap(), &config).unwrap();
        assert!(matches!(outcome, Outcome::Unchanged(_)), "{outcome:?}");
    }

    #[test]
    fn bad_reviews_are_named() {
        let config = InjectorConfig::default();
        let err = |v: &[u8]| review(v, &config).unwrap_err().to_string();
        assert!(err(b"").contains("empty"));
        assert!(err(b"{").contains("malformed JSON"));
        let mut v = fixture();
        v["apiVersion"] = json!("admission.k8s.io/v1beta1");
        assert!(err(&serde_json::to_vec(&v).unwrap()).contains("v1beta1"));
        let mut v = fixture();
        v["kind"] = json!("Pod");
        assert!(err(&serde_json::to_vec(&v).unwrap()).contains("kind \"Pod\""));
        let mut v = fixture();
        v["request"]["uid"] = json!("");
        assert!(err(&serde_json::to_vec(&v).unwrap()).contains("request.uid"));
        let mut v = fixture();
        v["request"]["object"] = Value::Null;
        assert!(err(&serde_json::to_vec(&v).unwrap()).contains("request.object"));
    }

    #[test]
    fn other_operations_and_kinds_pass_unchanged() {
        let config = InjectorConfig::default();
        let mut v = fixture();
        v["request"]["operation"] = json!("UPDATE");
        let (out, _) = review(&serde_json::to_vec(&v).unwrap(), &config).unwrap();
        assert!(out["response"].get("patch").is_none());
        let mut v = fixture();
        v["request"]["kind"]["kind"] = json!("Service");
        let (out, _) = review(&serde_json::to_vec(&v).unwrap(), &config).unwrap();
        assert_eq!(out["response"]["allowed"], true);
        assert!(out["response"]["warnings"][0]
            .as_str()
            .unwrap()
            .contains("not a Pod"));
    }

    #[test]
    fn uninjectable_pod_is_denied_with_the_reason() {
        let mut v = fixture();
        v["request"]["object"]["metadata"]["annotations"] =
            json!({"stepmesh.io/exclude-outbound-ports": "99999"});
        let (out, outcome) =
            review(&serde_json::to_vec(&v).unwrap(), &InjectorConfig::default()).unwrap();
        assert!(matches!(outcome, Outcome::Denied(_)));
        assert_eq!(out["response"]["allowed"], false);
        let msg = out["response"]["status"]["message"].as_str().unwrap();
        assert!(msg.contains("stepmesh.io/exclude-outbound-ports"), "{msg}");
    }

    /// An app container running as the proxy's UID would bypass the mesh
    /// (the interception lets that UID out): refused, by the container's
    /// `runAsUser` or the pod's; another UID passes.
    #[test]
    fn an_app_running_as_the_proxy_uid_is_denied() {
        let config = InjectorConfig::default();
        let decide = |pod_uid: Value, container_uid: Value| {
            let mut v = fixture();
            v["request"]["object"]["spec"]["securityContext"] = json!({"runAsUser": pod_uid});
            v["request"]["object"]["spec"]["containers"][0]["securityContext"] =
                json!({"runAsUser": container_uid});
            review(&serde_json::to_vec(&v).unwrap(), &config).unwrap()
        };
        for (pod_uid, container_uid) in [(json!(1000), json!(1337)), (json!(1337), json!(null))] {
            let (out, outcome) = decide(pod_uid, container_uid);
            assert!(matches!(outcome, Outcome::Denied(_)), "{out}");
            let msg = out["response"]["status"]["message"].as_str().unwrap();
            assert!(msg.contains("UID 1337"), "{msg}");
        }
        let (_, outcome) = decide(json!(1337), json!(1000));
        assert!(
            matches!(outcome, Outcome::Injected),
            "the container's own UID wins"
        );
    }
}
