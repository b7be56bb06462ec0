//! Egress: to the workloads of the set whose inbound rules admit the
//! caller's identity, and to the IP blocks of the `outbound` rules (`deny`
//! rules listed before an allowing one become its `except`).

use serde_json::{json, Value};

use super::{object_prefix, pods_json, Input, Object};
use crate::cidr::Cidr;
use crate::policy::{InboundDefault, OutboundAction, Policy, SpiffeId, SpiffeIdPattern};

/// Whether `pattern` admits the caller's pods. With a service account the
/// caller's SPIFFE ID is known exactly; without one, only a pattern
/// admitting every identity of its namespace is sure to admit it.
fn admits(pattern: &SpiffeIdPattern, caller: &Input<'_>) -> bool {
    let td = caller.policy.trust_domain();
    let ns = &caller.workload.namespace;
    match (&caller.workload.service_account, pattern) {
        (Some(sa), _) => {
            SpiffeId::for_service_account(td, ns, sa).is_ok_and(|id| pattern.matches(&id))
        }
        (None, SpiffeIdPattern::Prefix(prefix)) => {
            format!("spiffe://{td}/ns/{ns}/sa/").starts_with(&format!("{prefix}/"))
        }
        (None, SpiffeIdPattern::Exact(_)) => false,
    }
}

/// Egress from `caller` to every workload of `all` that admits it.
pub(super) fn calls(
    caller: &Input<'_>,
    all: &[Input<'_>],
    netpol: &impl Fn(&str, &[&str], Value) -> Value,
) -> Object {
    let mut notes =
        vec!["Egress to the workloads of the set whose inbound rules admit this identity:".into()];
    let mut rules = Vec::new();
    for callee in all {
        let mut ports = Vec::new();
        let mut why = Vec::new();
        for port in callee.policy.ports() {
            if let Some(rule) = port
                .allow
                .iter()
                .find(|r| r.from.iter().any(|p| admits(p, caller)))
            {
                ports.push(json!({"protocol": "TCP", "port": port.port}));
                why.push(format!("{} ({})", port.port, rule.name));
            }
        }
        let any_port = callee.policy.inbound_default() == InboundDefault::AllowAuthenticated
            && callee.policy.trust_domain() == caller.policy.trust_domain();
        if any_port {
            why.push("every other port (inbound.default allow-authenticated)".into());
        }
        if why.is_empty() {
            continue;
        }
        notes.push(format!(
            "  {}/{} ({}): {}.",
            callee.workload.namespace,
            object_prefix(&callee.workload),
            callee.source,
            why.join(", ")
        ));
        let mut rule =
            json!({"to": [pods_json(&callee.workload.namespace, &callee.workload.selector)]});
        if !any_port {
            rule["ports"] = Value::Array(ports);
        }
        rules.push(rule);
    }
    if rules.is_empty() {
        return Object {
            input: 0,
            notes: vec![
                "No workload of the set admits this identity: no egress to the mesh.".into(),
            ],
            value: Value::Null,
        };
    }
    Object {
        input: 0,
        notes,
        value: netpol(super::EGRESS_CALLS, &["Egress"], json!({"egress": rules})),
    }
}

fn any_address() -> Vec<Cidr> {
    ["0.0.0.0/0", "::/0"]
        .iter()
        .filter_map(|c| c.parse().ok())
        .collect()
}

/// One rule of `outbound`, the default included as a last catch-all.
struct Rule<'a> {
    name: &'a str,
    cidrs: Vec<Cidr>,
    ports: &'a [u16],
    action: OutboundAction,
}

/// The `outbound` rules as egress to IP blocks. `passthrough` rules, and
/// `mtls` rules that name CIDRs, allow their destinations (the default
/// `mtls` names none: mesh destinations come from the callees' policies);
/// a `deny` rule listed before them is carved out with `except` when its
/// ports cover theirs, else the comments say NetworkPolicy cannot express it.
pub(super) fn outbound(policy: &Policy, netpol: &impl Fn(&str, &[&str], Value) -> Value) -> Object {
    let mut rules: Vec<Rule<'_>> = policy
        .outbound_rules()
        .iter()
        .map(|r| Rule {
            name: &r.name,
            cidrs: if r.cidrs.is_empty() {
                any_address()
            } else {
                r.cidrs.clone()
            },
            ports: &r.ports,
            action: r.action,
        })
        .collect();
    rules.push(Rule {
        name: "outbound.default",
        cidrs: any_address(),
        ports: &[],
        action: policy.outbound_default(),
    });
    let named_cidrs = |i: usize| {
        policy
            .outbound_rules()
            .get(i)
            .is_some_and(|r| !r.cidrs.is_empty())
    };
    let mut notes = vec!["Egress from the outbound rules:".to_owned()];
    let mut egress = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        let allows = match rule.action {
            OutboundAction::Passthrough => true,
            OutboundAction::Mtls => named_cidrs(i),
            OutboundAction::Deny => false,
        };
        if !allows {
            continue;
        }
        let mut blocks = Vec::new();
        for cidr in &rule.cidrs {
            let mut except: Vec<String> = Vec::new();
            let mut shadowed = None;
            for deny in rules[..i]
                .iter()
                .filter(|r| r.action == OutboundAction::Deny)
            {
                let covers_ports = deny.ports.is_empty()
                    || (!rule.ports.is_empty()
                        && rule.ports.iter().all(|p| deny.ports.contains(p)));
                for d in &deny.cidrs {
                    let overlaps = d.covers(cidr) || cidr.covers(d);
                    if overlaps && !covers_ports {
                        notes.push(format!("  {}: {} denies {d} on ports {:?} only: NetworkPolicy cannot carve ports out of an address block; the sidecar refuses them.", rule.name, deny.name, deny.ports));
                    } else if d.covers(cidr) {
                        shadowed = Some(deny.name);
                    } else if cidr.covers(d) && !except.contains(&d.to_string()) {
                        except.push(d.to_string());
                    }
                }
            }
            if let Some(by) = shadowed {
                notes.push(format!(
                    "  {}: {cidr} is all denied by {by} listed before it.",
                    rule.name
                ));
                continue;
            }
            let mut block = json!({"cidr": cidr.to_string()});
            if !except.is_empty() {
                block["except"] = json!(except);
            }
            blocks.push(json!({"ipBlock": block}));
        }
        if blocks.is_empty() {
            continue;
        }
        notes.push(format!("  {} ({:?}).", rule.name, rule.action));
        let mut e = json!({"to": blocks});
        if !rule.ports.is_empty() {
            let ports: Vec<Value> = rule
                .ports
                .iter()
                .map(|p| json!({"protocol": "TCP", "port": p}))
                .collect();
            e["ports"] = Value::Array(ports);
        }
        egress.push(e);
    }
    if egress.is_empty() {
        notes.push("  none allow a destination: no egress beyond the mesh.".into());
        return Object {
            input: 0,
            notes,
            value: Value::Null,
        };
    }
    notes.push("Addresses of pods and Services are CNI-dependent in ipBlock: name them in policies instead.".into());
    Object {
        input: 0,
        notes,
        value: netpol("egress-outbound", &["Egress"], json!({"egress": egress})),
    }
}
