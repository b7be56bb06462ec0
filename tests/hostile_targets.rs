//! Hostile request targets against a route with step-up, through a real
//! sidecar pair on raw sockets: every spelling of a protected path either
//! meets the step-up challenge (401) or is refused (400), and never reaches
//! the app; `stepmesh policy explain` gives the same answer for each.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::mesh::{free_port, http_ok_app, Mesh, CLIENT_ID};
use stepmesh::stepup::testing::TestIdp;

/// (method, request target, extra header lines, expected status).
const TABLE: &[(&str, &str, &str, u16)] = &[
    // The route as written, and the readings common frameworks make of it.
    ("POST", "/refunds/1", "", 401),
    ("POST", "/refunds", "", 401),
    ("POST", "/refunds/", "", 401),
    ("POST", "/REFUNDS/1", "", 401),
    ("POST", "/Refunds/1", "", 401),
    ("POST", "/rEfUnDs", "", 401),
    // Rails routes `/refunds.json` as `/refunds` (its `(.:format)`).
    ("POST", "/refunds.json", "", 401),
    ("POST", "/refunds/1.json", "", 401),
    ("POST", "/refunds;x", "", 401),
    ("POST", "/refunds;jsessionid=abc/1", "", 401),
    ("POST", "/refunds/1;v=2", "", 401),
    ("POST", "/REFUNDS;x/1", "", 401),
    ("POST", "/%72efunds/1", "", 401),
    ("POST", "/refund%73/1", "", 401),
    ("POST", "/%52EFUNDS/1", "", 401),
    ("POST", "/refunds/%E2%82%AC", "", 401),
    // `ſ`, upper case `S`: `/refunds` to Java's equalsIgnoreCase and Go's
    // EqualFold.
    ("POST", "/refund%C5%BF/1", "", 401),
    ("POST", "/REFUND%C5%BF", "", 401),
    ("POST", "/refunds?next=/../public", "", 401),
    ("post", "/refunds/1", "", 401),
    ("HEAD", "/statements/1", "", 401),
    // A POST an app's method override runs as the GET route: the field in
    // any spelling a server files under its key, `_method` in the query as
    // Express reads it and as PHP files `.method`.
    (
        "POST",
        "/statements/1",
        "X-HTTP-Method-Override: GET\r\n",
        401,
    ),
    (
        "POST",
        "/statements/1",
        "X_HTTP_Method_Override: GET\r\n",
        401,
    ),
    (
        "POST",
        "/statements/1",
        "X.HTTP.Method.Override: GET\r\n",
        401,
    ),
    ("POST", "/statements/1?_method=GET", "", 401),
    ("POST", "/statements/1?.method=GET", "", 401),
    ("POST", "/statements/1?_method%00x=GET", "", 401),
    ("GET", "/Statements/1/", "", 401),
    ("POST", "http://payments/refunds/1", "", 401),
    // Refused before matching.
    ("POST", "//refunds/1", "", 400),
    ("POST", "/refunds//1", "", 400),
    ("POST", "/x/../refunds/1", "", 400),
    ("POST", "/./refunds/1", "", 400),
    ("POST", "/refunds/./1", "", 400),
    ("POST", "/refunds/1/..", "", 400),
    ("POST", "/x/%2e%2e/refunds/1", "", 400),
    ("POST", "/x/%2E%2E/refunds/1", "", 400),
    ("POST", "/x/.%2e/refunds/1", "", 400),
    ("POST", "/refunds/%2e", "", 400),
    ("POST", "/..;/refunds/1", "", 400),
    ("POST", "/x/..;/refunds/1", "", 400),
    ("POST", "/refunds%2F1", "", 400),
    ("POST", "/refunds%2f1", "", 400),
    ("POST", "/refunds%5C1", "", 400),
    ("POST", "/refunds\\1", "", 400),
    ("POST", "/refunds%251", "", 400),
    ("POST", "/refunds%3b/1", "", 400),
    ("POST", "/refunds%00/1", "", 400),
    ("POST", "/refunds/1%00", "", 400),
    ("POST", "/refunds/1%0d%0a", "", 400),
    ("POST", "/%c0%ae%c0%ae/refunds/1", "", 400),
    ("POST", "/%c0%afrefunds/1", "", 400),
    ("POST", "/refunds/%ff", "", 400),
    ("POST", "/refunds/%zz", "", 400),
    ("POST", "/refunds#x", "", 400),
    ("POST", "refunds/1", "", 400),
    ("OPTIONS", "*", "", 400),
    ("POST", "http://other/refunds/1", "", 400),
    ("POST", "http://user@payments/refunds/1", "", 400),
    ("POST", "/refunds/1", "Host: payments\r\n", 400),
];

