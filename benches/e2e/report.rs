//! The results: what is kept per round, the medians, and their rendering as
//! markdown tables (the JSON is the same structs through serde).

use std::fmt::Write as _;

use serde::Serialize;

use crate::args::Path;
use crate::oha::OhaRun;

/// Everything one run measured.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// The machine the figures come from.
    pub machine: Machine,
    /// The command line of the run.
    pub command: String,
    /// The stepmesh binary measured (None: direct path only).
    pub stepmesh: Option<String>,
    /// The sidecars' command: `stepmesh-proxy` (what the injector runs) or
    /// `stepmesh proxy`.
    pub sidecar: Option<String>,
    /// The settings in force.
    pub settings: serde_json::Value,
    /// Fixed-rate latency per path.
    pub latency: Vec<LatencyRow>,
    /// Saturation throughput per path.
    pub throughput: Vec<ThroughputRow>,
    /// New connection per request, per path and resumption setting.
    pub connrate: Vec<ConnRow>,
    /// Bulk TCP throughput per path.
    pub bulk: Vec<BulkRow>,
    /// Sidecar memory.
    pub memory: Vec<MemoryRow>,
    /// The idle-connections scenario, per pair (stepmesh's ports, peers).
    pub idle: Vec<IdleRow>,
    /// The peer proxies measured, with their version lines.
    pub peers: Vec<String>,
    /// Sidecar start to `/ready`.
    pub startup: Option<StartupRow>,
    /// The oha cross-check per path.
    pub oha: Vec<OhaRow>,
    /// Why a scenario was skipped.
    pub notes: Vec<String>,
}

/// The oha cross-check of one path (medians over rounds).
#[derive(Debug, Serialize)]
pub struct OhaRow {
    /// The path.
    pub path: Path,
    /// At the fixed rate, each round.
    pub rounds_fixed_rate: Vec<OhaRun>,
    /// Closed loop, each round.
    pub rounds_saturation: Vec<OhaRun>,
    /// Per field, the median fixed-rate round.
    pub fixed_rate: OhaRun,
    /// Median requests/s closed loop.
    pub saturation_rps: f64,
    /// p50 / direct p50.
    pub p50_vs_direct: Option<f64>,
    /// p99 / direct p99.
    pub p99_vs_direct: Option<f64>,
    /// saturation rps / direct.
    pub rps_vs_direct: Option<f64>,
}

/// Per field, the median of oha runs.
pub fn median_oha(runs: &[OhaRun]) -> OhaRun {
    let m = |f: fn(&OhaRun) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
    OhaRun {
        p50_us: m(|r| r.p50_us),
        p90_us: m(|r| r.p90_us),
        p99_us: m(|r| r.p99_us),
        p999_us: m(|r| r.p999_us),
        rps: m(|r| r.rps),
        success_rate: m(|r| r.success_rate),
    }
}

/// nproc, CPU model and memory, from /proc.
#[derive(Debug, Default, Serialize)]
pub struct Machine {
    /// Online CPUs.
    pub cpus: usize,
    /// /proc/cpuinfo "model name".
    pub cpu_model: String,
    /// MemTotal in MiB.
    pub memory_mib: u64,
    /// Load average when the run started.
    pub loadavg_at_start: String,
}

impl Machine {
    /// Reads the machine description.
    pub fn read() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .map(|r| r.trim_start_matches([' ', '\t', ':']).to_owned())
            })
            .unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_mib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kib| kib / 1024);
        Machine {
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            memory_mib,
            loadavg_at_start: std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .trim()
                .to_owned(),
        }
    }
}

/// Latency percentiles of one run, in microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Slowest request.
    pub max_us: f64,
    /// Requests completed per second.
    pub achieved_rate: f64,
    /// Failed requests.
    pub errors: u64,
    /// Median delay from the due instant to the hand-off to the connection
    /// (the generator's floor on an idle path), µs.
    pub dispatch_p50_us: f64,
}

