#!/usr/bin/env bash
# Long fuzz runs, one target at a time (the machine is shared), niced, each
# until RUNS executions (default 10 million) or MAX_TIME seconds (default
# 1500), whichever comes first. Output goes to fuzz/logs/long-<target>.log;
# the last lines of each say how far it got (`Done N runs in S second(s)`,
# stat::number_of_executed_units, stat::average_exec_per_sec). A crash does
# not stop the others; its input is in fuzz/artifacts/<target>/.
#
#   bash fuzz/long.sh                       # every target
#   RUNS=1000000 bash fuzz/long.sh policy   # some, with another budget
#   CHECKED=1 MAX_TIME=45 bash fuzz/long.sh # with debug assertions and
#       overflow checks (-a; built in fuzz/target/checked, logs
#       long-checked-<target>.log)
#
# Build as smoke.sh does first (cargo +nightly fuzz build -O -s none).
set -uo pipefail
cd "$(dirname "$0")"

runs=${RUNS:-10000000}
max_time=${MAX_TIME:-1500}
build=(-O -s none)
log=long
if [ -n "${CHECKED:-}" ]; then
    build+=(-a --target-dir target/checked)
    log=long-checked
fi
targets=("$@")
if ((${#targets[@]} == 0)); then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
mkdir -p logs
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    if [ -d "seeds/$t" ]; then
        cp -n seeds/"$t"/* "corpus/$t/" 2>/dev/null || true
    fi
    echo "== $t: -runs=$runs -max_total_time=$max_time ($(date -u +%T))"
    nice -n 10 cargo +nightly fuzz run "${build[@]}" "$t" "corpus/$t" -- \
        -runs="$runs" -max_total_time="$max_time" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 >"logs/$log-$t.log" 2>&1
    echo "   exit $? ($(date -u +%T)); corpus $(ls "corpus/$t" | wc -l) files"
    grep -E '^Done|stat::(number_of_executed_units|average_exec_per_sec|new_units_added)' \
        "logs/$log-$t.log" | sed 's/^/   /'
done
