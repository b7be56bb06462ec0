//! `stepmesh login`: a kubectl exec credential plugin. It prints an
//! ExecCredential holding an OIDC ID token for kubectl to send to the
//! stepmesh gateway: from its cache while valid, else refreshed, else from
//! a login (the device flow, or the code flow with PKCE: `--flow`); and
//! when the gateway has a step-up challenge pending for the user that the
//! token does not meet, from a new login asking for the challenge's
//! `acr_values` and `max_age`. docs/LOGIN.md.

mod cache;
mod challenge;
mod exec;
mod oidc;
mod pkce;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Args, ValueEnum};
use stepmesh_ca::https::HttpsClient;

pub use cache::{Cache, Entry};
pub use challenge::{Challenge, PATH as CHALLENGE_PATH};
use exec::credential;
pub use exec::{ExecInfo, API_VERSION, EXEC_INFO_ENV};
use oidc::{Ask, Claims, Provider, Tokens};

use crate::exit::ConfigResult as _;

/// Flags of `stepmesh login`.
#[derive(Debug, Args)]
pub struct LoginArgs {
    /// The OpenID provider's issuer URL (https; plain http only on loopback).
    #[arg(long, value_name = "URL")]
    pub issuer: String,
    /// The OAuth client id registered at the provider for kubectl.
    #[arg(long, value_name = "ID")]
    pub client_id: String,
    /// Trust only this CA (PEM) for the provider [default: the system's roots].
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// How a person logs in: the device flow (a code to enter on any
    /// device), or the authorization code flow with PKCE, the browser
    /// redirected back to a loopback port of the plugin.
    #[arg(long, value_enum, default_value_t = LoginFlow::Device)]
    pub flow: LoginFlow,
    /// How long the code flow waits for the browser's redirect.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = crate::units::parse_duration)]
    pub login_timeout: Duration,
    /// The scopes to ask for.
    #[arg(long, default_value = "openid email groups offline_access")]
    pub scope: String,
    /// Where tokens are cached [default: $XDG_CACHE_HOME/stepmesh/login or
    /// ~/.cache/stepmesh/login].
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// The gateway to ask for a pending step-up challenge [default: the
    /// cluster's server kubectl passes with provideClusterInfo].
    #[arg(long, value_name = "URL")]
    pub gateway: Option<String>,
    /// Trust only this CA (PEM) for the gateway [default: the cluster's
    /// certificate-authority-data, else the system's roots].
    #[arg(long, value_name = "FILE")]
    pub gateway_ca: Option<PathBuf>,
    /// A cached token expiring sooner than this is renewed.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = crate::units::parse_duration)]
    pub min_validity: Duration,
    /// Remove the cached tokens of this issuer and client, and print nothing.
    #[arg(long, alias = "clear")]
    pub logout: bool,
}

/// How a person logs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LoginFlow {
    /// OAuth 2.0 Device Authorization Grant (RFC 8628).
    Device,
    /// Authorization code with PKCE on a loopback redirect (RFC 7636, RFC 8252).
    Pkce,
}

/// Runs the plugin: one ExecCredential on stdout, or an error.
pub fn run(args: LoginArgs) -> anyhow::Result<()> {
    let issuer = args.issuer.trim_end_matches('/').to_owned();
    check_url(&issuer, "--issuer").config_err()?;
    let dir = match &args.cache_dir {
        Some(dir) => dir.clone(),
        None => Cache::default_dir()
            .context("no cache directory: set --cache-dir, XDG_CACHE_HOME or HOME")
            .config_err()?,
    };
    let cache = Cache::new(dir, &issuer, &args.client_id);
    if args.logout {
        let removed = cache
            .remove()
            .with_context(|| format!("removing {}", cache.path().display()))?;
        let what = if removed { "removed" } else { "there were no" };
        eprintln!(
            "stepmesh login: {what} cached tokens for {issuer} (client {})",
            args.client_id
        );
        return Ok(());
    }
    let info = ExecInfo::parse(std::env::var(EXEC_INFO_ENV).ok().as_deref())
        .map_err(anyhow::Error::msg)
        .config_err()?;
    tracing::debug!(interactive = info.interactive, "kubectl's exec info read");
    let idp = client(args.ca_file.as_deref(), None)
        .context("the identity provider's TLS (--ca-file)")
        .config_err()?;
    let gateway = gateway(&args, &info).config_err()?;
    let cached = cache.load();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let flow = Flow {
        args: &args,
        issuer,
        idp,
        cache,
        gateway,
        provider: None,
    };
    let entry = runtime.block_on(flow.run(cached))?;
    println!(
        "{}",
        credential(&info.api_version, &entry.id_token, entry.expiry)
    );
    Ok(())
}

