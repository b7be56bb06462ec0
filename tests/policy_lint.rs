//! `stepmesh policy lint` as a CI pipeline runs it: the fixture set in
//! tests/fixtures/lint reports each risky case with its file, field and
//! code; the clean policies of deploy/ are quiet; exit 0/1/64.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::path::Path;
use std::process::{Command, Output};

fn lint(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stepmesh"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["policy", "lint"])
        .args(args)
        .output()
        .unwrap()
}

const FIXTURES: [&str; 3] = [
    "tests/fixtures/lint/payments.yaml",
    "tests/fixtures/lint/egress.yaml",
    "tests/fixtures/lint/gateway.yaml",
];

/// `file: field: CODE` of each printed line.
fn located(o: &Output) -> Vec<String> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| {
            let mut parts = l.splitn(3, ": ");
            let (file, field, rest) = (parts.next(), parts.next(), parts.next());
            let code = rest.unwrap().split(' ').next().unwrap();
            format!("{}: {}: {code}", file.unwrap(), field.unwrap())
        })
        .collect()
}

#[test]
fn each_risky_case_is_reported_with_file_field_and_code() {
    let o = lint(&FIXTURES);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let p = FIXTURES[0];
    let e = FIXTURES[1];
    let g = FIXTURES[2];
    assert_eq!(
        located(&o),
        [
            format!("{p}: inbound.default: SM001"),
            format!("{p}: inbound.ports[0].allow[0].from[1]: SM004"),
            format!("{p}: inbound.ports[0].routes[1].match.methods: SM002"),
            format!("{p}: inbound.ports[0].routes[2].stepUp.bindToPeer: SM009"),
            format!("{p}: inbound.ports[0].routes[2]: SM005"),
            format!("{e}: mode: SM003"),
            format!("{e}: outbound.rules[0].to.cidrs: SM006"),
            format!("{g}: kubernetes.rules[0]: SM008"),
            format!("{g}: kubernetes.rules[1].verbs: SM007"),
        ]
    );
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("mode: SM003 warning: audit"), "{text}");
    assert!(
        text.contains("\"one-refund\" never matches: \"refunds\""),
        "{text}"
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("7 finding(s) (2 warning(s))"));
}

#[test]
fn allow_silences_a_code_and_warnings_alone_pass() {
    let o = lint(&[FIXTURES[1], "--allow", "SM006"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(located(&o), [format!("{}: mode: SM003", FIXTURES[1])]);
    let o = lint(&[FIXTURES[1], "--allow", "SM006", "--allow", "SM003"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(o.stdout.is_empty());
    let o = lint(&["tests/fixtures/lint/audit-only.yaml"]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(located(&o).len(), 1);
    // In a namespace marked production, audit mode fails the lint.
    let o = lint(&[
        "tests/fixtures/lint/audit-only.yaml",
        "--production",
        "shop",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("mode: SM003 audit:") && text.ends_with("(a production namespace)\n"),
        "{text}"
    );
    let o = lint(&[
        "tests/fixtures/lint/audit-only.yaml",
        "--production",
        "other",
    ]);
    assert_eq!(o.status.code(), Some(0));
}

#[test]
fn json_lists_the_same_findings() {
    let text = lint(&FIXTURES);
    let json = lint(&[&FIXTURES[..], &["--format", "json"]].concat());
    assert_eq!(json.status.code(), Some(1));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(rows.len(), located(&text).len());
    assert_eq!(rows[0]["file"], FIXTURES[0]);
    assert_eq!(rows[0]["field"], "inbound.default");
    assert_eq!(rows[0]["code"], "SM001");
    assert_eq!(rows[0]["severity"], "error");
    assert_eq!(rows[3]["code"], "SM009");
    assert_eq!(rows[3]["severity"], "warning");
    assert_eq!(rows[5]["severity"], "warning");
}

#[test]
fn the_policies_of_deploy_are_clean() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in ["deploy/example", "deploy/gateway"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_owned();
            if name.starts_with("policy") && name.ends_with(".yaml") {
                files.push(format!("{dir}/{name}"));
            }
        }
    }
    assert_eq!(files.len(), 3, "{files:?}");
    let args: Vec<&str> = files.iter().map(String::as_str).collect();
    let o = lint(&args);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(o.stdout.is_empty());
}

#[test]
fn unreadable_or_invalid_input_exits_64_naming_it() {
    let o = lint(&[
        FIXTURES[0],
        "tests/fixtures/lint/invalid.yaml",
        "/nonexistent/p.yaml",
    ]);
    assert_eq!(o.status.code(), Some(64));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("invalid.yaml: inbound.ports[0].port: port 0 is not a port"),
        "{err}"
    );
    assert!(err.contains("/nonexistent/p.yaml: reading policy"), "{err}");
    assert!(
        o.stdout.is_empty(),
        "nothing reported when some input is unusable"
    );
    let o = lint(&[FIXTURES[0], "--allow", "SM999"]);
    assert_eq!(o.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--allow \"SM999\""));
}
