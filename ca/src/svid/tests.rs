//! Table-driven tests of the X.509-SVID rules, one row per rule.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime};

use rustls_pki_types::UnixTime;

use super::*;
use crate::testing::{Defect, Pki};

const ID: &str = "spiffe://td/ns/default/sa/web";

#[test]
fn valid_svid() {
    let pki = Pki::new("td");
    let leaf = pki.leaf(ID);
    let got = verify(&leaf.chain, &pki.bundle(), UnixTime::now()).unwrap();
    assert_eq!(got.id.as_str(), ID);
    assert!(got.not_after > SystemTime::now());
    assert!(!got.serial.is_empty() && got.serial.chars().all(|c| c.is_ascii_hexdigit()));
}

#[test]
fn defects_are_refused_with_their_reason() {
    let pki = Pki::new("td");
    let bundle = pki.bundle();
    let cases = [
        (Defect::Expired, "expired"),
        (Defect::NotYetValid, "not_yet_valid"),
        (Defect::TwoUriSans, "bad_san"),
        (Defect::NonSpiffeUri, "bad_san"),
        (Defect::NoUriSan, "bad_san"),
        (Defect::CaLeaf, "not_a_leaf"),
        (Defect::KeyCertSign, "bad_key_usage"),
        (Defect::NoDigitalSignature, "bad_key_usage"),
        (Defect::CodeSigningOnly, "bad_extended_key_usage"),
        (Defect::OtherTrustDomain, "wrong_trust_domain"),
        (Defect::SelfSigned, "unknown_issuer"),
        (Defect::UnknownRoot, "unknown_issuer"),
    ];
    for (defect, reason) in cases {
        let leaf = pki.leaf_with(ID, defect);
        let err = verify(&leaf.chain, &bundle, UnixTime::now()).unwrap_err();
        assert_eq!(err.reason(), reason, "{defect:?}: {err}");
    }
}

#[test]
fn structural_failures() {
    let pki = Pki::new("td");
    let bundle = pki.bundle();
    let now = UnixTime::now();
    let leaf = pki.leaf(ID);

    assert_eq!(verify(&[], &bundle, now).unwrap_err().reason(), "malformed");
    let junk = CertificateDer::from(vec![0x30, 0x03, 0x01, 0x01, 0xff]);
    assert_eq!(
        verify(&[junk], &bundle, now).unwrap_err().reason(),
        "malformed"
    );
    // Without the intermediate the leaf cannot reach the root.
    let alone = vec![leaf.chain[0].clone()];
    assert_eq!(
        verify(&alone, &bundle, now).unwrap_err().reason(),
        "unknown_issuer"
    );
    // The intermediate presented as a leaf: its SAN names the trust domain.
    let ca = vec![pki.intermediate.cert.clone()];
    assert_eq!(verify(&ca, &bundle, now).unwrap_err().reason(), "bad_san");
    // A bundle of another trust domain.
    let other =
        TrustBundle::new("other.test".parse().unwrap(), vec![pki.root.cert.clone()]).unwrap();
    assert_eq!(
        verify(&leaf.chain, &other, now).unwrap_err().reason(),
        "wrong_trust_domain"
    );
    // A bundle of the right domain but another root.
    let stranger = Pki::new("td");
    let err = verify(&leaf.chain, &stranger.bundle(), now).unwrap_err();
    assert_eq!(err.reason(), "unknown_issuer");
}

#[test]
fn clock_skew_allowance() {
    let pki = Pki::new("td");
    let bundle = pki.bundle();
    let now = SystemTime::now();
    let secs = Duration::from_secs;
    let cases = [
        // (not_before, not_after, ok)
        (now - secs(3600), now - secs(30), Ok(())),
        (now - secs(3600), now - secs(120), Err("expired")),
        (now + secs(30), now + secs(3600), Ok(())),
        (now + secs(120), now + secs(3600), Err("not_yet_valid")),
    ];
    for (nb, na, want) in cases {
        let leaf = pki.leaf_valid(ID, nb, na);
        let got = verify(&leaf.chain, &bundle, UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.reason());
        assert_eq!(got, want, "nb={nb:?} na={na:?}");
    }
}

#[test]
fn bundle_pem_round_trip() {
    let pki = Pki::new("td");
    let bundle = TrustBundle::from_pem("td".parse().unwrap(), &pki.bundle_pem()).unwrap();
    assert_eq!(bundle.roots(), std::slice::from_ref(&pki.root.cert));
    let again = TrustBundle::from_pem("td".parse().unwrap(), &bundle.to_pem()).unwrap();
    assert_eq!(again.roots(), bundle.roots());
    assert_eq!(
        TrustBundle::from_pem("td".parse().unwrap(), "no pem here").unwrap_err(),
        BundleError::Empty
    );
    let broken = "-----BEGIN CERTIFICATE-----\nMIIB!!!\n-----END CERTIFICATE-----\n";
    assert!(TrustBundle::from_pem("td".parse().unwrap(), broken).is_err());
}

#[test]
fn serial_hex_strips_leading_zeros() {
    assert_eq!(serial_hex(&[0x00, 0x8f, 0x01]), "8f01");
    assert_eq!(serial_hex(&[0x00]), "00");
    assert_eq!(serial_hex(&[0x7f]), "7f");
}

#[test]
fn anchor_of_names_the_root_key_a_chain_ends_at() {
    let (a, b) = (Pki::new("td"), Pki::new("td"));
    let td: TrustDomain = "td".parse().unwrap();
    let both =
        TrustBundle::new(td.clone(), vec![a.root.cert.clone(), b.root.cert.clone()]).unwrap();
    let leaf = a.leaf(ID);
    verify(&leaf.chain, &both, UnixTime::now()).unwrap();
    // Two roots of one trust domain share a name: the signature decides.
    let key = both.anchor_of(&leaf.chain).unwrap();
    assert_eq!(a.bundle().anchor_of(&leaf.chain), Some(key));
    assert!(a.bundle().trusts(key) && both.trusts(key));
    assert!(
        !b.bundle().trusts(key),
        "the other root's key is another key"
    );
    assert_eq!(b.bundle().anchor_of(&leaf.chain), None);
    let other = b.leaf(ID);
    assert_ne!(both.anchor_of(&other.chain), Some(key));
    // The root itself sent last.
    let mut with_root = leaf.chain.clone();
    with_root.push(a.root.cert.clone());
    assert_eq!(both.anchor_of(&with_root), Some(key));
    // Another root appended (public: anyone has it) is not the anchor: the
    // connection stays under a's root, and ends when a's root is removed
    // (before, the last certificate sent was taken; found by review).
    let mut spoofed = leaf.chain.clone();
    spoofed.push(b.root.cert.clone());
    verify(&spoofed, &both, UnixTime::now()).unwrap();
    assert_eq!(both.anchor_of(&spoofed), Some(key));
    assert!(!b.bundle().trusts(both.anchor_of(&spoofed).unwrap()));
}
