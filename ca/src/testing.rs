//! A run-time PKI for tests (cargo feature `testing`): a root, an
//! intermediate, and leaf SVIDs with any defect the SPIFFE rules forbid.
//!
//! Everything is made fresh with rcgen on each call; nothing is checked in.
//!
//! ```
//! use stepmesh_ca::testing::{Defect, Pki};
//! let pki = Pki::new("td");
//! let leaf = pki.leaf("spiffe://td/ns/a/sa/b");
//! let now = rustls_pki_types::UnixTime::now();
//! assert!(stepmesh_ca::svid::verify(&leaf.chain, &pki.bundle(), now).is_ok());
//! let bad = pki.leaf_with("spiffe://td/ns/a/sa/b", Defect::Expired);
//! assert!(stepmesh_ca::svid::verify(&bad.chain, &pki.bundle(), now).is_err());
//! ```

#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::time::SystemTime;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

use crate::spiffe_id::TrustDomain;
use crate::svid::TrustBundle;

/// What is wrong with a generated leaf (or [`Defect::None`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Defect {
    /// A valid SVID.
    None,
    /// notAfter an hour in the past.
    Expired,
    /// notBefore an hour in the future.
    NotYetValid,
    /// Two `spiffe://` URI SANs.
    TwoUriSans,
    /// One URI SAN, `https://...` instead of `spiffe://`.
    NonSpiffeUri,
    /// Only a DNS SAN, no URI SAN.
    NoUriSan,
    /// basicConstraints CA=true on the leaf.
    CaLeaf,
    /// keyCertSign in the leaf's key usage.
    KeyCertSign,
    /// Key usage without digitalSignature.
    NoDigitalSignature,
    /// Extended key usage codeSigning only (neither serverAuth nor clientAuth).
    CodeSigningOnly,
    /// The ID is moved to the trust domain `other.test`.
    OtherTrustDomain,
    /// The leaf signs itself instead of chaining to the intermediate.
    SelfSigned,
    /// The leaf chains to a fresh root that is not in the bundle.
    UnknownRoot,
}

/// A certificate authority (root or intermediate) that can sign.
pub struct TestCa {
    /// The CA's certificate, DER.
    pub cert: CertificateDer<'static>,
    /// The CA's certificate, PEM.
    pub cert_pem: String,
    /// The CA's private key, PKCS#8 PEM (for tests of intermediate mode).
    pub key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    fn root(td: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let params = ca_params(&format!("{td} test root {}", key_tag(&key)), td);
        let cert = params.self_signed(&key).unwrap();
        Self::from_parts(cert, key, params)
    }

    fn intermediate(td: &str, parent: &TestCa) -> Self {
        let key = KeyPair::generate().unwrap();
        let params = ca_params(&format!("{td} test intermediate {}", key_tag(&key)), td);
        let cert = params.signed_by(&key, &parent.issuer).unwrap();
        Self::from_parts(cert, key, params)
    }

    fn from_parts(cert: rcgen::Certificate, key: KeyPair, params: CertificateParams) -> Self {
        Self {
            cert: cert.der().clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        }
    }
}

/// A leaf certificate with its key and chain.
pub struct Leaf {
    /// The SPIFFE ID the leaf was made for (before any defect moved it).
    pub id: String,
    /// Leaf first, then the intermediate (when there is one).
    pub chain: Vec<CertificateDer<'static>>,
    /// `chain` as PEM.
    pub chain_pem: String,
    /// The leaf's private key, PKCS#8 PEM.
    pub key_pem: String,
    key_der: Vec<u8>,
}

impl Leaf {
    /// The leaf's private key, PKCS#8 DER (a fresh copy each call).
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    /// The leaf certificate alone.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }
}

/// A trust domain's PKI: root → intermediate → leaves.
pub struct Pki {
    /// The trust domain name.
    pub trust_domain: String,
    /// The root (the trust bundle).
    pub root: TestCa,
    /// The intermediate that signs leaves.
    pub intermediate: TestCa,
}

impl Pki {
    /// A fresh root and intermediate for `trust_domain`.
    pub fn new(trust_domain: &str) -> Self {
        let root = TestCa::root(trust_domain);
        let intermediate = TestCa::intermediate(trust_domain, &root);
        Self {
            trust_domain: trust_domain.to_owned(),
            root,
            intermediate,
        }
    }

