//! Revocations: serials this CA issued and SPIFFE IDs that sidecars must
//! refuse before the certificates expire, kept in the state dir so a
//! restart keeps them, and streamed to sidecars with the trust bundle.
//!
//! Files in `--state-dir`: `revocations.json` (the entries, rewritten
//! whole on every change, 0600) and `issued.jsonl` (one line per issued
//! SVID: serial, ID, notAfter — so a revoke names a serial the CA knows and
//! the entry can lapse with that certificate; appended by a thread of its
//! own, compacted at start). A serial entry lapses at its certificate's
//! notAfter; an ID entry stays until unrevoked (it also stops issuance).
//!
//! With `--shared-state` the entries and the forced re-issues live in a
//! ConfigMap instead of `revocations.json` (see [`crate::shared_state`]):
//! a change is written there first and applied here only once stored, and
//! a change another replica stored is applied when the object is polled.
//! `issued.jsonl` stays local: each replica knows the serials it issued.
//!
//! Beside it: `target` (what an admin call names), `sidecar` (the
//! sidecar's lookups over the streamed list).

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::proto::v1 as pb;
use crate::shared_state::{Rotation, SharedError, SharedState, State, Versioned};
use crate::spiffe_id::SpiffeId;
use crate::store::{write_atomic, StoreError};

mod sidecar;
mod target;

pub use self::sidecar::{serial_key, RevokedSet};
pub use self::target::{normalize_serial, Target};

/// The revocation entries inside the state dir.
pub const REVOCATIONS_FILE: &str = "revocations.json";
/// The issued-serial index inside the state dir.
pub const ISSUED_FILE: &str = "issued.jsonl";

/// One revocation, as stored and as streamed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Lower-case hex without leading zeros; empty for an ID entry.
    #[serde(default)]
    pub serial: String,
    /// The revoked ID, or the one the serial was issued to.
    pub id: String,
    /// The operator's words.
    #[serde(default)]
    pub reason: String,
    /// Unix seconds.
    pub revoked_at: i64,
    /// Unix seconds the entry lapses at; 0: until unrevoked.
    #[serde(default)]
    pub expires_at: i64,
}

