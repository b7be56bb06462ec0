//! The gateway bench's results: markdown on stdout, JSON for the record,
//! with the machine and its load average (the machine is shared).

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::client::Proto;
use crate::latency::PathLatency;
use crate::Args;

/// What the machine was doing.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// `model name` of /proc/cpuinfo.
    pub cpu: String,
    /// Logical CPUs.
    pub cpus: usize,
    /// /proc/sys/kernel/osrelease.
    pub kernel: String,
    /// 1, 5 and 15 minute load averages.
    pub loadavg: [f64; 3],
    /// The soft open-file limit this process (and the gateway) has.
    pub open_files: Option<u64>,
}

impl Machine {
    /// Reads /proc now.
    pub fn read() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Machine {
            cpu: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
                .unwrap_or_default(),
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            loadavg: loadavg(),
            open_files: open_files_limit(),
        }
    }
}

/// /proc/loadavg's three averages.
pub fn loadavg() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut v = text
        .split_whitespace()
        .map(|w| w.parse().unwrap_or(f64::NAN));
    [0; 3].map(|_| v.next().unwrap_or(f64::NAN))
}

/// The soft `Max open files` of this process.
pub fn open_files_limit() -> Option<u64> {
    std::fs::read_to_string("/proc/self/limits")
        .ok()?
        .lines()
        .find(|l| l.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

/// Percentiles of one path, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Percentiles {
    /// Requests recorded.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Slowest.
    pub max: f64,
}

impl Percentiles {
    fn of(h: &hdrhistogram::Histogram<u64>) -> Percentiles {
        let ms = |ns: u64| ns as f64 / 1e6;
        Percentiles {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            max: ms(h.max()),
        }
    }

    fn minus(&self, o: &Percentiles) -> Percentiles {
        Percentiles {
            count: self.count,
            p50: self.p50 - o.p50,
            p90: self.p90 - o.p90,
            p99: self.p99 - o.p99,
            max: self.max - o.max,
        }
    }
}

/// One latency round.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyRound {
    /// 1-based.
    pub round: usize,
    /// Load averages before and after the round.
    pub loadavg_before: [f64; 3],
    /// After.
    pub loadavg_after: [f64; 3],
    /// Through the gateway.
    pub gateway: Percentiles,
    /// Straight to the API server.
    pub direct: Percentiles,
    /// gateway − direct, percentile by percentile.
    pub added: Percentiles,
    /// Failed requests per path (gateway, direct).
    pub errors: [u64; 2],
    /// The first failure, if any.
    pub first_error: Option<String>,
    /// The gateway process's CPU (utime + stime) per request it served in
    /// the round, µs: what it costs whatever the machine's load.
    pub gateway_cpu_us_per_req: f64,
}

impl LatencyRound {
    /// From the two paths' results (gateway first).
    pub fn new(
        round: usize,
        loadavg_before: [f64; 3],
        loadavg_after: [f64; 3],
        r: &[PathLatency],
    ) -> LatencyRound {
        let gateway = Percentiles::of(&r[0].hist);
        let direct = Percentiles::of(&r[1].hist);
        LatencyRound {
            round,
            loadavg_before,
            loadavg_after,
            added: gateway.minus(&direct),
            gateway,
            direct,
            errors: [r[0].errors, r[1].errors],
            first_error: r[0].first_error.clone().or(r[1].first_error.clone()),
            gateway_cpu_us_per_req: 0.0,
        }
    }

    /// One line for stderr as the bench goes.
    pub fn summary(&self) -> String {
        format!(
            "latency round {}: gateway p50 {:.3} p99 {:.3} ms, direct p50 {:.3} p99 {:.3} ms, \
             added p50 {:+.3} p99 {:+.3} ms, gateway CPU {:.0} µs/req, errors {:?}, load {:?}",
            self.round,
            self.gateway.p50,
            self.gateway.p99,
            self.direct.p50,
            self.direct.p99,
            self.added.p50,
            self.added.p99,
            self.gateway_cpu_us_per_req,
            self.errors,
            self.loadavg_after
        )
    }
}

/// One watch run.
#[derive(Debug, Clone, Serialize)]
pub struct WatchRun {
    /// h1 (a connection per watch) or h2 (multiplexed).
    pub proto: Proto,
    /// Watches held.
    pub watches: usize,
    /// Client connections to the gateway.
    pub connections: usize,
    /// Gateway VmRSS (KiB) before opening, holding, after closing.
    pub rss_kib: [u64; 3],
    /// Gateway VmHWM (KiB) at the same moments.
    pub hwm_kib: [u64; 3],
    /// Gateway open file descriptors at the same moments.
    pub fds: [usize; 3],
    /// Holding − before, MiB.
    pub added_mib: f64,
    /// Per watch, KiB.
    pub per_watch_kib: f64,
    /// Watches that received the probe's ADDED event.
    pub saw_probe: usize,
    /// From the create request to the last watch seeing it (or the timeout).
    pub probe_ms: f64,
    /// Opening all of them.
    pub open_ms: f64,
}

impl WatchRun {
    /// From three (VmRSS, VmHWM, fds) readings.
    pub fn new(
        proto: Proto,
        watches: usize,
        connections: usize,
        mem: [(u64, u64, usize); 3],
        saw_probe: usize,
        probe: Duration,
        open: Duration,
    ) -> WatchRun {
        let added = mem[1].0.saturating_sub(mem[0].0) as f64;
        WatchRun {
            proto,
            watches,
            connections,
            rss_kib: mem.map(|m| m.0),
            hwm_kib: mem.map(|m| m.1),
            fds: mem.map(|m| m.2),
            added_mib: added / 1024.0,
            per_watch_kib: added / watches.max(1) as f64,
            saw_probe,
            probe_ms: probe.as_secs_f64() * 1e3,
            open_ms: open.as_secs_f64() * 1e3,
        }
    }

