//! Every branch of the request decision, through [`decide`] with a real
//! provider (keys from a JWKS file written by the test IdP).

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use http::{HeaderMap, HeaderValue, Method};
use serde_json::{json, Value};

use super::*;
use crate::policy::SpiffeId;
use crate::stepup::testing::{base_claims, mint_hs256, now, TestIdp};
use crate::stepup::StepUpMetrics;

const ISS: &str = "https://idp.example.com";
const FRONTEND: &str = "spiffe://cluster.local/ns/web/sa/frontend";
const OPS: &str = "spiffe://cluster.local/ns/ops/sa/oncall";
const THUMB: &str = "frontend-cert-thumbprint";

struct Fixture {
    idp: TestIdp,
    policy: Policy,
    stepup: StepUp,
    _dir: tempfile::TempDir,
}

fn policy_yaml(jwks: &std::path::Path, mode: &str) -> String {
    format!(
        r#"
trustDomain: cluster.local
mode: {mode}
stepUp:
  providers:
    corp:
      issuer: {ISS}
      jwks: {{file: {jwks}}}
      audiences: [payments]
      algorithms: [ES256, RS256]
      leeway: 30s
    pinned:
      issuer: {ISS}
      jwks: {{file: {jwks}}}
      audiences: [payments]
      algorithms: [ES256]
      typ: [at+jwt]
inbound:
  default: deny
  ports:
    - port: 8080
      protocol: http
      allow:
        - from: [{FRONTEND}, spiffe://cluster.local/ns/ops/*]
      routes:
        - name: refunds
          match: {{methods: [POST], path: /refunds/*}}
          from: [{FRONTEND}]
          stepUp:
            provider: corp
            acr: [urn:stepmesh:acr:mfa, urn:stepmesh:acr:hwk]
            maxAge: 300s
            bindToPeer: azp
        - name: cnf
          match: {{path: /cnf}}
          stepUp: {{provider: corp, bindToPeer: cnf}}
        - name: okta
          match: {{path: /okta}}
          stepUp: {{provider: corp, acr: ["urn:okta:loa:2fa:any"], amr: [mfa], maxAge: 600s}}
        - name: auth0
          match: {{path: /auth0}}
          stepUp: {{provider: corp, amr: [mfa]}}
        - name: entra
          match: {{path: /entra}}
          stepUp: {{provider: corp, claims: {{acrs: c1}}, amr: [mfa]}}
        - name: forward
          match: {{path: /forward}}
          stepUp: {{provider: corp, header: x-step-up-token, forward: true}}
        - name: pinned
          match: {{path: /pinned}}
          stepUp: {{provider: pinned}}
"#,
        jwks = jwks.display()
    )
}

fn fixture(mode: &str) -> Fixture {
    let idp = TestIdp::new(ISS).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, idp.jwks().to_string()).unwrap();
    let policy = Policy::from_yaml(&policy_yaml(&jwks, mode)).unwrap();
    Fixture {
        idp,
        policy,
        stepup: StepUp::new(StepUpMetrics::default()),
        _dir: dir,
    }
}

fn good_claims() -> Value {
    let mut c = base_claims(ISS, "payments", "alice@example.com");
    c["acr"] = json!("urn:stepmesh:acr:mfa");
    c["azp"] = json!(FRONTEND);
    c
}

impl Fixture {
    async fn ask(
        &self,
        peer: &str,
        method: Method,
        path: &str,
        headers: HeaderMap,
    ) -> GateDecision {
        let id = SpiffeId::parse(peer).unwrap();
        let uri: http::Uri = path.parse().unwrap();
        let req = RequestInfo {
            peer: Peer {
                id: &id,
                x5t_s256: THUMB,
            },
            port: 8080,
            method: &method,
            uri: &uri,
            headers: &headers,
        };
        decide(&self.policy, &self.stepup, req, unix_now()).await
    }

    async fn with_token(&self, path: &str, token: &str) -> GateDecision {
        self.ask(FRONTEND, Method::POST, path, bearer(token)).await
    }
}

fn bearer(token: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    h
}

fn challenge(d: &GateDecision) -> String {
    match &d.outcome {
        Outcome::Challenge(v) => v.to_str().unwrap().to_owned(),
        other => panic!("expected a challenge, got {other:?} ({})", d.reason),
    }
}

fn assert_invalid(d: &GateDecision, reason: &str) {
    assert_eq!(d.reason, reason);
    let c = challenge(d);
    assert!(
        c.starts_with("Bearer error=\"invalid_token\", error_description=\""),
        "{c}"
    );
    assert_eq!(d.status(), Some(http::StatusCode::UNAUTHORIZED));
}

#[tokio::test]
async fn non_sensitive_route_is_allowed_on_identity() {
    let f = fixture("enforce");
    let d = f
        .ask(FRONTEND, Method::GET, "/catalog", HeaderMap::new())
        .await;
    assert_eq!(
        (d.outcome, d.reason, &*d.rule, d.route),
        (Outcome::Allow, "allowed", "inbound.ports[0].allow[0]", None)
    );
    let d = f
        .ask(FRONTEND, Method::GET, "/refunds/1", HeaderMap::new())
        .await;
    assert_eq!(d.outcome, Outcome::Allow, "GET is not the sensitive method");
}

#[tokio::test]
async fn forbidden_peer_gets_403_even_with_a_perfect_token() {
    let f = fixture("enforce");
    let token = f.idp.es256(&good_claims()).unwrap();
    let d = f
        .ask(
            "spiffe://cluster.local/ns/web/sa/other",
            Method::POST,
            "/refunds/1",
            bearer(&token),
        )
        .await;
    assert_eq!(
        (d.outcome.clone(), d.reason, d.status()),
        (
            Outcome::Forbidden,
            "not_allowed",
            Some(http::StatusCode::FORBIDDEN)
        )
    );
    // Allowed on the port, but the route narrows to the frontend.
    let d = f.ask(OPS, Method::POST, "/refunds/1", bearer(&token)).await;
    assert_eq!(
        (d.outcome, d.reason, &*d.rule),
        (Outcome::Forbidden, "route_not_allowed", "refunds")
    );
}

#[tokio::test]
async fn no_token_gets_the_rfc6750_challenge() {
    let f = fixture("enforce");
    let d = f
        .ask(FRONTEND, Method::POST, "/refunds/1", HeaderMap::new())
        .await;
    assert_eq!(d.reason, "no_token");
    assert_eq!(
        challenge(&d),
        r#"Bearer realm="stepmesh", acr_values="urn:stepmesh:acr:mfa urn:stepmesh:acr:hwk", max_age=300"#
    );
    let mut basic = HeaderMap::new();
    basic.insert("authorization", HeaderValue::from_static("Basic YTpi"));
    let d = f.ask(FRONTEND, Method::POST, "/refunds/1", basic).await;
    assert_eq!(d.reason, "no_token");
}

#[tokio::test]
async fn weak_or_stale_authentication_gets_the_rfc9470_challenge() {
    let f = fixture("enforce");
    let mut c = good_claims();
    c["acr"] = json!("urn:stepmesh:acr:pwd");
    let d = f.with_token("/refunds/1", &f.idp.es256(&c).unwrap()).await;
    assert_eq!(d.reason, "insufficient_acr");
    assert_eq!(
        challenge(&d),
        "Bearer error=\"insufficient_user_authentication\", error_description=\"A different authentication level is required\", acr_values=\"urn:stepmesh:acr:mfa urn:stepmesh:acr:hwk\", max_age=300"
    );
    let mut c = good_claims();
    c["auth_time"] = json!(now() - 400);
    let d = f.with_token("/refunds/1", &f.idp.es256(&c).unwrap()).await;
    assert_eq!(d.reason, "stale_auth_time");
    assert!(challenge(&d).contains("error=\"insufficient_user_authentication\", error_description=\"More recent authentication is required\""));
    let mut c = good_claims();
    c.as_object_mut().unwrap().remove("auth_time");
    let d = f.with_token("/refunds/1", &f.idp.es256(&c).unwrap()).await;
    assert_eq!(
        d.reason, "stale_auth_time",
        "no auth_time cannot prove freshness"
    );
    // A login in the future (past the leeway) would stay fresh until the
    // token expires: it proves nothing either.
    let mut c = good_claims();
    c["auth_time"] = json!(now() + 3600);
    let d = f.with_token("/refunds/1", &f.idp.es256(&c).unwrap()).await;
    assert_eq!(d.reason, "stale_auth_time", "a login in the future");
}

#[tokio::test]
async fn invalid_tokens_get_invalid_token() {
    let f = fixture("enforce");
    let t = |c: &Value| f.idp.es256(c).unwrap();
    let mut c = good_claims();
    c["exp"] = json!(now() - 120);
    assert_invalid(&f.with_token("/refunds/1", &t(&c)).await, "expired");
    let mut c = good_claims();
    c.as_object_mut().unwrap().remove("exp");
    assert_invalid(&f.with_token("/refunds/1", &t(&c)).await, "expired");
    let mut c = good_claims();
    c["nbf"] = json!(now() + 120);
    assert_invalid(&f.with_token("/refunds/1", &t(&c)).await, "not_yet_valid");
    let mut c = good_claims();
    c["iss"] = json!("https://evil.example.com");
    assert_invalid(&f.with_token("/refunds/1", &t(&c)).await, "wrong_issuer");
    let mut c = good_claims();
    c["aud"] = json!(["billing", "ledger"]);
    assert_invalid(&f.with_token("/refunds/1", &t(&c)).await, "wrong_audience");
    let mut c = good_claims();
    c["azp"] = json!("spiffe://cluster.local/ns/web/sa/other");
    assert_invalid(&f.with_token("/refunds/1", &t(&c)).await, "azp_mismatch");

    // Signature tampering: claims swapped under a valid signature.
    let good = t(&good_claims());
    let mut forged = good_claims();
    forged["sub"] = json!("mallory");
    let forged_body = t(&forged).split('.').nth(1).unwrap().to_owned();
    let parts: Vec<&str> = good.split('.').collect();
    let tampered = format!("{}.{}.{}", parts[0], forged_body, parts[2]);
    assert_invalid(
        &f.with_token("/refunds/1", &tampered).await,
        "bad_signature",
    );

    // Signed by a key of another IdP under our kid.
    let other = TestIdp::with_kids(ISS, f.idp.es_kid(), "x").unwrap();
    assert_invalid(
        &f.with_token("/refunds/1", &other.es256(&good_claims()).unwrap())
            .await,
        "bad_signature",
    );

    let none = f
        .idp
        .mint(&json!({"alg": "none", "typ": "JWT"}), &good_claims())
        .unwrap();
    assert_invalid(&f.with_token("/refunds/1", &none).await, "alg_not_allowed");
    let pem = f.idp.es_public_pem().unwrap();
    let hs = mint_hs256(
        pem.as_bytes(),
        &json!({"alg": "HS256", "kid": f.idp.es_kid()}),
        &good_claims(),
    );
    assert_invalid(&f.with_token("/refunds/1", &hs).await, "alg_not_allowed");
    let unknown = f
        .idp
        .mint(&json!({"alg": "ES256", "kid": "made-up"}), &good_claims())
        .unwrap();
    assert_invalid(&f.with_token("/refunds/1", &unknown).await, "unknown_kid");
    assert_invalid(&f.with_token("/refunds/1", "not.a.jwt").await, "malformed");
    assert_invalid(&f.with_token("/refunds/1", "garbage").await, "malformed");
    let mut two = bearer(&good);
    two.append(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {good}")).unwrap(),
    );
    assert_invalid(
        &f.ask(FRONTEND, Method::POST, "/refunds/1", two).await,
        "malformed",
    );
}

#[tokio::test]
async fn cnf_binds_the_token_to_the_peer_certificate() {
    let f = fixture("enforce");
    let mut c = good_claims();
    c["cnf"] = json!({"x5t#S256": THUMB});
    let d = f.with_token("/cnf", &f.idp.es256(&c).unwrap()).await;
    assert_eq!((d.outcome, d.reason), (Outcome::Allow, "step_up_ok"));
    c["cnf"] = json!({"x5t#S256": "another-workloads-thumbprint"});
    assert_invalid(
        &f.with_token("/cnf", &f.idp.es256(&c).unwrap()).await,
        "cnf_mismatch",
    );
    c.as_object_mut().unwrap().remove("cnf");
    assert_invalid(
        &f.with_token("/cnf", &f.idp.es256(&c).unwrap()).await,
        "cnf_mismatch",
    );
}

/// docs/STEPUP.md: a token over 16 KiB is `malformed`, refused unparsed; a
/// good one just under the cap passes.
#[tokio::test]
async fn tokens_over_16_kib_are_malformed() {
    let f = fixture("enforce");
    let padded = |len: usize| {
        let mut c = good_claims();
        c["pad"] = json!("");
        let base = f.idp.es256(&c).unwrap().len();
        // Base64url: 4 characters per 3 bytes of padding.
        c["pad"] = json!("x".repeat((len - base) / 4 * 3));
        f.idp.es256(&c).unwrap()
    };
    let under = padded(16 * 1024 - 8);
    assert!(
        (16 * 1024 - 16..=16 * 1024).contains(&under.len()),
        "{}",
        under.len()
    );
    let d = f.with_token("/refunds/1", &under).await;
    assert_eq!((d.outcome, d.reason), (Outcome::Allow, "step_up_ok"));
    let over = padded(16 * 1024 + 8);
    assert!(
        (16 * 1024 + 1..=16 * 1024 + 16).contains(&over.len()),
        "{}",
        over.len()
    );
    assert_invalid(&f.with_token("/refunds/1", &over).await, "malformed");
}

#[tokio::test]
async fn good_token_is_forwarded_without_the_token_and_with_the_subject() {
    let f = fixture("enforce");
    for token in [
        f.idp.es256(&good_claims()).unwrap(),
        f.idp.rs256(&good_claims()).unwrap(),
    ] {
        let d = f.with_token("/refunds/1", &token).await;
        assert_eq!(
            (d.outcome, d.reason, &*d.rule),
            (Outcome::Allow, "step_up_ok", "refunds")
        );
        assert_eq!(d.subject.as_deref(), Some("alice@example.com"));
        assert_eq!(d.strip, Some(http::header::AUTHORIZATION));
    }
    // forward: true and a custom header, without the Bearer prefix.
    let mut h = HeaderMap::new();
    h.insert(
        "x-step-up-token",
        HeaderValue::from_str(&f.idp.es256(&good_claims()).unwrap()).unwrap(),
    );
    let d = f.ask(FRONTEND, Method::GET, "/forward", h).await;
    assert_eq!((d.outcome, d.strip), (Outcome::Allow, None));
}

#[tokio::test]
async fn verified_tokens_are_cached() {
    let f = fixture("enforce");
    let token = f.idp.es256(&good_claims()).unwrap();
    assert_eq!(
        f.with_token("/refunds/1", &token).await.outcome,
        Outcome::Allow
    );
    let cfg = f.policy.provider("corp").unwrap();
    let provider = f.stepup.provider(cfg).await;
    assert_eq!(provider.cached_tokens(), 1);
    // The cached token is still checked against the route and the peer.
    assert_eq!(
        f.with_token("/refunds/1", &token).await.outcome,
        Outcome::Allow
    );
    assert_eq!(provider.cached_tokens(), 1);
    let d = f.ask(OPS, Method::GET, "/cnf", bearer(&token)).await;
    assert_eq!(d.reason, "cnf_mismatch");
}

#[tokio::test]
async fn typ_pinning() {
    let f = fixture("enforce");
    let at = f
        .idp
        .mint(&json!({"alg": "ES256", "typ": "at+jwt"}), &good_claims())
        .unwrap();
    assert_eq!(f.with_token("/pinned", &at).await.outcome, Outcome::Allow);
    let long = f
        .idp
        .mint(
            &json!({"alg": "ES256", "typ": "application/at+JWT"}),
            &good_claims(),
        )
        .unwrap();
    assert_eq!(f.with_token("/pinned", &long).await.outcome, Outcome::Allow);
    let jwt = f.idp.es256(&good_claims()).unwrap();
    assert_invalid(&f.with_token("/pinned", &jwt).await, "wrong_typ");
    let rs = f
        .idp
        .mint(&json!({"alg": "RS256", "typ": "at+jwt"}), &good_claims())
        .unwrap();
    assert_invalid(&f.with_token("/pinned", &rs).await, "alg_not_allowed");
}

#[tokio::test]
async fn audit_mode_lets_everything_through_and_says_why() {
    let f = fixture("audit");
    let d = f
        .ask(FRONTEND, Method::POST, "/refunds/1", HeaderMap::new())
        .await;
    assert_eq!(
        (d.outcome, d.would_deny, d.reason),
        (Outcome::Allow, true, "no_token")
    );
    let d = f
        .ask(
            "spiffe://cluster.local/ns/x/sa/y",
            Method::GET,
            "/",
            HeaderMap::new(),
        )
        .await;
    assert_eq!(
        (d.outcome, d.would_deny, d.reason),
        (Outcome::Allow, true, "not_allowed")
    );
    let d = f
        .with_token("/refunds/1", &f.idp.es256(&good_claims()).unwrap())
        .await;
    assert_eq!(
        (d.outcome, d.would_deny, d.reason),
        (Outcome::Allow, false, "step_up_ok")
    );
}

/// Okta: `acr` (Okta's LoA URNs), `amr` array, `auth_time` (Okta docs,
/// "Step-up authentication using ACR values").
#[tokio::test]
async fn okta_shaped_tokens() {
    let f = fixture("enforce");
    let okta = |acr: &str, amr: Value, age: i64| {
        let n = now();
        json!({
            "ver": 1, "jti": "AT.abc", "iss": ISS, "aud": "payments", "sub": "00uid4BxXw6I6TV4m0g3",
            "iat": n, "exp": n + 3600, "cid": "0oa1", "uid": "00uid4", "scp": ["openid"],
            "auth_time": n - age, "acr": acr, "amr": amr,
        })
    };
    let ok = f
        .idp
        .rs256(&okta(
            "urn:okta:loa:2fa:any",
            json!(["pwd", "mfa", "otp"]),
            10,
        ))
        .unwrap();
    assert_eq!(f.with_token("/okta", &ok).await.reason, "step_up_ok");
    let one = f
        .idp
        .rs256(&okta("urn:okta:loa:1fa:any", json!(["pwd"]), 10))
        .unwrap();
    assert_eq!(f.with_token("/okta", &one).await.reason, "insufficient_acr");
    let old = f
        .idp
        .rs256(&okta("urn:okta:loa:2fa:any", json!(["pwd", "mfa"]), 3600))
        .unwrap();
    assert_eq!(f.with_token("/okta", &old).await.reason, "stale_auth_time");
}

/// Auth0: MFA shows as `amr: ["mfa"]`; `acr` is the PAPE policy URI.
#[tokio::test]
async fn auth0_shaped_tokens() {
    let f = fixture("enforce");
    let auth0 = |amr: Option<Value>| {
        let n = now();
        let mut c = json!({
            "iss": ISS, "sub": "auth0|5f7c8ec7c33c6c004bbafe82", "aud": ["payments", "https://tenant.auth0.com/userinfo"],
            "iat": n, "exp": n + 86400, "azp": "Eq0bGYL2F1Y", "scope": "openid profile",
            "acr": "http://schemas.openid.net/pape/policies/2007/06/multi-factor",
        });
        if let Some(amr) = amr {
            c["amr"] = amr;
        }
        c
    };
    let ok = f.idp.rs256(&auth0(Some(json!(["mfa"])))).unwrap();
    assert_eq!(f.with_token("/auth0", &ok).await.reason, "step_up_ok");
    let without = f.idp.rs256(&auth0(None)).unwrap();
    assert_eq!(
        f.with_token("/auth0", &without).await.reason,
        "insufficient_amr"
    );
}

/// Microsoft Entra: Conditional Access authentication context in `acrs`
/// (an array, e.g. `["c1"]`), `amr` (`pwd`, `mfa`), v2 tokens.
#[tokio::test]
async fn entra_shaped_tokens() {
    let f = fixture("enforce");
    let entra = |acrs: Value, amr: Value| {
        let n = now();
        json!({
            "aud": "payments", "iss": ISS, "iat": n, "nbf": n, "exp": n + 3900,
            "acrs": acrs, "amr": amr, "aio": "AXQAi/8U", "azp": "6e74172b-be56-4843-9ff4-e66a39bb12e3",
            "azpacr": "0", "name": "Abe Lincoln", "oid": "690222be-ff1a-4d56-abd1-7e4f7d38e474",
            "preferred_username": "abeli@microsoft.com", "scp": "access_as_user",
            "sub": "HKZpfaHyWadeOouYlitjrI-KffTm222X5rrV3xDqfKQ", "tid": "72f988bf-86f1-41af-91ab-2d7cd011db47",
            "uti": "fqiBqXLPj0eQa82S-IYFAA", "ver": "2.0",
        })
    };
    let ok = f
        .idp
        .rs256(&entra(json!(["c1", "c3"]), json!(["pwd", "mfa"])))
        .unwrap();
    assert_eq!(f.with_token("/entra", &ok).await.reason, "step_up_ok");
    let no_ctx = f
        .idp
        .rs256(&entra(json!(["c2"]), json!(["pwd", "mfa"])))
        .unwrap();
    assert_eq!(
        f.with_token("/entra", &no_ctx).await.reason,
        "insufficient_claims"
    );
    let no_mfa = f.idp.rs256(&entra(json!(["c1"]), json!(["pwd"]))).unwrap();
    assert_eq!(
        f.with_token("/entra", &no_mfa).await.reason,
        "insufficient_amr"
    );
}
