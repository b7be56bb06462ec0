//! JSON Patch (RFC 6902) operations as the injector emits them, JSON Pointer
//! (RFC 6901) escaping, and a small applier for offline injection.

use serde::Serialize;
use serde_json::Value;

/// One JSON Patch operation. The injector only ever adds.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum PatchOp {
    /// Insert into an array (index or `-`), or set a member of an object.
    Add {
        /// JSON Pointer of the target.
        path: String,
        /// The value added.
        value: Value,
    },
}

impl PatchOp {
    /// An `add` of `value` at `path`.
    pub fn add(path: impl Into<String>, value: Value) -> Self {
        Self::Add {
            path: path.into(),
            value,
        }
    }
}

/// Why a patch could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    /// The pointer names a location whose parent does not exist.
    #[error("patch path {0:?}: no such location")]
    NoParent(String),
    /// The pointer's last token is not a valid index into its array.
    #[error("patch path {0:?}: bad array index")]
    BadIndex(String),
}

/// Escapes one JSON Pointer reference token (`/` → `~1`, `~` → `~0`), e.g.
/// for annotation keys such as `stepmesh.io/injected`.
pub fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

/// Applies `ops` to `target` in order (offline injection; the webhook leaves
/// applying to the API server).
pub fn apply(target: &mut Value, ops: &[PatchOp]) -> Result<(), PatchError> {
    for op in ops {
        let PatchOp::Add { path, value } = op;
        let (parent, last) = path
            .rsplit_once('/')
            .ok_or_else(|| PatchError::NoParent(path.clone()))?;
        let parent_value = target
            .pointer_mut(parent)
            .ok_or_else(|| PatchError::NoParent(path.clone()))?;
        match parent_value {
            Value::Object(map) => {
                map.insert(unescape(last), value.clone());
            }
            Value::Array(items) => {
                let index = if last == "-" {
                    items.len()
                } else {
                    last.parse::<usize>()
                        .ok()
                        .filter(|i| *i <= items.len())
                        .ok_or_else(|| PatchError::BadIndex(path.clone()))?
                };
                items.insert(index, value.clone());
            }
            _ => return Err(PatchError::NoParent(path.clone())),
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn escapes_and_serializes() {
        assert_eq!(escape("stepmesh.io/inject"), "stepmesh.io~1inject");
        assert_eq!(escape("a~b/c"), "a~0b~1c");
        let op = PatchOp::add("/metadata/annotations/stepmesh.io~1injected", json!("true"));
        assert_eq!(
            serde_json::to_value(&op).unwrap(),
            json!({"op": "add", "path": "/metadata/annotations/stepmesh.io~1injected", "value": "true"})
        );
    }

    #[test]
    fn applies_adds_to_objects_and_arrays() {
        let mut doc = json!({"metadata": {}, "spec": {"containers": [{"name": "a"}]}});
        apply(
            &mut doc,
            &[
                PatchOp::add("/metadata/annotations", json!({})),
                PatchOp::add("/metadata/annotations/x~1y", json!("1")),
                PatchOp::add("/spec/containers/0", json!({"name": "first"})),
                PatchOp::add("/spec/containers/-", json!({"name": "last"})),
            ],
        )
        .unwrap();
        assert_eq!(doc["metadata"]["annotations"]["x/y"], "1");
        let names: Vec<_> = doc["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["first", "a", "last"]);
        assert!(apply(&mut doc, &[PatchOp::add("/nope/x", json!(1))]).is_err());
        assert!(apply(&mut doc, &[PatchOp::add("/spec/containers/9", json!(1))]).is_err());
    }
}
