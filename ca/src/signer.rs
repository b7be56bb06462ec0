//! Leaf issuance: turns a checked CSR and a proven identity into an
//! X.509-SVID. The identity always comes from the credential; the CSR only
//! contributes its public key (and may, at most, repeat the same identity).

use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType,
    SerialNumber, SubjectPublicKeyInfo,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use time::OffsetDateTime;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

use crate::spiffe_id::SpiffeId;
use crate::store::Authority;

/// notBefore is set this far in the past, for peers whose clocks lag.
pub const BACKDATE: Duration = Duration::from_secs(60);
/// The smallest RSA modulus accepted.
pub const MIN_RSA_BITS: usize = 2048;

/// Why a CSR cannot be signed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    /// Not PEM, or not a PKCS#10 structure.
    #[error("malformed CSR: {0}")]
    Malformed(String),
    /// The CSR's self-signature does not verify.
    #[error(
        "CSR signature does not verify (the requester must sign it with the key it certifies)"
    )]
    BadSignature,
    /// A key type or size the CA does not sign.
    #[error("unsupported key: {0}")]
    UnsupportedKey(String),
    /// The CSR asks for an identity other than the one proven.
    #[error("CSR asks for {asked}, but the credential proves {proven}")]
    IdentityMismatch {
        /// The URI SAN(s) of the CSR.
        asked: String,
        /// The identity of the credential.
        proven: String,
    },
    /// A requested lifetime the CA will not grant.
    #[error("invalid ttl_seconds {0}: must be 0 (the default) or positive")]
    BadTtl(i64),
}

impl CsrError {
    /// A stable, low-cardinality label for metrics and audit lines.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed_csr",
            Self::BadSignature => "bad_csr_signature",
            Self::UnsupportedKey(_) => "unsupported_key",
            Self::IdentityMismatch { .. } => "identity_mismatch",
            Self::BadTtl(_) => "bad_ttl",
        }
    }
}

/// Why signing failed on the CA's side.
#[derive(Debug, thiserror::Error)]
#[error("signing failed: {0}")]
pub struct SignError(#[from] rcgen::Error);

/// A parsed CSR whose self-signature and key were checked.
#[derive(Debug)]
pub struct Csr {
    spki: SubjectPublicKeyInfo,
    uri_sans: Vec<String>,
    key_type: &'static str,
}

impl Csr {
    /// Parses and checks a PEM CSR: structure, key policy (ECDSA P-256,
    /// Ed25519, RSA ≥ 2048), then the self-signature.
    pub fn from_pem(pem: &str) -> Result<Self, CsrError> {
        let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| CsrError::Malformed(format!("no PEM CERTIFICATE REQUEST block ({e})")))?;
        Self::from_der(der.as_ref())
    }

    /// As [`Csr::from_pem`], from DER.
    pub fn from_der(der: &[u8]) -> Result<Self, CsrError> {
        let (rest, csr) = X509CertificationRequest::from_der(der)
            .map_err(|e| CsrError::Malformed(format!("not a PKCS#10 request: {e}")))?;
        if !rest.is_empty() {
            return Err(CsrError::Malformed(
                "trailing bytes after the request".into(),
            ));
        }
        let info = &csr.certification_request_info;
        let key_type = key_type(&info.subject_pki)?;
        csr.verify_signature().map_err(|_| CsrError::BadSignature)?;
        let spki = SubjectPublicKeyInfo::from_der(info.subject_pki.raw)
            .map_err(|e| CsrError::UnsupportedKey(e.to_string()))?;
        let mut uri_sans = Vec::new();
        for ext in csr.requested_extensions().into_iter().flatten() {
            if let ParsedExtension::SubjectAlternativeName(san) = ext {
                uri_sans.extend(san.general_names.iter().filter_map(|n| match n {
                    GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                }));
            }
        }
        Ok(Self {
            spki,
            uri_sans,
            key_type,
        })
    }

    /// `ECDSA P-256`, `Ed25519` or `RSA <bits>`.
    pub fn key_type(&self) -> &'static str {
        self.key_type
    }

    /// Checks the CSR asks for nothing but `proven` (asking for nothing is fine).
    pub fn check_identity(&self, proven: &SpiffeId) -> Result<(), CsrError> {
        match self.uri_sans.as_slice() {
            [] => Ok(()),
            [one] if one == proven.as_str() => Ok(()),
            asked => Err(CsrError::IdentityMismatch {
                asked: asked.join(", "),
                proven: proven.to_string(),
            }),
        }
    }
}

