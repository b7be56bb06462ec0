//! The identity provider: the demo's direct mint, and the OIDC side over
//! HTTPS (discovery, device flow, approval, refresh).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::time::Duration;

use hyper::{Method, StatusCode};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use stepmesh_ca::https::HttpsClient;

use super::*;

#[tokio::test]
async fn tokens_verify_against_the_served_jwks() {
    let dir = tempfile::tempdir().unwrap();
    let idp = Idp::start(&dir.path().join("jwks.json")).await.unwrap();
    let served = crate::demo::apps::call(idp.addr(), Method::GET, "/jwks.json", &[]).await;
    assert_eq!(served.status, Some(StatusCode::OK));
    let on_disk = std::fs::read_to_string(dir.path().join("jwks.json")).unwrap();
    assert_eq!(served.body, on_disk);
    let jwks: serde_json::Value = serde_json::from_str(&served.body).unwrap();
    let jwk = &jwks["keys"][0];

    let minted = crate::demo::apps::call(
        idp.addr(),
        Method::POST,
        "/token?sub=alice&azp=spiffe://x/y",
        &[],
    )
    .await;
    assert_eq!(minted.status, Some(StatusCode::OK), "{}", minted.body);
    let header = jsonwebtoken::decode_header(&minted.body).unwrap();
    assert_eq!(header.alg, Algorithm::ES256);
    assert_eq!(header.kid.as_deref(), jwk["kid"].as_str());

    let key =
        DecodingKey::from_ec_components(jwk["x"].as_str().unwrap(), jwk["y"].as_str().unwrap())
            .unwrap();
    let mut validation = Validation::new(Algorithm::ES256);
    validation.set_audience(&[AUDIENCE]);
    validation.set_issuer(&[idp.issuer()]);
    let claims = jsonwebtoken::decode::<serde_json::Value>(&minted.body, &key, &validation)
        .unwrap()
        .claims;
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["azp"], "spiffe://x/y");
    assert_eq!(claims["acr"], ACR_MFA);
    assert_eq!(claims["amr"], serde_json::json!(["pwd", "mfa"]));
    assert!(claims["auth_time"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn token_endpoint_refuses_a_request_without_subject() {
    let dir = tempfile::tempdir().unwrap();
    let idp = Idp::start(&dir.path().join("jwks.json")).await.unwrap();
    let answer =
        crate::demo::apps::call(idp.addr(), Method::POST, "/token?azp=spiffe://x/y", &[]).await;
    assert_eq!(answer.status, Some(StatusCode::BAD_REQUEST));
}

/// A CA and a serving certificate for 127.0.0.1, and a client trusting the CA.
fn tls() -> (ServerTls, HttpsClient) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_cert.der().clone()).unwrap();
    let tls = ServerTls {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    };
    (tls, HttpsClient::with_roots(roots).unwrap())
}

async fn oidc_idp(interval: u64) -> (Idp, HttpsClient) {
    let (tls, client) = tls();
    let mut users = IdpConfig::default().users;
    users.insert(
        "bob".into(),
        User {
            email: "bob@example.com".into(),
            groups: vec!["dev".into(), "ops".into()],
        },
    );
    let idp = Idp::serve(IdpConfig {
        tls: Some(tls),
        users,
        id_token_ttl: Duration::from_secs(60),
        poll_interval: Duration::from_secs(interval),
        ..IdpConfig::default()
    })
    .await
    .unwrap();
    (idp, client)
}

async fn post(client: &HttpsClient, url: &str, form: &[(&str, &str)]) -> (StatusCode, Value) {
    let resp = client.post_form(url, form).await.unwrap();
    let body = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
    (resp.status, body)
}

fn verify(idp: &Idp, token: &str, aud: &str) -> Value {
    let jwks: Value = serde_json::from_str(idp.jwks()).unwrap();
    let jwk = &jwks["keys"][0];
    assert_eq!(
        jsonwebtoken::decode_header(token).unwrap().kid.as_deref(),
        jwk["kid"].as_str()
    );
    let key =
        DecodingKey::from_ec_components(jwk["x"].as_str().unwrap(), jwk["y"].as_str().unwrap())
            .unwrap();
    let mut validation = Validation::new(Algorithm::ES256);
    validation.set_audience(&[aud]);
    validation.set_issuer(&[idp.issuer()]);
    jsonwebtoken::decode::<Value>(token, &key, &validation)
        .unwrap()
        .claims
}

