//! Validation: turns the file as written ([`super::model`]) into a checked
//! [`Policy`]. Every error carries the field path it is about.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::Algorithm;

use super::model::*;
use super::target;
use super::{
    AllowRule, DefaultLabels, JwksSource, OutboundRule, PathMatch, Policy, PolicyError, PortPolicy,
    ProviderConfig, Route, SpiffeIdPattern, StepUpRule, TrustDomain,
};
use crate::cidr::Cidr;
use crate::units::parse_duration;

const DEFAULT_REFRESH: Duration = Duration::from_secs(300);
const DEFAULT_MIN_REFRESH: Duration = Duration::from_secs(10);
const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
/// A leeway beyond this defeats exp/nbf; refused rather than silently capped.
const MAX_LEEWAY: Duration = Duration::from_secs(300);

pub(super) fn invalid(path: impl Into<String>, message: impl Into<String>) -> PolicyError {
    PolicyError::Invalid {
        path: path.into(),
        message: message.into(),
    }
}

/// SHA-256 of `bytes` as lower-case hex.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn compile(text: &str) -> Result<Policy, PolicyError> {
    let raw: RawPolicy =
        serde_norway::from_str(text).map_err(|e| PolicyError::Parse(e.to_string()))?;
    let trust_domain = TrustDomain::from_str(&raw.trust_domain)
        .map_err(|e| invalid("trustDomain", e.to_string()))?;
    let providers = match raw.step_up {
        Some(s) => s
            .providers
            .into_iter()
            .map(|(name, p)| provider(&name, p).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?,
        None => Vec::new(),
    };
    let inbound = raw.inbound.unwrap_or(RawInbound {
        default: InboundDefault::Deny,
        ports: vec![],
    });
    let mut seen_ports = BTreeSet::new();
    let mut ports = Vec::with_capacity(inbound.ports.len());
    for (i, p) in inbound.ports.into_iter().enumerate() {
        let path = format!("inbound.ports[{i}]");
        if p.port == 0 {
            return Err(invalid(format!("{path}.port"), "port 0 is not a port"));
        }
        if !seen_ports.insert(p.port) {
            return Err(invalid(
                format!("{path}.port"),
                format!("port {} appears twice", p.port),
            ));
        }
        ports.push(port(&path, p, &providers)?);
    }
    let outbound = raw.outbound.unwrap_or(RawOutbound {
        default: OutboundAction::Mtls,
        rules: vec![],
        opaque_ports: vec![],
    });
    let mut opaque_ports = Vec::with_capacity(outbound.opaque_ports.len());
    for (i, &port) in outbound.opaque_ports.iter().enumerate() {
        let path = format!("outbound.opaquePorts[{i}]");
        if port == 0 {
            return Err(invalid(path, "port 0 is not a port"));
        }
        if opaque_ports.contains(&port) {
            return Err(invalid(path, format!("port {port} appears twice")));
        }
        opaque_ports.push(port);
    }
    let outbound_rules = outbound
        .rules
        .into_iter()
        .enumerate()
        .map(|(i, r)| outbound_rule(&format!("outbound.rules[{i}]"), r))
        .collect::<Result<Vec<_>, _>>()?;
    let workload = match raw.workload {
        Some(w) => Some(super::workload::compile(w)?),
        None => None,
    };
    let kubernetes = match raw.kubernetes {
        Some(k) => Some(super::kube::compile(k, &providers)?),
        None => None,
    };
    Ok(Policy {
        trust_domain,
        mode: raw.mode,
        kubernetes,
        workload,
        providers,
        inbound_default: inbound.default,
        ports,
        outbound_default: outbound.default,
        outbound_rules,
        opaque_ports,
        digest: sha256_hex(text.as_bytes()),
        labels: DefaultLabels::new(),
    })
}

fn duration(path: &str, s: &str) -> Result<Duration, PolicyError> {
    parse_duration(s).map_err(|m| invalid(path, m))
}

