//! The identity provider's OAuth state: device authorizations (RFC 8628)
//! from request to approval to tokens, authorization codes bound to their
//! PKCE challenge (RFC 7636), and the refresh tokens of each login.
//! No I/O: the server calls in with a lock held for a few map operations.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::ACR_MFA;

/// A device authorization request as the identity provider received it
/// (tests read these to check what a client asked for).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRequest {
    /// The client that asked.
    pub client_id: String,
    /// The scopes asked for, as sent.
    pub scope: String,
    /// `acr_values`, split on spaces.
    pub acr_values: Vec<String>,
    /// `max_age` in seconds, if sent.
    pub max_age: Option<u64>,
}

/// One login: who, when and how; every token of the login says this, a
/// refresh included (a refresh is not a new authentication).
#[derive(Debug, Clone)]
pub(super) struct Login {
    pub client_id: String,
    pub scope: String,
    pub user: String,
    pub auth_time: u64,
    pub mfa: bool,
    /// The authorization request's `nonce`, echoed in its ID token only.
    pub nonce: Option<String>,
}

struct DeviceGrant {
    request: DeviceRequest,
    user_code: String,
    expires: Instant,
    interval: Duration,
    last_poll: Option<Instant>,
    state: GrantState,
}

enum GrantState {
    Pending,
    Approved(Login),
    Denied,
    Issued,
}

/// The token endpoint's answer to a device-code poll (RFC 8628 §3.5).
pub(super) enum Poll {
    Pending,
    SlowDown,
    Expired,
    Denied,
    Approved(Login),
    /// `invalid_grant` with this description.
    Invalid(&'static str),
}

/// The person's answer at the verification page.
pub(super) enum Decision {
    Approve { user: String, mfa: bool, at: u64 },
    Deny,
}

/// Why an approval or denial was refused.
#[derive(Debug, thiserror::Error)]
pub(super) enum DecideError {
    #[error("no login is waiting for this user_code")]
    UnknownCode,
    #[error("this user_code has expired")]
    Expired,
    #[error("this login was already approved or denied")]
    Decided,
    #[error("this login asked for acr_values {ACR_MFA}: approve it with mfa=true")]
    MfaRequired,
}

struct Code {
    login: Login,
    redirect_uri: String,
    challenge: String,
    expires: Instant,
}

struct Refresh {
    login: Login,
    expires: Instant,
}

/// Device authorizations and refresh tokens.
#[derive(Default)]
pub(super) struct Grants {
    device: HashMap<String, DeviceGrant>,
    refresh: HashMap<String, Refresh>,
    codes: HashMap<String, Code>,
    requests: Vec<DeviceRequest>,
    refreshes: u64,
}

/// A poll sooner than this before the interval is "too fast" (timers and
/// the request's own time blur the gap a little).
const POLL_SLACK: Duration = Duration::from_millis(250);

impl Grants {
    /// Records a device authorization under its two codes.
    pub(super) fn authorize(
        &mut self,
        request: DeviceRequest,
        device_code: String,
        user_code: String,
        ttl: Duration,
        interval: Duration,
    ) {
        let now = Instant::now();
        // Forget grants long expired, so a long-running demo does not grow.
        self.device
            .retain(|_, g| g.expires + Duration::from_secs(60) > now);
        self.refresh.retain(|_, r| r.expires > now);
        self.requests.push(request.clone());
        self.device.insert(
            device_code,
            DeviceGrant {
                request,
                user_code,
                expires: now + ttl,
                interval,
                last_poll: None,
                state: GrantState::Pending,
            },
        );
    }

    /// Every device authorization request received so far.
    pub(super) fn requests(&self) -> Vec<DeviceRequest> {
        self.requests.clone()
    }

    /// How many refresh grants succeeded.
    pub(super) fn refreshes(&self) -> u64 {
        self.refreshes
    }

    /// The client polls the token endpoint with `device_code`.
    pub(super) fn poll(&mut self, device_code: &str, client_id: &str) -> Poll {
        let now = Instant::now();
        let Some(grant) = self.device.get_mut(device_code) else {
            return Poll::Invalid("unknown device_code");
        };
        if grant.request.client_id != client_id {
            return Poll::Invalid("the device_code was issued to another client");
        }
        if now >= grant.expires {
            return Poll::Expired;
        }
        let too_fast = grant
            .last_poll
            .is_some_and(|last| now + POLL_SLACK < last + grant.interval);
        grant.last_poll = Some(now);
        match std::mem::replace(&mut grant.state, GrantState::Issued) {
            GrantState::Approved(login) => Poll::Approved(login),
            GrantState::Denied => {
                grant.state = GrantState::Denied;
                Poll::Denied
            }
            GrantState::Issued => Poll::Invalid("the device_code was already used"),
            GrantState::Pending => {
                grant.state = GrantState::Pending;
                if too_fast {
                    // RFC 8628 §3.5: the client adds 5 s for this and every
                    // later poll; hold it to that.
                    grant.interval += Duration::from_secs(5);
                    Poll::SlowDown
                } else {
                    Poll::Pending
                }
            }
        }
    }

