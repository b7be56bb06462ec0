#!/usr/bin/env bash
# Fuzz smoke test: builds every cargo-fuzz target and runs each one briefly
# from its committed seeds (fuzz/seeds/<target>) plus whatever the working
# corpus (fuzz/corpus/<target>, not committed) already holds. Fails if any
# target does not build or any run crashes (a panic, a failed property
# assertion, a timeout or an out-of-memory).
#
#   bash fuzz/smoke.sh            # every target, FUZZ_SECONDS (15) each
#   bash fuzz/smoke.sh jwt h1_head
#
# Sanitizer "none": the code under test forbids `unsafe` (workspace lint
# unsafe_code = deny), so AddressSanitizer would only slow the runs down;
# panics and the targets' property assertions are what find bugs here.
# See docs/FUZZING.md.
set -euo pipefail
cd "$(dirname "$0")"

seconds=${FUZZ_SECONDS:-15}
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
# cargo-fuzz is made for nightly. With sanitizer "none" it needs no
# nightly-only flag, so where no nightly toolchain can be had (a fresh
# machine that reaches package registries only) the stable toolchain builds
# the same targets, told to accept unstable options (RUSTC_BOOTSTRAP=1).
cargo=(cargo +nightly)
if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "no nightly toolchain: building with $(cargo --version) and RUSTC_BOOTSTRAP=1"
    cargo=(cargo)
    export RUSTC_BOOTSTRAP=1
fi

targets=("$@")
if ((${#targets[@]} == 0)); then
    mapfile -t targets < <("${cargo[@]}" fuzz list)
fi

echo "== building ${#targets[@]} fuzz targets"
"${cargo[@]}" fuzz build -O -s none

mkdir -p logs
failed=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    if [ -d "seeds/$t" ]; then
        cp -n seeds/"$t"/* "corpus/$t/" 2>/dev/null || true
    fi
    echo "== $t (${seconds}s)"
    if "${cargo[@]}" fuzz run -O -s none "$t" "corpus/$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"logs/smoke-$t.log" 2>&1; then
        grep -E '^(Done|#[0-9]+.*DONE)|stat::number_of_executed_units' "logs/smoke-$t.log" | tail -2 || true
    else
        echo "!! $t failed; last lines of fuzz/logs/smoke-$t.log:"
        tail -40 "logs/smoke-$t.log"
        failed+=("$t")
    fi
done

if ((${#failed[@]})); then
    echo "fuzz smoke FAILED: ${failed[*]} (crash inputs in fuzz/artifacts/<target>/)"
    exit 1
fi
echo "fuzz smoke passed: ${#targets[@]} targets, ${seconds}s each"
