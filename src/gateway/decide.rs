//! The gateway's decision on one API request, in order: a client's own
//! `Impersonate-*` header → 403; no or bad token → 401 (RFC 6750); the
//! person's name or groups unusable → 401; a target the classifier cannot
//! read → 400; the first matching `kubernetes.rules` entry's step-up not met
//! → 401 `insufficient_user_authentication` (RFC 9470); else forward as that
//! person. Shared by `gateway serve` and `stepmesh policy explain`.

use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Method, Uri};
use serde_json::Value;

use super::classify::{classify_uri, RequestInfo};
use crate::policy::kube::{KubeAuthentication, KubeRequest, KubeRule};
use crate::policy::{Mode, Policy, StepUpRule};
use crate::stepup::gate::{token, Token};
use crate::stepup::require::{self, Failure, Unmet};
use crate::stepup::{challenge, StepUp, TokenError, VerifiedToken};

/// The person a verified token names, as the API server will see them.
#[derive(Debug, Clone)]
pub struct Person {
    /// `Impersonate-User`: the username claim with its prefix.
    pub username: String,
    /// `Impersonate-Group`: the groups claim, each with its prefix.
    pub groups: Vec<String>,
    /// The verified token (acr, amr, auth_time go into `Impersonate-Extra-`).
    pub token: Arc<VerifiedToken>,
}

/// A step-up the person owes (the wire type `stepmesh login` reads).
pub use crate::stepup::pending::PendingStepUp as Pending;

/// What the gateway does with the request.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// Forward it, impersonating the person.
    Forward,
    /// 400: the request cannot be classified safely.
    BadRequest(String),
    /// 401 with this `WWW-Authenticate` and message.
    Unauthorized(HeaderValue, String),
    /// 403 with this message.
    Forbidden(String),
    /// 401 `insufficient_user_authentication`: the person must step up.
    StepUp(HeaderValue, String, Box<Pending>),
}

/// A decision, with what the audit line and metrics need.
#[derive(Debug, Clone)]
pub struct Decision {
    /// What to do (audit mode already applied).
    pub verdict: Verdict,
    /// A stable label: `allowed`, `exempt`, `step_up_ok`, `no_token`, a
    /// token error (`expired`...), an insufficiency (`insufficient_acr`...),
    /// `impersonation_header`, `bad_username`, a classifier refusal; at the
    /// challenge endpoint `challenge_pending`, `challenge_none`,
    /// `method_not_allowed`.
    pub reason: &'static str,
    /// Audit mode: enforce mode would have refused the step-up.
    pub would_deny: bool,
    /// The rule that decided, if one matched.
    pub rule: Option<Arc<str>>,
    /// Who, once authenticated.
    pub person: Option<Person>,
    /// What, once classified.
    pub info: Option<RequestInfo>,
}

impl Decision {
    /// A request answered without forwarding or deciding (the challenge
    /// endpoint's): what the audit line and the metric say of it.
    pub(crate) fn about(reason: &'static str, person: Option<Person>) -> Decision {
        Decision {
            person,
            ..Decision::refuse(Verdict::Forward, reason)
        }
    }

    fn refuse(verdict: Verdict, reason: &'static str) -> Decision {
        Decision {
            verdict,
            reason,
            would_deny: false,
            rule: None,
            person: None,
            info: None,
        }
    }

    /// The status the gateway answers with itself (None: forward).
    pub fn status(&self) -> Option<http::StatusCode> {
        match self.verdict {
            Verdict::Forward => None,
            Verdict::BadRequest(_) => Some(http::StatusCode::BAD_REQUEST),
            Verdict::Unauthorized(..) | Verdict::StepUp(..) => Some(http::StatusCode::UNAUTHORIZED),
            Verdict::Forbidden(_) => Some(http::StatusCode::FORBIDDEN),
        }
    }
}

