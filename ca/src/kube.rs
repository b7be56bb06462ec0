//! The one Kubernetes API client of stepmesh (`stepmesh netpol sync`, the
//! CA's `--shared-state`): JSON calls over the one HTTPS client
//! ([`crate::https`]), with the ServiceAccount token re-read on every call
//! (kubelet rotates it).

use std::path::{Path, PathBuf};

use http::{Method, StatusCode};
use serde_json::Value;

use crate::https::{HttpError, HttpsClient};

/// Why a Kubernetes API call failed.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// No server given and not running in a pod.
    #[error("no API server given and KUBERNETES_SERVICE_HOST is unset (not in a pod)")]
    NoServer,
    /// The CA file of the API server is unusable.
    #[error(transparent)]
    Client(#[from] HttpError),
    /// The bearer token could not be read.
    #[error("reading the token {path}: {source}")]
    Token {
        /// The token file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The request got no answer (connection refused, timeout).
    #[error("{method} {path}: {source}")]
    Request {
        /// The method.
        method: Method,
        /// The API path.
        path: String,
        /// What went wrong.
        source: HttpError,
    },
    /// The API server answered with an error status.
    #[error("{method} {path}: {status}: {message}")]
    Status {
        /// The method.
        method: Method,
        /// The API path.
        path: String,
        /// The status.
        status: StatusCode,
        /// The `message` of the API server's Status object.
        message: String,
    },
}

/// The API server and the credentials to reach it.
#[derive(Debug, Clone)]
pub struct Api {
    client: HttpsClient,
    server: String,
    token_file: PathBuf,
}

/// The in-cluster API server URL, from `KUBERNETES_SERVICE_HOST`/`_PORT`.
pub fn in_cluster_server() -> Result<String, KubeError> {
    let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| KubeError::NoServer)?;
    let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
    Ok(format!("https://{host}:{port}"))
}

impl Api {
    /// A client of `server` (`https://host:port`) trusting `ca_file`.
    pub fn new(server: String, ca_file: &Path, token_file: PathBuf) -> Result<Api, KubeError> {
        let client = HttpsClient::new(ca_file)?;
        Ok(Api {
            client,
            server: server.trim_end_matches('/').to_owned(),
            token_file,
        })
    }

    /// One call: the status and the JSON body (null when not JSON).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<(StatusCode, Value), KubeError> {
        self.call_accepting(method, path, body, JSON).await
    }

    async fn call_accepting(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
        accept: &str,
    ) -> Result<(StatusCode, Value), KubeError> {
        let token = tokio::fs::read_to_string(&self.token_file)
            .await
            .map_err(|source| KubeError::Token {
                path: self.token_file.clone(),
                source,
            })?;
        let url = format!("{}{path}", self.server);
        let r = self
            .client
            .request_accepting(method.clone(), &url, Some(token.trim()), body, accept)
            .await
            .map_err(|source| KubeError::Request {
                method,
                path: path.to_owned(),
                source,
            })?;
        Ok((
            r.status,
            serde_json::from_slice(&r.body).unwrap_or(Value::Null),
        ))
    }

    /// A call that must succeed (2xx): its body.
    pub async fn ok(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<Value, KubeError> {
        self.ok_accepting(method, path, body, JSON).await
    }

    async fn ok_accepting(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
        accept: &str,
    ) -> Result<Value, KubeError> {
        let (status, v) = self
            .call_accepting(method.clone(), path, body, accept)
            .await?;
        if !status.is_success() {
            return Err(KubeError::Status {
                method,
                path: path.to_owned(),
                status,
                message: v["message"].as_str().unwrap_or("").to_owned(),
            });
        }
        Ok(v)
    }

    /// The `items` of a list, read in pages of [`PAGE`] (each answer
    /// within the client's body limit for longer).
    pub async fn list(&self, path: &str) -> Result<Vec<Value>, KubeError> {
        self.pages(path, JSON).await
    }

    /// As [`Api::list`], each item's `metadata` alone (a
    /// `PartialObjectMetadataList`): a list of ConfigMaps whose data would
    /// not fit the body limit together.
    pub async fn list_metadata(&self, path: &str) -> Result<Vec<Value>, KubeError> {
        self.pages(path, METADATA_LIST).await
    }

    async fn pages(&self, path: &str, accept: &str) -> Result<Vec<Value>, KubeError> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut items = Vec::new();
        let mut next = String::new();
        loop {
            let page = format!("{path}{sep}limit={PAGE}{next}");
            let mut v = self.ok_accepting(Method::GET, &page, None, accept).await?;
            // An answer without `items` is no list: never read as empty
            // (which a controller would take as "nothing exists"). A list
            // of nothing may say `items: null` (the API server's metadata
            // list does): that is a list, of nothing.
            let is_list = v["kind"].as_str().is_some_and(|k| k.ends_with("List"));
            if is_list && v["items"].is_null() {
                v["items"] = Value::Array(Vec::new());
            }
            let Some(these) = v.get_mut("items").and_then(Value::as_array_mut) else {
                return Err(KubeError::Status {
                    method: Method::GET,
                    path: page,
                    status: StatusCode::OK,
                    message: "the answer is not a list".to_owned(),
                });
            };
            items.append(these);
            match v["metadata"]["continue"].as_str().filter(|c| !c.is_empty()) {
                Some(token) => {
                    next = format!("&{}", crate::https::form_encode(&[("continue", token)]));
                }
                None => return Ok(items),
            }
        }
    }
}

/// What every call asks for.
const JSON: &str = "application/json";

/// A list's items as metadata alone.
const METADATA_LIST: &str = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1";

/// Items per list page.
const PAGE: usize = 500;
