//! `stepmesh inject -f FILE`: the webhook's mutation applied offline to the
//! pods and pod templates in multi-document YAML (like `linkerd inject`).

use serde::Deserialize as _;
use serde_json::Value;

use super::config::InjectorConfig;
use super::mutate::{mutate, MutateError, Mutation};
use super::patch::{apply, PatchError};

/// Why a document could not be injected.
#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    /// The input is not YAML.
    #[error("document {doc}: {cause}")]
    Yaml {
        /// 1-based document number.
        doc: usize,
        /// What the parser said.
        cause: serde_norway::Error,
    },
    /// A pod (template) could not be injected.
    #[error("{object}: {cause}")]
    Mutate {
        /// `kind/name` of the object.
        object: String,
        /// Why.
        cause: MutateError,
    },
    /// Our own patch did not apply (a bug, reported rather than hidden).
    #[error("{object}: {cause}")]
    Patch {
        /// `kind/name` of the object.
        object: String,
        /// Why.
        cause: PatchError,
    },
}

/// One line of the summary printed on stderr: what happened to an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// `kind/name`.
    pub object: String,
    /// `injected`, `skipped: <reason>` or `unchanged (not a workload)`.
    pub action: String,
}

/// Injects every supported object of `input` and returns the YAML stream
/// (documents joined by `---`) and a report per object.
pub fn inject_yaml(
    input: &str,
    config: &InjectorConfig,
) -> Result<(String, Vec<Report>), OfflineError> {
    let mut out = String::new();
    let mut reports = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(input).enumerate() {
        let mut value =
            Value::deserialize(doc).map_err(|cause| OfflineError::Yaml { doc: i + 1, cause })?;
        if value.is_null() {
            continue; // an empty document, e.g. a leading `---`
        }
        inject_object(&mut value, config, &mut reports)?;
        if !out.is_empty() {
            out.push_str("---\n");
        }
        // Serializing a JSON value to YAML cannot fail.
        out.push_str(&serde_norway::to_string(&value).unwrap_or_default());
    }
    Ok((out, reports))
}

/// Injects one object in place; `List`s are walked.
fn inject_object(
    value: &mut Value,
    config: &InjectorConfig,
    reports: &mut Vec<Report>,
) -> Result<(), OfflineError> {
    let kind = value
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    if kind == "List" {
        if let Some(items) = value.get_mut("items").and_then(Value::as_array_mut) {
            for item in items {
                inject_object(item, config, reports)?;
            }
        }
        return Ok(());
    }
    let name = value
        .pointer("/metadata/name")
        .or_else(|| value.pointer("/metadata/generateName"))
        .and_then(Value::as_str)
        .unwrap_or("<unnamed>");
    let object = format!("{}/{name}", kind.to_lowercase());
    let namespace = value
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_owned();
    let api_version = value
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    let pointer = match (api_version, kind.as_str()) {
        ("v1", "Pod") => "",
        ("apps/v1", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet") => "/spec/template",
        ("batch/v1", "Job") => "/spec/template",
        ("batch/v1", "CronJob") => "/spec/jobTemplate/spec/template",
        _ => {
            reports.push(Report {
                object,
                action: "unchanged (not a workload)".into(),
            });
            return Ok(());
        }
    };
    let Some(pod) = value.pointer_mut(pointer) else {
        let cause = MutateError::NotAPod("no pod template");
        return Err(OfflineError::Mutate { object, cause });
    };
    let action = match mutate(pod, config, &namespace) {
        Ok(Mutation::Patch(ops)) => {
            apply(pod, &ops).map_err(|cause| OfflineError::Patch {
                object: object.clone(),
                cause,
            })?;
            "injected".to_owned()
        }
        Ok(Mutation::Skipped(skip)) => format!("skipped: {}", skip.reason()),
        Err(cause) => return Err(OfflineError::Mutate { object, cause }),
    };
    reports.push(Report { object, action });
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn workloads_injected_others_untouched() {
        let input = "---\napiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80}]}\n---\n\
                     apiVersion: batch/v1\nkind: CronJob\nmetadata: {name: c}\nspec:\n  schedule: '* * * * *'\n  jobTemplate:\n    spec:\n      template:\n        spec:\n          restartPolicy: Never\n          containers: [{name: a, image: x}]\n";
        let (out, reports) = inject_yaml(input, &InjectorConfig::default()).unwrap();
        assert_eq!(reports[0].action, "unchanged (not a workload)");
        assert_eq!(
            reports[1],
            Report {
                object: "cronjob/c".into(),
                action: "injected".into()
            }
        );
        let docs: Vec<Value> = serde_norway::Deserializer::from_str(&out)
            .map(|d| Value::deserialize(d).unwrap())
            .collect();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0]["spec"]["ports"][0]["port"], 80);
        let init = &docs[1]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["initContainers"];
        assert_eq!(init[1]["name"], "stepmesh-proxy");
    }

    #[test]
    fn list_items_are_walked() {
        let input = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Pod\n  metadata: {name: a}\n  spec: {containers: [{name: a, image: x}]}\n- apiVersion: v1\n  kind: ConfigMap\n  metadata: {name: c}\n";
        let (out, reports) = inject_yaml(input, &InjectorConfig::default()).unwrap();
        assert_eq!(
            reports[0],
            Report {
                object: "pod/a".into(),
                action: "injected".into()
            }
        );
        assert_eq!(reports[1].action, "unchanged (not a workload)");
        let doc: Value = serde_norway::from_str(&out).unwrap();
        assert_eq!(
            doc["items"][0]["spec"]["initContainers"][0]["name"],
            "stepmesh-init"
        );
        assert!(doc["items"][1].get("spec").is_none());
    }

    #[test]
    fn errors_name_the_object() {
        let bad = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  template:\n    metadata:\n      annotations: {stepmesh.io/exclude-inbound-ports: x}\n    spec:\n      containers: [{name: a, image: x}]\n";
        let err = inject_yaml(bad, &InjectorConfig::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("deployment/web: annotation stepmesh.io/exclude-inbound-ports"),
            "{err}"
        );
        assert!(inject_yaml("a: [", &InjectorConfig::default()).is_err());
    }
}
