//! One benchmark run: start the backend, the CA and the sidecar pairs, run
//! every asked scenario on every path for each round, collect the report.
//! The rounds become the report's rows in `run/rows.rs`; the idle
//! scenario, a fresh pair per round, is `run/idle_pairs.rs`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use crate::args::{Args, Path, Scenario};
use crate::backend::{self, Backend};
use crate::load::{self, Target};
use crate::mesh::{self, Ca, Pair, SidecarCmd, Upstreams};
use crate::oha::{self, OhaRun};
use crate::peers::PeerPair;
use crate::procs::{self, Proc};
use crate::report::*;

mod idle_pairs;
mod rows;

use self::idle_pairs::{identity_labels, idle_rows};
use self::rows::*;

const MIB: f64 = 1024.0 * 1024.0;

/// The processes of a run.
struct Setup {
    backend: Backend,
    ca: Option<Ca>,
    pair: Option<Pair>,
    /// A second pair started with `--no-session-resumption`.
    pair_no_resumption: Option<Pair>,
    stepmesh: Option<PathBuf>,
    sidecars: Option<SidecarCmd>,
    /// Peer proxy pairs for the latency and throughput scenarios.
    peers: Vec<PeerPair>,
}

/// A path the latency and throughput scenarios measure.
struct Measured<'a> {
    label: String,
    target: Target,
    /// (outbound, inbound) proxies, None on the direct path.
    procs: Option<(&'a Proc, &'a Proc)>,
    /// Through stepmesh's sidecars.
    stepmesh: bool,
}

impl Setup {
    fn pair(&self) -> anyhow::Result<&Pair> {
        self.pair.as_ref().context("no sidecar pair in this run")
    }

    fn addr(&self, path: Path) -> anyhow::Result<Target> {
        let (addr, opaque) = match path {
            Path::Direct => (self.backend.http, false),
            Path::L4 => (self.pair()?.l4, true),
            Path::Http => (self.pair()?.http, false),
        };
        Ok(Target { addr, opaque })
    }

    /// stepmesh's paths as asked, then every peer pair.
    fn measured(&self, args: &Args) -> anyhow::Result<Vec<Measured<'_>>> {
        let mut all = vec![];
        for path in &args.paths {
            let procs = match path {
                Path::Direct => None,
                _ => self.pair.as_ref().map(|p| (&p.outbound, &p.inbound)),
            };
            all.push(Measured {
                label: path.to_string(),
                target: self.addr(*path)?,
                procs,
                stepmesh: *path != Path::Direct,
            });
        }
        for peer in &self.peers {
            all.push(Measured {
                label: format!("{} pair", peer.peer),
                target: Target {
                    addr: peer.addr,
                    opaque: false,
                },
                procs: Some((&peer.outbound, &peer.inbound)),
                stepmesh: false,
            });
        }
        Ok(all)
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        self.backend.proc.check_alive()?;
        for peer in &mut self.peers {
            peer.outbound.check_alive()?;
            peer.inbound.check_alive()?;
        }
        if let Some(ca) = &mut self.ca {
            ca.check_alive()?;
        }
        for pair in [&mut self.pair, &mut self.pair_no_resumption]
            .into_iter()
            .flatten()
        {
            pair.check_alive()?;
        }
        Ok(())
    }
}

