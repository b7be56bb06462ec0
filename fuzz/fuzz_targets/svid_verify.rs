//! X.509-SVID validation is the sidecar's and the CA's first line against a
//! hostile peer: `svid::verify` parses the leaf with x509-parser for the
//! SPIFFE rules, then hands the chain to rustls-webpki. The two parsers must
//! agree on what the leaf says, so besides "no panic" this target checks:
//!
//! - arbitrary DER chains (1-3 certificates) are never accepted: nobody but
//!   the fixed bundle's root key, made fresh in this process, can sign one;
//! - a real chain of that bundle with a few bytes changed is accepted only
//!   if its leaf's signed part (tbsCertificate) is still the one the CA
//!   issued, and then the ID is that leaf's;
//! - a trust bundle parsed from arbitrary PEM round-trips through `to_pem`.
//!
//! Input: byte 0 picks the mode; see `raw_chain`, `edited_chain`, `bundle_pem`.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rustls_pki_types::{CertificateDer, UnixTime};
use stepmesh_ca::spiffe_id::TrustDomain;
use stepmesh_ca::svid::{self, TrustBundle};
use stepmesh_ca::testing::{Defect, Pki};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

const TD: &str = "fuzz.test";

struct Fixture {
    bundle: TrustBundle,
    /// Chains of the bundle: (leaf is a valid SVID, its ID, chain).
    chains: Vec<(bool, String, Vec<CertificateDer<'static>>)>,
    now: UnixTime,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let pki = Pki::new(TD);
        let mut chains = Vec::new();
        for (i, defect) in [
            Defect::None,
            Defect::TwoUriSans,
            Defect::CaLeaf,
            Defect::CodeSigningOnly,
            Defect::SelfSigned,
            Defect::Expired,
        ]
        .into_iter()
        .enumerate()
        {
            let id = format!("spiffe://{TD}/ns/n{i}/sa/s{i}");
            let leaf = pki.leaf_with(&id, defect);
            chains.push((defect == Defect::None, id, leaf.chain));
        }
        Fixture {
            bundle: pki.bundle(),
            chains,
            now: UnixTime::now(),
        }
    })
}

/// The signed part of a certificate (tbsCertificate), as x509-parser reads it.
fn tbs(der: &[u8]) -> Option<Vec<u8>> {
    X509Certificate::from_der(der)
        .ok()
        .map(|(_, c)| c.tbs_certificate.as_ref().to_vec())
}

/// Parses each certificate on its own the way the rest of the code does.
fn parse_each(chain: &[CertificateDer<'_>]) {
    for der in chain {
        if let Ok((_, cert)) = X509Certificate::from_der(der) {
            let _ = svid::leaf_spiffe_id(&cert);
            let _ = cert.validity().time_to_expiration();
            let _ = svid::serial_hex(cert.raw_serial());
        }
    }
    // Arbitrary roots as a bundle: webpki's trust-anchor parser.
    let _ = TrustBundle::new(
        TD.parse().expect("fixed trust domain"),
        chain.iter().map(|c| c.clone().into_owned()).collect(),
    );
}

/// Up to three certificates: `n` (1-3) from byte 0, then each but the last
/// prefixed by a big-endian u16 length.
fn raw_chain(data: &[u8]) {
    let Some((&n, mut rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 3) + 1;
    let mut chain = Vec::new();
    for _ in 1..n {
        let Some((len, tail)) = rest.split_first_chunk::<2>() else {
            break;
        };
        let len = usize::from(u16::from_be_bytes(*len)).min(tail.len());
        chain.push(CertificateDer::from(&tail[..len]));
        rest = &tail[len..];
    }
    chain.push(CertificateDer::from(rest));
    parse_each(&chain);
    let fx = fixture();
    let verdict = svid::verify(&chain, &fx.bundle, fx.now);
    assert!(
        verdict.is_err(),
        "a chain not made by the bundle's CA was accepted: {verdict:?}"
    );
}

/// A real chain (byte 0 picks which) with edits: each 3 bytes after are a
/// big-endian u16 offset into the concatenated chain and a byte to XOR in.
fn edited_chain(data: &[u8]) {
    let Some((&pick, edits)) = data.split_first() else {
        return;
    };
    let fx = fixture();
    let (valid, id, base) = &fx.chains[usize::from(pick) % fx.chains.len()];
    let mut certs: Vec<Vec<u8>> = base.iter().map(|c| c.to_vec()).collect();
    let total: usize = certs.iter().map(Vec::len).sum();
    for edit in edits.chunks_exact(3) {
        let mut at = usize::from(u16::from_be_bytes([edit[0], edit[1]])) % total;
        for cert in &mut certs {
            if at < cert.len() {
                cert[at] ^= edit[2];
                break;
            }
            at -= cert.len();
        }
    }
    let chain: Vec<CertificateDer<'_>> =
        certs.iter().map(|c| CertificateDer::from(&c[..])).collect();
    parse_each(&chain);
    match svid::verify(&chain, &fx.bundle, fx.now) {
        Ok(verified) => {
            assert!(*valid, "a defective SVID was accepted after edits");
            assert_eq!(
                tbs(&chain[0]),
                tbs(&base[0]),
                "accepted a leaf whose signed part the CA never issued"
            );
            assert_eq!(verified.id.as_str(), id);
            assert_eq!(verified.id.trust_domain().as_str(), TD);
        }
        Err(e) => {
            let _ = e.reason();
            if *valid && edits.len() < 3 {
                panic!("the unedited valid chain was refused: {e}");
            }
        }
    }
}

/// Arbitrary text as a trust bundle: what loads must round-trip.
fn bundle_pem(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let td: TrustDomain = TD.parse().expect("fixed trust domain");
    if let Ok(bundle) = TrustBundle::from_pem(td.clone(), text) {
        let again = TrustBundle::from_pem(td, &bundle.to_pem()).expect("to_pem re-parses");
        assert_eq!(again.roots(), bundle.roots());
        assert_eq!(again.anchors().len(), bundle.anchors().len());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => raw_chain(rest),
        1 => edited_chain(rest),
        _ => bundle_pem(rest),
    }
});
