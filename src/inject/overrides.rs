//! Per-pod `stepmesh.io/*` annotations: the names, and the settings they
//! yield on top of the injector's configuration.

use std::time::Duration;

use serde_json::{Map, Value};

use super::config::{check_log_level, quantity, InjectorConfig, Resources};
use crate::init::{Cidr, NonTcp};

/// `"false"` opts a pod out (also `"disabled"`).
pub const INJECT: &str = "stepmesh.io/inject";
/// Set by the injector: the pod already carries stepmesh.
pub const INJECTED: &str = "stepmesh.io/injected";
/// Set by the injector: `native` or `classic`.
pub const SIDECAR_MODE: &str = "stepmesh.io/sidecar-mode";
/// Set by the injector: the image injected.
pub const PROXY_IMAGE: &str = "stepmesh.io/proxy-image";
/// Set by the injector: JSON listing the containers and volumes it added.
pub const STATUS: &str = "stepmesh.io/status";
/// Pod label set by the injector: the service account, for NetworkPolicies.
pub const SERVICE_ACCOUNT_LABEL: &str = "stepmesh.io/service-account";
/// `"true"`/`"false"`: native sidecar (initContainers) or classic container.
pub const NATIVE_SIDECAR: &str = "stepmesh.io/native-sidecar";
/// Comma-separated inbound ports not redirected (added to the config's).
pub const EXCLUDE_INBOUND_PORTS: &str = "stepmesh.io/exclude-inbound-ports";
/// Comma-separated outbound ports not redirected (added to the config's).
pub const EXCLUDE_OUTBOUND_PORTS: &str = "stepmesh.io/exclude-outbound-ports";
/// Comma-separated outbound CIDRs (IPv4 or IPv6) not redirected (added to the config's).
pub const EXCLUDE_OUTBOUND_CIDRS: &str = "stepmesh.io/exclude-outbound-cidrs";
/// `allow`, `dns` or `drop`: what the pod may send that is not TCP.
pub const NON_TCP: &str = "stepmesh.io/non-tcp";
/// Comma-separated UDP ports the pod may send to (added to the config's).
pub const ALLOW_UDP_PORTS: &str = "stepmesh.io/allow-udp-ports";
/// `"true"`/`"false"`: leave the app's probe ports out of interception.
pub const EXCLUDE_PROBE_PORTS: &str = "stepmesh.io/exclude-probe-ports";
/// `"true"`/`"false"`: move the app's probes to the sidecar's admin port.
pub const REWRITE_PROBES: &str = "stepmesh.io/rewrite-probes";
/// Sidecar CPU request.
pub const CPU_REQUEST: &str = "stepmesh.io/proxy-cpu-request";
/// Sidecar CPU limit.
pub const CPU_LIMIT: &str = "stepmesh.io/proxy-cpu-limit";
/// Sidecar memory request.
pub const MEMORY_REQUEST: &str = "stepmesh.io/proxy-memory-request";
/// Sidecar memory limit.
pub const MEMORY_LIMIT: &str = "stepmesh.io/proxy-memory-limit";
/// Sidecar `RUST_LOG` filter.
pub const LOG_LEVEL: &str = "stepmesh.io/log-level";
/// ConfigMap holding the pod's policy (default from the config).
pub const POLICY_CONFIG_MAP: &str = "stepmesh.io/policy-configmap";
/// Sidecar `--drain-timeout` (a duration: `30s`, `1m30s`).
pub const PROXY_DRAIN_TIMEOUT: &str = "stepmesh.io/proxy-drain-timeout";
/// `"enabled"`/`"disabled"` (or `"true"`/`"false"`): serve the SPIFFE
/// Workload API to the app containers (off unless asked; docs/INJECT.md).
pub const WORKLOAD_API: &str = "stepmesh.io/workload-api";

/// A per-pod annotation whose value is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("annotation {key}: {value:?} {reason}")]
pub struct BadAnnotation {
    /// The annotation key.
    pub key: &'static str,
    /// Its value.
    pub value: String,
    /// What is wrong with it.
    pub reason: String,
}

/// The settings for one pod: the configuration with its annotations applied.
#[derive(Debug, Clone, PartialEq)]
pub struct PodSettings {
    /// Native sidecar or classic container.
    pub native_sidecar: bool,
    /// Inbound ports not redirected.
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound ports not redirected.
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound networks not redirected.
    pub exclude_outbound_cidrs: Vec<Cidr>,
    /// What the pod's non-TCP traffic may do.
    pub non_tcp: NonTcp,
    /// UDP destination ports let out whatever `non_tcp` says.
    pub allow_udp_ports: Vec<u16>,
    /// Add the app's probe ports to the inbound exclusions.
    pub exclude_probe_ports: bool,
    /// Rewrite the app's probes to the sidecar's admin port.
    pub rewrite_probes: bool,
    /// Sidecar resources.
    pub resources: Resources,
    /// Sidecar log filter.
    pub log_level: String,
    /// Policy ConfigMap name.
    pub policy_config_map: String,
    /// Sidecar drain timeout; `None` keeps the sidecar's default.
    pub drain_timeout: Option<Duration>,
    /// Serve the SPIFFE Workload API to the app containers.
    pub workload_api: bool,
}

