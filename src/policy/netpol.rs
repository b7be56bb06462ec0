//! `stepmesh policy netpol`: the L3/L4 layer beneath the identity layer,
//! compiled from a set of policies together (each names its pods in
//! `workload:`, or one policy takes `--namespace`/`--selector`).
//!
//! Per workload: a default deny of Ingress and Egress; one policy per
//! inbound port allowing the namespaces and service accounts its identity
//! rules name; the mesh's own needs (kubelet probes to the sidecar admin
//! port, DNS, the CA, the API server when the workload says so); egress to
//! every workload of the set whose inbound rules admit this one's identity;
//! the `outbound` rules as egress to IP blocks. Label convention: pods carry
//! `stepmesh.io/service-account: <sa>`; namespaces are matched by the
//! built-in `kubernetes.io/metadata.name` label. Rules that cannot be
//! expressed by labels (another trust domain, non-Kubernetes paths, a whole
//! trust domain) open the port to every source, because the identity layer
//! above still decides; the output says so in a comment.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::{InboundDefault, Policy, PolicyError, SpiffeIdPattern, Workload};
use crate::cidr::Cidr;

#[path = "netpol_egress.rs"]
mod egress;

pub use super::workload::SA_LABEL;
const NS_LABEL: &str = "kubernetes.io/metadata.name";
/// The sidecar's admin port: kubelet probes (rewritten by the injector)
/// and metrics scrapes arrive there.
pub const ADMIN_PORT: u16 = 15020;
/// The CA's gRPC port.
pub const CA_PORT: u16 = 15012;
/// The name suffix of a workload's egress to its callees: the one object
/// derived from other policies of the set (their inbound rules), so the
/// one a policy missing from the set changes in other namespaces.
pub const EGRESS_CALLS: &str = "egress-calls";

/// Why NetworkPolicies could not be generated.
#[derive(Debug, thiserror::Error)]
pub enum NetpolError {
    /// A policy names no pods (no `workload:` and no flags).
    #[error("{0}: no workload: add `workload: {{namespace: NS, serviceAccount: SA}}` to the file, or give --namespace and --selector (one file only)")]
    NoWorkload(String),
    /// `--namespace`/`--selector` disagree with the file's `workload:`.
    #[error("{0}: --namespace/--selector name other pods than its workload: section")]
    Conflict(String),
    /// The flags or a `workload:` are invalid.
    #[error("{source_name}: {error}")]
    Workload {
        /// The file.
        source_name: String,
        /// What is wrong.
        error: PolicyError,
    },
    /// Two policies would write the same objects.
    #[error("{0} and {1} both protect {2}: one policy per workload")]
    Duplicate(String, String, String),
    /// YAML rendering failed.
    #[error("rendering YAML: {0}")]
    Render(String),
}

/// One policy of the set and the pods it protects.
#[derive(Debug)]
pub struct Input<'a> {
    /// Where it came from (a file name, a ConfigMap): comments and errors.
    pub source: String,
    /// The policy.
    pub policy: &'a Policy,
    /// Its pods.
    pub workload: Workload,
}

impl<'a> Input<'a> {
    /// The pods `policy` protects: its `workload:`, or the flags (which
    /// must agree with it when both are given).
    pub fn new(
        source: String,
        policy: &'a Policy,
        flags: Option<(&str, &str)>,
    ) -> Result<Input<'a>, NetpolError> {
        let from_flags = match flags {
            Some((ns, sel)) => {
                Some(
                    Workload::from_flags(ns, sel).map_err(|error| NetpolError::Workload {
                        source_name: source.clone(),
                        error,
                    })?,
                )
            }
            None => None,
        };
        let workload = match (policy.workload(), from_flags) {
            (Some(w), Some(f)) if w.namespace != f.namespace || w.selector != f.selector => {
                return Err(NetpolError::Conflict(source))
            }
            (Some(w), _) => w.clone(),
            (None, Some(f)) => f,
            (None, None) => return Err(NetpolError::NoWorkload(source)),
        };
        Ok(Input {
            source,
            policy,
            workload,
        })
    }
}

/// `stepmesh-<label values>`: the prefix of the NetworkPolicies protecting
/// `workload`, lower case, cut to 40 characters. Two workloads with the
/// same prefix in a namespace cannot both be compiled (the controller
/// refuses the second ConfigMap by it).
pub fn object_prefix(workload: &Workload) -> String {
    let values: Vec<&str> = workload.selector.values().map(String::as_str).collect();
    format!("stepmesh-{}", name_part(&values.join("-")))
}