/// An issuer, endpoint or gateway URL must be https; plain http only on
/// loopback (the demo's provider), so tokens never cross a network in clear.
fn check_url(url: &str, what: &str) -> anyhow::Result<()> {
    let uri: http::Uri = url
        .parse()
        .with_context(|| format!("{what} {url:?} is not a URL"))?;
    let host = uri.host().unwrap_or("");
    match uri.scheme_str() {
        Some("https") if !host.is_empty() => Ok(()),
        Some("http") if matches!(host, "127.0.0.1" | "localhost" | "[::1]" | "::1") => Ok(()),
        _ => bail!("{what} {url:?} must be an https URL (plain http only on loopback)"),
    }
}

/// An HTTPS client trusting `ca_file`, else `ca_pem`, else the system's roots.
fn client(ca_file: Option<&Path>, ca_pem: Option<&[u8]>) -> anyhow::Result<HttpsClient> {
    if let Some(file) = ca_file {
        return Ok(HttpsClient::new(file)?);
    }
    let mut roots = rustls::RootCertStore::empty();
    if let Some(pem) = ca_pem {
        let certs = stepmesh_ca::pem::decode_certs(pem).map_err(anyhow::Error::msg)?;
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            bail!("no usable CA certificate");
        }
    } else {
        let found = rustls_native_certs::load_native_certs();
        let _ = roots.add_parsable_certificates(found.certs);
        if roots.is_empty() {
            bail!("no system roots found: name a CA file");
        }
    }
    Ok(HttpsClient::with_roots(roots)?)
}

/// The gateway to ask for challenges, and a client trusting it.
fn gateway(args: &LoginArgs, info: &ExecInfo) -> anyhow::Result<Option<(String, HttpsClient)>> {
    let cluster = info.cluster.as_ref();
    let server = match (&args.gateway, cluster) {
        (Some(url), _) => {
            check_url(url, "--gateway")?;
            url.clone()
        }
        (None, Some(c)) if check_url(&c.server, "the cluster's server").is_ok() => c.server.clone(),
        (None, _) => {
            tracing::debug!("no https gateway known: pending challenges are not asked for");
            return Ok(None);
        }
    };
    let ca_pem = cluster.and_then(|c| c.ca_pem.as_deref());
    if args.gateway_ca.is_none() && ca_pem.is_none() && cluster.is_some_and(|c| c.insecure) {
        tracing::debug!(
            "the cluster is insecure-skip-tls-verify: the token is not sent to ask for challenges"
        );
        return Ok(None);
    }
    let client =
        client(args.gateway_ca.as_deref(), ca_pem).context(if args.gateway_ca.is_some() {
            "the gateway's TLS (--gateway-ca)"
        } else {
            "the gateway's TLS (the cluster's certificate-authority-data)"
        })?;
    Ok(Some((server, client)))
}

/// One run of the plugin.
struct Flow<'a> {
    args: &'a LoginArgs,
    issuer: String,
    idp: HttpsClient,
    cache: Cache,
    gateway: Option<(String, HttpsClient)>,
    provider: Option<Provider>,
}

