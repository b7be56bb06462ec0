//! The one `stepmesh` binary: parse arguments, set up logging, hand over.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = match stepmesh::cli::Cli::try_parse() {
        Ok(cli) => cli,
        // --help, --version: 0; anything else on the command line: one
        // line and 64, like every other configuration error.
        Err(err) => return stepmesh::exit::command_line(&err),
    };
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
