//! The names the gateway impersonates, against a real kube-apiserver
//! (envtest): a user or group name the API server would read differently
//! from the gateway is refused before it. Go's HTTP/1 header reading drops
//! a value's leading and trailing blanks, so a group " system:masters"
//! from the IdP, past a check for `system:`, was `system:masters` (every
//! permission) at the API server. And what else the API server reads of
//! the person as it does: `email_verified` must be the boolean true; a
//! client's `Audit-ID` does not name the API server's audit event. Skips
//! (printing why) without `KUBEBUILDER_ASSETS`.

#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use common::envtest::Envtest;
use common::gateway::Gateway;
use serde_json::{json, Value};
use stepmesh::stepup::testing::base_claims;

const ISSUER: &str = "https://idp.stepmesh.test";

/// No `groupsPrefix` (the default): the IdP's group names go as they are.
fn policy(jwks: &std::path::Path) -> String {
    format!(
        r#"trustDomain: example.org
stepUp:
  providers:
    corp:
      issuer: {ISSUER}
      jwks: {{file: {jwks}}}
      audiences: [kubectl]
      algorithms: [ES256]
kubernetes:
  authentication: {{provider: corp, usernameClaim: email, groupsClaim: groups, groupsPrefix: "-"}}
  rules: []
"#,
        jwks = jwks.display()
    )
}

#[test]
fn names_the_api_server_reads_otherwise_are_never_impersonated() {
    let Some(k8s) = Envtest::shared() else { return };
    let (idp, jwks) = common::gateway::idp_with_jwks(ISSUER);
    let gateway = Gateway::start(k8s, &k8s.url, &k8s.ca_file, &policy(&jwks));
    let client = gateway.client();
    let bearer = |email: &str, groups: Value, verified: Option<Value>| {
        let mut c = base_claims(ISSUER, "kubectl", "mallory");
        c["email"] = json!(email);
        c["groups"] = groups;
        if let Some(v) = verified {
            c["email_verified"] = v;
        }
        format!("Bearer {}", idp.es256(&c).unwrap())
    };
    // A watch: HTTP/1.1 to the API server (the gateway's stream lane).
    let watch = |email: &str, groups: Value| {
        let auth = bearer(email, groups, None);
        let target = "/api/v1/namespaces/kube-system/secrets?watch=1";
        client.request_head("GET", target, &[("Authorization", &auth)])
    };
    // Reaches the API server, which knows no grant for mallory: 403.
    let plain = watch("mallory@example.com", json!(["developers"]));
    assert_eq!(plain.status, 403, "{}", plain.body_text());
    for (what, email, groups) in [
        (
            "a group led by a space",
            "mallory@example.com",
            json!([" system:masters"]),
        ),
        (
            "a group led by a tab",
            "mallory@example.com",
            json!(["\tsystem:masters"]),
        ),
        (
            "a group ended by a space",
            "mallory@example.com",
            json!(["system:masters "]),
        ),
        ("a user led by a space", " system:admin", json!([])),
        (
            "a group named system:",
            "mallory@example.com",
            json!(["system:masters"]),
        ),
        (
            "kubeadm's cluster-admin group",
            "mallory@example.com",
            json!(["kubeadm:cluster-admins"]),
        ),
    ] {
        let r = watch(email, groups);
        assert_eq!(r.status, 401, "{what}: {}", r.body_text());
    }

    // `email_verified`, when present, must be the boolean true.
    let target = "/api/v1/namespaces/default/configmaps/marker";
    for (verified, status) in [
        (json!(true), 403),
        (json!(false), 401),
        (json!("false"), 401),
    ] {
        let auth = bearer("mallory@example.com", json!([]), Some(verified.clone()));
        let r = client.request("GET", target, &[("Authorization", &auth)], b"");
        assert_eq!(
            r.status,
            status,
            "email_verified {verified}: {}",
            r.body_text()
        );
    }

    // A client's Audit-ID does not name the API server's event, nor do its
    // X-Forwarded-For and X-Real-Ip say where it came from: the address the
    // gateway saw does, in the API server's audit and in the gateway's.
    let auth = bearer("mallory@example.com", json!([]), None);
    let target = "/api/v1/namespaces/default/configmaps/audit-id-marker";
    let chosen = "0b7e5e1c-chosen-by-the-client";
    let r = client.request(
        "GET",
        target,
        &[
            ("Authorization", &auth),
            ("Audit-ID", chosen),
            ("X-Forwarded-For", "10.0.0.5"),
            ("X-Real-Ip", "10.0.0.6"),
        ],
        b"",
    );
    assert_eq!(r.status, 403, "{}", r.body_text());
    let events = |k: &Envtest| -> Vec<(String, Vec<String>)> {
        k.audit()
            .events()
            .into_iter()
            .filter(|e| e.request_uri.ends_with("audit-id-marker"))
            .map(|e| (e.audit_id, e.source_ips))
            .collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while events(k8s).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let seen = events(k8s);
    assert!(!seen.is_empty(), "the request reached the API server");
    for (id, sources) in &seen {
        assert_ne!(id, chosen);
        assert_eq!(
            sources.first().map(String::as_str),
            Some("127.0.0.1"),
            "{sources:?}"
        );
        assert!(
            !sources.iter().any(|ip| ip.starts_with("10.0.0.")),
            "{sources:?}"
        );
    }
    let line = gateway
        .wait_audit_line(|l| l["name"] == "audit-id-marker")
        .expect("the gateway's audit line");
    assert_eq!(line["client"], "127.0.0.1", "{line}");
}
