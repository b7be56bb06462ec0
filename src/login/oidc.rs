//! The OpenID provider side: discovery, the OAuth 2.0 Device Authorization
//! Grant (RFC 8628) and the refresh-token grant (the code flow: `pkce`), and reading the claims of
//! the ID tokens it returns (the plugin does not verify them: the gateway
//! does; it reads `exp`, `acr` and `auth_time` to decide what to do).

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::Deserialize;
use stepmesh_ca::https::HttpsClient;

/// The grant type of a device-code poll (RFC 8628 §3.4).
const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// The endpoints discovery found.
#[derive(Debug, Deserialize)]
pub struct Provider {
    /// The issuer, as the document says (checked equal to ours).
    pub issuer: String,
    /// The token endpoint.
    pub token_endpoint: String,
    /// RFC 8628's device authorization endpoint.
    pub device_authorization_endpoint: Option<String>,
    /// The authorization endpoint (code flow).
    pub authorization_endpoint: Option<String>,
}

/// What a login asks the provider for.
#[derive(Debug, Default, Clone)]
pub struct Ask {
    /// `acr_values`.
    pub acr_values: Vec<String>,
    /// `max_age` in seconds.
    pub max_age: Option<u64>,
}

/// A token response.
pub struct Tokens {
    /// The ID token.
    pub id_token: String,
    /// The refresh token, if any.
    pub refresh_token: Option<String>,
}

#[derive(Deserialize)]
struct TokenResponse {
    id_token: Option<String>,
    refresh_token: Option<String>,
}

#[derive(Deserialize)]
struct ErrorResponse {
    error: String,
    error_description: Option<String>,
}

#[derive(Deserialize)]
struct DeviceResponse {
    device_code: String,
    user_code: String,
    verification_uri: String,
    verification_uri_complete: Option<String>,
    expires_in: u64,
    #[serde(default = "default_interval")]
    interval: u64,
}

fn default_interval() -> u64 {
    5 // RFC 8628 §3.2
}

/// The claims of an ID token the plugin acts on.
#[derive(Debug, Deserialize)]
pub struct Claims {
    /// Issuer.
    pub iss: String,
    /// Audience (a string or a list).
    pub aud: serde_json::Value,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// Issued at.
    pub iat: Option<u64>,
    /// When the user authenticated.
    pub auth_time: Option<u64>,
    /// How (the authentication context class).
    pub acr: Option<String>,
    /// The login request's nonce (code flow).
    pub nonce: Option<String>,
}

impl Claims {
    /// The payload of `jwt`, unverified.
    pub fn read(jwt: &str) -> anyhow::Result<Claims> {
        let payload = jwt.split('.').nth(1).context("the ID token is not a JWT")?;
        let bytes = URL_SAFE_NO_PAD
            .decode(payload)
            .context("the ID token's payload is not base64url")?;
        serde_json::from_slice(&bytes).context("the ID token's claims")
    }

    fn has_audience(&self, client_id: &str) -> bool {
        match &self.aud {
            serde_json::Value::String(a) => a == client_id,
            serde_json::Value::Array(all) => all.iter().any(|a| a == client_id),
            _ => false,
        }
    }
}

impl Provider {
    /// OpenID Connect Discovery 1.0 of `issuer`: the document must name
    /// the same issuer (§4.3) and endpoints the issuer's rules allow.
    pub async fn discover(client: &HttpsClient, issuer: &str) -> anyhow::Result<Provider> {
        let url = format!("{issuer}/.well-known/openid-configuration");
        let resp = client
            .send(&url, None, None)
            .await
            .with_context(|| format!("OIDC discovery at {url}"))?;
        if resp.status != http::StatusCode::OK {
            bail!("OIDC discovery at {url}: status {}", resp.status);
        }
        let provider: Provider = serde_json::from_slice(&resp.body)
            .with_context(|| format!("OIDC discovery at {url}"))?;
        if provider.issuer.trim_end_matches('/') != issuer {
            bail!(
                "OIDC discovery at {url} names issuer {:?}, not {issuer:?}",
                provider.issuer
            );
        }
        super::check_url(&provider.token_endpoint, "token_endpoint")?;
        if let Some(device) = &provider.device_authorization_endpoint {
            super::check_url(device, "device_authorization_endpoint")?;
        }
        if let Some(authorize) = &provider.authorization_endpoint {
            super::check_url(authorize, "authorization_endpoint")?;
        }
        Ok(provider)
    }

    /// The refresh-token grant; `None` if the provider refused it (the
    /// caller logs in anew).
    pub async fn refresh(
        &self,
        client: &HttpsClient,
        client_id: &str,
        refresh_token: &str,
    ) -> anyhow::Result<Option<Tokens>> {
        let form = [
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
            ("client_id", client_id),
        ];
        let resp = client
            .post_form(&self.token_endpoint, &form)
            .await
            .context("refreshing the token")?;
        if resp.status != http::StatusCode::OK {
            let why = describe_error(&resp.body);
            tracing::debug!(status = %resp.status, %why, "the refresh was refused");
            return Ok(None);
        }
        self.tokens(&resp.body, client_id).map(Some)
    }

