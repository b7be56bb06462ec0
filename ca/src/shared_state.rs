//! `--shared-state configmap/NAMESPACE/NAME`: what CA replicas must agree
//! on (the revocations and the forced re-issues) kept in one ConfigMap, so
//! that two or more `ca serve` processes signing under the same key act as
//! one CA. Every replica reads the object at start, polls it (a GET every
//! [`POLL`], applied when its resourceVersion moves), and writes it with
//! the resourceVersion it read (optimistic concurrency): a 409 Conflict
//! re-reads the object and applies the change again. The API server (etcd)
//! is the only arbiter; there is no consensus of our own.
//!
//! A ConfigMap, not a Secret: nothing in it is secret (every sidecar gets
//! the same list on its trust-bundle stream), and RBAC limits who may
//! change it to the CA's ServiceAccount (see `deploy/ca/rbac.yaml`).
//! Keys: `revocations.json` (the format of the single-replica
//! `revocations.json` file) and `rotations.json`.

use std::time::Duration;

use http::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::kube::{Api, KubeError};
use crate::metrics::CaMetrics;
use crate::revocation::{normalize_serial, Entry};
use crate::spiffe_id::SpiffeId;

/// How often replicas read the object: a change made through one replica
/// reaches the others' sidecars within this plus the stream's hop.
pub const POLL: Duration = Duration::from_secs(1);
/// Writes tried before a change is refused (each lost to another writer).
const ATTEMPTS: usize = 8;
/// The ConfigMap key holding the revocations.
pub const REVOCATIONS_KEY: &str = "revocations.json";
/// The ConfigMap key holding the forced re-issues.
pub const ROTATIONS_KEY: &str = "rotations.json";

/// A forced re-issue, as the replicas share it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rotation {
    /// The ID whose SVIDs renew; empty: every workload.
    #[serde(default)]
    pub id: String,
    /// SVIDs issued before this Unix second renew.
    pub issued_before: i64,
}

/// Everything the replicas agree on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    /// The revocations in force.
    pub entries: Vec<Entry>,
    /// Forced re-issues asked for lately.
    pub rotations: Vec<Rotation>,
}

/// The object's state at one resourceVersion.
#[derive(Debug, Clone)]
pub struct Versioned {
    /// The object's `metadata.resourceVersion`.
    pub resource_version: String,
    /// What it holds.
    pub state: State,
}

/// Why the shared state could not be read or written (nothing changed).
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    /// The API server could not be reached or refused the call.
    #[error("shared state {object}: {source}")]
    Api {
        /// `configmap/NS/NAME`.
        object: String,
        /// The failed call.
        source: KubeError,
    },
    /// The object holds something that is not a state.
    #[error("shared state {object} (resourceVersion {resource_version}) is malformed: {reason}")]
    Malformed {
        /// `configmap/NS/NAME`.
        object: String,
        /// The version read.
        resource_version: String,
        /// What is wrong.
        reason: String,
    },
    /// The object was deleted (the next change recreates it).
    #[error("shared state {0} does not exist (deleted?): keeping the last state; the next change recreates it")]
    Missing(String),
    /// Every write lost to another writer.
    #[error("shared state {0}: still conflicting after {ATTEMPTS} writes")]
    Conflicts(String),
}

/// `configmap/NAMESPACE/NAME`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRef {
    /// The namespace.
    pub namespace: String,
    /// The ConfigMap's name.
    pub name: String,
}

impl std::str::FromStr for ObjectRef {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("{text:?} is not configmap/NAMESPACE/NAME: {why}");
        let mut parts = text.split('/');
        let (Some(kind), Some(namespace), Some(name), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("three parts separated by /"));
        };
        if !kind.eq_ignore_ascii_case("configmap") {
            return Err(bad("only a ConfigMap is supported"));
        }
        for part in [namespace, name] {
            if !is_dns_subdomain(part) {
                return Err(bad(&format!(
                    "{part:?} is not a Kubernetes name (lower-case letters, digits, '-', '.')"
                )));
            }
        }
        Ok(ObjectRef {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "configmap/{}/{}", self.namespace, self.name)
    }
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// The shared object and the client to reach it.
pub struct SharedState {
    api: Api,
    object: ObjectRef,
    metrics: CaMetrics,
}

impl std::fmt::Debug for SharedState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedState")
            .field("object", &self.object)
            .finish_non_exhaustive()
    }
}

