//! kubelet probes run by the sidecar: the injector moves each app
//! container's `httpGet`/`tcpSocket`/`grpc` probe to the sidecar's admin
//! port (`/app-health/<container>/<readyz|livez|startupz>`) and hands the
//! originals over in a probe table; the sidecar's admin server answers those
//! paths by running the original probe against the app on 127.0.0.1, so
//! kubelet's plaintext probes never meet the mTLS inbound. This module is
//! the table both sides agree on; [`check`] runs it.

pub mod check;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use check::Prober;

/// Environment variable the injector sets on the proxy (`--app-probes`).
pub const ENV: &str = "STEPMESH_APP_PROBES";
/// Path prefix of the rewritten probes on the admin port.
pub const PATH_PREFIX: &str = "/app-health/";
/// Largest probe timeout honoured (seconds); longer ones are cut to this.
pub const MAX_TIMEOUT_SECONDS: u32 = 300;

/// The probe table: admin path → the original probe. Serialized as one JSON
/// object, the form of the `STEPMESH_APP_PROBES` env var.
pub type ProbeTable = BTreeMap<String, AppProbe>;

/// Which of a container's probes: the last segment of its admin path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    /// `readinessProbe` → `readyz`.
    Readiness,
    /// `livenessProbe` → `livez`.
    Liveness,
    /// `startupProbe` → `startupz`.
    Startup,
}

impl ProbeKind {
    /// Every kind, with its field name in a Kubernetes container.
    pub const ALL: [(Self, &'static str); 3] = [
        (Self::Readiness, "readinessProbe"),
        (Self::Liveness, "livenessProbe"),
        (Self::Startup, "startupProbe"),
    ];

    /// The admin path segment.
    pub fn segment(self) -> &'static str {
        match self {
            Self::Readiness => "readyz",
            Self::Liveness => "livez",
            Self::Startup => "startupz",
        }
    }

    /// The admin path kubelet is sent to for `container`'s probe of this kind.
    pub fn path(self, container: &str) -> String {
        format!("{PATH_PREFIX}{container}/{}", self.segment())
    }
}

/// One original probe, in Kubernetes' own field names, ports as numbers.
/// Exactly one of the handlers is set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppProbe {
    /// An HTTP(S) GET against the app.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<HttpGet>,
    /// A TCP connect to the app.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_socket: Option<TcpSocket>,
    /// A `grpc.health.v1.Health/Check` against the app.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<Grpc>,
    /// kubelet's `timeoutSeconds` (default 1): the bound of one check.
    #[serde(default = "one_second")]
    pub timeout_seconds: u32,
}

/// `httpGet` without `host` (probes with a host are not rewritten).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpGet {
    /// Request path (and query); `/` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The app's port on 127.0.0.1.
    pub port: u16,
    /// `HTTP` (default) or `HTTPS` (certificate not verified, as kubelet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// Extra request headers (`Host` among them sets the Host header).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_headers: Vec<Header>,
}

/// One `httpHeaders` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// Header name.
    pub name: String,
    /// Header value.
    pub value: String,
}

/// `tcpSocket` without `host`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpSocket {
    /// The app's port on 127.0.0.1.
    pub port: u16,
}

/// `grpc`: plaintext gRPC health check, as kubelet does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grpc {
    /// The app's port on 127.0.0.1.
    pub port: u16,
    /// The health service name asked about (empty: the whole server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

fn one_second() -> u32 {
    1
}

/// Why a probe table was refused; the text names the entry and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TableError(String);

/// Parses and checks a probe table (the `--app-probes` value).
pub fn parse(json: &str) -> Result<ProbeTable, TableError> {
    let raw: BTreeMap<String, serde_json::Value> = serde_json::from_str(json)
        .map_err(|e| TableError(format!("not a JSON object of probes: {e}")))?;
    let mut table = ProbeTable::new();
    for (path, value) in raw {
        let probe: AppProbe =
            serde_json::from_value(value).map_err(|e| TableError(format!("{path}: {e}")))?;
        check_entry(&path, &probe)?;
        table.insert(path, probe);
    }
    Ok(table)
}

/// Checks one entry as [`parse`] does: the injector puts nothing in a table
/// that the sidecar would refuse.
pub fn check_entry(path: &str, probe: &AppProbe) -> Result<(), TableError> {
    check_path(path).map_err(|e| TableError(format!("{path:?}: {e}")))?;
    probe
        .check()
        .map_err(|e| TableError(format!("{path}: {e}")))
}

/// `/app-health/<container name>/<readyz|livez|startupz>`.
fn check_path(path: &str) -> Result<(), String> {
    let rest = path
        .strip_prefix(PATH_PREFIX)
        .ok_or_else(|| format!("path must start with {PATH_PREFIX}"))?;
    let (container, kind) = rest
        .split_once('/')
        .ok_or("path must be /app-health/<container>/<readyz|livez|startupz>")?;
    let label_ok = !container.is_empty()
        && container.len() <= 63
        && container
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !label_ok {
        return Err(format!("{container:?} is not a container name"));
    }
    if !ProbeKind::ALL.iter().any(|(k, _)| k.segment() == kind) {
        return Err(format!("{kind:?} is not readyz, livez or startupz"));
    }
    Ok(())
}

