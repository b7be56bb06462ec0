//! Verifying a JWT against one issuer's [`Rules`] (RFC 8725): the algorithm
//! is checked against the allow-list before anything else, the key comes
//! from the issuer's JWKS by `kid`, then iss, aud, exp, nbf with leeway and
//! optional `typ` pinning. What a caller requires beyond that (a step-up
//! route's acr/amr/binding, the CA's `kubernetes.io` claim) is checked by
//! the caller, so a verified token can be cached and reused.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::{Map, Value};

use super::keys::{alg_name, KeySet, Lookup};

/// Larger tokens are refused unparsed (headers are bounded anyway).
pub const MAX_TOKEN: usize = 16 * 1024;

/// What an issuer's tokens must satisfy: the one set of checks behind the
/// sidecar's step-up providers and the CA's ServiceAccount-token verifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// Expected `iss`; `None`: not checked (the mesh's JWT-SVIDs carry no
    /// `iss`: the key that signed them, the CA's own, is what vouches).
    pub issuer: Option<String>,
    /// Accepted `aud` values (any of).
    pub audiences: Vec<String>,
    /// Accepted signature algorithms (asymmetric only).
    pub algorithms: Vec<Algorithm>,
    /// Accepted `typ` header values, if pinned.
    pub typ: Option<Vec<String>>,
    /// Clock skew allowed on exp, nbf, iat and auth_time.
    pub leeway: std::time::Duration,
}

/// Why a token is not valid: each is a `401 invalid_token`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not three base64url parts of JSON, or a `crit` header.
    #[error("the token is malformed")]
    Malformed,
    /// `alg` is not in the issuer's list (`none` and HMAC never are), or
    /// the key the token names cannot verify it.
    #[error("the token's algorithm is not accepted")]
    AlgNotAllowed,
    /// `typ` is not one the provider pins.
    #[error("the token's type is not accepted")]
    WrongTyp,
    /// No key with the token's `kid`, even after a refresh.
    #[error("the token's signing key is unknown")]
    UnknownKid,
    /// No keys have been fetched from the provider yet.
    #[error("the provider's keys are not available")]
    NoKeys,
    /// The signature does not verify.
    #[error("the token's signature is invalid")]
    BadSignature,
    /// `exp` is past (beyond the leeway), or missing.
    #[error("the token has expired")]
    Expired,
    /// `nbf` or `iat` is in the future (beyond the leeway).
    #[error("the token is not valid yet")]
    NotYetValid,
    /// `iss` is not the provider's issuer.
    #[error("the token's issuer is not accepted")]
    WrongIssuer,
    /// No `aud` value is one of the provider's audiences.
    #[error("the token's audience is not accepted")]
    WrongAudience,
    /// `azp` is not the calling workload's SPIFFE ID.
    #[error("the token is bound to another workload (azp)")]
    AzpMismatch,
    /// `cnf.x5t#S256` is not the calling workload's certificate thumbprint.
    #[error("the token is bound to another certificate (cnf)")]
    CnfMismatch,
    /// `sub` is not a workload the route accepts (a JWT-SVID's SPIFFE ID).
    #[error("the token's subject is not accepted")]
    WrongSubject,
}

impl TokenError {
    /// A stable metric/log label.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Malformed => "malformed",
            TokenError::AlgNotAllowed => "alg_not_allowed",
            TokenError::WrongTyp => "wrong_typ",
            TokenError::UnknownKid => "unknown_kid",
            TokenError::NoKeys => "no_keys",
            TokenError::BadSignature => "bad_signature",
            TokenError::Expired => "expired",
            TokenError::NotYetValid => "not_yet_valid",
            TokenError::WrongIssuer => "wrong_issuer",
            TokenError::WrongAudience => "wrong_audience",
            TokenError::AzpMismatch => "azp_mismatch",
            TokenError::CnfMismatch => "cnf_mismatch",
            TokenError::WrongSubject => "wrong_subject",
        }
    }
}

/// The claims of a verified token that route requirements look at.
#[derive(Debug, Clone)]
pub struct VerifiedToken {
    /// `sub`, passed to the app as `x-stepup-sub`.
    pub sub: Option<String>,
    /// `exp` (seconds): the cache keeps the token until then.
    pub exp: u64,
    /// `acr`.
    pub acr: Option<String>,
    /// `amr` entries.
    pub amr: Vec<String>,
    /// `auth_time` (seconds).
    pub auth_time: Option<u64>,
    /// `azp`.
    pub azp: Option<String>,
    /// `cnf."x5t#S256"`.
    pub cnf_x5t: Option<String>,
    /// Every claim, for the route's generic `claims`.
    pub claims: Map<String, Value>,
}

/// The header fields read before any key is looked up.
#[derive(Debug)]
pub struct Peeked {
    /// `alg`, already checked against the provider's allow-list.
    pub alg: Algorithm,
    /// `kid`, when the header names one.
    pub kid: Option<String>,
}

/// Checks shape, algorithm allow-list and `typ`; returns alg and kid.
///
/// Public (with [`verify`]): the sidecar's providers, the CA's
/// ServiceAccount-token verifier and the fuzz targets all call it.
pub fn peek(token: &str, rules: &Rules) -> Result<Peeked, TokenError> {
    if token.len() > MAX_TOKEN || token.split('.').count() != 3 {
        return Err(TokenError::Malformed);
    }
    let head = token.split('.').next().ok_or(TokenError::Malformed)?;
    let raw = B64.decode(head).map_err(|_| TokenError::Malformed)?;
    let header: Map<String, Value> =
        serde_json::from_slice(&raw).map_err(|_| TokenError::Malformed)?;
    let alg_str = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or(TokenError::Malformed)?;
    // Allow-list by name first: `none`, HS256 and anything unknown stop here.
    let alg = *rules
        .algorithms
        .iter()
        .find(|a| alg_name(**a) == alg_str)
        .ok_or(TokenError::AlgNotAllowed)?;
    if header.contains_key("crit") {
        return Err(TokenError::Malformed);
    }
    if let Some(pinned) = &rules.typ {
        let typ = header
            .get("typ")
            .and_then(Value::as_str)
            .ok_or(TokenError::WrongTyp)?;
        if !pinned.iter().any(|p| same_media_type(p, typ)) {
            return Err(TokenError::WrongTyp);
        }
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(k)) => Some(k.clone()),
        Some(_) => return Err(TokenError::Malformed),
    };
    Ok(Peeked { alg, kid })
}

