//! Exit codes of the real binary, every row of the README's exit-code
//! paragraph: 0 for `--help` and `--version`; 64 and one line on stderr for
//! anything wrong in what the operator gave — the command line (a value a
//! parser rejects, an unknown flag, a missing argument), a config, policy or
//! identity file; 1 for a run that fails (a port in use). At start, an
//! identity file that does not exist yet is waited for and `/ready` says so
//! (those rows, and identity files that cannot work: tests/identity_files.rs).
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::net::TcpListener;
use std::process::Command;

use common::cli::{assert_config_error, assert_one_line, output, run, write};
use stepmesh_ca::testing::Pki;

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
