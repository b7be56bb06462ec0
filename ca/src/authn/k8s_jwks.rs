//! `k8s-jwks`: projected ServiceAccount tokens verified offline against the
//! cluster's service-account issuer keys (a JWKS file, or the issuer's
//! `/openid/v1/jwks` URL).
//!
//! The one JWT verifier ([`crate::jwt`], the sidecar's step-up providers'
//! too) checks iss, aud, exp/nbf/iat, an asymmetric algorithm that matches
//! the key (never `none`, never HMAC); this module takes namespace and
//! service account from the `kubernetes.io` claim. Keys are refreshed on a schedule and on an
//! unknown `kid` (rate-limited); a failed or empty fetch keeps the last keys.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use jsonwebtoken::Algorithm;
use serde::Deserialize;

use super::AuthnError;
use crate::https::HttpsClient;
use crate::jwt::{self, KeyCache, KeySet, Rules, TokenError};
use crate::spiffe_id::{SpiffeId, TrustDomain};

/// The verifier's name in audit lines and metrics.
pub const NAME: &str = "k8s-jwks";
/// Least time between two fetches caused by unknown `kid`s.
const REFETCH_MIN_INTERVAL: Duration = Duration::from_secs(10);
/// Allowed clock difference for exp/nbf.
const LEEWAY: Duration = Duration::from_secs(30);
/// The asymmetric algorithms a ServiceAccount issuer may sign with.
pub(super) const ALGORITHMS: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Where the keys come from.
#[derive(Debug, Clone)]
pub enum JwksSource {
    /// A JWKS JSON file.
    File(PathBuf),
    /// An HTTPS URL (the issuer's `/openid/v1/jwks`).
    Url {
        /// The URL.
        url: String,
        /// The client trusting the API server's CA.
        client: Box<HttpsClient>,
        /// A bearer token file to send, if the endpoint needs one.
        token_file: Option<PathBuf>,
    },
}

/// Why the JWKS could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("JWKS from {source_name}: {reason}")]
pub struct JwksError {
    source_name: String,
    reason: String,
}

/// The offline ServiceAccount-token verifier.
pub struct K8sJwks {
    source: JwksSource,
    rules: Rules,
    td: TrustDomain,
    /// The one JWKS cache (`crate::jwt::KeyCache`), as the sidecar's.
    keys: KeyCache,
}

#[derive(Deserialize)]
struct K8sClaim {
    namespace: String,
    serviceaccount: NamedRef,
}

#[derive(Deserialize)]
struct NamedRef {
    name: String,
}

#[derive(Deserialize)]
struct IssOnly {
    iss: Option<String>,
}

impl K8sJwks {
    /// Loads the keys once (startup fails on a broken source).
    pub async fn new(
        source: JwksSource,
        issuer: String,
        audience: String,
        td: TrustDomain,
    ) -> Result<Self, JwksError> {
        let this = Self {
            source,
            rules: Rules {
                issuer: Some(issuer),
                audiences: vec![audience],
                algorithms: ALGORITHMS.to_vec(),
                typ: None,
                leeway: LEEWAY,
            },
            td,
            keys: KeyCache::new(REFETCH_MIN_INTERVAL),
        };
        let n = this.refresh().await?;
        tracing::info!(keys = n, source = %this.source_name(), "k8s-jwks: loaded service-account issuer keys");
        Ok(this)
    }

    fn source_name(&self) -> String {
        match &self.source {
            JwksSource::File(p) => p.display().to_string(),
            JwksSource::Url { url, .. } => url.clone(),
        }
    }

    /// Fetches the keys; replaces the current ones only with a non-empty,
    /// well-formed set. Returns how many keys are now in use.
    pub async fn refresh(&self) -> Result<usize, JwksError> {
        let mut failure = None;
        let fetch = async {
            match self.load().await {
                Ok(set) => Some(set),
                Err(e) => {
                    failure = Some(e);
                    None
                }
            }
        };
        self.keys.fetch(fetch).await;
        match failure {
            Some(e) => Err(e),
            None => Ok(self.keys.current().len()),
        }
    }

