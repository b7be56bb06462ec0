//! Exit codes of the real binary, every row of the README's exit-code
//! paragraph: 0 for `--help` and `--version`; 64 and one line on stderr for
//! anything wrong in what the operator gave — the command line (a value a
//! parser rejects, an unknown flag, a missing argument), a config, policy or
//! identity file; 1 for a run that fails (a port in use). At start, an
//! identity file that does not exist yet is waited for and `/ready` says so.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};

use common::mesh::{eventually, Sidecar, SvidFiles};
use stepmesh_ca::testing::Pki;

const BIN: &str = env!("CARGO_BIN_EXE_stepmesh");

/// Runs `stepmesh ARGS` (with `env`, 20 s at most; no `STEPMESH_*` from the
/// caller's environment).
fn output<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new("timeout");
    cmd.arg("20").arg(BIN).args(args);
    for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("STEPMESH_")) {
        cmd.env_remove(name);
    }
    cmd.env("RUST_LOG", "error")
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

/// Runs `stepmesh ARGS` and returns (code, stderr).
fn run<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> (Option<i32>, String) {
    let out = output(args, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code(), stderr)
}

/// Exit 64 with exactly one line on stderr, `stepmesh: ...needle...`.
fn assert_config_error<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S], needle: &str) {
    let (code, stderr) = run(args);
    assert_one_line(code, &stderr, 64, &format!("{args:?}"), needle);
}

fn assert_one_line(code: Option<i32>, stderr: &str, want: i32, what: &str, needle: &str) {
    assert_eq!(code, Some(want), "{what}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{what}: not one line: {stderr}");
    assert!(stderr.starts_with("stepmesh: "), "{what}: {stderr}");
    assert!(
        stderr.contains(needle),
        "{what}: {needle:?} not in {stderr}"
    );
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn configuration_errors_exit_64_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let bad_policy = write(
        dir.path(),
        "policy.yaml",
        "trustDomain: cluster.local\nmode: strict\n",
    );
    let bad_config = write(dir.path(), "inject.yaml", "imagee: x\n");
    let pod = write(
        dir.path(),
        "pod.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: a, image: x}]}\n",
    );
    let not_pem = write(dir.path(), "cert.pem", "hello\n");
    let missing = dir.path().join("missing.yaml").display().to_string();
    let proxy = |extra: &[&str]| -> Vec<String> {
        common::PROXY_WITHOUT_FILES
            .iter()
            .chain(extra)
            .map(|a| a.to_string())
            .collect()
    };

    // stepmesh proxy
    assert_config_error(&proxy(&["--workers", "0"]), "--workers must be at least 1");
    assert_config_error(&proxy(&["--policy", &bad_policy]), "policy.yaml");
    assert_config_error(&proxy(&["--policy", &missing]), "missing.yaml");
    assert_config_error(&proxy(&["--app-probes", "{\"/x\": 1}"]), "--app-probes");
    assert_config_error(
        &[
            "proxy",
            "--ca",
            "127.0.0.1:1",
            "--ca-bundle",
            "b",
            "--token-file",
            "t",
            "--trust-domain",
            "Bad_Domain",
            "--inbound",
            "127.0.0.1:0=127.0.0.1:1",
        ],
        "--trust-domain",
    );
    assert_config_error(
        &[
            "proxy",
            "--cert",
            "c",
            "--key",
            "k",
            "--bundle",
            "b",
            "--admin",
            "127.0.0.1:0",
        ],
        "no listener",
    );
    // stepmesh inject
    assert_config_error(&["inject", "-f", &pod, "--config", &bad_config], "imagee");
    assert_config_error(&["inject", "-f", &missing], "missing.yaml");
    assert_config_error(&["inject"], "give -f FILE");
    assert_config_error(
        &[
            "inject",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--cert",
            &missing,
            "--key",
            &missing,
        ],
        "missing.yaml",
    );
    // stepmesh policy, cert
    assert_config_error(&["policy", "check", &bad_policy], "mode");
    assert_config_error(&["policy", "check", &missing], "missing.yaml");
    assert_config_error(&["cert", "inspect", &not_pem], "cert.pem");
    // stepmesh ca serve
    let state = dir.path().join("state").display().to_string();
    assert_config_error(
        &[
            "ca",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--state-dir",
            &state,
            "--default-ttl",
            "48h",
            "--max-ttl",
            "24h",
        ],
        "--default-ttl",
    );
}

#[test]
fn runtime_failures_exit_1() {
    // A port already taken is a failed run, not bad configuration.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, line) = run(&[
        "proxy",
        "--cert",
        "c",
        "--key",
        "k",
        "--bundle",
        "b",
        "--inbound",
        "127.0.0.1:0=127.0.0.1:1",
        "--admin",
        &addr,
    ]);
    assert_one_line(code, &line, 1, "--admin in use", "--admin");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state").display().to_string();
    let (code, line) = run(&[
        "ca",
        "serve",
        "--listen",
        &addr,
        "--admin",
        "127.0.0.1:0",
        "--state-dir",
        &state,
    ]);
    assert_one_line(code, &line, 1, "ca --listen in use", "binding");
}

