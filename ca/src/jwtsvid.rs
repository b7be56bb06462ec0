//! JWT-SVIDs: the CA's own ES256 key (kept in `<state-dir>/jwt-svid-key.pem`,
//! 0600, made at the first start), the tokens it signs for a proven
//! identity, and the JWK set that verifies them, published with the trust
//! bundle. Lifetimes are short (5 minutes at most): a JWT-SVID is a bearer
//! token.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::KeyPair;

use crate::spiffe_id::SpiffeId;

/// Longest (and default) JWT-SVID lifetime.
pub const MAX_TTL: Duration = Duration::from_secs(300);
/// Most audiences one token may name.
const MAX_AUDIENCES: usize = 16;
const KEY_FILE: &str = "jwt-svid-key.pem";

/// Why a JWT-SVID was not minted.
#[derive(Debug, thiserror::Error)]
pub enum JwtSvidError {
    /// The key file could not be read, made or used.
    #[error("JWT-SVID key {path}: {reason}")]
    Key {
        /// `<state-dir>/jwt-svid-key.pem`.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The request names no audience, too many, or an empty one.
    #[error("audience: {0}")]
    Audience(&'static str),
    /// Signing failed.
    #[error("signing: {0}")]
    Sign(String),
}

/// The CA's JWT-SVID signer and the JWK set of its key.
pub struct JwtSigner {
    key: EncodingKey,
    kid: String,
    jwks_json: String,
}

impl std::fmt::Debug for JwtSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JwtSigner(kid {}, <key redacted>)", self.kid)
    }
}

/// A minted JWT-SVID.
#[derive(Debug, Clone)]
pub struct MintedJwt {
    /// JWS compact serialization.
    pub token: String,
    /// Its `exp`.
    pub expires_at: SystemTime,
}

impl JwtSigner {
    /// Loads the key from `state_dir`, making (and writing, 0600) one on the
    /// first start. Blocking: call off the runtime.
    pub fn load_or_create(state_dir: &Path) -> Result<Self, JwtSvidError> {
        let path = state_dir.join(KEY_FILE);
        let err = |reason: String| JwtSvidError::Key {
            path: path.display().to_string(),
            reason,
        };
        let pair = match std::fs::read_to_string(&path) {
            Ok(pem) => KeyPair::from_pem(&pem).map_err(|e| err(e.to_string()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let pair = KeyPair::generate().map_err(|e| err(e.to_string()))?;
                crate::store::write_atomic(&path, pair.serialize_pem().as_bytes(), 0o600)
                    .map_err(|e| err(e.to_string()))?;
                pair
            }
            Err(e) => return Err(err(e.to_string())),
        };
        Self::from_key_pair(&pair).map_err(err)
    }

    /// A signer for an ECDSA P-256 key pair.
    pub fn from_key_pair(pair: &KeyPair) -> Result<Self, String> {
        let raw = pair.public_key_raw();
        // Uncompressed P-256 point: 0x04, X (32 bytes), Y (32 bytes).
        if raw.len() != 65 || raw[0] != 0x04 {
            return Err("not an ECDSA P-256 key".into());
        }
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let kid = b64(&aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, raw).as_ref()[..16]);
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "x": b64(&raw[1..33]), "y": b64(&raw[33..]),
            "kid": kid, "alg": "ES256", "use": "jwt-svid",
        }]});
        let key = EncodingKey::from_ec_der(&pair.serialize_der());
        Ok(Self {
            key,
            kid,
            jwks_json: jwks.to_string(),
        })
    }

    /// The JWK set verifying this signer's tokens.
    pub fn jwks_json(&self) -> &str {
        &self.jwks_json
    }

    /// The lifetime for a requested `ttl_seconds` (0 or less: the maximum).
    pub fn ttl_for(ttl_seconds: i64) -> Duration {
        match ttl_seconds {
            s if s <= 0 => MAX_TTL,
            s => Duration::from_secs(s.unsigned_abs()).min(MAX_TTL),
        }
    }

    /// A JWT-SVID for `id`: `sub`, `aud`, `iat`, `exp`; header `kid`, ES256.
    pub fn mint(
        &self,
        id: &SpiffeId,
        audience: &[String],
        ttl: Duration,
    ) -> Result<MintedJwt, JwtSvidError> {
        if audience.is_empty() {
            return Err(JwtSvidError::Audience("at least one is needed"));
        }
        if audience.len() > MAX_AUDIENCES {
            return Err(JwtSvidError::Audience("more than 16"));
        }
        if audience.iter().any(|a| a.trim().is_empty()) {
            return Err(JwtSvidError::Audience("an empty one"));
        }
        let now = SystemTime::now();
        let expires_at = now + ttl;
        let secs = |t: SystemTime| {
            t.duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        };
        let claims = serde_json::json!({
            "sub": id.as_str(),
            "aud": audience,
            "iat": secs(now),
            "exp": secs(expires_at),
        });
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        header.typ = Some("JWT".into());
        let token = jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| JwtSvidError::Sign(e.to_string()))?;
        Ok(MintedJwt { token, expires_at })
    }
}
