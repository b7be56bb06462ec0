//! `stepmesh gateway` in front of a real kube-apiserver (envtest), with the
//! real kubectl as the client: routine reads pass with a plain login,
//! sensitive actions need a fresh MFA login, the API server sees and audits
//! the impersonated person, bad credentials never reach it, and watches and
//! long lists stream through. Skips (printing why) without
//! `KUBEBUILDER_ASSETS`.

#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use std::io::{BufRead as _, BufReader};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::envtest::Envtest;
use common::gateway::Gateway;
use serde_json::{json, Value};
use stepmesh::stepup::testing::{base_claims, now, TestIdp};

const ISSUER: &str = "https://idp.stepmesh.test";
const MFA: &str = "urn:stepmesh:acr:mfa";
const PWD: &str = "urn:stepmesh:acr:pwd";
const ALICE: &str = "alice@example.com";

struct Fixture {
    k8s: &'static Envtest,
    idp: TestIdp,
    gateway: Gateway,
}

fn policy(jwks: &std::path::Path) -> String {
    format!(
        r#"trustDomain: example.org
stepUp:
  providers:
    corp:
      issuer: {ISSUER}
      jwks: {{file: {jwks}}}
      audiences: [kubectl]
      algorithms: [ES256, RS256]
kubernetes:
  authentication: {{provider: corp, usernameClaim: email, groupsClaim: groups, groupsPrefix: "oidc:"}}
  rules:
  - name: exec-in-prod
    verbs: [connect]
    resources: [pods/exec, pods/attach, pods/portforward]
    namespaces: ["prod*"]
    stepUp: {{provider: corp, acr: [{MFA}], maxAge: 10m}}
  - name: delete-in-prod
    verbs: [delete, deletecollection]
    resources: ["*"]
    namespaces: ["prod*"]
    stepUp: {{provider: corp, acr: [{MFA}], maxAge: 10m}}
"#,
        jwks = jwks.display()
    )
}

fn fixture() -> Option<&'static Fixture> {
    static F: OnceLock<Fixture> = OnceLock::new();
    let k8s = Envtest::shared()?;
    Some(F.get_or_init(|| {
        let (idp, jwks) = common::gateway::idp_with_jwks(ISSUER);
        // Alice may do anything: RBAC is not what these tests are about.
        k8s.apply(&format!(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  name: alice-admin\n\
             roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: cluster-admin}}\n\
             subjects:\n- {{apiGroup: rbac.authorization.k8s.io, kind: User, name: \"{ALICE}\"}}\n"
        ));
        let gateway = Gateway::start(k8s, &k8s.url, &k8s.ca_file, &policy(&jwks));
        Fixture { k8s, idp, gateway }
    }))
}

/// A token for alice, logged in `age` seconds ago with `acr`.
fn token(f: &Fixture, acr: &str, age: i64) -> String {
    let mut c = base_claims(ISSUER, "kubectl", "alice");
    c["email"] = json!(ALICE);
    c["groups"] = json!(["developers"]);
    c["acr"] = json!(acr);
    c["amr"] = if acr == MFA {
        json!(["pwd", "otp"])
    } else {
        json!(["pwd"])
    };
    c["auth_time"] = json!(now() - age);
    f.idp.es256(&c).unwrap()
}

