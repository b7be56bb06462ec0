//! JWT-SVIDs from the mesh as a step-up credential (`jwks: {mesh: true}`):
//! a real CA (`stepmesh ca serve`) signs JWT-SVIDs and streams its JWK set
//! with the trust bundle; a sidecar enrolled with it guards a route that
//! needs a JWT-SVID of a named workload; calls come through a second
//! sidecar (the mTLS peer: where mTLS is terminated, e.g. a gateway). A
//! token the CA signed for the route's audience and workload is accepted and
//! its `sub` reaches the app; another audience, an expired token, another
//! key, a plain OIDC token and another workload are refused with `401
//! invalid_token` and their reason.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;
mod http_support;

use std::time::Duration;

use base64::Engine as _;
use common::ca::CaProcess;
use common::mesh::{free_port, Sidecar, CLIENT_ID, SERVER_ID};
use http_support::app::{request, send, Answer, TestApp};
use serde_json::{json, Value};
use stepmesh::stepup::testing::{base_claims, TestIdp};

const TD: &str = "mesh.test";
const WORKER: &str = "spiffe://mesh.test/ns/shop/sa/worker";

fn policy(port: u16) -> String {
    format!(
        r#"
trustDomain: {TD}
stepUp:
  providers:
    mesh:
      jwks: {{mesh: true}}
      audiences: [orders]
      algorithms: [ES256]
      leeway: 0s
inbound:
  default: deny
  ports:
    - port: {port}
      protocol: http
      allow:
        - name: gateway
          from: [{CLIENT_ID}]
      routes:
        - name: orders
          match: {{path: /orders/*}}
          stepUp: {{provider: mesh, from: [{WORKER}]}}
"#
    )
}

fn www(a: &Answer) -> String {
    a.headers
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// The `kid` in a token's header.
fn kid(token: &str) -> String {
    let head = token.split('.').next().unwrap();
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(head)
        .unwrap();
    let header: Value = serde_json::from_slice(&raw).unwrap();
    header["kid"].as_str().unwrap().to_owned()
}

#[test]
fn a_mesh_jwt_svid_opens_the_route_and_other_tokens_do_not() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let ca = CaProcess::start(
        TD,
        &[
            ("server-token", SERVER_ID),
            ("client-token", CLIENT_ID),
            ("worker-token", WORKER),
        ],
    );
    let app = rt.block_on(TestApp::start(false));
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let policy_file = dir.path().join("policy.yaml");
    std::fs::write(&policy_file, policy(port)).unwrap();
    let mut args = ca.enrol_args(dir.path(), "server-token", None);
    args.extend([
        "--inbound".into(),
        format!("127.0.0.1:{port}={}", app.addr),
        "--policy".into(),
        policy_file.display().to_string(),
    ]);
    let server = Sidecar::spawn(&args);
    let inbound = server.listener("inbound");
    server.wait_ready();
    let mut args = ca.enrol_args(dir.path(), "client-token", None);
    args.extend([
        "--outbound".into(),
        format!("127.0.0.1:0={inbound}@{SERVER_ID}"),
    ]);
    let gateway = Sidecar::spawn(&args);
    gateway.wait_ready();
    let out = gateway.listener("outbound");
    let call = |token: &str| {
        let auth = format!("Bearer {token}");
        rt.block_on(send(
            out,
            false,
            request(false, "GET", "/orders/7", &[("authorization", &auth)], b""),
        ))
    };
    // Connecting spawns the channel's task: inside the runtime.
    let client = {
        let _in_runtime = rt.enter();
        ca.client()
    };
    let mint = |token: &str, aud: &str, ttl: Option<Duration>| {
        rt.block_on(client.sign_jwt_svid(token, &[aud.to_owned()], ttl))
            .unwrap()
            .token
    };

    // The workload's JWT-SVID for the route's audience: accepted, its
    // SPIFFE ID reaches the app, the token does not.
    let good = mint("worker-token", "orders", None);
    let a = call(&good);
    assert_eq!(a.status, 200, "{:?} {}", a.body, www(&a));
    let seen = a.json();
    assert_eq!(seen["headers"]["x-stepup-sub"], json!([WORKER]), "{seen}");
    assert!(seen["headers"].get("authorization").is_none(), "{seen}");
    let line = server.wait_access("the accepted call", |l| l["reason"] == "step_up_ok");
    assert_eq!(line["route"], "orders", "{line}");

    let refused = |token: &str, reason: &str| {
        let a = call(token);
        assert_eq!(a.status, 401, "{reason}: {:?}", a.body);
        assert!(
            www(&a).starts_with("Bearer error=\"invalid_token\""),
            "{reason}: {}",
            www(&a)
        );
        let line = server.wait_access(reason, |l| l["reason"] == reason);
        assert_eq!(line["status"], 401, "{line}");
    };
    // Another audience.
    refused(&mint("worker-token", "billing", None), "wrong_audience");
    // Another workload of the mesh: verified, but not one the route names.
    refused(&mint("client-token", "orders", None), "wrong_subject");
    // Expired (1 s lifetime, no leeway).
    let short = mint("worker-token", "orders", Some(Duration::from_secs(1)));
    std::thread::sleep(Duration::from_millis(2_500));
    refused(&short, "expired");
    // Another key claiming the CA's kid: the signature fails.
    let now = stepmesh::stepup::testing::now();
    let svid_claims = json!({"sub": WORKER, "aud": ["orders"], "iat": now, "exp": now + 60});
    let impostor = TestIdp::with_kids("unused", &kid(&good), "rs-x").unwrap();
    refused(&impostor.es256(&svid_claims).unwrap(), "bad_signature");
    // Another key under its own kid.
    let stranger = TestIdp::new("unused").unwrap();
    refused(&stranger.es256(&svid_claims).unwrap(), "unknown_kid");
    // A plain OIDC token (an IdP's RS256 login): not an algorithm the
    // mesh signs with.
    let oidc = base_claims("https://idp.example.com", "orders", WORKER);
    refused(&stranger.rs256(&oidc).unwrap(), "alg_not_allowed");
    refused(&stranger.es256(&oidc).unwrap(), "unknown_kid");
    assert_eq!(
        server.metric(r#"stepmesh_stepup_challenges_total{reason="wrong_subject"}"#),
        1.0
    );
}
