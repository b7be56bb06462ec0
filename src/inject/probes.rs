//! kubelet's probes of a pod's app containers, which would otherwise meet
//! the sidecar's mTLS and fail: rewritten to the sidecar's admin port (the
//! default, [`rewrite`]), or their ports left out of interception (opt-in,
//! [`probe_ports`]).

use serde_json::{json, Map, Value};

use super::patch::PatchOp;
use crate::appprobe::{self, AppProbe, Grpc, Header, HttpGet, ProbeKind, ProbeTable, TcpSocket};

/// Handlers kubelet may run against a port.
const PORT_HANDLERS: [&str; 3] = ["httpGet", "tcpSocket", "grpc"];

/// The probe rewrite of one pod.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Rewrite {
    /// Operations replacing the app containers' probes; they index
    /// `/spec/containers` as the pod has it, so they go before any
    /// operation inserting a container there.
    pub ops: Vec<PatchOp>,
    /// The originals, for the sidecar (`STEPMESH_APP_PROBES`).
    pub table: ProbeTable,
    /// Which probes were moved: (container index, probe field).
    pub moved: Vec<(usize, &'static str)>,
}

/// Moves each app container's `httpGet`, `tcpSocket` and `grpc` readiness,
/// liveness and startup probe to `httpGet` on the sidecar's `admin_port` at
/// `/app-health/<container>/<readyz|livez|startupz>`, keeping every other
/// field of the probe (thresholds, period, delay, timeout). Left as they
/// are: `exec` probes (run inside the container, never intercepted), probes
/// with a `host` (kubelet dials that host, not this pod), and probes whose
/// named port does not resolve (the API server refuses such a pod anyway).
pub fn rewrite(containers: &[Value], admin_port: u16) -> Rewrite {
    let mut out = Rewrite::default();
    for (index, container) in containers.iter().enumerate() {
        let Some(name) = container.get("name").and_then(Value::as_str) else {
            continue;
        };
        for (kind, field) in ProbeKind::ALL {
            let Some(probe) = container.get(field).and_then(Value::as_object) else {
                continue;
            };
            let Some(original) = original(container, probe) else {
                continue;
            };
            let path = kind.path(name);
            if let Err(e) = appprobe::check_entry(&path, &original) {
                // Better a probe left alone than a table the sidecar refuses.
                tracing::debug!(container = name, probe = field, error = %e, "probe not rewritten");
                continue;
            }
            let mut rewritten: Map<String, Value> = probe
                .iter()
                .filter(|(k, _)| !PORT_HANDLERS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            rewritten.insert(
                "httpGet".into(),
                json!({"path": path, "port": admin_port, "scheme": "HTTP"}),
            );
            out.ops.push(PatchOp::add(
                format!("/spec/containers/{index}/{field}"),
                Value::Object(rewritten),
            ));
            out.table.insert(path, original);
            out.moved.push((index, field));
        }
    }
    out
}

/// The probe as the sidecar runs it, or `None` when it is not to be moved.
fn original(container: &Value, probe: &Map<String, Value>) -> Option<AppProbe> {
    let timeout_seconds = match probe.get("timeoutSeconds").and_then(Value::as_u64) {
        Some(t) => u32::try_from(t).unwrap_or(appprobe::MAX_TIMEOUT_SECONDS),
        None => 1,
    };
    let mut out = AppProbe {
        http_get: None,
        tcp_socket: None,
        grpc: None,
        timeout_seconds,
    };
    let has_host = |h: &Value| {
        h.get("host")
            .and_then(Value::as_str)
            .is_some_and(|host| !host.is_empty())
    };
    if let Some(h) = probe.get("httpGet") {
        if has_host(h) {
            return None;
        }
        let text = |key: &str| h.get(key).and_then(Value::as_str).map(str::to_owned);
        let headers = h.get("httpHeaders").and_then(Value::as_array);
        out.http_get = Some(HttpGet {
            path: text("path").filter(|p| !p.is_empty()),
            port: resolve(container, h.get("port")?)?,
            scheme: text("scheme"),
            http_headers: headers
                .into_iter()
                .flatten()
                .map(|header| {
                    Some(Header {
                        name: header.get("name")?.as_str()?.to_owned(),
                        value: header.get("value")?.as_str()?.to_owned(),
                    })
                })
                .collect::<Option<_>>()?,
        });
    } else if let Some(t) = probe.get("tcpSocket") {
        if has_host(t) {
            return None;
        }
        out.tcp_socket = Some(TcpSocket {
            port: resolve(container, t.get("port")?)?,
        });
    } else if let Some(g) = probe.get("grpc") {
        out.grpc = Some(Grpc {
            port: resolve(container, g.get("port")?)?,
            service: g
                .get("service")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned),
        });
    } else {
        return None;
    }
    Some(out)
}

