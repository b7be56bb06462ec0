//! The policies a sync round compiles: the policy ConfigMaps of the active
//! namespaces, each validated, or, while one is broken, the last version of
//! it that validated in this process. A broken ConfigMap with no such
//! version (first seen broken: after a restart, say) blocks the round in
//! part, because any set computed without it would miss its contribution
//! (its own objects, its callers' egress): see `objects::Blocked`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde_json::Value;

use crate::policy::{netpol, Policy};

/// A policy ConfigMap's identity and version.
#[derive(Debug, Clone)]
pub struct Source {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its uid (for the Event's `involvedObject`).
    pub uid: String,
    /// Its resourceVersion.
    pub version: String,
}

impl Source {
    /// Its name as a label value (`SOURCE_LABEL` on each object compiled
    /// from it): the name, or for a name past a label value's 63
    /// characters (a ConfigMap's may have 253) its first 46, less any
    /// trailing `-` or `.`, and 16 hex digits of its SHA-256. Else every
    /// object of such a ConfigMap was refused by the API server.
    pub fn label_value(&self) -> std::borrow::Cow<'_, str> {
        if self.name.len() <= 63 {
            return std::borrow::Cow::Borrowed(&self.name);
        }
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, self.name.as_bytes());
        let hex: String = digest.as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        // A ConfigMap's name is lower-case ASCII (a DNS subdomain); were it
        // not, the cut falls back to the whole name's digest alone.
        let head = self
            .name
            .get(..46)
            .unwrap_or_default()
            .trim_end_matches(['-', '.']);
        match head {
            "" => std::borrow::Cow::Owned(hex),
            head => std::borrow::Cow::Owned(format!("{head}-{hex}")),
        }
    }

    /// The ConfigMap (or its metadata) `cm`'s identity and version.
    pub(super) fn of(cm: &Value) -> Source {
        let meta = &cm["metadata"];
        let text = |k: &str| meta[k].as_str().unwrap_or_default().to_owned();
        Source {
            namespace: text("namespace"),
            name: text("name"),
            uid: text("uid"),
            version: text("resourceVersion"),
        }
    }

    /// `(namespace, name)`: the ConfigMap, whatever its version.
    pub fn key(&self) -> (String, String) {
        (self.namespace.clone(), self.name.clone())
    }
}

/// A ConfigMap refused this round, and what is compiled in its place.
#[derive(Debug)]
pub struct Refused {
    /// The ConfigMap.
    pub source: Source,
    /// The field and what is wrong with it.
    pub why: String,
    /// Whether its last valid version stands in for it (else the round is
    /// blocked in part).
    pub last_good: bool,
}

/// What a round compiles, or why it must not.
#[derive(Debug, Default)]
pub struct Collected {
    /// The policies to compile, each with its ConfigMap: valid now, or the
    /// last valid version of a broken one.
    pub policies: Vec<(Source, Arc<Policy>)>,
    /// The ConfigMaps refused this round, to report.
    pub refused: Vec<Refused>,
}

impl Collected {
    /// The refused ConfigMaps that have no last valid version: while any
    /// remains, their objects stay and egress towards their namespaces is kept.
    pub fn blocking(&self) -> impl Iterator<Item = &Refused> {
        self.refused.iter().filter(|r| !r.last_good)
    }
}

/// Per ConfigMap, the last policy that validated in this process.
#[derive(Debug, Default)]
pub struct LastGood(BTreeMap<(String, String), Arc<Policy>>);

impl LastGood {
    /// Validates every ConfigMap of `cms` (`key` holds the policy) in an
    /// `active` namespace, remembers the valid ones and forgets the
    /// ConfigMaps that are gone.
    pub fn collect(&mut self, cms: &[Value], active: &BTreeSet<String>, key: &str) -> Collected {
        let mut out = Collected::default();
        let mut seen = BTreeSet::new();
        for cm in cms {
            let src = Source::of(cm);
            if !active.contains(&src.namespace) {
                continue;
            }
            seen.insert(src.key());
            let checked =
                check(cm, key, &src).and_then(|p| unclaimed(&p, &out.policies).map(|()| p));
            match checked {
                Ok(p) => {
                    let p = Arc::new(p);
                    self.0.insert(src.key(), Arc::clone(&p));
                    out.policies.push((src, p));
                }
                Err(why) => {
                    // The last valid version, unless it too clashes with
                    // a policy accepted since.
                    let fallback = self
                        .0
                        .get(&src.key())
                        .filter(|p| unclaimed(p, &out.policies).is_ok())
                        .cloned();
                    let last_good = fallback.is_some();
                    if let Some(p) = fallback {
                        out.policies.push((src.clone(), p));
                    }
                    out.refused.push(Refused {
                        source: src,
                        why,
                        last_good,
                    });
                }
            }
        }
        self.0.retain(|k, _| seen.contains(k));
        out
    }
}

/// Set (to why) on a ConfigMap that could not be read (see `read.rs`).
pub const UNREADABLE: &str = "stepmesh.io/unreadable";

/// The ConfigMap's policy, if it is valid on its own.
fn check(cm: &Value, key: &str, src: &Source) -> Result<Policy, String> {
    if let Some(why) = cm[UNREADABLE].as_str() {
        return Err(why.to_owned());
    }
    let text = cm["data"][key]
        .as_str()
        .ok_or_else(|| format!("data.{key}: missing"))?;
    let policy = Policy::from_yaml(text).map_err(|e| e.to_string())?;
    let w = policy
        .workload()
        .ok_or("workload: missing: name the pods this policy protects")?;
    // A policy may only write NetworkPolicies in its own namespace.
    if w.namespace != src.namespace {
        return Err(format!(
            "workload.namespace: {:?} is not the ConfigMap's namespace {:?}",
            w.namespace, src.namespace
        ));
    }
    Ok(policy)
}

/// Ok unless a policy already taken would write NetworkPolicies of the
/// same names (the same pods, or label values that read the same once
/// lower-cased and cut): compiled together, the pair would fail the
/// whole round, every namespace's.
fn unclaimed(policy: &Policy, taken: &[(Source, Arc<Policy>)]) -> Result<(), String> {
    let Some(w) = policy.workload() else {
        return Ok(());
    };
    let prefix = netpol::object_prefix(w);
    match taken.iter().find(|(_, p)| {
        p.workload()
            .is_some_and(|o| o.namespace == w.namespace && netpol::object_prefix(o) == prefix)
    }) {
        Some((other, _)) => Err(format!(
            "workload: its NetworkPolicies would be named as ConfigMap {}'s ({prefix}-*)",
            other.name
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
#[path = "sources_tests.rs"]
mod tests;
