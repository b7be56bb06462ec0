//! SPIFFE IDs, trust domains and ID patterns, parsed exactly per the SPIFFE
//! ID specification (<https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE-ID.md>).
//!
//! "Parse, don't validate": a [`SpiffeId`] or [`TrustDomain`] that exists is
//! valid, so the rest of the code never re-checks one.

use std::fmt;
use std::str::FromStr;

/// The URI scheme of every SPIFFE ID.
const SCHEME: &str = "spiffe://";
/// The SPIFFE ID spec caps a whole ID at 2048 bytes.
const MAX_ID_LEN: usize = 2048;
/// The SPIFFE ID spec caps a trust domain name at 255 bytes.
const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a string is not a SPIFFE ID (or trust domain, or pattern).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// The input was empty.
    #[error("empty SPIFFE ID")]
    Empty,
    /// The input is longer than the spec allows.
    #[error("SPIFFE ID is {0} bytes, more than the 2048 allowed")]
    TooLong(usize),
    /// The input does not start with `spiffe://`.
    #[error("SPIFFE ID must start with \"spiffe://\"")]
    WrongScheme,
    /// Nothing between `spiffe://` and the path.
    #[error("SPIFFE ID has no trust domain")]
    MissingTrustDomain,
    /// The trust domain is longer than 255 bytes.
    #[error("trust domain is {0} bytes, more than the 255 allowed")]
    TrustDomainTooLong(usize),
    /// `user@` in the authority part.
    #[error("SPIFFE ID must not carry userinfo (\"@\")")]
    Userinfo,
    /// `:port` in the authority part.
    #[error("SPIFFE ID must not carry a port")]
    Port,
    /// A `?query`.
    #[error("SPIFFE ID must not carry a query (\"?\")")]
    Query,
    /// A `#fragment`.
    #[error("SPIFFE ID must not carry a fragment (\"#\")")]
    Fragment,
    /// `%xx` escapes are not allowed anywhere.
    #[error("SPIFFE ID must not be percent-encoded (\"%\")")]
    PercentEncoded,
    /// A trust domain character outside `[a-z0-9.-_]` (upper case included).
    #[error("trust domain character {0:?} is not one of lower-case a-z, 0-9, '.', '-', '_'")]
    BadTrustDomainChar(char),
    /// A path character outside `[a-zA-Z0-9.-_]`.
    #[error("path character {0:?} is not one of a-z, A-Z, 0-9, '.', '-', '_'")]
    BadPathChar(char),
    /// `//` or a trailing `/`.
    #[error("path has an empty segment (\"//\" or a trailing \"/\")")]
    EmptySegment,
    /// A `.` or `..` segment.
    #[error("path has a \".\" or \"..\" segment")]
    DotSegment,
    /// A pattern whose `*` is anywhere but a whole last segment.
    #[error("a pattern may only end in \"/*\"; \"*\" elsewhere is not allowed")]
    BadWildcard,
}

/// A SPIFFE trust domain, such as `cluster.local`: the authority of its IDs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// The trust domain name, without `spiffe://`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own SPIFFE ID, `spiffe://<td>`.
    pub fn id_string(&self) -> String {
        format!("{SCHEME}{}", self.0)
    }

    fn parse_name(name: &str) -> Result<Self, SpiffeIdError> {
        if name.is_empty() {
            return Err(SpiffeIdError::MissingTrustDomain);
        }
        if name.len() > MAX_TRUST_DOMAIN_LEN {
            return Err(SpiffeIdError::TrustDomainTooLong(name.len()));
        }
        for c in name.chars() {
            match c {
                'a'..='z' | '0'..='9' | '.' | '-' | '_' => {}
                '@' => return Err(SpiffeIdError::Userinfo),
                ':' => return Err(SpiffeIdError::Port),
                '%' => return Err(SpiffeIdError::PercentEncoded),
                '?' => return Err(SpiffeIdError::Query),
                '#' => return Err(SpiffeIdError::Fragment),
                other => return Err(SpiffeIdError::BadTrustDomainChar(other)),
            }
        }
        Ok(Self(name.to_owned()))
    }
}