    /// The trust bundle (the root alone).
    pub fn bundle(&self) -> TrustBundle {
        let td: TrustDomain = self.trust_domain.parse().unwrap();
        TrustBundle::new(td, vec![self.root.cert.clone()]).unwrap()
    }

    /// The trust bundle as PEM, the shape of `bundle.pem`.
    pub fn bundle_pem(&self) -> String {
        self.root.cert_pem.clone()
    }

    /// A valid leaf for `id`, valid from 5 minutes ago for an hour.
    pub fn leaf(&self, id: &str) -> Leaf {
        self.leaf_with(id, Defect::None)
    }

    /// A leaf for `id` with `defect`.
    pub fn leaf_with(&self, id: &str, defect: Defect) -> Leaf {
        let now = OffsetDateTime::now_utc();
        let (nb, na) = match defect {
            Defect::Expired => (now - Duration::hours(2), now - Duration::hours(1)),
            Defect::NotYetValid => (now + Duration::hours(1), now + Duration::hours(2)),
            _ => (now - Duration::minutes(5), now + Duration::hours(1)),
        };
        self.issue(id, defect, nb, na)
    }

    /// A valid leaf for `id` with an explicit validity window (rotation tests).
    pub fn leaf_valid(&self, id: &str, not_before: SystemTime, not_after: SystemTime) -> Leaf {
        self.issue(id, Defect::None, not_before.into(), not_after.into())
    }

    fn issue(
        &self,
        id: &str,
        defect: Defect,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let params = leaf_params(id, defect, not_before, not_after);
        let chain = match defect {
            Defect::SelfSigned => vec![params.self_signed(&key).unwrap().der().clone()],
            Defect::UnknownRoot => {
                let stranger = Pki::new(&self.trust_domain);
                let cert = params
                    .signed_by(&key, &stranger.intermediate.issuer)
                    .unwrap();
                vec![cert.der().clone(), stranger.intermediate.cert.clone()]
            }
            _ => {
                let cert = params.signed_by(&key, &self.intermediate.issuer).unwrap();
                vec![cert.der().clone(), self.intermediate.cert.clone()]
            }
        };
        Leaf {
            id: id.to_owned(),
            chain_pem: crate::pem::encode_certs(chain.iter().map(|c| c.as_ref())),
            chain,
            key_pem: key.serialize_pem(),
            key_der: key.serialize_der(),
        }
    }
}

fn ca_params(common_name: &str, td: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = name(common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.subject_alt_names = vec![SanType::URI(format!("spiffe://{td}").try_into().unwrap())];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(365);
    params.use_authority_key_identifier_extension = true;
    params
}

fn leaf_params(
    id: &str,
    defect: Defect,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = name("stepmesh test leaf");
    params.not_before = not_before;
    params.not_after = not_after;
    params.use_authority_key_identifier_extension = true;
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let uri = |s: &str| SanType::URI(s.try_into().unwrap());
    params.subject_alt_names = match defect {
        Defect::TwoUriSans => vec![uri(id), uri(&format!("{id}-second"))],
        Defect::NonSpiffeUri => vec![uri("https://example.test/workload")],
        Defect::NoUriSan => vec![SanType::DnsName(
            "workload.example.test".try_into().unwrap(),
        )],
        Defect::OtherTrustDomain => {
            let path = id.splitn(4, '/').nth(3).unwrap_or("x");
            vec![uri(&format!("spiffe://other.test/{path}"))]
        }
        _ => vec![uri(id)],
    };
    match defect {
        Defect::CaLeaf => params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained),
        Defect::KeyCertSign => params.key_usages.push(KeyUsagePurpose::KeyCertSign),
        Defect::NoDigitalSignature => params.key_usages = vec![KeyUsagePurpose::KeyEncipherment],
        Defect::CodeSigningOnly => {
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
        }
        _ => params.is_ca = IsCa::ExplicitNoCa,
    }
    params
}

/// A short tag from the public key, so two generated CAs never share a name
/// (same-named CAs would make "unknown root" look like "bad signature").
fn key_tag(key: &KeyPair) -> String {
    let raw = key.public_key_raw();
    raw[raw.len() - 4..]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}
