//! The `kubernetes:` section: who a person is (an OIDC provider of
//! `stepUp.providers` and kube-apiserver-style claim mapping) and which API
//! requests need a step-up. Rules match the way RBAC rules do (verbs, API
//! groups, `resource/subresource`, namespaces, names) plus the person's
//! groups; the first matching rule decides, and a rule without `stepUp` is
//! an explicit exemption. Requests no rule matches need no step-up: the
//! gateway only adds requirements, the API server's RBAC still decides.

use std::sync::Arc;

use super::compile::{invalid, step_up};
use super::model::{RawKubeAuthentication, RawKubeRule, RawKubernetes};
use super::{BindToPeer, PolicyError, ProviderConfig, StepUpRule};

/// The compiled `kubernetes:` section.
#[derive(Debug)]
pub struct KubePolicy {
    /// How the person is identified.
    pub authentication: KubeAuthentication,
    /// First match wins.
    pub rules: Vec<KubeRule>,
}

/// kube-apiserver's `--oidc-username-claim/-prefix`, `--oidc-groups-claim/-prefix`.
#[derive(Debug)]
pub struct KubeAuthentication {
    /// The provider whose tokens authenticate people.
    pub provider: Arc<str>,
    /// Claim holding the username (`sub` by default).
    pub username_claim: String,
    /// Prepended to the username (default as kube-apiserver's: none for
    /// `email`, else `ISSUER#`; `-` in the file means none).
    pub username_prefix: String,
    /// Claim holding the groups (a string or an array of strings), if any.
    pub groups_claim: Option<String>,
    /// Prepended to every group.
    pub groups_prefix: String,
}

/// One rule of `kubernetes.rules`.
#[derive(Debug)]
pub struct KubeRule {
    /// The rule's name (audit line, metrics, the 401's message).
    pub name: Arc<str>,
    /// Verbs (`*`: any). Tunnels — exec, attach, port-forward, proxy —
    /// match only `connect` (and `*`), whatever their HTTP method.
    pub verbs: Vec<String>,
    /// API groups (`""`: core; `*`: any).
    pub api_groups: Vec<String>,
    /// `resource`, `resource/subresource`, `resource/*`, `*/subresource`, `*`.
    pub resources: Vec<String>,
    /// Namespace patterns (`*` wildcards); `*` alone also matches
    /// cluster-scoped requests.
    pub namespaces: Vec<String>,
    /// Object name patterns; `None`: any request, with or without a name.
    pub names: Option<Vec<String>>,
    /// The person must be in one of these groups (patterns); `None`: anyone.
    pub groups: Option<Vec<String>>,
    /// What the request needs; `None`: nothing (an exemption).
    pub step_up: Option<StepUpRule>,
}

/// The facts of an API request a rule looks at (the gateway's classifier
/// fills it; `policy` does not depend on how).
#[derive(Debug, Clone, Copy)]
pub struct KubeRequest<'a> {
    /// RequestInfo's verb.
    pub verb: &'a str,
    /// An exec/attach/port-forward/proxy request.
    pub connect: bool,
    /// `""` for the core group.
    pub api_group: &'a str,
    /// `pods`...
    pub resource: &'a str,
    /// `exec`...; empty when none.
    pub subresource: &'a str,
    /// Empty when cluster-scoped.
    pub namespace: &'a str,
    /// Empty on collections.
    pub name: &'a str,
}

impl KubeRequest<'_> {
    /// A list, watch or collection delete without a namespace: of a
    /// namespaced kind, it reaches every namespace (`kubectl get secrets
    /// -A`, also with a `metadata.name` field selector, which names the
    /// object in every namespace), so a step-up rule for any namespace
    /// holds for it; an exemption holds only when its patterns take every
    /// namespace (`*`). A cluster-scoped kind (nodes) reads the same and
    /// meets such step-up rules too: the policy cannot tell the two apart,
    /// and asking is the closed side.
    pub fn spans_namespaces(&self) -> bool {
        self.namespace.is_empty() && matches!(self.verb, "list" | "watch" | "deletecollection")
    }
}

impl KubePolicy {
    /// The rule deciding `req` for a person in `groups`, if any matches.
    pub fn rule_for(&self, req: &KubeRequest<'_>, groups: &[String]) -> Option<&KubeRule> {
        self.rules.iter().find(|r| r.matches(req, groups))
    }

