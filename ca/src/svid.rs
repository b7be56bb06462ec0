//! X.509-SVID validation per the SPIFFE X509-SVID specification
//! (<https://github.com/spiffe/spiffe/blob/main/standards/X509-SVID.md>), and
//! the trust bundle a chain is validated against.
//!
//! The SPIFFE leaf rules are checked with x509-parser (so each failure gets a
//! precise reason); the chain itself is built and its signatures checked by
//! rustls-webpki, the same code rustls trusts.

use std::time::{Duration, SystemTime};

use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use webpki::{EndEntityCert, ExtendedKeyUsageValidator, KeyPurposeId, KeyPurposeIdIter};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::spiffe_id::{SpiffeId, SpiffeIdError, TrustDomain};

mod anchor;
pub use anchor::AnchorKey;

/// How far apart two clocks may be before a certificate counts as expired
/// or not yet valid.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Why a certificate chain is not a valid X.509-SVID of a trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    /// No certificate, or bytes that are not a certificate.
    #[error("malformed certificate: {0}")]
    Malformed(String),
    /// The SAN rule: exactly one URI SAN, a valid `spiffe://` ID with a path.
    #[error("bad SPIFFE SAN: {0}")]
    BadSan(String),
    /// The leaf is a CA certificate (basicConstraints CA=true).
    #[error("leaf certificate is a CA certificate")]
    NotALeaf,
    /// Key usage missing digitalSignature, or carrying keyCertSign/cRLSign.
    #[error("bad key usage: {0}")]
    BadKeyUsage(&'static str),
    /// Extended key usage present but allowing neither serverAuth nor clientAuth.
    #[error("extended key usage allows neither serverAuth nor clientAuth")]
    BadExtendedKeyUsage,
    /// Past notAfter (plus the skew allowance).
    #[error("certificate expired at {not_after} (unix seconds)")]
    Expired {
        /// The certificate's notAfter, Unix seconds.
        not_after: i64,
    },
    /// Before notBefore (minus the skew allowance).
    #[error("certificate not valid before {not_before} (unix seconds)")]
    NotYetValid {
        /// The certificate's notBefore, Unix seconds.
        not_before: i64,
    },
    /// The SPIFFE ID belongs to another trust domain than the bundle.
    #[error("SPIFFE ID {id} is not in trust domain {expected}")]
    WrongTrustDomain {
        /// The bundle's trust domain.
        expected: String,
        /// The ID the certificate carries.
        id: String,
    },
    /// The chain does not lead to a root of the bundle.
    #[error("certificate chain does not lead to a root of the trust bundle")]
    UnknownIssuer,
    /// A signature in the chain does not verify.
    #[error("bad signature in the certificate chain")]
    BadSignature,
    /// Any other chain failure rustls-webpki reports.
    #[error("invalid certificate chain: {0}")]
    InvalidChain(String),
}

impl SvidError {
    /// A stable, low-cardinality label for metrics and audit lines.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::BadSan(_) => "bad_san",
            Self::NotALeaf => "not_a_leaf",
            Self::BadKeyUsage(_) => "bad_key_usage",
            Self::BadExtendedKeyUsage => "bad_extended_key_usage",
            Self::Expired { .. } => "expired",
            Self::NotYetValid { .. } => "not_yet_valid",
            Self::WrongTrustDomain { .. } => "wrong_trust_domain",
            Self::UnknownIssuer => "unknown_issuer",
            Self::BadSignature => "bad_signature",
            Self::InvalidChain(_) => "invalid_chain",
        }
    }
}

/// Why a trust bundle could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    /// The PEM text holds no CERTIFICATE block.
    #[error("trust bundle holds no certificate")]
    Empty,
    /// A PEM block could not be decoded.
    #[error("trust bundle PEM is malformed: {0}")]
    Pem(String),
    /// A certificate cannot serve as a trust anchor.
    #[error("trust bundle certificate #{index} is not a usable root: {reason}")]
    BadRoot {
        /// Zero-based position in the bundle.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
}

/// The root certificates of one trust domain: what SVIDs of that domain must
/// chain to.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    trust_domain: TrustDomain,
    roots: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
    root_keys: Vec<anchor::RootKey>,
}

