//! A small OpenID provider for tests and the demo: an ES256 key made at
//! start, discovery and JWKS, the OAuth 2.0 Device Authorization Grant
//! (RFC 8628) and the authorization code flow with PKCE (RFC 7636) on a
//! loopback redirect, refresh tokens, and "login pages" that a test drives
//! over HTTP (`POST /device/approve`, `POST /authorize/approve`) standing
//! in for a person who logs in, with or without an MFA step. ID tokens carry `acr`, `amr` and
//! `auth_time` saying which. For the demo it also keeps its first form: a
//! `POST /token?sub=..&azp=..` that mints a step-up token at once.
//! Endpoints and claims: docs/LOGIN.md.

mod authcode;
mod grants;
mod server;
mod signer;
mod wire;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::TcpListener;

pub use grants::DeviceRequest;
use grants::{Grants, Login};
use signer::{unix_now, Signer};

/// The audience the demo's tokens are for (the payments service).
pub const AUDIENCE: &str = "payments";
/// The acr value an "MFA login" yields; the refunds route demands it.
pub const ACR_MFA: &str = "urn:stepmesh:acr:mfa";
/// The acr value of a login with a password only.
pub const ACR_PWD: &str = "urn:stepmesh:acr:pwd";
/// The grant type of a device-code poll (RFC 8628 §3.4).
pub const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// Errors of the identity provider.
#[derive(Debug, thiserror::Error)]
pub enum IdpError {
    /// Key generation or parsing failed in the crypto library.
    #[error("making the ES256 key: {0}")]
    Key(String),
    /// Signing a token failed.
    #[error("signing a token: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
    /// The serving certificate or key is unusable.
    #[error("serving TLS: {0}")]
    Tls(String),
    /// Binding the listener or writing the JWKS file failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A user the provider knows: who may approve a login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// The `email` claim.
    pub email: String,
    /// The `groups` claim.
    pub groups: Vec<String>,
}

/// A serving certificate chain and its key, PEM.
#[derive(Clone)]
pub struct ServerTls {
    /// The chain, leaf first.
    pub cert_pem: String,
    /// The leaf's private key.
    pub key_pem: String,
}

/// How to run the provider; [`IdpConfig::default`] is the demo's (plain
/// HTTP on a loopback port, one user `alice`, RFC 8628's 5 s interval).
pub struct IdpConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Serve HTTPS (TLS 1.3) with this certificate; plain HTTP without.
    pub tls: Option<ServerTls>,
    /// Username → claims. A login by anyone else is refused.
    pub users: BTreeMap<String, User>,
    /// Lifetime of ID tokens (`exp - iat`).
    pub id_token_ttl: Duration,
    /// Lifetime of refresh tokens.
    pub refresh_token_ttl: Duration,
    /// Lifetime of a device authorization (`expires_in`).
    pub device_code_ttl: Duration,
    /// The polling `interval` (whole seconds, at least 1).
    pub poll_interval: Duration,
    /// Also write the JWKS to this file.
    pub jwks_file: Option<PathBuf>,
}

impl Default for IdpConfig {
    fn default() -> Self {
        let alice = User {
            email: "alice@example.com".into(),
            groups: vec!["payments-admins".into()],
        };
        IdpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls: None,
            users: BTreeMap::from([("alice".to_owned(), alice)]),
            id_token_ttl: Duration::from_secs(300),
            refresh_token_ttl: Duration::from_secs(8 * 3600),
            device_code_ttl: Duration::from_secs(600),
            poll_interval: Duration::from_secs(5),
            jwks_file: None,
        }
    }
}

