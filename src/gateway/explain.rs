//! `stepmesh policy explain --kubernetes`: the gateway's decision on one API
//! request, through the same classifier and [`super::decide`] the gateway
//! runs, with the deciding rule. Without a token, which rule would apply to
//! a person in the given groups.

use std::fmt::Write as _;

use anyhow::Context as _;
use http::{HeaderMap, HeaderValue, Method, Uri};

use super::classify::classify_uri;
use super::decide::{decide, request_of, Verdict};
use crate::policy::Policy;
use crate::stepup::{gate::unix_now, StepUp, StepUpMetrics};

/// The request to explain.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// An HTTP method, or a Kubernetes verb (`list`, `watch`, `delete`...).
    pub method: &'a str,
    /// The request target (`/api/v1/namespaces/prod/pods?watch=1`).
    pub target: &'a str,
    /// The person's bearer token.
    pub token: Option<&'a str>,
    /// Without a token: the person's groups.
    pub groups: &'a [String],
}

/// A Kubernetes verb as the method kubectl sends it (and `watch=true` for
/// `watch`); an HTTP method is taken as it is.
fn method_and_target(verb: &str, target: &str) -> anyhow::Result<(Method, String, Option<String>)> {
    let lower = verb.to_ascii_lowercase();
    let (method, watch) = match lower.as_str() {
        "get" | "list" => (Method::GET, false),
        "watch" => (Method::GET, true),
        "create" => (Method::POST, false),
        "update" => (Method::PUT, false),
        "patch" => (Method::PATCH, false),
        "delete" | "deletecollection" => (Method::DELETE, false),
        _ => (
            Method::from_bytes(verb.to_ascii_uppercase().as_bytes()).context("--method")?,
            false,
        ),
    };
    let target = if watch && !target.contains("watch=") {
        let sep = if target.contains('?') { '&' } else { '?' };
        format!("{target}{sep}watch=true")
    } else {
        target.to_owned()
    };
    let expected = matches!(
        lower.as_str(),
        "get" | "list" | "watch" | "create" | "update" | "patch" | "delete" | "deletecollection"
    )
    .then_some(lower);
    Ok((method, target, expected))
}

/// The explanation, as `key: value` lines.
pub async fn explain(policy: &Policy, req: Request<'_>) -> anyhow::Result<String> {
    let kube = policy
        .kubernetes()
        .context("the policy has no `kubernetes:` section")?;
    let (method, target, expected) = method_and_target(req.method, req.target)?;
    let mut out = String::new();
    let _ = writeln!(out, "request: {method} {target}");
    let uri: Uri = match crate::policy::target::parse(&target) {
        Ok(u) => u,
        Err(r) => {
            let _ = writeln!(out, "decision: 400 bad request\nwhy: {r}");
            return Ok(out);
        }
    };
    let info = match classify_uri(&method, &uri) {
        Ok(i) => i,
        Err(e) => {
            let _ = writeln!(
                out,
                "decision: 400 bad request\nreason: {}\nwhy: {e}",
                e.reason()
            );
            return Ok(out);
        }
    };
    let _ = writeln!(
        out,
        "classified: verb={} apiGroup={:?} resource={} namespace={:?} name={:?}{}",
        info.verb,
        info.api_group,
        info.resource_path(),
        info.namespace,
        info.name,
        if info.is_connect() {
            " (a tunnel: matches verb connect)"
        } else {
            ""
        }
    );
    if let Some(want) = expected.filter(|w| *w != info.verb) {
        let _ = writeln!(
            out,
            "note: the API server reads this request as {:?}, not {want:?}",
            info.verb
        );
    }
    let Some(token) = req.token else {
        let rules = if info.is_resource_request {
            kube.rules_for(&request_of(&info), req.groups)
        } else {
            [None, None]
        };
        if rules.iter().all(Option::is_none) {
            let _ = writeln!(
                out,
                "rule: (none: no step-up; the API server's RBAC decides)"
            );
        }
        let across = if info.is_resource_request {
            kube.step_ups_across(&request_of(&info), req.groups)
        } else {
            Vec::new()
        };
        let labels = ["rule", "rule as create (the object may not exist yet)"];
        let listed = labels
            .into_iter()
            .zip(rules)
            .filter_map(|(l, r)| Some((l, r?)));
        let also = across
            .into_iter()
            .filter(|a| !rules.iter().flatten().any(|r| std::ptr::eq(*r, *a)))
            .map(|r| ("also (the request spans namespaces)", r));
        for (label, r) in listed.chain(also) {
            let _ = match &r.step_up {
                None => writeln!(out, "{label}: {} (exempt: no step-up)", r.name),
                Some(s) => writeln!(
                    out,
                    "{label}: {}\nneeds: step-up with provider {} (acr {:?}, amr {:?}, maxAge {})",
                    r.name,
                    s.provider,
                    s.acr,
                    s.amr,
                    s.max_age
                        .map_or("none".to_owned(), crate::units::format_duration)
                ),
            };
        }
        let _ = writeln!(
            out,
            "decision: 401 without a token (give --token to decide)"
        );
        return Ok(out);
    };
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).context("--token")?,
    );
    let stepup = StepUp::new(StepUpMetrics::default());
    stepup.sync(policy).await;
    let d = decide(policy, &stepup, &method, &uri, &headers, unix_now()).await;
    if let Some(p) = &d.person {
        let _ = writeln!(out, "user: {} groups: {:?}", p.username, p.groups);
    }
    let _ = writeln!(
        out,
        "rule: {}",
        d.rule
            .as_deref()
            .unwrap_or("(none: no step-up; the API server's RBAC decides)")
    );
    let verdict = match &d.verdict {
        Verdict::Forward if d.would_deny => "forward (audit: enforce would refuse)".to_owned(),
        Verdict::Forward => "forward, impersonating the user".to_owned(),
        Verdict::BadRequest(m) => format!("400 bad request\nwhy: {m}"),
        Verdict::Forbidden(m) => format!("403 forbidden\nwhy: {m}"),
        Verdict::Unauthorized(c, m) => format!(
            "401 unauthorized\nwhy: {m}\nwww-authenticate: {}",
            c.to_str().unwrap_or("?")
        ),
        Verdict::StepUp(c, m, _) => format!(
            "401 step-up required\nwhy: {m}\nwww-authenticate: {}",
            c.to_str().unwrap_or("?")
        ),
    };
    let _ = writeln!(out, "decision: {verdict}\nreason: {}", d.reason);
    Ok(out)
}
