//! The authorization code flow with PKCE (RFC 6749 §4.1, RFC 7636) for
//! native apps on a loopback redirect (RFC 8252 §7.3). The "login page" is
//! `POST /authorize/approve` (or `/deny`) with the authorization request's
//! parameters plus `user` and `mfa`, answered with the 303 redirect a
//! browser would follow back to the client.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, LOCATION};
use hyper::{Response, StatusCode};

use super::grants::{mfa_missing, Login};
use super::signer::{secret, unix_now};
use super::wire::{oauth_error, reply, server_error, Form};
use super::State;

/// How long an authorization code may wait for its token request.
const CODE_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// A checked authorization request.
struct AuthRequest {
    client_id: String,
    redirect_uri: String,
    scope: String,
    state: String,
    challenge: String,
    acr_values: Vec<String>,
    nonce: Option<String>,
}

fn parse(form: &Form) -> Result<AuthRequest, String> {
    let field = |name: &str| form.get(name).filter(|v| !v.is_empty());
    if field("response_type") != Some("code") {
        return Err("response_type must be code".into());
    }
    let client_id = field("client_id").ok_or("client_id is required")?;
    let redirect_uri = field("redirect_uri").ok_or("redirect_uri is required")?;
    let uri: http::Uri = redirect_uri
        .parse()
        .map_err(|_| "redirect_uri is not a URL")?;
    let loopback = matches!(
        uri.host(),
        Some("127.0.0.1" | "[::1]" | "::1" | "localhost")
    );
    if uri.scheme_str() != Some("http") || !loopback {
        return Err("redirect_uri must be a loopback http URL (RFC 8252 §7.3)".into());
    }
    let scope = field("scope").unwrap_or("openid");
    if !scope.split(' ').any(|s| s == "openid") {
        return Err("the scope must include openid".into());
    }
    if field("code_challenge_method") != Some("S256") {
        return Err("PKCE is required: code_challenge_method S256".into());
    }
    let challenge = field("code_challenge").ok_or("code_challenge is required")?;
    if !(43..=128).contains(&challenge.len()) {
        return Err("code_challenge must be 43 to 128 characters".into());
    }
    if let Some(max_age) = field("max_age") {
        max_age
            .parse::<u64>()
            .map_err(|_| "max_age must be a number of seconds")?;
    }
    Ok(AuthRequest {
        client_id: client_id.to_owned(),
        redirect_uri: redirect_uri.to_owned(),
        scope: scope.to_owned(),
        state: field("state").ok_or("state is required")?.to_owned(),
        challenge: challenge.to_owned(),
        acr_values: field("acr_values")
            .unwrap_or("")
            .split(' ')
            .filter(|a| !a.is_empty())
            .map(str::to_owned)
            .collect(),
        nonce: field("nonce").map(str::to_owned),
    })
}

/// `GET /authorize`: the request is checked; the page says how a test
/// logs in (there is no HTML form).
pub(super) fn page(query: &str) -> Response<Full<Bytes>> {
    match Form::parse(query).and_then(|form| parse(&form)) {
        Ok(_) => reply(
            StatusCode::OK,
            "text/plain",
            "This test identity provider has no login page: POST this request's \
             parameters plus user and mfa=true|false to /authorize/approve (or \
             /authorize/deny).\n",
        ),
        Err(e) => oauth_error(StatusCode::BAD_REQUEST, "invalid_request", &e),
    }
}

/// `POST /authorize/approve` and `/authorize/deny`: the 303 back to the
/// client with `code` (or `error=access_denied`) and `state`.
pub(super) fn decide(form: &Form, state: &State, approve: bool) -> Response<Full<Bytes>> {
    let request = match parse(form) {
        Ok(r) => r,
        Err(e) => return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", &e),
    };
    if !approve {
        return redirect(&request, &[("error", "access_denied")]);
    }
    let user = form.get("user").unwrap_or("");
    if !state.users.contains_key(user) {
        let why = format!("unknown user {user:?}");
        return oauth_error(StatusCode::FORBIDDEN, "access_denied", &why);
    }
    let mfa = form.get("mfa") == Some("true");
    if mfa_missing(&request.acr_values, mfa) {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            &format!(
                "this login asked for acr_values {}: approve it with mfa=true",
                super::ACR_MFA
            ),
        );
    }
    let code = match secret(32) {
        Ok(code) => code,
        Err(e) => return server_error(&e),
    };
    let login = Login {
        client_id: request.client_id.clone(),
        scope: request.scope.clone(),
        user: user.to_owned(),
        auth_time: unix_now(),
        mfa,
        nonce: request.nonce.clone(),
    };
    state.grants().store_code(
        code.clone(),
        login,
        request.redirect_uri.clone(),
        request.challenge.clone(),
        CODE_TTL,
    );
    redirect(&request, &[("code", &code)])
}

fn redirect(request: &AuthRequest, fields: &[(&str, &str)]) -> Response<Full<Bytes>> {
    let mut all = fields.to_vec();
    all.push(("state", &request.state));
    let joiner = if request.redirect_uri.contains('?') {
        '&'
    } else {
        '?'
    };
    let location = format!(
        "{}{joiner}{}",
        request.redirect_uri,
        stepmesh_ca::https::form_encode(&all)
    );
    let mut resp = reply(StatusCode::SEE_OTHER, "text/plain", "");
    match HeaderValue::from_str(&location) {
        Ok(value) => {
            resp.headers_mut().insert(LOCATION, value);
            resp
        }
        Err(_) => oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "bad redirect_uri",
        ),
    }
}
