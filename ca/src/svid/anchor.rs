//! Which root a verified chain ends at, so a connection established under
//! one trust bundle can be re-checked against the next one without keeping
//! its peer's certificates: the chain stays valid as long as the root key
//! that signed its top certificate is still in the bundle.

use rustls_pki_types::CertificateDer;
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

/// The first 8 bytes of the SHA-256 of a root's SubjectPublicKeyInfo: small
/// enough to keep per connection, and roots are few and chosen by the
/// operator, so two of one bundle never share it by chance.
pub type AnchorKey = u64;

/// A root of a bundle as [`super::TrustBundle::anchor_of`] matches it.
#[derive(Debug, Clone)]
pub(super) struct RootKey {
    /// The DER of the root's subject Name.
    subject: Vec<u8>,
    /// The DER of its SubjectPublicKeyInfo (for a signature check when two
    /// roots share a name).
    spki: Vec<u8>,
    key: AnchorKey,
}

impl RootKey {
    /// `None` for bytes that are not a certificate (a bundle's roots were
    /// parsed as trust anchors already).
    pub(super) fn of(root: &CertificateDer<'_>) -> Option<RootKey> {
        let (_, cert) = X509Certificate::from_der(root).ok()?;
        Some(RootKey {
            subject: cert.subject().as_raw().to_vec(),
            spki: cert.public_key().raw.to_vec(),
            key: key_of(cert.public_key().raw),
        })
    }
}

fn key_of(spki: &[u8]) -> AnchorKey {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, spki);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    u64::from_be_bytes(first)
}

/// The key of the root in `roots` that `chain` (verified against these
/// roots already) ends at; `None` if none fits (the bundle changed since).
///
/// The walk starts at the leaf and follows each certificate's issuer, as
/// path building does: certificates the peer sent past the path are not
/// read. (Taken from the last certificate sent, a peer under an old root
/// that appended the public new root was recorded under the new one, and
/// kept its connections when the old root was removed.)
pub(super) fn anchor_of(roots: &[RootKey], chain: &[CertificateDer<'_>]) -> Option<AnchorKey> {
    let parsed: Vec<X509Certificate<'_>> = chain
        .iter()
        .map(|c| X509Certificate::from_der(c).ok().map(|(_, cert)| cert))
        .collect::<Option<_>>()?;
    let mut cert = parsed.first()?;
    // Each step goes one certificate up; a path is no longer than the chain.
    for _ in 0..parsed.len() {
        let issuer = cert.issuer().as_raw();
        let mut named = roots.iter().filter(|r| r.subject == issuer);
        if let Some(first) = named.next() {
            if named.next().is_none() {
                // Path building matches anchors by name: with one root of
                // that name, a path verified against these roots ends at it.
                return Some(first.key);
            }
            // Several roots share the name (a root re-keyed under the same
            // name): the signature tells which one signed.
            return roots.iter().filter(|r| r.subject == issuer).find_map(|r| {
                let (_, spki) = SubjectPublicKeyInfo::from_der(&r.spki).ok()?;
                cert.verify_signature(Some(&spki)).ok().map(|()| r.key)
            });
        }
        // An intermediate the peer sent: the one of that name (by name, as
        // for roots: no signature check on every handshake), or, with
        // several of that name, the one that signed.
        let mut named = parsed[1..]
            .iter()
            .filter(|up| up.subject().as_raw() == issuer);
        let first = named.next()?;
        cert = match named.next() {
            None => first,
            Some(_) => parsed[1..].iter().find(|up| {
                up.subject().as_raw() == issuer
                    && cert.verify_signature(Some(up.public_key())).is_ok()
            })?,
        };
    }
    None
}

/// Whether `key` is one of `roots`.
pub(super) fn trusts(roots: &[RootKey], key: AnchorKey) -> bool {
    roots.iter().any(|r| r.key == key)
}
