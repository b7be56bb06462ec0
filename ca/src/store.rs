//! The CA's signing material on disk: a root made on first start (or an
//! intermediate from an outside PKI), the trust bundle, and `bundle.pem`.
//!
//! Layout of `--state-dir` in root mode: `ca-key.pem` (PKCS#8, 0600),
//! `ca-cert.pem`, `bundle.pem` (what clients trust first) and, optionally,
//! `extra-roots.pem` an operator adds to publish a next root before a
//! rotation. All reads and writes here are blocking; callers run them on a
//! blocking thread.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::spiffe_id::TrustDomain;

/// Root key file name inside the state dir.
pub const KEY_FILE: &str = "ca-key.pem";
/// Root certificate file name inside the state dir.
pub const CERT_FILE: &str = "ca-cert.pem";
/// The published trust bundle inside the state dir.
pub const BUNDLE_FILE: &str = "bundle.pem";
/// Optional extra roots served beside the CA's own (root rotation).
pub const EXTRA_ROOTS_FILE: &str = "extra-roots.pem";

/// A root lives ten years.
const ROOT_LIFETIME_DAYS: i64 = 3650;

/// Why the signing material could not be loaded or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file's content is wrong.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The root could not be made.
    #[error("making the root: {0}")]
    Generate(#[from] rcgen::Error),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

fn invalid(path: &Path, reason: impl Into<String>) -> StoreError {
    StoreError::Invalid {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Where the CA's issuing key comes from.
#[derive(Debug, Clone)]
pub enum Mode {
    /// A self-made root kept in the state dir.
    Root,
    /// An intermediate from an outside PKI; `root_bundle` is what is served.
    Intermediate {
        /// PEM certificate of the intermediate (optionally followed by its
        /// own issuers up to, not including, the root).
        cert: PathBuf,
        /// PEM private key of the intermediate (PKCS#8).
        key: PathBuf,
        /// PEM roots of the outside PKI.
        root_bundle: PathBuf,
    },
}

/// The issuing key and what goes with it.
pub struct Authority {
    /// Signs leaves.
    pub issuer: Issuer<'static, KeyPair>,
    /// The issuing certificate's notAfter: no leaf outlives it.
    pub not_after: SystemTime,
    /// Certificates sent after the leaf (the intermediate chain; empty in
    /// root mode).
    pub chain_tail: Vec<CertificateDer<'static>>,
    /// The issuing certificate, DER.
    pub cert: CertificateDer<'static>,
}

/// Loads the authority from the state dir, making a root on first start.
pub fn load(state_dir: &Path, td: &TrustDomain, mode: &Mode) -> Result<Authority, StoreError> {
    fs::create_dir_all(state_dir).map_err(io_err(state_dir))?;
    match mode {
        Mode::Root => load_or_create_root(state_dir, td),
        Mode::Intermediate {
            cert,
            key,
            root_bundle,
        } => load_intermediate(cert, key, root_bundle),
    }
}

/// The roots to serve now: the CA's own root plus `extra-roots.pem` in root
/// mode, the `--root-bundle` file in intermediate mode.
pub fn read_roots(
    state_dir: &Path,
    mode: &Mode,
    own: &CertificateDer<'static>,
) -> Result<Vec<CertificateDer<'static>>, StoreError> {
    match mode {
        Mode::Root => {
            let mut roots = vec![own.clone()];
            let extra = state_dir.join(EXTRA_ROOTS_FILE);
            if extra.exists() {
                roots.extend(read_certs(&extra)?.into_iter().filter(|c| c != own));
            }
            Ok(roots)
        }
        Mode::Intermediate { root_bundle, .. } => read_certs(root_bundle),
    }
}

/// Writes `bundle.pem` (0644) atomically.
pub fn write_bundle(state_dir: &Path, pem: &str) -> Result<(), StoreError> {
    write_atomic(&state_dir.join(BUNDLE_FILE), pem.as_bytes(), 0o644)
}

fn load_or_create_root(dir: &Path, td: &TrustDomain) -> Result<Authority, StoreError> {
    let key_path = dir.join(KEY_FILE);
    let cert_path = dir.join(CERT_FILE);
    match (key_path.exists(), cert_path.exists()) {
        (true, true) => {}
        (false, false) => create_root(dir, td)?,
        (true, false) => {
            return Err(invalid(
                &cert_path,
                "missing while the root key exists; refusing to make a new root over it",
            ))
        }
        (false, true) => {
            return Err(invalid(
                &key_path,
                "missing while the root certificate exists; refusing to make a new root over it",
            ))
        }
    }
    check_private_mode(&key_path, false)?;
    let key = read_key(&key_path)?;
    let certs = read_certs(&cert_path)?;
    let cert = certs
        .into_iter()
        .next()
        .ok_or_else(|| invalid(&cert_path, "no certificate"))?;
    let not_after = check_ca_cert(&cert_path, &cert, &key)?;
    if let Some(cert_td) = ca_trust_domain(&cert) {
        if cert_td != td.as_str() {
            return Err(invalid(
                &cert_path,
                format!(
                    "root is for trust domain {cert_td:?}, not {td:?}; use another --state-dir"
                ),
            ));
        }
    }
    let issuer =
        Issuer::from_ca_cert_der(&cert, key).map_err(|e| invalid(&cert_path, e.to_string()))?;
    Ok(Authority {
        issuer,
        not_after,
        chain_tail: Vec::new(),
        cert,
    })
}

fn create_root(dir: &Path, td: &TrustDomain) -> Result<(), StoreError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "stepmesh");
    dn.push(DnType::CommonName, format!("stepmesh root CA {td}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.subject_alt_names = vec![SanType::URI(td.id_string().try_into()?)];
    params.serial_number = Some(crate::signer::random_serial());
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + Duration::days(ROOT_LIFETIME_DAYS);
    let cert = params.self_signed(&key)?;
    // Key first: a crash between the two writes leaves a key without a
    // certificate, which `load` reports rather than silently replacing.
    write_atomic(&dir.join(KEY_FILE), key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(&dir.join(CERT_FILE), cert.pem().as_bytes(), 0o644)?;
    tracing::info!(dir = %dir.display(), trust_domain = %td, "made a new root CA (ECDSA P-256, 10 years)");
    Ok(())
}

fn load_intermediate(
    cert_path: &Path,
    key_path: &Path,
    bundle_path: &Path,
) -> Result<Authority, StoreError> {
    check_private_mode(key_path, true)?;
    let key = read_key(key_path)?;
    let mut certs = read_certs(cert_path)?;
    if certs.is_empty() {
        return Err(invalid(cert_path, "no certificate"));
    }
    let cert = certs[0].clone();
    let not_after = check_ca_cert(cert_path, &cert, &key)?;
    let roots = read_certs(bundle_path)?;
    if roots.is_empty() {
        return Err(invalid(bundle_path, "no certificate"));
    }
    // The last certificate of the file must be signed by one of the roots.
    let top = certs.last().cloned().unwrap_or_else(|| cert.clone());
    if !signed_by_any(&top, &roots) {
        return Err(invalid(
            cert_path,
            format!("not signed by any root in {}", bundle_path.display()),
        ));
    }
    let issuer =
        Issuer::from_ca_cert_der(&cert, key).map_err(|e| invalid(cert_path, e.to_string()))?;
    certs.retain(|c| !roots.contains(c));
    Ok(Authority {
        issuer,
        not_after,
        chain_tail: certs,
        cert,
    })
}

/// Checks a CA certificate: parses, is a CA with keyCertSign, matches the
/// key, is currently valid. Returns its notAfter.
fn check_ca_cert(
    path: &Path,
    cert: &CertificateDer<'_>,
    key: &KeyPair,
) -> Result<SystemTime, StoreError> {
    let (_, x509) = X509Certificate::from_der(cert)
        .map_err(|e| invalid(path, format!("not a certificate: {e}")))?;
    if !x509.is_ca() {
        return Err(invalid(
            path,
            "not a CA certificate (basicConstraints CA=false)",
        ));
    }
    let can_sign = x509
        .key_usage()
        .ok()
        .flatten()
        .is_none_or(|ku| ku.value.key_cert_sign());
    if !can_sign {
        return Err(invalid(path, "key usage lacks keyCertSign"));
    }
    if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(invalid(path, "certificate does not match the private key"));
    }
    if !x509.validity().is_valid() {
        return Err(invalid(path, "certificate is outside its validity period"));
    }
    let secs = x509.validity().not_after.timestamp().max(0).unsigned_abs();
    Ok(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

fn signed_by_any(cert: &CertificateDer<'_>, roots: &[CertificateDer<'_>]) -> bool {
    let Ok((_, child)) = X509Certificate::from_der(cert) else {
        return false;
    };
    roots.iter().any(|root| {
        X509Certificate::from_der(root)
            .map(|(_, root)| child.verify_signature(Some(root.public_key())).is_ok())
            .unwrap_or(false)
    })
}

/// The trust domain a CA certificate names in a `spiffe://td` URI SAN, if any.
fn ca_trust_domain(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, x509) = X509Certificate::from_der(cert).ok()?;
    let san = x509.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(uri) => uri
            .strip_prefix("spiffe://")
            .map(|td| td.trim_end_matches('/').to_owned()),
        _ => None,
    })
}

