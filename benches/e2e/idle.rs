//! The idle-connections memory scenario: on a fresh proxy pair, N keep-alive
//! client connections, each proven by one request, held idle; each side's
//! RSS and descriptors before, holding, and `--close-wait` seconds after the
//! client closed them all (whether the memory is given back).

use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::load::{self, Target};
use crate::procs::{self, Proc};

const MIB: f64 = 1024.0 * 1024.0;
/// Pause before each reading, for the proxies to finish what the last
/// request or close set off (pool returns, deferred frees).
const SETTLE: Duration = Duration::from_secs(1);

/// A proxy pair under the scenario.
pub struct Subject<'a> {
    /// Where the client connects.
    pub target: Target,
    /// The client-side proxy.
    pub outbound: &'a Proc,
    /// The server-side proxy.
    pub inbound: &'a Proc,
}

/// One side's readings, RSS in MiB.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Side {
    /// RSS of the fresh pair, after one request.
    pub rss_before_mib: f64,
    /// RSS holding the connections.
    pub rss_holding_mib: f64,
    /// (holding − before) / connections, KiB.
    pub kib_per_conn: f64,
    /// RSS `close_wait` after the client closed them.
    pub rss_after_close_mib: f64,
    /// RssAnon (private memory: what the allocator holds) before, holding
    /// and after the close wait.
    pub anon_mib: [f64; 3],
    /// Open descriptors of the fresh pair.
    pub fds_before: usize,
    /// Open descriptors holding the connections.
    pub fds_holding: usize,
    /// Open descriptors after the close wait.
    pub fds_after_close: usize,
}

/// One round of the scenario on one pair.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Round {
    /// Connections held.
    pub conns: usize,
    /// Seconds to open them all (each with its request).
    pub open_s: f64,
    /// The client-side proxy.
    pub outbound: Side,
    /// The server-side proxy.
    pub inbound: Side,
}

struct Reading {
    rss: f64,
    anon: f64,
    fds: usize,
}

fn read(proc: &Proc) -> anyhow::Result<Reading> {
    let mem = procs::mem(proc)?;
    Ok(Reading {
        rss: mem.rss as f64 / MIB,
        anon: mem.anon as f64 / MIB,
        fds: procs::fds(proc.pid())?,
    })
}

/// Runs the scenario once on `pair` with `n` connections. A connection that
/// fails or hangs (a proxy out of descriptors accepts nothing) ends the
/// round with an error giving every process's descriptors and limit.
pub async fn run(pair: Subject<'_>, n: usize, close_wait: Duration) -> anyhow::Result<Round> {
    // One request first, so that the "before" figures hold what any traffic
    // sets up once (pool, TLS session, lazily built state).
    let warm = load::hold_idle(pair.target, 1).await?;
    drop(warm);
    tokio::time::sleep(SETTLE).await;
    let before = (read(pair.outbound)?, read(pair.inbound)?);
    let started = Instant::now();
    let held = load::hold_idle(pair.target, n).await.with_context(|| {
        format!(
            "holding {n} connections; descriptors used/limit: outbound {}, inbound {}, benchmark {}",
            procs::fd_usage(pair.outbound.pid()),
            procs::fd_usage(pair.inbound.pid()),
            procs::fd_usage(std::process::id()),
        )
    })?;
    let open_s = started.elapsed().as_secs_f64();
    tokio::time::sleep(SETTLE).await;
    let holding = (read(pair.outbound)?, read(pair.inbound)?);
    drop(held);
    tokio::time::sleep(close_wait).await;
    let after = (read(pair.outbound)?, read(pair.inbound)?);
    let side = |b: &Reading, h: &Reading, a: &Reading| Side {
        rss_before_mib: b.rss,
        rss_holding_mib: h.rss,
        kib_per_conn: (h.rss - b.rss) * 1024.0 / n.max(1) as f64,
        rss_after_close_mib: a.rss,
        anon_mib: [b.anon, h.anon, a.anon],
        fds_before: b.fds,
        fds_holding: h.fds,
        fds_after_close: a.fds,
    };
    Ok(Round {
        conns: n,
        open_s,
        outbound: side(&before.0, &holding.0, &after.0),
        inbound: side(&before.1, &holding.1, &after.1),
    })
}

/// Per field, the median over rounds.
pub fn median(rounds: &[Round]) -> Round {
    let m = |f: &dyn Fn(&Round) -> f64| {
        crate::report::median(&rounds.iter().map(f).collect::<Vec<_>>())
    };
    let side = |pick: fn(&Round) -> &Side| Side {
        rss_before_mib: m(&|r| pick(r).rss_before_mib),
        rss_holding_mib: m(&|r| pick(r).rss_holding_mib),
        kib_per_conn: m(&|r| pick(r).kib_per_conn),
        rss_after_close_mib: m(&|r| pick(r).rss_after_close_mib),
        anon_mib: [0, 1, 2].map(|i| m(&|r| pick(r).anon_mib[i])),
        fds_before: m(&|r| pick(r).fds_before as f64) as usize,
        fds_holding: m(&|r| pick(r).fds_holding as f64) as usize,
        fds_after_close: m(&|r| pick(r).fds_after_close as f64) as usize,
    };
    Round {
        conns: rounds.first().map_or(0, |r| r.conns),
        open_s: m(&|r| r.open_s),
        outbound: side(|r| &r.outbound),
        inbound: side(|r| &r.inbound),
    }
}
