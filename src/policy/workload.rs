//! `workload:`: which pods a policy protects. The sidecar never needs it
//! (it protects the pod it runs in); the NetworkPolicy compiler does, to
//! compile many policies together: the namespace and pod labels become
//! selectors, and the service account is the workload's identity when it
//! calls others (`spiffe://<td>/ns/<namespace>/sa/<serviceAccount>`).

use std::collections::BTreeMap;

use super::compile::invalid;
use super::model::RawWorkload;
use super::PolicyError;

/// The pod label naming a pod's service account (the injector sets it).
pub const SA_LABEL: &str = "stepmesh.io/service-account";

/// The pods a policy protects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// Their namespace.
    pub namespace: String,
    /// Their service account, when known: their identity as callers.
    pub service_account: Option<String>,
    /// Pod labels selecting them (`matchLabels`); by default the
    /// service-account label.
    pub selector: BTreeMap<String, String>,
    /// They call the Kubernetes API server (egress to it is allowed).
    pub api_server: bool,
}

impl Workload {
    /// A workload from `--namespace NS --selector k=v`: its service account
    /// is known when the selector is the service-account label.
    pub fn from_flags(namespace: &str, selector: &str) -> Result<Workload, PolicyError> {
        let (key, value) = selector
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| invalid("--selector", format!("{selector:?}: expected key=value")))?;
        let raw = RawWorkload {
            namespace: namespace.to_owned(),
            service_account: (key == SA_LABEL).then(|| value.to_owned()),
            selector: Some(BTreeMap::from([(key.to_owned(), value.to_owned())])),
            api_server: false,
        };
        compile(raw).map_err(|e| match e {
            PolicyError::Invalid { path, message } => invalid(
                path.replace("workload.namespace", "--namespace")
                    .replace("workload.selector", "--selector"),
                message,
            ),
            other => other,
        })
    }
}

/// Checks `workload:`: names Kubernetes accepts, and a selector that picks
/// some pods rather than the whole namespace.
pub(super) fn compile(raw: RawWorkload) -> Result<Workload, PolicyError> {
    if !is_dns_label(&raw.namespace) {
        return Err(invalid(
            "workload.namespace",
            format!("{:?} is not a Kubernetes namespace name", raw.namespace),
        ));
    }
    if let Some(sa) = &raw.service_account {
        if !is_dns_subdomain(sa) {
            return Err(invalid(
                "workload.serviceAccount",
                format!("{sa:?} is not a service account name"),
            ));
        }
    }
    let selector = match (raw.selector, &raw.service_account) {
        (Some(s), _) => s,
        (None, Some(sa)) => BTreeMap::from([(SA_LABEL.to_owned(), sa.clone())]),
        (None, None) => {
            return Err(invalid(
                "workload",
                "give serviceAccount, selector or both: which pods does the policy protect?",
            ))
        }
    };
    // An empty selector picks every pod of the namespace: fail closed on
    // what is surely a mistake rather than isolate the whole namespace.
    if selector.is_empty() {
        return Err(invalid(
            "workload.selector",
            "empty: it would select every pod of the namespace",
        ));
    }
    for (k, v) in &selector {
        if !is_label_key(k) {
            return Err(invalid(
                format!("workload.selector.{k}"),
                "not a label key (prefix/name, name up to 63 of [A-Za-z0-9-_.])",
            ));
        }
        if !is_label_value(v) {
            return Err(invalid(
                format!("workload.selector.{k}"),
                format!("{v:?} is not a label value"),
            ));
        }
    }
    Ok(Workload {
        namespace: raw.namespace,
        service_account: raw.service_account,
        selector,
        api_server: raw.api_server,
    })
}

/// RFC 1123 label: what a namespace name must be.
pub(crate) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

pub(super) fn is_label_value(v: &str) -> bool {
    v.len() <= 63
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && (v.is_empty()
            || (v.as_bytes()[0].is_ascii_alphanumeric()
                && v.as_bytes()[v.len() - 1].is_ascii_alphanumeric()))
}

fn is_label_key(k: &str) -> bool {
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    prefix.is_none_or(is_dns_subdomain) && !name.is_empty() && is_label_value(name)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::super::Policy;
    use super::*;

    fn load(workload: &str) -> Result<Policy, PolicyError> {
        Policy::from_yaml(&format!(
            "trustDomain: cluster.local\nworkload: {workload}\n"
        ))
    }

    #[test]
    fn service_account_is_the_default_selector() {
        let p = load("{namespace: pay, serviceAccount: api}").unwrap();
        let w = p.workload().unwrap();
        assert_eq!(w.selector[SA_LABEL], "api");
        assert!(!w.api_server);
        let p = load("{namespace: pay, selector: {app: api}, apiServer: true}").unwrap();
        let w = p.workload().unwrap();
        assert_eq!(w.service_account, None);
        assert!(w.api_server);
    }

    #[test]
    fn bad_workloads_name_the_field() {
        for (w, field) in [
            (
                "{namespace: Pay, serviceAccount: api}",
                "workload.namespace",
            ),
            ("{namespace: pay}", "workload:"),
            ("{namespace: pay, selector: {}}", "workload.selector"),
            (
                "{namespace: pay, serviceAccount: a_b}",
                "workload.serviceAccount",
            ),
            (
                "{namespace: pay, selector: {'a b': x}}",
                "workload.selector.a b",
            ),
            (
                "{namespace: pay, selector: {app: '-x'}}",
                "workload.selector.app",
            ),
        ] {
            let e = load(w).unwrap_err().to_string();
            assert!(e.starts_with(field), "{w}: {e}");
        }
        assert!(load("{namespace: pay, serviceAccount: a, extra: 1}")
            .unwrap_err()
            .to_string()
            .contains("extra"));
        let e = Workload::from_flags("pay", "nolabel")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--selector"), "{e}");
        let e = Workload::from_flags("Pay", "a=b").unwrap_err().to_string();
        assert!(e.starts_with("--namespace"), "{e}");
        let w = Workload::from_flags("pay", &format!("{SA_LABEL}=api")).unwrap();
        assert_eq!(w.service_account.as_deref(), Some("api"));
    }
}