    /// One line for stderr as the bench goes.
    pub fn summary(&self) -> String {
        format!(
            "watches {:?}: {} held on {} connections, gateway RSS {} -> {} KiB (+{:.1} MiB, \
             {:.1} KiB/watch), {} after closing; {}/{} saw the probe in {:.0} ms",
            self.proto,
            self.watches,
            self.connections,
            self.rss_kib[0],
            self.rss_kib[1],
            self.added_mib,
            self.per_watch_kib,
            self.rss_kib[2],
            self.saw_probe,
            self.watches,
            self.probe_ms
        )
    }
}

/// Everything one run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The flags.
    pub settings: serde_json::Value,
    /// At the start.
    pub machine: Machine,
    /// At the end.
    pub machine_after: Option<Machine>,
    /// Latency rounds.
    pub latency: Vec<LatencyRound>,
    /// Watch runs.
    pub watches: Vec<WatchRun>,
}

impl Report {
    /// Empty, with the settings and machine.
    pub fn new(args: &Args, machine: Machine) -> Report {
        Report {
            settings: serde_json::json!({
                "rate_per_path": args.rate,
                "duration_s": args.duration,
                "warmup_s": args.warmup,
                "rounds": args.rounds,
                "proto": args.proto,
                "watches": args.watches,
                "streams_per_conn": args.streams_per_conn,
            }),
            machine,
            machine_after: None,
            latency: Vec::new(),
            watches: Vec::new(),
        }
    }

    /// Markdown tables, with the targets of issue 12 checked.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let m = &self.machine;
        let _ = writeln!(
            s,
            "machine: {} × {}, kernel {}, load {:?} at start, {:?} at end; open files {:?}\n",
            m.cpus,
            m.cpu,
            m.kernel,
            m.loadavg,
            self.machine_after.as_ref().map(|m| m.loadavg),
            m.open_files
        );
        if !self.latency.is_empty() {
            let _ = writeln!(
                s,
                "GET latency, {} req/s per path ({}), ms\n",
                self.settings["rate_per_path"], self.settings["proto"]
            );
            s.push_str("| round | path | n | p50 | p90 | p99 | max | errors | load (1 min) |\n");
            s.push_str("|---|---|---|---|---|---|---|---|---|\n");
            for r in &self.latency {
                for (name, p, e) in [
                    ("gateway", &r.gateway, r.errors[0]),
                    ("direct", &r.direct, r.errors[1]),
                ] {
                    let _ = writeln!(
                        s,
                        "| {} | {name} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {e} | {:.2} |",
                        r.round, p.count, p.p50, p.p90, p.p99, p.max, r.loadavg_after[0]
                    );
                }
                let a = &r.added;
                let _ = writeln!(
                    s,
                    "| {} | **added** | | {:+.3} | {:+.3} | {:+.3} | {:+.3} | gateway CPU {:.0} µs/req | |",
                    r.round, a.p50, a.p90, a.p99, a.max, r.gateway_cpu_us_per_req
                );
            }
            let spread = |f: fn(&Percentiles) -> f64| {
                let v: Vec<f64> = self.latency.iter().map(|r| f(&r.added)).collect();
                let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                (lo, hi)
            };
            let (p50_lo, p50_hi) = spread(|p| p.p50);
            let (p99_lo, p99_hi) = spread(|p| p.p99);
            let _ = writeln!(
                s,
                "\nadded p50 {p50_lo:+.3} .. {p50_hi:+.3} ms (target ≤ 1 ms: {}), \
                 added p99 {p99_lo:+.3} .. {p99_hi:+.3} ms (target ≤ 3 ms: {})\n",
                verdict(p50_hi <= 1.0),
                verdict(p99_hi <= 3.0)
            );
            if let Some(e) = self.latency.iter().find_map(|r| r.first_error.as_ref()) {
                let _ = writeln!(s, "first error: {e}\n");
            }
        }
        if !self.watches.is_empty() {
            s.push_str(
                "| watches | proto | connections | RSS before | RSS holding | added | per watch | \
                 RSS after close | fds before/holding/after | saw probe | in |\n",
            );
            s.push_str("|---|---|---|---|---|---|---|---|---|---|---|\n");
            for w in &self.watches {
                let _ = writeln!(
                    s,
                    "| {} | {:?} | {} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} KiB | {:.1} MiB | {}/{}/{} | {}/{} | {:.0} ms |",
                    w.watches,
                    w.proto,
                    w.connections,
                    w.rss_kib[0] as f64 / 1024.0,
                    w.rss_kib[1] as f64 / 1024.0,
                    w.added_mib,
                    w.per_watch_kib,
                    w.rss_kib[2] as f64 / 1024.0,
                    w.fds[0],
                    w.fds[1],
                    w.fds[2],
                    w.saw_probe,
                    w.watches,
                    w.probe_ms
                );
            }
            for w in &self.watches {
                let _ = writeln!(
                    s,
                    "\n{:?}: {} watches cost {:.1} MiB of gateway RSS (target ≤ 64 MiB: {}); every watch alive: {}",
                    w.proto,
                    w.watches,
                    w.added_mib,
                    verdict(w.added_mib <= 64.0),
                    verdict(w.saw_probe == w.watches)
                );
            }
        }
        s
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}