/// Refuses a key file others can read; the CA's own root key must be
/// owner-only, while an outside key may be group-readable (a Kubernetes
/// Secret mounted with `defaultMode: 0440` for the pod's fsGroup).
fn check_private_mode(path: &Path, allow_group: bool) -> Result<(), StoreError> {
    let mode = fs::metadata(path)
        .map_err(io_err(path))?
        .permissions()
        .mode();
    let forbidden = if allow_group { 0o007 } else { 0o077 };
    if mode & forbidden != 0 {
        let fix = if allow_group {
            "chmod 600 (or 640)"
        } else {
            "chmod 600"
        };
        return Err(invalid(
            path,
            format!(
                "private key is mode {:o}; it must not be readable by others ({fix})",
                mode & 0o777
            ),
        ));
    }
    if mode & 0o077 != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "private key is group-readable");
    }
    Ok(())
}

/// Reads a PEM private key: PKCS#8, SEC1 (`EC PRIVATE KEY`) or PKCS#1
/// (`RSA PRIVATE KEY`), as cert-manager and Vault write them.
fn read_key(path: &Path) -> Result<KeyPair, StoreError> {
    let pem = fs::read(path).map_err(io_err(path))?;
    let der = crate::pem::decode_private_key(&pem).map_err(|e| invalid(path, e))?;
    KeyPair::try_from(&der).map_err(|e| invalid(path, format!("not a usable private key: {e}")))
}

/// Reads every CERTIFICATE block of a PEM file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, StoreError> {
    let pem = fs::read(path).map_err(io_err(path))?;
    crate::pem::decode_certs(&pem).map_err(|e| invalid(path, format!("bad PEM: {e}")))
}

/// Writes a file through a temporary sibling and a rename, created with
/// `mode` from the start (a key is never readable by others, not even briefly).
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), StoreError> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err(&tmp))?;
    file.write_all(data).map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}
