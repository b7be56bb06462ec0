//! Wiring: turns a parsed command line into a running part. Errors come
//! back to `main`, which exits 64 for configuration errors (marked with
//! [`crate::exit`]) and 1 for failed runs.

use anyhow::Context;

use crate::cli::{Cli, Command};
use crate::exit::ConfigResult as _;

/// Runs the chosen subcommand to completion.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    keep_memory_private()?;
    match cli.command {
        Command::Proxy(args) => run_proxy(*args),
        Command::Ca(cmd) => multi_thread()?.block_on(crate::ca_cmd::run(cmd)),
        Command::Init(args) => crate::init::run(args),
        Command::Inject(args) => multi_thread()?.block_on(crate::inject::run(args)),
        Command::Gateway(cmd) => multi_thread()?.block_on(crate::gateway::run(cmd)),
        // Findings exit 1; an unreadable or invalid file 64 (marked inside).
        Command::Policy(crate::policy_cmd::PolicyCommand::Lint(args)) => {
            crate::policy_cmd::lint(&args)
        }
        // The policy and cert tools only read the files and flags they are
        // given: whatever fails is that input (exit 64).
        Command::Policy(cmd) => multi_thread()?
            .block_on(crate::policy_cmd::run(cmd))
            .config_err(),
        Command::Netpol(cmd) => multi_thread()?.block_on(crate::netsync::run(cmd)),
        Command::Cert(cmd) => crate::cert_cmd::run(cmd).config_err(),
        // Its own current-thread runtime; configuration errors exit 64.
        Command::Login(args) => crate::login::run(*args),
        Command::Demo(args) => multi_thread()?.block_on(crate::demo::run(args)),
    }
}

/// Runs the sidecar on the runtime its `--workers` asks for: `stepmesh
/// proxy` and the sidecar-only `stepmesh-proxy` alike.
pub fn run_proxy(args: crate::proxy::ProxyArgs) -> anyhow::Result<()> {
    keep_memory_private()?;
    let runtime = crate::proxy::runtime(&args)?;
    runtime.block_on(async {
        tokio::spawn(crate::alloc::tick());
        crate::proxy::run(args).await
    })
}

/// Makes the process not dumpable (`PR_SET_DUMPABLE` 0), before any key
/// is made or read: no core file holds an SVID, CA or serving key, and
/// another process running as the same UID cannot read this one's memory
/// (`/proc/PID/mem`), nor its environment, descriptors or maps, without
/// `CAP_SYS_PTRACE`. Another container of a pod that shares its process
/// namespace, running as the sidecar's UID (an app container that was
/// root and called `setuid`: SECURITY.md), would otherwise read the
/// sidecar's private key. Every subcommand, the tools too: they read keys
/// and tokens as well. A child (`iptables`) is dumpable again after its
/// `exec`: the kernel resets the flag.
fn keep_memory_private() -> anyhow::Result<()> {
    use rustix::process::{set_dumpable_behavior, DumpableBehavior};
    set_dumpable_behavior(DumpableBehavior::NotDumpable)
        .context("making the process not dumpable (prctl PR_SET_DUMPABLE)")
}

fn multi_thread() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}
