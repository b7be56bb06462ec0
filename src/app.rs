//! Wiring: turns a parsed command line into a running part.

use anyhow::Context;

use crate::cli::{Cli, Command};

/// Runs the chosen subcommand to completion.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Proxy(args) => {
            let runtime = crate::proxy::runtime(&args)?;
            runtime.block_on(crate::proxy::run(*args))
        }
        Command::Ca(cmd) => multi_thread()?.block_on(crate::ca_cmd::run(cmd)),
        Command::Init(args) => crate::init::run(args),
        Command::Inject(args) => multi_thread()?.block_on(crate::inject::run(args)),
        Command::Policy(cmd) => multi_thread()?.block_on(crate::policy::run(cmd)),
        Command::Cert(cmd) => crate::cert_cmd::run(cmd),
        Command::Demo(args) => multi_thread()?.block_on(crate::demo::run(args)),
    }
}

fn multi_thread() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}
