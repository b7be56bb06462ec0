//! Turns a failed handshake's `io::Error` into a stable metric label.

use std::io;

use rustls::{CertificateError, Error};
use stepmesh_ca::svid::SvidError;

use super::verify::{NoBundle, Revoked, WrongPeer};

/// A stable reason for a failed handshake: `no_client_cert`, the SVID
/// validation reasons of `SvidError::reason()` (`expired`, `unknown_issuer`,
/// `wrong_trust_domain`, `bad_san`, ...), `wrong_peer_id`, `timeout`,
/// `not_tls`, `peer_alert`, `eof`, ...
pub fn reason(err: &io::Error) -> &'static str {
    if err.kind() == io::ErrorKind::TimedOut {
        return "timeout";
    }
    let Some(tls) = rustls_error(err) else {
        return match err.kind() {
            io::ErrorKind::UnexpectedEof => "eof",
            io::ErrorKind::ConnectionReset => "reset",
            _ => "io",
        };
    };
    tls_reason(tls)
}

/// Whether a handshake failed because the server shares none of the ALPN
/// ids offered (it said so with the `no_application_protocol` alert).
pub fn no_common_alpn(err: &io::Error) -> bool {
    matches!(
        rustls_error(err),
        Some(Error::AlertReceived(
            rustls::AlertDescription::NoApplicationProtocol
        ))
    )
}

/// The rustls error a failed handshake's `io::Error` carries, if any.
fn rustls_error(err: &io::Error) -> Option<&Error> {
    err.get_ref().and_then(|e| e.downcast_ref::<Error>())
}

/// The label of a rustls error (see [`reason`]).
pub fn tls_reason(err: &Error) -> &'static str {
    match err {
        Error::NoCertificatesPresented => "no_client_cert",
        Error::InvalidCertificate(cert) => cert_reason(cert),
        Error::AlertReceived(_) => "peer_alert",
        Error::PeerIncompatible(_) => "incompatible",
        Error::InvalidMessage(_) | Error::InappropriateMessage { .. } => "not_tls",
        Error::InappropriateHandshakeMessage { .. } | Error::PeerMisbehaved(_) => "protocol",
        Error::NoApplicationProtocol => "no_alpn",
        Error::DecryptError => "decrypt",
        _ => "tls_error",
    }
}

fn cert_reason(err: &CertificateError) -> &'static str {
    match err {
        CertificateError::Other(other) => {
            let inner = &*other.0;
            if let Some(svid) = inner.downcast_ref::<SvidError>() {
                svid.reason()
            } else if inner.is::<WrongPeer>() {
                "wrong_peer_id"
            } else if inner.is::<Revoked>() {
                "revoked"
            } else if inner.is::<NoBundle>() {
                "no_bundle"
            } else {
                "bad_certificate"
            }
        }
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "not_yet_valid"
        }
        CertificateError::UnknownIssuer => "unknown_issuer",
        CertificateError::BadEncoding => "malformed",
        _ => "bad_certificate",
    }
}