/// Fixed-rate latency of one path: every round and the median round.
#[derive(Debug, Serialize)]
pub struct LatencyRow {
    /// The path (stepmesh's, or a peer pair's).
    pub path: String,
    /// Each round.
    pub rounds: Vec<Percentiles>,
    /// Per field, the median over rounds.
    pub median: Percentiles,
    /// median p50 / direct median p50 (sidecar paths).
    pub p50_vs_direct: Option<f64>,
    /// median p99 / direct median p99 (sidecar paths).
    pub p99_vs_direct: Option<f64>,
}

/// Saturation throughput of one path.
#[derive(Debug, Serialize)]
pub struct ThroughputRow {
    /// The path (stepmesh's, or a peer pair's).
    pub path: String,
    /// Requests per second, each round.
    pub rounds_rps: Vec<f64>,
    /// Median requests per second.
    pub rps: f64,
    /// rps / direct rps.
    pub vs_direct: Option<f64>,
    /// Median CPU µs per request of the outbound sidecar.
    pub cpu_us_per_req_outbound: Option<f64>,
    /// Median CPU µs per request of the inbound sidecar.
    pub cpu_us_per_req_inbound: Option<f64>,
    /// Median CPU µs per request of the backend.
    pub cpu_us_per_req_backend: f64,
    /// Failed requests, all rounds.
    pub errors: u64,
}

/// New-connection rate of one path.
#[derive(Debug, Serialize)]
pub struct ConnRow {
    /// The path: direct, one of stepmesh's, or a peer pair.
    pub label: String,
    /// Whether stepmesh's sidecars may resume TLS sessions (None: direct,
    /// or a peer pair).
    pub resumption: Option<bool>,
    /// Connections (requests) per second, each round.
    pub rounds_cps: Vec<f64>,
    /// Median connections per second.
    pub cps: f64,
    /// Median CPU µs per connection of the outbound sidecar.
    pub cpu_us_per_conn_outbound: Option<f64>,
    /// Median CPU µs per connection of the inbound sidecar.
    pub cpu_us_per_conn_inbound: Option<f64>,
    /// Failed connections, all rounds.
    pub errors: u64,
}

/// Bulk throughput of one path.
#[derive(Debug, Serialize)]
pub struct BulkRow {
    /// The path.
    pub path: Path,
    /// MiB/s each round (bytes sent one way / time to the last echoed byte).
    pub rounds_mib_s: Vec<f64>,
    /// Median MiB/s.
    pub mib_s: f64,
}

/// Memory of one sidecar, in MiB.
#[derive(Debug, Serialize)]
pub struct MemoryRow {
    /// "outbound" or "inbound".
    pub sidecar: String,
    /// RSS right after `/ready`, before any traffic.
    pub idle_mib: f64,
    /// Its private part (RssAnon).
    pub idle_anon_mib: f64,
    /// Peak RSS (VmHWM) after the first saturation run.
    pub peak_saturation_mib: Option<f64>,
}

/// The idle-connections scenario on one pair.
#[derive(Debug, Serialize)]
pub struct IdleRow {
    /// The pair: "stepmesh, L4 port", "nginx", ...
    pub pair: String,
    /// Each round that completed.
    pub rounds: Vec<crate::idle::Round>,
    /// Per field, the median round.
    pub median: Option<crate::idle::Round>,
    /// Why a round failed (descriptor exhaustion, a proxy that died).
    pub failure: Option<String>,
}

/// Sidecar start to `/ready`, with an SVID from the local CA.
#[derive(Debug, Serialize)]
pub struct StartupRow {
    /// Each sample in milliseconds.
    pub samples_ms: Vec<f64>,
    /// Median.
    pub median_ms: f64,
    /// Slowest.
    pub max_ms: f64,
}

/// The median of `values` (0 for none).
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// Per field, the median over rounds.
pub fn median_percentiles(rounds: &[Percentiles]) -> Percentiles {
    let m = |f: fn(&Percentiles) -> f64| median(&rounds.iter().map(f).collect::<Vec<_>>());
    Percentiles {
        p50_us: m(|p| p.p50_us),
        p90_us: m(|p| p.p90_us),
        p99_us: m(|p| p.p99_us),
        p999_us: m(|p| p.p999_us),
        max_us: m(|p| p.max_us),
        achieved_rate: m(|p| p.achieved_rate),
        errors: rounds.iter().map(|p| p.errors).sum(),
        dispatch_p50_us: m(|p| p.dispatch_p50_us),
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "–".to_owned(), |x| format!("{x:.digits$}"))
}

