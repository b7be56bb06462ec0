//! One duration grammar everywhere (src/units.rs): each row is taken, or
//! refused for the same reason, by a flag of every command of the real
//! binary, a policy field, an injector configuration field and a per-pod
//! annotation.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::process::Command;
use std::time::Duration;

use serde_json::{Map, Value};
use stepmesh::inject::config::InjectorConfig;
use stepmesh::inject::overrides::{PodSettings, PROXY_DRAIN_TIMEOUT};
use stepmesh::policy::Policy;

const BIN: &str = env!("CARGO_BIN_EXE_stepmesh");

const MS: fn(u64) -> Duration = Duration::from_millis;

/// The grammar, as a user meets it. `Err` holds what the one-line reason
/// must say.
fn table() -> Vec<(&'static str, Result<Duration, &'static str>)> {
    vec![
        ("500ms", Ok(MS(500))),
        ("1.5s", Ok(MS(1_500))),
        ("30s", Ok(MS(30_000))),
        ("10m", Ok(MS(600_000))),
        ("1h", Ok(MS(3_600_000))),
        ("1h30m", Ok(MS(5_400_000))),
        ("24h", Ok(MS(86_400_000))),
        ("7d", Ok(MS(604_800_000))),
        ("0", Ok(Duration::ZERO)),
        ("0s", Ok(Duration::ZERO)),
        ("", Err("expected a duration")),
        ("xyz", Err("expected a duration")),
        ("1h 30m", Err("expected a duration")),
        ("30", Err("missing unit")),
        ("-5s", Err("negative")),
        ("1y", Err("unknown unit")),
        ("36501d", Err("longer than the maximum")),
        ("99999999999999999999999h", Err("longer than the maximum")),
    ]
}

/// `stepmesh ARGS`: (exit code, stderr), no `STEPMESH_*` from the caller.
fn run(args: &[&str]) -> (Option<i32>, String) {
    let mut cmd = Command::new("timeout");
    cmd.arg("20").arg(BIN).args(args);
    for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("STEPMESH_")) {
        cmd.env_remove(name);
    }
    let out = cmd
        .env("RUST_LOG", "error")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Each command with one duration flag set to `value` and something else
/// wrong that is only checked after the command line parsed: a refused
/// value names the flag, an accepted one reaches that later check.
fn commands(value: &str) -> Vec<(Vec<String>, &'static str, &'static str)> {
    let flag = |f: &str| format!("--{f}={value}");
    let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut proxy = owned(&common::PROXY_WITHOUT_FILES);
    proxy.extend(owned(&["--workers", "0"]));
    proxy.push(flag("drain-timeout"));
    let mut inject = owned(&[
        "inject",
        "serve",
        "--cert",
        "/nonexistent/c.pem",
        "--key",
        "/nonexistent/k.pem",
    ]);
    inject.push(flag("body-timeout"));
    let mut ca = owned(&[
        "ca",
        "serve",
        "--state-dir",
        "/nonexistent/state",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--default-ttl",
        "48h",
        "--max-ttl",
        "24h",
    ]);
    ca.push(flag("poll-interval"));
    vec![
        (
            proxy,
            "'--drain-timeout <DURATION>'",
            "--workers must be at least 1",
        ),
        (inject, "'--body-timeout <DURATION>'", "/nonexistent/c.pem"),
        (ca, "'--poll-interval <DURATION>'", "--default-ttl"),
    ]
}

const POLICY: &str = r#"
trustDomain: cluster.local
stepUp:
  providers:
    idp:
      issuer: https://idp.example.com
      jwks: {url: "https://idp.example.com/jwks"}
      audiences: [payments]
      algorithms: [ES256]