/// Whether the pod's annotations opt it out.
pub fn opted_out(annotations: &Map<String, Value>) -> Result<bool, BadAnnotation> {
    match annotations.get(INJECT).map(text) {
        None => Ok(false),
        Some("false" | "disabled") => Ok(true),
        Some("true" | "enabled") => Ok(false),
        Some(other) => Err(bad(
            INJECT,
            other,
            "is not one of true, false, enabled, disabled",
        )),
    }
}

impl PodSettings {
    /// The configuration's settings overridden by the pod's annotations.
    pub fn new(config: &InjectorConfig, ann: &Map<String, Value>) -> Result<Self, BadAnnotation> {
        let mut s = Self {
            native_sidecar: config.native_sidecar,
            exclude_inbound_ports: config.exclude_inbound_ports.clone(),
            exclude_outbound_ports: config.exclude_outbound_ports.clone(),
            // Checked when the configuration was loaded; a bad entry is dropped.
            exclude_outbound_cidrs: config.cidrs().unwrap_or_default(),
            non_tcp: config.non_tcp,
            allow_udp_ports: config.allow_udp_ports.clone(),
            exclude_probe_ports: config.exclude_probe_ports,
            rewrite_probes: config.rewrite_probes,
            resources: config.resources.clone(),
            log_level: config.log_level.clone(),
            policy_config_map: config.policy_config_map.clone(),
            drain_timeout: config.proxy_drain_timeout,
            workload_api: false,
        };
        let get = |key| ann.get(key).map(text);
        for (key, slot) in [
            (NATIVE_SIDECAR, &mut s.native_sidecar),
            (EXCLUDE_PROBE_PORTS, &mut s.exclude_probe_ports),
            (REWRITE_PROBES, &mut s.rewrite_probes),
        ] {
            if let Some(v) = get(key) {
                *slot = match v {
                    "true" => true,
                    "false" => false,
                    other => return Err(bad(key, other, "is not true or false")),
                };
            }
        }
        if let Some(v) = get(EXCLUDE_INBOUND_PORTS) {
            s.exclude_inbound_ports
                .extend(ports(EXCLUDE_INBOUND_PORTS, v)?);
        }
        if let Some(v) = get(EXCLUDE_OUTBOUND_PORTS) {
            s.exclude_outbound_ports
                .extend(ports(EXCLUDE_OUTBOUND_PORTS, v)?);
        }
        if let Some(v) = get(EXCLUDE_OUTBOUND_CIDRS) {
            for item in list(v) {
                let cidr = item
                    .parse()
                    .map_err(|e: String| bad(EXCLUDE_OUTBOUND_CIDRS, v, &e))?;
                s.exclude_outbound_cidrs.push(cidr);
            }
        }
        if let Some(v) = get(ALLOW_UDP_PORTS) {
            s.allow_udp_ports.extend(ports(ALLOW_UDP_PORTS, v)?);
        }
        if let Some(v) = get(NON_TCP) {
            // The spellings of `stepmesh init --non-tcp` itself.
            s.non_tcp = <NonTcp as clap::ValueEnum>::from_str(v, false)
                .map_err(|_| bad(NON_TCP, v, "is not allow, dns or drop"))?;
        }
        let r = &mut s.resources;
        for (key, slot) in [
            (CPU_REQUEST, &mut r.requests.cpu),
            (CPU_LIMIT, &mut r.limits.cpu),
            (MEMORY_REQUEST, &mut r.requests.memory),
            (MEMORY_LIMIT, &mut r.limits.memory),
        ] {
            if let Some(v) = get(key) {
                if quantity(v).is_none() {
                    return Err(bad(
                        key,
                        v,
                        "is not a Kubernetes quantity (like 100m or 64Mi)",
                    ));
                }
                *slot = v.to_owned();
            }
        }
        s.resources.check().map_err(|reason| BadAnnotation {
            key: "stepmesh.io/proxy-*",
            value: String::new(),
            reason,
        })?;
        if let Some(v) = get(LOG_LEVEL) {
            check_log_level(v).map_err(|e| bad(LOG_LEVEL, v, &e))?;
            s.log_level = v.to_owned();
        }
        if let Some(v) = get(POLICY_CONFIG_MAP) {
            if !is_dns_subdomain(v) {
                return Err(bad(POLICY_CONFIG_MAP, v, "is not a ConfigMap name"));
            }
            v.clone_into(&mut s.policy_config_map);
        }
        if let Some(v) = get(PROXY_DRAIN_TIMEOUT) {
            let d = crate::units::parse_duration(v).map_err(|e| bad(PROXY_DRAIN_TIMEOUT, v, &e))?;
            s.drain_timeout = Some(d);
        }
        if let Some(v) = get(WORKLOAD_API) {
            s.workload_api = match v {
                "enabled" | "true" => true,
                "disabled" | "false" => false,
                other => return Err(bad(WORKLOAD_API, other, "is not enabled or disabled")),
            };
        }
        Ok(s)
    }
}