/// Accepts a bare name (`cluster.local`) or the trust domain's ID
/// (`spiffe://cluster.local`), as operators write either.
impl FromStr for TrustDomain {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.starts_with(SCHEME) {
            let id = SpiffeId::parse(s)?;
            if !id.path().is_empty() {
                return Err(SpiffeIdError::BadTrustDomainChar('/'));
            }
            return Ok(id.td);
        }
        Self::parse_name(s)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A valid SPIFFE ID, `spiffe://<trust-domain><path>`; the path may be empty
/// (the trust domain's own ID) but is otherwise `/seg/seg...`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    // `id` first: the derived ordering is the ordering of the whole string.
    id: String,
    td: TrustDomain,
}

impl SpiffeId {
    /// Parses a SPIFFE ID, refusing anything the spec refuses.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong(s.len()));
        }
        let rest = s.strip_prefix(SCHEME).ok_or(SpiffeIdError::WrongScheme)?;
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let td = TrustDomain::parse_name(authority)?;
        validate_path(path)?;
        Ok(Self {
            id: s.to_owned(),
            td,
        })
    }

    /// The workload ID of a Kubernetes service account:
    /// `spiffe://<td>/ns/<namespace>/sa/<name>`.
    pub fn for_service_account(
        td: &TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        Self::parse(&format!("{SCHEME}{td}/ns/{namespace}/sa/{service_account}"))
    }

    /// The trust domain this ID belongs to.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.td
    }

    /// The path, `""` or `/seg/...`.
    pub fn path(&self) -> &str {
        &self.id[SCHEME.len() + self.td.0.len()..]
    }

    /// The whole ID as a string.
    pub fn as_str(&self) -> &str {
        &self.id
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

/// Checks a path: empty, or `/`-separated segments of `[a-zA-Z0-9.-_]`, none
/// empty, `.` or `..`.
fn validate_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    // The caller split at the first '/', so the path starts with one.
    for segment in path[1..].split('/') {
        validate_segment(segment)?;
    }
    Ok(())
}

fn validate_segment(segment: &str) -> Result<(), SpiffeIdError> {
    match segment {
        "" => return Err(SpiffeIdError::EmptySegment),
        "." | ".." => return Err(SpiffeIdError::DotSegment),
        _ => {}
    }
    for c in segment.chars() {
        match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_' => {}
            '%' => return Err(SpiffeIdError::PercentEncoded),
            '?' => return Err(SpiffeIdError::Query),
            '#' => return Err(SpiffeIdError::Fragment),
            other => return Err(SpiffeIdError::BadPathChar(other)),
        }
    }
    Ok(())
}

/// Which peers an outbound route or policy rule accepts: one exact ID, or
/// with a trailing `/*` every ID strictly under that path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SpiffeIdPattern {
    /// Exactly this ID.
    Exact(SpiffeId),
    /// Any ID of the trust domain whose path starts with `prefix` + `/`
    /// and has at least one more segment. `prefix` is a valid ID.
    Prefix(SpiffeId),
}

impl SpiffeIdPattern {
    /// Parses `spiffe://td/a/b` (exact) or `spiffe://td/a/*` (prefix).
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if let Some(prefix) = s.strip_suffix("/*") {
            if prefix.contains('*') {
                return Err(SpiffeIdError::BadWildcard);
            }
            return Ok(Self::Prefix(SpiffeId::parse(prefix)?));
        }
        if s.contains('*') {
            return Err(SpiffeIdError::BadWildcard);
        }
        Ok(Self::Exact(SpiffeId::parse(s)?))
    }

    /// Whether `id` is accepted by this pattern.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Exact(want) => want == id,
            Self::Prefix(prefix) => id
                .as_str()
                .strip_prefix(prefix.as_str())
                .is_some_and(|rest| rest.len() > 1 && rest.starts_with('/')),
        }
    }
}

impl FromStr for SpiffeIdPattern {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for SpiffeIdPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(id) => write!(f, "{id}"),
            Self::Prefix(id) => write!(f, "{id}/*"),
        }
    }
}

#[cfg(test)]
mod tests;
