//! `stepmesh cert ...`: certificate tools.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::Subcommand;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

/// `stepmesh cert` subcommands.
#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Print SPIFFE ID, issuer, validity and key type of a PEM certificate.
    Inspect {
        /// PEM file (the first certificate is inspected).
        file: PathBuf,
    },
}

/// Runs a `stepmesh cert` subcommand.
pub fn run(cmd: CertCommand) -> anyhow::Result<()> {
    match cmd {
        CertCommand::Inspect { file } => {
            let pem =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let out =
                inspect(&pem, SystemTime::now()).with_context(|| format!("{}", file.display()))?;
            print!("{out}");
            Ok(())
        }
    }
}

/// Describes the first certificate of `pem` (and counts the rest).
pub fn inspect(pem: &[u8], now: SystemTime) -> anyhow::Result<String> {
    let certs = stepmesh_ca::pem::decode_certs(pem).map_err(|e| anyhow::anyhow!("not PEM: {e}"))?;
    let first = certs.first().context("no CERTIFICATE block in the file")?;
    let (_, cert) = X509Certificate::from_der(first)
        .map_err(|e| anyhow::anyhow!("not an X.509 certificate: {e}"))?;

    let mut uris = Vec::new();
    let mut dns = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(u) => uris.push((*u).to_owned()),
                GeneralName::DNSName(d) => dns.push((*d).to_owned()),
                _ => {}
            }
        }
    }
    let spiffe = match uris.as_slice() {
        [one] if one.starts_with("spiffe://") => match stepmesh_ca::spiffe_id::SpiffeId::parse(one)
        {
            Ok(id) => id.to_string(),
            Err(e) => format!("{one} (invalid: {e})"),
        },
        [] => "none (no URI SAN)".to_owned(),
        many => format!("none (URI SANs: {})", many.join(", ")),
    };

    let validity = cert.validity();
    let not_before = validity.not_before.timestamp();
    let not_after = validity.not_after.timestamp();
    let now_s = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    let status = if now_s < not_before {
        "not yet valid".to_owned()
    } else if now_s > not_after {
        format!("expired {} ago", human(now_s - not_after))
    } else {
        format!("valid, {} left", human(not_after - now_s))
    };

    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(out, "SPIFFE ID:  {spiffe}");
    let _ = writeln!(out, "Subject:    {}", cert.subject());
    let _ = writeln!(out, "Issuer:     {}", cert.issuer());
    let _ = writeln!(out, "Not before: {}", validity.not_before);
    let _ = writeln!(out, "Not after:  {} ({status})", validity.not_after);
    let _ = writeln!(out, "Key type:   {}", key_type(&cert));
    let _ = writeln!(
        out,
        "Serial:     {}",
        stepmesh_ca::svid::serial_hex(cert.raw_serial())
    );
    let _ = writeln!(
        out,
        "CA:         {}",
        if cert.is_ca() { "yes" } else { "no" }
    );
    if !dns.is_empty() {
        let _ = writeln!(out, "DNS names:  {}", dns.join(", "));
    }
    if certs.len() > 1 {
        let _ = writeln!(out, "Chain:      {} certificates in the file", certs.len());
    }
    Ok(out)
}

fn key_type(cert: &X509Certificate<'_>) -> String {
    stepmesh_ca::signer::KeyKind::of(cert.public_key()).to_string()
}

fn human(secs: i64) -> String {
    let d = Duration::from_secs(secs.unsigned_abs());
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s}s"),
        120..=7_199 => format!("{}m", s / 60),
        7_200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use stepmesh_ca::testing::Pki;

    #[test]
    fn inspects_an_svid_chain() {
        let pki = Pki::new("td");
        let leaf = pki.leaf("spiffe://td/ns/a/sa/b");
        let out = inspect(leaf.chain_pem.as_bytes(), SystemTime::now()).unwrap();
        assert!(out.contains("SPIFFE ID:  spiffe://td/ns/a/sa/b"), "{out}");
        assert!(out.contains("Key type:   ECDSA P-256"), "{out}");
        assert!(out.contains("td test intermediate"), "{out}");
        assert!(
            out.contains("valid, 59m left") || out.contains("valid, 60m left"),
            "{out}"
        );
        assert!(out.contains("Chain:      2 certificates"), "{out}");
        assert!(out.contains("CA:         no"), "{out}");
    }

    #[test]
    fn refuses_non_certificates() {
        let err = inspect(b"hello", SystemTime::now())
            .unwrap_err()
            .to_string();
        assert!(err.contains("no CERTIFICATE"), "{err}");
        let garbage = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let err = inspect(garbage.as_bytes(), SystemTime::now())
            .unwrap_err()
            .to_string();
        assert!(err.contains("not an X.509"), "{err}");
    }
}
