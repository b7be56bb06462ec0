//! Authorization policy: the YAML model, strict loading, decisions, hot
//! reload, request-target canonicalisation, the NetworkPolicy compiler. The
//! `stepmesh policy` commands are in `policy_cmd`.
//!
//! A [`Policy`] is immutable once built; [`PolicyWatch`] swaps whole
//! policies atomically, so a decision never sees half of a reload.

mod compile;
mod decide;
mod fields;
pub mod kube;
pub mod lint;
mod model;
pub mod netpol;
pub mod target;
mod watch;
mod workload;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use crate::cidr::Cidr;
pub use decide::{Decision, RouteMatch};
pub use model::{BindToPeer, InboundDefault, Mode, OutboundAction, Protocol};
pub use stepmesh_ca::spiffe_id::{SpiffeId, SpiffeIdError, SpiffeIdPattern, TrustDomain};
pub use watch::PolicyWatch;
pub use workload::Workload;

/// Why a policy was refused. Every variant names where the problem is.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The YAML does not fit the model (serde names the field path).
    #[error("policy does not parse: {0}")]
    Parse(String),
    /// A value is out of range or inconsistent; `path` is the field path.
    #[error("{path}: {message}")]
    Invalid {
        /// Field path, e.g. `inbound.ports[0].allow[1].from[0]`.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// The file could not be read.
    #[error("reading policy {path}: {source}")]
    Io {
        /// The policy file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// A checked, immutable authorization policy.
#[derive(Debug)]
pub struct Policy {
    trust_domain: TrustDomain,
    mode: Mode,
    providers: Vec<Arc<ProviderConfig>>,
    inbound_default: InboundDefault,
    ports: Vec<PortPolicy>,
    outbound_default: OutboundAction,
    outbound_rules: Vec<OutboundRule>,
    kubernetes: Option<kube::KubePolicy>,
    opaque_ports: Vec<u16>,
    workload: Option<Workload>,
    digest: String,
    labels: DefaultLabels,
}

/// Rule names of the defaults, built once so decisions only clone an `Arc`.
#[derive(Debug)]
struct DefaultLabels {
    inbound_default: Arc<str>,
    outbound_default: Arc<str>,
}

/// The rules of one inbound port.
#[derive(Debug)]
pub struct PortPolicy {
    /// The port the caller dialled.
    pub port: u16,
    /// How its bytes are treated.
    pub protocol: Protocol,
    /// Who may connect at all (any entry matching allows).
    pub allow: Vec<AllowRule>,
    /// HTTP routes, first match wins; requests matching none are allowed
    /// on the port's allow list alone.
    pub routes: Vec<Route>,
    /// How the port's app reads paths (`pathMatch`), so routes match what
    /// the app will serve.
    pub path_match: target::PathOptions,
    /// Some route pattern changes when folded (has upper case).
    pub mixed_case_routes: bool,
    /// Rule name when no allow entry matches (`inbound.ports[i]`).
    pub label: Arc<str>,
}

/// One `allow` entry: the peers it names.
#[derive(Debug)]
pub struct AllowRule {
    /// `name`, or the field path `inbound.ports[i].allow[j]`.
    pub name: Arc<str>,
    /// Exact IDs or `/*` prefixes.
    pub from: Vec<SpiffeIdPattern>,
}

/// An HTTP route of a port.
#[derive(Debug)]
pub struct Route {
    /// The route's name (metrics label, access log, explain).
    pub name: Arc<str>,
    /// Methods it matches; empty means any.
    pub methods: Vec<http::Method>,
    /// Path it matches.
    pub path: PathMatch,
    /// The same, case folded: what folded readings are compared with.
    pub folded: PathMatch,
    /// Narrows the port's allow list for this route.
    pub from: Option<Vec<SpiffeIdPattern>>,
    /// The step-up requirement, if the route is sensitive.
    pub step_up: Option<StepUpRule>,
}

/// How a route matches a request path (query excluded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    /// This exact path.
    Exact(String),
    /// `base/*`: `base` itself and anything under `base/` (held without `/*`).
    Prefix(String),
}

impl Route {
    /// Methods compare without case (ASP.NET routes `post` as `POST`), and a
    /// route for `GET` also takes `HEAD`, which most frameworks serve with
    /// the `GET` handler.
    pub fn matches_method(&self, method: &http::Method) -> bool {
        self.methods.is_empty()
            || self.methods.iter().any(|m| {
                m.as_str().eq_ignore_ascii_case(method.as_str())
                    || (m == http::Method::GET && method.as_str().eq_ignore_ascii_case("HEAD"))
            })
    }

    /// Whether one reading of a request path matches.
    pub fn matches_path(&self, reading: &target::Reading<'_>) -> bool {
        let pattern = if reading.folded {
            &self.folded
        } else {
            &self.path
        };
        pattern.matches(&reading.path)
    }
}

impl PathMatch {
    /// Whether `path` (no query, no trailing slash) matches.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(p) => path == p,
            PathMatch::Prefix(base) => path
                .strip_prefix(base.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
        }
    }
}

impl std::fmt::Display for PathMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PathMatch::Exact(p) => f.write_str(p),
            PathMatch::Prefix(base) => write!(f, "{base}/*"),
        }
    }
}

