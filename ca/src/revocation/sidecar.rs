//! The sidecar's side of revocation: the streamed list turned into the
//! lookups a handshake and a live connection's re-check make. Nothing here
//! touches the CA's files or locks: this is what the sidecar (its identity
//! store, the live re-authorization) uses of revocation.

use super::normalize_serial;
use crate::proto::v1 as pb;

/// What a sidecar refuses, built from the streamed list: lookups by ID,
/// by serial, and by [`serial_key`] (what a live connection keeps).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevokedSet {
    ids: std::collections::HashSet<String>,
    serials: std::collections::HashSet<String>,
    serial_keys: std::collections::HashSet<u64>,
}

impl RevokedSet {
    /// From the CA's list (entries with a malformed serial are skipped).
    pub fn from_proto(list: &[pb::Revocation]) -> RevokedSet {
        let mut set = RevokedSet::default();
        for entry in list {
            if entry.serial.is_empty() {
                set.ids.insert(entry.id.clone());
            } else if let Ok(serial) = normalize_serial(&entry.serial) {
                set.serial_keys.insert(serial_key(&serial));
                set.serials.insert(serial);
            }
        }
        set
    }

    /// Whether a certificate of `id` with `serial` (as `svid::serial_hex`
    /// prints it) is revoked.
    pub fn refuses(&self, id: &str, serial: &str) -> bool {
        self.ids.contains(id) || self.serials.contains(serial)
    }

    /// Whether `id` or the serial with this [`serial_key`] is revoked.
    pub fn refuses_key(&self, id: &str, key: u64) -> bool {
        self.ids.contains(id) || self.serial_keys.contains(&key)
    }

    /// No entry at all (the common case: one branch per handshake).
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty() && self.serials.is_empty()
    }
}

/// 8 bytes of the SHA-256 of a normalised serial: what a live connection
/// keeps to be re-checked against later lists (a collision could only
/// close a connection early).
pub fn serial_key(serial: &str) -> u64 {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, serial.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    u64::from_be_bytes(first)
}
