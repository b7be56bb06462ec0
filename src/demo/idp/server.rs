//! The identity provider's HTTP(S) endpoints: discovery, JWKS, device
//! authorization, token (device code, refresh token, and the demo's direct
//! mint), and the verification page's approve/deny.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::grants::{Decision, DeviceRequest, Login, Poll};
use super::signer::{secret, unix_now, user_code};
use super::wire::{json_reply, no_store, oauth_error, read_form, reply, server_error, Form};
use super::{IdpError, ServerTls, State, ACR_MFA, ACR_PWD, DEVICE_CODE_GRANT};

/// Bound on a TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A TLS 1.3 acceptor for `tls`.
pub(super) fn acceptor(tls: &ServerTls) -> Result<TlsAcceptor, IdpError> {
    let certs = stepmesh_ca::pem::decode_certs(tls.cert_pem.as_bytes()).map_err(IdpError::Tls)?;
    let key =
        stepmesh_ca::pem::decode_private_key(tls.key_pem.as_bytes()).map_err(IdpError::Tls)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| IdpError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| IdpError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

pub(super) async fn serve(listener: TcpListener, tls: Option<TlsAcceptor>, state: Arc<State>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let (state, tls) = (state.clone(), tls.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(answer(req, &state).await) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let _ = match tls {
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await
                        }
                        _ => return,
                    }
                }
                None => builder.serve_connection(TokioIo::new(tcp), service).await,
            };
        });
    }
}

async fn answer(req: Request<Incoming>, state: &State) -> Response<Full<Bytes>> {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let query = req.uri().query().unwrap_or("").to_owned();
    match (&method, path.as_str()) {
        (&Method::GET, "/.well-known/openid-configuration") => {
            json_reply(StatusCode::OK, &discovery(&state.issuer))
        }
        (&Method::GET, "/jwks.json") => {
            reply(StatusCode::OK, "application/json", state.signer.jwks())
        }
        (&Method::GET, "/authorize") => super::authcode::page(&query),
        (&Method::GET, "/device") => reply(
            StatusCode::OK,
            "text/plain",
            "This test identity provider has no login page: POST /device/approve \
             (user_code, user, mfa=true|false) or /device/deny (user_code).\n",
        ),
        // The demo's first form: mint a step-up token at once.
        (&Method::POST, "/token") if !query.is_empty() => demo_token(&query, state),
        (&Method::POST, _) => {
            let form = match read_form(req).await {
                Ok(form) => form,
                Err(e) => return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", &e),
            };
            match path.as_str() {
                "/device/authorize" => device_authorize(&form, state),
                "/token" => token(&form, state),
                "/device/approve" => decide(&form, state, true),
                "/device/deny" => decide(&form, state, false),
                "/authorize/approve" => super::authcode::decide(&form, state, true),
                "/authorize/deny" => super::authcode::decide(&form, state, false),
                _ => not_found(),
            }
        }
        _ => not_found(),
    }
}

fn discovery(issuer: &str) -> Value {
    json!({
        "issuer": issuer,
        "jwks_uri": format!("{issuer}/jwks.json"),
        "token_endpoint": format!("{issuer}/token"),
        "device_authorization_endpoint": format!("{issuer}/device/authorize"),
        "authorization_endpoint": format!("{issuer}/authorize"),
        "grant_types_supported": [DEVICE_CODE_GRANT, "authorization_code", "refresh_token"],
        "response_types_supported": ["code"],
        "code_challenge_methods_supported": ["S256"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256"],
        "acr_values_supported": [ACR_PWD, ACR_MFA],
        "scopes_supported": ["openid", "email", "groups", "offline_access"],
        "claims_supported": ["iss", "sub", "aud", "azp", "iat", "exp", "auth_time",
            "acr", "amr", "email", "groups"],
        "token_endpoint_auth_methods_supported": ["none"],
    })
}

fn device_authorize(form: &Form, state: &State) -> Response<Full<Bytes>> {
    let Some(client_id) = form.get("client_id").filter(|c| !c.is_empty()) else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "client_id is required",
        );
    };
    let scope = form.get("scope").unwrap_or("openid");
    if !scope.split(' ').any(|s| s == "openid") {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            "this provider issues ID tokens: the scope must include openid",
        );
    }
    let max_age = match form.get("max_age").map(str::parse::<u64>).transpose() {
        Ok(max_age) => max_age,
        Err(_) => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "max_age must be a number of seconds",
            )
        }
    };
    let request = DeviceRequest {
        client_id: client_id.to_owned(),
        scope: scope.to_owned(),
        acr_values: form
            .get("acr_values")
            .unwrap_or("")
            .split(' ')
            .filter(|a| !a.is_empty())
            .map(str::to_owned)
            .collect(),
        max_age,
    };
    let (device_code, user_code) = match secret(32).and_then(|d| Ok((d, user_code()?))) {
        Ok(codes) => codes,
        Err(e) => return server_error(&e),
    };
    let verification_uri = format!("{}/device", state.issuer);
    let body = json!({
        "device_code": device_code,
        "user_code": user_code,
        "verification_uri": verification_uri,
        "verification_uri_complete": format!("{verification_uri}?user_code={user_code}"),
        "expires_in": state.device_code_ttl.as_secs(),
        "interval": state.poll_interval.as_secs(),
    });
    state.grants().authorize(
        request,
        device_code,
        user_code,
        state.device_code_ttl,
        state.poll_interval,
    );
    no_store(json_reply(StatusCode::OK, &body))
}

