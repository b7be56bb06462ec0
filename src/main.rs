//! The one `stepmesh` binary: parse arguments, set up logging, hand over.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = stepmesh::cli::Cli::parse();
    stepmesh::telemetry::init(cli.log_format);
    match stepmesh::app::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line, the whole cause chain: what an operator reads at 3 a.m.
            eprintln!("stepmesh: {err:#}");
            // 64 for a configuration error, 1 for a failed run (src/exit.rs).
            ExitCode::from(stepmesh::exit::code(&err))
        }
    }
}
