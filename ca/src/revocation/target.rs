//! What an admin call names, read from its two request fields: one serial
//! (normalised to the form the CA records) or one SPIFFE ID of this trust
//! domain. Shared by Revoke, Unrevoke and Rotate, and by the shared
//! state's reading of stored serials.

use super::RevokeError;
use crate::spiffe_id::SpiffeId;

/// What a revoke or unrevoke names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One certificate, by its serial (normalised hex).
    Serial(String),
    /// Every certificate of an identity, and its issuance.
    Id(SpiffeId),
}

impl Target {
    /// Exactly one of `serial` and `id` (the other empty), checked against
    /// `td`.
    pub fn parse(
        serial: &str,
        id: &str,
        td: &crate::spiffe_id::TrustDomain,
    ) -> Result<Target, RevokeError> {
        match (serial.trim(), id.trim()) {
            (s, "") if !s.is_empty() => normalize_serial(s).map(Target::Serial),
            ("", i) if !i.is_empty() => {
                let parsed =
                    SpiffeId::parse(i).map_err(|e| RevokeError::BadId(i.into(), e.to_string()))?;
                if parsed.trust_domain() != td {
                    let why = format!("not of trust domain {td}");
                    return Err(RevokeError::BadId(i.into(), why));
                }
                Ok(Target::Id(parsed))
            }
            _ => Err(RevokeError::Target),
        }
    }
}

/// `01:AB:cd` or `0x01abcd` → `1abcd`: the form `svid::serial_hex` prints.
pub fn normalize_serial(text: &str) -> Result<String, RevokeError> {
    let bad = || RevokeError::BadSerial(text.to_owned());
    let hex: String = text
        .strip_prefix("0x")
        .unwrap_or(text)
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    if hex.is_empty() || hex.len() > 40 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let trimmed = hex.trim_start_matches('0');
    Ok(if trimmed.is_empty() { "0" } else { trimmed }.to_owned())
}
