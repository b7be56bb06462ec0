//! The authorization code flow with PKCE on a loopback redirect (RFC 6749
//! §4.1, RFC 7636, RFC 8252 §7.3): the plugin listens on 127.0.0.1 on a
//! port of its own, prints the authorization URL on stderr for the person
//! to open, receives the browser's redirect with the code, and redeems it
//! with the code verifier. `state` guards the redirect, `nonce` the ID token.

use std::convert::Infallible;
use std::time::Duration;

use anyhow::{bail, Context as _};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use stepmesh_ca::https::{form_decode, form_encode, HttpsClient};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::oidc::{describe_error, Ask, Claims, Provider, Tokens};

/// The loopback redirect's path.
const CALLBACK: &str = "/callback";

/// A login in the browser: returns the tokens, or why not.
pub async fn browser_login(
    provider: &Provider,
    client: &HttpsClient,
    client_id: &str,
    scope: &str,
    ask: &Ask,
    timeout: Duration,
) -> anyhow::Result<Tokens> {
    let endpoint = provider
        .authorization_endpoint
        .as_deref()
        .with_context(|| {
            format!(
                "the identity provider {} has no authorization_endpoint (use --flow device)",
                provider.issuer
            )
        })?;
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("listening for the loopback redirect")?;
    let redirect_uri = format!("http://{}{CALLBACK}", listener.local_addr()?);
    let verifier = random(32)?;
    let challenge = URL_SAFE_NO_PAD.encode(
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, verifier.as_bytes()).as_ref(),
    );
    let (state, nonce) = (random(16)?, random(16)?);
    let acr_values = ask.acr_values.join(" ");
    let max_age = ask.max_age.map(|m| m.to_string());
    let mut fields = vec![
        ("response_type", "code"),
        ("client_id", client_id),
        ("redirect_uri", redirect_uri.as_str()),
        ("scope", scope),
        ("state", state.as_str()),
        ("nonce", nonce.as_str()),
        ("code_challenge", challenge.as_str()),
        ("code_challenge_method", "S256"),
    ];
    if !acr_values.is_empty() {
        fields.push(("acr_values", &acr_values));
    }
    if let Some(max_age) = &max_age {
        fields.push(("max_age", max_age));
    }
    let joiner = if endpoint.contains('?') { '&' } else { '?' };
    eprintln!(
        "stepmesh login: open {endpoint}{joiner}{}",
        form_encode(&fields)
    );
    let code = tokio::time::timeout(timeout, wait_for_code(listener, state))
        .await
        .map_err(|_| {
            anyhow::anyhow!("the login was not completed within {} s", timeout.as_secs())
        })??;
    let resp = client
        .post_form(
            &provider.token_endpoint,
            &[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("redirect_uri", &redirect_uri),
                ("client_id", client_id),
                ("code_verifier", &verifier),
            ],
        )
        .await
        .context("redeeming the authorization code")?;
    if resp.status != http::StatusCode::OK {
        bail!(
            "the identity provider refused the code: {}",
            describe_error(&resp.body)
        );
    }
    let tokens = provider.tokens(&resp.body, client_id)?;
    if Claims::read(&tokens.id_token)?.nonce.as_deref() != Some(nonce.as_str()) {
        bail!("the ID token's nonce is not this login's");
    }
    Ok(tokens)
}

/// Serves the loopback port until a redirect with our `state` arrives:
/// its code, or the error it carries. Requests without our state (another
/// page probing the port) get a 400 and change nothing.
async fn wait_for_code(listener: TcpListener, state: String) -> anyhow::Result<String> {
    let (tx, mut rx) = mpsc::channel::<Result<String, String>>(1);
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => accepted.context("accepting the redirect")?,
            Some(result) = rx.recv() => return result.map_err(anyhow::Error::msg),
        };
        let (tx, state) = (tx.clone(), state.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<_>| {
                let (outcome, page) = callback(&req, &state);
                let tx = tx.clone();
                async move {
                    if let Some(outcome) = outcome {
                        let _ = tx.send(outcome).await;
                    }
                    Ok::<_, Infallible>(page)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

/// What a request to the loopback port means, and the page shown.
fn callback<B>(
    req: &Request<B>,
    state: &str,
) -> (Option<Result<String, String>>, Response<Full<Bytes>>) {
    let page = |status: StatusCode, text: &str| {
        let mut resp = Response::new(Full::new(Bytes::from(format!("{text}\n"))));
        *resp.status_mut() = status;
        resp
    };
    if req.uri().path() != CALLBACK {
        return (None, page(StatusCode::NOT_FOUND, "not found"));
    }
    let fields = form_decode(req.uri().query().unwrap_or("")).unwrap_or_default();
    let field = |name: &str| {
        fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    if field("state") != Some(state) {
        tracing::warn!("a redirect without this login's state was refused");
        return (
            None,
            page(StatusCode::BAD_REQUEST, "not this login's redirect"),
        );
    }
    match (field("code"), field("error")) {
        (Some(code), None) => (
            Some(Ok(code.to_owned())),
            page(
                StatusCode::OK,
                "stepmesh login: done; you can close this tab.",
            ),
        ),
        (_, Some("access_denied")) => (
            Some(Err("the login was denied at the identity provider".into())),
            page(StatusCode::OK, "stepmesh login: the login was denied."),
        ),
        (_, error) => {
            let why = format!(
                "the identity provider answered the login with error {}",
                error.unwrap_or("(none) and no code")
            );
            (Some(Err(why.clone())), page(StatusCode::OK, &why))
        }
    }
}

/// `bytes` random bytes, base64url (the verifier: 32 bytes → 43 characters).
fn random(bytes: usize) -> anyhow::Result<String> {
    let mut buf = vec![0u8; bytes];
    aws_lc_rs::rand::fill(&mut buf).map_err(|_| anyhow::anyhow!("the system RNG failed"))?;
    Ok(URL_SAFE_NO_PAD.encode(buf))
}
