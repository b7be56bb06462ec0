//! PEM: encoding of DER blobs, and decoding (with `rustls_pki_types::pem`)
//! into certificates and keys with one-line reasons a person can act on.

use base64::Engine;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Every `CERTIFICATE` block of `pem`, in order (other blocks are skipped;
/// none is not an error here: callers say what they needed).
pub fn decode_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| describe(&e))
}

/// The first private key block of `pem`: PKCS#8 (`PRIVATE KEY`), PKCS#1
/// (`RSA PRIVATE KEY`) or SEC1 (`EC PRIVATE KEY`).
pub fn decode_private_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        pem::Error::NoItemsFound => "no PRIVATE KEY block".to_owned(),
        other => describe(&other),
    })
}

/// A PEM decoding error in words (the library's own text shows markers as
/// byte arrays).
pub fn describe(err: &pem::Error) -> String {
    match err {
        pem::Error::MissingSectionEnd { end_marker } => {
            let label = String::from_utf8_lossy(end_marker);
            format!("missing \"-----END {label}-----\"")
        }
        pem::Error::IllegalSectionStart { line } => {
            format!("malformed PEM line {:?}", String::from_utf8_lossy(line))
        }
        pem::Error::Base64Decode(e) => format!("bad base64 in a PEM block: {e}"),
        pem::Error::NoItemsFound => "no PEM block of the expected kind".to_owned(),
        other => other.to_string(),
    }
}

/// Encodes `der` as one PEM block with 64-column lines, as openssl writes it.
pub fn encode(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 2 * label.len() + 40);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

/// Encodes each certificate as a `CERTIFICATE` block, concatenated.
pub fn encode_certs<'a>(certs: impl IntoIterator<Item = &'a [u8]>) -> String {
    certs
        .into_iter()
        .map(|der| encode("CERTIFICATE", der))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    #[test]
    fn decoding_errors_say_what_is_wrong() {
        let cert = encode("CERTIFICATE", b"not really DER but base64 is fine");
        assert_eq!(decode_certs(cert.as_bytes()).unwrap().len(), 1);
        assert_eq!(decode_certs(b"hello\n").unwrap().len(), 0);
        let truncated = &cert[..cert.len() - 30];
        let err = decode_certs(truncated.as_bytes()).unwrap_err();
        assert_eq!(err, "missing \"-----END CERTIFICATE-----\"");
        let bad_b64 = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        let err = decode_certs(bad_b64.as_bytes()).unwrap_err();
        assert!(err.starts_with("bad base64"), "{err}");
        assert_eq!(
            decode_private_key(cert.as_bytes()).unwrap_err(),
            "no PRIVATE KEY block"
        );
        let key = encode("EC PRIVATE KEY", b"sec1");
        assert!(matches!(
            decode_private_key(key.as_bytes()).unwrap(),
            PrivateKeyDer::Sec1(_)
        ));
    }
}
