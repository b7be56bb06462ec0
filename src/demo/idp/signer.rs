//! The identity provider's key: an ES256 key made at start, its JWKS, and
//! the signing of every token it issues (the demo's step-up tokens and the
//! OIDC ID tokens).

use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

use super::IdpError;

/// An ES256 key, its `kid` and its JWKS document.
pub(super) struct Signer {
    kid: String,
    key: EncodingKey,
    jwks: String,
}

impl Signer {
    /// A new P-256 key.
    pub(super) fn generate() -> Result<Signer, IdpError> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|e| IdpError::Key(e.to_string()))?;
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref())
            .map_err(|e| IdpError::Key(e.to_string()))?;
        // An uncompressed P-256 point: 0x04, then x and y of 32 bytes each.
        let point = pair.public_key().as_ref();
        if point.len() != 65 || point[0] != 4 {
            return Err(IdpError::Key(format!(
                "unexpected public key of {} bytes",
                point.len()
            )));
        }
        let kid = format!("demo-{:08x}", fastrand::u32(..));
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        }]})
        .to_string();
        Ok(Signer {
            kid,
            key: EncodingKey::from_ec_der(pkcs8.as_ref()),
            jwks,
        })
    }

    /// The JWKS document (one EC key).
    pub(super) fn jwks(&self) -> &str {
        &self.jwks
    }

    /// `claims` signed with ES256, the header naming the key's `kid`.
    pub(super) fn sign(&self, claims: &serde_json::Value) -> Result<String, IdpError> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        Ok(jsonwebtoken::encode(&header, claims, &self.key)?)
    }
}

/// Seconds since the Unix epoch.
pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `bytes` random bytes from the system's CSPRNG, base64url: device codes,
/// refresh and access tokens are bearer secrets.
pub(super) fn secret(bytes: usize) -> Result<String, IdpError> {
    let mut buf = vec![0u8; bytes];
    aws_lc_rs::rand::fill(&mut buf).map_err(|_| IdpError::Key("the system RNG failed".into()))?;
    Ok(URL_SAFE_NO_PAD.encode(buf))
}

/// A user code as RFC 8628 §6.1 suggests: 8 letters from an alphabet
/// without vowels (no words) or look-alikes, shown as `WDJB-MJHT`.
pub(super) fn user_code() -> Result<String, IdpError> {
    const ALPHABET: &[u8; 20] = b"BCDFGHJKLMNPQRSTVWXZ";
    let mut buf = [0u8; 8];
    aws_lc_rs::rand::fill(&mut buf).map_err(|_| IdpError::Key("the system RNG failed".into()))?;
    let mut code = String::with_capacity(9);
    for (i, b) in buf.iter().enumerate() {
        if i == 4 {
            code.push('-');
        }
        code.push(char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]));
    }
    Ok(code)
}
