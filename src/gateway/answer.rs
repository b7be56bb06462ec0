//! What the gateway answers by itself: Kubernetes `Status` bodies (kubectl
//! prints their `message`), and the step-ups people owe, kept for
//! `stepmesh login` to read at `GET /stepmesh/v1/challenge`.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use super::decide::Pending;

/// A `v1.Status` failure: the form every Kubernetes client understands.
pub fn status(code: StatusCode, message: &str) -> Response<Bytes> {
    let reason = match code {
        StatusCode::UNAUTHORIZED => "Unauthorized",
        StatusCode::FORBIDDEN => "Forbidden",
        StatusCode::BAD_REQUEST => "BadRequest",
        StatusCode::NOT_FOUND => "NotFound",
        StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailable",
        _ => "InternalError",
    };
    let body = serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    });
    let mut r = Response::new(Bytes::from(body.to_string()));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// How long a step-up request stays readable by the plugin.
const PENDING_FOR: u64 = 600;
/// People tracked at once; beyond, the oldest entries go first.
const MAX_PENDING: usize = 10_000;

/// The last step-up each person was asked for (by username), for
/// [`PENDING_FOR`] seconds. Touched only on refusals and on the plugin's
/// reads: never on a forwarded request's path.
#[derive(Debug, Default)]
pub struct PendingStepUps {
    by_user: Mutex<HashMap<String, Pending>>,
}

impl PendingStepUps {
    /// Remembers that `user` was asked for `pending`.
    pub fn record(&self, user: &str, pending: Pending) {
        let mut map = self.by_user.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_PENDING && !map.contains_key(user) {
            let now = pending.issued_at;
            map.retain(|_, p| now.saturating_sub(p.issued_at) < PENDING_FOR);
            if map.len() >= MAX_PENDING {
                if let Some(oldest) = map
                    .iter()
                    .min_by_key(|(_, p)| p.issued_at)
                    .map(|(k, _)| k.clone())
                {
                    map.remove(&oldest);
                }
            }
        }
        map.insert(user.to_owned(), pending);
    }

    /// What `user` owes now, if anything.
    pub fn get(&self, user: &str, now: u64) -> Option<Pending> {
        let map = self.by_user.lock().unwrap_or_else(|p| p.into_inner());
        map.get(user)
            .filter(|p| now.saturating_sub(p.issued_at) < PENDING_FOR)
            .cloned()
    }

    /// `user` met `rule`'s step-up: nothing is owed for it any more.
    pub fn met(&self, user: &str, rule: &str) {
        let mut map = self.by_user.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(user).is_some_and(|p| p.rule == rule) {
            map.remove(user);
        }
    }
}
