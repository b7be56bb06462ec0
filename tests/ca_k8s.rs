//! The Kubernetes credential verifiers against a real CA process: tokens
//! shaped exactly as a real API server issues them (tests/fixtures/k8s/),
//! re-signed with a key made here, and a local HTTPS server speaking the
//! real `authentication.k8s.io/v1` TokenReview JSON.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use base64::Engine;
use bytes::Bytes;
use common::ca::{sign_request, CaProcess};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use stepmesh_ca::client::Credential;

const TD: &str = "td.test";
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/k8s");

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn fixture(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(Path::new(FIXTURES).join(name)).unwrap()).unwrap()
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// An RSA signing key and the JWKS publishing it, shaped as the fixture's.
struct Issuer {
    key: RsaKeyPair,
    jwks: Value,
    kid: String,
    public_pem: String,
}

impl Issuer {
    fn new() -> Self {
        let rc =
            rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
                .unwrap();
        let key = RsaKeyPair::from_pkcs8(&rc.serialize_der()).unwrap();
        let spki = rcgen::PublicKeyData::subject_public_key_info(&rc);
        let (n, e) = rsa_n_e(&spki);
        let mut jwks = fixture("apiserver-openid-v1-jwks.json");
        // Same shape and same kid as the real API server's key; our modulus.
        let kid = jwks["keys"][0]["kid"].as_str().unwrap().to_owned();
        jwks["keys"][0]["n"] = json!(b64(&n));
        jwks["keys"][0]["e"] = json!(b64(&e));
        let public_pem = stepmesh_ca::pem::encode("PUBLIC KEY", &spki);
        Self {
            key,
            jwks,
            kid,
            public_pem,
        }
    }

    fn sign_rs256(&self, header: &Value, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let mut sig = vec![0; self.key.public_modulus_len()];
        self.key
            .sign(
                &RSA_PKCS1_SHA256,
                &aws_lc_rs::rand::SystemRandom::new(),
                input.as_bytes(),
                &mut sig,
            )
            .unwrap();
        format!("{input}.{}", b64(&sig))
    }
}

/// (n, e) of an RSA SubjectPublicKeyInfo, without leading zero bytes.
fn rsa_n_e(spki: &[u8]) -> (Vec<u8>, Vec<u8>) {
    use x509_parser::prelude::FromDer;
    let (_, parsed) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki).unwrap();
    let x509_parser::public_key::PublicKey::RSA(rsa) = parsed.parsed().unwrap() else {
        panic!("not an RSA key")
    };
    let strip = |b: &[u8]| {
        b.iter()
            .skip_while(|x| **x == 0)
            .copied()
            .collect::<Vec<_>>()
    };
    (strip(rsa.modulus), strip(rsa.exponent))
}

/// The fixture's header and claims with fresh times.
fn real_shape() -> (Value, Value) {
    let token = fixture("projected-sa-token-decoded.json");
    let mut claims = token["claims"].clone();
    let t = now();
    claims["iat"] = json!(t - 60);
    claims["nbf"] = json!(t - 60);
    claims["exp"] = json!(t + 3600);
    (token["header"].clone(), claims)
}