/// Why a request could not be authenticated: label, challenge, message.
pub type AuthFailure = (&'static str, HeaderValue, String);

/// Decides one request at `now` (seconds since the epoch).
pub async fn decide(
    policy: &Policy,
    stepup: &StepUp,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    now: u64,
) -> Decision {
    if let Some(name) = headers
        .keys()
        .find(|n| n.as_str().starts_with("impersonate-"))
    {
        let message = format!(
            "the request carries {name}: the gateway sets impersonation itself, from your verified login; \
             remove --as/--as-group/--as-uid (impersonation through the gateway is refused)"
        );
        return Decision::refuse(Verdict::Forbidden(message), "impersonation_header");
    }
    let person = match authenticate(policy, stepup, headers, now).await {
        Ok(p) => p,
        Err((reason, challenge, message)) => {
            return Decision::refuse(Verdict::Unauthorized(challenge, message), reason)
        }
    };
    let info = match classify_uri(method, uri) {
        Ok(info) => info,
        Err(e) => {
            let mut d = Decision::refuse(Verdict::BadRequest(e.to_string()), e.reason());
            d.person = Some(person);
            return d;
        }
    };
    if info.is_resource_request && info.verb.is_empty() {
        // OPTIONS, TRACE...: the API server reads no verb, so no rule can
        // be matched; it has nothing to serve for them either.
        let message = format!("{method} is not a Kubernetes API method");
        let mut d = Decision::refuse(Verdict::BadRequest(message), "no_verb");
        d.person = Some(person);
        return d;
    }
    let mut d = Decision {
        verdict: Verdict::Forward,
        reason: "allowed",
        would_deny: false,
        rule: None,
        person: None,
        info: None,
    };
    // authenticate() succeeded, so the section exists.
    let Some(kube) = policy.kubernetes() else {
        return d;
    };
    let req = request_of(&info);
    let mut rules: Vec<&KubeRule> = Vec::new();
    if info.is_resource_request {
        let across = kube.step_ups_across(&req, &person.groups);
        for rule in kube
            .rules_for(&req, &person.groups)
            .into_iter()
            .flatten()
            .chain(across)
        {
            if !rules.iter().any(|r| std::ptr::eq(*r, rule)) {
                rules.push(rule);
            }
        }
    }
    // The verb's own rule names the decision, unless `create`'s (a PATCH
    // that may create: `rules_for`) or another namespace's (a list across
    // namespaces: `step_ups_across`) is the one that asks for a step-up.
    for rule in rules {
        if d.rule.is_none() || rule.step_up.is_some() {
            d.rule = Some(rule.name.clone());
        }
        if d.reason == "allowed" {
            d.reason = "exempt";
        }
        let Some(step_up) = &rule.step_up else {
            continue;
        };
        if let Err((reason, verdict)) = check_step_up(policy, rule, step_up, &person, now) {
            d.reason = reason;
            match policy.mode() {
                Mode::Enforce => d.verdict = verdict,
                Mode::Audit => d.would_deny = true,
            }
            break;
        }
        d.reason = "step_up_ok";
    }
    d.person = Some(person);
    d.info = Some(info);
    d
}

/// The classifier's facts in the policy's terms.
pub fn request_of(info: &RequestInfo) -> KubeRequest<'_> {
    KubeRequest {
        verb: &info.verb,
        connect: info.is_connect(),
        api_group: &info.api_group,
        resource: &info.resource,
        subresource: &info.subresource,
        namespace: &info.namespace,
        name: &info.name,
    }
}

/// Verifies the bearer token with the authentication provider and maps its
/// claims to a person.
pub async fn authenticate(
    policy: &Policy,
    stepup: &StepUp,
    headers: &HeaderMap,
    now: u64,
) -> Result<Person, AuthFailure> {
    let bearer = challenge::no_token_plain();
    let Some(kube) = policy.kubernetes() else {
        return Err((
            "no_kubernetes_policy",
            bearer,
            "the gateway's policy has no kubernetes section; nothing is forwarded".to_owned(),
        ));
    };
    let auth = &kube.authentication;
    // Validated at load: the provider exists.
    let Some(config) = policy.provider(&auth.provider) else {
        return Err((
            "no_keys",
            bearer,
            "the authentication provider is missing".to_owned(),
        ));
    };
    let raw = match token(&http::header::AUTHORIZATION, headers) {
        Token::Present(t) => t,
        Token::Absent => {
            return Err((
                "no_token",
                bearer,
                format!(
                    "no bearer token: this gateway accepts OIDC logins from {}; set your kubeconfig user to run `stepmesh login` (docs/GATEWAY.md)",
                    config.token.issuer.as_deref().unwrap_or_default()
                ),
            ))
        }
        Token::Ambiguous => return Err(refused(TokenError::Malformed)),
    };
    let verified = stepup
        .provider(config)
        .await
        .verify(raw, now)
        .await
        .map_err(refused)?;
    person_of(auth, verified).map_err(|message| ("bad_username", bearer_invalid(), message))
}

fn refused(e: TokenError) -> AuthFailure {
    (
        e.reason(),
        challenge::invalid_token(e),
        format!("your login was refused: {e}; run `stepmesh login --logout` and try again"),
    )
}

fn bearer_invalid() -> HeaderValue {
    challenge::invalid_token(TokenError::Malformed)
}

/// Name prefixes of the cluster's own users and groups, which no person is
/// impersonated as: `system:` (`system:masters`, nodes, controllers) and
/// `kubeadm:` (`kubeadm:cluster-admins`, cluster-admin since kubeadm 1.29).
const RESERVED_PREFIXES: [&str; 2] = ["system:", "kubeadm:"];

