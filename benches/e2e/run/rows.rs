//! The rounds of the latency, throughput, connection-rate and oha
//! scenarios folded into the report's rows: the CPU a closed-loop run cost
//! each process, medians across rounds, and ratios to the direct path.
//! Pure arithmetic over what `run` measured; nothing here starts a process.

use std::time::Duration;

use crate::args::Path;
use crate::load;
use crate::oha::OhaRun;
use crate::procs::{self, Proc};
use crate::report::*;

/// A closed-loop run with the CPU each process spent on it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Sat {
    pub(super) rate: f64,
    pub(super) errors: u64,
    pub(super) outbound_us: Option<f64>,
    pub(super) inbound_us: Option<f64>,
    pub(super) backend_us: f64,
}

pub(super) async fn measure_cpu(
    backend: &Proc,
    pair: Option<(&Proc, &Proc)>,
    run: impl std::future::Future<Output = anyhow::Result<load::Count>>,
) -> anyhow::Result<Sat> {
    let cpu = |p: Option<&Proc>| p.map(procs::cpu).transpose();
    let before = (
        cpu(pair.map(|p| p.0))?,
        cpu(pair.map(|p| p.1))?,
        procs::cpu(backend)?,
    );
    let count = run.await?;
    let after = (
        cpu(pair.map(|p| p.0))?,
        cpu(pair.map(|p| p.1))?,
        procs::cpu(backend)?,
    );
    let per_op = |b: Duration, a: Duration| (a - b).as_secs_f64() * 1e6 / count.ok.max(1) as f64;
    Ok(Sat {
        rate: count.rate(),
        errors: count.errors,
        outbound_us: before.0.zip(after.0).map(|(b, a)| per_op(b, a)),
        inbound_us: before.1.zip(after.1).map(|(b, a)| per_op(b, a)),
        backend_us: per_op(before.2, after.2),
    })
}

pub(super) fn median_sat(rounds: &[Sat]) -> Sat {
    let m = |f: fn(&Sat) -> Option<f64>| {
        let v: Vec<f64> = rounds.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| median(&v))
    };
    Sat {
        rate: median(&rounds.iter().map(|s| s.rate).collect::<Vec<_>>()),
        errors: rounds.iter().map(|s| s.errors).sum(),
        outbound_us: m(|s| s.outbound_us),
        inbound_us: m(|s| s.inbound_us),
        backend_us: median(&rounds.iter().map(|s| s.backend_us).collect::<Vec<_>>()),
    }
}

pub(super) fn percentiles(run: &load::Latency) -> Percentiles {
    let us = |q: f64| run.hist.value_at_quantile(q) as f64 / 1e3;
    Percentiles {
        p50_us: us(0.5),
        p90_us: us(0.9),
        p99_us: us(0.99),
        p999_us: us(0.999),
        max_us: run.hist.max() as f64 / 1e3,
        achieved_rate: run.achieved_rate,
        errors: run.errors,
        dispatch_p50_us: run.dispatch.value_at_quantile(0.5) as f64 / 1e3,
    }
}

pub(super) fn push_round<T>(rows: &mut Vec<(String, Vec<T>)>, label: String, round: T) {
    match rows.iter_mut().find(|(l, _)| *l == label) {
        Some((_, rounds)) => rounds.push(round),
        None => rows.push((label, vec![round])),
    }
}

pub(super) fn is_direct(label: &str) -> bool {
    label == Path::Direct.to_string()
}

pub(super) fn latency_rows(latency: Vec<(String, Vec<Percentiles>)>) -> Vec<LatencyRow> {
    let direct = latency
        .iter()
        .find(|(p, r)| is_direct(p) && !r.is_empty())
        .map(|(_, r)| median_percentiles(r));
    latency
        .into_iter()
        .filter(|(_, r)| !r.is_empty())
        .map(|(path, rounds)| {
            let median = median_percentiles(&rounds);
            let on_direct = is_direct(&path);
            let vs = |f: fn(&Percentiles) -> f64| {
                direct
                    .as_ref()
                    .filter(|_| !on_direct)
                    .map(|d| f(&median) / f(d))
            };
            LatencyRow {
                path,
                p50_vs_direct: vs(|p| p.p50_us),
                p99_vs_direct: vs(|p| p.p99_us),
                rounds,
                median,
            }
        })
        .collect()
}

pub(super) fn throughput_rows(throughput: Vec<(String, Vec<Sat>)>) -> Vec<ThroughputRow> {
    let direct = throughput
        .iter()
        .find(|(p, r)| is_direct(p) && !r.is_empty())
        .map(|(_, r)| median_sat(r).rate);
    throughput
        .into_iter()
        .filter(|(_, r)| !r.is_empty())
        .map(|(path, rounds)| {
            let sat = median_sat(&rounds);
            ThroughputRow {
                vs_direct: direct.filter(|_| !is_direct(&path)).map(|d| sat.rate / d),
                path,
                rounds_rps: rounds.iter().map(|s| s.rate).collect(),
                rps: sat.rate,
                cpu_us_per_req_outbound: sat.outbound_us,
                cpu_us_per_req_inbound: sat.inbound_us,
                cpu_us_per_req_backend: sat.backend_us,
                errors: sat.errors,
            }
        })
        .collect()
}

pub(super) fn oha_rows(runs: Vec<(Path, Vec<OhaRun>, Vec<OhaRun>)>) -> Vec<OhaRow> {
    let summarize = |fixed: &[OhaRun], sat: &[OhaRun]| {
        (
            median_oha(fixed),
            median(&sat.iter().map(|r| r.rps).collect::<Vec<_>>()),
        )
    };
    let direct = runs
        .iter()
        .find(|(p, _, _)| *p == Path::Direct)
        .map(|(_, f, s)| summarize(f, s));
    runs.into_iter()
        .map(|(path, rounds_fixed_rate, rounds_saturation)| {
            let (fixed_rate, saturation_rps) = summarize(&rounds_fixed_rate, &rounds_saturation);
            let vs = |f: &dyn Fn(&OhaRun, f64) -> f64| {
                direct
                    .as_ref()
                    .filter(|_| path != Path::Direct)
                    .map(|(d, drps)| f(&fixed_rate, saturation_rps) / f(d, *drps))
            };
            OhaRow {
                path,
                p50_vs_direct: vs(&|r, _| r.p50_us),
                p99_vs_direct: vs(&|r, _| r.p99_us),
                rps_vs_direct: vs(&|_, rps| rps),
                rounds_fixed_rate,
                rounds_saturation,
                fixed_rate,
                saturation_rps,
            }
        })
        .collect()
}
