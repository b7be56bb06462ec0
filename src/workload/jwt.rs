//! JWT-SVIDs for the Workload API: minted by the CA (`SignJwtSvid`) with the
//! sidecar's own credential, verified here against the CA's JWK set (the
//! one the trust bundle stream carries).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use jsonwebtoken::{jwk::JwkSet, Algorithm, DecodingKey, Validation};
use stepmesh_ca::client::CaClient;
use stepmesh_ca::spiffe_id::{SpiffeId, TrustDomain};
use tokio::sync::OnceCell;

/// Clock skew allowed on `exp` (tokens live 5 minutes at most).
const LEEWAY: Duration = Duration::from_secs(5);

/// Audience sets whose tokens are kept at once; past it, the one closest
/// to its end goes.
const CACHED_AUDIENCES: usize = 64;

/// Mints JWT-SVIDs at the CA, as the sidecar: the same CA, bundle and token
/// file the identity source uses. Connects on first use. A token is
/// handed out again, to any caller asking for the same audiences, while
/// at least half its life is left (as SPIRE's agent does): an app that
/// asks per request (go-spiffe's `JWTSource` calls the Workload API each
/// time) costs the CA a signing per half-life, not one per request, and
/// cannot run out its identity's rate limit at the CA.
pub struct JwtMinter {
    addr: String,
    ca_bundle: PathBuf,
    token_file: PathBuf,
    trust_domain: TrustDomain,
    client: OnceCell<CaClient>,
    /// By audience set (sorted, each once).
    minted: Mutex<HashMap<Vec<String>, Minted>>,
    /// Held while a token is minted at the CA: callers that miss the
    /// cache together wait for one signing, not one each (the CA's
    /// bucket for JWT-SVIDs is the identity's, shared by all its pods).
    minting: tokio::sync::Mutex<()>,
}

/// A token the CA minted, and when it stops being handed out.
struct Minted {
    spiffe_id: String,
    token: String,
    /// Unix seconds: half-way from minting to `exp`.
    reuse_until: i64,
}

/// Why a JWT-SVID could not be minted.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    /// A file the sidecar reads could not be read or used.
    #[error("{0}")]
    Local(String),
    /// The CA refused or could not be reached.
    #[error("the CA: {0}")]
    Ca(#[from] stepmesh_ca::client::ClientError),
}

impl std::fmt::Debug for JwtMinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JwtMinter({})", self.addr)
    }
}

impl JwtMinter {
    /// A minter for the CA at `addr` (`--ca`), trusting `ca_bundle`, proving
    /// the pod's identity with `token_file`.
    pub fn new(addr: String, ca_bundle: PathBuf, token_file: PathBuf, td: TrustDomain) -> Self {
        Self {
            addr,
            ca_bundle,
            token_file,
            trust_domain: td,
            client: OnceCell::new(),
            minted: Mutex::default(),
            minting: tokio::sync::Mutex::new(()),
        }
    }

    /// A JWT-SVID for `audience` (the token itself; never log it): one
    /// minted for the same audiences while half its life is left, else a
    /// new one.
    pub async fn mint(&self, audience: &[String]) -> Result<(String, String), MintError> {
        let mut key = audience.to_vec();
        key.sort_unstable();
        key.dedup();
        if let Some(hit) = self.cached(&key) {
            return Ok(hit);
        }
        let _one = self.minting.lock().await;
        // Another caller may have minted it while this one waited.
        if let Some(hit) = self.cached(&key) {
            return Ok(hit);
        }
        let (spiffe_id, token, expires_at) = self.mint_at_ca(audience).await?;
        let now = unix_now();
        let mut cache = self.cache();
        cache.retain(|_, m| now < m.reuse_until);
        if cache.len() >= CACHED_AUDIENCES {
            let soonest = cache
                .iter()
                .min_by_key(|(_, m)| m.reuse_until)
                .map(|(k, _)| k.clone());
            if let Some(k) = soonest {
                cache.remove(&k);
            }
        }
        let minted = Minted {
            spiffe_id: spiffe_id.clone(),
            token: token.clone(),
            reuse_until: now + (expires_at - now) / 2,
        };
        cache.insert(key, minted);
        Ok((spiffe_id, token))
    }

