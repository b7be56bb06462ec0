#!/usr/bin/env bash
# Regenerates link/proxy-startup.order: the functions a sidecar runs from
# start to idle (SVID from a CA, policy, listeners, kubelet's probes, a
# metrics scrape), recorded with valgrind's callgrind, as mangled names,
# one a line. See link/README.md.
#
#   cargo build --release --bin stepmesh --bin stepmesh-proxy
#   link/generate.sh [BIN_DIR [OUT]]     # target/release, link/proxy-startup.order
#
# Needs valgrind, curl and a free 127.0.0.1:29100-29109.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
BIN_DIR=$(cd "${1:-$REPO/target/release}" && pwd)
PROXY=$(realpath "$BIN_DIR/stepmesh-proxy")
OUT=$(realpath -m "${2:-$REPO/link/proxy-startup.order}")
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
cd "$WORK"

ready() { # ADDR: wait up to 120 s for /ready (valgrind is slow)
  for _ in $(seq 600); do curl -sf "http://$1/ready" >/dev/null && return 0; sleep 0.2; done
  echo "generate.sh: $1 never ready" >&2; return 1
}

printf 'trustDomain: order.local\nmode: enforce\ninbound:\n  default: deny\n  ports:\n    - port: 9000\n      protocol: tcp\n      allow:\n        - from: [spiffe://order.local/ns/default/sa/a]\n' >policy.yaml
printf 'tok-1 spiffe://order.local/ns/default/sa/a\ntok-2 spiffe://order.local/ns/default/sa/a\n' >tokens
"$BIN_DIR/stepmesh" ca serve --trust-domain order.local --listen 127.0.0.1:29100 \
  --admin 127.0.0.1:29101 --state-dir ca --join-tokens tokens 2>ca.log &
ready 127.0.0.1:29101

# One run as the injector starts the sidecar (JSON logs, transparent
# ports), one as the benchmarks do (plain logs, an explicit listener).
run() { # N ENV... -- FLAGS...
  local n=$1; shift
  printf 'tok-%s' "$n" >"token-$n"
  env "$@" valgrind --tool=callgrind --demangle=no --dump-instr=no \
    --callgrind-out-file="cg-$n" "$PROXY" --workers 1 --trust-domain order.local \
    --ca 127.0.0.1:29100 --ca-bundle ca/bundle.pem --token-file "token-$n" \
    --policy policy.yaml --admin "127.0.0.1:2910$((n + 1))" "${FLAGS[@]}" 2>"proxy-$n.log" &
  local pid=$!
  ready "127.0.0.1:2910$((n + 1))"
  for _ in 1 2 3 4 5; do
    curl -sf "http://127.0.0.1:2910$((n + 1))/healthz" >/dev/null
    curl -sf "http://127.0.0.1:2910$((n + 1))/metrics" >/dev/null
    sleep 2
  done
  kill -INT "$pid"
  wait "$pid" || true
}
FLAGS=(--transparent --inbound-port 29105 --outbound-port 29106)
run 1 STEPMESH_LOG_FORMAT=json
FLAGS=(--inbound 127.0.0.1:29107=127.0.0.1:9000)
run 2 STEPMESH_LOG_FORMAT=plain

# callgrind names an object once (`ob=(id) path`) and a function once
# (`fn=(id) name`, or first as a callee, `cfn=`); every `fn=` under our
# binary's `ob=` ran. Kept: the names the binary defines in .text.
nm --defined-only "$PROXY" | awk '$2 ~ /^[tTwW]$/ {print $3}' | sort -u >defined
awk -v bin="$PROXY" '
  /^c?ob=\(/ { id = $1; sub(/^c?ob=/, "", id); if (NF > 1) ob[id] = $2
               if ($1 ~ /^ob=/) cur = ob[id]; next }
  /^c?fn=\(/ { id = $1; sub(/^c?fn=/, "", id); if (NF > 1) fn[id] = $2
               if ($1 ~ /^fn=/ && cur == bin) print fn[id] }
' cg-1 cg-2 | sort -u | comm -12 - defined >"$OUT"
echo "generate.sh: $(wc -l <"$OUT") functions, $OUT"
