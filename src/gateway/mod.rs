//! `stepmesh gateway`: step-up in front of the Kubernetes API server.
//! kubectl talks to the gateway; it authenticates the person (OIDC, the
//! step-up providers of the policy), classifies the request the way the API
//! server does, demands a fresh step-up where the policy's `kubernetes:`
//! rules say so, and forwards with impersonation so the API server's RBAC
//! and audit log still decide and record.

pub mod classify;