/// The running identity provider; stops serving when dropped.
pub struct Idp {
    state: Arc<State>,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

/// What the server's handlers share.
struct State {
    issuer: String,
    signer: Signer,
    users: BTreeMap<String, User>,
    id_token_ttl: Duration,
    refresh_token_ttl: Duration,
    device_code_ttl: Duration,
    poll_interval: Duration,
    grants: Mutex<Grants>,
}

impl State {
    /// The grants, also after a panic elsewhere (the maps stay consistent:
    /// every change is one insert or remove).
    fn grants(&self) -> std::sync::MutexGuard<'_, Grants> {
        self.grants.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Idp {
    /// The demo's provider: plain HTTP on a loopback port, its JWKS also
    /// written to `jwks_file`.
    pub async fn start(jwks_file: &Path) -> Result<Idp, IdpError> {
        Self::serve(IdpConfig {
            jwks_file: Some(jwks_file.to_owned()),
            ..IdpConfig::default()
        })
        .await
    }

    /// Makes a key and serves the endpoints of docs/LOGIN.md on `config.listen`.
    pub async fn serve(config: IdpConfig) -> Result<Idp, IdpError> {
        let acceptor = config.tls.as_ref().map(server::acceptor).transpose()?;
        let listener = TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let signer = Signer::generate()?;
        if let Some(file) = &config.jwks_file {
            tokio::fs::write(file, signer.jwks()).await?;
        }
        let scheme = if acceptor.is_some() { "https" } else { "http" };
        let state = Arc::new(State {
            issuer: format!("{scheme}://{addr}"),
            signer,
            users: config.users,
            id_token_ttl: config.id_token_ttl,
            refresh_token_ttl: config.refresh_token_ttl,
            device_code_ttl: config.device_code_ttl,
            poll_interval: config.poll_interval.max(Duration::from_secs(1)),
            grants: Mutex::new(Grants::default()),
        });
        let task = tokio::spawn(server::serve(listener, acceptor, state.clone()));
        Ok(Idp { state, addr, task })
    }

    /// The issuer (`iss`) of its tokens: its own base URL.
    pub fn issuer(&self) -> &str {
        &self.state.issuer
    }

    /// Where the JWKS is served.
    pub fn jwks_url(&self) -> String {
        format!("{}/jwks.json", self.state.issuer)
    }

    /// The JWKS document.
    pub fn jwks(&self) -> &str {
        self.state.signer.jwks()
    }

    /// The demo's token endpoint for `sub` logging in with MFA at the client `azp`.
    pub fn token_url(&self, sub: &str, azp: &str) -> String {
        format!("{}/token?sub={sub}&azp={azp}", self.state.issuer)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Mints a demo step-up token as `POST /token?sub=..&azp=..` does.
    pub fn mint(&self, sub: &str, azp: &str) -> Result<String, IdpError> {
        self.state.mint_demo(sub, azp)
    }

    /// Every device authorization request received so far, oldest first.
    pub fn device_requests(&self) -> Vec<DeviceRequest> {
        self.state.grants().requests()
    }

    /// How many refresh grants succeeded.
    pub fn refreshes(&self) -> u64 {
        self.state.grants().refreshes()
    }

    /// Forgets every refresh token, as an administrator ending all sessions
    /// would: the next refresh fails with `invalid_grant`.
    pub fn revoke_refresh_tokens(&self) {
        self.state.grants().revoke_refresh_tokens();
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl State {
    fn mint_demo(&self, sub: &str, azp: &str) -> Result<String, IdpError> {
        let now = unix_now();
        let claims = serde_json::json!({
            "iss": self.issuer, "aud": AUDIENCE, "sub": sub, "azp": azp,
            "acr": ACR_MFA, "amr": ["pwd", "mfa"], "auth_time": now,
            "iat": now, "nbf": now, "exp": now + 600,
            "jti": format!("{:016x}", fastrand::u64(..)),
        });
        self.signer.sign(&claims)
    }

    /// The ID token of `login`, issued now.
    fn mint_id_token(&self, login: &Login) -> Result<String, IdpError> {
        let now = unix_now();
        let (acr, amr) = if login.mfa {
            (ACR_MFA, vec!["pwd", "otp"])
        } else {
            (ACR_PWD, vec!["pwd"])
        };
        let user = self.users.get(&login.user);
        let mut claims = serde_json::json!({
            "iss": self.issuer, "sub": login.user,
            "aud": login.client_id, "azp": login.client_id,
            "iat": now, "exp": now + self.id_token_ttl.as_secs(),
            "auth_time": login.auth_time, "acr": acr, "amr": amr,
            "email": user.map(|u| u.email.as_str()),
            "groups": user.map(|u| u.groups.as_slice()).unwrap_or_default(),
            "jti": signer::secret(12)?,
        });
        if let Some(nonce) = &login.nonce {
            claims["nonce"] = nonce.as_str().into();
        }
        self.signer.sign(&claims)
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