impl TrustBundle {
    /// A bundle from DER roots; each must parse as a trust anchor.
    pub fn new(
        trust_domain: TrustDomain,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, BundleError> {
        if roots.is_empty() {
            return Err(BundleError::Empty);
        }
        let anchors = roots
            .iter()
            .enumerate()
            .map(|(index, der)| {
                webpki::anchor_from_trusted_cert(der)
                    .map(|a| a.to_owned())
                    .map_err(|e| BundleError::BadRoot {
                        index,
                        reason: e.to_string(),
                    })
            })
            .collect::<Result<_, _>>()?;
        let root_keys = roots
            .iter()
            .enumerate()
            .map(|(index, der)| {
                anchor::RootKey::of(der).ok_or_else(|| BundleError::BadRoot {
                    index,
                    reason: "not an X.509 certificate".into(),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            trust_domain,
            roots,
            anchors,
            root_keys,
        })
    }

    /// A bundle from PEM text (one or more CERTIFICATE blocks; other blocks
    /// are ignored).
    pub fn from_pem(trust_domain: TrustDomain, pem: &str) -> Result<Self, BundleError> {
        let roots = crate::pem::decode_certs(pem.as_bytes()).map_err(BundleError::Pem)?;
        Self::new(trust_domain, roots)
    }

    /// The roots as PEM text, the format of `bundle.pem`.
    pub fn to_pem(&self) -> String {
        crate::pem::encode_certs(self.roots.iter().map(|c| c.as_ref()))
    }

    /// The trust domain these roots anchor.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The root certificates, DER.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The roots as webpki trust anchors (for rustls verifiers).
    pub fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }

    /// The root key that `chain`, already verified against this bundle,
    /// ends at (kept per connection: [`TrustBundle::trusts`] tells later
    /// whether a newer bundle still trusts it). `None` if no root fits.
    pub fn anchor_of(&self, chain: &[CertificateDer<'_>]) -> Option<AnchorKey> {
        anchor::anchor_of(&self.root_keys, chain)
    }

    /// Whether this bundle still has the root key a chain ended at.
    pub fn trusts(&self, key: AnchorKey) -> bool {
        anchor::trusts(&self.root_keys, key)
    }
}

/// What a valid SVID proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedSvid {
    /// The SPIFFE ID of the leaf's one URI SAN.
    pub id: SpiffeId,
    /// The leaf's notAfter.
    pub not_after: SystemTime,
    /// The leaf's serial number, lower-case hex without leading zeros.
    pub serial: String,
}

/// Validates `chain` (leaf first, then intermediates) as an X.509-SVID of
/// `bundle`'s trust domain at time `now`.
pub fn verify(
    chain: &[CertificateDer<'_>],
    bundle: &TrustBundle,
    now: UnixTime,
) -> Result<VerifiedSvid, SvidError> {
    let leaf_der = chain
        .first()
        .ok_or_else(|| SvidError::Malformed("empty certificate chain".into()))?;
    let (_, leaf) = X509Certificate::from_der(leaf_der)
        .map_err(|e| SvidError::Malformed(format!("leaf: {e}")))?;

    let id = leaf_spiffe_id(&leaf)?;
    check_leaf_usage(&leaf)?;
    let (not_before, not_after) = (
        leaf.validity().not_before.timestamp(),
        leaf.validity().not_after.timestamp(),
    );
    let at = check_validity(not_before, not_after, now)?;
    if id.trust_domain() != bundle.trust_domain() {
        return Err(SvidError::WrongTrustDomain {
            expected: bundle.trust_domain().to_string(),
            id: id.to_string(),
        });
    }

    let end_entity = EndEntityCert::try_from(leaf_der)
        .map_err(|e| SvidError::Malformed(format!("leaf: {e}")))?;
    end_entity
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            bundle.anchors(),
            &chain[1..],
            at,
            SvidEku,
            None,
            None,
        )
        .map_err(chain_error)?;

    Ok(VerifiedSvid {
        id,
        not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(not_after.max(0).unsigned_abs()),
        serial: serial_hex(leaf.raw_serial()),
    })
}

/// The one URI SAN of a leaf, as a workload SPIFFE ID (non-empty path).
pub fn leaf_spiffe_id(leaf: &X509Certificate<'_>) -> Result<SpiffeId, SvidError> {
    let san = leaf
        .subject_alternative_name()
        .map_err(|e| SvidError::Malformed(format!("subjectAltName: {e}")))?
        .ok_or_else(|| SvidError::BadSan("no subjectAltName extension".into()))?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(uri) => Some(*uri),
        _ => None,
    });
    let uri = uris
        .next()
        .ok_or_else(|| SvidError::BadSan("no URI SAN".into()))?;
    if uris.next().is_some() {
        return Err(SvidError::BadSan("more than one URI SAN".into()));
    }
    let id = SpiffeId::parse(uri).map_err(|e: SpiffeIdError| {
        SvidError::BadSan(format!("URI SAN {uri:?} is not a SPIFFE ID: {e}"))
    })?;
    if id.path().is_empty() {
        return Err(SvidError::BadSan(format!(
            "URI SAN {uri:?} names a trust domain, not a workload"
        )));
    }
    Ok(id)
}

