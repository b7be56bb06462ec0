//! The idle-connections scenario's rounds: a fresh proxy pair per round
//! (stepmesh's L4 and HTTP ports, each installed peer), the CA identities
//! those pairs need, and one row per pair. Apart from `run` because its
//! pairs are its own: the main pairs of the other scenarios are not used.

use crate::args::{Args, Path};
use crate::idle;
use crate::load::Target;
use crate::mesh::{Pair, Upstreams};
use crate::procs;
use crate::report::IdleRow;

use super::Setup;

/// Pair labels whose identities the CA must know: the main pairs and a
/// fresh pair per round of the idle-connections scenario on each port.
pub(super) fn identity_labels(rounds: usize) -> Vec<String> {
    let mut labels = vec!["main".to_owned(), "no-resumption".to_owned()];
    for round in 0..rounds {
        labels.push(format!("idle-l4-{round}"));
        labels.push(format!("idle-http-{round}"));
    }
    labels
}

/// The idle-connections scenario on stepmesh's L4 and HTTP ports and on
/// each installed peer, a fresh pair per round (memory the allocator kept
/// from earlier traffic would otherwise be counted). A failed round ends
/// that pair's rounds and is reported in its row; the other pairs go on.
pub(super) async fn idle_rows(
    args: &Args,
    setup: &Setup,
    dir: &std::path::Path,
    versions: &mut Vec<String>,
) -> Vec<IdleRow> {
    // The benchmark holds one socket per connection and a sidecar two (L4,
    // HTTP/1 relay); the sidecars and peers started from here on inherit it.
    let want = args.idle_conns as u64 * 2 + 1024;
    let nofile = procs::raise_nofile(want);
    if nofile < want {
        eprintln!("  open-file limit {nofile} (wanted {want}): proxies may run out of descriptors");
    }
    let mut rows = vec![];
    let mut subjects: Vec<String> = [Path::L4, Path::Http]
        .into_iter()
        .filter(|p| args.paths.contains(p) && setup.sidecars.is_some())
        .map(|p| format!("stepmesh, {}", short(p)))
        .collect();
    subjects.extend(args.peers().iter().map(|p| p.to_string()));
    for subject in subjects {
        let mut row = IdleRow {
            pair: subject.clone(),
            rounds: vec![],
            median: None,
            failure: None,
        };
        for round in 0..args.rounds {
            eprintln!("  idle connections, {subject}, round {}", round + 1);
            match idle_round(args, setup, dir, &subject, round, versions).await {
                Ok(Some(r)) => row.rounds.push(r),
                Ok(None) => break,
                Err(err) => {
                    eprintln!("    failed: {err:#}");
                    row.failure = Some(format!("{err:#}"));
                    break;
                }
            }
        }
        if row.rounds.is_empty() && row.failure.is_none() {
            continue;
        }
        row.median = (!row.rounds.is_empty()).then(|| idle::median(&row.rounds));
        rows.push(row);
    }
    rows
}

fn short(path: Path) -> &'static str {
    match path {
        Path::L4 => "L4 port",
        Path::Http => "HTTP port",
        Path::Direct => "direct",
    }
}

/// One round on a fresh pair; Ok(None) when the peer is not installed.
async fn idle_round(
    args: &Args,
    setup: &Setup,
    dir: &std::path::Path,
    subject: &str,
    round: usize,
    versions: &mut Vec<String>,
) -> anyhow::Result<Option<idle::Round>> {
    let n = args.idle_conns;
    let wait = args.close_wait();
    if let Some(path) = [Path::L4, Path::Http]
        .into_iter()
        .find(|p| subject == format!("stepmesh, {}", short(*p)))
    {
        let (Some(ca), Some(sidecars)) = (&setup.ca, &setup.sidecars) else {
            return Ok(None);
        };
        let up = Upstreams {
            http: setup.backend.http,
            echo: setup.backend.echo,
            l4: setup.backend.l4,
        };
        let label = match path {
            Path::L4 => format!("idle-l4-{round}"),
            _ => format!("idle-http-{round}"),
        };
        let pair = Pair::start(sidecars, ca, dir, &label, up, true).await?;
        let target = match path {
            Path::L4 => Target {
                addr: pair.l4,
                opaque: true,
            },
            _ => Target {
                addr: pair.http,
                opaque: false,
            },
        };
        let subject = idle::Subject {
            target,
            outbound: &pair.outbound,
            inbound: &pair.inbound,
        };
        return Ok(Some(idle::run(subject, n, wait).await?));
    }
    let Some(peer) = args.peers().iter().find(|p| p.to_string() == subject) else {
        return Ok(None);
    };
    let label = format!("idle-{round}");
    let Some(pair) = peer
        .start(args.envoy.as_deref(), dir, &label, setup.backend.http)
        .await?
    else {
        return Ok(None);
    };
    let line = format!("{}: {}", pair.peer, pair.version);
    if !versions.contains(&line) {
        versions.push(line);
    }
    let subject = idle::Subject {
        target: Target {
            addr: pair.addr,
            opaque: false,
        },
        outbound: &pair.outbound,
        inbound: &pair.inbound,
    };
    Ok(Some(idle::run(subject, n, wait).await?))
}