fn provider(name: &str, p: RawProvider) -> Result<ProviderConfig, PolicyError> {
    let path = format!("stepUp.providers.{name}");
    if name.is_empty() {
        return Err(invalid(path, "provider name is empty"));
    }
    let issuer = match (p.jwks.mesh, p.issuer) {
        // Our CA's JWT-SVIDs carry no `iss`: its key is what vouches.
        (true, Some(_)) => {
            return Err(invalid(
                format!("{path}.issuer"),
                "a jwks.mesh provider takes no issuer: the mesh's JWT-SVIDs carry none",
            ))
        }
        (true, None) => None,
        (false, None) => return Err(invalid(format!("{path}.issuer"), "missing issuer")),
        (false, Some(i)) if i.is_empty() => {
            return Err(invalid(format!("{path}.issuer"), "empty issuer"))
        }
        (false, Some(i)) => Some(i),
    };
    let jwks = match (p.jwks.file, p.jwks.url) {
        (None, None) if p.jwks.mesh => {
            if p.jwks.ca_file.is_some() {
                return Err(invalid(
                    format!("{path}.jwks.caFile"),
                    "only applies to jwks.url",
                ));
            }
            JwksSource::Mesh
        }
        (Some(file), None) if !p.jwks.mesh => {
            if p.jwks.ca_file.is_some() {
                return Err(invalid(
                    format!("{path}.jwks.caFile"),
                    "only applies to jwks.url",
                ));
            }
            JwksSource::File(PathBuf::from(file))
        }
        (None, Some(url)) if !p.jwks.mesh => {
            let uri: http::Uri = url
                .parse()
                .map_err(|e| invalid(format!("{path}.jwks.url"), format!("{url:?}: {e}")))?;
            if uri.scheme_str() != Some("https") || uri.host().is_none() {
                return Err(invalid(
                    format!("{path}.jwks.url"),
                    format!("{url:?} is not an https:// URL"),
                ));
            }
            JwksSource::Url {
                url,
                ca_file: p.jwks.ca_file.map(PathBuf::from),
            }
        }
        _ => {
            return Err(invalid(
                format!("{path}.jwks"),
                "give exactly one of file, url or mesh: true",
            ))
        }
    };
    let refresh = match &p.jwks.refresh {
        Some(s) => duration(&format!("{path}.jwks.refresh"), s)?,
        None => DEFAULT_REFRESH,
    };
    if refresh < Duration::from_secs(1) {
        return Err(invalid(
            format!("{path}.jwks.refresh"),
            "must be at least 1s",
        ));
    }
    let min_refresh_interval = match &p.jwks.min_refresh_interval {
        Some(s) => duration(&format!("{path}.jwks.minRefreshInterval"), s)?,
        None => DEFAULT_MIN_REFRESH.min(refresh),
    };
    if p.audiences.is_empty() || p.audiences.iter().any(String::is_empty) {
        return Err(invalid(
            format!("{path}.audiences"),
            "list at least one non-empty audience",
        ));
    }
    if p.algorithms.is_empty() {
        return Err(invalid(
            format!("{path}.algorithms"),
            "list at least one algorithm",
        ));
    }
    let algorithms = p
        .algorithms
        .iter()
        .enumerate()
        .map(|(i, a)| algorithm(&format!("{path}.algorithms[{i}]"), a))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(typ) = &p.typ {
        if typ.is_empty() || typ.iter().any(String::is_empty) {
            return Err(invalid(
                format!("{path}.typ"),
                "list non-empty typ values, or leave typ out",
            ));
        }
    }
    let leeway = match &p.leeway {
        Some(s) => duration(&format!("{path}.leeway"), s)?,
        None => DEFAULT_LEEWAY,
    };
    if leeway > MAX_LEEWAY {
        return Err(invalid(format!("{path}.leeway"), "at most 300s"));
    }
    Ok(ProviderConfig {
        name: Arc::from(name),
        token: stepmesh_ca::jwt::Rules {
            issuer,
            audiences: p.audiences,
            algorithms,
            typ: p.typ,
            leeway,
        },
        jwks,
        refresh,
        min_refresh_interval,
    })
}

/// Asymmetric algorithms only (RFC 8725 §3.1): never `none`, never HMAC,
/// whose "key" would be the provider's public key.
fn algorithm(path: &str, name: &str) -> Result<Algorithm, PolicyError> {
    match name {
        "ES256" => Ok(Algorithm::ES256),
        "ES384" => Ok(Algorithm::ES384),
        "RS256" => Ok(Algorithm::RS256),
        "RS384" => Ok(Algorithm::RS384),
        "RS512" => Ok(Algorithm::RS512),
        "PS256" => Ok(Algorithm::PS256),
        "PS384" => Ok(Algorithm::PS384),
        "PS512" => Ok(Algorithm::PS512),
        "EdDSA" => Ok(Algorithm::EdDSA),
        "HS256" | "HS384" | "HS512" => Err(invalid(path, format!("{name} is symmetric: step-up tokens must be signed with an asymmetric key"))),
        "none" => Err(invalid(path, "unsigned tokens (none) are never accepted")),
        other => Err(invalid(path, format!("unknown algorithm {other:?} (ES256, ES384, RS256, RS384, RS512, PS256, PS384, PS512, EdDSA)"))),
    }
}

