//! Comparing the NetworkPolicies in the cluster with the computed ones, and
//! what a round may change while it is blocked in part: a policy ConfigMap
//! broken with no valid version known to this process (first seen broken)
//! contributes what nobody here can know, so its own objects stay as they
//! are and the egress other workloads derive from the set only grows. The
//! rest of the cluster is kept as usual. Before, such a ConfigMap, which
//! anyone who may create a labelled ConfigMap can make, stopped every
//! namespace's round.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use super::sources::Source;
use super::SOURCE_LABEL;
use crate::policy::netpol::EGRESS_CALLS;

/// Whether the live object already says what we want: the same spec
/// (empty lists and maps dropped, as the API server drops them) and our
/// labels and digest.
pub(super) fn same(live: &Value, want: &Value) -> bool {
    let labels_ok = want["metadata"]["labels"]
        .as_object()
        .is_some_and(|w| w.iter().all(|(k, v)| live["metadata"]["labels"][k] == *v));
    labels_ok
        && live["metadata"]["annotations"]["stepmesh.io/policy-digest"]
            == want["metadata"]["annotations"]["stepmesh.io/policy-digest"]
        && prune_empty(&live["spec"]) == prune_empty(&want["spec"])
}

fn prune_empty(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| (k.clone(), prune_empty(v)))
                .filter(|(_, v)| !matches!(v, Value::Null) && v != &json!([]) && v != &json!({}))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(prune_empty).collect()),
        other => other.clone(),
    }
}

/// Whether `name` is a workload's egress to its callees, the one object
/// computed from other policies than its own.
pub(super) fn is_egress_calls(name: &str) -> bool {
    name.strip_suffix(EGRESS_CALLS)
        .is_some_and(|head| head.ends_with('-'))
}

/// `(namespace, source label)` of an object in the cluster.
fn source_of(live: &Value) -> (String, String) {
    let m = &live["metadata"];
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    (text(&m["namespace"]), text(&m["labels"][SOURCE_LABEL]))
}

fn source_key(s: &Source) -> (String, String) {
    (s.namespace.clone(), s.label_value().into_owned())
}

/// What a blocked round leaves alone.
#[derive(Debug)]
pub(super) struct Blocked {
    /// The blocking ConfigMaps, as their objects name them.
    frozen: BTreeSet<(String, String)>,
    /// The ConfigMaps compiled this round, as their objects name them.
    compiled: BTreeSet<(String, String)>,
}

impl Blocked {
    /// The scope of a round with `blocking` ConfigMaps, `compiled` the
    /// others; None when nothing blocks.
    pub fn new<'a>(
        blocking: impl Iterator<Item = &'a Source>,
        compiled: impl Iterator<Item = &'a Source>,
    ) -> Option<Blocked> {
        let frozen: BTreeSet<_> = blocking.map(source_key).collect();
        (!frozen.is_empty()).then(|| Blocked {
            frozen,
            compiled: compiled.map(source_key).collect(),
        })
    }

    /// Whether `live` stays as it is this round: an object of a blocking
    /// ConfigMap, or (`computed` false: not computed now) the egress to
    /// callees of a ConfigMap still compiled, which may be gone only
    /// because its callee is the blocking one. An object whose ConfigMap
    /// is gone is pruned as usual.
    pub fn keeps(&self, live: &Value, computed: bool) -> bool {
        let source = source_of(live);
        let name = live["metadata"]["name"].as_str().unwrap_or_default();
        self.frozen.contains(&source)
            || (!computed && is_egress_calls(name) && self.compiled.contains(&source))
    }

    /// What to write over `live` for `want`, an egress to callees: its
    /// rules only grow (a blocking ConfigMap may be the callee a rule is
    /// for); None when `live` holds every rule of `want` already, else
    /// `want` with `live`'s rules first. The round after the block ends
    /// replaces it with what is computed.
    pub fn grown(&self, live: &Value, want: &Value) -> Option<Value> {
        let rules = |v: &Value| v["spec"]["egress"].as_array().cloned().unwrap_or_default();
        let mut union = rules(live);
        let held: Vec<Value> = union.iter().map(prune_empty).collect();
        let new: Vec<Value> = rules(want)
            .into_iter()
            .filter(|r| !held.contains(&prune_empty(r)))
            .collect();
        if new.is_empty() {
            return None;
        }
        union.extend(new);
        let mut grown = want.clone();
        grown["spec"]["egress"] = Value::Array(union);
        Some(grown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(ns: &str, name: &str) -> Source {
        Source {
            namespace: ns.into(),
            name: name.into(),
            uid: String::new(),
            version: "1".into(),
        }
    }

    fn object(ns: &str, name: &str, source: &str, ports: &[u16]) -> Value {
        let egress: Vec<Value> = ports
            .iter()
            .map(
                |p| json!({"to": [{"podSelector": {}}], "ports": [{"protocol": "TCP", "port": p}]}),
            )
            .collect();
        json!({"metadata": {"namespace": ns, "name": name, "labels": {SOURCE_LABEL: source}},
               "spec": {"egress": egress}})
    }

    #[test]
    fn a_blocked_round_keeps_the_blocking_objects_and_grows_egress_to_callees() {
        let (broken, caller) = (source("a", "broken"), source("b", "web"));
        assert!(Blocked::new([].into_iter(), [&caller].into_iter()).is_none());
        let b = Blocked::new([&broken].into_iter(), [&caller].into_iter()).unwrap();

        assert!(b.keeps(&object("a", "stepmesh-x-port-80", "broken", &[]), false));
        assert!(b.keeps(&object("a", "stepmesh-x-port-80", "broken", &[]), true));
        assert!(!b.keeps(&object("b", "stepmesh-web-port-80", "web", &[]), false));
        // Its callee may be the broken one: kept, unless its own
        // ConfigMap is gone.
        assert!(b.keeps(&object("b", "stepmesh-web-egress-calls", "web", &[]), false));
        assert!(!b.keeps(&object("b", "stepmesh-old-egress-calls", "old", &[]), false));
        assert!(!b.keeps(&object("b", "stepmesh-web-egress-calls", "web", &[]), true));
        // The same name in another namespace is another ConfigMap.
        assert!(!b.keeps(&object("b", "stepmesh-x-port-80", "broken", &[]), false));

        let live = object("b", "stepmesh-web-egress-calls", "web", &[80, 81]);
        assert_eq!(b.grown(&live, &object("b", "n", "web", &[81])), None);
        let grown = b.grown(&live, &object("b", "n", "web", &[81, 82])).unwrap();
        let ports: Vec<&Value> = grown["spec"]["egress"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| &r["ports"][0]["port"])
            .collect();
        assert_eq!(ports, [&json!(80), &json!(81), &json!(82)]);
        assert_eq!(
            grown["metadata"]["name"], "n",
            "the computed object's metadata"
        );
    }

    #[test]
    fn egress_calls_is_known_by_its_suffix() {
        assert!(is_egress_calls("stepmesh-web-egress-calls"));
        assert!(!is_egress_calls("egress-calls"));
        assert!(!is_egress_calls("stepmesh-web-egress-outbound"));
        assert!(!is_egress_calls("stepmesh-webegress-calls-x"));
    }
}
