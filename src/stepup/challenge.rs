//! The answers a sensitive route gives when the step-up is missing or not
//! enough: the three `401` forms of SPEC.md (RFC 6750 §3, RFC 9470) and `403`.

use http::HeaderValue;

use super::require::Unmet;
use super::verify::TokenError;
use crate::policy::StepUpRule;

/// The `realm` of the no-token challenge.
pub const REALM: &str = "stepmesh";

/// `Bearer realm="stepmesh", acr_values="...", max_age=N` (no error code,
/// RFC 6750 §3.1: the client simply did not authenticate).
pub fn no_token(rule: &StepUpRule) -> HeaderValue {
    let mut v = format!("Bearer realm=\"{REALM}\"");
    push_requirements(&mut v, rule);
    header(v)
}

/// `Bearer realm="stepmesh"`: authentication is needed, nothing more is
/// asked yet (the Kubernetes gateway's answer to a request without a token).
pub fn no_token_plain() -> HeaderValue {
    HeaderValue::from_static("Bearer realm=\"stepmesh\"")
}

/// RFC 9470 §3: `error="insufficient_user_authentication"` with what to do.
pub fn insufficient(rule: &StepUpRule, unmet: Unmet) -> HeaderValue {
    let mut v = format!(
        "Bearer error=\"insufficient_user_authentication\", error_description=\"{}\"",
        unmet.description()
    );
    push_requirements(&mut v, rule);
    header(v)
}

/// RFC 6750 §3.1 `invalid_token`, with a fixed description per cause (never
/// any part of the token).
pub fn invalid_token(err: TokenError) -> HeaderValue {
    header(format!(
        "Bearer error=\"invalid_token\", error_description=\"{err}\""
    ))
}

fn push_requirements(v: &mut String, rule: &StepUpRule) {
    if !rule.acr.is_empty() {
        v.push_str(&format!(", acr_values=\"{}\"", rule.acr.join(" ")));
    }
    if let Some(max_age) = rule.max_age {
        v.push_str(&format!(", max_age={}", max_age.as_secs()));
    }
}

fn header(v: String) -> HeaderValue {
    // acr values are checked at load to be visible ASCII without quotes or
    // backslashes, so this cannot fail; fall back to the bare scheme anyway.
    HeaderValue::from_str(&v).unwrap_or_else(|_| HeaderValue::from_static("Bearer"))
}
