//! The step-up a person owes, as the Kubernetes gateway serves it at
//! [`PATH`] and `stepmesh login` reads it: kubectl never shows an exec
//! plugin the 401 its request got (docs/GATEWAY.md, docs/LOGIN.md). One
//! type for both ends of the wire.

use serde::{Deserialize, Serialize};

/// The gateway's path for the user's pending challenge.
pub const PATH: &str = "/stepmesh/v1/challenge";

/// A pending step-up challenge: the JSON body of the 200 answer (one type
/// for the plugin that reads it and the gateway that writes it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PendingStepUp {
    /// The policy's provider name.
    #[serde(default)]
    pub provider: String,
    /// The issuer whose token would satisfy it.
    #[serde(default)]
    pub issuer: String,
    /// Acceptable `acr` values; empty: any.
    #[serde(default)]
    pub acr_values: Vec<String>,
    /// Largest acceptable age of the authentication, seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_age: Option<u64>,
    /// The rule that demanded it.
    #[serde(default)]
    pub rule: String,
    /// When the gateway challenged (Unix seconds).
    #[serde(default)]
    pub issued_at: u64,
}
