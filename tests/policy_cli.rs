//! `stepmesh policy check | explain | netpol` as an operator runs them.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::json;
use stepmesh::stepup::testing::{base_claims, mint_hs256, now, TestIdp};

const ISS: &str = "https://idp.example.com";
const FRONTEND: &str = "spiffe://cluster.local/ns/web/sa/frontend";

fn stepmesh(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stepmesh"))
        .args(args)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

struct Setup {
    _dir: tempfile::TempDir,
    policy: PathBuf,
    idp: TestIdp,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let idp = TestIdp::new(ISS).unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, idp.jwks().to_string()).unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            r#"
trustDomain: cluster.local
stepUp:
  providers:
    corp-idp:
      issuer: {ISS}
      jwks: {{file: {}}}
      audiences: [payments]
      algorithms: [ES256, RS256]
inbound:
  default: deny
  ports:
    - port: 8080
      protocol: http
      allow:
        - name: web-and-ops
          from: [{FRONTEND}, spiffe://cluster.local/ns/ops/*]
      routes:
        - name: refunds
          match: {{methods: [POST, DELETE], path: /refunds/*}}
          from: [{FRONTEND}]
          stepUp:
            provider: corp-idp
            acr: [urn:stepmesh:acr:mfa]
            maxAge: 300s
            bindToPeer: azp
        - name: bound
          match: {{path: /bound}}
          stepUp: {{provider: corp-idp, bindToPeer: cnf}}
    - port: 5432
      protocol: tcp
      allow:
        - from: [spiffe://cluster.local/ns/payments/sa/api]
kubernetes:
  authentication: {{provider: corp-idp, usernameClaim: email, groupsClaim: groups, groupsPrefix: "-"}}
  rules:
    - name: delete-in-prod
      verbs: [delete, deletecollection]
      resources: ["*"]
      namespaces: [prod]
      stepUp: {{provider: corp-idp, acr: [urn:stepmesh:acr:mfa], maxAge: 10m}}
    - name: exec
      verbs: [connect]
      resources: [pods/exec]
      groups: [developers]
      stepUp: {{provider: corp-idp, acr: [urn:stepmesh:acr:mfa]}}
    - name: new-bindings
      verbs: [create]
      resources: [rolebindings]
      stepUp: {{provider: corp-idp, acr: [urn:stepmesh:acr:mfa]}}
"#,
            jwks.display()
        ),
    )
    .unwrap();
    Setup {
        _dir: dir,
        policy,
        idp,
    }
}

fn explain(s: &Setup, from: &str, port: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "policy",
        "explain",
        s.policy.to_str().unwrap(),
        "--from",
        from,
        "--port",
        port,
    ];
    args.extend_from_slice(extra);
    stdout(&stepmesh(&args))
}

#[test]
fn check_accepts_a_good_file_and_names_the_field_of_a_bad_one() {
    let s = setup();
    let out = stdout(&stepmesh(&["policy", "check", s.policy.to_str().unwrap()]));
    assert!(out.contains("ok (trust domain cluster.local"), "{out}");
    let bad = s.policy.with_file_name("bad.yaml");
    let text = std::fs::read_to_string(&s.policy)
        .unwrap()
        .replace("protocol: tcp", "protocol: udp");
    std::fs::write(&bad, text).unwrap();
    let o = stepmesh(&["policy", "check", bad.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("inbound.ports[1].protocol") && err.contains("udp"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");
}

#[test]
fn explain_names_the_deciding_rule_for_each_branch() {
    let s = setup();
    let out = explain(&s, FRONTEND, "8080", &[]);
    assert!(
        out.contains("decision: allow\nrule: web-and-ops\nreason: allowed"),
        "{out}"
    );
    let out = explain(&s, FRONTEND, "5432", &[]);
    assert!(
        out.contains("decision: deny\nrule: inbound.ports[1]\nreason: not_allowed"),
        "{out}"
    );
    let out = explain(&s, FRONTEND, "9999", &[]);
    assert!(
        out.contains("decision: deny\nrule: inbound.default\nreason: default_deny"),
        "{out}"
    );

    let out = explain(
        &s,
        FRONTEND,
        "8080",
        &["--method", "GET", "--path", "/catalog"],
    );
    assert!(
        out.contains("route: (none") && out.contains("decision: allow\nrule: web-and-ops"),
        "{out}"
    );
    let ops = "spiffe://cluster.local/ns/ops/sa/oncall";
    let out = explain(
        &s,
        ops,
        "8080",
        &["--method", "POST", "--path", "/refunds/7"],
    );
    assert!(
        out.contains("decision: 403 forbidden\nrule: refunds\nreason: route_not_allowed"),
        "{out}"
    );
    let out = explain(
        &s,
        FRONTEND,
        "8080",
        &["--method", "POST", "--path", "/refunds/7"],
    );
    assert!(
        out.contains("decision: 401 unauthorized\nrule: refunds\nreason: no_token"),
        "{out}"
    );
    assert!(out.contains(r#"www-authenticate: Bearer realm="stepmesh", acr_values="urn:stepmesh:acr:mfa", max_age=300"#), "{out}");

    let claims = || {
        let mut c = base_claims(ISS, "payments", "alice");
        c["acr"] = json!("urn:stepmesh:acr:mfa");
        c["azp"] = json!(FRONTEND);
        c
    };
    let with = |token: &str| {
        explain(
            &s,
            FRONTEND,
            "8080",
            &["--method", "POST", "--path", "/refunds/7", "--token", token],
        )
    };
    let out = with(&s.idp.es256(&claims()).unwrap());
    assert!(out.contains("decision: allow\nrule: refunds\nreason: step_up_ok\nx-stepup-sub: alice\nstrips: authorization"), "{out}");
    let mut weak = claims();
    weak["acr"] = json!("urn:stepmesh:acr:pwd");
    let out = with(&s.idp.es256(&weak).unwrap());
    assert!(
        out.contains("reason: insufficient_acr")
            && out.contains("insufficient_user_authentication"),
        "{out}"
    );
    let mut stale = claims();
    stale["auth_time"] = json!(now() - 1000);
    assert!(with(&s.idp.es256(&stale).unwrap()).contains("reason: stale_auth_time"));
    let cases: Vec<(serde_json::Value, &str)> = vec![
        (json!({"exp": now() - 600}), "expired"),
        (json!({"nbf": now() + 600}), "not_yet_valid"),
        (json!({"iss": "https://evil"}), "wrong_issuer"),
        (json!({"aud": "other"}), "wrong_audience"),
        (
            json!({"azp": "spiffe://cluster.local/ns/x/sa/y"}),
            "azp_mismatch",
        ),
    ];
    for (patch, reason) in cases {
        let mut c = claims();
        for (k, v) in patch.as_object().unwrap() {
            c[k] = v.clone();
        }
        let out = with(&s.idp.es256(&c).unwrap());
        assert!(
            out.contains(&format!("rule: refunds\nreason: {reason}"))
                && out.contains("error=\"invalid_token\""),
            "{reason}: {out}"
        );
    }
    let none = s.idp.mint(&json!({"alg": "none"}), &claims()).unwrap();
    assert!(with(&none).contains("reason: alg_not_allowed"));
    let hs = mint_hs256(
        s.idp.es_public_pem().unwrap().as_bytes(),
        &json!({"alg": "HS256"}),
        &claims(),
    );
    assert!(with(&hs).contains("reason: alg_not_allowed"));
    let unknown = s
        .idp
        .mint(&json!({"alg": "ES256", "kid": "nope"}), &claims())
        .unwrap();
    assert!(with(&unknown).contains("reason: unknown_kid"));
    let other = TestIdp::with_kids(ISS, s.idp.es_kid(), "r").unwrap();
    assert!(with(&other.es256(&claims()).unwrap()).contains("reason: bad_signature"));
}

#[test]
fn explain_refuses_bad_arguments() {
    let s = setup();
    let o = stepmesh(&[
        "policy",
        "explain",
        s.policy.to_str().unwrap(),
        "--from",
        "not-an-id",
        "--port",
        "1",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--from"));
}

#[test]
fn netpol_output_validates_against_the_kubernetes_schemas() {
    let s = setup();
    let out = stdout(&stepmesh(&[
        "policy",
        "netpol",
        s.policy.to_str().unwrap(),
        "--namespace",
        "payments",
        "--selector",
        "app=payments-api",
    ]));
    assert!(
        out.contains("name: stepmesh-payments-api-default-deny"),
        "{out}"
    );
    assert!(
        out.contains("stepmesh.io/service-account: frontend"),
        "{out}"
    );
    assert!(out.contains("port: 5432"), "{out}");
    let file = s.policy.with_file_name("netpol.yaml");
    std::fs::write(&file, &out).unwrap();
    validate(&file);
    let o = stepmesh(&[
        "policy",
        "netpol",
        s.policy.to_str().unwrap(),
        "--namespace",
        "payments",
        "--selector",
        "nolabel",
    ]);
    assert!(!o.status.success());
}

fn validate(file: &Path) {
    let o = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict", "--kubernetes-version", "1.33.0"])
        .arg(file)
        .output()
        .expect("python3 with kubernetes-validate is needed (pip install -r tests/python/requirements.txt)");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.status.success(),
        "kubernetes-validate refused the output:\n{report}"
    );
    assert!(
        report.contains("passed for resource networkpolicy/stepmesh-payments-api-default-deny"),
        "{report}"
    );
    assert!(
        report.contains("passed for resource networkpolicy/stepmesh-payments-api-port-8080"),
        "{report}"
    );
}

#[test]
fn explain_binds_cnf_to_the_given_certificate() {
    let s = setup();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(FRONTEND.try_into().unwrap())];
    let cert = params.self_signed(&key).unwrap();
    let pem = s.policy.with_file_name("peer.pem");
    std::fs::write(&pem, cert.pem()).unwrap();
    let mut c = base_claims(ISS, "payments", "alice");
    c["cnf"] = json!({"x5t#S256": stepmesh::stepup::x5t_s256(cert.der())});
    let token = s.idp.es256(&c).unwrap();
    let args = ["--method", "GET", "--path", "/bound", "--token", &token];
    let with_cert: Vec<&str> = args
        .iter()
        .copied()
        .chain(["--cert", pem.to_str().unwrap()])
        .collect();
    let out = explain(&s, FRONTEND, "8080", &with_cert);
    assert!(
        out.contains("decision: allow\nrule: bound\nreason: step_up_ok"),
        "{out}"
    );
    let out = explain(&s, FRONTEND, "8080", &args);
    assert!(
        out.contains("reason: cnf_mismatch"),
        "without --cert: {out}"
    );
}

fn kube_explain(s: &Setup, method: &str, path: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "policy",
        "explain",
        s.policy.to_str().unwrap(),
        "--kubernetes",
        "--method",
        method,
        "--path",
        path,
    ];
    args.extend_from_slice(extra);
    stdout(&stepmesh(&args))
}

#[test]
fn explain_kubernetes_requests_names_the_rule_and_the_gateways_decision() {
    let s = setup();
    let out = kube_explain(&s, "delete", "/api/v1/namespaces/prod/configmaps/x", &[]);
    assert!(out.contains("classified: verb=delete apiGroup=\"\" resource=configmaps namespace=\"prod\" name=\"x\""), "{out}");
    assert!(
        out.contains("rule: delete-in-prod\nneeds: step-up with provider corp-idp"),
        "{out}"
    );
    // A delete without a name is a deletecollection: the same rule.
    let out = kube_explain(&s, "DELETE", "/api/v1/namespaces/prod/configmaps", &[]);
    assert!(
        out.contains("verb=deletecollection") && out.contains("rule: delete-in-prod"),
        "{out}"
    );
    // A WebSocket exec is a GET: still the exec rule, for developers only.
    let exec = "/api/v1/namespaces/dev/pods/web/exec?command=sh";
    let out = kube_explain(&s, "GET", exec, &["--group", "developers"]);
    assert!(
        out.contains("(a tunnel: matches verb connect)") && out.contains("rule: exec\n"),
        "{out}"
    );
    let out = kube_explain(&s, "GET", exec, &["--group", "ops"]);
    assert!(out.contains("rule: (none"), "{out}");
    // A verb that the path contradicts is pointed out.
    let out = kube_explain(&s, "get", "/api/v1/namespaces/prod/configmaps", &[]);
    assert!(
        out.contains("note: the API server reads this request as \"list\""),
        "{out}"
    );
    // Tokens: password-only is asked to step up, MFA passes.
    let mut c = base_claims(ISS, "payments", "alice");
    c["email"] = json!("alice@example.com");
    c["groups"] = json!(["developers"]);
    c["acr"] = json!("urn:stepmesh:acr:pwd");
    let pwd = s.idp.es256(&c).unwrap();
    let out = kube_explain(
        &s,
        "delete",
        "/api/v1/namespaces/prod/configmaps/x",
        &["--token", &pwd],
    );
    assert!(
        out.contains("user: alice@example.com groups: [\"developers\"]"),
        "{out}"
    );
    assert!(
        out.contains("decision: 401 step-up required") && out.contains("reason: insufficient_acr"),
        "{out}"
    );
    assert!(out.contains("insufficient_user_authentication"), "{out}");
    c["acr"] = json!("urn:stepmesh:acr:mfa");
    let mfa = s.idp.es256(&c).unwrap();
    let out = kube_explain(
        &s,
        "delete",
        "/api/v1/namespaces/prod/configmaps/x",
        &["--token", &mfa],
    );
    assert!(
        out.contains("decision: forward, impersonating the user\nreason: step_up_ok"),
        "{out}"
    );
    // Server-side apply of a binding that may not exist: a PATCH, which
    // the API server authorizes as `create` too, meets the create rule.
    let apply = "/apis/rbac.authorization.k8s.io/v1/namespaces/prod/rolebindings/x";
    let out = kube_explain(&s, "PATCH", apply, &[]);
    assert!(
        out.contains("rule as create (the object may not exist yet): new-bindings\nneeds: step-up"),
        "{out}"
    );
    let out = kube_explain(&s, "PATCH", apply, &["--token", &pwd]);
    assert!(
        out.contains("rule: new-bindings\ndecision: 401 step-up required"),
        "{out}"
    );
    let out = kube_explain(&s, "PATCH", apply, &["--token", &mfa]);
    assert!(out.contains("reason: step_up_ok"), "{out}");
    // A path the gateway refuses is a 400 here too.
    let out = kube_explain(
        &s,
        "get",
        "/api/v1/namespaces/prod/../kube-system/secrets",
        &[],
    );
    assert!(out.contains("decision: 400 bad request"), "{out}");
}

/// The shipped gateway policy asks for a fresh MFA login before what
/// amounts to a shell in production (exec and its equivalents: the API
/// server's proxy to a pod, a service or a node's kubelet, an ephemeral
/// container), a delete there (an eviction too), and any answer that
/// carries a Secret's data (a patch, even an empty dry run, and a delete
/// answer with the object); a routine read needs none.
#[test]
fn the_shipped_gateway_policy_steps_up_what_equals_a_shell_a_delete_or_a_secret() {
    let policy = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/gateway/policy.yaml");
    let explain = |method: &str, path: &str| {
        let args = [
            "policy",
            "explain",
            policy,
            "--kubernetes",
            "--method",
            method,
            "--path",
            path,
        ];
        stdout(&stepmesh(&args))
    };
    for (method, path) in [
        ("GET", "/api/v1/namespaces/prod/pods/web/exec?command=sh"),
        ("GET", "/api/v1/namespaces/prod/pods/web/proxy/"),
        ("GET", "/api/v1/namespaces/prod-eu/services/web:80/proxy/x"),
        ("POST", "/api/v1/nodes/n1/proxy/run/prod/web/app"),
        (
            "PATCH",
            "/api/v1/namespaces/prod/pods/web/ephemeralcontainers",
        ),
        ("POST", "/api/v1/namespaces/prod/pods/web/eviction"),
        ("DELETE", "/api/v1/namespaces/prod/configmaps/x"),
        ("PATCH", "/api/v1/namespaces/dev/secrets/db?dryRun=All"),
        ("DELETE", "/api/v1/namespaces/dev/secrets/db"),
        ("GET", "/api/v1/namespaces/dev/secrets?watch=1"),
        // What runs in prod changed: a pod, a new image, a template, a token.
        ("POST", "/api/v1/namespaces/prod/pods"),
        ("PATCH", "/api/v1/namespaces/prod/pods/web"),
        ("PATCH", "/apis/apps/v1/namespaces/prod-eu/deployments/web"),
        ("PUT", "/apis/batch/v1/namespaces/prod/cronjobs/nightly"),
        ("POST", "/api/v1/namespaces/prod/serviceaccounts/web/token"),
        // A scale to zero; an owner that does not exist (a delete by the
        // garbage collector), on any object or the namespace itself.
        (
            "PATCH",
            "/apis/apps/v1/namespaces/prod/deployments/web/scale",
        ),
        ("PUT", "/apis/apps/v1/namespaces/prod/statefulsets/db/scale"),
        (
            "PATCH",
            "/api/v1/namespaces/prod/persistentvolumeclaims/data",
        ),
        ("PATCH", "/api/v1/namespaces/prod"),
    ] {
        let out = explain(method, path);
        assert!(out.contains("needs: step-up"), "{method} {path}: {out}");
    }
    for (method, path) in [
        ("GET", "/api/v1/namespaces/prod/configmaps/x"),
        ("POST", "/api/v1/namespaces/dev/pods"),
    ] {
        let out = explain(method, path);
        assert!(out.contains("rule: (none"), "{method} {path}: {out}");
    }
}
