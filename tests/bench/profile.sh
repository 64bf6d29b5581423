#!/usr/bin/env bash
# Where a proxied request's CPU goes, per request, in the costs a profile of instructions hides:
# ficus (one worker, access log off) under callgrind in front of two NGINX upstreams, the same
# sticky 30/70 split as tests/bench/proxy.sh, driven by wrk. Prints, per proxied request:
#   - instructions executed (callgrind's count; a plain release build is the stable measure,
#     a PGO build moves by a few hundred between builds),
#   - atomic read-modify-write instructions (`lock`-prefixed, and `xchg` with memory): one
#     costs some 20 cycles against a fraction of one for most instructions,
#   - clock readings (`clock_gettime`, which valgrind makes a system call; natively a vDSO
#     read of some 40 ns in a VM),
#   - the functions with the most instructions, inclusive, and the most atomic instructions.
#
#   tests/bench/profile.sh                    # builds target/release/ficus
#   FICUS=path/to/ficus tests/bench/profile.sh
#   SECONDS_MEASURED=30 TOP=40 tests/bench/profile.sh
#   KEEP=/tmp/a.callgrind tests/bench/profile.sh   # also keeps the profile, to compare two builds
#
# Takes about a minute. Figures, not a test.
set -euo pipefail
cd "$(dirname "$0")/../.."
SECONDS_MEASURED=${SECONDS_MEASURED:-15}
export TOP=${TOP:-25}

source tests/bench/lib.sh
install nginx wrk valgrind binutils python3
if [ -z "${FICUS:-}" ]; then
  cargo build --release -j2 --bin ficus >&2
  FICUS=target/release/ficus
fi

scratch
start_upstreams
routes=$(routes_file 1)
split_load_script

port=$(free_port)
# Instrumentation starts after a warm-up (connections open, upstream pool filled).
RUST_LOG=warn valgrind --tool=callgrind --dump-instr=yes --instr-atstart=no \
  --callgrind-out-file="$WORK/callgrind.out" "$FICUS" proxy --routes "$routes" \
  --listen "127.0.0.1:$port" --admin "127.0.0.1:$(free_port)" --threads 1 > "$WORK/ficus.log" 2>&1 &
VALGRIND=$!; PIDS+=("$VALGRIND")
wait_port "$port" 60   # the proxy starts slowly under valgrind
wrk -t1 -c8 -d5s -s "$WORK/load.lua" "http://127.0.0.1:$port/" > /dev/null 2>&1
callgrind_control -i on "$VALGRIND" > /dev/null
wrk -t1 -c8 -d"${SECONDS_MEASURED}s" -s "$WORK/load.lua" "http://127.0.0.1:$port/" > "$WORK/wrk.out" 2>&1
callgrind_control -i off "$VALGRIND" > /dev/null
kill "$VALGRIND"; wait "$VALGRIND" 2>/dev/null || true

requests=$(awk '/requests in/ {print $1}' "$WORK/wrk.out")
if [ -n "${KEEP:-}" ]; then
  cp "$WORK/callgrind.out" "$KEEP"
  echo "$requests" > "$KEEP.requests"
fi
python3 tests/bench/callgrind_costs.py "$WORK/callgrind.out" "$FICUS" "$requests"
