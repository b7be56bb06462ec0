//! Decisions: may this peer connect to this port, which route does a request
//! take, what does outbound do with a destination. Pure functions of an
//! immutable [`Policy`]: no allocation beyond an `Arc` clone, no locks.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderMap, Method, Uri};

use super::target::{self, Readings, Refusal};
use super::{InboundDefault, Mode, OutboundAction, Policy, PortPolicy, Route, SpiffeId};

/// The outcome of an authorization, audit mode already applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Let the connection or request through.
    pub allow: bool,
    /// Audit mode only: enforce mode would have denied.
    pub would_deny: bool,
    /// The rule that decided (its name or field path).
    pub rule: Arc<str>,
    /// A stable label: `allowed`, `authenticated`, `not_allowed`,
    /// `default_deny`, `foreign_trust_domain`, `route_not_allowed`.
    pub reason: &'static str,
}

/// A request's decision and the route it took (none: no route matched, the
/// port's allow list alone decided).
#[derive(Debug)]
pub struct RouteMatch<'p> {
    /// Identity decision for this request.
    pub decision: Decision,
    /// The first matching route.
    pub route: Option<&'p Route>,
}

impl Policy {
    /// May `peer` connect to inbound `port`?
    pub fn authorize(&self, peer: &SpiffeId, port: u16) -> Decision {
        let (allowed, rule, reason) = self.identity(peer, port);
        self.finish(allowed, rule, reason)
    }

    /// The identity decision for one HTTP request: the port's allow list,
    /// then the first matching route's `from`, if it has one. On a port with
    /// routes the target is checked first ([`target`]): a refusal is a 400.
    pub fn authorize_request(
        &self,
        peer: &SpiffeId,
        port: u16,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Result<RouteMatch<'_>, Refusal> {
        let route = self.route_request(port, method, uri, headers)?;
        let (allowed, rule, reason) = self.identity(peer, port);
        if !allowed {
            return Ok(RouteMatch {
                decision: self.finish(false, rule, reason),
                route,
            });
        }
        let decision = match route.and_then(|r| r.from.as_ref().map(|f| (r, f))) {
            Some((r, from)) if !from.iter().any(|p| p.matches(peer)) => {
                self.finish(false, r.name.clone(), "route_not_allowed")
            }
            _ => self.finish(true, rule, reason),
        };
        Ok(RouteMatch { decision, route })
    }

    /// The route of a request on `port`: none when the port has no routes
    /// (its target is then not the policy's business), else the target
    /// checked and read every way the port's app may read it.
    pub fn route_request(
        &self,
        port: u16,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Result<Option<&Route>, Refusal> {
        let Some(p) = self.port(port).filter(|p| !p.routes.is_empty()) else {
            return Ok(None);
        };
        let path = target::request_path(method, uri, headers)?;
        let readings = Readings::of(path, p.path_match)?;
        route_in(p, &target::method_readings(method, uri, headers), &readings)
    }

    /// The route the readings of a path agree on: a reading that matches a
    /// route beats one that matches none (a route only adds requirements);
    /// readings that match different routes are ambiguous.
    pub fn route(
        &self,
        port: u16,
        method: &Method,
        readings: &Readings<'_>,
    ) -> Result<Option<&Route>, Refusal> {
        match self.port(port) {
            Some(p) => route_in(p, std::slice::from_ref(method), readings),
            None => Ok(None),
        }
    }

    /// What outbound does with `dest`: the first rule matching both its
    /// address and port, else `outbound.default`. Audit mode is not applied
    /// here: callers log a `Deny` in audit mode as would-deny.
    pub fn outbound(&self, dest: SocketAddr) -> (OutboundAction, Arc<str>) {
        let ip = dest.ip();
        for rule in &self.outbound_rules {
            let ip_ok = rule.cidrs.is_empty() || rule.cidrs.iter().any(|c| c.contains(ip));
            let port_ok = rule.ports.is_empty() || rule.ports.contains(&dest.port());
            if ip_ok && port_ok {
                return (rule.action, rule.name.clone());
            }
        }
        (self.outbound_default, self.labels.outbound_default.clone())
    }

    /// Whether traffic to destination `port` stays opaque TCP end to end
    /// (`outbound.opaquePorts`): no protocol detection, no HTTP layer.
    pub fn opaque_port(&self, port: u16) -> bool {
        self.opaque_ports.contains(&port)
    }

    fn identity(&self, peer: &SpiffeId, port: u16) -> (bool, Arc<str>, &'static str) {
        if let Some(p) = self.port(port) {
            for rule in &p.allow {
                if rule.from.iter().any(|pat| pat.matches(peer)) {
                    return (true, rule.name.clone(), "allowed");
                }
            }
            return (false, p.label.clone(), "not_allowed");
        }
        let rule = self.labels.inbound_default.clone();
        match self.inbound_default {
            InboundDefault::Deny => (false, rule, "default_deny"),
            InboundDefault::AllowAuthenticated if peer.trust_domain() == &self.trust_domain => {
                (true, rule, "authenticated")
            }
            InboundDefault::AllowAuthenticated => (false, rule, "foreign_trust_domain"),
        }
    }

    fn finish(&self, allowed: bool, rule: Arc<str>, reason: &'static str) -> Decision {
        match (allowed, self.mode) {
            (true, _) => Decision {
                allow: true,
                would_deny: false,
                rule,
                reason,
            },
            (false, Mode::Enforce) => Decision {
                allow: false,
                would_deny: false,
                rule,
                reason,
            },
            (false, Mode::Audit) => Decision {
                allow: true,
                would_deny: true,
                rule,
                reason,
            },
        }
    }
}

/// The route the readings agree on among `p`'s routes (see [`Policy::route`]),
/// the path's readings under each of the request's `methods` (its own
/// first, then those an override field names: [`target::method_readings`]).
fn route_in<'p>(
    p: &'p PortPolicy,
    methods: &[Method],
    readings: &Readings<'_>,
) -> Result<Option<&'p Route>, Refusal> {
    let mut chosen: Option<&Route> = None;
    for (nth, method) in methods.iter().enumerate() {
        let mut previous: Option<&str> = None;
        for reading in readings.iter() {
            // A folded reading equal to the reading before it finds the same
            // route when no pattern has upper case: skip the second scan.
            let same = previous == Some(reading.path.as_ref());
            previous = Some(reading.path.as_ref());
            if reading.folded && same && !p.mixed_case_routes {
                continue;
            }
            let found = p
                .routes
                .iter()
                .find(|r| r.matches_method(method) && r.matches_path(reading));
            match (chosen, found) {
                (Some(a), Some(b)) if !std::ptr::eq(a, b) => {
                    let (a, b) = (a.name.to_string(), b.name.to_string());
                    return Err(if nth == 0 {
                        Refusal::Ambiguous(a, b)
                    } else {
                        Refusal::MethodOverride(a, b)
                    });
                }
                (None, found) => chosen = found,
                _ => {}
            }
        }
    }
    Ok(chosen)
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;