fn policy(port: u16, jwks: &Path) -> String {
    format!(
        r#"
trustDomain: mesh.test
stepUp:
  providers:
    idp:
      issuer: https://idp.example.com
      jwks: {{file: {jwks}}}
      audiences: [payments]
      algorithms: [ES256]
inbound:
  default: deny
  ports:
    - port: {port}
      protocol: http
      allow: [{{from: [{CLIENT_ID}]}}]
      routes:
        - name: refunds
          match: {{path: /refunds/*}}
          stepUp: {{provider: idp}}
        - name: statements
          match: {{methods: [GET], path: /statements/*}}
          stepUp: {{provider: idp}}
"#,
        jwks = jwks.display()
    )
}

/// Sends one request on a new connection; the status of the answer.
fn send(outbound: SocketAddr, method: &str, target: &str, extra: &str) -> u16 {
    let mut s = TcpStream::connect(outbound).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req =
        format!("{method} {target} HTTP/1.1\r\nHost: payments\r\n{extra}Content-Length: 0\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    // The head only: the connection stays open (keep-alive).
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    status
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{method} {target}: no status line in {status:?}"))
}

/// `stepmesh policy explain`'s status for the same request.
fn explain(policy: &Path, port: u16, method: &str, target: &str, extra: &str) -> u16 {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stepmesh"));
    cmd.args(["policy", "explain"])
        .arg(policy)
        .args(["--from", CLIENT_ID, "--port", &port.to_string()])
        .args(["--method", method, "--path", target, "--host", "payments"]);
    for field in extra.lines() {
        match field.strip_prefix("Host: ") {
            Some(host) => cmd.args(["--host", host]),
            None => cmd.args(["--header", field]),
        };
    }
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{method} {target}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let decision = text
        .lines()
        .find_map(|l| l.strip_prefix("decision: "))
        .unwrap_or_else(|| panic!("no decision in {text}"));
    decision
        .split(' ')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{method} {target}: explain says {decision:?}"))
}

#[test]
fn no_spelling_of_a_protected_path_reaches_the_app_unchallenged() {
    assert!(TABLE.len() >= 40);
    let (app, seen) = http_ok_app();
    let dir = tempfile::tempdir().unwrap();
    let idp = TestIdp::new("https://idp.example.com").unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, idp.jwks().to_string()).unwrap();
    let port = free_port();
    let policy_file = dir.path().join("policy.yaml");
    std::fs::write(&policy_file, policy(port, &jwks)).unwrap();
    let mesh = Mesh::start_on(
        port,
        app,
        &["--policy".into(), policy_file.display().to_string()],
        &[],
    );
    let (server, outbound) = (&mesh.server, mesh.outbound);

    // The control: an unprotected path reaches the app.
    assert_eq!(send(outbound, "GET", "/public", ""), 200);
    assert_eq!(seen.lock().unwrap().len(), 1);

    let mut wrong = Vec::new();
    for &(method, target, extra, want) in TABLE {
        let got = send(outbound, method, target, extra);
        let explained = explain(&policy_file, port, method, target, extra);
        if got != want || explained != want {
            wrong.push(format!(
                "{method} {target} {extra:?}: sidecar {got}, explain {explained}, want {want}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    let seen = seen.lock().unwrap();
    assert_eq!(
        seen.len(),
        1,
        "only the control request reaches the app: {seen:?}"
    );
    let metrics = server.metrics();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("stepmesh_http_refusals_total{")
                && l.contains(r#"reason="path_dot_segment""#)
                && !l.ends_with(" 0")),
        "refusals are counted by reason: {metrics}"
    );
}