fn fresh_namespace(f: &Fixture, prefix: &str) -> String {
    let ns = format!("{prefix}-{:06x}", fastrand::u32(..1 << 24));
    f.k8s.create_namespace(&ns);
    ns
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn a_plain_login_reads_without_step_up() {
    let Some(f) = fixture() else { return };
    let ns = fresh_namespace(f, "prod");
    f.k8s.create_configmap(&ns, "settings", &[("a", "1")]);
    let out = f.gateway.kubectl(
        f.k8s,
        &token(f, PWD, 3600),
        &["get", "configmaps", "-n", &ns],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("settings"),
        "{}",
        text(&out.stdout)
    );
    let line = f
        .gateway
        .wait_audit_line(|l| l["namespace"] == json!(ns) && l["verb"] == "list")
        .expect("an audit line for the list");
    assert_eq!(line["user"], ALICE);
    assert_eq!(line["groups"], json!(["oidc:developers"]));
    assert_eq!(line["decision"], "allowed");
    assert_eq!(line["status"], 200);
}

#[test]
fn delete_in_prod_needs_mfa_and_the_api_server_audits_who_and_how() {
    let Some(f) = fixture() else { return };
    let ns = fresh_namespace(f, "prod");
    f.k8s.create_configmap(&ns, "x", &[("a", "1")]);

    let out = f.gateway.kubectl(
        f.k8s,
        &token(f, PWD, 60),
        &["delete", "configmap", "x", "-n", &ns],
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("step-up required by rule \"delete-in-prod\""),
        "{err}"
    );
    assert!(
        err.contains(MFA) && err.contains("Run the same kubectl command again"),
        "{err}"
    );
    f.k8s.kubectl_ok(&["get", "configmap", "x", "-n", &ns]); // still there

    // What `stepmesh login` reads: the step-up this person owes.
    let pwd = format!("Bearer {}", token(f, PWD, 60));
    let owed = f.gateway.client().request(
        "GET",
        "/stepmesh/v1/challenge",
        &[("Authorization", &pwd)],
        b"",
    );
    assert_eq!(owed.status, 200, "{}", owed.body_text());
    let owed: Value = serde_json::from_slice(&owed.body).unwrap();
    assert_eq!(owed["rule"], "delete-in-prod");
    assert_eq!(owed["acrValues"], json!([MFA]));
    assert_eq!(owed["maxAge"], 600);
    assert_eq!(owed["issuer"], ISSUER);
    // Audited as every request, a token tried there included.
    let line = f
        .gateway
        .wait_audit_line(|l| l["path"] == "/stepmesh/v1/challenge" && l["status"] == 200)
        .expect("an audit line for the challenge");
    assert_eq!(
        (&line["user"], &line["decision"]),
        (&json!(ALICE), &json!("challenge_pending"))
    );
    let forged = f.gateway.client().request(
        "GET",
        "/stepmesh/v1/challenge",
        &[("Authorization", "Bearer not.a.token")],
        b"",
    );
    assert_eq!(forged.status, 401);
    let line = f
        .gateway
        .wait_audit_line(|l| l["path"] == "/stepmesh/v1/challenge" && l["status"] == 401)
        .expect("an audit line for the refused challenge");
    assert_eq!(line["user"], json!(null), "{line}");

    let out = f.gateway.kubectl(
        f.k8s,
        &token(f, MFA, 5),
        &["delete", "configmap", "x", "-n", &ns],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let gone = f.k8s.kubectl(&["get", "configmap", "x", "-n", &ns]);
    assert!(
        text(&gone.stderr).contains("NotFound"),
        "{}",
        text(&gone.stderr)
    );

    // The API server's own audit log: the gateway's account, acting as alice,
    // with the step-up facts as extras.
    let deadline = Instant::now() + Duration::from_secs(10);
    let event = loop {
        let found = f.k8s.audit().events().into_iter().find(|e| {
            e.verb == "delete"
                && e.object_ref
                    .as_ref()
                    .is_some_and(|o| o.namespace == ns && o.name == "x")
                && e.stage == "ResponseComplete"
        });
        if let Some(e) = found {
            break e;
        }
        assert!(Instant::now() < deadline, "no audit event for the delete");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        event.user.username,
        "system:serviceaccount:stepmesh-system:stepmesh-gateway"
    );
    let who = event.impersonated_user.expect("impersonated");
    assert_eq!(who.username, ALICE);
    assert!(
        who.groups.contains(&"oidc:developers".to_owned()),
        "{:?}",
        who.groups
    );
    assert_eq!(
        who.extra.get("stepmesh.io/acr"),
        Some(&vec![MFA.to_owned()])
    );
    assert_eq!(
        who.extra.get("stepmesh.io/amr"),
        Some(&vec!["pwd".to_owned(), "otp".to_owned()])
    );
    assert!(
        who.extra.contains_key("stepmesh.io/auth-time"),
        "{:?}",
        who.extra
    );
    // Met: nothing is owed any more.
    let mfa = format!("Bearer {}", token(f, MFA, 5));
    let owed = f.gateway.client().request(
        "GET",
        "/stepmesh/v1/challenge",
        &[("Authorization", &mfa)],
        b"",
    );
    assert_eq!(owed.status, 204, "{}", owed.body_text());
}

#[test]
fn a_policy_reload_changes_what_needs_step_up_without_a_restart() {
    let Some(f) = fixture() else { return };
    let jwks = f.gateway.dir.path().join("reload-jwks.json");
    std::fs::write(&jwks, f.idp.jwks().to_string()).unwrap();
    let gateway = Gateway::start(f.k8s, &f.k8s.url, &f.k8s.ca_file, &policy(&jwks));
    let ns = fresh_namespace(f, "prod");
    f.k8s.create_configmap(&ns, "reloaded", &[("a", "1")]);
    let pwd = token(f, PWD, 60);
    let delete = ["delete", "configmap", "reloaded", "-n", ns.as_str()];
    let out = gateway.kubectl(f.k8s, &pwd, &delete);
    assert!(!out.status.success(), "deleted before the reload");
    // The same policy with its delete rule narrowed to nothing.
    let relaxed = policy(&jwks).replace("resources: [\"*\"]", "resources: [nothing]");
    assert_ne!(relaxed, policy(&jwks));
    std::fs::write(&gateway.policy_file, relaxed).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = gateway.kubectl(f.k8s, &pwd, &delete);
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still refused: {}",
            text(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // A broken policy is refused and the last good one stays.
    std::fs::write(&gateway.policy_file, "kubernetes: [").unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    let out = gateway.kubectl(f.k8s, &pwd, &["get", "configmaps", "-n", &ns]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let log = std::fs::read_to_string(&gateway.proc.log).unwrap();
    assert!(
        log.contains("policy reload refused; keeping the current policy"),
        "{log}"
    );
}

#[test]
fn after_max_age_sensitive_actions_ask_again_and_routine_ones_never_do() {
    let Some(f) = fixture() else { return };
    let ns = fresh_namespace(f, "prod");
    f.k8s.create_configmap(&ns, "cfg-y", &[("a", "1")]);
    let stale = token(f, MFA, 11 * 60); // maxAge is 10m
    let out = f
        .gateway
        .kubectl(f.k8s, &stale, &["delete", "configmap", "cfg-y", "-n", &ns]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("More recent authentication is required"),
        "{}",
        text(&out.stderr)
    );
    let out = f
        .gateway
        .kubectl(f.k8s, &stale, &["get", "configmap", "cfg-y", "-n", &ns]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Outside prod, no rule: a delete needs no step-up at all.
    let dev = fresh_namespace(f, "dev");
    f.k8s.create_configmap(&dev, "cfg-z", &[("a", "1")]);
    let out = f.gateway.kubectl(
        f.k8s,
        &token(f, PWD, 7200),
        &["delete", "configmap", "cfg-z", "-n", &dev],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn bad_credentials_and_impersonation_are_refused_before_the_api_server() {
    let Some(f) = fixture() else { return };
    let ns = fresh_namespace(f, "prod");
    let mut other_aud = base_claims(ISSUER, "someone-else", "alice");
    other_aud["email"] = json!(ALICE);
    let mut expired = base_claims(ISSUER, "kubectl", "alice");
    expired["email"] = json!(ALICE);
    expired["exp"] = json!(now() - 3600);
    let mut good = base_claims(ISSUER, "kubectl", "alice");
    good["email"] = json!(ALICE);
    let stranger = TestIdp::new(ISSUER).unwrap().es256(&good).unwrap();
    let none = {
        use base64::Engine as _;
        let b = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.",
            b.encode(r#"{"alg":"none"}"#),
            b.encode(good.to_string())
        )
    };
    let valid = token(f, MFA, 0);
    /// What is sent, its token, extra headers, the status and message expected.
    type Case<'a> = (
        &'a str,
        Option<String>,
        Vec<(&'a str, &'a str)>,
        u16,
        &'a str,
    );
    let cases: Vec<Case<'_>> = vec![
        ("no token", None, vec![], 401, "no bearer token"),
        (
            "other audience",
            Some(f.idp.es256(&other_aud).unwrap()),
            vec![],
            401,
            "audience is not accepted",
        ),
        (
            "expired",
            Some(f.idp.es256(&expired).unwrap()),
            vec![],
            401,
            "has expired",
        ),
        (
            "alg none",
            Some(none),
            vec![],
            401,
            "algorithm is not accepted",
        ),
        (
            "unknown key",
            Some(stranger),
            vec![],
            401,
            "signing key is unknown",
        ),
        (
            "impersonation",
            Some(valid),
            vec![("Impersonate-User", "bob")],
            403,
            "impersonate-user",
        ),
    ];
    let client = f.gateway.client();
    for (i, (what, bearer, extra, code, message)) in cases.into_iter().enumerate() {
        let target = format!("/api/v1/namespaces/{ns}/configmaps/marker-{i}");
        let auth = bearer.map(|t| format!("Bearer {t}"));
        let mut headers: Vec<(&str, &str)> = extra;
        if let Some(a) = &auth {
            headers.push(("Authorization", a));
        }
        let r = client.request("GET", &target, &headers, b"");
        assert_eq!(r.status, code, "{what}: {}", r.body_text());
        let status: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(status["kind"], "Status", "{what}");
        let m = status["message"].as_str().unwrap().to_lowercase();
        assert!(m.contains(message), "{what}: {m}");
    }
    // A method the API server reads no verb for: refused, not guessed.
    let auth = format!("Bearer {}", token(f, MFA, 0));
    let target = format!("/api/v1/namespaces/{ns}/configmaps/marker-options");
    let r = client.request("OPTIONS", &target, &[("Authorization", &auth)], b"");
    assert_eq!(r.status, 400, "{}", r.body_text());
    std::thread::sleep(Duration::from_millis(300));
    let reached: Vec<String> = f
        .k8s
        .audit()
        .events()
        .into_iter()
        .map(|e| e.request_uri)
        .filter(|u| u.contains(&format!("{ns}/configmaps/marker-")))
        .collect();
    assert!(reached.is_empty(), "reached the API server: {reached:?}");
}

/// A watch's events stream through the gateway while the watch is open (a
/// buffering proxy would hold them until it ends). The lag is printed; the
/// bound is for streaming, not speed (1 s failed once on a loaded machine).
#[test]
fn a_watch_event_streams_through_while_the_watch_is_open() {
    let Some(f) = fixture() else { return };
    let ns = fresh_namespace(f, "dev");
    let mut watch = f
        .gateway
        .kubectl_command(
            f.k8s,
            &token(f, PWD, 0),
            &[
                "get",
                "configmaps",
                "-n",
                &ns,
                "-w",
                "--output-watch-events",
                "-o",
                "name",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = watch.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send((Instant::now(), line));
        }
    });
    // The watch is established once its first (empty) list returned.
    std::thread::sleep(Duration::from_secs(2));
    let changed = Instant::now();
    f.k8s.create_configmap(&ns, "watched", &[("a", "1")]);
    let (seen, line) = loop {
        let (at, line) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("no watch event");
        if line.contains("watched") {
            break (at, line);
        }
    };
    let _ = watch.kill();
    let _ = watch.wait();
    let lag = seen.saturating_duration_since(changed);
    println!("watch event {line:?} {lag:?} after the change (including kubectl apply)");
    assert!(lag < Duration::from_secs(5), "{lag:?}");
}

#[test]
fn a_list_of_ten_thousand_objects_streams_through() {
    let Some(f) = fixture() else { return };
    let ns = fresh_namespace(f, "dev");
    let started = Instant::now();
    let admin = std::sync::Arc::new(f.k8s.admin());
    std::thread::scope(|s| {
        for t in 0..8 {
            let (admin, ns) = (admin.clone(), ns.clone());
            s.spawn(move || {
                for i in (t..10_000).step_by(8) {
                    let body = json!({"apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": format!("cm-{i:05}")}, "data": {"i": i.to_string()}});
                    let r = admin.request(
                        "POST",
                        &format!("/api/v1/namespaces/{ns}/configmaps"),
                        &[("Content-Type", "application/json")],
                        body.to_string().as_bytes(),
                    );
                    assert_eq!(r.status, 201, "{}", r.body_text());
                }
            });
        }
    });
    println!("created 10,000 ConfigMaps in {:?}", started.elapsed());
    let started = Instant::now();
    let out = f.gateway.kubectl(
        f.k8s,
        &token(f, PWD, 0),
        &[
            "get",
            "configmaps",
            "-n",
            &ns,
            "-o",
            "name",
            "--chunk-size=0",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let names = text(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("configmap/cm-"))
        .count();
    println!(
        "listed {names} through the gateway in {:?}",
        started.elapsed()
    );
    assert_eq!(names, 10_000);
}

/// A watch through the gateway on its own TLS connection (HTTP/1.1, as one
/// kubectl process): the response head's status code.
fn open_watch(
    f: &Fixture,
    config: &std::sync::Arc<rustls::ClientConfig>,
    path: &str,
    token: &str,
) -> (
    u16,
    rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>,
) {
    use std::io::{Read as _, Write as _};
    let tcp = std::net::TcpStream::connect(("127.0.0.1", f.gateway.port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(config.clone(), name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    write!(
        tls,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        tls.read_exact(&mut byte)
            .unwrap_or_else(|e| panic!("no response head to {path}: {e}"));
        head.push(byte[0]);
    }
    let status = text(&head)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, tls)
}

#[test]
fn more_watches_than_one_http2_connection_carries_all_open_and_reads_still_answer() {
    // The API server allows 100 streams per HTTP/2 connection; the
    // gateway's shared upstream connection must not carry watches.
    use rustls::pki_types::pem::PemObject as _;
    let Some(f) = fixture() else { return };
    let ns = fresh_namespace(f, "watches");
    let token = token(f, PWD, 60);
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(f.gateway.ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let path = format!("/api/v1/namespaces/{ns}/configmaps?watch=true");
    let held: Vec<_> = (0..120)
        .map(|i| {
            let (status, tls) = open_watch(f, &config, &path, &token);
            assert_eq!(status, 200, "watch {i}");
            tls
        })
        .collect();
    let out = f
        .gateway
        .kubectl(f.k8s, &token, &["get", "configmaps", "-n", &ns]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    drop(held);
}