fn token(form: &Form, state: &State) -> Response<Full<Bytes>> {
    let client_id = form.get("client_id").unwrap_or("");
    let login = match form.get("grant_type") {
        Some(DEVICE_CODE_GRANT) => {
            let device_code = form.get("device_code").unwrap_or("");
            let poll = state.grants().poll(device_code, client_id);
            let pending = |error: &str, description: &str| {
                oauth_error(StatusCode::BAD_REQUEST, error, description)
            };
            match poll {
                Poll::Approved(login) => login,
                Poll::Pending => return pending("authorization_pending", "not approved yet"),
                Poll::SlowDown => return pending("slow_down", "polling too fast: add 5 s"),
                Poll::Expired => return pending("expired_token", "the device_code expired"),
                Poll::Denied => return pending("access_denied", "the user denied the login"),
                Poll::Invalid(why) => return pending("invalid_grant", why),
            }
        }
        Some("authorization_code") => {
            let field = |name: &str| form.get(name).unwrap_or("");
            let redeemed = state.grants().redeem_code(
                field("code"),
                client_id,
                field("redirect_uri"),
                field("code_verifier"),
            );
            match redeemed {
                Ok(login) => login,
                Err(why) => return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", why),
            }
        }
        Some("refresh_token") => {
            let token = form.get("refresh_token").unwrap_or("");
            match state.grants().redeem_refresh(token, client_id) {
                Some(login) => login,
                None => {
                    return oauth_error(
                        StatusCode::BAD_REQUEST,
                        "invalid_grant",
                        "the refresh token is unknown, used, expired or another client's",
                    )
                }
            }
        }
        Some(other) => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                &format!("grant_type {other:?} is not supported"),
            )
        }
        None => return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "no grant_type"),
    };
    match issue(&login, state) {
        Ok(body) => no_store(json_reply(StatusCode::OK, &body)),
        Err(e) => server_error(&e),
    }
}

/// The token response of `login`: a new ID token, access token and
/// refresh token (the old refresh token, if any, is already used up).
fn issue(login: &Login, state: &State) -> Result<Value, IdpError> {
    let id_token = state.mint_id_token(login)?;
    let refresh_token = secret(32)?;
    state.grants().store_refresh(
        refresh_token.clone(),
        login.clone(),
        state.refresh_token_ttl,
    );
    Ok(json!({
        "access_token": secret(32)?,
        "token_type": "Bearer",
        "expires_in": state.id_token_ttl.as_secs(),
        "id_token": id_token,
        "refresh_token": refresh_token,
        "scope": login.scope,
    }))
}

/// The verification page: the person approves (as `user`, with `mfa` or
/// not) or denies the login waiting for `user_code`.
fn decide(form: &Form, state: &State, approve: bool) -> Response<Full<Bytes>> {
    let Some(code) = form.get("user_code") else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "user_code is required",
        );
    };
    let decision = if approve {
        let user = form.get("user").unwrap_or("");
        if !state.users.contains_key(user) {
            return oauth_error(
                StatusCode::FORBIDDEN,
                "access_denied",
                &format!("unknown user {user:?}"),
            );
        }
        let mfa = match form.get("mfa").unwrap_or("false") {
            "true" => true,
            "false" => false,
            _ => {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "mfa is true or false",
                )
            }
        };
        Decision::Approve {
            user: user.to_owned(),
            mfa,
            at: unix_now(),
        }
    } else {
        Decision::Deny
    };
    match state.grants().decide(code, decision) {
        Ok(()) => json_reply(StatusCode::OK, &json!({"decided": true})),
        Err(e) => {
            let status = match e {
                super::grants::DecideError::UnknownCode => StatusCode::NOT_FOUND,
                _ => StatusCode::BAD_REQUEST,
            };
            oauth_error(status, "invalid_request", &e.to_string())
        }
    }
}

fn demo_token(query: &str, state: &State) -> Response<Full<Bytes>> {
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
    };
    match (param("sub"), param("azp")) {
        (Some(sub), Some(azp)) if !query.contains('%') => match state.mint_demo(sub, azp) {
            Ok(token) => reply(StatusCode::OK, "text/plain", &token),
            Err(e) => server_error(&e),
        },
        _ => reply(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "want POST /token?sub=NAME&azp=SPIFFE_ID (no percent-encoding)\n",
        ),
    }
}

fn not_found() -> Response<Full<Bytes>> {
    reply(
        StatusCode::NOT_FOUND,
        "text/plain",
        "no such endpoint: see /.well-known/openid-configuration; the demo mints at POST /token?sub=..&azp=..\n",
    )
}
