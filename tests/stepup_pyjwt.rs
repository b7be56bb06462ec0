//! Tokens minted by PyJWT with keys Python made (a foreign encoder and key
//! serializer) verified by stepmesh's gate.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::path::Path;
use std::process::Command;

use http::{HeaderMap, HeaderValue, Method};
use serde_json::Value;
use stepmesh::policy::{Policy, SpiffeId};
use stepmesh::stepup::{decide, gate::unix_now, Outcome, Peer, RequestInfo, StepUp, StepUpMetrics};

const ISS: &str = "https://login.example.org";
const PEER: &str = "spiffe://cluster.local/ns/web/sa/frontend";

fn pyjwt() -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/pyjwt_mint.py");
    let out = Command::new("python3")
        .arg(script)
        .args([ISS, "payments", "bob"])
        .output()
        .expect("python3 with PyJWT is needed (pip install -r tests/python/requirements.txt)");
    assert!(
        out.status.success(),
        "pyjwt_mint.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn pyjwt_tokens_pass_and_fail_as_they_should() {
    let minted = pyjwt();
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, minted["jwks"].to_string()).unwrap();
    let policy = Policy::from_yaml(&format!(
        r#"
trustDomain: cluster.local
stepUp:
  providers:
    py:
      issuer: {ISS}
      jwks: {{file: {}}}
      audiences: [payments]
      algorithms: [ES256, RS256, PS256]
    pinned:
      issuer: {ISS}
      jwks: {{file: {}}}
      audiences: [payments]
      algorithms: [ES256]
      typ: [at+jwt]
inbound:
  ports:
    - port: 443
      protocol: http
      allow: [{{from: ["{PEER}"]}}]
      routes:
        - name: pay
          match: {{path: /pay}}
          stepUp: {{provider: py, acr: [urn:stepmesh:acr:mfa], amr: [mfa], maxAge: 60s}}
        - name: pinned
          match: {{path: /pinned}}
          stepUp: {{provider: pinned}}
"#,
        jwks.display(),
        jwks.display()
    ))
    .unwrap();
    let stepup = StepUp::new(StepUpMetrics::default());
    let id = SpiffeId::parse(PEER).unwrap();
    let ask = |name: &str, path: &'static str| {
        let token = minted["tokens"][name].as_str().unwrap().to_owned();
        let (policy, stepup, id) = (&policy, &stepup, &id);
        async move {
            let mut h = HeaderMap::new();
            h.insert(
                "authorization",
                HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
            );
            let req = RequestInfo {
                peer: Peer { id, x5t_s256: "" },
                port: 443,
                method: &Method::POST,
                uri: &http::Uri::from_static(path),
                headers: &h,
            };
            decide(policy, stepup, req, unix_now()).await
        }
    };
    for name in ["es256", "rs256", "ps256"] {
        let d = ask(name, "/pay").await;
        assert_eq!(
            (d.outcome, d.reason, d.subject.as_deref()),
            (Outcome::Allow, "step_up_ok", Some("bob")),
            "{name}"
        );
    }
    for (name, reason) in [
        ("expired", "expired"),
        ("wrong_aud", "wrong_audience"),
        ("none", "alg_not_allowed"),
        ("weak_acr", "insufficient_acr"),
        // The named key pins RS256: a PS256 token is an algorithm it refuses.
        ("ps256_on_rs256_kid", "alg_not_allowed"),
    ] {
        let d = ask(name, "/pay").await;
        assert_eq!(d.reason, reason, "{name}");
        assert!(matches!(d.outcome, Outcome::Challenge(_)), "{name}");
    }
    assert_eq!(ask("at_jwt", "/pinned").await.reason, "step_up_ok");
    assert_eq!(ask("es256", "/pinned").await.reason, "wrong_typ");
}
