//! `kubectl exec` and `port-forward` through `stepmesh gateway`: the
//! upgrade (WebSocket `v5.channel.k8s.io` and SPDY/3.1) passes through both
//! ways byte-exact, 1 MiB each way, sent upstream over HTTP/1.1 as the
//! impersonated person; without the step-up the exec never reaches the far
//! end. The far end is the exec stand-in (tests/python/exec_standin.py), a
//! named stand-in for the API server's exec endpoint: our test API server has
//! no kubelet to proxy to. The gateway's ServiceAccount token comes from a
//! real API server (envtest); skips without `KUBEBUILDER_ASSETS`.

#![allow(clippy::unwrap_used)] // tests may panic

mod common;
#[path = "common/exec_standin.rs"]
mod exec_standin;

use common::envtest::Envtest;
use common::gateway::Gateway;
use exec_standin::{
    exec_cat_round_trip, kubectl, random_bytes, transports, ExecStandin, KubectlTarget,
    PortForward, Transport,
};
use serde_json::json;
use stepmesh::stepup::testing::{base_claims, now, TestIdp};

const ISSUER: &str = "https://idp.stepmesh.test";
const MFA: &str = "urn:stepmesh:acr:mfa";
const MIB: usize = 1 << 20;

fn start() -> Option<(ExecStandin, Gateway, TestIdp, std::path::PathBuf)> {
    let k8s = Envtest::shared()?;
    let kubectl = kubectl()?;
    let standin = ExecStandin::start();
    let (idp, jwks) = common::gateway::idp_with_jwks(ISSUER);
    let policy = format!(
        r#"trustDomain: example.org
stepUp:
  providers:
    corp: {{issuer: {ISSUER}, jwks: {{file: {}}}, audiences: [kubectl], algorithms: [ES256]}}
kubernetes:
  authentication: {{provider: corp, usernameClaim: email}}
  rules:
  - name: any-tunnel
    verbs: [connect]
    resources: ["*"]
    stepUp: {{provider: corp, acr: [{MFA}], maxAge: 10m}}
"#,
        jwks.display()
    );
    let gateway = Gateway::start(k8s, &standin.url(), &standin.ca_file, &policy);
    Some((standin, gateway, idp, kubectl))
}

fn token(idp: &TestIdp, acr: &str) -> String {
    let mut c = base_claims(ISSUER, "kubectl", "alice");
    c["email"] = json!("alice@example.com");
    c["acr"] = json!(acr);
    c["auth_time"] = json!(now());
    idp.es256(&c).unwrap()
}

#[test]
fn exec_through_the_gateway_is_byte_exact_both_transports_and_needs_step_up() {
    let Some((standin, gateway, idp, kubectl)) = start() else {
        return;
    };
    let mfa = KubectlTarget::token(&gateway.url(), &gateway.ca_file, &token(&idp, MFA));
    for (i, transport) in transports(&kubectl).into_iter().enumerate() {
        let started = std::time::Instant::now();
        let (input, run) = exec_cat_round_trip(&kubectl, &mfa, transport, MIB);
        assert_eq!(run.code, Some(0), "{transport:?}: {}", run.stderr);
        assert!(
            run.stdout == input,
            "{transport:?}: stdout differs from stdin"
        );
        let session = standin.wait_session(i);
        // kubectl silently falls back to SPDY when a WebSocket upgrade
        // fails: the far end says which transport really carried it.
        assert_eq!(session["transport"], transport.logged_as(), "{session}");
        assert_eq!(session["stdin_bytes"], MIB, "{session}");
        println!(
            "exec 1 MiB through the gateway over {transport:?}: {:?}",
            started.elapsed()
        );
    }
    // The far end saw the gateway's credentials and the impersonated person.
    let requests = standin.events("request");
    let exec = requests
        .iter()
        .rev()
        .find(|r| r["path"].as_str().is_some_and(|p| p.ends_with("/exec")))
        .expect("an exec request at the stand-in");
    assert_eq!(
        exec["impersonate"]["impersonate-user"],
        json!(["alice@example.com"]),
        "{exec}"
    );

    // A password-only login: refused with what to do, never reaches the far end.
    let before = standin.events("session").len();
    let pwd = KubectlTarget::token(
        &gateway.url(),
        &gateway.ca_file,
        &token(&idp, "urn:stepmesh:acr:pwd"),
    );
    let (_, run) = exec_cat_round_trip(&kubectl, &pwd, Transport::Spdy, 16);
    assert_ne!(run.code, Some(0));
    assert!(
        run.stderr
            .contains("step-up required by rule \"any-tunnel\""),
        "{}",
        run.stderr
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(standin.events("session").len(), before);
}

#[test]
fn port_forward_through_the_gateway_is_byte_exact_both_transports() {
    let Some((standin, gateway, idp, kubectl)) = start() else {
        return;
    };
    let mfa = KubectlTarget::token(&gateway.url(), &gateway.ca_file, &token(&idp, MFA));
    for (i, transport) in transports(&kubectl).into_iter().enumerate() {
        let forward = PortForward::start(&kubectl, &mfa, transport, 8080);
        let input = random_bytes(MIB, 7 + i as u64);
        let back = forward.round_trip(&input);
        assert!(back == input, "{transport:?}: echo differs");
        drop(forward);
        assert_eq!(standin.wait_session(i)["echoed"], MIB);
    }
}
