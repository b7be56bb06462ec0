//! The injector's configuration file (YAML): what gets injected. Every field
//! has a default that works with the manifests in deploy/.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::init::{Cidr, NonTcp};

/// Why a configuration file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {cause}")]
    Read {
        /// The file.
        path: String,
        /// What the OS said.
        cause: std::io::Error,
    },
    /// The YAML did not parse or has unknown fields.
    #[error("{path}: {cause}")]
    Parse {
        /// The file.
        path: String,
        /// What the parser said (names the field).
        cause: serde_norway::Error,
    },
    /// A value parsed but makes no sense.
    #[error("{path}: {field}: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// The offending field.
        field: &'static str,
        /// Why.
        reason: String,
    },
}

/// What the injector adds to a pod.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct InjectorConfig {
    /// The stepmesh image (init container and sidecar).
    pub image: String,
    /// Pull policy of both containers.
    pub image_pull_policy: String,
    /// Entrypoint of the init container inside the image; `init` args follow.
    pub command: Vec<String>,
    /// Entrypoint of the sidecar inside the image, the sidecar-only
    /// `stepmesh-proxy` (the flags of `stepmesh proxy` follow): it maps
    /// less code than the all-in-one binary in every pod
    /// (docs/BENCHMARKS.md, "Idle RSS"). `[stepmesh, proxy]` also works.
    pub proxy_command: Vec<String>,
    /// Where sidecars reach the CA (`host:port`).
    pub ca_address: String,
    /// The mesh's trust domain.
    pub trust_domain: String,
    /// Proxy as a native sidecar (initContainers, `restartPolicy: Always`;
    /// Kubernetes >= 1.29), or a classic sidecar container when false.
    pub native_sidecar: bool,
    /// UID of the sidecar (its traffic is not redirected).
    pub proxy_uid: u32,
    /// Transparent inbound port.
    pub inbound_port: u16,
    /// Transparent outbound port.
    pub outbound_port: u16,
    /// Sidecar admin port (`/ready`, `/healthz`, `/metrics`).
    pub admin_port: u16,
    /// `RUST_LOG` filter of the sidecar.
    pub log_level: String,
    /// ConfigMap (in the pod's namespace) with `policy.yaml`.
    pub policy_config_map: String,
    /// ConfigMap (in the pod's namespace) with `bundle.pem`, the CA's roots.
    pub ca_bundle_config_map: String,
    /// Audience of the projected ServiceAccount token sent to the CA.
    pub token_audience: String,
    /// Lifetime of that token (kubelet refreshes it).
    pub token_expiration_seconds: u32,
    /// Sidecar resources.
    pub resources: Resources,
    /// Init container resources.
    pub init_resources: Resources,
    /// Inbound ports never redirected, for every pod.
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound ports never redirected, for every pod.
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound networks (IPv4 or IPv6 CIDRs) never redirected, for every pod.
    pub exclude_outbound_cidrs: Vec<String>,
    /// What pods may send and receive that is not TCP, which the sidecar
    /// cannot carry (`stepmesh init --non-tcp`): `dns` by default, so UDP
    /// and ICMP do not pass beside the mesh except DNS queries to the pod's
    /// nameservers (docs/INIT.md).
    pub non_tcp: NonTcp,
    /// UDP destination ports every pod may send to beside the sidecar
    /// whatever `non_tcp` says (`stepmesh init --allow-udp-ports`): a
    /// StatsD or tracing agent on the node.
    pub allow_udp_ports: Vec<u16>,
    /// Namespaces never injected, whatever the webhook configuration says.
    pub excluded_namespaces: Vec<String>,
    /// Leave the app's probe ports out of inbound interception so kubelet's
    /// plaintext probes reach the app. Off: those ports then also accept
    /// plaintext from anyone, bypassing mTLS (docs/INJECT.md).
    pub exclude_probe_ports: bool,
    /// Move the app containers' HTTP, TCP and gRPC probes to the sidecar's
    /// admin port (`/app-health/...`), which runs them against the app over
    /// localhost; mTLS stays on for every app port (docs/INJECT.md).
    pub rewrite_probes: bool,
    /// How long the sidecar lets in-flight connections finish after SIGTERM
    /// (its `--drain-timeout`, in the grammar of [`crate::units`]); unset
    /// keeps the sidecar's own default.
    #[serde(deserialize_with = "proxy_drain_timeout")]
    pub proxy_drain_timeout: Option<Duration>,
}

/// Requests and limits of one container.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Scheduling requests.
    pub requests: Quantities,
    /// Hard limits.
    pub limits: Quantities,
}

