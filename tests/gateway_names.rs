//! The names the gateway impersonates, against a real kube-apiserver
//! (envtest): a user or group name the API server would read differently
//! from the gateway is refused before it. Go's HTTP/1 header reading drops
//! a value's leading and trailing blanks, so a group " system:masters"
//! from the IdP, past a check for `system:`, was `system:masters` (every
//! permission) at the API server. Skips (printing why) without
//! `KUBEBUILDER_ASSETS`.

#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use common::envtest::Envtest;
use common::gateway::Gateway;
use serde_json::{json, Value};
use stepmesh::stepup::testing::{base_claims, TestIdp};

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
  authentication: {{provider: corp, usernameClaim: email, groupsClaim: groups}}
  rules: []
"#,
        jwks = jwks.display()
    )
}

#[test]
fn names_the_api_server_reads_otherwise_are_never_impersonated() {
    let Some(k8s) = Envtest::shared() else { return };
    let idp = TestIdp::new(ISSUER).unwrap();
    let jwks = tempfile::NamedTempFile::new()
        .unwrap()
        .into_temp_path()
        .keep()
        .unwrap();
    std::fs::write(&jwks, idp.jwks().to_string()).unwrap();
    let gateway = Gateway::start(k8s, &k8s.url, &k8s.ca_file, &policy(&jwks));
    let client = gateway.client();
    // A watch: HTTP/1.1 to the API server (the gateway's stream lane).
    let watch = |email: &str, groups: Value| {
        let mut c = base_claims(ISSUER, "kubectl", "mallory");
        c["email"] = json!(email);
        c["groups"] = groups;
        let auth = format!("Bearer {}", idp.es256(&c).unwrap());
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
    ] {
        let r = watch(email, groups);
        assert_eq!(r.status, 401, "{what}: {}", r.body_text());
    }
}
