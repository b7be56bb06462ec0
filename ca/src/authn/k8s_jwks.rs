//! `k8s-jwks`: projected ServiceAccount tokens verified offline against the
//! cluster's service-account issuer keys (a JWKS file, or the issuer's
//! `/openid/v1/jwks` URL).
//!
//! Checks iss, aud, exp/nbf, an asymmetric algorithm that matches the key
//! (never `none`, never HMAC), and takes namespace and service account from
//! the `kubernetes.io` claim. Keys are refreshed on a schedule and on an
//! unknown `kid` (rate-limited); a failed or empty fetch keeps the last keys.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::http::HttpsClient;
use super::AuthnError;
use crate::spiffe_id::{SpiffeId, TrustDomain};

/// The verifier's name in audit lines and metrics.
pub const NAME: &str = "k8s-jwks";
/// Least time between two fetches caused by unknown `kid`s.
const REFETCH_MIN_INTERVAL: Duration = Duration::from_secs(10);
/// Allowed clock difference for exp/nbf.
const LEEWAY_SECS: u64 = 30;

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

struct Key {
    key: DecodingKey,
    alg: Algorithm,
}

/// The offline ServiceAccount-token verifier.
pub struct K8sJwks {
    source: JwksSource,
    issuer: String,
    audience: String,
    td: TrustDomain,
    keys: ArcSwap<HashMap<String, Key>>,
    /// When an unknown `kid` last caused a fetch (`None`: never).
    last_fetch: Mutex<Option<Instant>>,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<K8sClaim>,
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
struct RawHeader {
    alg: Option<String>,
    kid: Option<String>,
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
            issuer,
            audience,
            td,
            keys: ArcSwap::from_pointee(HashMap::new()),
            last_fetch: Mutex::new(None),
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
        let keys = parse_keys(&body).map_err(err)?;
        let n = keys.len();
        self.keys.store(keys.into());
        Ok(n)
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
            .is_some_and(|iss| iss == self.issuer)
    }

    /// Verifies a projected ServiceAccount token and maps it to
    /// `spiffe://<td>/ns/<namespace>/sa/<name>`.
    pub async fn verify(&self, token: &str) -> Result<SpiffeId, AuthnError> {
        let reject = |reason, detail: String| AuthnError::rejected(NAME, reason, detail);
        let header = raw_header(token).ok_or_else(|| reject("malformed", "not a JWT".into()))?;
        let alg_name = header.alg.unwrap_or_default();
        if alg_name.eq_ignore_ascii_case("none")
            || alg_name.starts_with("HS")
            || alg_name.is_empty()
        {
            return Err(reject(
                "alg_not_allowed",
                format!("algorithm {alg_name:?} is not allowed"),
            ));
        }
        let alg: Algorithm = alg_name
            .parse()
            .map_err(|_| reject("alg_not_allowed", format!("unknown algorithm {alg_name:?}")))?;
        let kid = header
            .kid
            .ok_or_else(|| reject("unknown_kid", "token has no kid".into()))?;
        if !self.keys.load().contains_key(&kid) {
            self.refetch_for_unknown_kid().await;
        }
        let keys = self.keys.load();
        let key = keys
            .get(&kid)
            .ok_or_else(|| reject("unknown_kid", format!("no issuer key with kid {kid:?}")))?;
        if key.alg != alg {
            return Err(reject(
                "alg_not_allowed",
                format!(
                    "token algorithm {alg:?} does not match key {kid:?} ({:?})",
                    key.alg
                ),
            ));
        }
        let mut validation = Validation::new(alg);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECS;
        let data = jsonwebtoken::decode::<Claims>(token, &key.key, &validation).map_err(|e| {
            let reason = match e.kind() {
                ErrorKind::ExpiredSignature => "expired",
                ErrorKind::ImmatureSignature => "not_yet_valid",
                ErrorKind::InvalidAudience => "wrong_audience",
                ErrorKind::InvalidIssuer => "wrong_issuer",
                ErrorKind::InvalidSignature => "bad_signature",
                ErrorKind::InvalidAlgorithm => "alg_not_allowed",
                ErrorKind::MissingRequiredClaim(_) => "missing_claim",
                _ => "malformed",
            };
            reject(reason, format!("token refused: {e}"))
        })?;
        let claims = data.claims;
        let k8s = claims
            .kubernetes
            .ok_or_else(|| reject("missing_claim", "no kubernetes.io claim".into()))?;
        let want_sub = format!(
            "system:serviceaccount:{}:{}",
            k8s.namespace, k8s.serviceaccount.name
        );
        if claims.sub != want_sub {
            return Err(reject(
                "malformed",
                format!(
                    "sub {:?} does not match the kubernetes.io claim",
                    claims.sub
                ),
            ));
        }
        SpiffeId::for_service_account(&self.td, &k8s.namespace, &k8s.serviceaccount.name)
            .map_err(|e| reject("malformed", format!("namespace/service account: {e}")))
    }

    async fn refetch_for_unknown_kid(&self) {
        {
            // The lock guards only the timestamp; no await while held.
            let Ok(mut last) = self.last_fetch.lock() else {
                return;
            };
            if last.is_some_and(|t| t.elapsed() < REFETCH_MIN_INTERVAL) {
                return;
            }
            *last = Some(Instant::now());
        }
        if let Err(e) = self.refresh().await {
            tracing::warn!(error = %e, "k8s-jwks: refresh after an unknown kid failed; keeping the last keys");
        }
    }
}

/// The usable keys of a JWKS document by `kid`; an error says why there are
/// none (not a JWKS, or no key that can verify a service-account token).
fn parse_keys(body: &[u8]) -> Result<HashMap<String, Key>, String> {
    let set: JwkSet = serde_json::from_slice(body).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut keys = HashMap::new();
    for jwk in &set.keys {
        if let Some((kid, key)) = usable_key(jwk) {
            keys.insert(kid, key);
        }
    }
    if keys.is_empty() {
        return Err("no usable signing key (RSA/EC/OKP with a kid)".into());
    }
    Ok(keys)
}

/// The `kid` and algorithm of each usable key of a JWKS document, as
/// [`K8sJwks::refresh`] would load them (sorted by `kid`). Public for the
/// fuzz targets in `fuzz/`; not a stable API.
#[doc(hidden)]
pub fn usable_keys(body: &[u8]) -> Result<Vec<(String, Algorithm)>, String> {
    let mut keys: Vec<_> = parse_keys(body)?
        .into_iter()
        .map(|(kid, key)| (kid, key.alg))
        .collect();
    keys.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(keys)
}

fn raw_header(token: &str) -> Option<RawHeader> {
    let part = token.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// A key usable for signature verification, with its algorithm: the JWK's
/// own `alg`, or the family default (RS256 for RSA, ES256 for P-256).
fn usable_key(jwk: &Jwk) -> Option<(String, Key)> {
    use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve};
    let kid = jwk.common.key_id.clone()?;
    if matches!(
        jwk.common.public_key_use,
        Some(jsonwebtoken::jwk::PublicKeyUse::Encryption)
    ) {
        return None;
    }
    let default_alg = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => Algorithm::ES256,
            EllipticCurve::P384 => Algorithm::ES384,
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
        // Symmetric keys never verify service-account tokens.
        _ => return None,
    };
    let alg = match jwk.common.key_algorithm {
        Some(a) => a.to_string().parse().ok()?,
        None => default_alg,
    };
    if matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
        return None;
    }
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some((kid, Key { key, alg }))
}

#[cfg(test)]
mod tests;