impl SharedState {
    /// The object `object` through `api`.
    pub fn new(api: Api, object: ObjectRef, metrics: CaMetrics) -> Self {
        Self {
            api,
            object,
            metrics,
        }
    }

    /// `configmap/NS/NAME`, for messages.
    pub fn object(&self) -> &ObjectRef {
        &self.object
    }

    fn path(&self) -> String {
        format!(
            "/api/v1/namespaces/{}/configmaps/{}",
            self.object.namespace, self.object.name
        )
    }

    fn api_err(&self, source: KubeError) -> SharedError {
        SharedError::Api {
            object: self.object.to_string(),
            source,
        }
    }

    /// The object's state, `None` when it does not exist.
    pub async fn read(&self) -> Result<Option<Versioned>, SharedError> {
        Ok(self.read_raw().await?.map(|(v, _)| v))
    }

    async fn read_raw(&self) -> Result<Option<(Versioned, Value)>, SharedError> {
        let path = self.path();
        let (status, body) = self
            .api
            .call(Method::GET, &path, None)
            .await
            .map_err(|e| self.api_err(e))?;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(self.api_err(status_error(Method::GET, path, status, &body)));
        }
        let versioned = parse(&body).map_err(|(resource_version, reason)| {
            self.metrics.shared_state("malformed");
            SharedError::Malformed {
                object: self.object.to_string(),
                resource_version,
                reason,
            }
        })?;
        Ok(Some((versioned, body)))
    }

    /// Applies `change` to the object's current state and writes the
    /// result with the resourceVersion read; on 409 Conflict, reads again
    /// and re-applies. `change` returning `None` writes nothing. A missing
    /// object is created from `missing` (this replica's last state).
    /// Returns what was written (or read, when nothing changed).
    pub async fn update<E>(
        &self,
        missing: &State,
        mut change: impl FnMut(&State) -> Result<Option<State>, E>,
    ) -> Result<Result<Versioned, E>, SharedError> {
        for attempt in 1..=ATTEMPTS {
            let (current, object) = match self.read_raw().await? {
                Some((v, object)) => (v, Some(object)),
                None => (
                    Versioned {
                        resource_version: String::new(),
                        state: missing.clone(),
                    },
                    None,
                ),
            };
            let next = match change(&current.state) {
                Ok(Some(next)) => next,
                Ok(None) => return Ok(Ok(current)),
                Err(e) => return Ok(Err(e)),
            };
            let (status, body) = self.write(object, &next).await?;
            // 409: another replica wrote (or created) it since our read.
            if status == StatusCode::CONFLICT {
                self.metrics.shared_state("conflict");
                tracing::info!(target: "stepmesh_ca::audit", decision = "shared_state", outcome = "conflict_retried", object = %self.object, attempt, "another replica wrote first; reading again");
                continue;
            }
            if !status.is_success() {
                let method = if current.resource_version.is_empty() {
                    Method::POST
                } else {
                    Method::PUT
                };
                return Err(self.api_err(status_error(method, self.path(), status, &body)));
            }
            let resource_version = body["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            self.metrics.shared_state("written");
            tracing::info!(target: "stepmesh_ca::audit", decision = "shared_state", outcome = "written", object = %self.object, resource_version, revocations = next.entries.len(), "shared state written");
            return Ok(Ok(Versioned {
                resource_version,
                state: next,
            }));
        }
        Err(SharedError::Conflicts(self.object.to_string()))
    }

    /// PUTs `object` (as read) with `state`, or POSTs a new object.
    async fn write(
        &self,
        object: Option<Value>,
        state: &State,
    ) -> Result<(StatusCode, Value), SharedError> {
        let data = json!({
            REVOCATIONS_KEY: pretty(&state.entries),
            ROTATIONS_KEY: pretty(&state.rotations),
        });
        let (method, path, body) = match object {
            Some(mut object) => {
                // resourceVersion stays what was read: the precondition.
                object["data"] = data;
                (Method::PUT, self.path(), object)
            }
            None => {
                let path = format!("/api/v1/namespaces/{}/configmaps", self.object.namespace);
                let object = json!({
                    "apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": self.object.name, "namespace": self.object.namespace,
                                 "labels": {"app.kubernetes.io/name": "stepmesh-ca"}},
                    "data": data,
                });
                (Method::POST, path, object)
            }
        };
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        self.api
            .call(method, &path, Some(("application/json", bytes)))
            .await
            .map_err(|e| self.api_err(e))
    }
}