/// What a sensitive route demands of the step-up token.
#[derive(Debug, Clone, PartialEq)]
pub struct StepUpRule {
    /// Name of the provider in `stepUp.providers`.
    pub provider: Arc<str>,
    /// Header carrying the token; `authorization` means `Bearer <token>`.
    pub header: http::HeaderName,
    /// Any of these `acr` values (empty: not checked).
    pub acr: Vec<String>,
    /// All of these in the `amr` array (empty: not checked).
    pub amr: Vec<String>,
    /// Claims equal to, or arrays containing, these values.
    pub claims: Vec<(String, serde_json::Value)>,
    /// `auth_time` no older than this.
    pub max_age: Option<Duration>,
    /// A JWT-SVID provider's route: the workloads whose `sub` it accepts.
    pub from: Option<Vec<SpiffeIdPattern>>,
    /// How the token is tied to the calling workload.
    pub bind: BindToPeer,
    /// Forward the token to the app (default: stripped).
    pub forward: bool,
}

/// A step-up token issuer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderConfig {
    /// Key in `stepUp.providers`.
    pub name: Arc<str>,
    /// What its tokens must satisfy (issuer, audiences, algorithms, typ,
    /// leeway): the one verifier's rules, `stepmesh_ca::jwt`.
    pub token: stepmesh_ca::jwt::Rules,
    /// Where its signing keys are.
    pub jwks: JwksSource,
    /// Scheduled refresh period.
    pub refresh: Duration,
    /// At most one unknown-`kid` refetch per this interval.
    pub min_refresh_interval: Duration,
}

/// Where a provider's JWKS comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    /// A local JSON file, re-read on refresh.
    File(PathBuf),
    /// The mesh's JWT-SVID keys: the JWK set the CA streams with the trust
    /// bundle, held by the sidecar's CertStore (never fetched).
    Mesh,
    /// An HTTPS URL; `ca_file` adds roots (for private IdPs and tests).
    Url {
        /// `https://...`
        url: String,
        /// Extra PEM roots trusted for this URL.
        ca_file: Option<PathBuf>,
    },
}

/// An outbound rule: destinations and what to do with them.
#[derive(Debug)]
pub struct OutboundRule {
    /// `name`, or the field path `outbound.rules[i]`.
    pub name: Arc<str>,
    /// Networks (empty: any address).
    pub cidrs: Vec<Cidr>,
    /// Ports (empty: any port).
    pub ports: Vec<u16>,
    /// The action when both match.
    pub action: OutboundAction,
}

impl Policy {
    /// Parses and validates a policy document; refused whole on any error.
    pub fn from_yaml(text: &str) -> Result<Policy, PolicyError> {
        compile::compile(text)
    }

    /// Reads and parses a policy file (blocking: call off the runtime threads).
    pub fn from_file(path: &std::path::Path) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Io {
            path: path.to_owned(),
            source,
        })?;
        Policy::from_yaml(&text)
    }

    /// The policy used without `--policy`: any authenticated peer of `td`.
    pub fn allow_authenticated(td: TrustDomain) -> Policy {
        let digest = compile::sha256_hex(format!("allow-authenticated:{td}").as_bytes());
        Policy {
            trust_domain: td,
            mode: Mode::Enforce,
            providers: Vec::new(),
            inbound_default: InboundDefault::AllowAuthenticated,
            ports: Vec::new(),
            outbound_default: OutboundAction::Mtls,
            outbound_rules: Vec::new(),
            kubernetes: None,
            opaque_ports: Vec::new(),
            workload: None,
            digest,
            labels: DefaultLabels::new(),
        }
    }

    /// SHA-256 (hex) of the source text: what `/config` and logs show.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Enforce or audit.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The trust domain the policy was written for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The step-up providers.
    pub fn providers(&self) -> &[Arc<ProviderConfig>] {
        &self.providers
    }

    /// A provider by name.
    pub fn provider(&self, name: &str) -> Option<&Arc<ProviderConfig>> {
        self.providers.iter().find(|p| &*p.name == name)
    }

    /// The `kubernetes:` section (the API gateway's rules), if any.
    pub fn kubernetes(&self) -> Option<&kube::KubePolicy> {
        self.kubernetes.as_ref()
    }

    /// The `workload:` section: the pods this policy protects, if named.
    pub fn workload(&self) -> Option<&Workload> {
        self.workload.as_ref()
    }

    /// What outbound does when no rule matches.
    pub fn outbound_default(&self) -> OutboundAction {
        self.outbound_default
    }

    /// The outbound rules, first match wins.
    pub fn outbound_rules(&self) -> &[OutboundRule] {
        &self.outbound_rules
    }

    /// The inbound ports with rules.
    pub fn ports(&self) -> &[PortPolicy] {
        &self.ports
    }

    /// The rules of `port`, if any.
    pub fn port(&self, port: u16) -> Option<&PortPolicy> {
        self.ports.iter().find(|p| p.port == port)
    }

    /// Whether requests on `port` are routed: any field of theirs may then
    /// decide; elsewhere the connection's identity alone does.
    pub fn routes_requests(&self, port: u16) -> bool {
        self.port(port).is_some_and(|p| !p.routes.is_empty())
    }

    /// What inbound does on ports without rules.
    pub fn inbound_default(&self) -> InboundDefault {
        self.inbound_default
    }

    /// How `port`'s bytes are treated (`tcp` for ports without rules).
    pub fn port_protocol(&self, port: u16) -> Protocol {
        self.port(port).map_or(Protocol::Tcp, |p| p.protocol)
    }
}

impl DefaultLabels {
    fn new() -> DefaultLabels {
        DefaultLabels {
            inbound_default: Arc::from("inbound.default"),
            outbound_default: Arc::from("outbound.default"),
        }
    }
}