/// RFC 7515 §4.1.9: `typ` may omit the `application/` prefix; compared
/// case-insensitively.
fn same_media_type(a: &str, b: &str) -> bool {
    let strip = |s: &str| {
        let l = s.to_ascii_lowercase();
        l.strip_prefix("application/")
            .map(str::to_owned)
            .unwrap_or(l)
    };
    strip(a) == strip(b)
}

/// Verifies signature and standard claims with the key the token names.
pub fn verify(
    token: &str,
    peeked: &Peeked,
    rules: &Rules,
    keys: &KeySet,
    now: u64,
) -> Result<VerifiedToken, TokenError> {
    if keys.is_empty() {
        return Err(TokenError::NoKeys);
    }
    let candidates = match keys.find(peeked.kid.as_deref(), peeked.alg) {
        Lookup::Found(c) => c,
        Lookup::UnknownKid => return Err(TokenError::UnknownKid),
        // The key the token names cannot make this algorithm's signatures
        // (an ES384 token naming a P-256 key): an algorithm confusion.
        Lookup::NoKeyForAlg => return Err(TokenError::AlgNotAllowed),
    };
    let mut validation = Validation::new(peeked.alg);
    // Claims are checked below with our clock and leeway.
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    let mut last = TokenError::BadSignature;
    for key in candidates {
        match jsonwebtoken::decode::<Map<String, Value>>(token, key, &validation) {
            Ok(data) => return check_claims(data.claims, rules, now),
            Err(e) => {
                use jsonwebtoken::errors::ErrorKind;
                last = match e.kind() {
                    ErrorKind::InvalidSignature
                    | ErrorKind::InvalidEcdsaKey
                    | ErrorKind::InvalidRsaKey(_) => TokenError::BadSignature,
                    ErrorKind::InvalidAlgorithm => TokenError::AlgNotAllowed,
                    _ => TokenError::Malformed,
                }
            }
        }
    }
    Err(last)
}

/// The checks of [`verify`] that need no key, on a token whose signature
/// someone else checks (the CA's TokenReview verifier: the API server
/// holds the keys). They prove nothing about who sent it; they keep a
/// token that could never pass (malformed, an algorithm not allowed,
/// expired, for another audience or issuer) from costing that check.
pub fn check_unsigned(token: &str, rules: &Rules, now: u64) -> Result<(), TokenError> {
    peek(token, rules)?;
    let body = token.split('.').nth(1).ok_or(TokenError::Malformed)?;
    let raw = B64.decode(body).map_err(|_| TokenError::Malformed)?;
    let claims: Map<String, Value> =
        serde_json::from_slice(&raw).map_err(|_| TokenError::Malformed)?;
    check_claims(claims, rules, now).map(drop)
}

fn seconds(v: Option<&Value>) -> Option<Option<u64>> {
    match v {
        None => Some(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .or_else(|| {
                n.as_f64()
                    .filter(|f| *f >= 0.0 && f.is_finite())
                    .map(|f| f as u64)
            })
            .map(Some),
        Some(_) => None,
    }
}

fn check_claims(
    claims: Map<String, Value>,
    rules: &Rules,
    now: u64,
) -> Result<VerifiedToken, TokenError> {
    let leeway = rules.leeway.as_secs();
    let exp = seconds(claims.get("exp"))
        .ok_or(TokenError::Malformed)?
        .ok_or(TokenError::Expired)?;
    if now >= exp.saturating_add(leeway) {
        return Err(TokenError::Expired);
    }
    for name in ["nbf", "iat"] {
        let t = seconds(claims.get(name)).ok_or(TokenError::Malformed)?;
        if t.is_some_and(|t| t > now.saturating_add(leeway)) {
            return Err(TokenError::NotYetValid);
        }
    }
    if let Some(issuer) = &rules.issuer {
        if claims.get("iss").and_then(Value::as_str) != Some(issuer.as_str()) {
            return Err(TokenError::WrongIssuer);
        }
    }
    let aud_ok = match claims.get("aud") {
        Some(Value::String(a)) => rules.audiences.iter().any(|x| x == a),
        Some(Value::Array(list)) => list
            .iter()
            .filter_map(Value::as_str)
            .any(|a| rules.audiences.iter().any(|x| x == a)),
        _ => false,
    };
    if !aud_ok {
        return Err(TokenError::WrongAudience);
    }
    let string = |name: &str| claims.get(name).and_then(Value::as_str).map(str::to_owned);
    let amr = match claims.get("amr") {
        Some(Value::Array(list)) => list
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => Vec::new(),
    };
    let auth_time = seconds(claims.get("auth_time")).ok_or(TokenError::Malformed)?;
    let cnf_x5t = claims
        .get("cnf")
        .and_then(|c| c.get("x5t#S256"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    Ok(VerifiedToken {
        sub: string("sub"),
        exp,
        acr: string("acr"),
        amr,
        auth_time,
        azp: string("azp"),
        cnf_x5t,
        claims,
    })
}