/// Pretty JSON (kubectl shows it): plain structs of strings and integers,
/// whose serialization cannot fail.
fn pretty<T: Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default()
}

fn status_error(method: Method, path: String, status: StatusCode, body: &Value) -> KubeError {
    KubeError::Status {
        method,
        path,
        status,
        message: body["message"].as_str().unwrap_or("").to_owned(),
    }
}

/// `data.NAME` of a ConfigMap: absent, or a string.
fn data_key<'a>(object: &'a Value, name: &str) -> Result<Option<&'a str>, String> {
    match &object["data"][name] {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.as_str())),
        _ => Err(format!("data.{name} is not a string")),
    }
}

/// The state in a ConfigMap, every entry checked; `Err((resourceVersion,
/// what is wrong))`.
fn parse(object: &Value) -> Result<Versioned, (String, String)> {
    let resource_version = object["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let bad = |reason: String| (resource_version.clone(), reason);
    let key = |name: &'static str| data_key(object, name).map_err(bad);
    let entries: Vec<Entry> = match key(REVOCATIONS_KEY)? {
        Some(text) => serde_json::from_str(text).map_err(|e| {
            bad(format!(
                "data.{REVOCATIONS_KEY}: not a revocation list: {e}"
            ))
        })?,
        None => Vec::new(),
    };
    for e in &entries {
        SpiffeId::parse(&e.id)
            .map_err(|err| bad(format!("data.{REVOCATIONS_KEY}: id {:?}: {err}", e.id)))?;
        if !e.serial.is_empty() && normalize_serial(&e.serial).ok().as_ref() != Some(&e.serial) {
            return Err(bad(format!(
                "data.{REVOCATIONS_KEY}: serial {:?} is not lower-case hex without leading zeros",
                e.serial
            )));
        }
    }
    let rotations: Vec<Rotation> = match key(ROTATIONS_KEY)? {
        Some(text) => serde_json::from_str(text)
            .map_err(|e| bad(format!("data.{ROTATIONS_KEY}: not a rotation list: {e}")))?,
        None => Vec::new(),
    };
    for r in &rotations {
        if !r.id.is_empty() {
            SpiffeId::parse(&r.id)
                .map_err(|err| bad(format!("data.{ROTATIONS_KEY}: id {:?}: {err}", r.id)))?;
        }
    }
    Ok(Versioned {
        resource_version: resource_version.clone(),
        state: State { entries, rotations },
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn object_refs_parse_or_say_why() {
        let r: ObjectRef = "configmap/stepmesh-system/stepmesh-ca-state"
            .parse()
            .unwrap();
        assert_eq!(r.to_string(), "configmap/stepmesh-system/stepmesh-ca-state");
        for bad in [
            "",
            "configmap/ns",
            "secret/ns/n",
            "configmap/NS/n",
            "configmap/ns/n/x",
            "configmap//n",
        ] {
            let err = bad.parse::<ObjectRef>().unwrap_err();
            assert!(err.contains("configmap/NAMESPACE/NAME"), "{bad}: {err}");
        }
    }

    #[test]
    fn malformed_objects_are_named() {
        let object = |data: Value| json!({"metadata": {"resourceVersion": "7"}, "data": data});
        let ok = parse(&object(json!({
            REVOCATIONS_KEY: r#"[{"serial":"1abc","id":"spiffe://td/a","revoked_at":1}]"#,
        })))
        .unwrap();
        assert_eq!(ok.resource_version, "7");
        assert_eq!(ok.state.entries.len(), 1);
        assert!(parse(&object(json!({}))).unwrap().state.entries.is_empty());
        for (data, want) in [
            (
                json!({REVOCATIONS_KEY: "not json"}),
                "not a revocation list",
            ),
            (
                json!({REVOCATIONS_KEY: r#"[{"id":"nope","revoked_at":1}]"#}),
                "id \"nope\"",
            ),
            (
                json!({REVOCATIONS_KEY: r#"[{"serial":"00AB","id":"spiffe://td/a","revoked_at":1}]"#}),
                "serial \"00AB\"",
            ),
            (json!({ROTATIONS_KEY: "{}"}), "not a rotation list"),
        ] {
            let (rv, why) = parse(&object(data)).unwrap_err();
            assert_eq!(rv, "7");
            assert!(why.contains(want), "{why}");
        }
    }
}
