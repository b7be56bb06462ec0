//! `k8s-tokenreview`: the token is sent to the API server's
//! `authentication.k8s.io/v1` TokenReview API with the expected audience;
//! the identity comes from `system:serviceaccount:<ns>:<sa>`.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use tokio::sync::Semaphore;

use super::AuthnError;
use crate::https::HttpsClient;
use crate::jwt::{self, Rules};
use crate::spiffe_id::{SpiffeId, TrustDomain};

/// At most this many TokenReviews in flight. The CA asks with its own
/// ServiceAccount, so reviews of whatever callers send would otherwise
/// spend that account's API priority (and the API server) on whoever
/// sends most.
pub const MAX_IN_FLIGHT: usize = 32;
/// How long a token waits for a review slot before the call is answered
/// UNAVAILABLE (the sidecar retries).
const SLOT_WAIT: Duration = Duration::from_secs(2);
/// Clock difference allowed by the checks made before a review: generous,
/// so they never refuse what the API server (its own clock, its own
/// leeway) would accept; they only keep what could never pass from it.
const PRE_CHECK_LEEWAY: Duration = Duration::from_secs(300);

/// The verifier's name in audit lines and metrics.
pub const NAME: &str = "k8s-tokenreview";
/// Where TokenReviews are created, below the API server's base URL.
pub const PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// The TokenReview verifier.
pub struct TokenReview {
    url: String,
    client: HttpsClient,
    token_file: PathBuf,
    td: TrustDomain,
    /// What a token must say before it is sent: a projected token for our
    /// audience, not expired (its signature is the API server's to check).
    rules: Rules,
    slots: Semaphore,
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
            td,
            rules: Rules {
                issuer: None,
                audiences: vec![audience],
                algorithms: super::k8s_jwks::ALGORITHMS.to_vec(),
                typ: None,
                leeway: PRE_CHECK_LEEWAY,
            },
            slots: Semaphore::new(MAX_IN_FLIGHT),
        }
    }

    fn audience(&self) -> &str {
        // One audience, set in `new`.
        self.rules.audiences.first().map_or("", String::as_str)
    }

    /// Asks the API server about `token`.
    pub async fn verify(&self, token: &str) -> Result<SpiffeId, AuthnError> {
        let unavailable = |detail: String| AuthnError::Unavailable {
            verifier: NAME,
            detail,
        };
        let reject = |reason, detail: String| AuthnError::rejected(NAME, reason, detail);
        // Garbage costs no review: the claims a review would refuse are
        // read first (unverified: they only rule tokens out).
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        jwt::check_unsigned(token, &self.rules, now)
            .map_err(|e| reject(e.reason(), format!("token refused before review: {e}")))?;
        let _slot = match tokio::time::timeout(SLOT_WAIT, self.slots.acquire()).await {
            Ok(Ok(slot)) => slot,
            _ => {
                return Err(unavailable(format!(
                    "{MAX_IN_FLIGHT} TokenReviews already in flight; retry"
                )))
            }
        };
        let own = tokio::fs::read_to_string(&self.token_file)
            .await
            .map_err(|e| unavailable(format!("reading {}: {e}", self.token_file.display())))?;
        let body = json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [self.audience()]},
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
        if !audiences.iter().any(|a| a == self.audience()) {
            return Err(reject(
                "wrong_audience",
                format!(
                    "token audiences {audiences:?} do not include {:?}",
                    self.audience()
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

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;
    use base64::Engine;

    /// An API server that accepts connections and never answers: the
    /// reviews in flight stop at the cap, and the next token is answered
    /// UNAVAILABLE after the slot wait instead of opening one more.
    #[tokio::test]
    async fn reviews_in_flight_are_capped() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "https://127.0.0.1:{}",
            listener.local_addr().unwrap().port()
        );
        let held = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((c, _)) = listener.accept().await {
                conns.push(c);
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(&ca, cert.cert.pem()).unwrap();
        std::fs::write(dir.path().join("token"), "own").unwrap();
        let review = std::sync::Arc::new(TokenReview::new(
            &url,
            HttpsClient::new(&ca).unwrap(),
            dir.path().join("token"),
            "stepmesh-ca".into(),
            "td.test".parse::<TrustDomain>().unwrap(),
        ));
        let b64 = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600;
        let token = format!(
            "{}.{}.sig",
            b64(json!({"alg": "RS256"})),
            b64(json!({"aud": "stepmesh-ca", "exp": exp}))
        );
        let pending: Vec<_> = (0..MAX_IN_FLIGHT)
            .map(|_| {
                let (review, token) = (review.clone(), token.clone());
                tokio::spawn(async move { review.verify(&token).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(review.slots.available_permits(), 0);
        let started = std::time::Instant::now();
        let err = review.verify(&token).await.unwrap_err();
        assert!(
            matches!(&err, AuthnError::Unavailable { detail, .. } if detail.contains("in flight")),
            "{err:?}"
        );
        assert!(started.elapsed() >= SLOT_WAIT, "{:?}", started.elapsed());
        for p in pending {
            p.abort();
        }
        held.abort();
    }
}
