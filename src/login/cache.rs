//! The token cache: one JSON file per (issuer, client id) in a directory
//! only the user can enter (0700), each file only the user can read (0600),
//! replaced atomically (a temporary file, then a rename), so kubectl runs
//! in parallel never read half a file. A file others could read is not
//! trusted: it is ignored and replaced.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The tokens of one login.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The issuer they came from.
    pub issuer: String,
    /// The client they were issued to.
    pub client_id: String,
    /// The ID token: what kubectl sends.
    pub id_token: String,
    /// The refresh token, if the provider gave one.
    pub refresh_token: Option<String>,
    /// The ID token's `exp` (Unix seconds).
    pub expiry: u64,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Tokens are never printed.
        f.debug_struct("Entry")
            .field("issuer", &self.issuer)
            .field("client_id", &self.client_id)
            .field("expiry", &self.expiry)
            .finish_non_exhaustive()
    }
}

/// Where the tokens of one (issuer, client id) live.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
    file: PathBuf,
    issuer: String,
    client_id: String,
}

impl Cache {
    /// The cache file for `issuer` and `client_id` under `dir`.
    pub fn new(dir: PathBuf, issuer: &str, client_id: &str) -> Cache {
        let digest = aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            format!("{issuer}\n{client_id}").as_bytes(),
        );
        let name: String = digest.as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let file = dir.join(format!("{name}.json"));
        Cache {
            dir,
            file,
            issuer: issuer.to_owned(),
            client_id: client_id.to_owned(),
        }
    }

    /// `$XDG_CACHE_HOME/stepmesh/login`, else `~/.cache/stepmesh/login`.
    pub fn default_dir() -> Option<PathBuf> {
        let base = std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| Path::new(v).is_absolute())
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME")
                    .filter(|v| !v.is_empty())
                    .map(|h| PathBuf::from(h).join(".cache"))
            })?;
        Some(base.join("stepmesh").join("login"))
    }

    /// The cache file.
    pub fn path(&self) -> &Path {
        &self.file
    }

    /// The cached tokens for this issuer and client, if any are usable.
    pub fn load(&self) -> Option<Entry> {
        let meta = std::fs::metadata(&self.file).ok()?;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(file = %self.file.display(), "the token cache is readable by others: ignored, and replaced at the next login");
            return None;
        }
        let text = std::fs::read(&self.file).ok()?;
        match serde_json::from_slice::<Entry>(&text) {
            Ok(entry) if entry.issuer == self.issuer && entry.client_id == self.client_id => {
                Some(entry)
            }
            Ok(_) => None,
            Err(err) => {
                tracing::warn!(file = %self.file.display(), %err, "the token cache is unreadable: ignored");
                None
            }
        }
    }

    /// Replaces the cached tokens.
    pub fn store(&self, entry: &Entry) -> std::io::Result<()> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)?;
        // An existing directory (made by hand, or by an older version) is
        // ours: narrow it.
        let mode = std::fs::metadata(&self.dir)?.permissions().mode();
        if mode & 0o077 != 0 {
            std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))?;
        }
        let tmp = self.dir.join(format!(
            ".{}.{}.{:08x}.tmp",
            self.file
                .file_name()
                .map_or_else(Default::default, |n| n.to_string_lossy()),
            std::process::id(),
            fastrand::u32(..)
        ));
        let written = (|| {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(&serde_json::to_vec(entry).map_err(std::io::Error::other)?)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &self.file)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }

    /// Forgets the tokens (`--logout`); true if there were any.
    pub fn remove(&self) -> std::io::Result<bool> {
        match std::fs::remove_file(&self.file) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            issuer: "https://idp".into(),
            client_id: "kubectl".into(),
            id_token: "secret-id-token".into(),
            refresh_token: Some("secret-refresh".into()),
            expiry: 42,
        }
    }

    #[test]
    fn stores_private_files_atomically_and_ignores_readable_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        let cache = Cache::new(dir.clone(), "https://idp", "kubectl");
        assert!(cache.load().is_none());
        cache.store(&entry()).unwrap();
        assert_eq!(cache.load(), Some(entry()));
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(cache.path()), 0o600);
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "no temp file left"
        );
        assert!(!format!("{:?}", entry()).contains("secret"));

        let other = Cache::new(dir.clone(), "https://idp", "other");
        assert_ne!(other.path(), cache.path());
        std::fs::copy(cache.path(), other.path()).unwrap();
        assert!(other.load().is_none(), "another client's entry is not used");
        std::fs::remove_file(other.path()).unwrap();

        std::fs::set_permissions(cache.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(
            cache.load().is_none(),
            "a file others can read is not trusted"
        );
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        cache.store(&entry()).unwrap();
        assert_eq!((mode(cache.path()), mode(&dir)), (0o600, 0o700));
        assert!(cache.remove().unwrap());
        assert!(!cache.remove().unwrap());
    }
}