    /// Every step-up rule `req` meets when it spans namespaces (see
    /// [`KubeRequest::spans_namespaces`]), in order; none otherwise. Its
    /// answer holds each namespace's objects, so each namespace's step-up
    /// holds for it, not only the first matching rule's (which may be a
    /// weaker one, for another namespace).
    pub fn step_ups_across<'p>(
        &'p self,
        req: &KubeRequest<'_>,
        groups: &[String],
    ) -> Vec<&'p KubeRule> {
        // An exemption that matches it first takes every namespace (`*`):
        // it holds, as written.
        let exempt = || {
            self.rule_for(req, groups)
                .is_some_and(|r| r.step_up.is_none())
        };
        if !req.spans_namespaces() || exempt() {
            return Vec::new();
        }
        self.rules
            .iter()
            .filter(|r| r.step_up.is_some() && r.matches(req, groups))
            .collect()
    }

    /// The rules deciding `req`: its verb's, and, for an `update` or a
    /// `patch` of a named object, `create`'s (when another rule). The API
    /// server creates the object when it does not exist (server-side
    /// apply, which `kubectl apply --server-side` sends as a PATCH; a PUT
    /// where the kind allows create-on-update) and authorizes that as
    /// `create` as well, so a rule written for `create` holds for them too.
    pub fn rules_for<'p>(
        &'p self,
        req: &KubeRequest<'_>,
        groups: &[String],
    ) -> [Option<&'p KubeRule>; 2] {
        let own = self.rule_for(req, groups);
        let may_create = matches!(req.verb, "update" | "patch")
            && !req.name.is_empty()
            && req.subresource.is_empty();
        let as_create = KubeRequest {
            verb: "create",
            ..*req
        };
        let create = may_create
            .then(|| self.rule_for(&as_create, groups))
            .flatten()
            .filter(|c| !own.is_some_and(|o| std::ptr::eq(o, *c)));
        [own, create]
    }
}

impl KubeRule {
    /// Whether every field of the rule matches.
    pub fn matches(&self, req: &KubeRequest<'_>, groups: &[String]) -> bool {
        // A tunnel (exec, attach, port-forward, proxy) is `connect` whatever
        // its HTTP method: a WebSocket exec is a GET, and must not ride on a
        // rule written for reads.
        let verb = self.verbs.iter().any(|v| {
            v == "*"
                || if req.connect {
                    v == "connect" || (v == "proxy" && req.verb == "proxy")
                } else {
                    v == req.verb
                }
        });
        let group = self
            .api_groups
            .iter()
            .any(|g| g == "*" || g == req.api_group);
        let resource = self.resources.iter().any(|r| resource_matches(r, req));
        let namespace = self.namespaces.iter().any(|p| glob(p, req.namespace))
            || (req.spans_namespaces() && self.step_up.is_some());
        let proxied = proxied_name(req);
        let name = self.names.as_ref().is_none_or(|names| {
            names
                .iter()
                .any(|p| glob(p, req.name) || proxied.is_some_and(|n| glob(p, n)))
        });
        let person = self
            .groups
            .as_ref()
            .is_none_or(|want| want.iter().any(|p| groups.iter().any(|g| glob(p, g))));
        verb && group && resource && namespace && name && person
    }
}

/// The object a `proxy` subresource names, where its name carries a scheme
/// or a port (`https:db:443` is service `db`, `db:8080` too: the API
/// server's `SplitSchemeNamePort`): a rule naming `db` meets its proxy
/// however the client spells it (RBAC's `resourceNames` would not; found
/// by review).
fn proxied_name<'r>(req: &KubeRequest<'r>) -> Option<&'r str> {
    if req.subresource != "proxy" || !req.name.contains(':') {
        return None;
    }
    let parts: Vec<&str> = req.name.split(':').collect();
    match parts.as_slice() {
        [name, _port] => Some(name),
        [_scheme, name, _port] => Some(name),
        _ => None,
    }
}

