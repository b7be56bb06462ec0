//! The policy file as written: serde structs that refuse unknown fields.
//! [`super::compile`] turns them into the checked [`super::Policy`].

use std::collections::BTreeMap;

use serde::Deserialize;

/// The document root.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawPolicy {
    pub trust_domain: String,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub step_up: Option<RawStepUp>,
    #[serde(default)]
    pub inbound: Option<RawInbound>,
    #[serde(default)]
    pub outbound: Option<RawOutbound>,
    #[serde(default)]
    pub kubernetes: Option<RawKubernetes>,
    #[serde(default)]
    pub workload: Option<RawWorkload>,
}

/// `workload:`: which pods the policy protects, for the NetworkPolicy
/// compiler (the sidecar does not read it: it is the pod it runs in).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawWorkload {
    pub namespace: String,
    #[serde(default)]
    pub service_account: Option<String>,
    #[serde(default)]
    pub selector: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub api_server: bool,
}

/// `enforce` denies; `audit` logs what it would deny and allows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Deny what the policy does not allow.
    #[default]
    Enforce,
    /// Allow everything, report would-deny decisions.
    Audit,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStepUp {
    #[serde(default)]
    pub providers: BTreeMap<String, RawProvider>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawProvider {
    #[serde(default)]
    pub issuer: Option<String>,
    pub jwks: RawJwks,
    pub audiences: Vec<String>,
    pub algorithms: Vec<String>,
    #[serde(default)]
    pub typ: Option<Vec<String>>,
    #[serde(default, deserialize_with = "crate::units::opt_text_or_number")]
    pub leeway: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawJwks {
    #[serde(default)]
    pub file: Option<String>,
    #[serde(default)]
    pub url: Option<String>,
    /// The mesh's own JWT-SVID keys (the CA's JWK set, from the CertStore).
    #[serde(default)]
    pub mesh: bool,
    #[serde(default, deserialize_with = "crate::units::opt_text_or_number")]
    pub refresh: Option<String>,
    #[serde(default, deserialize_with = "crate::units::opt_text_or_number")]
    pub min_refresh_interval: Option<String>,
    #[serde(default)]
    pub ca_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawInbound {
    #[serde(default)]
    pub default: InboundDefault,
    #[serde(default)]
    pub ports: Vec<RawPort>,
}

/// What happens on a port no rule names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InboundDefault {
    /// Refuse every peer.
    #[default]
    Deny,
    /// Allow any authenticated peer of the policy's own trust domain.
    AllowAuthenticated,
}

/// How a port's bytes are treated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Opaque TCP, copied both ways.
    #[default]
    Tcp,
    /// HTTP/1.1 or HTTP/2 (gRPC included), proxied per request.
    Http,
    /// HTTP when the first bytes say so, TCP otherwise.
    Auto,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPort {
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub allow: Vec<RawAllow>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    #[serde(default, rename = "pathMatch")]
    pub path_match: super::target::PathOptions,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAllow {
    #[serde(default)]
    pub name: Option<String>,
    pub from: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawRoute {
    pub name: String,
    #[serde(rename = "match")]
    pub matches: RawMatch,
    #[serde(default)]
    pub from: Option<Vec<String>>,
    #[serde(default)]
    pub step_up: Option<RawRouteStepUp>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMatch {
    #[serde(default)]
    pub methods: Vec<String>,
    pub path: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawRouteStepUp {
    pub provider: String,
    /// JWT-SVID providers: the workloads (`sub`) the route accepts.
    #[serde(default)]
    pub from: Option<Vec<String>>,
    #[serde(default)]
    pub header: Option<String>,
    #[serde(default)]
    pub acr: Vec<String>,
    #[serde(default)]
    pub amr: Vec<String>,
    #[serde(default)]
    pub claims: BTreeMap<String, serde_norway::Value>,
    #[serde(default, deserialize_with = "crate::units::opt_text_or_number")]
    pub max_age: Option<String>,
    #[serde(default)]
    pub bind_to_peer: BindToPeer,
    #[serde(default)]
    pub forward: bool,
}

/// How a step-up token is tied to the calling workload.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BindToPeer {
    /// Not bound: any allowed peer may present it.
    #[default]
    None,
    /// `azp` must equal the peer's SPIFFE ID.
    Azp,
    /// `cnf.x5t#S256` must equal the peer certificate's SHA-256 thumbprint.
    Cnf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOutbound {
    #[serde(default)]
    pub default: OutboundAction,
    #[serde(default)]
    pub rules: Vec<RawOutboundRule>,
    /// Destination ports whose traffic stays opaque TCP end to end.
    #[serde(default, rename = "opaquePorts")]
    pub opaque_ports: Vec<u16>,
}

/// What the outbound side does with a destination.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutboundAction {
    /// Originate mTLS to the destination's sidecar.
    #[default]
    Mtls,
    /// Forward the bytes as they are (not meshed).
    Passthrough,
    /// Refuse the connection.
    Deny,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOutboundRule {
    #[serde(default)]
    pub name: Option<String>,
    pub to: RawOutboundTo,
    pub action: OutboundAction,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOutboundTo {
    #[serde(default)]
    pub cidrs: Vec<String>,
    #[serde(default)]
    pub ports: Vec<u16>,
}

/// `kubernetes:`: the step-up gateway in front of the API server.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawKubernetes {
    pub authentication: RawKubeAuthentication,
    #[serde(default)]
    pub rules: Vec<RawKubeRule>,
}

/// Who the person is: a provider and claims, as kube-apiserver's `--oidc-*`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawKubeAuthentication {
    pub provider: String,
    #[serde(default)]
    pub username_claim: Option<String>,
    #[serde(default)]
    pub username_prefix: Option<String>,
    #[serde(default)]
    pub groups_claim: Option<String>,
    #[serde(default)]
    pub groups_prefix: Option<String>,
}

/// One rule: which requests, and what step-up they need.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawKubeRule {
    pub name: String,
    #[serde(default)]
    pub verbs: Vec<String>,
    #[serde(default)]
    pub api_groups: Option<Vec<String>>,
    #[serde(default)]
    pub resources: Vec<String>,
    #[serde(default)]
    pub namespaces: Option<Vec<String>>,
    #[serde(default)]
    pub names: Option<Vec<String>>,
    #[serde(default)]
    pub groups: Option<Vec<String>>,
    #[serde(default)]
    pub step_up: Option<RawRouteStepUp>,
}
