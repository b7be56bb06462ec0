//! The gate and the audit of the admin calls (Revoke, Unrevoke, Rotate,
//! ListRevocations): the admin bearer token checked in constant time and
//! read on every call, the audit line of a revocation change, and the
//! gRPC status of a refused one. Apart from the signing path, which never
//! takes the admin token.

use tonic::{Request, Status};

use super::{bearer, CaService, ConnInfo};
use crate::revocation::RevokeError;

impl CaService {
    /// Checks the admin bearer token (constant time); a refusal is audited.
    /// Returns the peer address for the audit line.
    pub(super) async fn admin<T>(
        &self,
        request: &Request<T>,
        call: &'static str,
    ) -> Result<String, Status> {
        let peer = request
            .extensions()
            .get::<ConnInfo>()
            .and_then(|c| c.remote)
            .map(|p| p.to_string())
            .unwrap_or_default();
        let refused = |reason: &'static str, status: Status| {
            tracing::warn!(target: "stepmesh_ca::audit", decision = call, outcome = "unauthenticated", reason, peer = %peer, "admin call refused");
            status
        };
        let Some(path) = &self.admin_token else {
            return Err(refused(
                "admin_disabled",
                Status::unauthenticated(
                    "admin calls are disabled: the CA runs without --admin-token-file",
                ),
            ));
        };
        let expected = match tokio::fs::read_to_string(path).await {
            Ok(text) => text.trim().to_owned(),
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "reading --admin-token-file");
                return Err(refused(
                    "admin_token_unreadable",
                    Status::unavailable("the CA cannot read its admin token"),
                ));
            }
        };
        let given = match bearer(request.metadata()) {
            Ok(Some(token)) => token,
            _ => {
                return Err(refused(
                    "no_admin_token",
                    Status::unauthenticated(
                        "admin calls need `authorization: Bearer <admin token>`",
                    ),
                ))
            }
        };
        let same = !expected.is_empty()
            && aws_lc_rs::constant_time::verify_slices_are_equal(
                given.as_bytes(),
                expected.as_bytes(),
            )
            .is_ok();
        if !same {
            return Err(refused(
                "bad_admin_token",
                Status::unauthenticated("the admin token is not the CA's"),
            ));
        }
        Ok(peer)
    }

    pub(super) fn admin_audit(
        &self,
        call: &'static str,
        serial: &str,
        id: &str,
        peer: &str,
        result: &Result<crate::revocation::Entry, RevokeError>,
    ) {
        match result {
            Ok(entry) => {
                tracing::info!(target: "stepmesh_ca::audit", decision = call, outcome = "ok", serial = %entry.serial, identity = %entry.id, reason = %entry.reason, expires_at = entry.expires_at, peer, "revocation list changed");
                self.metrics.revocation(call, "ok");
            }
            Err(e) => {
                tracing::warn!(target: "stepmesh_ca::audit", decision = call, outcome = "refused", serial, identity = id, detail = %e, peer, "revocation call refused");
                self.metrics.revocation(call, "refused");
            }
        }
    }
}

pub(super) fn revoke_status(e: RevokeError) -> Status {
    match e {
        RevokeError::Store(e) => Status::internal(e.to_string()),
        // The API server is out of reach: retry later (or at another replica).
        RevokeError::Shared(_) => Status::unavailable(e.to_string()),
        RevokeError::UnknownSerial(_) | RevokeError::NotRevoked(_) => {
            Status::not_found(e.to_string())
        }
        e => Status::invalid_argument(e.to_string()),
    }
}