/// RBAC's reading of a rule's resource against `resource[/subresource]`.
fn resource_matches(rule: &str, req: &KubeRequest<'_>) -> bool {
    if rule == "*" {
        return true;
    }
    match rule.split_once('/') {
        None => req.subresource.is_empty() && rule == req.resource,
        Some(("*", sub)) => !req.subresource.is_empty() && sub == req.subresource,
        Some((res, "*")) => !req.subresource.is_empty() && res == req.resource,
        Some((res, sub)) => res == req.resource && sub == req.subresource,
    }
}

/// `*` matches any run of characters (including none); all else is literal.
pub(super) fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let tail: Vec<&str> = parts.collect();
    let Some((last, middle)) = tail.split_last() else {
        return rest.is_empty(); // no `*` at all: exact
    };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.ends_with(last)
}

const VERBS: [&str; 11] = [
    "get",
    "list",
    "watch",
    "create",
    "update",
    "patch",
    "delete",
    "deletecollection",
    "proxy",
    "connect",
    "*",
];

/// Compiles `kubernetes:`; providers are the policy's `stepUp.providers`.
pub(super) fn compile(
    raw: RawKubernetes,
    providers: &[Arc<ProviderConfig>],
) -> Result<KubePolicy, PolicyError> {
    let authentication = authentication(raw.authentication, providers)?;
    let mut rules = Vec::with_capacity(raw.rules.len());
    let mut names = std::collections::BTreeSet::new();
    for (i, r) in raw.rules.into_iter().enumerate() {
        let path = format!("kubernetes.rules[{i}]");
        if !names.insert(r.name.clone()) {
            return Err(invalid(
                format!("{path}.name"),
                format!("rule {:?} appears twice", r.name),
            ));
        }
        rules.push(rule(&path, r, providers, &authentication.provider)?);
    }
    Ok(KubePolicy {
        authentication,
        rules,
    })
}

fn authentication(
    a: RawKubeAuthentication,
    providers: &[Arc<ProviderConfig>],
) -> Result<KubeAuthentication, PolicyError> {
    let path = "kubernetes.authentication";
    let provider = providers
        .iter()
        .find(|p| *p.name == *a.provider)
        .ok_or_else(|| {
            invalid(
                format!("{path}.provider"),
                format!("no provider {:?} in stepUp.providers", a.provider),
            )
        })?;
    if provider.jwks == super::JwksSource::Mesh {
        return Err(invalid(
            format!("{path}.provider"),
            "a jwks.mesh provider takes workloads' JWT-SVIDs: the gateway authenticates people",
        ));
    }
    let username_claim = a.username_claim.unwrap_or_else(|| "sub".to_owned());
    if username_claim.is_empty() {
        return Err(invalid(format!("{path}.usernameClaim"), "empty claim name"));
    }
    let username_prefix = match a.username_prefix.as_deref() {
        Some("-") => String::new(),
        Some(p) => p.to_owned(),
        None if username_claim == "email" => String::new(),
        None => format!("{}#", provider.token.issuer.as_deref().unwrap_or_default()),
    };
    if a.groups_claim.as_deref() == Some("") {
        return Err(invalid(format!("{path}.groupsClaim"), "empty claim name"));
    }
    // The gateway impersonates the groups it reads: without a prefix, a
    // group someone can create at the IdP is any RBAC group of the cluster
    // (`kubeadm:cluster-admins` is cluster-admin). So no prefix must be
    // asked for, as `-`, never had by omission.
    let groups_prefix = match (a.groups_prefix.as_deref(), &a.groups_claim) {
        (Some("-"), _) | (None, None) => String::new(),
        (Some(p), _) => p.to_owned(),
        (None, Some(_)) => {
            return Err(invalid(
                format!("{path}.groupsPrefix"),
                "required with groupsClaim: the IdP's groups become RBAC groups \
                 (\"oidc:\" keeps them apart from the cluster's; \"-\" for none)",
            ))
        }
    };
    Ok(KubeAuthentication {
        provider: provider.name.clone(),
        username_claim,
        username_prefix,
        groups_claim: a.groups_claim,
        groups_prefix,
    })
}

/// The subresources a request reaches as a tunnel (`connect`).
const TUNNELS: [&str; 4] = ["exec", "attach", "portforward", "proxy"];