/// Whether selected workloads' egress is denied by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum EgressMode {
    /// Deny all egress but what the policies and the mesh need.
    #[default]
    Deny,
    /// Leave egress open (no Egress policies): adopt in steps.
    Open,
}

/// Pods the mesh depends on, by namespace and labels.
#[derive(Debug, Clone)]
pub struct PodRef {
    /// Their namespace.
    pub namespace: String,
    /// Their labels.
    pub labels: BTreeMap<String, String>,
}

/// What the compiler needs beyond the policies.
#[derive(Debug, Clone)]
pub struct Options {
    /// Deny or leave open egress.
    pub egress: EgressMode,
    /// The API server's addresses (endpoint IPs), for workloads with
    /// `apiServer: true`; empty: any address on its ports.
    pub api_server: Vec<Cidr>,
    /// Where kubelet probes come from (node CIDRs); empty: any source.
    pub probe_sources: Vec<Cidr>,
    /// The cluster DNS pods.
    pub dns: PodRef,
    /// The stepmesh CA pods.
    pub ca: PodRef,
}

impl Default for Options {
    fn default() -> Options {
        let pods = |ns: &str, k: &str, v: &str| PodRef {
            namespace: ns.into(),
            labels: BTreeMap::from([(k.into(), v.into())]),
        };
        Options {
            egress: EgressMode::Deny,
            api_server: Vec::new(),
            probe_sources: Vec::new(),
            dns: pods("kube-system", "k8s-app", "kube-dns"),
            ca: pods("stepmesh-system", "app.kubernetes.io/name", "stepmesh-ca"),
        }
    }
}

/// One generated object with the comments explaining it; `value` is null
/// when there is nothing to apply (the comments say why).
#[derive(Debug, Clone)]
pub struct Object {
    /// Comment lines printed above it.
    pub notes: Vec<String>,
    /// The NetworkPolicy, or null.
    pub value: Value,
    /// Index of the [`Input`] it was made for.
    pub input: usize,
}

/// Where an allow pattern's peers are, in Kubernetes terms.
#[derive(Debug, PartialEq, Eq)]
enum Peers {
    /// Pods with this service account in this namespace.
    ServiceAccount { ns: String, sa: String },
    /// Every pod of a namespace.
    Namespace(String),
    /// Cannot be narrowed by labels.
    Anywhere(String),
}

fn peers(policy: &Policy, pattern: &SpiffeIdPattern) -> Peers {
    let text = pattern.to_string();
    let td = format!("spiffe://{}/", policy.trust_domain());
    let Some(path) = text.strip_prefix(&td) else {
        return Peers::Anywhere(format!("{text}: another trust domain"));
    };
    let segs: Vec<&str> = path.split('/').collect();
    // A segment that is no label value (a SPIFFE ID may hold one, `-x` or
    // 64 characters) would make the API server refuse the object, and with
    // it the controller's whole round: such a peer is not selectable.
    let label = super::workload::is_label_value;
    match segs.as_slice() {
        ["ns", ns, "sa", sa] if *sa != "*" && label(ns) && label(sa) => Peers::ServiceAccount {
            ns: (*ns).into(),
            sa: (*sa).into(),
        },
        ["ns", ns, "sa", "*"] | ["ns", ns, "*"] if *ns != "*" && label(ns) => {
            Peers::Namespace((*ns).into())
        }
        ["ns", ns, "sa", _] | ["ns", ns, "*"] if *ns != "*" => Peers::Anywhere(format!(
            "{text}: its namespace or service account is not a label value"
        )),
        _ => Peers::Anywhere(format!("{text}: not a /ns/<ns>/sa/<sa> identity")),
    }
}

fn peer_json(p: &Peers) -> Option<Value> {
    match p {
        Peers::ServiceAccount { ns, sa } => Some(json!({
            "namespaceSelector": {"matchLabels": {NS_LABEL: ns}},
            "podSelector": {"matchLabels": {SA_LABEL: sa}},
        })),
        Peers::Namespace(ns) => Some(json!({"namespaceSelector": {"matchLabels": {NS_LABEL: ns}}})),
        Peers::Anywhere(_) => None,
    }
}

