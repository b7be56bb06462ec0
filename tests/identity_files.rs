//! Identity files at the start of `stepmesh proxy`: files that exist but
//! cannot work exit 64 with one line naming the file; files that do not
//! exist yet (a projected token, an `emptyDir` a helper fills) are waited
//! for, and `/ready` says what it waits for until they appear. The rows of
//! the README's exit-code paragraph that are about identity files (the
//! rest: tests/exit_codes.rs).
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use common::cli::{assert_config_error, write};
use common::mesh::{eventually, Sidecar, SvidFiles};
use stepmesh_ca::testing::Pki;

/// Identity files that exist but cannot work stop the sidecar at start with
/// one line naming the file; a missing one does too once
/// `--wait-for-files` has passed.
#[test]
fn unusable_identity_files_exit_64_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("td.test");
    let good = SvidFiles::write(dir.path(), "a", &pki, &pki.leaf("spiffe://td.test/a"));
    let other = SvidFiles::write(dir.path(), "b", &pki, &pki.leaf("spiffe://td.test/b"));
    let foreign = Pki::new("other.test");
    let foreign = SvidFiles::write(
        dir.path(),
        "f",
        &foreign,
        &foreign.leaf("spiffe://other.test/f"),
    );
    let not_pem = write(dir.path(), "not.pem", "hello\n");
    let missing = dir.path().join("missing.pem").display().to_string();
    let token = write(dir.path(), "token", "t0k3n\n");
    let (cert, key, bundle) = (
        good.cert.display().to_string(),
        good.key.display().to_string(),
        good.bundle.display().to_string(),
    );
    let (other_key, foreign_bundle) = (
        other.key.display().to_string(),
        foreign.bundle.display().to_string(),
    );
    let files = |cert: &str, key: &str, bundle: &str, wait: &str| -> Vec<String> {
        [
            "proxy",
            "--cert",
            cert,
            "--key",
            key,
            "--bundle",
            bundle,
            "--file-poll-interval",
            "100ms",
            "--wait-for-files",
            wait,
            "--inbound",
            "127.0.0.1:0=127.0.0.1:1",
            "--admin",
            "127.0.0.1:0",
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let ca = |bundle: &str, token: &str, wait: &str| -> Vec<String> {
        [
            "proxy",
            "--ca",
            "127.0.0.1:1",
            "--ca-bundle",
            bundle,
            "--token-file",
            token,
            "--trust-domain",
            "td.test",
            "--wait-for-files",
            wait,
            "--inbound",
            "127.0.0.1:0=127.0.0.1:1",
            "--admin",
            "127.0.0.1:0",
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let not_pem_named = format!("{not_pem}: no CERTIFICATE block");
    let cases: Vec<(Vec<String>, String)> = vec![
        // --cert --key --bundle
        (files(&not_pem, &key, &bundle, "60s"), not_pem_named),
        (
            files(&cert, &not_pem, &bundle, "60s"),
            format!("{not_pem}: no PRIVATE KEY block"),
        ),
        (
            files(&cert, &key, &not_pem, "60s"),
            format!("bundle {not_pem}"),
        ),
        (
            files(&cert, &other_key, &bundle, "60s"),
            format!("--key {other_key} with --cert {cert}"),
        ),
        (
            files(&cert, &key, &foreign_bundle, "60s"),
            format!("--cert {cert} with --bundle {foreign_bundle}"),
        ),
        (
            files(&cert, dir.path().to_str().unwrap(), &bundle, "60s"),
            dir.path().display().to_string(),
        ),
        (
            files(&missing, &key, &bundle, "0s"),
            format!("--cert {missing}: no such file"),
        ),
        (
            files(&cert, &key, &missing, "300ms"),
            format!("--bundle {missing}: still no such file after waiting 300ms"),
        ),
        // --ca --ca-bundle --token-file
        (
            ca(&not_pem, &token, "60s"),
            format!(
                "--ca-bundle {not_pem}: CA client configuration: CA bundle holds no certificate"
            ),
        ),
        (
            ca(&bundle, dir.path().to_str().unwrap(), "60s"),
            format!("--token-file {}", dir.path().display()),
        ),
        (
            ca(&missing, &token, "0s"),
            format!("--ca-bundle {missing}: no such file"),
        ),
        (
            ca(&bundle, &missing, "300ms"),
            format!("--token-file {missing}: still no such file"),
        ),
    ];
    for (args, needle) in &cases {
        assert_config_error(args, needle);
    }
}

/// A `--token-file` that does not exist yet (a projected volume, a CSI
/// driver) is waited for: the sidecar runs, says so in its log and in
/// `/ready`'s 503, and goes on once the file appears.
#[test]
fn a_missing_token_file_is_waited_for_and_ready_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("td.test");
    let bundle = write(dir.path(), "ca.pem", &pki.bundle_pem());
    let token = dir.path().join("tokens/stepmesh-token");
    let args: Vec<String> = [
        "--ca",
        "127.0.0.1:1",
        "--ca-bundle",
        &bundle,
        "--token-file",
        token.to_str().unwrap(),
        "--trust-domain",
        "td.test",
        "--inbound",
        "127.0.0.1:0=127.0.0.1:1",
    ]
    .map(str::to_owned)
    .to_vec();
    let sidecar = Sidecar::spawn(&args);
    let waiting = format!(
        "waiting for --token-file {} to appear (mounted later?)",
        token.display()
    );
    sidecar.wait_log("the waiting line", |l| {
        (l["message"] == waiting.as_str()).then_some(())
    });
    let (status, body) = sidecar.admin_get("/ready");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body, format!("not ready: no SVID yet: {waiting}\n"));

    // Mounted: the wait ends, and /ready says what is next (no CA there).
    std::fs::create_dir(dir.path().join("tokens")).unwrap();
    std::fs::write(&token, "t0k3n").unwrap();
    let body = eventually("/ready to move on", || {
        let (status, body) = sidecar.admin_get("/ready");
        assert_eq!(status, 503, "{body}");
        body.contains("the last request to the CA 127.0.0.1:1 failed: ")
            .then_some(body)
    });
    assert!(body.starts_with("not ready: no SVID yet: "), "{body}");
}

/// SVID files that appear after the start (a helper writing an `emptyDir`)
/// are waited for, then served: `/ready` goes from 503 with the reason to 200.
#[test]
fn svid_files_written_after_the_start_are_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("td.test");
    let names =
        ["a.crt", "a.key", "a-bundle.pem"].map(|n| dir.path().join(n).display().to_string());
    let args: Vec<String> = [
        "--cert",
        &names[0],
        "--key",
        &names[1],
        "--bundle",
        &names[2],
        "--file-poll-interval",
        "100ms",
        "--inbound",
        "127.0.0.1:0=127.0.0.1:1",
    ]
    .map(str::to_owned)
    .to_vec();
    let mut sidecar = Sidecar::spawn(&args);
    let waiting = format!("waiting for --cert {} to appear (mounted later?)", names[0]);
    sidecar.wait_log("the waiting line", |l| {
        (l["message"] == waiting.as_str()).then_some(())
    });
    assert_eq!(
        sidecar.admin_get("/ready"),
        (503, format!("not ready: no SVID yet: {waiting}\n"))
    );

    SvidFiles::write(dir.path(), "a", &pki, &pki.leaf("spiffe://td.test/a"));
    eventually("/ready 200", || {
        (sidecar.admin_get("/ready") == (200, "ready\n".into())).then_some(())
    });
    assert!(sidecar.try_wait().is_none(), "the sidecar exited");
}