/// kube-apiserver's claim mapping, plus what impersonation makes
/// dangerous: a `system:` name or group would let the IdP's users act as
/// the cluster's own components (`system:masters`), so it is refused, as
/// is a name the API server reads as another (blanks around it).
fn person_of(auth: &KubeAuthentication, token: Arc<VerifiedToken>) -> Result<Person, String> {
    let claim = &auth.username_claim;
    let name = match token.claims.get(claim) {
        Some(Value::String(s)) if !s.is_empty() => s,
        _ => return Err(format!("the token has no {claim:?} claim to name you by")),
    };
    // As the API server: when present, `email_verified` must be the
    // boolean true (a string "false" is not a verification).
    let verified = token.claims.get("email_verified");
    if claim == "email" && verified.is_some_and(|v| *v != Value::Bool(true)) {
        return Err("the token's email is not verified (email_verified is not true)".to_owned());
    }
    let username = format!("{}{name}", auth.username_prefix);
    let groups = match auth.groups_claim.as_ref().map(|c| (c, token.claims.get(c))) {
        None | Some((_, None)) => Vec::new(),
        Some((_, Some(Value::String(g)))) => vec![format!("{}{g}", auth.groups_prefix)],
        Some((c, Some(Value::Array(items)))) => items
            .iter()
            .map(|g| match g {
                Value::String(g) => Ok(format!("{}{g}", auth.groups_prefix)),
                _ => Err(format!("the token's {c:?} claim is not a list of strings")),
            })
            .collect::<Result<_, _>>()?,
        Some((c, Some(_))) => {
            return Err(format!("the token's {c:?} claim is not a list of strings"))
        }
    };
    for n in std::iter::once(&username).chain(&groups) {
        // The API server reads an HTTP/1 field's value without its leading
        // and trailing blanks: " system:masters" would pass the check
        // below and be `system:masters` there (tests/gateway_names.rs).
        if n.trim_matches([' ', '\t']) != n {
            return Err(format!(
                "{n:?} begins or ends with a blank, which the API server drops; the gateway does not impersonate it"
            ));
        }
        if RESERVED_PREFIXES.iter().any(|p| n.starts_with(p)) {
            return Err(format!(
                "{n:?} is reserved for the cluster's own components; the gateway does not impersonate it"
            ));
        }
        if n.is_empty() || HeaderValue::from_str(n).is_err() {
            return Err(format!("{n:?} is not a usable user or group name"));
        }
    }
    Ok(Person {
        username,
        groups,
        token,
    })
}

fn check_step_up(
    policy: &Policy,
    rule: &KubeRule,
    step_up: &StepUpRule,
    person: &Person,
    now: u64,
) -> Result<(), (&'static str, Verdict)> {
    // Validated at load: the provider exists.
    let Some(config) = policy.provider(&step_up.provider) else {
        let e = TokenError::NoKeys;
        return Err((
            e.reason(),
            Verdict::Unauthorized(challenge::invalid_token(e), e.to_string()),
        ));
    };
    let leeway = config.token.leeway.as_secs();
    // Validated at load: a rule's provider is the authentication provider
    // (one bearer token cannot come from two issuers).
    let token = &person.token;
    match require::check(step_up, token, None, now, leeway) {
        Ok(()) => Ok(()),
        Err(Failure::Invalid(e)) => Err((
            e.reason(),
            Verdict::Unauthorized(challenge::invalid_token(e), e.to_string()),
        )),
        Err(Failure::Insufficient(unmet)) => {
            let pending = Pending {
                provider: step_up.provider.to_string(),
                issuer: config.token.issuer.clone().unwrap_or_default(),
                acr_values: step_up.acr.clone(),
                max_age: step_up.max_age.map(|d| d.as_secs()),
                rule: rule.name.to_string(),
                issued_at: now,
            };
            let message = step_up_message(rule, step_up, unmet, token, now);
            Err((
                unmet.reason(),
                Verdict::StepUp(
                    challenge::insufficient(step_up, unmet),
                    message,
                    Box::new(pending),
                ),
            ))
        }
    }
}

/// What a person reads in kubectl's error: what is required, what they
/// have, and exactly what to do.
fn step_up_message(
    rule: &KubeRule,
    step_up: &StepUpRule,
    unmet: Unmet,
    token: &VerifiedToken,
    now: u64,
) -> String {
    let mut need = Vec::new();
    if !step_up.acr.is_empty() {
        need.push(format!("acr {}", step_up.acr.join(" or ")));
    }
    if !step_up.amr.is_empty() {
        need.push(format!("amr {}", step_up.amr.join("+")));
    }
    if let Some(max_age) = step_up.max_age {
        need.push(format!(
            "authenticated within the last {}",
            crate::units::format_duration(max_age)
        ));
    }
    let have = match (token.acr.as_deref(), token.auth_time) {
        (acr, Some(t)) => format!(
            "acr {}, authenticated {} ago",
            acr.unwrap_or("none"),
            crate::units::format_duration(std::time::Duration::from_secs(now.saturating_sub(t)))
        ),
        (acr, None) => format!("acr {}", acr.unwrap_or("none")),
    };
    format!(
        "step-up required by rule {:?} ({}): this request needs a login with {}; yours has {}. \
         Run the same kubectl command again: `stepmesh login` will ask for the stronger login",
        rule.name,
        unmet.description(),
        need.join(", "),
        have
    )
}
