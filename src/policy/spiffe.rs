//! Interim SPIFFE ID types with the `stepmesh_ca::spiffe_id` contract, used
//! until that module lands in main (then this file goes and `policy` re-exports
//! the real ones).

use std::fmt;
use std::str::FromStr;

/// Why a SPIFFE ID or pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid SPIFFE ID {input:?}: {why}")]
pub struct SpiffeIdError {
    input: String,
    why: &'static str,
}

/// A trust domain name: lower-case `[a-z0-9._-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// The name as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why| SpiffeIdError {
            input: s.to_owned(),
            why,
        };
        if s.is_empty() {
            return Err(bad("empty trust domain"));
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        {
            return Err(bad("trust domain characters must be [a-z0-9._-]"));
        }
        Ok(TrustDomain(s.to_owned()))
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A parsed `spiffe://trust-domain/path` ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    full: String,
    td: TrustDomain,
}

impl SpiffeId {
    /// Parses per the SPIFFE ID spec.
    pub fn parse(s: &str) -> Result<SpiffeId, SpiffeIdError> {
        let bad = |why| SpiffeIdError {
            input: s.to_owned(),
            why,
        };
        if s.len() > 2048 {
            return Err(bad("longer than 2048 bytes"));
        }
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| bad("scheme must be spiffe://"))?;
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let td = TrustDomain::from_str(td).map_err(|e| bad(e.why))?;
        if !path.is_empty() {
            for seg in path[1..].split('/') {
                if seg.is_empty() || seg == "." || seg == ".." {
                    return Err(bad("empty, '.' or '..' path segment"));
                }
                if !seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                {
                    return Err(bad("path characters must be [a-zA-Z0-9._-]"));
                }
            }
        }
        Ok(SpiffeId {
            full: s.to_owned(),
            td,
        })
    }

    /// The trust domain part.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.td
    }

    /// The path part (`/ns/x/sa/y`), possibly empty.
    pub fn path(&self) -> &str {
        &self.full["spiffe://".len() + self.td.0.len()..]
    }

    /// The whole ID.
    pub fn as_str(&self) -> &str {
        &self.full
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpiffeId::parse(s)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

/// An exact SPIFFE ID, or a trailing `/*` for every ID under that path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpiffeIdPattern {
    base: SpiffeId,
    prefix: bool,
}

impl SpiffeIdPattern {
    /// Parses `spiffe://td/path` or `spiffe://td/path/*`.
    pub fn parse(s: &str) -> Result<SpiffeIdPattern, SpiffeIdError> {
        match s.strip_suffix("/*") {
            Some(base) => Ok(SpiffeIdPattern {
                base: SpiffeId::parse(base)?,
                prefix: true,
            }),
            None => Ok(SpiffeIdPattern {
                base: SpiffeId::parse(s)?,
                prefix: false,
            }),
        }
    }

    /// Whether `id` is this ID, or under it for a prefix pattern.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        if !self.prefix {
            return id == &self.base;
        }
        id.as_str()
            .strip_prefix(self.base.as_str())
            .is_some_and(|rest| rest.starts_with('/') && rest.len() > 1)
    }
}

impl fmt::Display for SpiffeIdPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.prefix {
            write!(f, "{}/*", self.base)
        } else {
            write!(f, "{}", self.base)
        }
    }
}