/// CPU and memory, as Kubernetes quantities (`100m`, `64Mi`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quantities {
    /// CPU quantity.
    pub cpu: String,
    /// Memory quantity.
    pub memory: String,
}

impl Default for InjectorConfig {
    fn default() -> Self {
        Self {
            image: "ghcr.io/stepmesh/stepmesh:0.1.0".into(),
            image_pull_policy: "IfNotPresent".into(),
            command: vec!["stepmesh".into()],
            proxy_command: vec!["stepmesh-proxy".into()],
            ca_address: "stepmesh-ca-replicas.stepmesh-system.svc:15012".into(),
            trust_domain: "cluster.local".into(),
            native_sidecar: true,
            proxy_uid: 1337,
            inbound_port: 15006,
            outbound_port: 15001,
            admin_port: 15020,
            log_level: "info".into(),
            policy_config_map: "stepmesh-policy".into(),
            ca_bundle_config_map: "stepmesh-ca-bundle".into(),
            token_audience: "stepmesh-ca".into(),
            token_expiration_seconds: 3600,
            resources: Resources::new("100m", "64Mi", "1", "256Mi"),
            init_resources: Resources::new("10m", "16Mi", "100m", "64Mi"),
            exclude_inbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            exclude_outbound_cidrs: Vec::new(),
            non_tcp: NonTcp::Dns,
            allow_udp_ports: Vec::new(),
            excluded_namespaces: vec!["kube-system".into(), "stepmesh-system".into()],
            exclude_probe_ports: false,
            rewrite_probes: true,
            proxy_drain_timeout: None,
        }
    }
}

impl Resources {
    /// Resources from four quantities.
    pub fn new(cpu_req: &str, mem_req: &str, cpu_lim: &str, mem_lim: &str) -> Self {
        let q = |cpu: &str, memory: &str| Quantities {
            cpu: cpu.into(),
            memory: memory.into(),
        };
        Self {
            requests: q(cpu_req, mem_req),
            limits: q(cpu_lim, mem_lim),
        }
    }

    /// The Kubernetes `resources` object.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "requests": {"cpu": self.requests.cpu, "memory": self.requests.memory},
            "limits": {"cpu": self.limits.cpu, "memory": self.limits.memory},
        })
    }

    /// Checks every quantity and that no request exceeds its limit.
    pub fn check(&self) -> Result<(), String> {
        for (what, req, lim) in [
            ("cpu", &self.requests.cpu, &self.limits.cpu),
            ("memory", &self.requests.memory, &self.limits.memory),
        ] {
            let r =
                quantity(req).ok_or_else(|| format!("{what} request {req:?} is not a quantity"))?;
            let l =
                quantity(lim).ok_or_else(|| format!("{what} limit {lim:?} is not a quantity"))?;
            if r > l {
                return Err(format!("{what} request {req} exceeds the limit {lim}"));
            }
        }
        Ok(())
    }
}

impl InjectorConfig {
    /// Reads and checks a configuration file; `None` gives the defaults.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
            path: shown.clone(),
            cause,
        })?;
        let config: Self = serde_norway::from_str(&text).map_err(|cause| ConfigError::Parse {
            path: shown.clone(),
            cause,
        })?;
        config
            .check()
            .map_err(|(field, reason)| ConfigError::Invalid {
                path: shown,
                field,
                reason,
            })?;
        Ok(config)
    }

    /// The outbound exclusions as parsed networks.
    pub fn cidrs(&self) -> Result<Vec<Cidr>, String> {
        self.exclude_outbound_cidrs
            .iter()
            .map(|c| c.parse())
            .collect()
    }

    fn check(&self) -> Result<(), (&'static str, String)> {
        let nonempty = [
            ("image", &self.image),
            ("caAddress", &self.ca_address),
            ("trustDomain", &self.trust_domain),
            ("policyConfigMap", &self.policy_config_map),
            ("caBundleConfigMap", &self.ca_bundle_config_map),
            ("tokenAudience", &self.token_audience),
        ];
        for (field, value) in nonempty {
            if value.trim().is_empty() {
                return Err((field, "must not be empty".into()));
            }
        }
        if self.command.is_empty() {
            return Err(("command", "must not be empty".into()));
        }
        if self.proxy_command.is_empty() {
            return Err(("proxyCommand", "must not be empty".into()));
        }
        if !["Always", "IfNotPresent", "Never"].contains(&self.image_pull_policy.as_str()) {
            return Err((
                "imagePullPolicy",
                "must be Always, IfNotPresent or Never".into(),
            ));
        }
        // Same character rules as the SPIFFE spec (ca crate's TrustDomain).
        let td_ok = self.trust_domain.len() <= 255
            && self
                .trust_domain
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-_".contains(c));
        if !td_ok {
            return Err(("trustDomain", "must be lower-case [a-z0-9.-_]".into()));
        }
        if self.token_expiration_seconds < 600 {
            return Err((
                "tokenExpirationSeconds",
                "Kubernetes requires at least 600".into(),
            ));
        }
        check_log_level(&self.log_level).map_err(|e| ("logLevel", e))?;
        self.resources.check().map_err(|e| ("resources", e))?;
        self.init_resources
            .check()
            .map_err(|e| ("initResources", e))?;
        self.cidrs().map_err(|e| ("excludeOutboundCidrs", e))?;
        Ok(())
    }
}