/// Runs the benchmark as `args` says.
pub async fn run(args: &Args, dir: &std::path::Path) -> anyhow::Result<Report> {
    let mut report = Report {
        machine: Machine::read(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        settings: serde_json::json!({
            "rate": args.rate, "duration_s": args.duration, "warmup_s": args.warmup,
            "connections": args.connections, "sat_connections": args.sat_connections,
            "conn_concurrency": args.conn_concurrency, "payload_bytes": args.payload,
            "bulk_mib": args.bulk_mib, "idle_conns": args.idle_conns,
            "close_wait_s": args.close_wait, "rounds": args.rounds,
            "sidecar_workers": 1,
        }),
        ..Report::default()
    };
    let mut setup = start(args, dir).await?;
    report.stepmesh = setup.stepmesh.as_ref().map(|p| p.display().to_string());
    report.sidecar = setup.sidecars.as_ref().map(SidecarCmd::command_line);
    report.peers = setup
        .peers
        .iter()
        .map(|p| format!("{}: {}", p.peer, p.version))
        .collect();
    let idle = match &setup.pair {
        Some(pair) => Some((procs::mem(&pair.outbound)?, procs::mem(&pair.inbound)?)),
        None => None,
    };

    let mut latency: Vec<(String, Vec<Percentiles>)> = vec![];
    let mut throughput: Vec<(String, Vec<Sat>)> = vec![];
    let mut connrate: Vec<(ConnKey, Vec<Sat>)> = vec![];
    let mut bulk: Vec<(Path, Vec<f64>)> = vec![];
    let mut peak = None;
    let oha_bin = args
        .wants(Scenario::Oha)
        .then(|| oha::find(args.oha.as_deref()))
        .flatten();
    if args.wants(Scenario::Oha) && oha_bin.is_none() {
        report.notes.push(
            "oha cross-check skipped: no oha binary (`cargo install oha --locked`, or --oha PATH)"
                .into(),
        );
    }
    let mut oha_runs: Vec<(Path, Vec<OhaRun>, Vec<OhaRun>)> = vec![];
    for round in 0..args.rounds {
        eprintln!("round {}/{}", round + 1, args.rounds);
        if args.wants(Scenario::Latency) {
            for m in setup.measured(args)? {
                eprintln!("  latency, {}", m.label);
                let run = load::latency(
                    m.target,
                    args.rate,
                    args.duration(),
                    args.warmup(),
                    args.connections,
                )
                .await?;
                push_round(&mut latency, m.label, percentiles(&run));
            }
        }
        if args.wants(Scenario::Throughput) {
            for m in setup.measured(args)? {
                eprintln!("  throughput, {}", m.label);
                let sat = measure_cpu(
                    &setup.backend.proc,
                    m.procs,
                    load::throughput(m.target, args.duration(), args.sat_connections),
                )
                .await?;
                push_round(&mut throughput, m.label, sat);
                if let (None, true, Some((outbound, inbound))) = (peak, m.stepmesh, m.procs) {
                    peak = Some((procs::mem(outbound)?.hwm, procs::mem(inbound)?.hwm));
                }
            }
        }
        if args.wants(Scenario::Connrate) {
            for case in connrate_cases(args, &setup)? {
                eprintln!("  new connections, {}", case.label);
                let sat = measure_cpu(
                    &setup.backend.proc,
                    case.procs,
                    load::new_connections(case.target, args.duration(), args.conn_concurrency),
                )
                .await?;
                let key = (case.label, case.resumption);
                match connrate.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, rounds)) => rounds.push(sat),
                    None => connrate.push((key, vec![sat])),
                }
            }
        }
        if args.wants(Scenario::Bulk) {
            for path in args.paths.iter().filter(|p| **p != Path::Http) {
                eprintln!("  bulk, {path}");
                let addr = if *path == Path::Direct {
                    setup.backend.echo
                } else {
                    setup.pair()?.bulk
                };
                let bytes = args.bulk_mib * 1024 * 1024;
                let took = load::bulk(addr, bytes).await?;
                let mib_s = bytes as f64 / MIB / took.as_secs_f64();
                match bulk.iter_mut().find(|(p, _)| p == path) {
                    Some((_, rounds)) => rounds.push(mib_s),
                    None => bulk.push((*path, vec![mib_s])),
                }
            }
        }
        if let Some(bin) = &oha_bin {
            // oha cannot send the L4 path's non-HTTP first byte.
            for path in args.paths.iter().filter(|p| **p != Path::L4) {
                eprintln!("  oha, {path}");
                let addr = setup.addr(*path)?.addr;
                let fixed = oha::run(
                    bin,
                    addr,
                    args.duration(),
                    args.connections,
                    Some(args.rate),
                )
                .await?;
                let sat = oha::run(bin, addr, args.duration(), args.sat_connections, None).await?;
                match oha_runs.iter_mut().find(|(p, _, _)| p == path) {
                    Some((_, f, s)) => {
                        f.push(fixed);
                        s.push(sat);
                    }
                    None => oha_runs.push((*path, vec![fixed], vec![sat])),
                }
            }
        }
        setup.check_alive()?;
    }

    report.oha = oha_rows(oha_runs);
    report.latency = latency_rows(latency);
    report.throughput = throughput_rows(throughput);
    report.connrate = connrate
        .into_iter()
        .map(|((label, resumption), rounds)| {
            let sat = median_sat(&rounds);
            ConnRow {
                label,
                resumption,
                rounds_cps: rounds.iter().map(|s| s.rate).collect(),
                cps: sat.rate,
                cpu_us_per_conn_outbound: sat.outbound_us,
                cpu_us_per_conn_inbound: sat.inbound_us,
                errors: rounds.iter().map(|s| s.errors).sum(),
            }
        })
        .collect();
    report.bulk = bulk
        .into_iter()
        .map(|(path, r)| BulkRow {
            path,
            mib_s: median(&r),
            rounds_mib_s: r,
        })
        .collect();

    if let (Some((idle_out, idle_in)), true) = (idle, args.wants(Scenario::Memory)) {
        for (i, (name, idle)) in [("outbound", idle_out), ("inbound", idle_in)]
            .into_iter()
            .enumerate()
        {
            report.memory.push(MemoryRow {
                sidecar: name.to_owned(),
                idle_mib: idle.rss as f64 / MIB,
                idle_anon_mib: idle.anon as f64 / MIB,
                peak_saturation_mib: peak.map(|(o, n)| [o, n][i] as f64 / MIB),
            });
        }
    }
    if args.wants(Scenario::Memory) {
        // Peers' pairs stay up between the scenarios: stop them so their
        // descriptors and memory are not the idle pairs' concern.
        setup.peers.clear();
        report.idle = idle_rows(args, &setup, dir, &mut report.peers).await;
    }

    if args.wants(Scenario::Startup) {
        if let (Some(ca), Some(stepmesh)) = (&setup.ca, &setup.sidecars) {
            eprintln!("  startup");
            let up = Upstreams {
                http: setup.backend.http,
                echo: setup.backend.echo,
                l4: setup.backend.l4,
            };
            let mut times: Vec<Duration> = [&setup.pair, &setup.pair_no_resumption]
                .into_iter()
                .flatten()
                .flat_map(|p| p.ready)
                .collect();
            times.extend(mesh::startup_times(stepmesh, ca, dir, up, args.rounds.max(5)).await?);
            let samples_ms: Vec<f64> = times.iter().map(|t| t.as_secs_f64() * 1e3).collect();
            report.startup = Some(StartupRow {
                median_ms: median(&samples_ms),
                max_ms: samples_ms.iter().copied().fold(0.0, f64::max),
                samples_ms,
            });
        }
    }
    setup.check_alive()?;
    Ok(report)
}

