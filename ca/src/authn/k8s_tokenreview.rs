//! `k8s-tokenreview`: the token is sent to the API server's
//! `authentication.k8s.io/v1` TokenReview API with the expected audience;
//! the identity comes from `system:serviceaccount:<ns>:<sa>`.

use std::path::PathBuf;

use serde::Deserialize;
use serde_json::json;

use super::AuthnError;
use crate::https::HttpsClient;
use crate::spiffe_id::{SpiffeId, TrustDomain};

/// The verifier's name in audit lines and metrics.
pub const NAME: &str = "k8s-tokenreview";
/// Where TokenReviews are created, below the API server's base URL.
pub const PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// The TokenReview verifier.
pub struct TokenReview {
    url: String,
    client: HttpsClient,
    token_file: PathBuf,
    audience: String,
    td: TrustDomain,
}

#[derive(Deserialize)]
struct Review {
    status: Option<Status>,
}

#[derive(Deserialize, Default)]
struct Status {
    #[serde(default)]
    authenticated: bool,
    user: Option<User>,
    audiences: Option<Vec<String>>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct User {
    username: Option<String>,
}

impl TokenReview {
    /// `api_server` is the base URL (`https://kubernetes.default.svc`) or the
    /// full TokenReview URL; `token_file` holds the CA's own credential
    /// (re-read on every review, as projected tokens rotate).
    pub fn new(
        api_server: &str,
        client: HttpsClient,
        token_file: PathBuf,
        audience: String,
        td: TrustDomain,
    ) -> Self {
        let base = api_server.trim_end_matches('/');
        let url = if base.ends_with(PATH) {
            base.to_owned()
        } else {
            format!("{base}{PATH}")
        };
        Self {
            url,
            client,
            token_file,
            audience,
            td,
        }
    }

    /// Asks the API server about `token`.
    pub async fn verify(&self, token: &str) -> Result<SpiffeId, AuthnError> {
        let unavailable = |detail: String| AuthnError::Unavailable {
            verifier: NAME,
            detail,
        };
        let reject = |reason, detail: String| AuthnError::rejected(NAME, reason, detail);
        let own = tokio::fs::read_to_string(&self.token_file)
            .await
            .map_err(|e| unavailable(format!("reading {}: {e}", self.token_file.display())))?;
        let body = json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [self.audience]},
        });
        let resp = self
            .client
            .send(
                &self.url,
                Some(own.trim()),
                Some(body.to_string().into_bytes()),
            )
            .await
            .map_err(|e| unavailable(format!("TokenReview at {}: {e}", self.url)))?;
        if !resp.status.is_success() {
            let text = String::from_utf8_lossy(&resp.body);
            return Err(unavailable(format!(
                "TokenReview at {} answered HTTP {}: {}",
                self.url,
                resp.status,
                text.chars().take(200).collect::<String>()
            )));
        }
        let review: Review = serde_json::from_slice(&resp.body)
            .map_err(|e| unavailable(format!("TokenReview answer is not a TokenReview: {e}")))?;
        let status = review.status.unwrap_or_default();
        if !status.authenticated {
            let why = status.error.unwrap_or_else(|| "not authenticated".into());
            let reason = if why.contains("audience") {
                "wrong_audience"
            } else {
                "not_authenticated"
            };
            return Err(reject(reason, format!("API server: {why}")));
        }
        // An empty audience list means the token is for the API server
        // itself, not for us (authentication.k8s.io/v1 TokenReviewStatus).
        let audiences = status.audiences.unwrap_or_default();
        if !audiences.contains(&self.audience) {
            return Err(reject(
                "wrong_audience",
                format!(
                    "token audiences {audiences:?} do not include {:?}",
                    self.audience
                ),
            ));
        }
        let username = status.user.and_then(|u| u.username).unwrap_or_default();
        let rest = username
            .strip_prefix("system:serviceaccount:")
            .ok_or_else(|| {
                reject(
                    "not_a_service_account",
                    format!("user {username:?} is not a service account"),
                )
            })?;
        let (ns, sa) = rest
            .split_once(':')
            .ok_or_else(|| reject("malformed", format!("username {username:?}")))?;
        SpiffeId::for_service_account(&self.td, ns, sa)
            .map_err(|e| reject("malformed", format!("namespace/service account: {e}")))
    }
}