inbound:
  ports:
    - port: 8080
      protocol: http
      allow:
        - from: [spiffe://cluster.local/ns/web/sa/frontend]
      routes:
        - name: r
          match: {path: /x/*}
          stepUp: {provider: idp, maxAge: VALUE}
"#;

/// `value` as a YAML scalar: quoted (a JSON string is a YAML flow scalar),
/// or plain, where `0` and `30` arrive as numbers.
fn yaml_scalar(value: &str, quoted: bool) -> String {
    if quoted || value.is_empty() {
        serde_json::to_string(value).unwrap()
    } else {
        value.to_owned()
    }
}

fn policy_max_age(value: &str, quoted: bool) -> Result<Option<Duration>, String> {
    let yaml = POLICY.replace("VALUE", &yaml_scalar(value, quoted));
    let policy = Policy::from_yaml(&yaml).map_err(|e| e.to_string())?;
    let uri = http::Uri::from_static("/x/1");
    let route = policy
        .route_request(8080, &http::Method::GET, &uri, &http::HeaderMap::new())
        .unwrap()
        .unwrap();
    Ok(route.step_up.as_ref().unwrap().max_age)
}

fn injector_drain_timeout(
    dir: &std::path::Path,
    value: &str,
    quoted: bool,
) -> Result<Option<Duration>, String> {
    let path = dir.join("config.yaml");
    let yaml = format!("proxyDrainTimeout: {}\n", yaml_scalar(value, quoted));
    std::fs::write(&path, yaml).unwrap();
    InjectorConfig::load(Some(&path))
        .map(|c| c.proxy_drain_timeout)
        .map_err(|e| e.to_string())
}

fn annotation_drain_timeout(value: &str) -> Result<Option<Duration>, String> {
    let mut ann = Map::new();
    ann.insert(PROXY_DRAIN_TIMEOUT.into(), Value::String(value.into()));
    PodSettings::new(&InjectorConfig::default(), &ann)
        .map(|s| s.drain_timeout)
        .map_err(|e| e.to_string())
}

#[test]
fn every_flag_and_field_takes_the_same_durations() {
    let dir = tempfile::tempdir().unwrap();
    for (text, want) in table() {
        assert_eq!(
            stepmesh::units::parse_duration(text).map_err(|_| ()),
            want.map_err(|_| ()),
            "{text:?}: the table and the parser disagree"
        );
        for (args, flag, later) in commands(text) {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let (code, stderr) = run(&args);
            let what = format!("{text:?} {args:?}");
            assert_eq!(code, Some(64), "{what}: {stderr}");
            assert_eq!(stderr.lines().count(), 1, "{what}: {stderr}");
            match want {
                Ok(_) => {
                    assert!(!stderr.contains(flag), "{what}: refused: {stderr}");
                    assert!(stderr.contains(later), "{what}: {stderr}");
                }
                Err(reason) => {
                    assert!(stderr.contains(flag), "{what}: {stderr}");
                    assert!(stderr.contains(reason), "{what}: {stderr}");
                }
            }
        }
        let from_files = [
            ("policy maxAge", policy_max_age(text, true), "maxAge"),
            (
                "policy maxAge, plain",
                policy_max_age(text, false),
                "maxAge",
            ),
            (
                "injector proxyDrainTimeout",
                injector_drain_timeout(dir.path(), text, true),
                "proxyDrainTimeout",
            ),
            (
                "injector proxyDrainTimeout, plain",
                injector_drain_timeout(dir.path(), text, false),
                "proxyDrainTimeout",
            ),
            (
                "annotation",
                annotation_drain_timeout(text),
                PROXY_DRAIN_TIMEOUT,
            ),
        ];
        for (what, got, field) in from_files {
            match (want, got) {
                (Ok(d), Ok(got)) => assert_eq!(got, Some(d), "{what} {text:?}"),
                (Err(reason), Err(e)) => {
                    assert!(e.contains(field), "{what} {text:?}: {e}");
                    assert!(e.contains(reason), "{what} {text:?}: {e}");
                    assert_eq!(e.lines().count(), 1, "{what} {text:?}: {e}");
                }
                (want, got) => panic!("{what} {text:?}: want {want:?}, got {got:?}"),
            }
        }
    }
}
