//! The revocation store over a real state dir: serial normalisation, a
//! reload keeping the entries, an entry lapsing with its certificate.

#![allow(clippy::unwrap_used)]

use super::*;

#[test]
fn serials_are_normalised_and_bad_ones_named() {
    assert_eq!(normalize_serial("00:1A:bc").unwrap(), "1abc");
    assert_eq!(normalize_serial("0x0").unwrap(), "0");
    for bad in ["", "xyz", "12 34", &"a".repeat(41)] {
        let err = normalize_serial(bad).unwrap_err().to_string();
        assert!(err.contains("not a hex serial"), "{err}");
    }
}

#[tokio::test]
async fn revocations_survive_a_reload_and_lapse_with_their_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let td = "td".parse().unwrap();
    let id = SpiffeId::parse("spiffe://td/ns/a/sa/x").unwrap();
    let revs = Revocations::load(dir.path()).unwrap();
    let far = SystemTime::now() + std::time::Duration::from_secs(3600);
    revs.issued("1abc", &id, far);
    let unknown = revs
        .revoke(Target::Serial("ffff".into()), "")
        .await
        .unwrap_err();
    assert!(unknown
        .to_string()
        .contains("not a certificate this CA issued"));
    assert!(revs.list().is_empty(), "a refused revoke changes nothing");
    let bad = Target::parse("", "spiffe://other/ns/a/sa/x", &td).unwrap_err();
    assert!(bad.to_string().contains("not of trust domain td"), "{bad}");
    assert!(matches!(
        Target::parse("1", "spiffe://td/x", &td),
        Err(RevokeError::Target)
    ));

    revs.revoke(Target::Serial("1abc".into()), "stolen")
        .await
        .unwrap();
    revs.revoke(Target::Id(id.clone()), "compromised")
        .await
        .unwrap();
    assert_eq!(revs.subscribe().borrow().entries.len(), 2);
    assert!(revs.refusing(&id, None).is_some());
    // Let the writer thread append the issued line.
    std::thread::sleep(std::time::Duration::from_millis(100));
    drop(revs);

    let again = Revocations::load(dir.path()).unwrap();
    assert_eq!(again.list().len(), 2, "both kept across a restart");
    again.unrevoke(Target::Id(id.clone())).await.unwrap();
    assert!(again.refusing(&id, None).is_none());
    assert!(again.refusing(&id, Some("1abc")).is_some());
    let err = again.unrevoke(Target::Id(id.clone())).await.unwrap_err();
    assert!(err.to_string().contains("is not revoked"), "{err}");
    // An entry whose certificate expired lapses.
    let past = SystemTime::now() - std::time::Duration::from_secs(10);
    again.issued("2", &id, past);
    again.lock().entries[0].expires_at = 1;
    again.prune().await.unwrap();
    assert!(again.list().is_empty());
    assert!(!again.lock().issued.contains_key("2"));
}