/// `proxyDrainTimeout`: the YAML parser's own errors name no field for a
/// custom error, so the message does.
fn proxy_drain_timeout<'de, D>(de: D) -> Result<Option<Duration>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    crate::units::opt_text_or_number(de)?
        .map(|text| {
            crate::units::parse_duration(&text)
                .map_err(|e| serde::de::Error::custom(format!("proxyDrainTimeout: {e}")))
        })
        .transpose()
}

/// A `RUST_LOG`-style filter limited to characters that cannot escape an
/// environment variable value (`info`, `stepmesh=debug,warn`).
pub fn check_log_level(level: &str) -> Result<(), String> {
    let ok = !level.is_empty()
        && level.len() <= 256
        && level
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_:=,.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{level:?} is not a log filter (like `info` or `stepmesh=debug`)"
        ))
    }
}

/// The value of a Kubernetes quantity (`100m` = 0.1, `64Mi` = 67108864), or
/// `None` when the text is not one.
pub fn quantity(text: &str) -> Option<f64> {
    const SUFFIXES: [(&str, f64); 13] = [
        ("Ki", 1024.0),
        ("Mi", 1048576.0),
        ("Gi", 1073741824.0),
        ("Ti", 1099511627776.0),
        ("Pi", 1125899906842624.0),
        ("Ei", 1152921504606846976.0),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
    ];
    let (number, factor) = SUFFIXES
        .iter()
        .find_map(|(s, f)| text.strip_suffix(s).map(|n| (n, *f)))
        .unwrap_or((text, 1.0));
    let digits_ok = !number.is_empty()
        && number.chars().all(|c| c.is_ascii_digit() || c == '.')
        && number.matches('.').count() <= 1
        && !number.starts_with('.')
        && !number.ends_with('.');
    if !digits_ok {
        return None;
    }
    number.parse::<f64>().ok().map(|n| n * factor)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_file_overrides_fields() {
        assert_eq!(InjectorConfig::default().check(), Ok(()));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, "nativeSidecar: false\nimage: example/stepmesh:dev\n").unwrap();
        let c = InjectorConfig::load(Some(&path)).unwrap();
        assert!(!c.native_sidecar);
        assert_eq!(c.image, "example/stepmesh:dev");
        assert_eq!(c.admin_port, 15020);
    }

    #[test]
    fn shipped_config_is_exactly_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/injector/config.yaml");
        assert_eq!(
            InjectorConfig::load(Some(&path)).unwrap(),
            InjectorConfig::default()
        );
    }

    #[test]
    fn bad_files_are_refused_naming_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        for (text, needle) in [
            ("imagee: x\n", "imagee"),
            (
                "resources: {requests: {cpu: 2, memory: 1Gi}, limits: {cpu: 1, memory: 1Gi}}\n",
                "exceeds",
            ),
            ("logLevel: \"info\\n\"\n", "logLevel"),
            ("excludeOutboundCidrs: [10.0.0.1/8]\n", "host bits"),
            ("trustDomain: Bad_Domain\n", "trustDomain"),
            ("tokenExpirationSeconds: 60\n", "600"),
            ("proxyCommand: []\n", "proxyCommand"),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = InjectorConfig::load(Some(&path)).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn quantities() {
        assert_eq!(quantity("100m"), Some(0.1));
        assert_eq!(quantity("64Mi"), Some(67108864.0));
        assert_eq!(quantity("1"), Some(1.0));
        assert_eq!(quantity("1.5Gi"), Some(1610612736.0));
        for bad in ["", "m", "1.", "-1", "1x", "1 Mi", "abc"] {
            assert_eq!(quantity(bad), None, "{bad}");
        }
    }
}
