//! The descriptor limit a sidecar needs, taken at start: container runtimes
//! hand pods a soft `RLIMIT_NOFILE` as low as 1,024 (containerd 2 and
//! systemd defaults) under a hard limit hundreds of times higher, and a
//! proxy holding two descriptors per connection would fail at accept
//! (EMFILE) after a few hundred. The soft limit is raised to the hard one,
//! as the Go runtime does for its programs; if even the hard limit cannot carry
//! the default connection limit, that limit is lowered to what it can
//! carry, so excess connections are refused cleanly at accept (counted as
//! `connection_limit`) instead of breaking dials, certificate reloads and
//! policy reads that need a descriptor too.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Descriptors an app connection may hold at once: its own and the one
/// dialled for it (the HTTP/1 path, or the L4 path without tunnels).
pub const PER_CONNECTION: u64 = 2;

/// Descriptors kept for everything that is not an app connection:
/// listeners, pooled mesh connections, the CA and API channels, files
/// read at reload, the runtime's own.
pub const RESERVE: u64 = 256;

/// Linux's default `fs.nr_open`: the most a soft limit can be set to when
/// the hard limit reads as unlimited.
const NR_OPEN_DEFAULT: u64 = 1 << 20;

/// The descriptor limit as found and as left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    /// The soft limit before (None: unlimited).
    pub was: Option<u64>,
    /// The soft limit now in force.
    pub now: u64,
}

impl FdLimit {
    /// The most app connections `now` descriptors carry (see
    /// [`PER_CONNECTION`], [`RESERVE`]), at least one.
    pub fn connections(&self) -> usize {
        let usable = self.now.saturating_sub(RESERVE) / PER_CONNECTION;
        usize::try_from(usable).unwrap_or(usize::MAX).max(1)
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, and logs it. A
/// refusal (a seccomp profile, say) keeps the soft limit as it was: the
/// limit found is then what the connection limit is sized to. Every
/// long-running server calls it first (the CA holds one stream per
/// sidecar; the gateway one connection per kubectl).
pub fn raise() -> FdLimit {
    let found = getrlimit(Resource::Nofile);
    let was = found.current;
    let target = found.maximum.unwrap_or(NR_OPEN_DEFAULT);
    let Some(current) = was else {
        return FdLimit { was, now: target };
    };
    if current >= target {
        return FdLimit { was, now: current };
    }
    let raised = Rlimit {
        current: Some(target),
        maximum: found.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => {
            tracing::info!(
                from = current,
                to = target,
                "descriptor limit raised to the hard limit"
            );
            FdLimit { was, now: target }
        }
        Err(e) => {
            tracing::warn!(error = %e, soft = current, hard = target, "could not raise the descriptor limit");
            FdLimit { was, now: current }
        }
    }
}

/// The default connection limit, when the descriptor limit carries it.
pub const DEFAULT_CONNECTIONS: usize = 16_384;

/// The connection limit: the operator's (`configured`), kept even if
/// `limit` may not carry it (they may know their connections take one
/// descriptor each, as tunnelled ones do), or else the default, lowered to
/// what `limit` carries (and a warning says so).
pub fn connection_limit(configured: Option<usize>, limit: FdLimit) -> usize {
    let carried = limit.connections();
    let wanted = configured.unwrap_or(DEFAULT_CONNECTIONS);
    if carried >= wanted {
        return wanted;
    }
    if configured.is_some() {
        tracing::warn!(
            descriptors = limit.now,
            wanted,
            carried,
            "--max-connections {wanted} may not fit the descriptor limit at two per connection; kept as given"
        );
        return wanted;
    }
    tracing::warn!(
        descriptors = limit.now,
        wanted,
        carried,
        "the descriptor limit cannot carry the default connection limit: at most {carried} connections at once (raise the container's nofile limit, or set --max-connections)"
    );
    carried
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_keep_the_reserve_and_two_descriptors_each() {
        let at = |now| FdLimit { was: None, now }.connections();
        assert_eq!(at(1024), 384);
        assert_eq!(at(1_048_576), 524_160);
        assert_eq!(at(100), 1, "a limit under the reserve still serves one");
    }

    #[test]
    fn the_connection_limit_is_lowered_only_when_descriptors_are_short() {
        let limit = |now| FdLimit {
            was: Some(now),
            now,
        };
        assert_eq!(connection_limit(None, limit(1_048_576)), 16_384);
        assert_eq!(connection_limit(None, limit(1024)), 384);
        assert_eq!(connection_limit(Some(1000), limit(1024)), 1000, "as given");
        assert_eq!(connection_limit(Some(10), limit(1024)), 10);
    }

    #[test]
    fn raising_leaves_the_soft_limit_at_the_hard_one() {
        // This process's own limit: raising is idempotent and never lowers.
        let before = getrlimit(Resource::Nofile);
        let limit = raise();
        let after = getrlimit(Resource::Nofile);
        assert_eq!(after.current, Some(limit.now));
        assert!(after.current >= before.current);
        assert_eq!(after.maximum, before.maximum);
        if let Some(hard) = after.maximum {
            assert_eq!(limit.now, hard, "soft raised to the hard limit");
        }
    }
}