    /// Reads and parses the key set from the source.
    async fn load(&self) -> Result<KeySet, JwksError> {
        let err = |reason: String| JwksError {
            source_name: self.source_name(),
            reason,
        };
        let body = match &self.source {
            JwksSource::File(path) => tokio::fs::read(path)
                .await
                .map_err(|e| err(e.to_string()))?,
            JwksSource::Url {
                url,
                client,
                token_file,
            } => {
                let token = match token_file {
                    Some(f) => Some(
                        tokio::fs::read_to_string(f)
                            .await
                            .map_err(|e| err(format!("{}: {e}", f.display())))?,
                    ),
                    None => None,
                };
                let resp = client
                    .send(url, token.as_deref().map(str::trim), None)
                    .await
                    .map_err(|e| err(e.to_string()))?;
                if !resp.status.is_success() {
                    return Err(err(format!("HTTP {}", resp.status)));
                }
                resp.body.to_vec()
            }
        };
        KeySet::parse(&body).map_err(|e| err(e.to_string()))
    }

    /// Whether the token's (unverified) `iss` is this verifier's issuer; used
    /// only to route a token, never to trust it.
    pub fn claims_issuer(&self, token: &str) -> bool {
        token
            .split('.')
            .nth(1)
            .and_then(|p| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(p)
                    .ok()
            })
            .and_then(|b| serde_json::from_slice::<IssOnly>(&b).ok())
            .and_then(|c| c.iss)
            .is_some_and(|iss| self.rules.issuer.as_deref() == Some(iss.as_str()))
    }

    /// Verifies a projected ServiceAccount token (the one JWT verifier,
    /// [`crate::jwt`]) and maps it to `spiffe://<td>/ns/<namespace>/sa/<name>`.
    pub async fn verify(&self, token: &str) -> Result<SpiffeId, AuthnError> {
        let reject = |reason, detail: String| AuthnError::rejected(NAME, reason, detail);
        let refused = |e: TokenError| reject(e.reason(), format!("token refused: {e}"));
        let peeked = jwt::peek(token, &self.rules).map_err(refused)?;
        if peeked.kid.is_none() {
            return Err(reject("unknown_kid", "token has no kid".into()));
        }
        let now = unix_now();
        let seen = self.keys.current();
        let verified = match jwt::verify(token, &peeked, &self.rules, &seen, now) {
            Err(TokenError::UnknownKid) if self.keys.refetch(&seen, || self.reload()).await => {
                jwt::verify(token, &peeked, &self.rules, &self.keys.current(), now)
            }
            other => other,
        }
        .map_err(refused)?;
        let sub = verified
            .sub
            .as_deref()
            .ok_or_else(|| reject("missing_claim", "no sub".into()))?;
        let k8s: K8sClaim = verified
            .claims
            .get("kubernetes.io")
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .ok_or_else(|| reject("missing_claim", "no kubernetes.io claim".into()))?;
        let want_sub = format!(
            "system:serviceaccount:{}:{}",
            k8s.namespace, k8s.serviceaccount.name
        );
        if sub != want_sub {
            return Err(reject(
                "malformed",
                format!("sub {sub:?} does not match the kubernetes.io claim"),
            ));
        }
        SpiffeId::for_service_account(&self.td, &k8s.namespace, &k8s.serviceaccount.name)
            .map_err(|e| reject("malformed", format!("namespace/service account: {e}")))
    }

    /// The key set for an unknown-`kid` refetch; a failure is logged and
    /// keeps the last keys.
    async fn reload(&self) -> Option<KeySet> {
        match self.load().await {
            Ok(set) => Some(set),
            Err(e) => {
                tracing::warn!(error = %e, "k8s-jwks: refresh after an unknown kid failed; keeping the last keys");
                None
            }
        }
    }
}

/// Seconds since the epoch.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests;