/// A peer entry for pods of `ns` with `labels`.
fn pods_json(ns: &str, labels: &BTreeMap<String, String>) -> Value {
    json!({"namespaceSelector": {"matchLabels": {NS_LABEL: ns}},
           "podSelector": {"matchLabels": labels}})
}

fn ip_blocks(cidrs: &[Cidr]) -> Vec<Value> {
    cidrs
        .iter()
        .map(|c| json!({"ipBlock": {"cidr": c.to_string()}}))
        .collect()
}

/// A DNS-1123 name fragment from a label value.
fn name_part(s: &str) -> String {
    let mut out: String = s
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    out.truncate(40);
    out.trim_matches('-').to_owned()
}

/// Every NetworkPolicy of the set, in input order: what `policy netpol`
/// prints and what a controller applies.
pub fn compile(inputs: &[Input<'_>], opts: &Options) -> Result<Vec<Object>, NetpolError> {
    let mut seen: BTreeMap<(String, String), &str> = BTreeMap::new();
    for input in inputs {
        let key = (
            input.workload.namespace.clone(),
            object_prefix(&input.workload),
        );
        if let Some(first) = seen.insert(key.clone(), &input.source) {
            return Err(NetpolError::Duplicate(
                first.to_owned(),
                input.source.clone(),
                format!("{}/{}", key.0, key.1),
            ));
        }
    }
    let mut out = Vec::new();
    for (i, input) in inputs.iter().enumerate() {
        let start = out.len();
        workload_objects(input, inputs, opts, &mut out);
        for o in &mut out[start..] {
            o.input = i;
        }
    }
    Ok(out)
}

fn workload_objects(input: &Input<'_>, all: &[Input<'_>], opts: &Options, out: &mut Vec<Object>) {
    let policy = input.policy;
    let base = object_prefix(&input.workload);
    let pods = json!({"matchLabels": input.workload.selector});
    let deny_egress = opts.egress == EgressMode::Deny;
    let meta = |name: String| {
        json!({"name": name, "namespace": input.workload.namespace,
               "labels": {"app.kubernetes.io/managed-by": "stepmesh"},
               "annotations": {"stepmesh.io/policy-digest": policy.digest()}})
    };
    let netpol = |suffix: &str, types: &[&str], rules: Value| {
        let mut spec = json!({"podSelector": pods, "policyTypes": types});
        if let (Some(spec), Value::Object(rules)) = (spec.as_object_mut(), rules) {
            spec.extend(rules);
        }
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
               "metadata": meta(format!("{base}-{suffix}")), "spec": spec})
    };
    let (types, deny_note): (&[&str], _) = if deny_egress {
        (
            &["Ingress", "Egress"],
            "Default deny: only the allows below reach these pods or leave them.",
        )
    } else {
        (
            &["Ingress"],
            "Default deny of ingress (egress left open: --egress open).",
        )
    };
    let empty = if deny_egress {
        json!({"ingress": [], "egress": []})
    } else {
        json!({"ingress": []})
    };
    out.push(Object {
        input: 0,
        notes: vec![
            format!(
                "Workload {}/{} from {} (digest {}).",
                input.workload.namespace,
                base,
                input.source,
                policy.digest()
            ),
            deny_note.into(),
        ],
        value: netpol("default-deny", types, empty),
    });
    for port in policy.ports() {
        let mut notes = vec![format!(
            "Port {} ({:?}): from the identity rules.",
            port.port, port.protocol
        )];
        let mut from = Vec::new();
        let mut anywhere = false;
        for pattern in port.allow.iter().flat_map(|r| &r.from) {
            let p = peers(policy, pattern);
            match peer_json(&p) {
                Some(v) if !from.contains(&v) => from.push(v),
                Some(_) => {}
                None => {
                    if let Peers::Anywhere(why) = p {
                        notes.push(format!("Open to all sources: {why}."));
                    }
                    anywhere = true;
                }
            }
        }
        if from.is_empty() && !anywhere {
            notes.push("No identity may connect: nothing allowed beyond the default deny.".into());
            out.push(Object {
                input: 0,
                notes,
                value: Value::Null,
            });
            continue;
        }
        let mut ingress = json!({"ports": [{"protocol": "TCP", "port": port.port}]});
        if !anywhere {
            ingress["from"] = Value::Array(from);
        }
        out.push(Object {
            input: 0,
            notes,
            value: netpol(
                &format!("port-{}", port.port),
                &["Ingress"],
                json!({"ingress": [ingress]}),
            ),
        });
    }
    if policy.inbound_default() == InboundDefault::AllowAuthenticated {
        let listed: Vec<Value> = policy.ports().iter().map(|p| json!(p.port)).collect();
        out.push(Object {
            input: 0,
            notes: vec![
                "inbound.default allow-authenticated: other ports accept any pod of the cluster.".into(),
                format!("NetworkPolicy cannot say \"every port but {listed:?}\": this opens all ports to in-cluster pods; the sidecar still enforces the listed ports."),
            ],
            value: netpol("authenticated", &["Ingress"], json!({"ingress": [{"from": [{"namespaceSelector": {}}]}]})),
        });
    }
    out.push(mesh(input, opts, &netpol));
    if deny_egress {
        out.push(egress::calls(input, all, &netpol));
        out.push(egress::outbound(policy, &netpol));
    }
}

