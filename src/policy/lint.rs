//! `stepmesh policy lint`: risky configurations a valid policy can still
//! have, each with a stable code (documented in docs/POLICY.md) and the
//! field path it is about. Pure functions of a checked [`Policy`].

use super::kube::{glob, KubeRule};
use super::{
    BindToPeer, InboundDefault, Mode, OutboundAction, PathMatch, Policy, Route, SpiffeIdPattern,
};

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Fails the lint (exit 1).
    Error,
    /// Printed; does not fail the lint.
    Warning,
}

/// One risky configuration.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    /// Stable code, `SM001`...
    pub code: &'static str,
    /// Error or warning.
    pub severity: Severity,
    /// Field path, e.g. `inbound.ports[0].routes[1]`.
    pub field: String,
    /// What is risky and why.
    pub message: String,
}

/// Every code with its one-line summary (docs/POLICY.md has the same list).
pub const CODES: [(&str, &str); 9] = [
    (
        "SM001",
        "inbound.default allow-authenticated in a policy with step-up routes",
    ),
    (
        "SM002",
        "a POST/PUT/PATCH/DELETE route without stepUp on a port with step-up routes",
    ),
    ("SM003", "mode: audit (warning)"),
    ("SM004", "an allow pattern wider than one namespace"),
    (
        "SM005",
        "a route shadowed by an earlier route (first match wins)",
    ),
    ("SM006", "an outbound passthrough to every address"),
    (
        "SM007",
        "a kubernetes exemption (no stepUp) for verb * or connect",
    ),
    (
        "SM008",
        "a kubernetes exemption listed before a step-up rule it shadows",
    ),
    (
        "SM009",
        "a step-up route whose token is not bound to the calling workload (warning)",
    ),
];

const MUTATING: [&str; 4] = ["POST", "PUT", "PATCH", "DELETE"];

/// The findings of `policy`, in file order within each check.
pub fn lint(policy: &Policy) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut add = |code, field: String, message: String| {
        let severity = if matches!(code, "SM003" | "SM009") {
            Severity::Warning
        } else {
            Severity::Error
        };
        out.push(Finding {
            code,
            severity,
            field,
            message,
        });
    };
    if policy.mode() == Mode::Audit {
        add(
            "SM003",
            "mode".into(),
            "audit: nothing is denied, would-deny decisions are only logged".into(),
        );
    }
    let sensitive = policy
        .ports()
        .iter()
        .any(|p| p.routes.iter().any(|r| r.step_up.is_some()));
    if sensitive && policy.inbound_default() == InboundDefault::AllowAuthenticated {
        add("SM001", "inbound.default".into(), "allow-authenticated while the policy has step-up routes: every workload of the trust domain reaches every unlisted port".into());
    }
    for (i, port) in policy.ports().iter().enumerate() {
        let path = format!("inbound.ports[{i}]");
        for (j, rule) in port.allow.iter().enumerate() {
            for (k, p) in rule.from.iter().enumerate() {
                if let Some(why) = wider_than_namespace(p) {
                    add("SM004", format!("{path}.allow[{j}].from[{k}]"), why);
                }
            }
        }
        let step_up_port = port.routes.iter().any(|r| r.step_up.is_some());
        for (j, route) in port.routes.iter().enumerate() {
            let rpath = format!("{path}.routes[{j}]");
            for (k, p) in route.from.iter().flatten().enumerate() {
                if let Some(why) = wider_than_namespace(p) {
                    add("SM004", format!("{rpath}.from[{k}]"), why);
                }
            }
            if step_up_port && route.step_up.is_none() {
                let risky: Vec<&str> = route
                    .methods
                    .iter()
                    .map(http::Method::as_str)
                    .filter(|m| MUTATING.iter().any(|w| w.eq_ignore_ascii_case(m)))
                    .collect();
                if !risky.is_empty() {
                    add(
                        "SM002",
                        format!("{rpath}.match.methods"),
                        format!(
                            "route {:?}: {} {} needs no step-up on a port whose other routes do",
                            route.name,
                            risky.join("/"),
                            route.path
                        ),
                    );
                }
            }
            // A JWT-SVID route is bound by its `from` (the token's `sub`).
            if let Some(s) = route.step_up.as_ref().filter(|s| s.from.is_none()) {
                if s.bind == BindToPeer::None {
                    add(
                        "SM009",
                        format!("{rpath}.stepUp.bindToPeer"),
                        format!(
                            "route {:?}: a step-up token of {:?} is not bound to the workload that presents it: one leaked from any allowed peer works from every other (bindToPeer: azp or cnf)",
                            route.name, s.provider
                        ),
                    );
                }
            }
            if let Some(earlier) = port.routes[..j].iter().find(|e| shadows(e, route)) {
                add(
                    "SM005",
                    rpath,
                    format!(
                        "route {:?} never matches: {:?} before it takes all its requests",
                        route.name, earlier.name
                    ),
                );
            }
        }
    }
    for (i, rule) in policy.outbound_rules().iter().enumerate() {
        let everywhere = rule.cidrs.is_empty() || rule.cidrs.iter().any(|c| c.prefix_len() == 0);
        if rule.action == OutboundAction::Passthrough && everywhere {
            add(
                "SM006",
                format!("outbound.rules[{i}].to.cidrs"),
                format!(
                    "{:?}: passthrough (no mTLS, no identity) to every address{}",
                    rule.name,
                    ports_note(&rule.ports)
                ),
            );
        }
    }
    if policy.outbound_default() == OutboundAction::Passthrough {
        add(
            "SM006",
            "outbound.default".into(),
            "passthrough: every destination no rule names leaves without mTLS".into(),
        );
    }
    if let Some(k) = policy.kubernetes() {
        for (i, rule) in k.rules.iter().enumerate() {
            let path = format!("kubernetes.rules[{i}]");
            if rule.step_up.is_some() {
                continue;
            }
            if let Some(v) = rule.verbs.iter().find(|v| *v == "*" || *v == "connect") {
                add(
                    "SM007",
                    format!("{path}.verbs"),
                    format!(
                        "exemption {:?} lets verb {v:?} through without step-up{}",
                        rule.name,
                        if v == "*" {
                            " (exec, delete, everything)"
                        } else {
                            " (exec, attach, port-forward)"
                        }
                    ),
                );
            }
            if let Some(later) = k.rules[i + 1..]
                .iter()
                .find(|l| l.step_up.is_some() && overlap(rule, l))
            {
                add("SM008", path, format!("exemption {:?} (no stepUp) matches requests of step-up rule {:?} listed after it: first match wins, so those need no step-up", rule.name, later.name));
            }
        }
    }
    out
}

