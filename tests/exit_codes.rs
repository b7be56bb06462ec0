//! Exit codes of the real binary: 64 and a one-line reason for bad
//! configuration (flag values clap cannot judge, unreadable or invalid
//! config, policy and identity inputs), 1 for a run that fails (a port in
//! use), clap's 2 for usage errors.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_stepmesh");

/// Runs `stepmesh ARGS` (10 s at most) and returns (code, last stderr line).
fn run<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> (Option<i32>, String) {
    let out = Command::new("timeout")
        .arg("10")
        .arg(BIN)
        .args(args)
        .env("RUST_LOG", "error")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let last = stderr.lines().last().unwrap_or_default().to_owned();
    (out.status.code(), last)
}

fn assert_config_error<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S], needle: &str) {
    let (code, line) = run(args);
    assert_eq!(code, Some(64), "{args:?}: {line}");
    assert!(line.starts_with("stepmesh: "), "{args:?}: {line}");
    assert!(line.contains(needle), "{args:?}: {needle:?} not in {line}");
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
    let files = [
        "--cert",
        "/nonexistent/c.pem",
        "--key",
        "/nonexistent/k.pem",
        "--bundle",
        "/nonexistent/b.pem",
        "--inbound",
        "127.0.0.1:0=127.0.0.1:1",
        "--admin",
        "127.0.0.1:0",
    ];
    let proxy = |extra: &[&str]| -> Vec<String> {
        let mut args = vec!["proxy".to_owned()];
        args.extend(files.iter().chain(extra).map(|a| a.to_string()));
        args
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
fn runtime_failures_exit_1_and_usage_errors_2() {
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
    assert_eq!(code, Some(1), "{line}");
    assert!(line.contains("--admin"), "{line}");
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
    assert_eq!(code, Some(1), "{line}");
    assert!(line.contains("binding"), "{line}");
    // clap's own usage errors keep clap's code.
    assert_eq!(run(&["proxy", "--no-such-flag"]).0, Some(2));
}