impl AppProbe {
    fn check(&self) -> Result<(), String> {
        let handlers = [
            self.http_get.is_some(),
            self.tcp_socket.is_some(),
            self.grpc.is_some(),
        ];
        if handlers.iter().filter(|set| **set).count() != 1 {
            return Err("exactly one of httpGet, tcpSocket, grpc is needed".into());
        }
        if self.timeout_seconds == 0 {
            return Err("timeoutSeconds must be at least 1".into());
        }
        let port = |p: u16, field: &str| match p {
            0 => Err(format!("{field}.port 0 is not a port")),
            _ => Ok(()),
        };
        if let Some(h) = &self.http_get {
            port(h.port, "httpGet")?;
            if let Some(path) = &h.path {
                let ok = path.starts_with('/')
                    && path.parse::<http::uri::PathAndQuery>().is_ok()
                    && !path.contains('#');
                if !ok {
                    return Err(format!("httpGet.path {path:?} is not a URL path"));
                }
            }
            match h.scheme.as_deref() {
                None | Some("HTTP" | "HTTPS") => {}
                Some(other) => {
                    return Err(format!("httpGet.scheme {other:?} is not HTTP or HTTPS"))
                }
            }
            for header in &h.http_headers {
                http::HeaderName::from_bytes(header.name.as_bytes()).map_err(|_| {
                    format!(
                        "httpGet.httpHeaders: {:?} is not a header name",
                        header.name
                    )
                })?;
                http::HeaderValue::from_str(&header.value).map_err(|_| {
                    format!(
                        "httpGet.httpHeaders: {}: {:?} is not a header value",
                        header.name, header.value
                    )
                })?;
            }
        }
        if let Some(t) = &self.tcp_socket {
            port(t.port, "tcpSocket")?;
        }
        if let Some(g) = &self.grpc {
            port(g.port, "grpc")?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_table_round_trips() {
        let json = r#"{
            "/app-health/web/readyz": {"httpGet": {"path": "/healthz?full=1", "port": 8080, "scheme": "HTTPS",
                "httpHeaders": [{"name": "Host", "value": "web.local"}]}, "timeoutSeconds": 3},
            "/app-health/web/livez": {"tcpSocket": {"port": 8080}},
            "/app-health/db-2/startupz": {"grpc": {"port": 9000, "service": "db"}}
        }"#;
        let table = parse(json).unwrap();
        assert_eq!(table.len(), 3);
        let ready = &table["/app-health/web/readyz"];
        assert_eq!(ready.timeout_seconds, 3);
        assert_eq!(
            ready.http_get.as_ref().unwrap().scheme.as_deref(),
            Some("HTTPS")
        );
        assert_eq!(table["/app-health/web/livez"].timeout_seconds, 1);
        let again = parse(&serde_json::to_string(&table).unwrap()).unwrap();
        assert_eq!(again, table);
        assert!(parse("{}").unwrap().is_empty());
    }

    #[test]
    fn bad_tables_name_what_is_wrong() {
        for (json, needle) in [
            ("[]", "not a JSON object"),
            ("{", "not a JSON object"),
            (
                r#"{"/healthz": {"tcpSocket": {"port": 1}}}"#,
                "must start with /app-health/",
            ),
            (
                r#"{"/app-health/web": {"tcpSocket": {"port": 1}}}"#,
                "/app-health/<container>",
            ),
            (
                r#"{"/app-health/Web/readyz": {"tcpSocket": {"port": 1}}}"#,
                "not a container name",
            ),
            (
                r#"{"/app-health/web/ready": {"tcpSocket": {"port": 1}}}"#,
                "not readyz",
            ),
            (r#"{"/app-health/web/readyz": {}}"#, "exactly one of"),
            (
                r#"{"/app-health/web/readyz": {"tcpSocket": {"port": 1}, "grpc": {"port": 2}}}"#,
                "exactly one of",
            ),
            (
                r#"{"/app-health/web/readyz": {"tcpSocket": {"port": 0}}}"#,
                "tcpSocket.port 0",
            ),
            (
                r#"{"/app-health/web/readyz": {"tcpSocket": {"port": 70000}}}"#,
                "70000",
            ),
            (
                r#"{"/app-health/web/readyz": {"tcpSocket": {"port": "http"}}}"#,
                "http",
            ),
            (
                r#"{"/app-health/web/readyz": {"tcpSocket": {"port": 1, "host": "x"}}}"#,
                "host",
            ),
            (
                r#"{"/app-health/web/readyz": {"exec": {"command": ["true"]}}}"#,
                "exec",
            ),
            (
                r#"{"/app-health/web/readyz": {"httpGet": {"port": 1, "path": "healthz"}}}"#,
                "httpGet.path",
            ),
            (
                r#"{"/app-health/web/readyz": {"httpGet": {"port": 1, "scheme": "FTP"}}}"#,
                "httpGet.scheme",
            ),
            (
                r#"{"/app-health/web/readyz": {"httpGet": {"port": 1, "httpHeaders": [{"name": "a b", "value": "x"}]}}}"#,
                "not a header name",
            ),
            (
                r#"{"/app-health/web/readyz": {"httpGet": {"port": 1, "httpHeaders": [{"name": "x", "value": "a\nb"}]}}}"#,
                "not a header value",
            ),
            (
                r#"{"/app-health/web/readyz": {"tcpSocket": {"port": 1}, "timeoutSeconds": 0}}"#,
                "timeoutSeconds",
            ),
        ] {
            let err = parse(json).unwrap_err().to_string();
            assert!(err.contains(needle), "{json}: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
    }
}
