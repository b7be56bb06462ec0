//! The CA signs whatever public key a CSR carries, for the identity the
//! credential proves; the CSR may at most repeat that identity. A CSR is
//! attacker-controlled input of the CA, so this target drives
//! `signer::Csr::{from_der, from_pem}` and `Csr::check_identity`:
//!
//! - raw mode: arbitrary bytes as DER and as the body of a PEM block; for a
//!   CSR that loads, accepting two different identities means accepting
//!   every identity (it asked for none);
//! - built mode: a well-signed CSR (fixed P-256 key, made once) whose URI
//!   SANs come from the input; it must load, and `check_identity` must
//!   accept exactly "no URI SAN" or "one URI SAN equal to the proven ID".
//!
//! Input: byte 0 picks the mode.
#![no_main]

use std::sync::OnceLock;

use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use rcgen::{CertificateParams, KeyPair, SanType};
use stepmesh_ca::signer::Csr;
use stepmesh_ca::spiffe_id::SpiffeId;

fn ids() -> &'static [SpiffeId; 3] {
    static IDS: OnceLock<[SpiffeId; 3]> = OnceLock::new();
    IDS.get_or_init(|| {
        // Fixed, valid IDs: parsing cannot fail.
        [
            "spiffe://td/ns/a/sa/b",
            "spiffe://td/ns/c/sa/d",
            "spiffe://other/x",
        ]
        .map(|s| SpiffeId::parse(s).expect("fixed ID"))
    })
}

fn key() -> &'static KeyPair {
    static KEY: OnceLock<KeyPair> = OnceLock::new();
    // Key generation only fails if the crypto library is broken.
    KEY.get_or_init(|| KeyPair::generate().expect("P-256 key"))
}

fn raw(data: &[u8]) {
    let pem = format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        base64::engine::general_purpose::STANDARD.encode(data)
    );
    let from_pem = Csr::from_pem(&pem);
    let from_der = Csr::from_der(data);
    assert_eq!(
        from_pem.is_ok(),
        from_der.is_ok(),
        "PEM and DER loading disagree: {from_pem:?} / {from_der:?}"
    );
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Csr::from_pem(text);
    }
    if let Ok(csr) = from_der {
        let [a, b, c] = ids();
        let _ = csr.key_type();
        if csr.check_identity(a).is_ok() && csr.check_identity(b).is_ok() {
            assert!(
                csr.check_identity(c).is_ok(),
                "accepts two IDs but not a third"
            );
        }
    }
}

fn built(data: &[u8]) {
    // Up to three URI SANs, one per line.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let uris: Vec<&str> = if text.is_empty() {
        Vec::new()
    } else {
        text.split('\n').take(3).collect()
    };
    let mut params = CertificateParams::default();
    for uri in &uris {
        // rcgen takes IA5 (ASCII) strings only.
        let Ok(ia5) = rcgen::string::Ia5String::try_from(*uri) else {
            return;
        };
        params.subject_alt_names.push(SanType::URI(ia5));
    }
    let Ok(request) = params.serialize_request(key()) else {
        return;
    };
    let Ok(pem) = request.pem() else {
        return;
    };
    let csr = Csr::from_pem(&pem).expect("a well-signed P-256 CSR loads");
    assert_eq!(csr.key_type(), "ECDSA P-256");
    let mut proven: Vec<SpiffeId> = ids().to_vec();
    if let Some(Ok(first)) = uris.first().map(|u| SpiffeId::parse(u)) {
        proven.push(first);
    }
    for id in &proven {
        let want = uris.is_empty() || (uris.len() == 1 && uris[0] == id.as_str());
        let got = csr.check_identity(id);
        assert_eq!(got.is_ok(), want, "SANs {uris:?}, proven {id}: {got:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        raw(rest);
    } else {
        built(rest);
    }
});