/// Ports of the `httpGet`, `tcpSocket` and `grpc` readiness, liveness and
/// startup probes of `containers` that still aim at the app after `moved`
/// (the probes [`rewrite`] sent to the admin port need no exclusion); named
/// ports are resolved against the container's own `ports` (an unknown name
/// is skipped: the API server refuses such a pod anyway). Sorted, without
/// duplicates.
pub fn probe_ports(containers: &[Value], moved: &Rewrite) -> Vec<u16> {
    let mut ports = Vec::new();
    for (index, container) in containers.iter().enumerate() {
        for (_, probe) in ProbeKind::ALL {
            if moved.moved.contains(&(index, probe)) {
                continue;
            }
            for handler in PORT_HANDLERS {
                let Some(port) = container
                    .get(probe)
                    .and_then(|p| p.get(handler))
                    .and_then(|h| h.get("port"))
                else {
                    continue;
                };
                if let Some(port) = resolve(container, port) {
                    ports.push(port);
                }
            }
        }
    }
    ports.sort_unstable();
    ports.dedup();
    ports
}

fn resolve(container: &Value, port: &Value) -> Option<u16> {
    if let Some(number) = port.as_u64() {
        return u16::try_from(number).ok().filter(|p| *p > 0);
    }
    let name = port.as_str()?;
    if let Ok(number) = name.parse::<u16>() {
        return Some(number).filter(|p| *p > 0);
    }
    container
        .get("ports")?
        .as_array()?
        .iter()
        .find(|p| p.get("name").and_then(Value::as_str) == Some(name))?
        .get("containerPort")?
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn numbered_named_and_missing_ports() {
        let containers = json!([
            {"name": "a", "ports": [{"name": "http", "containerPort": 8080}],
             "readinessProbe": {"httpGet": {"path": "/r", "port": "http"}},
             "livenessProbe": {"tcpSocket": {"port": 8080}},
             "startupProbe": {"grpc": {"port": 9000}}},
            {"name": "b", "livenessProbe": {"httpGet": {"port": "nope"}}},
            {"name": "c", "readinessProbe": {"exec": {"command": ["true"]}}},
            {"name": "d", "readinessProbe": {"httpGet": {"port": "7070"}}},
        ]);
        let containers = containers.as_array().unwrap();
        let none = Rewrite::default();
        assert_eq!(probe_ports(containers, &none), [7070, 8080, 9000]);
        assert!(probe_ports(&[], &none).is_empty());
        // Once rewritten, only the probe that could not be moved is left.
        let moved = rewrite(containers, 15020);
        assert_eq!(moved.moved.len(), 4);
        assert_eq!(probe_ports(containers, &moved), Vec::<u16>::new());
        let mut with_host = containers.to_vec();
        with_host[2]["livenessProbe"] = json!({"tcpSocket": {"host": "db", "port": 5432}});
        let moved = rewrite(&with_host, 15020);
        assert_eq!(probe_ports(&with_host, &moved), [5432]);
    }
}
