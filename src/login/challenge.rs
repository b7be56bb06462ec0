//! How the plugin learns what the gateway demands. kubectl never shows an
//! exec plugin the 401 its request got, so the gateway keeps each user's
//! last step-up challenge and serves it at `GET /stepmesh/v1/challenge`
//! to a request bearing the user's current token (docs/LOGIN.md):
//! 204 nothing pending, 200 the challenge, 401 the token is not accepted.

use stepmesh_ca::https::HttpsClient;

use super::oidc::Claims;

pub use crate::stepup::pending::{PendingStepUp as Challenge, PATH};

/// The gateway's answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// Nothing pending, or no answer to act on: use the current token.
    Nothing,
    /// The gateway does not accept the token: log in anew.
    Unauthorized,
    /// A challenge is pending.
    Pending(Challenge),
}

impl Challenge {
    /// Whether a token with `claims` satisfies it at `now`: its acr is
    /// acceptable (or any is) and its authentication is young enough.
    /// (A token issued before the challenge but satisfying both is fine:
    /// the challenge was for an older token.)
    pub fn satisfied_by(&self, claims: &Claims, now: u64) -> bool {
        let acr_ok = self.acr_values.is_empty()
            || claims
                .acr
                .as_ref()
                .is_some_and(|acr| self.acr_values.contains(acr));
        let age_ok = match self.max_age {
            None => true,
            Some(max_age) => claims
                .auth_time
                .is_some_and(|at| now.saturating_sub(at) <= max_age),
        };
        acr_ok && age_ok
    }

    /// "acr one of [..], authenticated within N s" for messages.
    pub fn describe(&self) -> String {
        let mut parts = vec![];
        if !self.acr_values.is_empty() {
            parts.push(format!("acr {}", self.acr_values.join(" or ")));
        }
        if let Some(max_age) = self.max_age {
            parts.push(format!("a login within {max_age} s"));
        }
        if parts.is_empty() {
            parts.push("a new login".to_owned());
        }
        let rule = match self.rule.as_str() {
            "" => String::new(),
            rule => format!(" (rule {rule})"),
        };
        format!("{}{rule}", parts.join(" and "))
    }
}

/// Asks the gateway at `server` for the user's pending challenge. An
/// unreachable gateway, a 404 (not a stepmesh gateway) or an answer that
/// does not parse is [`Answer::Nothing`]: kubectl's request then decides.
pub async fn fetch(client: &HttpsClient, server: &str, token: &str) -> Answer {
    let url = format!("{}{PATH}", server.trim_end_matches('/'));
    let resp = match client.send(&url, Some(token), None).await {
        Ok(resp) => resp,
        Err(err) => {
            tracing::debug!(%url, %err, "no challenge endpoint reachable; using the current token");
            return Answer::Nothing;
        }
    };
    match resp.status.as_u16() {
        204 => Answer::Nothing,
        401 => Answer::Unauthorized,
        200 => match serde_json::from_slice::<Challenge>(&resp.body) {
            Ok(challenge) => Answer::Pending(challenge),
            Err(err) => {
                tracing::warn!(%url, %err, "the gateway's challenge does not parse; using the current token");
                Answer::Nothing
            }
        },
        status => {
            tracing::debug!(%url, status, "no challenge endpoint; using the current token");
            Answer::Nothing
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;

    fn claims(acr: &str, auth_time: u64) -> Claims {
        Claims {
            iss: "i".into(),
            aud: "a".into(),
            exp: 0,
            iat: Some(auth_time),
            auth_time: Some(auth_time),
            acr: Some(acr.into()),
            nonce: None,
        }
    }

    #[test]
    fn satisfied_by_acr_and_age() {
        let c: Challenge = serde_json::from_str(
            r#"{"provider":"corp","issuer":"https://i","acrValues":["mfa"],"maxAge":600,
                "rule":"delete-in-prod","issuedAt":1765000000}"#,
        )
        .unwrap();
        assert_eq!(
            c.describe(),
            "acr mfa and a login within 600 s (rule delete-in-prod)"
        );
        assert!(c.satisfied_by(&claims("mfa", 1000), 1600));
        assert!(!c.satisfied_by(&claims("mfa", 1000), 1601), "too old");
        assert!(!c.satisfied_by(&claims("pwd", 1000), 1000), "wrong acr");
        let any: Challenge = serde_json::from_str(r#"{"acrValues":[],"maxAge":5}"#).unwrap();
        assert!(any.satisfied_by(&claims("pwd", 10), 15));
        assert!(!any.satisfied_by(&claims("pwd", 10), 16));
        let mut no_time = claims("pwd", 0);
        no_time.auth_time = None;
        assert!(!any.satisfied_by(&no_time, 0), "no auth_time: age unknown");
    }
}
