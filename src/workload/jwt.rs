//! JWT-SVIDs for the Workload API: minted by the CA (`SignJwtSvid`) with the
//! sidecar's own credential, verified here against the CA's JWK set (the
//! one the trust bundle stream carries).

use std::path::PathBuf;
use std::time::Duration;

use jsonwebtoken::{jwk::JwkSet, Algorithm, DecodingKey, Validation};
use stepmesh_ca::client::CaClient;
use stepmesh_ca::spiffe_id::{SpiffeId, TrustDomain};
use tokio::sync::OnceCell;

/// Clock skew allowed on `exp` (tokens live 5 minutes at most).
const LEEWAY: Duration = Duration::from_secs(5);

/// Mints JWT-SVIDs at the CA, as the sidecar: the same CA, bundle and token
/// file the identity source uses. Connects on first use.
pub struct JwtMinter {
    addr: String,
    ca_bundle: PathBuf,
    token_file: PathBuf,
    trust_domain: TrustDomain,
    client: OnceCell<CaClient>,
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
        }
    }

    /// A JWT-SVID for `audience` (the token itself; never log it).
    pub async fn mint(&self, audience: &[String]) -> Result<(String, String), MintError> {
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
        Ok((jwt.spiffe_id, jwt.token))
    }
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