/// Every command: a value its parser rejects (from a flag or a `STEPMESH_*`
/// variable), an unknown flag or subcommand, a missing argument: one line
/// naming the flag, exit 64.
#[test]
fn command_line_errors_exit_64_with_one_line() {
    let cases: &[(&[&str], &str)] = &[
        // stepmesh proxy
        (
            &["proxy", "--drain-timeout", "xyz"],
            "stepmesh: invalid value 'xyz' for '--drain-timeout <DURATION>': expected a duration",
        ),
        (
            &["proxy", "--inbound", "nonsense"],
            "invalid value 'nonsense' for '--inbound <LISTEN=APP_ADDR>': expected LISTEN=APP_ADDR",
        ),
        (
            &["proxy", "--outbound", "127.0.0.1:1=peer:1@x"],
            "'--outbound <LISTEN=PEER_ADDR@SPIFFE_ID>': SPIFFE_ID \"x\" must start with spiffe://",
        ),
        (&["proxy", "--admin", "localhost"], "'--admin <ADMIN>'"),
        (
            &["proxy", "--max-connections", "lots"],
            "'--max-connections <MAX_CONNECTIONS>'",
        ),
        (
            &["proxy", "--inbound-port", "70000"],
            "'--inbound-port <INBOUND_PORT>'",
        ),
        (
            &["proxy", "--wait-for-files", "1y"],
            "'--wait-for-files <DURATION>': unknown unit",
        ),
        (
            &["proxy", "--file-poll-interval", "1y"],
            "'--file-poll-interval <DURATION>': unknown unit",
        ),
        (&["proxy", "--svid-ttl=-1s"], "'--svid-ttl <DURATION>'"),
        (
            &["proxy", "--header-timeout", "soon"],
            "'--header-timeout <DURATION>'",
        ),
        (
            &["proxy", "--max-request-headers", "1000"],
            "'--max-request-headers <MAX_REQUEST_HEADERS>'",
        ),
        (
            &["proxy", "--max-connections-per-peer", "many"],
            "'--max-connections-per-peer <MAX_CONNECTIONS_PER_PEER>'",
        ),
        (
            &["--log-format", "xml", "proxy"],
            "(possible values: plain, json)",
        ),
        (
            &["proxy", "--no-such-flag"],
            "unexpected argument '--no-such-flag' found",
        ),
        (
            &["proxy", "--ca", "ca:1"],
            "required arguments were not provided: --ca-bundle",
        ),
        (
            &["proxy", "--cert", "c", "--ca", "ca:1"],
            "cannot be used with",
        ),
        // stepmesh ca serve
        (
            &[
                "ca",
                "serve",
                "--state-dir",
                "s",
                "--trust-domain",
                "Bad.Domain",
            ],
            "invalid value 'Bad.Domain' for '--trust-domain <TRUST_DOMAIN>'",
        ),
        (
            &["ca", "serve", "--state-dir", "s", "--max-ttl", "a day"],
            "'--max-ttl <DURATION>'",
        ),
        (
            &["ca", "serve", "--state-dir", "s", "--listen", "x"],
            "'--listen <LISTEN>'",
        ),
        (
            &["ca", "serve", "--state-dir", "s", "--sign-burst", "-"],
            "'--sign-burst <SIGN_BURST>'",
        ),
        (
            &["ca", "serve"],
            "required arguments were not provided: --state-dir",
        ),
        (&["ca", "frob"], "unrecognized subcommand 'frob'"),
        // stepmesh inject (serve and offline)
        (
            &[
                "inject",
                "serve",
                "--cert",
                "c",
                "--key",
                "k",
                "--body-timeout",
                "x",
            ],
            "'--body-timeout <DURATION>'",
        ),
        (
            &[
                "inject",
                "serve",
                "--cert",
                "c",
                "--key",
                "k",
                "--max-body-bytes",
                "4MiB",
            ],
            "'--max-body-bytes <MAX_BODY_BYTES>'",
        ),
        (
            &[
                "inject",
                "serve",
                "--cert",
                "c",
                "--key",
                "k",
                "--timeout",
                "1s",
            ],
            "tip: a similar argument exists: '--body-timeout'",
        ),
        // stepmesh policy
        (
            &[
                "policy",
                "explain",
                "p.yaml",
                "--from",
                "spiffe://td/a",
                "--port",
                "http",
            ],
            "'--port <PORT>'",
        ),
        (
            &["policy", "check"],
            "required arguments were not provided: <FILE>",
        ),
        // stepmesh init
        (
            &["init", "--proxy-uid", "envoy"],
            "'--proxy-uid <PROXY_UID>'",
        ),
        (
            &["init", "--exclude-outbound-cidrs", "10.0.0.0/33"],
            "prefix length",
        ),
        (
            &["init", "--exclude-inbound-ports", "22,ssh"],
            "'--exclude-inbound-ports <EXCLUDE_INBOUND_PORTS>'",
        ),
        // stepmesh cert inspect
        (
            &["cert", "inspect"],
            "required arguments were not provided: <FILE>",
        ),
        (
            &["cert", "inspect", "a.pem", "b.pem"],
            "unexpected argument 'b.pem'",
        ),
        // stepmesh demo
        (
            &["demo", "--serve=yes"],
            "unexpected value 'yes' for '--serve'",
        ),
        // no such command
        (&["frob"], "unrecognized subcommand 'frob'"),
    ];
    for (args, needle) in cases {
        assert_config_error(args, needle);
    }
    // The same parsers read the STEPMESH_* variables.
    let out = output(&["proxy"], &[("STEPMESH_DRAIN_TIMEOUT", "xyz")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_one_line(
        out.status.code(),
        &stderr,
        64,
        "STEPMESH_DRAIN_TIMEOUT",
        "'--drain-timeout <DURATION>'",
    );
}

/// A command that does its job, `--help` and `--version` exit 0 on stdout;
/// a command without its subcommand prints its help on stderr and exits 64.
#[test]
fn success_and_help_exit_0_and_a_missing_subcommand_64() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("td.test");
    let cert = write(
        dir.path(),
        "a.pem",
        &pki.leaf("spiffe://td.test/a").chain_pem,
    );
    let out = output(&["cert", "inspect", &cert], &[]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("spiffe://td.test/a"));
    assert!(out.stderr.is_empty(), "{out:?}");

    for args in [
        &["--help"][..],
        &["--version"],
        &["proxy", "--help"],
        &["ca", "serve", "--help"],
        &["inject", "serve", "--help"],
        &["policy", "explain", "-h"],
        &["init", "--help"],
        &["cert", "inspect", "--help"],
        &["demo", "--help"],
        &["help", "proxy"],
    ] {
        let out = output(args, &[]);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(!out.stdout.is_empty(), "{args:?}: nothing on stdout");
        assert!(
            out.stderr.is_empty(),
            "{args:?}: {:?}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for args in [&[][..], &["ca"], &["policy"], &["cert"]] {
        let out = output(args, &[]);
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Usage: stepmesh"),
            "{args:?}"
        );
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

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

/// `stepmesh-proxy` is `stepmesh proxy` without the subcommand: the same
/// flags (the help of each lists the same ones), `--help` and `--version`
/// 0, a command line it refuses 64 with one `stepmesh: ` line.
#[test]
fn stepmesh_proxy_takes_the_flags_and_exit_codes_of_stepmesh_proxy() {
    const PROXY_BIN: &str = env!("CARGO_BIN_EXE_stepmesh-proxy");
    let proxy = |args: &[&str]| {
        let out = Command::new("timeout")
            .arg("20")
            .arg(PROXY_BIN)
            .args(args)
            .env("RUST_LOG", "error")
            .env_remove("STEPMESH_DRAIN_TIMEOUT")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };
    let flags = |help: &str| {
        let mut flags: Vec<String> = help
            .split(|c: char| c.is_whitespace() || c == ',' || c == '=' || c == '[')
            .filter(|w| w.starts_with("--") && w.len() > 2)
            .map(str::to_owned)
            .collect();
        flags.sort();
        flags.dedup();
        flags
    };
    let (code, help, _) = proxy(&["--help"]);
    assert_eq!(code, Some(0), "{help}");
    let subcommand_help =
        String::from_utf8_lossy(&output(&["proxy", "--help"], &[]).stdout).into_owned();
    assert!(flags(&help).contains(&"--transparent".to_owned()), "{help}");
    assert_eq!(flags(&help), flags(&subcommand_help));
    let (code, version, _) = proxy(&["--version"]);
    assert_eq!(code, Some(0));
    assert!(version.starts_with("stepmesh-proxy "), "{version}");

    for (args, needle) in [
        (
            &["--drain-timeout", "xyz"][..],
            "invalid value 'xyz' for '--drain-timeout <DURATION>'",
        ),
        (&["--log-format", "xml"], "(possible values: plain, json)"),
        (&["proxy"], "unexpected argument 'proxy' found"),
        (&["--ca", "ca:1"], "required arguments were not provided"),
    ] {
        let (code, _, stderr) = proxy(args);
        assert_one_line(
            code,
            &stderr,
            64,
            &format!("stepmesh-proxy {args:?}"),
            needle,
        );
    }
    // No listener: a configuration error found after parsing, 64 too.
    let (code, _, stderr) = proxy(&["--cert", "c", "--key", "k", "--bundle", "b"]);
    assert_one_line(
        code,
        &stderr,
        64,
        "stepmesh-proxy without listeners",
        "no listener",
    );
}
