//! `stepmesh policy netpol`: the L3/L4 layer beneath the identity layer.
//! A default-deny ingress NetworkPolicy for the selected pods, plus one
//! policy per inbound port allowing the namespaces and service accounts its
//! identity rules name. Label convention: pods carry
//! `stepmesh.io/service-account: <sa>` (namespaces are matched by the
//! built-in `kubernetes.io/metadata.name` label). Rules that cannot be
//! expressed by labels (another trust domain, non-Kubernetes paths,
//! a whole trust domain) open the port to every source, because the
//! identity layer above still decides; the output says so in a comment.

use serde_json::{json, Value};

use super::{InboundDefault, Policy, SpiffeIdPattern};

/// The pod label naming a pod's service account.
pub const SA_LABEL: &str = "stepmesh.io/service-account";
const NS_LABEL: &str = "kubernetes.io/metadata.name";

/// Why NetworkPolicies could not be generated.
#[derive(Debug, thiserror::Error)]
pub enum NetpolError {
    /// `--selector` is not `key=value`.
    #[error("--selector {0:?}: expected key=value")]
    Selector(String),
    /// `--namespace` is not a DNS label.
    #[error("--namespace {0:?}: not a Kubernetes namespace name")]
    Namespace(String),
    /// YAML rendering failed.
    #[error("rendering YAML: {0}")]
    Render(String),
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
    match segs.as_slice() {
        ["ns", ns, "sa", sa] if *sa != "*" => Peers::ServiceAccount {
            ns: (*ns).into(),
            sa: (*sa).into(),
        },
        ["ns", ns, "sa", "*"] | ["ns", ns, "*"] if *ns != "*" => Peers::Namespace((*ns).into()),
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

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
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

/// The NetworkPolicies of `policy` for pods matching `selector` in `namespace`,
/// as a multi-document YAML string.
pub fn render(policy: &Policy, namespace: &str, selector: &str) -> Result<String, NetpolError> {
    if !is_dns_label(namespace) {
        return Err(NetpolError::Namespace(namespace.into()));
    }
    let (key, value) = selector
        .split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| NetpolError::Selector(selector.into()))?;
    let base = format!("stepmesh-{}", name_part(value));
    let pods = json!({"matchLabels": {key: value}});
    let meta = |name: String| {
        json!({"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/managed-by": "stepmesh"},
               "annotations": {"stepmesh.io/policy-digest": policy.digest()}})
    };
    let mut docs: Vec<(Vec<String>, Value)> = vec![(
        vec!["Default deny: only the allows below reach these pods.".into()],
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": meta(format!("{base}-default-deny")),
            "spec": {"podSelector": pods, "policyTypes": ["Ingress"], "ingress": []},
        }),
    )];
    for port in policy.ports() {
        let mut notes = vec![format!(
            "Port {} ({:?}): from the identity rules.",
            port.port, port.protocol
        )];
        let mut from = Vec::new();
        let mut anywhere = false;
        for rule in &port.allow {
            for pattern in &rule.from {
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
        }
        if from.is_empty() && !anywhere {
            notes.push("No identity may connect: nothing allowed beyond the default deny.".into());
            docs.push((notes, Value::Null));
            continue;
        }
        let mut ingress = json!({"ports": [{"protocol": "TCP", "port": port.port}]});
        if !anywhere {
            ingress["from"] = Value::Array(from);
        }
        docs.push((
            notes,
            json!({
                "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": meta(format!("{base}-port-{}", port.port)),
                "spec": {"podSelector": pods, "policyTypes": ["Ingress"], "ingress": [ingress]},
            }),
        ));
    }
    if policy.inbound_default() == InboundDefault::AllowAuthenticated {
        let listed: Vec<Value> = policy.ports().iter().map(|p| json!(p.port)).collect();
        docs.push((
            vec![
                "inbound.default allow-authenticated: other ports accept any pod of the cluster.".into(),
                format!("NetworkPolicy cannot say \"every port but {listed:?}\": this opens all ports to in-cluster pods; the sidecar still enforces the listed ports."),
            ],
            json!({
                "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": meta(format!("{base}-authenticated")),
                "spec": {"podSelector": pods, "policyTypes": ["Ingress"],
                         "ingress": [{"from": [{"namespaceSelector": {}}]}]},
            }),
        ));
    }
    let mut out = String::new();
    for (notes, doc) in docs {
        if doc.is_null() {
            for n in notes {
                out.push_str(&format!("# {n}\n"));
            }
            continue;
        }
        out.push_str("---\n");
        for n in notes {
            out.push_str(&format!("# {n}\n"));
        }
        out.push_str(
            &serde_norway::to_string(&doc).map_err(|e| NetpolError::Render(e.to_string()))?,
        );
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    const P: &str = r#"
trustDomain: cluster.local
inbound:
  default: deny
  ports:
    - port: 8080
      protocol: http
      allow:
        - from: [spiffe://cluster.local/ns/web/sa/frontend, spiffe://cluster.local/ns/ops/*]
    - port: 5432
      allow:
        - from: [spiffe://other.td/ns/a/sa/b]
    - port: 9000
      allow: []
"#;

    fn docs(yaml: &str) -> Vec<serde_norway::Value> {
        yaml.split("---\n")
            .filter(|d| d.contains("kind"))
            .map(|d| serde_norway::from_str(d).unwrap())
            .collect()
    }

    #[test]
    fn identities_become_label_selectors() {
        let p = Policy::from_yaml(P).unwrap();
        let out = render(&p, "payments", "app=api").unwrap();
        let d = docs(&out);
        assert_eq!(d.len(), 3, "{out}");
        assert_eq!(d[0]["metadata"]["name"], "stepmesh-api-default-deny");
        assert_eq!(d[0]["spec"]["ingress"].as_sequence().unwrap().len(), 0);
        assert_eq!(d[0]["spec"]["podSelector"]["matchLabels"]["app"], "api");
        let from = &d[1]["spec"]["ingress"][0]["from"];
        assert_eq!(from[0]["namespaceSelector"]["matchLabels"][NS_LABEL], "web");
        assert_eq!(from[0]["podSelector"]["matchLabels"][SA_LABEL], "frontend");
        assert_eq!(from[1]["namespaceSelector"]["matchLabels"][NS_LABEL], "ops");
        assert!(from[1].get("podSelector").is_none());
        assert_eq!(d[1]["spec"]["ingress"][0]["ports"][0]["port"], 8080);
        // Another trust domain: open port, explained.
        assert!(d[2]["spec"]["ingress"][0].get("from").is_none());
        assert!(out
            .contains("# Open to all sources: spiffe://other.td/ns/a/sa/b: another trust domain."));
        assert!(
            out.contains("No identity may connect"),
            "port 9000 gets no allow"
        );
    }

    #[test]
    fn bad_arguments() {
        let p = Policy::from_yaml(P).unwrap();
        assert!(render(&p, "Payments", "app=api").is_err());
        assert!(render(&p, "payments", "app").is_err());
        assert!(render(&p, "payments", "=x").is_err());
    }
}
