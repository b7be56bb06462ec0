//! The `stepmesh` binary, every part of the mesh: parse arguments, set up
//! logging, hand over. The sidecar alone is also `stepmesh-proxy`
//! (src/bin/stepmesh-proxy.rs).

use std::process::ExitCode;

use clap::Parser;

/// jemalloc, with its background purging thread and serving C's malloc too
/// (Cargo.toml), instead of glibc's malloc: a sidecar must give back the
/// memory of a burst of connections once they close. Measured with the e2e
/// bench's idle scenario (9,000 keep-alive connections held, then closed;
/// RSS 30 s later, L4 port, outbound sidecar; a fresh one holds 13.7 MiB
/// with glibc, 15.9 with jemalloc;
/// docs/BENCHMARKS.md, "Issue 14", has every figure): glibc 110 MiB (nothing
/// given back; with M_TRIM_THRESHOLD and M_MMAP_THRESHOLD at 128 KiB and
/// M_ARENA_MAX 2 the same), mimalloc 83 MiB, jemalloc for Rust's
/// allocations only 28.7 MiB, jemalloc for all of them 18.7 MiB; the same
/// 11.0 to 11.1 KiB per held connection, about 1 MiB more private memory
/// at idle, and no CPU or latency difference the machine's noise did not
/// cover. Its thread caches keep objects up to 4 KiB only (set at build
/// time in .cargo/config.toml, with the measurements that chose it), and
/// a runtime thread that parks flushes its cache (src/alloc.rs).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = match stepmesh::cli::Cli::try_parse() {
        Ok(cli) => cli,
        // --help, --version: 0; anything else on the command line: one
        // line and 64, like every other configuration error.
        Err(err) => return stepmesh::exit::command_line(&err),
    };
    stepmesh::telemetry::init(cli.log_format);
    // 64 for a configuration error, 1 for a failed run (src/exit.rs).
    stepmesh::exit::finish(stepmesh::app::run(cli))
}