/// What kind of public key a SubjectPublicKeyInfo holds: the one reading
/// of key types, for the CSR key policy here and `stepmesh cert inspect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyKind {
    /// ECDSA on P-256.
    EcP256,
    /// ECDSA on P-384.
    EcP384,
    /// ECDSA on another named curve (its OID).
    EcCurve(String),
    /// ECDSA without a named curve.
    EcUnnamed,
    /// Ed25519.
    Ed25519,
    /// RSA of this many bits.
    Rsa(usize),
    /// Anything else (the algorithm's OID).
    Other(String),
}

impl KeyKind {
    /// Reads the key type of `spki`.
    pub fn of(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> KeyKind {
        let alg = &spki.algorithm.algorithm;
        if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok());
            return match curve {
                Some(c) if c == OID_EC_P256 => KeyKind::EcP256,
                Some(c) if c == OID_NIST_EC_P384 => KeyKind::EcP384,
                Some(c) => KeyKind::EcCurve(c.to_id_string()),
                None => KeyKind::EcUnnamed,
            };
        }
        if *alg == OID_SIG_ED25519 {
            return KeyKind::Ed25519;
        }
        match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => KeyKind::Rsa(rsa.key_size()),
            _ => KeyKind::Other(alg.to_id_string()),
        }
    }
}

impl std::fmt::Display for KeyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyKind::EcP256 => f.write_str("ECDSA P-256"),
            KeyKind::EcP384 => f.write_str("ECDSA P-384"),
            KeyKind::EcCurve(oid) => write!(f, "ECDSA ({oid})"),
            KeyKind::EcUnnamed => f.write_str("ECDSA"),
            KeyKind::Ed25519 => f.write_str("Ed25519"),
            KeyKind::Rsa(bits) => write!(f, "RSA {bits}"),
            KeyKind::Other(oid) => write!(f, "unknown ({oid})"),
        }
    }
}

/// The CSR key policy: ECDSA P-256, Ed25519 or RSA of at least
/// `MIN_RSA_BITS`; the audit label of an accepted key.
fn key_type(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Result<&'static str, CsrError> {
    match KeyKind::of(spki) {
        KeyKind::EcP256 => Ok("ECDSA P-256"),
        KeyKind::EcP384 => Err(CsrError::UnsupportedKey(
            "EC curve P-384 (only P-256 is accepted)".into(),
        )),
        KeyKind::EcCurve(c) => Err(CsrError::UnsupportedKey(format!(
            "EC curve {c} (only P-256 is accepted)"
        ))),
        KeyKind::EcUnnamed => Err(CsrError::UnsupportedKey(
            "EC key without a named curve".into(),
        )),
        KeyKind::Ed25519 => Ok("Ed25519"),
        KeyKind::Rsa(bits) if bits < MIN_RSA_BITS => Err(CsrError::UnsupportedKey(format!(
            "RSA key of {bits} bits (at least {MIN_RSA_BITS} required)"
        ))),
        KeyKind::Rsa(2048) => Ok("RSA 2048"),
        KeyKind::Rsa(3072) => Ok("RSA 3072"),
        KeyKind::Rsa(4096) => Ok("RSA 4096"),
        KeyKind::Rsa(_) => Ok("RSA"),
        KeyKind::Other(alg) => Err(CsrError::UnsupportedKey(format!(
            "key algorithm {alg} (accepted: ECDSA P-256, Ed25519, RSA >= 2048)"
        ))),
    }
}

/// A freshly issued SVID.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Leaf first, then the intermediate chain (never the root).
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's notAfter.
    pub not_after: SystemTime,
    /// The leaf's serial, lower-case hex.
    pub serial: String,
}

/// Signs leaves under the CA's issuing key, within its TTL policy.
pub struct Signer {
    authority: Authority,
    default_ttl: Duration,
    max_ttl: Duration,
}

impl Signer {
    /// A signer with `default_ttl` for requests asking none and `max_ttl` as cap.
    pub fn new(authority: Authority, default_ttl: Duration, max_ttl: Duration) -> Self {
        Self {
            authority,
            default_ttl: default_ttl.min(max_ttl),
            max_ttl,
        }
    }