    /// The person approves (having logged in, with or without the MFA
    /// step) or denies the login waiting for `user_code`. A login that
    /// asked for the MFA acr is not approved without the MFA step: the
    /// verification page would not let the person past it.
    pub(super) fn decide(
        &mut self,
        user_code: &str,
        decision: Decision,
    ) -> Result<(), DecideError> {
        let wanted = normalise(user_code);
        let grant = self
            .device
            .values_mut()
            .find(|g| normalise(&g.user_code) == wanted)
            .ok_or(DecideError::UnknownCode)?;
        if Instant::now() >= grant.expires {
            return Err(DecideError::Expired);
        }
        if !matches!(grant.state, GrantState::Pending) {
            return Err(DecideError::Decided);
        }
        grant.state = match decision {
            Decision::Deny => GrantState::Denied,
            Decision::Approve { user, mfa, at } => {
                if mfa_missing(&grant.request.acr_values, mfa) {
                    return Err(DecideError::MfaRequired);
                }
                GrantState::Approved(Login {
                    client_id: grant.request.client_id.clone(),
                    scope: grant.request.scope.clone(),
                    user,
                    auth_time: at,
                    mfa,
                    nonce: None,
                })
            }
        };
        Ok(())
    }

    /// Keeps an authorization code of `login` for `ttl`, bound to the
    /// redirect URI and PKCE challenge of its request.
    pub(super) fn store_code(
        &mut self,
        code: String,
        login: Login,
        redirect_uri: String,
        challenge: String,
        ttl: Duration,
    ) {
        let now = Instant::now();
        self.codes.retain(|_, c| c.expires > now);
        let expires = now + ttl;
        let code_grant = Code {
            login,
            redirect_uri,
            challenge,
            expires,
        };
        self.codes.insert(code, code_grant);
    }

    /// Redeems an authorization code (once): same client and redirect URI,
    /// and `verifier` must hash to the challenge (RFC 7636 §4.6, S256).
    pub(super) fn redeem_code(
        &mut self,
        code: &str,
        client_id: &str,
        redirect_uri: &str,
        verifier: &str,
    ) -> Result<Login, &'static str> {
        let grant = self.codes.remove(code).ok_or("unknown or used code")?;
        if grant.expires <= Instant::now() {
            return Err("the code expired");
        }
        if grant.login.client_id != client_id || grant.redirect_uri != redirect_uri {
            return Err("the code was issued to another client or redirect_uri");
        }
        if s256(verifier) != grant.challenge {
            return Err("code_verifier does not match the code_challenge");
        }
        Ok(grant.login)
    }

    /// Keeps `token` as a refresh token of `login` for `ttl`.
    pub(super) fn store_refresh(&mut self, token: String, mut login: Login, ttl: Duration) {
        // A refreshed ID token carries no nonce: none was sent for it.
        login.nonce = None;
        let expires = Instant::now() + ttl;
        self.refresh.insert(token, Refresh { login, expires });
    }

    /// Redeems a refresh token: it is used up (the answer carries a new one).
    pub(super) fn redeem_refresh(&mut self, token: &str, client_id: &str) -> Option<Login> {
        let refresh = self.refresh.remove(token)?;
        if refresh.expires <= Instant::now() || refresh.login.client_id != client_id {
            return None;
        }
        self.refreshes += 1;
        Some(refresh.login)
    }

    /// Forgets every refresh token (tests: "the session was revoked").
    pub(super) fn revoke_refresh_tokens(&mut self) {
        self.refresh.clear();
    }
}

/// A login that asked for the MFA acr, approved without the MFA step: the
/// login page would not let the person past it.
pub(super) fn mfa_missing(acr_values: &[String], mfa: bool) -> bool {
    !mfa && acr_values.iter().any(|a| a == ACR_MFA)
}

/// RFC 7636 §4.2 S256: base64url(SHA-256(verifier)).
pub(super) fn s256(verifier: &str) -> String {
    use base64::Engine as _;
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, verifier.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref())
}

/// User codes compare case-insensitively, with or without the dash.
fn normalise(code: &str) -> String {
    code.chars()
        .filter(|c| *c != '-' && !c.is_whitespace())
        .map(|c| c.to_ascii_uppercase())
        .collect()
}
