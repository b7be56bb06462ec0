//! Cross-check with a neutral load generator: `oha` (crates.io), run as a
//! child against the same paths, at the same fixed rate with its latency
//! correction (no coordinated omission), and closed loop for throughput.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;

/// What oha reported for one run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct OhaRun {
    /// Median latency, µs.
    pub p50_us: f64,
    /// 90th percentile, µs.
    pub p90_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// 99.9th percentile, µs.
    pub p999_us: f64,
    /// Requests per second over the run.
    pub rps: f64,
    /// Fraction of requests that succeeded.
    pub success_rate: f64,
}

/// The oha binary: `--oha`, else `oha` on PATH, else ~/.cargo/bin/oha.
pub fn find(flag: Option<&Path>) -> Option<PathBuf> {
    if let Some(path) = flag {
        return Some(path.to_owned());
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("oha"))
        .find(|p| p.is_file());
    on_path.or_else(|| {
        let home = std::env::var_os("HOME")?;
        let cargo = PathBuf::from(home).join(".cargo/bin/oha");
        cargo.is_file().then_some(cargo)
    })
}

/// Runs oha against `addr` for `duration` over `connections` keep-alive
/// connections, at `rate` requests/s if given (else as fast as it can).
pub async fn run(
    oha: &Path,
    addr: SocketAddr,
    duration: Duration,
    connections: usize,
    rate: Option<u64>,
) -> anyhow::Result<OhaRun> {
    let mut cmd = Command::new(oha);
    cmd.arg("-z")
        .arg(format!("{}ms", duration.as_millis()))
        .arg("-c")
        .arg(connections.to_string())
        .args(["--no-tui", "--output-format", "json"])
        .arg(format!("http://{addr}/"));
    if let Some(rate) = rate {
        cmd.arg("-q")
            .arg(rate.to_string())
            .arg("--latency-correction");
    }
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await?
        .context("running oha")?;
    if !out.status.success() {
        bail!(
            "oha failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let json: Value = serde_json::from_slice(&out.stdout).context("oha's JSON output")?;
    let pct = |key: &str| json["latencyPercentiles"][key].as_f64().unwrap_or(f64::NAN) * 1e6;
    Ok(OhaRun {
        p50_us: pct("p50"),
        p90_us: pct("p90"),
        p99_us: pct("p99"),
        p999_us: pct("p99.9"),
        rps: json["summary"]["requestsPerSec"]
            .as_f64()
            .unwrap_or(f64::NAN),
        success_rate: json["summary"]["successRate"].as_f64().unwrap_or(f64::NAN),
    })
}