    /// The device flow: asks for a code, tells the person where to enter
    /// it (one line on stderr), polls until they did, denied it, or the
    /// code expired.
    pub async fn device_login(
        &self,
        client: &HttpsClient,
        client_id: &str,
        scope: &str,
        ask: &Ask,
    ) -> anyhow::Result<Tokens> {
        let endpoint = self
            .device_authorization_endpoint
            .as_deref()
            .with_context(|| {
                format!(
                "the identity provider {} offers no device flow (no device_authorization_endpoint)",
                self.issuer
            )
            })?;
        let acr_values = ask.acr_values.join(" ");
        let max_age = ask.max_age.map(|m| m.to_string());
        let mut form = vec![("client_id", client_id), ("scope", scope)];
        if !acr_values.is_empty() {
            form.push(("acr_values", &acr_values));
        }
        if let Some(max_age) = &max_age {
            form.push(("max_age", max_age));
        }
        let resp = client
            .post_form(endpoint, &form)
            .await
            .context("starting the device login")?;
        if resp.status != http::StatusCode::OK {
            bail!(
                "the identity provider refused the device login: {}",
                describe_error(&resp.body)
            );
        }
        let device: DeviceResponse =
            serde_json::from_slice(&resp.body).context("the device authorization answer")?;
        let open = device
            .verification_uri_complete
            .as_deref()
            .unwrap_or(&device.verification_uri);
        eprintln!("stepmesh login: open {open} (code {})", device.user_code);
        let deadline = Instant::now() + Duration::from_secs(device.expires_in);
        let mut interval = Duration::from_secs(device.interval.max(1));
        let poll = [
            ("grant_type", DEVICE_CODE_GRANT),
            ("device_code", device.device_code.as_str()),
            ("client_id", client_id),
        ];
        loop {
            if Instant::now() + interval > deadline {
                bail!(
                    "the login was not completed within {} s (the code expired)",
                    device.expires_in
                );
            }
            tokio::time::sleep(interval).await;
            let resp = client
                .post_form(&self.token_endpoint, &poll)
                .await
                .context("polling the token endpoint")?;
            if resp.status == http::StatusCode::OK {
                return self.tokens(&resp.body, client_id);
            }
            let error: ErrorResponse = serde_json::from_slice(&resp.body).with_context(|| {
                format!(
                    "the token endpoint answered {} without an OAuth error",
                    resp.status
                )
            })?;
            interval = next_interval(&error, interval, device.expires_in)?;
        }
    }

    /// A token response's tokens; its ID token must be ours (issuer and
    /// audience), else nothing is cached or printed.
    pub(super) fn tokens(&self, body: &[u8], client_id: &str) -> anyhow::Result<Tokens> {
        let resp: TokenResponse = serde_json::from_slice(body).context("the token response")?;
        let id_token = resp
            .id_token
            .context("the token response has no id_token (is the openid scope asked for?)")?;
        let claims = Claims::read(&id_token)?;
        if claims.iss.trim_end_matches('/') != self.issuer.trim_end_matches('/') {
            bail!(
                "the ID token's issuer is {:?}, not {:?}",
                claims.iss,
                self.issuer
            );
        }
        if !claims.has_audience(client_id) {
            bail!(
                "the ID token is not for client {client_id:?} (aud {})",
                claims.aud
            );
        }
        Ok(Tokens {
            id_token,
            refresh_token: resp.refresh_token,
        })
    }
}

/// The poll interval after a device-code poll answered `error` (RFC 8628
/// §3.5), or why the login is over.
fn next_interval(
    error: &ErrorResponse,
    interval: Duration,
    expires_in: u64,
) -> anyhow::Result<Duration> {
    match error.error.as_str() {
        "authorization_pending" => Ok(interval),
        // 5 s more for this and every later poll.
        "slow_down" => Ok(interval + Duration::from_secs(5)),
        "access_denied" => bail!("the login was denied at the identity provider"),
        "expired_token" => {
            bail!("the code expired before the login was completed ({expires_in} s)")
        }
        other => match &error.error_description {
            Some(d) => bail!("the identity provider refused the login: {other}: {d}"),
            None => bail!("the identity provider refused the login: {other}"),
        },
    }
}

/// An OAuth error body as `error: description`.
pub(super) fn describe_error(body: &[u8]) -> String {
    match serde_json::from_slice::<ErrorResponse>(body) {
        Ok(e) => match e.error_description {
            Some(d) => format!("{}: {d}", e.error),
            None => e.error,
        },
        Err(_) => "an answer that is not an OAuth error".to_owned(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;

    #[test]
    fn polls_slow_down_by_five_seconds_and_stop_on_final_errors() {
        let error = |e: &str| ErrorResponse {
            error: e.into(),
            error_description: Some("why".into()),
        };
        let one = Duration::from_secs(1);
        assert_eq!(
            next_interval(&error("authorization_pending"), one, 9).unwrap(),
            one
        );
        let slower = next_interval(&error("slow_down"), one, 9).unwrap();
        assert_eq!(slower, Duration::from_secs(6));
        assert_eq!(
            next_interval(&error("slow_down"), slower, 9).unwrap(),
            Duration::from_secs(11)
        );
        let over = |e: &str| next_interval(&error(e), one, 9).unwrap_err().to_string();
        assert_eq!(
            over("access_denied"),
            "the login was denied at the identity provider"
        );
        assert!(over("expired_token").contains("9 s"));
        assert!(over("invalid_grant").ends_with("invalid_grant: why"));
    }
}
