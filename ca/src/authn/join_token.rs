//! Join tokens: a file of `<token> <spiffe-id>` lines (`#` starts a
//! comment) for development machines and VMs without Kubernetes.
//!
//! Tokens are kept only as SHA-256 digests, so lookups compare digests, not
//! secrets, and a memory dump does not reveal them. The file is re-read when
//! it changes; a broken file keeps the last good table.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use aws_lc_rs::digest;

use crate::spiffe_id::{SpiffeId, TrustDomain};

/// The verifier's name in audit lines and metrics.
pub const NAME: &str = "join-token";

/// Why a join-token file was refused.
#[derive(Debug, thiserror::Error)]
pub enum JoinTokenError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A line is wrong.
    #[error("{path}:{line}: {reason}")]
    Line {
        /// The file.
        path: PathBuf,
        /// One-based line number.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
}

type Table = HashMap<[u8; 32], SpiffeId>;

/// The join tokens of one file.
pub struct JoinTokens {
    path: PathBuf,
    td: TrustDomain,
    table: ArcSwap<Table>,
    /// SHA-256 of the file content last seen (loaded or refused), so a
    /// change is noticed even within one mtime tick and a broken file is
    /// reported once.
    seen: Mutex<[u8; 32]>,
}

impl JoinTokens {
    /// Loads `path`; every ID must be in `td`.
    pub fn load(path: &Path, td: &TrustDomain) -> Result<Self, JoinTokenError> {
        let text = read_file(path)?;
        let mut this = Self::parse(&text, path, td)?;
        this.seen = Mutex::new(digest_of(&text));
        Ok(this)
    }

    /// Parses file contents (exposed for tests and `policy`-style checks).
    pub fn parse(text: &str, path: &Path, td: &TrustDomain) -> Result<Self, JoinTokenError> {
        Ok(Self {
            path: path.to_owned(),
            td: td.clone(),
            table: ArcSwap::from_pointee(parse_table(text, path, td)?),
            seen: Mutex::new(digest_of(text)),
        })
    }

    /// The identity a token maps to, if any.
    pub fn lookup(&self, token: &str) -> Option<SpiffeId> {
        self.table.load().get(&digest_of(token)).cloned()
    }

    /// How many tokens are loaded.
    pub fn len(&self) -> usize {
        self.table.load().len()
    }

    /// Whether no token is loaded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Re-reads the file (blocking); on error the old table stays.
    pub fn reload(&self) -> Result<usize, JoinTokenError> {
        let text = read_file(&self.path)?;
        self.install(&text)
    }

    /// Re-reads the file (blocking) and, if its content changed since last
    /// seen, loads it: `Ok(None)` when unchanged; on error the old table stays.
    pub fn reload_if_changed(&self) -> Result<Option<usize>, JoinTokenError> {
        let text = read_file(&self.path)?;
        let digest = digest_of(&text);
        if let Ok(mut seen) = self.seen.lock() {
            if *seen == digest {
                return Ok(None);
            }
            *seen = digest;
        }
        self.install(&text).map(Some)
    }

    fn install(&self, text: &str) -> Result<usize, JoinTokenError> {
        let table = parse_table(text, &self.path, &self.td)?;
        let n = table.len();
        self.table.store(Arc::new(table));
        Ok(n)
    }

    /// The file this table comes from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn digest_of(token: &str) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn read_file(path: &Path) -> Result<String, JoinTokenError> {
    std::fs::read_to_string(path).map_err(|source| JoinTokenError::Io {
        path: path.to_owned(),
        source,
    })
}

fn parse_table(text: &str, path: &Path, td: &TrustDomain) -> Result<Table, JoinTokenError> {
    let mut table = Table::new();
    for (i, raw) in text.lines().enumerate() {
        let bad = |reason: String| JoinTokenError::Line {
            path: path.to_owned(),
            line: i + 1,
            reason,
        };
        let line = raw.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(token), Some(id), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(bad("expected `<token> <spiffe-id>`".into()));
        };
        let id = SpiffeId::parse(id).map_err(|e| bad(format!("{id:?}: {e}")))?;
        if id.trust_domain() != td {
            return Err(bad(format!("{id} is not in trust domain {td}")));
        }
        if id.path().is_empty() {
            return Err(bad(format!("{id} names the trust domain, not a workload")));
        }
        if table.insert(digest_of(token), id).is_some() {
            return Err(bad("token appears twice".into()));
        }
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn parses_tokens_and_comments() {
        let td: TrustDomain = "td".parse().unwrap();
        let text =
            "# dev machines\n\ntok-a spiffe://td/vm/a\n  tok-b   spiffe://td/vm/b  # laptop\n";
        let t = JoinTokens::parse(text, Path::new("f"), &td).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t.lookup("tok-a").unwrap().as_str(), "spiffe://td/vm/a");
        assert_eq!(t.lookup("tok-b").unwrap().as_str(), "spiffe://td/vm/b");
        assert!(t.lookup("tok-c").is_none());
        assert!(t.lookup("tok-").is_none());
    }

    #[test]
    fn a_broken_reload_keeps_the_old_table() {
        let td: TrustDomain = "td".parse().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "tok-a spiffe://td/a\n").unwrap();
        let t = JoinTokens::load(&path, &td).unwrap();
        std::fs::write(&path, "tok-b spiffe://td/b\nbroken line here\n").unwrap();
        let err = t.reload().unwrap_err().to_string();
        assert!(err.contains(":2:"), "{err}");
        assert!(t.lookup("tok-a").is_some() && t.lookup("tok-b").is_none());
        assert_eq!(
            t.reload_if_changed().unwrap_err().to_string(),
            err,
            "reported"
        );
        assert!(
            t.reload_if_changed().unwrap().is_none(),
            "then quiet until it changes"
        );
        std::fs::write(&path, "tok-b spiffe://td/b\n").unwrap();
        assert_eq!(t.reload_if_changed().unwrap(), Some(1));
        assert!(t.lookup("tok-a").is_none() && t.lookup("tok-b").is_some());
    }

    #[test]
    fn refuses_bad_lines_naming_the_line() {
        let td: TrustDomain = "td".parse().unwrap();
        let cases = [
            ("tok\n", "expected"),
            ("tok spiffe://td/a extra\n", "expected"),
            ("ok spiffe://td/a\ntok http://td/a\n", ":2:"),
            ("tok spiffe://other/a\n", "not in trust domain"),
            ("tok spiffe://td\n", "names the trust domain"),
            ("tok spiffe://td/a\ntok spiffe://td/b\n", "twice"),
        ];
        for (text, want) in cases {
            let err = JoinTokens::parse(text, Path::new("f"), &td)
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }
}