/// Basic constraints and key usage rules for a leaf.
fn check_leaf_usage(leaf: &X509Certificate<'_>) -> Result<(), SvidError> {
    let bc = leaf
        .basic_constraints()
        .map_err(|e| SvidError::Malformed(format!("basicConstraints: {e}")))?;
    if bc.is_some_and(|bc| bc.value.ca) {
        return Err(SvidError::NotALeaf);
    }
    let ku = leaf
        .key_usage()
        .map_err(|e| SvidError::Malformed(format!("keyUsage: {e}")))?
        .ok_or(SvidError::BadKeyUsage("no keyUsage extension"))?;
    if !ku.value.digital_signature() {
        return Err(SvidError::BadKeyUsage("digitalSignature not set"));
    }
    if ku.value.key_cert_sign() {
        return Err(SvidError::BadKeyUsage("keyCertSign set on a leaf"));
    }
    if ku.value.crl_sign() {
        return Err(SvidError::BadKeyUsage("cRLSign set on a leaf"));
    }
    Ok(())
}

/// Checks validity with the skew allowance and returns the time at which
/// webpki should check the chain (`now`, pulled inside the leaf's window
/// when it is only outside by the allowed skew).
fn check_validity(not_before: i64, not_after: i64, now: UnixTime) -> Result<UnixTime, SvidError> {
    let now_s = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
    let skew = CLOCK_SKEW.as_secs() as i64;
    if now_s > not_after.saturating_add(skew) {
        return Err(SvidError::Expired { not_after });
    }
    if now_s < not_before.saturating_sub(skew) {
        return Err(SvidError::NotYetValid { not_before });
    }
    let clamped = now_s.clamp(not_before, not_after).max(0);
    Ok(UnixTime::since_unix_epoch(Duration::from_secs(
        clamped.unsigned_abs(),
    )))
}

fn chain_error(err: webpki::Error) -> SvidError {
    use webpki::Error as E;
    match err {
        E::UnknownIssuer => SvidError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => SvidError::BadSignature,
        E::CertExpired { .. } => SvidError::InvalidChain("an issuer certificate expired".into()),
        E::CertNotValidYet { .. } => {
            SvidError::InvalidChain("an issuer certificate is not yet valid".into())
        }
        E::CaUsedAsEndEntity => SvidError::NotALeaf,
        E::RequiredEkuNotFoundContext(_) => SvidError::BadExtendedKeyUsage,
        E::BadDer | E::BadDerTime | E::TrailingData(_) => SvidError::Malformed(format!("{err}")),
        other => SvidError::InvalidChain(format!("{other}")),
    }
}

/// Serial number bytes as lower-case hex without leading zero bytes.
pub fn serial_hex(raw: &[u8]) -> String {
    let trimmed = match raw.iter().position(|b| *b != 0) {
        Some(i) => &raw[i..],
        None => &raw[raw.len().saturating_sub(1)..],
    };
    trimmed.iter().map(|b| format!("{b:02x}")).collect()
}

/// SVIDs serve as both TLS client and server certificates: an EKU extension,
/// when present, must allow at least one of the two (or anyExtendedKeyUsage).
struct SvidEku;

const EKU_SERVER_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01];
const EKU_CLIENT_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02];
const EKU_ANY: &[u8] = &[0x55, 0x1d, 0x25, 0x00];

impl ExtendedKeyUsageValidator for SvidEku {
    fn validate(&self, iter: KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        let mut present = Vec::new();
        for id in iter {
            let id = id?;
            if [EKU_SERVER_AUTH, EKU_CLIENT_AUTH, EKU_ANY]
                .iter()
                .any(|want| KeyPurposeId::new(want) == id)
            {
                return Ok(());
            }
            present.push(id.to_decoded_oid());
        }
        if present.is_empty() {
            return Ok(());
        }
        Err(webpki::Error::RequiredEkuNotFoundContext(
            webpki::RequiredEkuNotFoundContext {
                required: webpki::KeyUsage::client_auth(),
                present,
            },
        ))
    }
}

#[cfg(test)]
mod tests;
