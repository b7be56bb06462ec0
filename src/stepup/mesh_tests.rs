//! `jwks: {mesh: true}` providers through [`decide`]: keys read from the
//! mesh's key set as the CA streams it (none without one), a JWT-SVID's
//! `sub` checked against the trust domain and the route's `from`.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::{HeaderMap, HeaderValue, Method};
use stepmesh_ca::jwtsvid::JwtSigner;

use super::*;
use crate::policy::SpiffeId;

const GATEWAY: &str = "spiffe://cluster.local/ns/edge/sa/gateway";
const JOB: &str = "spiffe://cluster.local/ns/jobs/sa/report";

const POLICY: &str = r#"
trustDomain: cluster.local
stepUp:
  providers:
    mesh:
      jwks: {mesh: true}
      audiences: [orders]
      algorithms: [ES256]
inbound:
  ports:
    - port: 8080
      protocol: http
      allow:
        - from: [spiffe://cluster.local/ns/edge/sa/gateway]
      routes:
        - name: orders
          match: {path: /orders/*}
          stepUp: {provider: mesh, from: [spiffe://cluster.local/ns/jobs/*]}
"#;

fn signer() -> JwtSigner {
    JwtSigner::from_key_pair(&rcgen::KeyPair::generate().unwrap()).unwrap()
}

fn token(ca: &JwtSigner, sub: &str) -> String {
    let id = SpiffeId::parse(sub).unwrap();
    ca.mint(&id, &["orders".to_owned()], Duration::from_secs(60))
        .unwrap()
        .token
}

async fn ask(policy: &Policy, stepup: &StepUp, token: &str) -> GateDecision {
    let peer = SpiffeId::parse(GATEWAY).unwrap();
    let mut headers = HeaderMap::new();
    let value = HeaderValue::from_str(&format!("Bearer {token}")).unwrap();
    headers.insert("authorization", value);
    let uri: http::Uri = "/orders/1".parse().unwrap();
    let req = RequestInfo {
        peer: Peer {
            id: &peer,
            x5t_s256: "t",
        },
        port: 8080,
        method: &Method::GET,
        uri: &uri,
        headers: &headers,
    };
    decide(policy, stepup, req, gate::unix_now()).await
}

#[tokio::test]
async fn keys_follow_the_mesh_key_set_and_sub_must_be_a_named_workload() {
    let policy = Policy::from_yaml(POLICY).unwrap();
    let ca = signer();
    let good = token(&ca, JOB);

    // No key set at all (`policy explain`, or no CA): no keys.
    let alone = StepUp::new(StepUpMetrics::default());
    assert_eq!(ask(&policy, &alone, &good).await.reason, "no_keys");

    // A sidecar whose CA has not sent a key set yet: no keys; once it has,
    // the same token is accepted (no restart, no fetch).
    let held: Arc<ArcSwapOption<String>> = Arc::new(ArcSwapOption::empty());
    let read = held.clone();
    let sidecar =
        StepUp::new(StepUpMetrics::default()).with_mesh_jwks(Arc::new(move || read.load_full()));
    assert_eq!(ask(&policy, &sidecar, &good).await.reason, "no_keys");
    held.store(Some(Arc::new(ca.jwks_json().to_owned())));
    let d = ask(&policy, &sidecar, &good).await;
    assert_eq!((d.reason, d.subject.as_deref()), ("step_up_ok", Some(JOB)));

    // A workload of the trust domain the route does not name.
    let d = ask(&policy, &sidecar, &token(&ca, GATEWAY)).await;
    assert_eq!(d.reason, "wrong_subject");
    assert!(matches!(d.outcome, Outcome::Challenge(_)));
    // Signed by the mesh key, but for another trust domain.
    let d = ask(
        &policy,
        &sidecar,
        &token(&ca, "spiffe://other.test/ns/jobs/sa/x"),
    )
    .await;
    assert_eq!(d.reason, "wrong_subject");

    // The CA's key rotates: the new key's tokens are accepted at once, the
    // old key's (no longer published) are not, a token verified (and
    // cached) before the rotation included.
    assert_eq!(ask(&policy, &sidecar, &good).await.reason, "step_up_ok");
    let next = signer();
    held.store(Some(Arc::new(next.jwks_json().to_owned())));
    let d = ask(&policy, &sidecar, &token(&next, JOB)).await;
    assert_eq!(d.reason, "step_up_ok");
    assert_eq!(ask(&policy, &sidecar, &good).await.reason, "unknown_kid");
    let d = ask(
        &policy,
        &sidecar,
        &token(&ca, "spiffe://cluster.local/ns/jobs/sa/old"),
    )
    .await;
    assert_eq!(d.reason, "unknown_kid");
}
