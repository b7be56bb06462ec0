//! Reading the policy ConfigMaps: their metadata as one list, then each
//! one that is new or changed since the last round on its own, so that the
//! client's body limit (1 MiB) bounds one ConfigMap, not all of them
//! together. A list of their data was one answer: anyone who may create a
//! labelled ConfigMap could make it too large and stop every round.

use std::collections::{BTreeMap, BTreeSet};

use http::Method;
use serde_json::{json, Value};
use stepmesh_ca::https::HttpError;
use stepmesh_ca::kube::{Api, KubeError};

use super::sources::{Source, UNREADABLE};

/// The policy ConfigMaps as last read, by namespace and name, with the
/// resourceVersion read.
#[derive(Debug, Default)]
pub struct ConfigMaps(BTreeMap<(String, String), (String, Value)>);

impl ConfigMaps {
    /// Every ConfigMap `selector` selects, each read anew only when its
    /// resourceVersion changed. One too large to read stands as itself
    /// marked [`UNREADABLE`] (its policy is then refused alone); one gone
    /// since the list is left out.
    pub async fn read(&mut self, api: &Api, selector: &str) -> Result<Vec<Value>, KubeError> {
        let path = format!(
            "/api/v1/configmaps?labelSelector={}",
            super::api::query(selector)
        );
        let metas = api.list_metadata(&path).await?;
        let mut out = Vec::with_capacity(metas.len());
        let mut seen = BTreeSet::new();
        for meta in metas {
            let src = Source::of(&meta);
            let key = src.key();
            seen.insert(key.clone());
            if let Some((_, cm)) = self.0.get(&key).filter(|(v, _)| *v == src.version) {
                out.push(cm.clone());
                continue;
            }
            let one = format!("/api/v1/namespaces/{}/configmaps/{}", key.0, key.1);
            let got = api.ok(Method::GET, &one, None).await;
            if super::api::not_found(&got) {
                continue;
            }
            match got {
                Ok(cm) => {
                    self.0.insert(key, (src.version, cm.clone()));
                    out.push(cm);
                }
                Err(KubeError::Request {
                    source: HttpError::TooLarge(limit),
                    ..
                }) => {
                    let why = format!(
                        "the ConfigMap is larger than the {limit} bytes the controller reads"
                    );
                    out.push(json!({"metadata": meta["metadata"].clone(), UNREADABLE: why}));
                }
                Err(e) => return Err(e),
            }
        }
        self.0.retain(|k, _| seen.contains(k));
        Ok(out)
    }
}
