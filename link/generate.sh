#!/usr/bin/env bash
# Regenerates link/proxy-startup.order: the functions a sidecar runs from
# start to idle (SVID from a CA, policy, listeners, kubelet's probes, a
# metrics scrape) and for its first requests (a pair of sidecars carrying
# an HTTP request and an opaque TCP connection), recorded with valgrind's
# callgrind, as mangled names, one a line. See link/README.md.
#
#   cargo build --release --bin stepmesh --bin stepmesh-proxy
#   link/generate.sh [BIN_DIR [OUT]]     # target/release, link/proxy-startup.order
#
# Needs valgrind, curl, python3 (the backend) and a free 127.0.0.1:29100-29119.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
BIN_DIR=$(cd "${1:-$REPO/target/release}" && pwd)
PROXY=$(realpath "$BIN_DIR/stepmesh-proxy")
OUT=$(realpath -m "${2:-$REPO/link/proxy-startup.order}")
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
cd "$WORK"

# Probes as the kubelet sends them (a Go client without keep-alive:
# `Connection: close`, which the admin server's hyper parses apart).
probe() { curl -sf -H 'Connection: close' -A kube-probe/1.34 "$@"; }
ready() { # ADDR: wait up to 120 s for /ready (valgrind is slow)
  for _ in $(seq 600); do probe "http://$1/ready" >/dev/null && return 0; sleep 0.2; done
  echo "generate.sh: $1 never ready" >&2; return 1
}

A=spiffe://order.local/ns/default/sa/a
rule() { printf '    - port: %s\n      protocol: %s\n      allow:\n        - from: [%s]\n' "$@"; }
{
  printf 'trustDomain: order.local\nmode: enforce\ninbound:\n  default: deny\n  ports:\n'
  rule 9000 tcp $A; rule 29113 http $A; rule 29114 tcp $A
} >policy.yaml
# Where the injector mounts it: a path of 32 characters or more is
# logged through other code than a short one (core's char count).
mkdir -p etc/stepmesh/policy && cp policy.yaml etc/stepmesh/policy/policy.yaml
POLICY=$WORK/etc/stepmesh/policy/policy.yaml
printf 'tok-%s %s\n' 1 $A 2 $A 3 $A 4 $A >tokens
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
    --policy "$POLICY" --admin "127.0.0.1:2910$((n + 1))" "${FLAGS[@]}" >"proxy-$n.out" 2>"proxy-$n.log" &
  local pid=$!
  ready "127.0.0.1:2910$((n + 1))"
  for _ in 1 2 3 4 5; do
    probe "http://127.0.0.1:2910$((n + 1))/healthz" >/dev/null
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

# A pair, as the e2e bench runs it: outbound (4) -> mTLS -> inbound (3) ->
# an HTTP backend; one HTTP request, one opaque TCP connection (a first
# byte no HTTP request starts with).
python3 -m http.server 29112 --bind 127.0.0.1 >/dev/null 2>&1 &
start() { # N FLAGS...: a sidecar under callgrind, admin 127.0.0.1:2910(N+1)
  local n=$1; shift
  printf 'tok-%s' "$n" >"token-$n"
  valgrind --tool=callgrind --demangle=no --dump-instr=no --callgrind-out-file="cg-$n" \
    "$PROXY" --workers 1 --trust-domain order.local --ca 127.0.0.1:29100 \
    --ca-bundle ca/bundle.pem --token-file "token-$n" --policy "$POLICY" \
    --admin "127.0.0.1:2910$((n + 1))" "$@" >"proxy-$n.out" 2>"proxy-$n.log" &
  PIDS+=($!)
  ready "127.0.0.1:2910$((n + 1))"
}
PIDS=()
start 3 --inbound 127.0.0.1:29113=127.0.0.1:29112 --inbound 127.0.0.1:29114=127.0.0.1:29112
start 4 --outbound "127.0.0.1:29115=127.0.0.1:29113@$A" --outbound "127.0.0.1:29116=127.0.0.1:29114@$A"
# Up to here is start-up: dumped apart (cg-N.1), the rest (cg-N) is traffic.
for pid in "${PIDS[@]}"; do callgrind_control --dump "$pid" >/dev/null; done
for _ in 1 2 3; do
  curl -sf -o /dev/null http://127.0.0.1:29115/ || echo "generate.sh: HTTP through the pair failed" >&2
  (exec 3<>/dev/tcp/127.0.0.1/29116 && printf '\0GET / HTTP/1.0\r\n\r\n' >&3 && timeout 5 cat <&3 >/dev/null) ||
    echo "generate.sh: TCP through the pair failed" >&2
done
kill -INT "${PIDS[@]}"
wait "${PIDS[@]}" || true

# callgrind names an object once (`ob=(id) path`) and a function once
# (`fn=(id) name`, or first as a callee, `cfn=`); every `fn=` under our
# binary's `ob=` ran. Kept: the names the binary defines in .text.
# A function callgrind has no name for is named by its address
# (`0x0000000000554bd0`: crtbegin's frame_dummy, ML-KEM's AVX2 assembly);
# it is looked up in the symbol table (every name at that address).
nm --defined-only "$PROXY" | awk '$2 ~ /^[tTwW]$/ {print $3}' | sort -u >defined
nm --defined-only "$PROXY" | awk '$2 ~ /^[tTwW]$/ {print "0x" $1, $3}' >addresses
ran() { # FILE...: the functions of the binary that ran
  awk -v bin="$PROXY" '
    /^c?ob=\(/ { id = $1; sub(/^c?ob=/, "", id); if (NF > 1) ob[id] = $2
                 if ($1 ~ /^ob=/) cur = ob[id]; next }
    /^c?fn=\(/ { id = $1; sub(/^c?fn=/, "", id); if (NF > 1) fn[id] = $2
                 if ($1 ~ /^fn=/ && cur == bin) print fn[id] }
  ' "$@" | awk 'NR == FNR { at[$1] = at[$1] (at[$1] == "" ? "" : "\n") $2; next }
               /^0x/ && ($0 in at) { print at[$0]; next } { print }' addresses - |
    sort -u | comm -12 - defined
}
# Start-up first (what every idle sidecar maps), then what only traffic
# runs (what a sidecar maps once it has carried requests).
#
# Added: what runs natively at start-up but not under valgrind, whose
# emulated CPU lacks BMI2/ADX, SHA-NI and AVX-512, so aws-lc's dispatch
# picks other code there: x25519 (not its `_alt`), SHA-256 with SHA-NI,
# all of ML-KEM's AVX2 assembly (30 KiB; valgrind runs part of it); and
# `_start`, which callgrind calls "(below main)". Each is a small assembly
# file; the AVX-512 AES-GCM code an idle sidecar also runs is one 700 KiB
# section and stays where it is.
native='_start|aws_lc_[0-9_]+_(curve25519_x25519(base)?(_byte)?|sha256_block_data_order_hw|mlkem_[a-z0-9_]+_avx2_asm)'
{ ran cg-1 cg-2 cg-3.1 cg-4.1; grep -xE "$native" defined; } | sort -u >startup
ran cg-3 cg-4 | comm -23 - startup >traffic
cat startup traffic >"$OUT"
echo "generate.sh: $(wc -l <startup) start-up and $(wc -l <traffic) traffic functions, $OUT"