/// What the mesh needs whatever the policy says: kubelet probes and
/// metrics to the sidecar admin port; with egress denied, DNS, the CA and
/// (when the workload says so) the API server.
fn mesh(
    input: &Input<'_>,
    opts: &Options,
    netpol: &impl Fn(&str, &[&str], Value) -> Value,
) -> Object {
    let mut notes = vec![format!(
        "The mesh: kubelet probes and metrics to the sidecar admin port {ADMIN_PORT}."
    )];
    let mut probe = json!({"ports": [{"protocol": "TCP", "port": ADMIN_PORT}]});
    if opts.probe_sources.is_empty() {
        notes.push("Probes come from the node, whose address no selector names: open to all sources (narrow with --probe-cidr).".into());
    } else {
        probe["from"] = Value::Array(ip_blocks(&opts.probe_sources));
    }
    if opts.egress == EgressMode::Open {
        return Object {
            input: 0,
            notes,
            value: netpol("mesh", &["Ingress"], json!({"ingress": [probe]})),
        };
    }
    let show = |p: &PodRef| {
        let labels: Vec<String> = p.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("{}/{}", p.namespace, labels.join(","))
    };
    notes.push(format!(
        "DNS ({}, 53 UDP and TCP) and the CA ({}, {CA_PORT}).",
        show(&opts.dns),
        show(&opts.ca)
    ));
    let mut egress = vec![
        json!({"to": [pods_json(&opts.dns.namespace, &opts.dns.labels)],
               "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}),
        json!({"to": [pods_json(&opts.ca.namespace, &opts.ca.labels)],
               "ports": [{"protocol": "TCP", "port": CA_PORT}]}),
    ];
    if input.workload.api_server {
        let mut rule =
            json!({"ports": [{"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 6443}]});
        if opts.api_server.is_empty() {
            notes.push("apiServer: true: the API server on 443 and 6443 at any address (narrow with --api-server).".into());
        } else {
            notes.push("apiServer: true: the API server on 443 and 6443.".into());
            rule["to"] = Value::Array(ip_blocks(&opts.api_server));
        }
        egress.push(rule);
    }
    Object {
        input: 0,
        notes,
        value: netpol(
            "mesh",
            &["Ingress", "Egress"],
            json!({"ingress": [probe], "egress": egress}),
        ),
    }
}

/// The objects as multi-document YAML with their comments.
pub fn to_yaml(objects: &[Object]) -> Result<String, NetpolError> {
    let mut out = String::new();
    for o in objects {
        if !o.value.is_null() {
            out.push_str("---\n");
        }
        for n in &o.notes {
            out.push_str(&format!("# {n}\n"));
        }
        if !o.value.is_null() {
            out.push_str(
                &serde_norway::to_string(&o.value)
                    .map_err(|e| NetpolError::Render(e.to_string()))?,
            );
        }
    }
    Ok(out)
}

/// The NetworkPolicies of one policy for pods matching `selector` in
/// `namespace` (default options), as a multi-document YAML string.
pub fn render(policy: &Policy, namespace: &str, selector: &str) -> Result<String, NetpolError> {
    let input = Input::new("policy".into(), policy, Some((namespace, selector)))?;
    to_yaml(&compile(&[input], &Options::default())?)
}

#[cfg(test)]
#[path = "netpol_tests.rs"]
mod tests;