fn patterns(path: &str, from: &[String]) -> Result<Vec<SpiffeIdPattern>, PolicyError> {
    if from.is_empty() {
        return Err(invalid(
            path,
            "empty list: name at least one SPIFFE ID or pattern",
        ));
    }
    from.iter()
        .enumerate()
        .map(|(i, s)| {
            SpiffeIdPattern::parse(s).map_err(|e| invalid(format!("{path}[{i}]"), e.to_string()))
        })
        .collect()
}

fn port(
    path: &str,
    p: RawPort,
    providers: &[Arc<ProviderConfig>],
) -> Result<PortPolicy, PolicyError> {
    let allow = p
        .allow
        .into_iter()
        .enumerate()
        .map(|(j, a)| {
            let apath = format!("{path}.allow[{j}]");
            Ok(AllowRule {
                from: patterns(&format!("{apath}.from"), &a.from)?,
                name: Arc::from(a.name.unwrap_or(apath)),
            })
        })
        .collect::<Result<Vec<_>, PolicyError>>()?;
    if !p.routes.is_empty() && p.protocol == Protocol::Tcp {
        return Err(invalid(
            format!("{path}.routes"),
            "routes need protocol http or auto",
        ));
    }
    let mut names = BTreeSet::new();
    let mut routes = Vec::with_capacity(p.routes.len());
    for (k, r) in p.routes.into_iter().enumerate() {
        let rpath = format!("{path}.routes[{k}]");
        if r.name.is_empty() {
            return Err(invalid(format!("{rpath}.name"), "empty route name"));
        }
        if !names.insert(r.name.clone()) {
            return Err(invalid(
                format!("{rpath}.name"),
                format!("route name {:?} appears twice on this port", r.name),
            ));
        }
        routes.push(route(&rpath, r, providers)?);
    }
    Ok(PortPolicy {
        port: p.port,
        protocol: p.protocol,
        allow,
        mixed_case_routes: routes.iter().any(|r| r.path != r.folded),
        routes,
        path_match: p.path_match,
        label: Arc::from(path),
    })
}