    /// The lifetime a request of `ttl_seconds` gets: 0 = default, capped at
    /// the maximum.
    pub fn ttl_for(&self, ttl_seconds: i64) -> Result<Duration, CsrError> {
        match ttl_seconds {
            0 => Ok(self.default_ttl),
            s if s < 0 => Err(CsrError::BadTtl(s)),
            s => Ok(Duration::from_secs(s.unsigned_abs()).min(self.max_ttl)),
        }
    }

    /// Issues an X.509-SVID for `id` on the CSR's key.
    pub fn sign(&self, csr: &Csr, id: &SpiffeId, ttl: Duration) -> Result<Issued, SignError> {
        let now = SystemTime::now();
        let not_after = (now + ttl).min(self.authority.not_after);
        let serial = random_serial();
        let mut params = CertificateParams::default();
        // Empty subject: the identity is the URI SAN alone (marked critical).
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = OffsetDateTime::from(now - BACKDATE);
        params.not_after = OffsetDateTime::from(not_after);
        params.serial_number = Some(serial.clone());
        let leaf = params.signed_by(&csr.spki, &self.authority.issuer)?;
        let mut chain = Vec::with_capacity(1 + self.authority.chain_tail.len());
        chain.push(leaf.der().clone());
        chain.extend(self.authority.chain_tail.iter().cloned());
        // Certificates carry whole seconds.
        let secs = not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        Ok(Issued {
            chain,
            not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
            serial: crate::svid::serial_hex(serial.as_ref()),
        })
    }

    /// The issuing key and chain (for the CA's own serving certificate).
    pub fn authority(&self) -> &Authority {
        &self.authority
    }
}

/// A random 128-bit positive serial number (RFC 5280 allows up to 20 bytes).
pub fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // aws-lc's RNG fails only if the OS RNG is unusable; then no serial is safe.
    #[allow(clippy::expect_used)]
    aws_lc_rs::rand::fill(&mut bytes).expect("the system random number generator failed");
    // A leading 1 bit keeps all 128 bits significant; rcgen encodes it as a
    // positive INTEGER (with a 0x00 prefix).
    bytes[0] |= 0x80;
    SerialNumber::from_slice(&bytes)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn csr_for(alg: &'static rcgen::SignatureAlgorithm) -> String {
        let key = if alg == &rcgen::PKCS_RSA_SHA256 {
            rcgen::KeyPair::generate_rsa_for(alg, rcgen::RsaKeySize::_2048).unwrap()
        } else {
            rcgen::KeyPair::generate_for(alg).unwrap()
        };
        crate::client::make_csr(&key, None).unwrap()
    }

    #[test]
    fn key_policy() {
        let cases: [(&'static rcgen::SignatureAlgorithm, Result<&str, &str>); 4] = [
            (&rcgen::PKCS_ECDSA_P256_SHA256, Ok("ECDSA P-256")),
            (&rcgen::PKCS_ED25519, Ok("Ed25519")),
            (&rcgen::PKCS_RSA_SHA256, Ok("RSA 2048")),
            (&rcgen::PKCS_ECDSA_P384_SHA384, Err("only P-256")),
        ];
        for (alg, want) in cases {
            let got = Csr::from_pem(&csr_for(alg));
            match want {
                Ok(kind) => assert_eq!(got.unwrap().key_type(), kind),
                Err(needle) => {
                    let err = got.unwrap_err();
                    assert_eq!(err.reason(), "unsupported_key");
                    assert!(err.to_string().contains(needle), "{err}");
                }
            }
        }
    }

    #[test]
    fn identity_rules() {
        let key = rcgen::KeyPair::generate().unwrap();
        let me = SpiffeId::parse("spiffe://td/a").unwrap();
        let other = SpiffeId::parse("spiffe://td/b").unwrap();
        let none = Csr::from_pem(&crate::client::make_csr(&key, None).unwrap()).unwrap();
        assert!(none.check_identity(&me).is_ok());
        let mine = Csr::from_pem(&crate::client::make_csr(&key, Some(&me)).unwrap()).unwrap();
        assert!(mine.check_identity(&me).is_ok());
        let err = mine.check_identity(&other).unwrap_err();
        assert_eq!(err.reason(), "identity_mismatch");
        assert!(
            err.to_string().contains("spiffe://td/a") && err.to_string().contains("spiffe://td/b")
        );
    }
}