fn ports_note(ports: &[u16]) -> String {
    if ports.is_empty() {
        ", any port".into()
    } else {
        format!(" on ports {ports:?}")
    }
}

/// Why `p` admits identities of more than one namespace, if it does.
fn wider_than_namespace(p: &SpiffeIdPattern) -> Option<String> {
    let SpiffeIdPattern::Prefix(prefix) = p else {
        return None;
    };
    let segs: Vec<&str> = prefix.path().split('/').filter(|s| !s.is_empty()).collect();
    match segs.as_slice() {
        ["ns", _, ..] => None,
        _ => Some(format!(
            "{p}: admits identities of every namespace, not one"
        )),
    }
}

/// Whether every request `later` matches is taken by `earlier` first.
fn shadows(earlier: &Route, later: &Route) -> bool {
    let methods = earlier.methods.is_empty()
        || (!later.methods.is_empty() && later.methods.iter().all(|m| earlier.matches_method(m)));
    let path = match (&earlier.path, &later.path) {
        (PathMatch::Exact(a), PathMatch::Exact(b)) => a == b,
        (PathMatch::Prefix(_), PathMatch::Exact(b)) => earlier.path.matches(b),
        (PathMatch::Prefix(_), PathMatch::Prefix(b)) => earlier.path.matches(b),
        (PathMatch::Exact(_), PathMatch::Prefix(_)) => false,
    };
    methods && path
}

/// Whether some request could match both rules (conservative where
/// wildcards meet wildcards: literal prefixes decide).
fn overlap(a: &KubeRule, b: &KubeRule) -> bool {
    let any = |x: &[String], y: &[String], f: &dyn Fn(&str, &str) -> bool| {
        x.iter().any(|p| y.iter().any(|q| f(p, q)))
    };
    let exact = |p: &str, q: &str| p == "*" || q == "*" || p == q;
    let opt = |x: &Option<Vec<String>>, y: &Option<Vec<String>>| match (x, y) {
        (Some(x), Some(y)) => any(x, y, &globs_meet),
        _ => true,
    };
    any(&a.verbs, &b.verbs, &exact)
        && any(&a.api_groups, &b.api_groups, &exact)
        && any(&a.resources, &b.resources, &resources_meet)
        && any(&a.namespaces, &b.namespaces, &globs_meet)
        && opt(&a.names, &b.names)
        && opt(&a.groups, &b.groups)
}

fn resources_meet(a: &str, b: &str) -> bool {
    if a == "*" || b == "*" {
        return true;
    }
    let part = |x: &str, y: &str| x == "*" || y == "*" || x == y;
    match (a.split_once('/'), b.split_once('/')) {
        (None, None) => a == b,
        (Some((ra, sa)), Some((rb, sb))) => part(ra, rb) && part(sa, sb),
        _ => false,
    }
}

/// Whether two `*` patterns could match one string: exact when one is
/// literal; when both have wildcards their literal heads before the first
/// `*` must agree (tails are not compared: may report an overlap).
fn globs_meet(a: &str, b: &str) -> bool {
    let head = |s: &str| s.split('*').next().unwrap_or_default().to_owned();
    match (a.contains('*'), b.contains('*')) {
        (false, false) => a == b,
        (true, false) => glob(a, b),
        (false, true) => glob(b, a),
        (true, true) => {
            let (ha, hb) = (head(a), head(b));
            ha.starts_with(&hb) || hb.starts_with(&ha)
        }
    }
}

#[cfg(test)]
#[path = "lint_tests.rs"]
mod tests;