impl Report {
    /// The tables, in markdown.
    pub fn markdown(&self, rounds: usize) -> String {
        let mut md = String::new();
        // Writing to a String cannot fail: the results of write! are ignored.
        let m = &self.machine;
        let _ = writeln!(
            md,
            "Machine: {} CPUs, {}, {} MiB; load at start {}\n",
            m.cpus, m.cpu_model, m.memory_mib, m.loadavg_at_start
        );
        let _ = writeln!(
            md,
            "Median of {rounds} round(s). Command: `{}`\n",
            self.command
        );
        if !self.latency.is_empty() {
            let s = &self.settings;
            let _ = writeln!(
                md,
                "Latency at {} req/s over {} keep-alive connections, {} s measured (µs, from each request's intended send time)\n",
                s["rate"], s["connections"], s["duration_s"]
            );
            md.push_str("| path | p50 | p90 | p99 | p99.9 | max | p50 × direct | p99 × direct | achieved req/s | errors | dispatch p50 |\n");
            md.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
            for r in &self.latency {
                let p = &r.median;
                let _ = writeln!(
                    md,
                    "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {:.0} | {} | {:.0} |",
                    r.path,
                    p.p50_us,
                    p.p90_us,
                    p.p99_us,
                    p.p999_us,
                    p.max_us,
                    opt(r.p50_vs_direct, 2),
                    opt(r.p99_vs_direct, 2),
                    p.achieved_rate,
                    p.errors,
                    p.dispatch_p50_us
                );
            }
            md.push('\n');
        }
        if !self.throughput.is_empty() {
            let _ = writeln!(
                md,
                "Saturation, closed loop over {} keep-alive connections\n",
                self.settings["sat_connections"]
            );
            md.push_str("| path | req/s | × direct | CPU µs/req outbound | CPU µs/req inbound | CPU µs/req backend | errors |\n");
            md.push_str("|---|---:|---:|---:|---:|---:|---:|\n");
            for r in &self.throughput {
                let _ = writeln!(
                    md,
                    "| {} | {:.0} | {} | {} | {} | {:.1} | {} |",
                    r.path,
                    r.rps,
                    opt(r.vs_direct, 2),
                    opt(r.cpu_us_per_req_outbound, 1),
                    opt(r.cpu_us_per_req_inbound, 1),
                    r.cpu_us_per_req_backend,
                    r.errors
                );
            }
            md.push('\n');
        }
        if !self.connrate.is_empty() {
            let _ = writeln!(
                md,
                "A new client connection per request, {} in flight\n",
                self.settings["conn_concurrency"]
            );
            md.push_str("| path | session resumption | conn/s | CPU µs/conn outbound | CPU µs/conn inbound | errors |\n");
            md.push_str("|---|---|---:|---:|---:|---:|\n");
            for r in &self.connrate {
                let resumption = match r.resumption {
                    None => "–",
                    Some(true) => "yes",
                    Some(false) => "no",
                };
                let _ = writeln!(
                    md,
                    "| {} | {resumption} | {:.0} | {} | {} | {} |",
                    r.label,
                    r.cps,
                    opt(r.cpu_us_per_conn_outbound, 0),
                    opt(r.cpu_us_per_conn_inbound, 0),
                    r.errors
                );
            }
            md.push('\n');
        }
        if !self.bulk.is_empty() {
            let _ = writeln!(
                md,
                "Bulk TCP, {} MiB through an echo backend, one connection\n",
                self.settings["bulk_mib"]
            );
            md.push_str("| path | MiB/s |\n|---|---:|\n");
            for r in &self.bulk {
                let _ = writeln!(md, "| {} | {:.0} |", r.path, r.mib_s);
            }
            md.push('\n');
        }
        if !self.memory.is_empty() {
            let _ = writeln!(md, "Sidecar memory (RSS, MiB)\n");
            let _ = writeln!(
                md,
                "| sidecar | idle | idle, RssAnon | peak after saturation ({} conns) |",
                self.settings["sat_connections"]
            );
            md.push_str("|---|---:|---:|---:|\n");
            for r in &self.memory {
                let _ = writeln!(
                    md,
                    "| {} | {:.1} | {:.1} | {} |",
                    r.sidecar,
                    r.idle_mib,
                    r.idle_anon_mib,
                    opt(r.peak_saturation_mib, 1)
                );
            }
            md.push('\n');
        }
        if !self.idle.is_empty() {
            self.idle_markdown(&mut md);
        }
        if !self.oha.is_empty() {
            let s = &self.settings;
            let _ = writeln!(
                md,
                "Cross-check with oha: {} req/s over {} connections (latency-corrected, µs), and closed loop over {} connections\n",
                s["rate"], s["connections"], s["sat_connections"]
            );
            md.push_str("| path | p50 | p90 | p99 | p99.9 | p50 × direct | p99 × direct | saturation req/s | × direct |\n");
            md.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
            for r in &self.oha {
                let f = &r.fixed_rate;
                let _ = writeln!(
                    md,
                    "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {:.0} | {} |",
                    r.path,
                    f.p50_us,
                    f.p90_us,
                    f.p99_us,
                    f.p999_us,
                    opt(r.p50_vs_direct, 2),
                    opt(r.p99_vs_direct, 2),
                    r.saturation_rps,
                    opt(r.rps_vs_direct, 2)
                );
            }
            md.push('\n');
        }
        for peer in &self.peers {
            let _ = writeln!(md, "Peer: {peer}\n");
        }
        for note in &self.notes {
            let _ = writeln!(md, "Note: {note}\n");
        }
        if let Some(s) = &self.startup {
            let _ = writeln!(
                md,
                "Sidecar start to /ready (SVID from the local CA included): median {:.1} ms, max {:.1} ms over {} starts\n",
                s.median_ms,
                s.max_ms,
                s.samples_ms.len()
            );
        }
        md
    }
}