async fn start(args: &Args, dir: &std::path::Path) -> anyhow::Result<Setup> {
    let backend = backend::spawn(args.payload, dir).await?;
    let mut setup = Setup {
        backend,
        ca: None,
        pair: None,
        pair_no_resumption: None,
        stepmesh: None,
        sidecars: None,
        peers: vec![],
    };
    if [Scenario::Latency, Scenario::Throughput, Scenario::Connrate]
        .iter()
        .any(|s| args.wants(*s))
    {
        for peer in args.peers() {
            let pair = peer
                .start(args.envoy.as_deref(), dir, "main", setup.backend.http)
                .await?;
            setup.peers.extend(pair);
        }
    }
    if !args.needs_mesh() {
        return Ok(setup);
    }
    let stepmesh = match &args.stepmesh {
        Some(path) => path.clone(),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/stepmesh"),
    };
    anyhow::ensure!(
        stepmesh.exists(),
        "{} does not exist: build it with `cargo build --release -j2`, pass --stepmesh PATH, or measure --paths direct",
        stepmesh.display()
    );
    eprintln!("starting the CA and the sidecars ({})", stepmesh.display());
    let startups = args.rounds.max(5);
    let labels = identity_labels(args.rounds);
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    let ca = Ca::start(&stepmesh, dir, &mesh::identities(&labels, startups)).await?;
    let up = Upstreams {
        http: setup.backend.http,
        echo: setup.backend.echo,
        l4: setup.backend.l4,
    };
    let words = |s: &Option<String>| {
        s.as_deref()
            .unwrap_or("")
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    let (program, subcommand) = match (&args.stepmesh_proxy, args.sidecar_subcommand) {
        (_, true) => (stepmesh.clone(), Some("proxy")),
        (Some(path), false) => (path.clone(), None),
        (None, false) => (stepmesh.with_file_name("stepmesh-proxy"), None),
    };
    anyhow::ensure!(
        program.exists(),
        "{} does not exist: build it with `cargo build --release -j2`, pass --stepmesh-proxy PATH, or run `stepmesh proxy` with --sidecar-subcommand",
        program.display()
    );
    let sidecars = SidecarCmd {
        program,
        subcommand,
        wrap: words(&args.sidecar_wrap),
        extra: words(&args.sidecar_args),
    };
    eprintln!("sidecars: {}", sidecars.command_line());
    setup.pair = Some(Pair::start(&sidecars, &ca, dir, "main", up, true).await?);
    if args.wants(Scenario::Connrate) && args.paths.contains(&Path::L4) {
        setup.pair_no_resumption =
            Some(Pair::start(&sidecars, &ca, dir, "no-resumption", up, false).await?);
    }
    setup.ca = Some(ca);
    setup.stepmesh = Some(stepmesh);
    setup.sidecars = Some(sidecars);
    Ok(setup)
}

/// A new-connections row: its label and, for stepmesh, whether sessions
/// resume.
type ConnKey = (String, Option<bool>);

/// One path the new-connections scenario measures.
struct ConnCase<'a> {
    label: String,
    target: Target,
    procs: Option<(&'a Proc, &'a Proc)>,
    /// Whether stepmesh's sidecars may resume TLS sessions (None: not
    /// stepmesh's sidecars).
    resumption: Option<bool>,
}

/// stepmesh's paths (the L4 path also without session resumption), then
/// every peer pair, each with its own client-side pool of upstream
/// connections as configured for the other scenarios.
fn connrate_cases<'a>(args: &Args, setup: &'a Setup) -> anyhow::Result<Vec<ConnCase<'a>>> {
    let mut cases = vec![];
    for m in setup.measured(args)? {
        let resumption = m.stepmesh.then_some(true);
        let l4 = m.stepmesh && m.target.opaque;
        cases.push(ConnCase {
            label: m.label,
            target: m.target,
            procs: m.procs,
            resumption,
        });
        if let (true, Some(pair)) = (l4, &setup.pair_no_resumption) {
            cases.push(ConnCase {
                label: Path::L4.to_string(),
                target: Target {
                    addr: pair.l4,
                    opaque: true,
                },
                procs: Some((&pair.outbound, &pair.inbound)),
                resumption: Some(false),
            });
        }
    }
    Ok(cases)
}
