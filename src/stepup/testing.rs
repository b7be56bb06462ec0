//! A test identity provider: an ES256 and an RS256 key made at run time, their
//! JWKS, and a minter for tokens with any header and claims (including the
//! malicious ones: `alg: none`, HMAC keyed with the public key). Used by the
//! tests, the benchmarks and `stepmesh demo`; its private keys never leave
//! the process except through [`TestIdp::es256_pkcs8_pem`] for foreign-library
//! tests.

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING, RSA_PKCS1_SHA256,
};
use aws_lc_rs::{hmac, rsa};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use serde_json::{json, Value};

/// Why a test token could not be made.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    /// Key generation or signing failed in the crypto library.
    #[error("crypto failure: {0}")]
    Crypto(&'static str),
    /// The header's `alg` is not one this minter signs with.
    #[error("cannot mint alg {0:?} (ES256, RS256, HS256 via mint_hs256, none)")]
    Alg(String),
}

/// Run-time key pairs of a fake OpenID provider.
pub struct TestIdp {
    issuer: String,
    es: EcdsaKeyPair,
    es_kid: String,
    rs: rsa::KeyPair,
    rs_kid: String,
}

impl std::fmt::Debug for TestIdp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys are never printed.
        f.debug_struct("TestIdp")
            .field("issuer", &self.issuer)
            .field("es_kid", &self.es_kid)
            .field("rs_kid", &self.rs_kid)
            .finish_non_exhaustive()
    }
}

impl TestIdp {
    /// New keys with kids `es-<n>`/`rs-<n>` (n random, so rotations differ).
    pub fn new(issuer: &str) -> Result<TestIdp, MintError> {
        let n = fastrand::u32(..);
        Self::with_kids(issuer, &format!("es-{n:08x}"), &format!("rs-{n:08x}"))
    }

    /// New keys with the given kids.
    pub fn with_kids(issuer: &str, es_kid: &str, rs_kid: &str) -> Result<TestIdp, MintError> {
        let es = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING)
            .map_err(|_| MintError::Crypto("P-256 key generation"))?;
        let rs = rsa::KeyPair::generate(rsa::KeySize::Rsa2048)
            .map_err(|_| MintError::Crypto("RSA key generation"))?;
        Ok(TestIdp {
            issuer: issuer.to_owned(),
            es,
            es_kid: es_kid.to_owned(),
            rs,
            rs_kid: rs_kid.to_owned(),
        })
    }

    /// The `iss` of this provider.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Kid of the ES256 key.
    pub fn es_kid(&self) -> &str {
        &self.es_kid
    }

    /// Kid of the RS256 key.
    pub fn rs_kid(&self) -> &str {
        &self.rs_kid
    }

    /// The public ES256 key as a JWK.
    pub fn es_jwk(&self) -> Value {
        // Uncompressed point: 0x04 || x (32) || y (32).
        let point = self.es.public_key().as_ref();
        json!({
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": self.es_kid,
            "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..65]),
        })
    }

    /// The public RS256 key as a JWK.
    pub fn rs_jwk(&self) -> Value {
        let public = self.rs.public_key();
        json!({
            "kty": "RSA", "use": "sig", "alg": "RS256", "kid": self.rs_kid,
            "n": B64.encode(public.modulus().big_endian_without_leading_zero()),
            "e": B64.encode(public.exponent().big_endian_without_leading_zero()),
        })
    }

    /// `{"keys": [es, rs]}`.
    pub fn jwks(&self) -> Value {
        json!({ "keys": [self.es_jwk(), self.rs_jwk()] })
    }

    /// The ES256 public key as SubjectPublicKeyInfo PEM (what an attacker
    /// would use as an HMAC secret).
    pub fn es_public_pem(&self) -> Result<String, MintError> {
        let der = self
            .es
            .public_key()
            .as_der()
            .map_err(|_| MintError::Crypto("public key DER"))?;
        Ok(pem("PUBLIC KEY", der.as_ref()))
    }

    /// The ES256 private key as PKCS#8 PEM, for tests that mint with a
    /// foreign library (PyJWT). Test keys only.
    pub fn es256_pkcs8_pem(&self) -> Result<String, MintError> {
        let der = self
            .es
            .to_pkcs8v1()
            .map_err(|_| MintError::Crypto("PKCS#8 export"))?;
        Ok(pem("PRIVATE KEY", der.as_ref()))
    }

    /// A token with this header and these claims, signed as the header's
    /// `alg` says (`ES256`, `RS256`; `none` gives an empty signature). `kid`
    /// is added for ES256/RS256 when the header has none.
    pub fn mint(&self, header: &Value, claims: &Value) -> Result<String, MintError> {
        let alg = header.get("alg").and_then(Value::as_str).unwrap_or("");
        let mut header = header.clone();
        let kid = match alg {
            "ES256" => Some(&self.es_kid),
            "RS256" => Some(&self.rs_kid),
            _ => None,
        };
        if let (Some(kid), Some(obj)) = (kid, header.as_object_mut()) {
            obj.entry("kid")
                .or_insert_with(|| Value::String(kid.clone()));
        }
        let input = signing_input(&header, claims);
        let sig = match alg {
            "ES256" => self
                .es
                .sign(&SystemRandom::new(), input.as_bytes())
                .map_err(|_| MintError::Crypto("ES256 sign"))?
                .as_ref()
                .to_vec(),
            "RS256" => {
                let mut sig = vec![0; self.rs.public_modulus_len()];
                self.rs
                    .sign(
                        &RSA_PKCS1_SHA256,
                        &SystemRandom::new(),
                        input.as_bytes(),
                        &mut sig,
                    )
                    .map_err(|_| MintError::Crypto("RS256 sign"))?;
                sig
            }
            "none" => Vec::new(),
            other => return Err(MintError::Alg(other.to_owned())),
        };
        Ok(format!("{input}.{}", B64.encode(sig)))
    }

    /// An ES256 token with default header.
    pub fn es256(&self, claims: &Value) -> Result<String, MintError> {
        self.mint(&json!({"alg": "ES256", "typ": "JWT"}), claims)
    }

    /// An RS256 token with default header.
    pub fn rs256(&self, claims: &Value) -> Result<String, MintError> {
        self.mint(&json!({"alg": "RS256", "typ": "JWT"}), claims)
    }
}

/// An HS256 token keyed with `secret` (the algorithm-confusion attack).
pub fn mint_hs256(secret: &[u8], header: &Value, claims: &Value) -> String {
    let input = signing_input(header, claims);
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), input.as_bytes());
    format!("{input}.{}", B64.encode(tag.as_ref()))
}

/// Claims every step-up token needs, valid for 10 minutes, authenticated now.
pub fn base_claims(issuer: &str, aud: &str, sub: &str) -> Value {
    let now = now();
    json!({"iss": issuer, "aud": aud, "sub": sub, "iat": now, "nbf": now - 5, "exp": now + 600, "auth_time": now})
}

/// Seconds since the epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn signing_input(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    )
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