fn jwks_ca(issuer: &Issuer, extra: &[&str]) -> (CaProcess, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, issuer.jwks.to_string()).unwrap();
    let iss = fixture("projected-sa-token-decoded.json")["claims"]["iss"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut args = vec![
        "--k8s-jwks",
        jwks.to_str().unwrap(),
        "--k8s-issuer",
        &iss,
        "--audience",
        "test-ca",
    ];
    args.extend_from_slice(extra);
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (CaProcess::start_with(TD, &[], &args), dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_token_shape_maps_to_the_service_account_id() {
    let issuer = Issuer::new();
    let (ca, _dir) = jwks_ca(&issuer, &[]);
    let (header, claims) = real_shape();
    let token = issuer.sign_rs256(&header, &claims);
    let svid = ca
        .client()
        .issue(&Credential::Token(token), None)
        .await
        .unwrap();
    assert_eq!(svid.id.as_str(), "spiffe://td.test/ns/default/sa/default");
    ca.wait_audit(|v| v["outcome"] == "issued" && v["verifier"] == "k8s-jwks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_unauthenticated_and_nothing_is_issued() {
    let issuer = Issuer::new();
    let (ca, _dir) = jwks_ca(&issuer, &[]);
    let (header, claims) = real_shape();
    let t = now();
    let with = |k: &str, v: Value| {
        let mut c = claims.clone();
        c[k] = v;
        c
    };
    let stranger = Issuer::new();
    let hs256 = {
        let h = json!({"alg": "HS256", "kid": issuer.kid});
        let input = format!(
            "{}.{}",
            b64(h.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let key =
            aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, issuer.public_pem.as_bytes());
        let tag = aws_lc_rs::hmac::sign(&key, input.as_bytes());
        format!("{input}.{}", b64(tag.as_ref()))
    };
    let none = format!(
        "{}.{}.",
        b64(json!({"alg": "none", "kid": issuer.kid})
            .to_string()
            .as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let mut no_k8s = claims.clone();
    no_k8s.as_object_mut().unwrap().remove("kubernetes.io");
    let cases = vec![
        (
            "expired",
            issuer.sign_rs256(&header, &with("exp", json!(t - 600))),
            "expired",
        ),
        (
            "not yet valid",
            issuer.sign_rs256(&header, &with("nbf", json!(t + 3600))),
            "not_yet_valid",
        ),
        (
            "wrong audience",
            issuer.sign_rs256(&header, &with("aud", json!(["other"]))),
            "wrong_audience",
        ),
        (
            "wrong issuer",
            issuer.sign_rs256(&header, &with("iss", json!("https://evil.example"))),
            "wrong_issuer",
        ),
        (
            "bad signature",
            stranger.sign_rs256(&header, &claims),
            "bad_signature",
        ),
        ("alg none", none, "alg_not_allowed"),
        ("HS256 with the public key", hs256, "alg_not_allowed"),
        (
            "unknown kid",
            issuer.sign_rs256(&json!({"alg": "RS256", "kid": "nope"}), &claims),
            "unknown_kid",
        ),
        (
            "no kubernetes.io claim",
            issuer.sign_rs256(&header, &no_k8s),
            "missing_claim",
        ),
    ];
    let mut grpc = ca.client().grpc();
    for (name, token, reason) in cases {
        let err = grpc.sign(sign_request(&token)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{name}: {err:?}");
        let line = ca.wait_audit(|v| v["reason"] == reason);
        assert_eq!(line["verifier"], "k8s-jwks", "{name}");
        assert!(
            !ca.logs().join("\n").contains(&token),
            "{name}: token logged"
        );
    }
    assert!(
        ca.audit().iter().all(|v| v["outcome"] != "issued"),
        "nothing issued"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_api_server_jwks_loads_and_refuses_tokens_it_did_not_sign() {
    let jwks = Path::new(FIXTURES).join("apiserver-openid-v1-jwks.json");
    let args = [
        "--k8s-jwks",
        jwks.to_str().unwrap(),
        "--k8s-issuer",
        "https://127.0.0.1:6443",
        "--audience",
        "test-ca",
    ];
    let ca = CaProcess::start_with(TD, &[], &args);
    let (header, claims) = real_shape();
    // Same kid as the real key, signed by ours.
    let token = Issuer::new().sign_rs256(&header, &claims);
    let err = ca
        .client()
        .grpc()
        .sign(sign_request(&token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    ca.wait_audit(|v| v["reason"] == "bad_signature");
}

// ---- a fake API server: HTTPS, TokenReview and /openid/v1/jwks ----

/// (authorization header, request JSON) of each call the API server got.
type Requests = Arc<Mutex<Vec<(Option<String>, Value)>>>;

struct ApiServer {
    addr: SocketAddr,
    ca_pem: String,
    requests: Requests,
}

const OWN_TOKEN: &str = "ca-service-account-token";

async fn api_server(jwks: Value) -> ApiServer {
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let ca_pem = cert.cert.pem();
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.cert.der().clone()], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests: Requests = Arc::new(Mutex::new(Vec::new()));
    let log = requests.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, log, jwks) = (acceptor.clone(), log.clone(), jwks.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let (log, jwks) = (log.clone(), jwks.clone());
                        async move {
                            Ok::<_, std::convert::Infallible>(api_answer(req, &log, &jwks).await)
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    ApiServer {
        addr,
        ca_pem,
        requests,
    }
}

async fn api_answer(
    req: hyper::Request<hyper::body::Incoming>,
    log: &Mutex<Vec<(Option<String>, Value)>>,
    jwks: &Value,
) -> hyper::Response<Full<Bytes>> {
    let json_resp = |code: u16, v: Value| {
        hyper::Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(v.to_string())))
            .unwrap()
    };
    let auth = req
        .headers()
        .get("authorization")
        .map(|v| v.to_str().unwrap().to_owned());
    let path = req.uri().path().to_owned();
    if path == "/openid/v1/jwks" {
        return json_resp(200, jwks.clone());
    }
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let review: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    log.lock().unwrap().push((auth.clone(), review.clone()));
    if path != "/apis/authentication.k8s.io/v1/tokenreviews" {
        return json_resp(
            404,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404}),
        );
    }
    if auth.as_deref() != Some(&format!("Bearer {OWN_TOKEN}")) {
        return json_resp(
            401,
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "message": "Unauthorized", "reason": "Unauthorized", "code": 401}),
        );
    }
    let spec = review["spec"].clone();
    let audiences = spec["audiences"].clone();
    // The stand-in's answer is chosen by the token's last part.
    let status = match spec["token"]
        .as_str()
        .unwrap_or("")
        .rsplit('.')
        .next()
        .unwrap_or("")
    {
        "good" => json!({
            "authenticated": true,
            "user": {
                "username": "system:serviceaccount:payments:api",
                "uid": "564ac501-dff0-492f-828b-bb172c32d237",
                "groups": ["system:serviceaccounts", "system:serviceaccounts:payments", "system:authenticated"],
                "extra": {"authentication.kubernetes.io/credential-id": ["JTI=c68559f2-41c6-49d2-83f2-71713bffbad2"]}
            },
            "audiences": audiences,
        }),
        "wrong-aud" => json!({
            "user": {},
            "error": "[invalid bearer token, token audiences [\"other\"] is invalid for the target audiences [\"stepmesh-ca\"], unknown]"
        }),
        "unaware-server" => json!({
            "authenticated": true,
            "user": {"username": "system:serviceaccount:payments:api", "groups": ["system:authenticated"]}
        }),
        "a-user" => json!({
            "authenticated": true,
            "user": {"username": "jane@example.com", "groups": ["system:authenticated"]},
            "audiences": audiences,
        }),
        _ => {
            json!({"user": {}, "error": "[invalid bearer token, square/go-jose: error in cryptographic primitive]"})
        }
    };
    json_resp(
        201,
        json!({
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": null},
            "spec": spec,
            "status": status,
        }),
    )
}

/// A token shaped as a projected ServiceAccount token for the CA's
/// audience, its last part naming the stand-in's answer (`good`, ...).
fn review_token(answer: &str) -> String {
    let claims = json!({"aud": ["stepmesh-ca"], "exp": now() + 600, "iat": now(),
                        "sub": "system:serviceaccount:payments:api"});
    shaped(&json!({"alg": "RS256", "kid": "k"}), &claims, answer)
}

fn shaped(header: &Value, claims: &Value, signature: &str) -> String {
    format!(
        "{}.{}.{signature}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    )
}

fn tokenreview_ca(url: &str, dir: &Path, ca_pem: &str) -> CaProcess {
    CaProcess::start_reviewing(TD, url, dir, ca_pem, OWN_TOKEN)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenreview_verifier_speaks_the_real_api() {
    let api = api_server(json!({"keys": []})).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = tokenreview_ca(
        &format!("https://localhost:{}", api.addr.port()),
        dir.path(),
        &api.ca_pem,
    );

    let svid = ca
        .client()
        .issue(&Credential::Token(review_token("good")), None)
        .await
        .unwrap();
    assert_eq!(svid.id.as_str(), "spiffe://td.test/ns/payments/sa/api");
    let (auth, review) = api.requests.lock().unwrap()[0].clone();
    assert_eq!(
        auth.as_deref(),
        Some("Bearer ca-service-account-token"),
        "the CA's own credential"
    );
    assert_eq!(review["apiVersion"], "authentication.k8s.io/v1");
    assert_eq!(review["kind"], "TokenReview");
    assert_eq!(review["spec"]["audiences"], json!(["stepmesh-ca"]));

    let mut grpc = ca.client().grpc();
    for (token, reason) in [
        ("wrong-aud", "wrong_audience"),
        ("unaware-server", "wrong_audience"),
        ("a-user", "not_a_service_account"),
        ("forged", "not_authenticated"),
    ] {
        let err = grpc
            .sign(sign_request(&review_token(token)))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{token}: {err:?}");
        let line = ca.wait_audit(|v| v["reason"] == reason);
        assert_eq!(line["verifier"], "k8s-tokenreview");
    }
    // Tokens a review would refuse cost none: the API server never sees them.
    let reviews = api.requests.lock().unwrap().len();
    let claims = |aud: &str, exp: i64| json!({"aud": [aud], "exp": exp, "sub": "system:serviceaccount:payments:api"});
    let rs256 = json!({"alg": "RS256"});
    for (token, reason) in [
        ("a.b.c".to_owned(), "malformed"),
        (
            shaped(&rs256, &claims("stepmesh-ca", now() - 3600), "good"),
            "expired",
        ),
        (
            shaped(
                &rs256,
                &claims("https://kubernetes.default.svc", now() + 600),
                "good",
            ),
            "wrong_audience",
        ),
        (
            shaped(
                &json!({"alg": "none"}),
                &claims("stepmesh-ca", now() + 600),
                "good",
            ),
            "alg_not_allowed",
        ),
        (
            shaped(
                &json!({"alg": "HS256"}),
                &claims("stepmesh-ca", now() + 600),
                "good",
            ),
            "alg_not_allowed",
        ),
    ] {
        let err = grpc.sign(sign_request(&token)).await.unwrap_err();
        assert_eq!(
            err.code(),
            tonic::Code::Unauthenticated,
            "{reason}: {err:?}"
        );
        assert!(err.message().contains("before review"), "{}", err.message());
    }
    assert_eq!(
        api.requests.lock().unwrap().len(),
        reviews,
        "garbage was reviewed"
    );
    assert_eq!(
        ca.audit()
            .iter()
            .filter(|v| v["outcome"] == "issued")
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenreview_server_down_is_a_clear_unavailable_error() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let dir = tempfile::tempdir().unwrap();
    let pem = rcgen::generate_simple_self_signed(vec!["localhost".into()])
        .unwrap()
        .cert
        .pem();
    let ca = tokenreview_ca(&format!("https://127.0.0.1:{port}"), dir.path(), &pem);
    let err = ca
        .client()
        .grpc()
        .sign(sign_request(&review_token("good")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("TokenReview"), "{}", err.message());
    assert!(
        err.message().to_lowercase().contains("refused"),
        "{}",
        err.message()
    );
    ca.wait_audit(|v| v["outcome"] == "unavailable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_from_the_issuer_url() {
    let issuer = Issuer::new();
    let api = api_server(issuer.jwks.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("api-ca.pem");
    std::fs::write(&ca_file, &api.ca_pem).unwrap();
    let url = format!("https://127.0.0.1:{}/openid/v1/jwks", api.addr.port());
    let args = [
        "--k8s-jwks",
        &url,
        "--k8s-jwks-ca",
        ca_file.to_str().unwrap(),
        "--k8s-issuer",
        "https://127.0.0.1:6443",
        "--audience",
        "test-ca",
    ];
    let ca = CaProcess::start_with(TD, &[], &args);
    let (header, claims) = real_shape();
    let svid = ca
        .client()
        .issue(
            &Credential::Token(issuer.sign_rs256(&header, &claims)),
            None,
        )
        .await
        .unwrap();
    assert_eq!(svid.id.as_str(), "spiffe://td.test/ns/default/sa/default");
}
