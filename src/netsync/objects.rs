//! Comparing the NetworkPolicies in the cluster with the computed ones, and
//! what a round may change while it is blocked in part: a policy ConfigMap
//! broken with no valid version known to this process (first seen broken)
//! contributes what nobody here can know, so its own objects stay as they
//! are, and the egress other workloads derive from the set keeps the rules
//! it has towards the broken ConfigMap's namespace (its callees may be
//! there). The rest of the cluster is kept as usual. Before, such a ConfigMap, which
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
pub(super) fn source_of(live: &Value) -> (String, String) {
    let m = &live["metadata"];
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    (text(&m["namespace"]), text(&m["labels"][SOURCE_LABEL]))
}

/// `(namespace, source label)` of the objects compiled from `s`.
pub(super) fn source_key(s: &Source) -> (String, String) {
    (s.namespace.clone(), s.label_value().into_owned())
}

/// What a blocked round leaves alone.
#[derive(Debug)]
pub(super) struct Blocked {
    /// The blocking ConfigMaps, as their objects name them.
    frozen: BTreeSet<(String, String)>,
    /// Their namespaces: egress rules towards them are kept.
    namespaces: BTreeSet<String>,
    /// The ConfigMaps compiled this round, as their objects name them.
    compiled: BTreeSet<(String, String)>,
}

/// Whether an egress rule reaches pods of one of `namespaces` (the shape
/// `policy::netpol` writes: a namespace selector by name).
fn towards(rule: &Value, namespaces: &BTreeSet<String>) -> bool {
    rule["to"].as_array().is_some_and(|peers| {
        peers.iter().any(|p| {
            p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                .as_str()
                .is_some_and(|ns| namespaces.contains(ns))
        })
    })
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
            namespaces: frozen.iter().map(|(ns, _)| ns.clone()).collect(),
            frozen,
            compiled: compiled.map(source_key).collect(),
        })
    }

    /// Whether `live` stays as it is this round: an object of a blocking
    /// ConfigMap, or (`computed` false: not computed now) the egress to
    /// callees of a ConfigMap still compiled that reaches a blocking
    /// ConfigMap's namespace (it may be gone only because its callee is
    /// the blocking one). An object whose ConfigMap is gone is pruned as
    /// usual.
    pub fn keeps(&self, live: &Value, computed: bool) -> bool {
        let source = source_of(live);
        let name = live["metadata"]["name"].as_str().unwrap_or_default();
        let reaches_frozen = || {
            live["spec"]["egress"]
                .as_array()
                .is_some_and(|rules| rules.iter().any(|r| towards(r, &self.namespaces)))
        };
        self.frozen.contains(&source)
            || (!computed
                && is_egress_calls(name)
                && self.compiled.contains(&source)
                && reaches_frozen())
    }

    /// What to write over `live` for `want`, an egress to callees: `want`'s
    /// rules, and `live`'s rules towards a blocking ConfigMap's namespace
    /// (a callee there may be the blocking one); None when that is what
    /// `live` says already. The round after the block ends writes `want`.
    pub fn grown(&self, live: &Value, want: &Value) -> Option<Value> {
        let rules = |v: &Value| v["spec"]["egress"].as_array().cloned().unwrap_or_default();
        let live_rules = rules(live);
        let mut target = rules(want);
        let wanted: Vec<Value> = target.iter().map(prune_empty).collect();
        target.extend(
            live_rules
                .iter()
                .filter(|r| towards(r, &self.namespaces) && !wanted.contains(&prune_empty(r)))
                .cloned(),
        );
        let pruned = |rules: &[Value]| -> Vec<Value> { rules.iter().map(prune_empty).collect() };
        let (now, then) = (pruned(&live_rules), pruned(&target));
        if now.len() == then.len() && then.iter().all(|r| now.contains(r)) {
            return None;
        }
        let mut grown = want.clone();
        grown["spec"]["egress"] = Value::Array(target);
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

    /// Egress rules to namespace `a` (the blocking one's) on `ports`, and
    /// one to namespace `c` on 9.
    fn object(ns: &str, name: &str, source: &str, ports: &[u16]) -> Value {
        let to = |ns: &str| json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}]);
        let mut egress: Vec<Value> = ports
            .iter()
            .map(|p| json!({"to": to("a"), "ports": [{"protocol": "TCP", "port": p}]}))
            .collect();
        egress.push(json!({"to": to("c"), "ports": [{"protocol": "TCP", "port": 9}]}));
        json!({"metadata": {"namespace": ns, "name": name, "labels": {SOURCE_LABEL: source}},
               "spec": {"egress": egress}})
    }

    #[test]
    fn a_blocked_round_keeps_the_blocking_objects_and_egress_towards_them() {
        let (broken, caller) = (source("a", "broken"), source("b", "web"));
        assert!(Blocked::new([].into_iter(), [&caller].into_iter()).is_none());
        let b = Blocked::new([&broken].into_iter(), [&caller].into_iter()).unwrap();

        assert!(b.keeps(&object("a", "stepmesh-x-port-80", "broken", &[]), false));
        assert!(b.keeps(&object("a", "stepmesh-x-port-80", "broken", &[]), true));
        assert!(!b.keeps(&object("b", "stepmesh-web-port-80", "web", &[]), false));
        // Its callee in `a` may be the broken one: kept, unless its own
        // ConfigMap is gone.
        assert!(b.keeps(
            &object("b", "stepmesh-web-egress-calls", "web", &[80]),
            false
        ));
        assert!(!b.keeps(
            &object("b", "stepmesh-old-egress-calls", "old", &[80]),
            false
        ));
        assert!(!b.keeps(
            &object("b", "stepmesh-web-egress-calls", "web", &[80]),
            true
        ));
        // The same name in another namespace is another ConfigMap.
        assert!(!b.keeps(&object("b", "stepmesh-x-port-80", "broken", &[]), false));

        let live = object("b", "stepmesh-web-egress-calls", "web", &[80, 81]);
        let ports = |o: &Value| -> Vec<Value> {
            let rules = o["spec"]["egress"].as_array().unwrap();
            rules
                .iter()
                .map(|r| r["ports"][0]["port"].clone())
                .collect()
        };
        // Rules towards `a` (the blocking ConfigMap's) stay; the rest is
        // as computed: the rule towards `c` goes once no longer computed.
        let mut want = object("b", "n", "web", &[81, 82]);
        want["spec"]["egress"].as_array_mut().unwrap().pop();
        let grown = b.grown(&live, &want).unwrap();
        assert_eq!(ports(&grown), [json!(81), json!(82), json!(80)]);
        assert_eq!(
            grown["metadata"]["name"], "n",
            "the computed object's metadata"
        );
        assert_eq!(b.grown(&grown, &want), None, "written once, then left");
        assert_eq!(b.grown(&live, &object("b", "n", "web", &[80, 81])), None);
        // Not computed now: kept only while it reaches `a`.
        let mut elsewhere = live.clone();
        elsewhere["spec"]["egress"]
            .as_array_mut()
            .unwrap()
            .drain(..2);
        assert!(!b.keeps(&elsewhere, false));
    }

    #[test]
    fn egress_calls_is_known_by_its_suffix() {
        assert!(is_egress_calls("stepmesh-web-egress-calls"));
        assert!(!is_egress_calls("egress-calls"));
        assert!(!is_egress_calls("stepmesh-web-egress-outbound"));
        assert!(!is_egress_calls("stepmesh-webegress-calls-x"));
    }
}
