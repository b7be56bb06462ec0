//! End-to-end benchmark of the stepmesh data plane: real `stepmesh ca serve`
//! and `stepmesh proxy` processes of the release build, real SVIDs, and a
//! load generator measuring the direct path and the sidecar path in one run.
//! `cargo bench --bench e2e -- --help` lists the flags; benches/README.md
//! says how to read the output.

mod args;
mod backend;
mod idle;
mod load;
mod mesh;
mod oha;
mod peers;
mod procs;
mod report;
mod run;

use anyhow::Context;
use clap::Parser;

fn main() -> anyhow::Result<()> {
    let args = args::Args::parse();
    if args.serve_backend {
        return backend::serve(args.payload);
    }
    let dir = tempfile::Builder::new()
        .prefix("stepmesh-bench-")
        .tempdir()
        .context("creating a temp dir")?;
    // The load generator is one thread, as a client of the sidecar would be;
    // the pacer of the latency scenario has a thread of its own.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(run::run(&args, dir.path()));
    if args.keep_logs {
        eprintln!("logs kept in {}", dir.keep().display());
    }
    let report = report?;
    println!("{}", report.markdown(args.rounds));
    let json = args.json.clone().unwrap_or_else(|| {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-e2e.json")
    });
    std::fs::write(&json, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", json.display()))?;
    eprintln!("JSON written to {}", json.display());
    Ok(())
}
