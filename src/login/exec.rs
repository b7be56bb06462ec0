//! The kubectl side of the plugin: the `KUBERNETES_EXEC_INFO` ExecCredential
//! kubectl hands over, and the ExecCredential printed back on stdout
//! (`client.authentication.k8s.io/v1`, as in the Kubernetes docs'
//! "client-go credential plugins").

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::Deserialize;

/// The environment variable kubectl passes the request in.
pub const EXEC_INFO_ENV: &str = "KUBERNETES_EXEC_INFO";
/// The API version this plugin speaks.
pub const API_VERSION: &str = "client.authentication.k8s.io/v1";
/// The older version, whose ExecCredential has the same fields we use.
const API_VERSION_BETA: &str = "client.authentication.k8s.io/v1beta1";

/// What kubectl told the plugin.
#[derive(Debug, Default)]
pub struct ExecInfo {
    /// The API version to answer in.
    pub api_version: String,
    /// Whether a person can answer on stdin (kubectl's `interactive`).
    pub interactive: bool,
    /// The cluster kubectl is about to call (with `provideClusterInfo`).
    pub cluster: Option<Cluster>,
}

/// The cluster kubectl is about to call.
#[derive(Debug)]
pub struct Cluster {
    /// Its URL (for stepmesh users: the gateway's).
    pub server: String,
    /// The CA kubectl trusts for it, PEM.
    pub ca_pem: Option<Vec<u8>>,
    /// kubectl was told not to verify it.
    pub insecure: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Wire {
    api_version: String,
    kind: String,
    #[serde(default)]
    spec: WireSpec,
}

#[derive(Deserialize, Default)]
struct WireSpec {
    #[serde(default)]
    interactive: bool,
    cluster: Option<WireCluster>,
}

#[derive(Deserialize)]
struct WireCluster {
    server: String,
    #[serde(rename = "certificate-authority-data")]
    ca_data: Option<String>,
    #[serde(rename = "insecure-skip-tls-verify", default)]
    insecure: bool,
}

impl ExecInfo {
    /// Parses the variable's value; `None` (run by hand) means "v1, no
    /// cluster".
    pub fn parse(value: Option<&str>) -> Result<ExecInfo, String> {
        let Some(text) = value.filter(|v| !v.trim().is_empty()) else {
            return Ok(ExecInfo {
                api_version: API_VERSION.to_owned(),
                ..ExecInfo::default()
            });
        };
        let wire: Wire = serde_json::from_str(text)
            .map_err(|e| format!("{EXEC_INFO_ENV} is not an ExecCredential: {e}"))?;
        if wire.kind != "ExecCredential" {
            return Err(format!(
                "{EXEC_INFO_ENV} has kind {:?}, want ExecCredential",
                wire.kind
            ));
        }
        if wire.api_version != API_VERSION && wire.api_version != API_VERSION_BETA {
            return Err(format!(
                "{EXEC_INFO_ENV} has apiVersion {:?}; this plugin speaks {API_VERSION}",
                wire.api_version
            ));
        }
        let cluster = match wire.spec.cluster {
            Some(c) => Some(Cluster {
                server: c.server,
                ca_pem: c
                    .ca_data
                    .filter(|d| !d.is_empty())
                    .map(|d| STANDARD.decode(d.trim()))
                    .transpose()
                    .map_err(|e| {
                        format!("{EXEC_INFO_ENV}: certificate-authority-data is not base64: {e}")
                    })?,
                insecure: c.insecure,
            }),
            None => None,
        };
        Ok(ExecInfo {
            api_version: wire.api_version,
            interactive: wire.spec.interactive,
            cluster,
        })
    }
}

/// The ExecCredential kubectl reads on stdout: the token and when it
/// expires (kubectl runs the plugin again after that).
pub fn credential(api_version: &str, token: &str, expiry_unix: u64) -> String {
    let expiry = std::time::UNIX_EPOCH + std::time::Duration::from_secs(expiry_unix);
    serde_json::json!({
        "apiVersion": api_version,
        "kind": "ExecCredential",
        "status": {
            "token": token,
            "expirationTimestamp": crate::accesslog::rfc3339(expiry),
        },
    })
    .to_string()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;

    #[test]
    fn reads_what_kubectl_sends() {
        let info = ExecInfo::parse(Some(
            r#"{"kind":"ExecCredential","apiVersion":"client.authentication.k8s.io/v1",
                "spec":{"cluster":{"server":"https://gw:6443","certificate-authority-data":"UEVN",
                "config":null},"interactive":true}}"#,
        ))
        .unwrap();
        assert!(info.interactive);
        let cluster = info.cluster.unwrap();
        assert_eq!(cluster.server, "https://gw:6443");
        assert_eq!(cluster.ca_pem.as_deref(), Some(&b"PEM"[..]));
        assert_eq!(ExecInfo::parse(None).unwrap().api_version, API_VERSION);
        for bad in [
            "{",
            r#"{"kind":"Pod","apiVersion":"v1"}"#,
            r#"{"kind":"ExecCredential","apiVersion":"client.authentication.k8s.io/v2"}"#,
        ] {
            assert!(ExecInfo::parse(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn prints_token_and_rfc3339_expiry() {
        let out: serde_json::Value =
            serde_json::from_str(&credential(API_VERSION, "t", 1_709_251_199)).unwrap();
        assert_eq!(out["kind"], "ExecCredential");
        assert_eq!(out["status"]["token"], "t");
        assert_eq!(
            out["status"]["expirationTimestamp"],
            "2024-02-29T23:59:59.000Z"
        );
    }
}
