//! The ports kubelet probes in a pod's app containers: opt-in inbound
//! exclusions, because kubelet's plaintext probes would otherwise meet the
//! sidecar's mTLS and fail.

use serde_json::Value;

/// Ports of the `httpGet`, `tcpSocket` and `grpc` readiness, liveness and
/// startup probes of `containers`; named ports are resolved against the
/// container's own `ports` (an unknown name is skipped: the API server
/// refuses such a pod anyway). Sorted, without duplicates.
pub fn probe_ports(containers: &[Value]) -> Vec<u16> {
    let mut ports = Vec::new();
    for container in containers {
        for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
            for handler in ["httpGet", "tcpSocket", "grpc"] {
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
        assert_eq!(
            probe_ports(containers.as_array().unwrap()),
            [7070, 8080, 9000]
        );
        assert!(probe_ports(&[]).is_empty());
    }
}