impl Entry {
    /// The wire form.
    pub fn to_proto(&self) -> pb::Revocation {
        pb::Revocation {
            serial: self.serial.clone(),
            id: self.id.clone(),
            reason: self.reason.clone(),
            revoked_at: self.revoked_at,
            expires_at: self.expires_at,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Issued {
    serial: String,
    id: String,
    not_after: i64,
}

/// Why a revoke or unrevoke was refused (nothing changed).
#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    /// Neither or both of serial and ID.
    #[error("name exactly one of serial or id")]
    Target,
    /// Not a hex serial.
    #[error("serial {0:?} is not a hex serial number (up to 20 bytes, as `stepmesh cert inspect` prints it)")]
    BadSerial(String),
    /// Not a SPIFFE ID of this trust domain.
    #[error("id {0:?}: {1}")]
    BadId(String, String),
    /// A serial this CA has no record of (never issued, or expired).
    #[error("serial {0} is not a certificate this CA issued that is still valid")]
    UnknownSerial(String),
    /// Unrevoking what is not revoked.
    #[error("{0} is not revoked")]
    NotRevoked(String),
    /// The state could not be written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The shared state (`--shared-state`) could not be read or written:
    /// refused rather than applied on this replica alone.
    #[error("{0}; nothing was changed")]
    Shared(#[from] SharedError),
}

/// The revocation list as streamed, with its change counter.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Increases by one on every change.
    pub sequence: u64,
    /// The entries in force.
    pub entries: Arc<Vec<pb::Revocation>>,
    /// Forced re-issues asked for lately (the latest per ID, and for all).
    pub rotations: Arc<Vec<pb::Rotation>>,
}

struct Inner {
    entries: Vec<Entry>,
    rotations: Vec<Rotation>,
    /// serial → (ID, notAfter) of every unexpired SVID issued.
    issued: HashMap<String, (String, i64)>,
    /// The shared object's resourceVersion last applied.
    shared_version: String,
}

/// The CA's revocations: consulted on every Sign, changed by the admin
/// calls, published to `WatchTrustBundle`.
pub struct Revocations {
    dir: PathBuf,
    inner: Mutex<Inner>,
    published: watch::Sender<Snapshot>,
    /// To the thread appending `issued.jsonl`.
    append: Mutex<mpsc::Sender<Issued>>,
    /// `--shared-state`: where the entries live instead of the file.
    shared: Option<SharedState>,
    /// One shared-state read-and-apply at a time (the poll, a change), so
    /// an older read is never applied over a newer write.
    shared_turn: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Revocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revocations")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Revocations {
    /// Loads both files (blocking: call on a blocking thread), drops what
    /// expired, compacts `issued.jsonl` and starts its writer thread. A
    /// `revocations.json` that does not parse refuses the start: serving
    /// without the revocations an operator made would fail open.
    pub fn load(dir: &Path) -> Result<Revocations, StoreError> {
        let now = now();
        let path = dir.join(REVOCATIONS_FILE);
        let mut entries: Vec<Entry> = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::Invalid {
                path: path.clone(),
                reason: format!("not a revocation list: {e}"),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io(&path)(e)),
        };
        entries.retain(|e| e.expires_at == 0 || e.expires_at > now);
        let issued_path = dir.join(ISSUED_FILE);
        let mut issued = HashMap::new();
        match std::fs::File::open(&issued_path) {
            Ok(file) => {
                for line in std::io::BufReader::new(file).lines() {
                    let line = line.map_err(io(&issued_path))?;
                    // A line cut short by a crash is skipped, not fatal.
                    if let Ok(i) = serde_json::from_str::<Issued>(&line) {
                        if i.not_after > now {
                            issued.insert(i.serial, (i.id, i.not_after));
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&issued_path)(e)),
        }
        let mut compact = Vec::new();
        for (serial, (id, not_after)) in &issued {
            let line = Issued {
                serial: serial.clone(),
                id: id.clone(),
                not_after: *not_after,
            };
            compact.extend(serde_json::to_vec(&line).unwrap_or_default());
            compact.push(b'\n');
        }
        write_atomic(&issued_path, &compact, 0o600)?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&issued_path)
            .map_err(io(&issued_path))?;
        let (append, lines) = mpsc::channel::<Issued>();
        std::thread::Builder::new()
            .name("ca-issued-log".into())
            .spawn(move || append_issued(file, &lines))
            .map_err(io(&issued_path))?;
        let published = watch::Sender::new(snapshot(&entries, &[], 1));
        Ok(Revocations {
            dir: dir.to_owned(),
            inner: Mutex::new(Inner {
                entries,
                rotations: Vec::new(),
                issued,
                shared_version: String::new(),
            }),
            published,
            append: Mutex::new(append),
            shared: None,
            shared_turn: tokio::sync::Mutex::new(()),
        })
    }

    /// Keeps the entries in `shared` from now on: its state replaces what
    /// was loaded; a missing object is created from it (a single replica
    /// turned into several keeps its revocations). A malformed object or
    /// an API server out of reach refuses the start: serving without the
    /// revocations the other replicas enforce would fail open.
    pub async fn share(&mut self, shared: SharedState) -> Result<(), SharedError> {
        let versioned = match shared.read().await? {
            Some(v) => v,
            None => {
                let local = self.state();
                let created = shared
                    .update(&local, |s| {
                        Ok::<_, std::convert::Infallible>(Some(s.clone()))
                    })
                    .await?;
                match created {
                    Ok(v) => v,
                    Err(never) => match never {},
                }
            }
        };
        tracing::info!(object = %shared.object(), resource_version = %versioned.resource_version, revocations = versioned.state.entries.len(), "shared state loaded");
        self.apply(versioned);
        self.shared = Some(shared);
        Ok(())
    }

    /// Reads the shared object and applies it when its resourceVersion
    /// moved; `Ok(Some(version))` when that changed what is enforced.
    /// Errors leave the last good state in force.
    pub async fn refresh_shared(&self) -> Result<Option<String>, SharedError> {
        let Some(shared) = &self.shared else {
            return Ok(None);
        };
        let _turn = self.shared_turn.lock().await;
        match shared.read().await? {
            Some(v) => {
                let version = v.resource_version.clone();
                Ok(self.apply(v).then_some(version))
            }
            None => Err(SharedError::Missing(shared.object().to_string())),
        }
    }

    /// Installs `v` unless already applied; whether the enforced state
    /// changed.
    fn apply(&self, v: Versioned) -> bool {
        let now = now();
        let mut state = v.state;
        state
            .entries
            .retain(|e| e.expires_at == 0 || e.expires_at > now);
        let mut inner = self.lock();
        if inner.shared_version == v.resource_version {
            return false;
        }
        inner.shared_version = v.resource_version;
        if inner.entries == state.entries && inner.rotations == state.rotations {
            return false;
        }
        self.publish(&mut inner, state);
        true
    }

    /// The state in force.
    fn state(&self) -> State {
        let inner = self.lock();
        State {
            entries: inner.entries.clone(),
            rotations: inner.rotations.clone(),
        }
    }

    /// Puts `state` in force and publishes it to the streams.
    fn install(&self, state: State) {
        let mut inner = self.lock();
        self.publish(&mut inner, state);
    }

    fn publish(&self, inner: &mut Inner, state: State) {
        self.published.send_modify(|published| {
            *published = snapshot(&state.entries, &state.rotations, published.sequence + 1);
        });
        inner.entries = state.entries;
        inner.rotations = state.rotations;
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section leaves the maps whole: a poisoned lock is usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records an issued SVID (so it can be revoked by serial).
    pub fn issued(&self, serial: &str, id: &SpiffeId, not_after: SystemTime) {
        let not_after = not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        self.lock()
            .issued
            .insert(serial.to_owned(), (id.to_string(), not_after));
        let line = Issued {
            serial: serial.to_owned(),
            id: id.to_string(),
            not_after,
        };
        let append = self.append.lock().unwrap_or_else(|e| e.into_inner());
        if append.send(line).is_err() {
            tracing::warn!(
                "issued-serial log writer is gone: this serial is known until restart only"
            );
        }
    }

    /// The entry refusing `id` (ID revocation), or the certificate with
    /// `serial` (serial revocation), if any.
    pub fn refusing(&self, id: &SpiffeId, serial: Option<&str>) -> Option<Entry> {
        let inner = self.lock();
        inner
            .entries
            .iter()
            .find(|e| {
                (e.serial.is_empty() && e.id == id.as_str())
                    || serial.is_some_and(|s| !e.serial.is_empty() && e.serial == s)
            })
            .cloned()
    }

    /// Adds a revocation (or returns the one already there) and publishes it.
    pub async fn revoke(&self, target: Target, reason: &str) -> Result<Entry, RevokeError> {
        let now = now();
        let entry = match &target {
            Target::Serial(serial) => {
                let Some((id, not_after)) = self.lock().issued.get(serial).cloned() else {
                    return Err(RevokeError::UnknownSerial(serial.clone()));
                };
                Entry {
                    serial: serial.clone(),
                    id,
                    reason: reason.to_owned(),
                    revoked_at: now,
                    expires_at: not_after,
                }
            }
            Target::Id(id) => Entry {
                serial: String::new(),
                id: id.to_string(),
                reason: reason.to_owned(),
                revoked_at: now,
                expires_at: 0,
            },
        };
        let same =
            |e: &Entry| e.serial == entry.serial && (!e.serial.is_empty() || e.id == entry.id);
        let mut existing = None;
        self.change(|state| {
            existing = state.entries.iter().find(|e| same(e)).cloned();
            if existing.is_some() {
                return Ok(None);
            }
            let mut next = state.clone();
            next.entries.push(entry.clone());
            Ok(Some(next))
        })
        .await?;
        Ok(existing.unwrap_or(entry))
    }

    /// Removes a revocation and publishes the change.
    pub async fn unrevoke(&self, target: Target) -> Result<Entry, RevokeError> {
        let hit = |e: &Entry| match &target {
            Target::Serial(s) => &e.serial == s,
            Target::Id(id) => e.serial.is_empty() && e.id == id.as_str(),
        };
        let mut removed = None;
        self.change(|state| {
            removed = state.entries.iter().find(|e| hit(e)).cloned();
            if removed.is_none() {
                let what = match &target {
                    Target::Serial(s) => format!("serial {s}"),
                    Target::Id(id) => id.to_string(),
                };
                return Err(RevokeError::NotRevoked(what));
            }
            let mut next = state.clone();
            next.entries.retain(|e| !hit(e));
            Ok(Some(next))
        })
        .await?;
        removed.ok_or_else(|| RevokeError::NotRevoked(String::new()))
    }

    /// Drops entries and issued serials whose certificates expired;
    /// publishes when an entry went.
    pub async fn prune(&self) -> Result<(), RevokeError> {
        let now = now();
        let live = |e: &Entry| e.expires_at == 0 || e.expires_at > now;
        {
            let mut inner = self.lock();
            inner.issued.retain(|_, (_, not_after)| *not_after > now);
            if inner.entries.iter().all(live) {
                return Ok(());
            }
        }
        self.change(|state| {
            if state.entries.iter().all(live) {
                return Ok(None);
            }
            let mut next = state.clone();
            next.entries.retain(live);
            Ok(Some(next))
        })
        .await?;
        Ok(())
    }

    /// Applies `change` to the state in force and, when it returns a new
    /// state, stores it (the file, or the shared object with its
    /// conflict retries), then installs and publishes it. Concurrent admin
    /// calls on one replica are rare; the last to write the file wins the
    /// file and the memory alike, so both agree.
    async fn change(
        &self,
        mut change: impl FnMut(&State) -> Result<Option<State>, RevokeError>,
    ) -> Result<(), RevokeError> {
        if let Some(shared) = &self.shared {
            let _turn = self.shared_turn.lock().await;
            let versioned = shared.update(&self.state(), change).await??;
            self.apply(versioned);
            return Ok(());
        }
        let current = self.state();
        let Some(next) = change(&current)? else {
            return Ok(());
        };
        if next.entries != current.entries {
            self.write_file(&next.entries).await?;
        }
        self.install(next);
        Ok(())
    }

    /// Writes `revocations.json` (on a blocking thread).
    async fn write_file(&self, entries: &[Entry]) -> Result<(), RevokeError> {
        let path = self.dir.join(REVOCATIONS_FILE);
        let json = serde_json::to_vec_pretty(entries).map_err(|e| StoreError::Invalid {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        tokio::task::spawn_blocking(move || write_atomic(&path, &json, 0o600))
            .await
            .map_err(|e| StoreError::Invalid {
                path: self.dir.join(REVOCATIONS_FILE),
                reason: format!("writer failed: {e}"),
            })??;
        Ok(())
    }

    /// Asks the sidecars of `id` (`None`: all) to renew now: published
    /// with the list; kept in memory (a sidecar connected to the stream
    /// gets it at once; a restart forgets it) or, with `--shared-state`,
    /// in the shared object, so every replica's sidecars get it.
    pub async fn rotate(&self, id: Option<&SpiffeId>) -> Result<pb::Rotation, RevokeError> {
        let rotation = Rotation {
            id: id.map(ToString::to_string).unwrap_or_default(),
            // SVIDs issued during this second count as before it.
            issued_before: now() + 1,
        };
        let oldest = now() - ROTATION_KEPT_SECS;
        self.change(|state| {
            let mut next = state.clone();
            next.rotations
                .retain(|r| r.id != rotation.id && r.issued_before > oldest);
            next.rotations.push(rotation.clone());
            Ok(Some(next))
        })
        .await?;
        Ok(pb::Rotation {
            id: rotation.id,
            issued_before: rotation.issued_before,
        })
    }

    /// The entries in force.
    pub fn list(&self) -> Vec<Entry> {
        self.lock().entries.clone()
    }

    /// Follows the published list (for `WatchTrustBundle`).
    pub fn subscribe(&self) -> watch::Receiver<Snapshot> {
        self.published.subscribe()
    }
}

fn snapshot(entries: &[Entry], rotations: &[Rotation], sequence: u64) -> Snapshot {
    let rotations = rotations
        .iter()
        .map(|r| pb::Rotation {
            id: r.id.clone(),
            issued_before: r.issued_before,
        })
        .collect();
    Snapshot {
        sequence,
        entries: Arc::new(entries.iter().map(Entry::to_proto).collect()),
        rotations: Arc::new(rotations),
    }
}

/// How long a rotation is streamed: past the longest SVID lifetime any
/// deployment uses, every SVID issued before it has expired anyway.
const ROTATION_KEPT_SECS: i64 = 7 * 24 * 3600;

fn append_issued(mut file: std::fs::File, lines: &mpsc::Receiver<Issued>) {
    while let Ok(line) = lines.recv() {
        let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
        bytes.push(b'\n');
        if let Err(e) = file.write_all(&bytes).and_then(|()| file.flush()) {
            tracing::warn!(error = %e, "appending to {ISSUED_FILE} failed");
        }
    }
}

#[cfg(test)]
mod tests;
