//! `stepmesh-proxy`: the sidecar alone, the binary the injector runs. The
//! flags of `stepmesh proxy`; `main` names nothing but the data plane, so
//! fat LTO and the linker drop the CA, gateway, injector, controllers and
//! tools, and a pod maps less code at idle (docs/BENCHMARKS.md, "Idle
//! RSS").

use std::process::ExitCode;

use clap::Parser;

/// The same allocator as `stepmesh` (src/main.rs says why): a sidecar must
/// give back the memory of a burst of connections once they close.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = match stepmesh::cli::ProxyCli::try_parse() {
        Ok(cli) => cli,
        // As `stepmesh`: --help and --version 0, any other refusal one line and 64.
        Err(err) => return stepmesh::exit::command_line(&err),
    };
    stepmesh::telemetry::init(cli.log_format);
    stepmesh::exit::finish(stepmesh::app::run_proxy(cli.proxy))
}
