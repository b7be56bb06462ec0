//! A parsed JWKS: the usable signature keys of one issuer (a step-up
//! provider, the Kubernetes ServiceAccount issuer), and the lookup of the
//! key a token names. Keys meant for encryption, symmetric keys and
//! unsupported types are skipped; a set with no usable key is an error, so
//! an empty or broken answer can never replace good keys.

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};

/// Why a JWKS document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    /// Not JSON, or no `keys` array.
    #[error("not a JWKS document: {0}")]
    Malformed(String),
    /// Parsed, but no key can verify signatures.
    #[error("no usable signature keys in the JWKS")]
    Empty,
}

/// What kind of public key a JWK holds (its algorithm family and curve).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Rsa,
    P256,
    P384,
    Ed25519,
}

struct Key {
    kid: Option<String>,
    /// The JWK's own `alg`, when it pins one.
    alg: Option<String>,
    kind: Kind,
    key: DecodingKey,
}

/// The verification keys of a provider.
#[derive(Default)]
pub struct KeySet {
    keys: Vec<Key>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(
                self.keys
                    .iter()
                    .map(|k| k.kid.as_deref().unwrap_or("<no kid>")),
            )
            .finish()
    }
}

/// The outcome of looking up a token's key.
pub enum Lookup<'k> {
    /// Candidate keys (one for a kid; possibly several without one).
    Found(Vec<&'k DecodingKey>),
    /// The kid is not in the set (a refresh may help).
    UnknownKid,
    /// No key of the set can verify this algorithm.
    NoKeyForAlg,
}

impl KeySet {
    /// Parses a JWKS document, keeping the keys that can verify signatures.
    pub fn parse(bytes: &[u8]) -> Result<KeySet, JwksError> {
        let doc: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| JwksError::Malformed(e.to_string()))?;
        let list = doc
            .get("keys")
            .and_then(serde_json::Value::as_array)
            .ok_or_else(|| JwksError::Malformed("no \"keys\" array".into()))?;
        let mut keys = Vec::with_capacity(list.len());
        for value in list {
            // One odd key (an encryption key, a new kty) must not sink the set.
            let Ok(jwk) = serde_json::from_value::<Jwk>(value.clone()) else {
                continue;
            };
            if let Some(key) = usable(&jwk) {
                keys.push(key);
            }
        }
        if keys.is_empty() {
            return Err(JwksError::Empty);
        }
        Ok(KeySet { keys })
    }

    /// Number of usable keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there are none (only before the first good fetch).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The keys that may have signed a token with this `kid` and `alg`.
    pub fn find(&self, kid: Option<&str>, alg: Algorithm) -> Lookup<'_> {
        let fits = |k: &&Key| {
            kind_fits(k.kind, alg) && k.alg.as_deref().is_none_or(|a| a == alg_name(alg))
        };
        match kid {
            Some(kid) => match self.keys.iter().find(|k| k.kid.as_deref() == Some(kid)) {
                None => Lookup::UnknownKid,
                Some(k) if fits(&k) => Lookup::Found(vec![&k.key]),
                Some(_) => Lookup::NoKeyForAlg,
            },
            None => {
                let found: Vec<_> = self.keys.iter().filter(fits).map(|k| &k.key).collect();
                if found.is_empty() {
                    Lookup::NoKeyForAlg
                } else {
                    Lookup::Found(found)
                }
            }
        }
    }
}

fn usable(jwk: &Jwk) -> Option<Key> {
    // `jwt-svid`: a SPIFFE bundle's JWT-signing key (the trust domain and
    // bundle spec, §4.2.1), as our CA publishes its own; `x509-svid` and
    // `enc` keys never verify a token.
    let signs = |u: &PublicKeyUse| match u {
        PublicKeyUse::Signature => true,
        PublicKeyUse::Other(other) => other == "jwt-svid",
        _ => false,
    };
    if jwk
        .common
        .public_key_use
        .as_ref()
        .is_some_and(|u| !signs(u))
    {
        return None;
    }
    let kind = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Kind::Rsa,
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => Kind::P256,
            EllipticCurve::P384 => Kind::P384,
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => Kind::Ed25519,
        // Symmetric (`oct`) keys are never verification keys here.
        _ => return None,
    };
    let key = DecodingKey::from_jwk(jwk).ok()?;
    let alg = jwk
        .common
        .key_algorithm
        .and_then(|a| serde_json::to_value(a).ok())
        .and_then(|v| v.as_str().map(str::to_owned));
    Some(Key {
        kid: jwk.common.key_id.clone(),
        alg,
        kind,
        key,
    })
}

fn kind_fits(kind: Kind, alg: Algorithm) -> bool {
    use Algorithm::*;
    match alg {
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => kind == Kind::Rsa,
        ES256 => kind == Kind::P256,
        ES384 => kind == Kind::P384,
        EdDSA => kind == Kind::Ed25519,
        _ => false,
    }
}

/// The JOSE name of an algorithm.
pub fn alg_name(alg: Algorithm) -> &'static str {
    use Algorithm::*;
    match alg {
        HS256 => "HS256",
        HS384 => "HS384",
        HS512 => "HS512",
        ES256 => "ES256",
        ES384 => "ES384",
        RS256 => "RS256",
        RS384 => "RS384",
        RS512 => "RS512",
        PS256 => "PS256",
        PS384 => "PS384",
        PS512 => "PS512",
        EdDSA => "EdDSA",
        // A future variant: never on an allow-list we built.
        _ => "unsupported",
    }
}