/// An annotation value as text (the API server only stores strings; a
/// non-string from an offline file is treated as text that matches nothing).
fn text(v: &Value) -> &str {
    v.as_str().unwrap_or("<not a string>")
}

fn list(v: &str) -> impl Iterator<Item = &str> {
    v.split(',').map(str::trim).filter(|s| !s.is_empty())
}

fn ports(key: &'static str, v: &str) -> Result<Vec<u16>, BadAnnotation> {
    list(v)
        .map(|p| match p.parse::<u16>() {
            Ok(port) if port > 0 => Ok(port),
            _ => Err(bad(key, v, &format!("has {p:?}, not a port (1-65535)"))),
        })
        .collect()
}

fn bad(key: &'static str, value: &str, reason: &str) -> BadAnnotation {
    BadAnnotation {
        key,
        value: value.to_owned(),
        reason: reason.to_owned(),
    }
}

/// RFC 1123 subdomain, as Kubernetes names of ConfigMaps are.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    fn settings(ann: Value) -> Result<PodSettings, BadAnnotation> {
        PodSettings::new(&InjectorConfig::default(), ann.as_object().unwrap())
    }

    #[test]
    fn annotations_override_the_config() {
        let s = settings(json!({
            NATIVE_SIDECAR: "false",
            EXCLUDE_INBOUND_PORTS: "9090, 9091",
            EXCLUDE_OUTBOUND_CIDRS: "10.96.0.0/12",
            CPU_LIMIT: "2",
            MEMORY_REQUEST: "128Mi",
            LOG_LEVEL: "stepmesh=debug",
            PROXY_DRAIN_TIMEOUT: "1m30s",
        }))
        .unwrap();
        assert_eq!(s.drain_timeout, Some(std::time::Duration::from_secs(90)));
        assert!(!s.native_sidecar);
        assert_eq!(s.exclude_inbound_ports, [9090, 9091]);
        assert_eq!(s.exclude_outbound_cidrs[0].to_string(), "10.96.0.0/12");
        assert_eq!(s.resources.limits.cpu, "2");
        assert_eq!(s.resources.requests.memory, "128Mi");
        assert_eq!(s.log_level, "stepmesh=debug");
        assert!(!s.workload_api, "off unless asked");
        assert_eq!(s.non_tcp, NonTcp::Dns, "the config's default");
        let udp = settings(json!({ALLOW_UDP_PORTS: "8125, 6831"})).unwrap();
        assert_eq!(udp.allow_udp_ports, [8125, 6831]);
        for (v, mode) in [("allow", NonTcp::Allow), ("drop", NonTcp::Drop)] {
            assert_eq!(settings(json!({NON_TCP: v})).unwrap().non_tcp, mode);
        }
        for (v, on) in [
            ("enabled", true),
            ("true", true),
            ("disabled", false),
            ("false", false),
        ] {
            assert_eq!(
                settings(json!({WORKLOAD_API: v})).unwrap().workload_api,
                on,
                "{v}"
            );
        }
    }

    #[test]
    fn bad_values_name_the_annotation() {
        for (ann, key) in [
            (
                json!({EXCLUDE_INBOUND_PORTS: "80,http"}),
                EXCLUDE_INBOUND_PORTS,
            ),
            (json!({EXCLUDE_OUTBOUND_PORTS: "0"}), EXCLUDE_OUTBOUND_PORTS),
            (
                json!({EXCLUDE_OUTBOUND_CIDRS: "10.0.0.1/8"}),
                EXCLUDE_OUTBOUND_CIDRS,
            ),
            (json!({NATIVE_SIDECAR: "yes"}), NATIVE_SIDECAR),
            (json!({REWRITE_PROBES: "off"}), REWRITE_PROBES),
            (json!({CPU_REQUEST: "lots"}), CPU_REQUEST),
            (json!({LOG_LEVEL: "info\" --evil"}), LOG_LEVEL),
            (json!({POLICY_CONFIG_MAP: "Bad_Name"}), POLICY_CONFIG_MAP),
            (json!({PROXY_DRAIN_TIMEOUT: "30"}), PROXY_DRAIN_TIMEOUT),
            (json!({WORKLOAD_API: "yes"}), WORKLOAD_API),
            (json!({NON_TCP: "udp"}), NON_TCP),
            (json!({ALLOW_UDP_PORTS: "statsd"}), ALLOW_UDP_PORTS),
        ] {
            let err = settings(ann).unwrap_err();
            assert_eq!(err.key, key, "{err}");
        }
        let err = settings(json!({MEMORY_REQUEST: "1Gi"})).unwrap_err();
        assert!(err.reason.contains("exceeds"), "{err}");
        assert!(opted_out(json!({INJECT: "maybe"}).as_object().unwrap()).is_err());
        assert!(opted_out(json!({INJECT: "false"}).as_object().unwrap()).unwrap());
    }
}