impl Flow<'_> {
    async fn run(mut self, cached: Option<Entry>) -> anyhow::Result<Entry> {
        let entry = match cached {
            Some(c) if c.expiry > unix_now() + self.args.min_validity.as_secs() => {
                tracing::debug!("using the cached token");
                Some(c)
            }
            Some(c) => self.refresh(c).await,
            None => None,
        };
        // `fresh`: the token comes from a login of this run.
        let (mut entry, mut fresh) = match entry {
            Some(entry) => (entry, false),
            None => (self.login(&Ask::default()).await?, true),
        };
        let Some((server, gateway)) = self.gateway.clone() else {
            return Ok(entry);
        };
        // At most one more login for a 401 and one for a challenge.
        for _ in 0..2 {
            match challenge::fetch(&gateway, &server, &entry.id_token).await {
                challenge::Answer::Nothing => break,
                challenge::Answer::Unauthorized if fresh => {
                    tracing::warn!(
                        "the gateway does not accept a token just issued; using it anyway"
                    );
                    break;
                }
                challenge::Answer::Unauthorized => {
                    eprintln!("stepmesh login: the gateway does not accept the cached token; log in again");
                    entry = self.login(&Ask::default()).await?;
                    fresh = true;
                }
                challenge::Answer::Pending(pending) => {
                    let claims = Claims::read(&entry.id_token)?;
                    if pending.satisfied_by(&claims, unix_now()) {
                        tracing::debug!(rule = %pending.rule, "the token meets the pending challenge");
                        break;
                    }
                    if !pending.issuer.is_empty()
                        && pending.issuer.trim_end_matches('/') != self.issuer
                    {
                        tracing::warn!(issuer = %pending.issuer, provider = %pending.provider, "the gateway's challenge is for another identity provider than --issuer; using the current token");
                        break;
                    }
                    eprintln!(
                        "stepmesh login: the gateway requires {}; log in again",
                        pending.describe()
                    );
                    let ask = Ask {
                        acr_values: pending.acr_values.clone(),
                        max_age: pending.max_age,
                    };
                    entry = self.login(&ask).await?;
                    let claims = Claims::read(&entry.id_token)?;
                    if !pending.satisfied_by(&claims, unix_now()) {
                        bail!(
                            "the new login does not meet the gateway's challenge: it requires {}, the identity provider issued acr {}",
                            pending.describe(),
                            claims.acr.as_deref().unwrap_or("(none)")
                        );
                    }
                    break;
                }
            }
        }
        Ok(entry)
    }

    async fn provider(&mut self) -> anyhow::Result<&Provider> {
        if self.provider.is_none() {
            self.provider = Some(Provider::discover(&self.idp, &self.issuer).await?);
        }
        self.provider.as_ref().context("no provider") // set just above
    }

    /// The refresh-token grant for an expiring entry; `None` (log in anew)
    /// if there is no refresh token or the provider refuses it.
    async fn refresh(&mut self, old: Entry) -> Option<Entry> {
        let refresh_token = old.refresh_token.clone()?;
        let (idp, client_id) = (self.idp.clone(), self.args.client_id.clone());
        let refreshed = match self.provider().await {
            Ok(provider) => provider.refresh(&idp, &client_id, &refresh_token).await,
            Err(e) => Err(e),
        };
        match refreshed {
            Ok(Some(tokens)) => match self.save(tokens, Some(refresh_token)).await {
                Ok(entry) => Some(entry),
                Err(err) => {
                    tracing::warn!("the refreshed token is unusable: {err:#}");
                    None
                }
            },
            Ok(None) => None,
            Err(err) => {
                tracing::warn!("refreshing failed: {err:#}; logging in anew");
                None
            }
        }
    }

    async fn login(&mut self, ask: &Ask) -> anyhow::Result<Entry> {
        let (idp, client_id, scope) = (
            self.idp.clone(),
            self.args.client_id.clone(),
            self.args.scope.clone(),
        );
        let (flow, timeout) = (self.args.flow, self.args.login_timeout);
        let provider = self.provider().await?;
        let tokens = match flow {
            LoginFlow::Device => provider.device_login(&idp, &client_id, &scope, ask).await?,
            LoginFlow::Pkce => {
                pkce::browser_login(provider, &idp, &client_id, &scope, ask, timeout).await?
            }
        };
        self.save(tokens, None).await
    }

    /// The entry for `tokens` (keeping `old_refresh` if the provider did
    /// not rotate it), written to the cache.
    async fn save(&self, tokens: Tokens, old_refresh: Option<String>) -> anyhow::Result<Entry> {
        let claims = Claims::read(&tokens.id_token)?;
        let entry = Entry {
            issuer: self.issuer.clone(),
            client_id: self.args.client_id.clone(),
            id_token: tokens.id_token,
            refresh_token: tokens.refresh_token.or(old_refresh),
            expiry: claims.exp,
        };
        let (cache, copy) = (self.cache.clone(), entry.clone());
        let stored = tokio::task::spawn_blocking(move || cache.store(&copy)).await;
        match stored {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tracing::warn!(file = %self.cache.path().display(), %err, "the token cache could not be written; the next run logs in again")
            }
            Err(err) => tracing::warn!(%err, "writing the token cache failed"),
        }
        Ok(entry)
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    #[test]
    fn urls_are_https_or_loopback_http() {
        for ok in [
            "https://idp.example.com",
            "http://127.0.0.1:8080",
            "http://localhost:1",
            "http://[::1]:2",
        ] {
            assert!(super::check_url(ok, "x").is_ok(), "{ok}");
        }
        for bad in [
            "http://idp.example.com",
            "ftp://x",
            "idp.example.com",
            "https://",
            "",
        ] {
            assert!(super::check_url(bad, "x").is_err(), "{bad}");
        }
    }
}