impl Report {
    fn idle_markdown(&self, md: &mut String) {
        let _ = writeln!(
            md,
            "Idle keep-alive connections (one request each), a fresh pair per round: RSS in MiB \
             before / holding / {} s after the client closed them (RssAnon, the private part, in \
             brackets), KiB of RSS per connection, descriptors before / holding / after\n",
            self.settings["close_wait_s"]
        );
        md.push_str("| pair | conns | outbound RSS | KiB/conn | inbound RSS | KiB/conn | outbound fds | inbound fds | open s |\n");
        md.push_str("|---|---:|---|---:|---|---:|---|---|---:|\n");
        let rss = |s: &crate::idle::Side| {
            format!(
                "{:.1} / {:.1} / {:.1} ({:.1} / {:.1} / {:.1})",
                s.rss_before_mib,
                s.rss_holding_mib,
                s.rss_after_close_mib,
                s.anon_mib[0],
                s.anon_mib[1],
                s.anon_mib[2]
            )
        };
        let fds = |s: &crate::idle::Side| {
            format!(
                "{} / {} / {}",
                s.fds_before, s.fds_holding, s.fds_after_close
            )
        };
        for row in &self.idle {
            if let Some(r) = &row.median {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {:.1} | {} | {:.1} | {} | {} | {:.1} |",
                    row.pair,
                    r.conns,
                    rss(&r.outbound),
                    r.outbound.kib_per_conn,
                    rss(&r.inbound),
                    r.inbound.kib_per_conn,
                    fds(&r.outbound),
                    fds(&r.inbound),
                    r.open_s
                );
            }
            if let Some(failure) = &row.failure {
                // The first line says what failed; the logs are in the JSON.
                let one_line = failure.lines().next().unwrap_or_default();
                let _ = writeln!(md, "| {} | FAILED: {one_line} |||||||| ", row.pair);
            }
        }
        md.push('\n');
    }
}