#[tokio::test]
async fn discovery_names_the_endpoints_over_https() {
    let (idp, client) = oidc_idp(1).await;
    assert!(idp.issuer().starts_with("https://127.0.0.1:"));
    let url = format!("{}/.well-known/openid-configuration", idp.issuer());
    let resp = client.send(&url, None, None).await.unwrap();
    assert_eq!(resp.status, StatusCode::OK);
    let doc: Value = serde_json::from_slice(&resp.body).unwrap();
    assert_eq!(doc["issuer"], idp.issuer());
    assert_eq!(doc["jwks_uri"], idp.jwks_url());
    assert_eq!(
        doc["device_authorization_endpoint"],
        format!("{}/device/authorize", idp.issuer())
    );
    assert_eq!(
        doc["id_token_signing_alg_values_supported"],
        serde_json::json!(["ES256"])
    );
    assert!(doc["acr_values_supported"]
        .as_array()
        .unwrap()
        .contains(&ACR_MFA.into()));
    let jwks = client.send(&idp.jwks_url(), None, None).await.unwrap();
    assert_eq!(std::str::from_utf8(&jwks.body).unwrap(), idp.jwks());
}

#[tokio::test]
async fn device_flow_pending_slow_down_approve_refresh() {
    let (idp, client) = oidc_idp(1).await;
    let iss = idp.issuer().to_owned();
    let (status, dev) = post(
        &client,
        &format!("{iss}/device/authorize"),
        &[
            ("client_id", "kubectl"),
            ("scope", "openid email groups"),
            ("max_age", "60"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{dev}");
    assert_eq!(dev["interval"], 1);
    let user_code = dev["user_code"].as_str().unwrap();
    assert!(dev["verification_uri_complete"]
        .as_str()
        .unwrap()
        .ends_with(user_code));
    let poll = [
        ("grant_type", DEVICE_CODE_GRANT),
        ("device_code", dev["device_code"].as_str().unwrap()),
        ("client_id", "kubectl"),
    ];
    let token_url = format!("{iss}/token");
    let (status, body) = post(&client, &token_url, &poll).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("authorization_pending"))
    );
    let (_, body) = post(&client, &token_url, &poll).await;
    assert_eq!(
        body["error"], "slow_down",
        "a second poll at once is too fast"
    );

    let approve = format!("{iss}/device/approve");
    let (status, _) = post(
        &client,
        &approve,
        &[("user_code", user_code), ("user", "mallory")],
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "an unknown user is refused");
    let (status, _) = post(
        &client,
        &approve,
        &[("user_code", "BCDF-GHJK"), ("user", "bob")],
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let before = super::signer::unix_now();
    let lower = user_code.to_lowercase().replace('-', "");
    let (status, body) = post(&client, &approve, &[("user_code", &lower), ("user", "bob")]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _) = post(
        &client,
        &format!("{iss}/device/deny"),
        &[("user_code", user_code)],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "already decided");

    let (status, tokens) = post(&client, &token_url, &poll).await;
    assert_eq!(status, StatusCode::OK, "{tokens}");
    let claims = verify(&idp, tokens["id_token"].as_str().unwrap(), "kubectl");
    assert_eq!(claims["sub"], "bob");
    assert_eq!(claims["azp"], "kubectl");
    assert_eq!(claims["email"], "bob@example.com");
    assert_eq!(claims["groups"], serde_json::json!(["dev", "ops"]));
    assert_eq!(claims["acr"], ACR_PWD);
    assert_eq!(claims["amr"], serde_json::json!(["pwd"]));
    let auth_time = claims["auth_time"].as_u64().unwrap();
    assert!(auth_time >= before && auth_time <= claims["iat"].as_u64().unwrap());
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        60
    );
    let (_, body) = post(&client, &token_url, &poll).await;
    assert_eq!(body["error"], "invalid_grant", "a device code is used once");

    // Refresh: the same login (auth_time, acr), a rotated refresh token.
    let old = tokens["refresh_token"].as_str().unwrap();
    let refresh = |rt: &str| {
        [
            ("grant_type", "refresh_token".to_owned()),
            ("refresh_token", rt.to_owned()),
            ("client_id", "kubectl".to_owned()),
        ]
    };
    let form = refresh(old);
    let form: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (status, again) = post(&client, &token_url, &form).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_ne!(again["refresh_token"], tokens["refresh_token"]);
    let claims = verify(&idp, again["id_token"].as_str().unwrap(), "kubectl");
    assert_eq!(claims["auth_time"].as_u64(), Some(auth_time));
    assert_eq!(claims["acr"], ACR_PWD);
    assert_eq!(idp.refreshes(), 1);
    let (_, body) = post(&client, &token_url, &form).await;
    assert_eq!(
        body["error"], "invalid_grant",
        "a used refresh token is refused"
    );
    idp.revoke_refresh_tokens();
    let form = refresh(again["refresh_token"].as_str().unwrap());
    let form: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (_, body) = post(&client, &token_url, &form).await;
    assert_eq!(body["error"], "invalid_grant", "revoked");
}

#[tokio::test]
async fn an_mfa_request_is_approved_only_with_the_mfa_step() {
    let (idp, client) = oidc_idp(1).await;
    let iss = idp.issuer().to_owned();
    let (_, dev) = post(
        &client,
        &format!("{iss}/device/authorize"),
        &[
            ("client_id", "kubectl"),
            ("scope", "openid"),
            ("acr_values", &format!("{ACR_MFA} other")),
        ],
    )
    .await;
    assert_eq!(
        idp.device_requests().last().unwrap().acr_values,
        vec![ACR_MFA.to_owned(), "other".to_owned()]
    );
    let code = dev["user_code"].as_str().unwrap();
    let approve = format!("{iss}/device/approve");
    let (status, body) = post(&client, &approve, &[("user_code", code), ("user", "alice")]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("mfa=true"),
        "{body}"
    );
    let (status, _) = post(
        &client,
        &approve,
        &[("user_code", code), ("user", "alice"), ("mfa", "true")],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let poll = [
        ("grant_type", DEVICE_CODE_GRANT),
        ("device_code", dev["device_code"].as_str().unwrap()),
        ("client_id", "kubectl"),
    ];
    let (status, tokens) = post(&client, &format!("{iss}/token"), &poll).await;
    assert_eq!(status, StatusCode::OK, "{tokens}");
    let claims = verify(&idp, tokens["id_token"].as_str().unwrap(), "kubectl");
    assert_eq!(claims["acr"], ACR_MFA);
    assert_eq!(claims["amr"], serde_json::json!(["pwd", "otp"]));
}

#[tokio::test]
async fn denial_expiry_and_bad_requests() {
    let (tls, client) = tls();
    let idp = Idp::serve(IdpConfig {
        tls: Some(tls),
        device_code_ttl: Duration::from_secs(1),
        poll_interval: Duration::from_secs(1),
        ..IdpConfig::default()
    })
    .await
    .unwrap();
    let iss = idp.issuer().to_owned();
    let authorize = format!("{iss}/device/authorize");
    let (status, body) = post(
        &client,
        &authorize,
        &[("client_id", "k"), ("scope", "email")],
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_scope"))
    );
    let (_, body) = post(
        &client,
        &authorize,
        &[("client_id", "k"), ("max_age", "soon")],
    )
    .await;
    assert_eq!(body["error"], "invalid_request");
    let (_, body) = post(
        &client,
        &format!("{iss}/token"),
        &[("grant_type", "password")],
    )
    .await;
    assert_eq!(body["error"], "unsupported_grant_type");

    let (_, denied) = post(&client, &authorize, &[("client_id", "k")]).await;
    let (_, expiring) = post(&client, &authorize, &[("client_id", "k")]).await;
    let (status, _) = post(
        &client,
        &format!("{iss}/device/deny"),
        &[("user_code", denied["user_code"].as_str().unwrap())],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let poll = |dev: &Value| {
        let code = dev["device_code"].as_str().unwrap().to_owned();
        let (client, url) = (client.clone(), format!("{iss}/token"));
        async move {
            post(
                &client,
                &url,
                &[
                    ("grant_type", DEVICE_CODE_GRANT),
                    ("device_code", &code),
                    ("client_id", "k"),
                ],
            )
            .await
            .1
        }
    };
    assert_eq!(poll(&denied).await["error"], "access_denied");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(poll(&expiring).await["error"], "expired_token");
}

#[tokio::test]
async fn code_flow_with_pkce_on_a_loopback_redirect() {
    let (idp, client) = oidc_idp(1).await;
    let iss = idp.issuer().to_owned();
    let verifier = "a-verifier-of-at-least-43-characters-0123456789";
    let challenge = super::grants::s256(verifier);
    let redirect = "http://127.0.0.1:4711/callback";
    let request = |extra: &[(&'static str, &'static str)]| {
        let mut form = vec![
            ("response_type", "code"),
            ("client_id", "kubectl"),
            ("redirect_uri", redirect),
            ("scope", "openid email"),
            ("state", "s1"),
            ("nonce", "n1"),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
        ];
        form.extend_from_slice(extra);
        form
    };
    let query = stepmesh_ca::https::form_encode(&request(&[]));
    let page = client
        .send(&format!("{iss}/authorize?{query}"), None, None)
        .await
        .unwrap();
    assert_eq!(page.status, StatusCode::OK);
    for bad in [
        query.replace("127.0.0.1", "evil.example.com"),
        query.replace("S256", "plain"),
        query.replace("response_type=code", "response_type=token"),
    ] {
        let page = client
            .send(&format!("{iss}/authorize?{bad}"), None, None)
            .await
            .unwrap();
        assert_eq!(page.status, StatusCode::BAD_REQUEST, "{bad}");
    }

    let approve = format!("{iss}/authorize/approve");
    let location = |resp: &stepmesh_ca::https::Response| {
        assert_eq!(resp.status, StatusCode::SEE_OTHER);
        let location = resp.headers["location"].to_str().unwrap().to_owned();
        let query = location
            .strip_prefix(&format!("{redirect}?"))
            .unwrap()
            .to_owned();
        stepmesh_ca::https::form_decode(&query).unwrap()
    };
    let deny = client
        .post_form(&format!("{iss}/authorize/deny"), &request(&[]))
        .await
        .unwrap();
    assert_eq!(
        location(&deny),
        vec![
            ("error".into(), "access_denied".into()),
            ("state".into(), "s1".into())
        ]
    );
    let mfa = request(&[("acr_values", ACR_MFA), ("user", "alice")]);
    let (status, _) = post(&client, &approve, &mfa).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "MFA asked, not done");

    let code_for = |mfa: &'static str| {
        let (client, approve, form) = (
            client.clone(),
            approve.clone(),
            request(&[("user", "alice"), ("mfa", mfa)]),
        );
        async move {
            let resp = client.post_form(&approve, &form).await.unwrap();
            let fields = location(&resp);
            assert_eq!(fields[1], ("state".into(), "s1".into()));
            fields[0].1.clone()
        }
    };
    let redeem = |code: String, verifier: &'static str| {
        let (client, url) = (client.clone(), format!("{iss}/token"));
        async move {
            post(
                &client,
                &url,
                &[
                    ("grant_type", "authorization_code"),
                    ("code", &code),
                    ("redirect_uri", redirect),
                    ("client_id", "kubectl"),
                    ("code_verifier", verifier),
                ],
            )
            .await
        }
    };
    let (status, body) = redeem(
        code_for("false").await,
        "wrong-verifier-wrong-verifier-wrong-verifier",
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_grant"))
    );
    let code = code_for("true").await;
    let (status, tokens) = redeem(code.clone(), verifier).await;
    assert_eq!(status, StatusCode::OK, "{tokens}");
    let claims = verify(&idp, tokens["id_token"].as_str().unwrap(), "kubectl");
    assert_eq!(
        (claims["nonce"].as_str(), claims["acr"].as_str()),
        (Some("n1"), Some(ACR_MFA))
    );
    let (_, body) = redeem(code, verifier).await;
    assert_eq!(body["error"], "invalid_grant", "a code is used once");
}
