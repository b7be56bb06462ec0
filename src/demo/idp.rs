//! A small identity provider for the demo: an ES256 key made at start, its
//! JWKS served over HTTP (and written to a file), and a "token endpoint"
//! standing in for an MFA login that mints step-up tokens.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use tokio::net::TcpListener;

/// The audience the demo's tokens are for (the payments service).
pub const AUDIENCE: &str = "payments";
/// The acr value an "MFA login" yields; the refunds route demands it.
pub const ACR_MFA: &str = "urn:stepmesh:acr:mfa";

/// Errors of the identity provider.
#[derive(Debug, thiserror::Error)]
pub enum IdpError {
    /// Key generation or parsing failed in the crypto library.
    #[error("making the ES256 key: {0}")]
    Key(String),
    /// Signing a token failed.
    #[error("signing a token: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
    /// Binding the listener or writing the JWKS file failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The running identity provider.
pub struct Idp {
    inner: Arc<Signer>,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

struct Signer {
    issuer: String,
    kid: String,
    key: EncodingKey,
    jwks: String,
}

impl Idp {
    /// Makes a key, writes its JWKS to `jwks_file` and serves
    /// `GET /jwks.json` and `POST /token?sub=..&azp=..` on a loopback port.
    pub async fn start(jwks_file: &Path) -> Result<Idp, IdpError> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|e| IdpError::Key(e.to_string()))?;
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref())
            .map_err(|e| IdpError::Key(e.to_string()))?;
        // An uncompressed P-256 point: 0x04, then x and y of 32 bytes each.
        let point = pair.public_key().as_ref();
        if point.len() != 65 || point[0] != 4 {
            return Err(IdpError::Key(format!(
                "unexpected public key of {} bytes",
                point.len()
            )));
        }
        let kid = format!("demo-{:08x}", fastrand::u32(..));
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        }]})
        .to_string();
        tokio::fs::write(jwks_file, &jwks).await?;
        let inner = Arc::new(Signer {
            issuer: format!("http://{addr}"),
            kid,
            key: EncodingKey::from_ec_der(pkcs8.as_ref()),
            jwks,
        });
        let task = tokio::spawn(serve(listener, inner.clone()));
        Ok(Idp { inner, addr, task })
    }

    /// The issuer (`iss`) of its tokens: its own base URL.
    pub fn issuer(&self) -> &str {
        &self.inner.issuer
    }

    /// Where the JWKS is served.
    pub fn jwks_url(&self) -> String {
        format!("http://{}/jwks.json", self.addr)
    }

    /// The token endpoint for `sub` logging in with MFA at the client `azp`.
    pub fn token_url(&self, sub: &str, azp: &str) -> String {
        format!("http://{}/token?sub={sub}&azp={azp}", self.addr)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Mints a token as the token endpoint does.
    pub fn mint(&self, sub: &str, azp: &str) -> Result<String, IdpError> {
        self.inner.mint(sub, azp)
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Signer {
    fn mint(&self, sub: &str, azp: &str) -> Result<String, IdpError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let claims = serde_json::json!({
            "iss": self.issuer, "aud": AUDIENCE, "sub": sub, "azp": azp,
            "acr": ACR_MFA, "amr": ["pwd", "mfa"], "auth_time": now,
            "iat": now, "nbf": now, "exp": now + 600,
            "jti": format!("{:016x}", fastrand::u64(..)),
        });
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        Ok(jsonwebtoken::encode(&header, &claims, &self.key)?)
    }

    fn answer(&self, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let reply = |status: StatusCode, body: String| {
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            *resp.status_mut() = status;
            resp
        };
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/jwks.json") => reply(StatusCode::OK, self.jwks.clone()),
            (&Method::POST, "/token") => {
                let query = req.uri().query().unwrap_or("");
                let param = |name: &str| {
                    query
                        .split('&')
                        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                };
                match (param("sub"), param("azp")) {
                    (Some(sub), Some(azp)) if !query.contains('%') => match self.mint(sub, azp) {
                        Ok(token) => reply(StatusCode::OK, token),
                        Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
                    },
                    _ => reply(
                        StatusCode::BAD_REQUEST,
                        "want POST /token?sub=NAME&azp=SPIFFE_ID (no percent-encoding)\n".into(),
                    ),
                }
            }
            _ => reply(
                StatusCode::NOT_FOUND,
                "try GET /jwks.json or POST /token\n".into(),
            ),
        }
    }
}

async fn serve(listener: TcpListener, signer: Arc<Signer>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let signer = signer.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let resp = signer.answer(&req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let io = TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use jsonwebtoken::{DecodingKey, Validation};

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
}