fn route(path: &str, r: RawRoute, providers: &[Arc<ProviderConfig>]) -> Result<Route, PolicyError> {
    let methods = r
        .matches
        .methods
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let upper = m.to_ascii_uppercase();
            http::Method::from_bytes(upper.as_bytes()).map_err(|_| {
                invalid(
                    format!("{path}.match.methods[{i}]"),
                    format!("{m:?} is not an HTTP method"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let p = &r.matches.path;
    let ppath = format!("{path}.match.path");
    if !p.starts_with('/') {
        return Err(invalid(ppath, format!("{p:?} must start with /")));
    }
    // A pattern must be a path a request can canonically have: requests
    // with these are refused before matching (policy::target).
    if p.contains(['?', '#', '%', ';', '\\'])
        || p.chars().any(char::is_control)
        || p.split('/').any(|s| s == "." || s == "..")
        || p.contains("//")
    {
        return Err(invalid(
            ppath,
            format!(
                "{p:?}: no query, fragment, percent-escapes, ';', backslash, control characters, empty, . or .. segments"
            ),
        ));
    }
    let body = p.strip_suffix("/*");
    if body.unwrap_or(p).contains('*') {
        return Err(invalid(
            ppath,
            format!("{p:?}: '*' is only allowed as a final /* segment"),
        ));
    }
    // One trailing slash never matters to a request: nor to a pattern.
    let matcher = |fold: bool| {
        let text = |s: &str| if fold { target::fold(s) } else { s.to_owned() };
        match body {
            Some(base) => PathMatch::Prefix(text(base)),
            None if p.len() > 1 => PathMatch::Exact(text(p.trim_end_matches('/'))),
            None => PathMatch::Exact(text(p)),
        }
    };
    let from = match &r.from {
        Some(f) => Some(patterns(&format!("{path}.from"), f)?),
        None => None,
    };
    let step_up = match r.step_up {
        Some(s) => Some(step_up(&format!("{path}.stepUp"), s, providers)?),
        None => None,
    };
    Ok(Route {
        name: Arc::from(r.name),
        methods,
        path: matcher(false),
        folded: matcher(true),
        from,
        step_up,
    })
}

pub(super) fn step_up(
    path: &str,
    s: RawRouteStepUp,
    providers: &[Arc<ProviderConfig>],
) -> Result<StepUpRule, PolicyError> {
    let provider = providers
        .iter()
        .find(|p| *p.name == *s.provider)
        .ok_or_else(|| {
            invalid(
                format!("{path}.provider"),
                format!("no provider {:?} in stepUp.providers", s.provider),
            )
        })?;
    let header = match &s.header {
        Some(h) => {
            http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).map_err(|_| {
                invalid(
                    format!("{path}.header"),
                    format!("{h:?} is not a header name"),
                )
            })?
        }
        None => http::header::AUTHORIZATION,
    };
    // acr values go into a quoted, space-separated challenge parameter.
    if let Some(i) = s.acr.iter().position(|a| {
        a.is_empty()
            || !a
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    }) {
        return Err(invalid(
            format!("{path}.acr[{i}]"),
            "acr values are non-empty visible ASCII without quotes or backslashes",
        ));
    }
    if s.amr.iter().any(String::is_empty) {
        return Err(invalid(format!("{path}.amr"), "empty amr value"));
    }
    let mut claims = Vec::with_capacity(s.claims.len());
    for (name, value) in s.claims {
        let cpath = format!("{path}.claims.{name}");
        let json = match value {
            serde_norway::Value::String(v) => serde_json::Value::String(v),
            serde_norway::Value::Bool(v) => serde_json::Value::Bool(v),
            serde_norway::Value::Number(n) => {
                serde_json::to_value(&n).map_err(|e| invalid(&cpath, e.to_string()))?
            }
            _ => {
                return Err(invalid(
                    cpath,
                    "a claim value must be a string, number or boolean",
                ))
            }
        };
        claims.push((name, json));
    }
    let max_age = match &s.max_age {
        Some(m) => Some(duration(&format!("{path}.maxAge"), m)?),
        None => None,
    };
    // A JWT-SVID names a workload: a route taking one says which (deny by
    // default); any other provider's `sub` is not a SPIFFE ID.
    let from = match (&provider.jwks, &s.from) {
        (JwksSource::Mesh, Some(f)) => Some(patterns(&format!("{path}.from"), f)?),
        (JwksSource::Mesh, None) => {
            return Err(invalid(
                format!("{path}.from"),
                format!(
                    "provider {:?} takes JWT-SVIDs: list the workloads (SPIFFE IDs or /* patterns) whose tokens the route accepts",
                    s.provider
                ),
            ))
        }
        (_, Some(_)) => {
            return Err(invalid(
                format!("{path}.from"),
                "only applies to a provider with jwks: {mesh: true}",
            ))
        }
        (_, None) => None,
    };
    Ok(StepUpRule {
        provider: provider.name.clone(),
        header,
        acr: s.acr,
        amr: s.amr,
        claims,
        max_age,
        from,
        bind: s.bind_to_peer,
        forward: s.forward,
    })
}

fn outbound_rule(path: &str, r: RawOutboundRule) -> Result<OutboundRule, PolicyError> {
    let cidrs =
        r.to.cidrs
            .iter()
            .enumerate()
            .map(|(i, c)| {
                c.parse::<Cidr>()
                    .map_err(|m| invalid(format!("{path}.to.cidrs[{i}]"), m))
            })
            .collect::<Result<Vec<_>, _>>()?;
    if let Some(i) = r.to.ports.iter().position(|p| *p == 0) {
        return Err(invalid(
            format!("{path}.to.ports[{i}]"),
            "port 0 is not a port",
        ));
    }
    if cidrs.is_empty() && r.to.ports.is_empty() {
        return Err(invalid(format!("{path}.to"), "give cidrs, ports or both"));
    }
    Ok(OutboundRule {
        name: Arc::from(r.name.unwrap_or_else(|| path.to_owned())),
        cidrs,
        ports: r.to.ports,
        action: r.action,
    })
}

#[cfg(test)]
#[path = "compile_tests.rs"]
mod tests;