    /// The token for `key` while half its life is left.
    fn cached(&self, key: &[String]) -> Option<(String, String)> {
        let now = unix_now();
        let cache = self.cache();
        let m = cache.get(key).filter(|m| now < m.reuse_until)?;
        Some((m.spiffe_id.clone(), m.token.clone()))
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<String>, Minted>> {
        // Each critical section is a lookup or an insert: never torn.
        self.minted.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new JWT-SVID from the CA: the ID, the token and its `exp`.
    async fn mint_at_ca(&self, audience: &[String]) -> Result<(String, String, i64), MintError> {
        let client = self
            .client
            .get_or_try_init(|| async {
                let pem = tokio::fs::read_to_string(&self.ca_bundle)
                    .await
                    .map_err(|e| MintError::Local(format!("--ca-bundle: {e}")))?;
                let client = CaClient::connect(&self.addr, &pem)?;
                Ok::<_, MintError>(client.expect_trust_domain(self.trust_domain.clone()))
            })
            .await?;
        let token = tokio::fs::read_to_string(&self.token_file)
            .await
            .map_err(|e| MintError::Local(format!("--token-file: {e}")))?;
        let jwt = client.sign_jwt_svid(token.trim(), audience, None).await?;
        Ok((jwt.spiffe_id, jwt.token, jwt.expires_at))
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Checks a JWT-SVID for `audience`: ES256 signature by a key of `jwks`
/// (found by `kid`), `aud` naming `audience`, `exp` (5 s of skew), and a
/// `sub` that is a SPIFFE ID of `td`. Answers the ID and every claim.
pub fn validate(
    token: &str,
    audience: &str,
    jwks: &str,
    td: &TrustDomain,
) -> Result<(SpiffeId, serde_json::Map<String, serde_json::Value>), String> {
    let header = jsonwebtoken::decode_header(token).map_err(|e| format!("malformed token: {e}"))?;
    if header.alg != Algorithm::ES256 {
        return Err(format!("algorithm {:?} is not accepted", header.alg));
    }
    let kid = header.kid.ok_or("the token names no key (kid)")?;
    let set: JwkSet = serde_json::from_str(jwks).map_err(|e| format!("JWK set: {e}"))?;
    let jwk = set
        .find(&kid)
        .ok_or("signed by a key the trust domain does not publish")?;
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("JWK set: {e}"))?;
    let mut rules = Validation::new(Algorithm::ES256);
    rules.leeway = LEEWAY.as_secs();
    rules.set_audience(&[audience]);
    rules.set_required_spec_claims(&["exp", "sub", "aud"]);
    let data =
        jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, &key, &rules)
            .map_err(|e| format!("token refused: {e}"))?;
    let sub = data
        .claims
        .get("sub")
        .and_then(|s| s.as_str())
        .unwrap_or("");
    let id = SpiffeId::parse(sub).map_err(|e| format!("subject: {e}"))?;
    if id.trust_domain() != td {
        return Err(format!("subject {id} is not of trust domain {td}"));
    }
    Ok((id, data.claims))
}

/// JSON claims as the protobuf `Struct` of `ValidateJWTSVIDResponse`.
pub fn to_struct(map: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
    }
}

fn to_value(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    use serde_json::Value as J;
    let kind = match v {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        J::String(s) => Kind::StringValue(s),
        J::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(to_value).collect(),
        }),
        J::Object(o) => Kind::StructValue(to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use stepmesh_ca::jwtsvid::JwtSigner;

    fn signer() -> (JwtSigner, rcgen::KeyPair) {
        let pair = rcgen::KeyPair::generate().unwrap();
        (JwtSigner::from_key_pair(&pair).unwrap(), pair)
    }

    fn td() -> TrustDomain {
        "mesh.test".parse().unwrap()
    }

    /// A token signed by `pair` with `kid` and any claims.
    fn forge(
        pair: &rcgen::KeyPair,
        kid: &str,
        alg: Algorithm,
        claims: serde_json::Value,
    ) -> String {
        let mut header = jsonwebtoken::Header::new(alg);
        header.kid = Some(kid.to_owned());
        let key = jsonwebtoken::EncodingKey::from_ec_der(&pair.serialize_der());
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    }

    #[test]
    fn a_jwt_svid_is_checked_for_key_audience_expiry_and_trust_domain() {
        let (ca, pair) = signer();
        let jwks = ca.jwks_json().to_owned();
        let kid: String = serde_json::from_str::<serde_json::Value>(&jwks).unwrap()["keys"][0]
            ["kid"]
            .as_str()
            .unwrap()
            .to_owned();
        let id = SpiffeId::parse("spiffe://mesh.test/ns/a/sa/b").unwrap();
        let aud = vec!["db".to_owned(), "queue".to_owned()];
        let token = ca.mint(&id, &aud, Duration::from_secs(60)).unwrap().token;
        let (got, claims) = validate(&token, "queue", &jwks, &td()).unwrap();
        assert_eq!(got, id);
        assert_eq!(claims["aud"], serde_json::json!(["db", "queue"]));

        let refused = |token: &str, aud: &str| validate(token, aud, &jwks, &td()).unwrap_err();
        assert!(
            refused(&token, "other").contains("InvalidAudience"),
            "{}",
            refused(&token, "other")
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims = |sub: &str, exp: u64| serde_json::json!({"sub": sub, "aud": "db", "exp": exp});
        let expired = forge(&pair, &kid, Algorithm::ES256, claims(id.as_str(), now - 30));
        assert!(
            refused(&expired, "db").contains("ExpiredSignature"),
            "{}",
            refused(&expired, "db")
        );
        let foreign = forge(
            &pair,
            &kid,
            Algorithm::ES256,
            claims("spiffe://other.test/x", now + 60),
        );
        assert!(refused(&foreign, "db").contains("not of trust domain"));
        // Another key claiming our kid: the signature fails.
        let (_, other) = signer();
        let forged = forge(
            &other,
            &kid,
            Algorithm::ES256,
            claims(id.as_str(), now + 60),
        );
        assert!(
            refused(&forged, "db").contains("InvalidSignature"),
            "{}",
            refused(&forged, "db")
        );
        // Another key under its own kid: not published.
        let (other_ca, _) = signer();
        let theirs = other_ca
            .mint(&id, &aud, Duration::from_secs(60))
            .unwrap()
            .token;
        assert!(refused(&theirs, "db").contains("does not publish"));
        assert!(refused("not.a.jwt", "db").contains("malformed"));
        let no_exp = forge(
            &pair,
            &kid,
            Algorithm::ES256,
            serde_json::json!({"sub": id.as_str(), "aud": "db"}),
        );
        assert!(
            refused(&no_exp, "db").contains("exp"),
            "{}",
            refused(&no_exp, "db")
        );
    }

    #[test]
    fn claims_become_a_protobuf_struct() {
        let map =
            serde_json::json!({"sub": "s", "aud": ["a"], "exp": 5, "x": {"y": null, "z": true}});
        let s = to_struct(map.as_object().unwrap().clone());
        use prost_types::value::Kind;
        assert_eq!(s.fields["sub"].kind, Some(Kind::StringValue("s".into())));
        assert_eq!(s.fields["exp"].kind, Some(Kind::NumberValue(5.0)));
        let Some(Kind::StructValue(x)) = &s.fields["x"].kind else {
            panic!()
        };
        assert_eq!(x.fields["z"].kind, Some(Kind::BoolValue(true)));
    }
}