fn rule(
    path: &str,
    r: RawKubeRule,
    providers: &[Arc<ProviderConfig>],
    auth_provider: &str,
) -> Result<KubeRule, PolicyError> {
    if r.name.is_empty() {
        return Err(invalid(format!("{path}.name"), "empty rule name"));
    }
    // Verbs and resources are required: an exemption that matched
    // everything by omission would switch the gateway off.
    if r.verbs.is_empty() {
        return Err(invalid(
            format!("{path}.verbs"),
            "name the verbs (\"*\" for all)",
        ));
    }
    if let Some((i, v)) = r
        .verbs
        .iter()
        .enumerate()
        .find(|(_, v)| !VERBS.contains(&v.as_str()))
    {
        return Err(invalid(
            format!("{path}.verbs[{i}]"),
            format!("{v:?} is not one of {}", VERBS.join(", ")),
        ));
    }
    if r.resources.is_empty() {
        return Err(invalid(
            format!("{path}.resources"),
            "name the resources (\"*\" for all)",
        ));
    }
    for (i, res) in r.resources.iter().enumerate() {
        let ok = match res.split_once('/') {
            None => !res.is_empty() && (res == "*" || !res.contains('*')),
            Some((a, b)) => {
                !a.is_empty()
                    && !b.is_empty()
                    && !b.contains('/')
                    && (a != "*" || b != "*")
                    && (a == "*" || !a.contains('*'))
                    && (b == "*" || !b.contains('*'))
            }
        };
        if !ok {
            return Err(invalid(
                format!("{path}.resources[{i}]"),
                format!(
                    "{res:?}: write resource, resource/subresource, resource/*, */subresource or *"
                ),
            ));
        }
    }
    for (field, list) in [("names", &r.names), ("groups", &r.groups)] {
        if let Some(i) = list.iter().flatten().position(String::is_empty) {
            return Err(invalid(format!("{path}.{field}[{i}]"), "empty pattern"));
        }
    }
    // Rules that can never match are refused: a step-up rule that matches
    // nothing is the step-up switched off without a word.
    for (field, list) in [
        ("apiGroups", &r.api_groups),
        ("namespaces", &r.namespaces),
        ("names", &r.names),
        ("groups", &r.groups),
    ] {
        if list.as_ref().is_some_and(Vec::is_empty) {
            return Err(invalid(
                format!("{path}.{field}"),
                "an empty list matches nothing: leave the field out to match all",
            ));
        }
    }
    if let Some(i) = r.api_groups.iter().flatten().position(|g| g == "core") {
        return Err(invalid(
            format!("{path}.apiGroups[{i}]"),
            "the core API group is \"\", not \"core\"",
        ));
    }
    let reaches_tunnels = r
        .verbs
        .iter()
        .any(|v| matches!(v.as_str(), "connect" | "*"));
    if let Some(i) = r.resources.iter().position(|res| {
        res.split_once('/')
            .is_some_and(|(_, sub)| TUNNELS.contains(&sub))
    }) {
        if !reaches_tunnels {
            return Err(invalid(
                format!("{path}.resources[{i}]"),
                format!(
                    "{:?} is a tunnel, which only the verbs connect and * match: add connect",
                    r.resources[i]
                ),
            ));
        }
    }
    let step_up = match r.step_up {
        Some(s) => {
            let spath = format!("{path}.stepUp");
            let only_bearer = s.header.is_some() || s.forward || s.bind_to_peer != BindToPeer::None;
            let rule = step_up(&spath, s, providers)?;
            if *rule.provider != *auth_provider {
                return Err(invalid(
                    format!("{spath}.provider"),
                    format!(
                        "must be the authentication provider {auth_provider:?}: one bearer token carries both the login and the step-up"
                    ),
                ));
            }
            if only_bearer {
                return Err(invalid(
                    spath,
                    "header, forward and bindToPeer do not apply: the gateway reads the person's bearer token and never forwards it",
                ));
            }
            Some(rule)
        }
        None => None,
    };
    Ok(KubeRule {
        name: Arc::from(r.name),
        verbs: r.verbs,
        api_groups: r.api_groups.unwrap_or_else(|| vec!["*".to_owned()]),
        resources: r.resources,
        namespaces: r.namespaces.unwrap_or_else(|| vec!["*".to_owned()]),
        names: r.names,
        groups: r.groups,
        step_up,
    })
}

#[cfg(test)]
#[path = "kube_tests.rs"]
mod tests;
