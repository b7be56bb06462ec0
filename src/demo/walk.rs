//! The walkthrough: five requests, each printed with what the policy says,
//! what came back, and whether that is what the policy promises. Outcomes
//! are observed, never assumed: a step that cannot run says so.

use std::time::{Duration, Instant};

use hyper::Method;

use super::apps::{call, Answer};
use super::mesh::{Mesh, FRONTEND, REPORTS};

/// How one step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The observed answer is the expected one.
    AsExpected,
    /// Something else came back.
    Unexpected,
}

/// Runs the steps; returns each outcome in order.
pub async fn run(mesh: &Mesh) -> Vec<Outcome> {
    let mut outcomes = Vec::new();

    header(1, "frontend → payments: GET /balance");
    why(&format!(
        "the policy allows {FRONTEND} on port {}",
        mesh.payments_inbound.port()
    ));
    let answer = call(mesh.frontend_out, Method::GET, "/balance", &[]).await;
    show(&answer);
    outcomes.push(verdict(
        1,
        "200 OK",
        answer.status.map(|s| s.as_u16()) == Some(200),
        &answer,
    ));

    header(2, "reports (not in the policy) → payments: GET /balance");
    why(&format!(
        "{REPORTS} has a valid SVID but is not listed, and the port's default is deny"
    ));
    let answer = call(mesh.reports_out, Method::GET, "/balance", &[]).await;
    show(&answer);
    let denied = answer.status.map(|s| s.as_u16()) == Some(403);
    let expected = "403 Forbidden";
    match access_log_line(mesh, "reports").await {
        Some(line) => println!("      payments sidecar access log: {line}"),
        None => println!(
            "      (no access-log line naming {REPORTS} found in {})",
            mesh.payments_sidecar().log_path().display()
        ),
    }
    outcomes.push(verdict(2, expected, denied, &answer));

    header(3, "frontend → payments: POST /refunds without step-up");
    why("route `refunds` needs a fresh MFA token (acr urn:stepmesh:acr:mfa, maxAge 300 s) bound to the caller");
    let answer = call(mesh.frontend_out, Method::POST, "/refunds", &[]).await;
    show(&answer);
    println!(
        "      WWW-Authenticate: {}",
        answer.header("www-authenticate")
    );
    let challenged = answer.status.map(|s| s.as_u16()) == Some(401)
        && answer.header("www-authenticate").contains("acr_values=");
    outcomes.push(verdict(
        3,
        "401 with a step-up challenge",
        challenged,
        &answer,
    ));

    header(
        4,
        "the user logs in with MFA; frontend retries POST /refunds with the token",
    );
    let login = call(
        mesh.idp.addr(),
        Method::POST,
        &token_path(mesh, "alice", FRONTEND),
        &[],
    )
    .await;
    println!("      IdP token endpoint: {} (sub=alice, azp={FRONTEND}, acr=urn:stepmesh:acr:mfa, amr=[pwd, mfa])", login.describe());
    let answer = refund_with(mesh, login.body.trim()).await;
    show(&answer);
    let saw_alice = answer.status.map(|s| s.as_u16()) == Some(200)
        && answer.body.contains(r#""x-stepup-sub":"alice""#);
    if saw_alice {
        let token = match answer
            .body
            .contains(r#""token forwarded to the app":false"#)
        {
            true => "the token itself was stripped",
            false => "the token was forwarded too",
        };
        println!("      the payments app saw x-stepup-sub: alice (the verified subject); {token}");
    }
    outcomes.push(verdict(
        4,
        "200, the app sees subject alice",
        saw_alice,
        &answer,
    ));

    header(
        5,
        "frontend sends a token minted for another workload (azp = reports)",
    );
    why("bindToPeer: azp — a token stolen from reports is useless from frontend");
    let stolen = call(
        mesh.idp.addr(),
        Method::POST,
        &token_path(mesh, "alice", REPORTS),
        &[],
    )
    .await;
    let answer = refund_with(mesh, stolen.body.trim()).await;
    show(&answer);
    println!(
        "      WWW-Authenticate: {}",
        answer.header("www-authenticate")
    );
    let invalid = answer.status.map(|s| s.as_u16()) == Some(401)
        && answer.header("www-authenticate").contains("invalid_token");
    outcomes.push(verdict(5, "401 invalid_token", invalid, &answer));
    outcomes
}

/// frontend's `POST /refunds` with `token` as its Bearer token.
async fn refund_with(mesh: &Mesh, token: &str) -> Answer {
    let bearer = format!("Bearer {token}");
    call(
        mesh.frontend_out,
        Method::POST,
        "/refunds",
        &[("authorization", &bearer)],
    )
    .await
}

fn token_path(mesh: &Mesh, sub: &str, azp: &str) -> String {
    let url = mesh.idp.token_url(sub, azp);
    // The path and query of http://ADDR/token?...
    url.split_once(&mesh.idp.addr().to_string())
        .map_or(url.clone(), |(_, rest)| rest.to_owned())
}

fn header(n: usize, title: &str) {
    println!("\n[{n}/5] {title}");
}

fn why(text: &str) {
    println!("      why: {text}");
}

fn show(answer: &Answer) {
    let body: String = answer.body.chars().take(200).collect();
    println!("      → {}  {}", answer.describe(), body.trim());
}

fn verdict(n: usize, expected: &str, ok: bool, answer: &Answer) -> Outcome {
    if ok {
        println!("  step {n}: as expected ({expected})");
        Outcome::AsExpected
    } else {
        println!(
            "  step {n}: UNEXPECTED: wanted {expected}, got {}",
            answer.describe()
        );
        Outcome::Unexpected
    }
}

/// The payments sidecar's JSON access-log line (on its stdout) denying
/// `who`, waiting a little for it to be written.
async fn access_log_line(mesh: &Mesh, who: &str) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let log = mesh.payments_sidecar().log();
        let found = log
            .lines()
            .rev()
            .find(|l| l.starts_with('{') && l.contains(who) && l.contains(r#""decision":"deny""#));
        if let Some(line) = found {
            return Some(line.to_owned());
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
