#!/usr/bin/env bash
# Proxy benchmark: the same 30/70 sticky split done by ficus, NGINX and HAProxy, side by side,
# against the same two upstreams (NGINX serving a fixed small response), plus two floors
# (wrk straight to an upstream; Pingora doing the split and nothing else), the cost of a
# 1,000-route table against 10 routes, the cost of shadowing every request (ficus-shadow: each
# request also sent to the other upstream and the answers compared), the cost of the access log
# (ficus-log: ficus with its default logging, lines written to a file), and each proxy's CPU
# time per request.
#
#   tests/bench/proxy.sh                 # defaults: 64 connections, median of 3 runs of 10 s
#   CONNS=128 DURATION=30s ROUNDS=5 tests/bench/proxy.sh
#   WORKERS=auto WRK_THREADS=2 tests/bench/proxy.sh   # every proxy with its own defaults
#   CONTENDERS="ficus nginx" tests/bench/proxy.sh     # a subset
#   PGO=0 tests/bench/proxy.sh           # ficus as a plain release build
#   FICUS=path/to/ficus tests/bench/proxy.sh          # a ficus built already
#
# ficus is measured as it is released: built with profile-guided optimisation
# (scripts/build-pgo, which takes about twice a release build's time). Pingora alone
# (pingora-floor) is a plain release build.
#
# WORKERS=auto starts every proxy as its documentation suggests for the machine: ficus with no
# --threads, NGINX with `worker_processes auto`, HAProxy with no nbthread.
#
# Prints a table and writes tests/bench/results/proxy.json (proxy-N-workers.json with
# WORKERS=N other than 1). Figures, not a test: nothing fails
# on a slow result.
set -euo pipefail
cd "$(dirname "$0")/../.."

CONNS=${CONNS:-64}
DURATION=${DURATION:-10s}
WORKERS=${WORKERS:-1}          # worker threads/processes of every proxy
WRK_THREADS=${WRK_THREADS:-1}
export ROUNDS=${ROUNDS:-3}     # measured runs per contender; the median is reported
USERS=${USERS:-100000}         # distinct x-user values

source tests/bench/lib.sh
scripts/install-deps
install nginx haproxy wrk
cargo build --release -j2 -p ficus-proxy --example pingora_floor >&2
if [ -n "${FICUS:-}" ]; then
  FICUS_BUILD=${FICUS_BUILD:-given}   # say how it was built: pgo, release
elif [ "${PGO:-1}" = 1 ]; then
  FICUS=$(scripts/build-pgo); FICUS_BUILD=pgo
else
  cargo build --release -j2 --bin ficus >&2
  FICUS=target/release/ficus; FICUS_BUILD=release
fi
export FICUS FICUS_BUILD

scratch
start_upstreams

split_load_script

# cpu_ticks "PID...": user and system clock ticks the processes have used so far (all threads).
cpu_ticks() { local pid u=0 s=0; for pid in $1; do read -r u s < <(awk -v u=$u -v s=$s '{print u + $14, s + $15}' "/proc/$pid/stat"); done; echo "$u $s"; }

# run_once NAME PORT ["PID..."]: prints "name rps p50 p99 p999 errors user_us sys_us"
# (latencies, and the CPU time the PIDs spent per request, in microseconds; 0 without PIDs).
run_once() {
  local name=$1 port=$2 pid=${3:-} u0 s0 u1 s1
  read -r u0 s0 < <(cpu_ticks "$pid")
  wrk -t"$WRK_THREADS" -c"$CONNS" -d"$DURATION" --latency -s "$WORK/load.lua" "http://127.0.0.1:$port/" > "$WORK/$name.wrk" 2>&1 || true
  read -r u1 s1 < <(cpu_ticks "$pid")
  local line; line=$(grep '^RESULT' "$WORK/$name.wrk" || true)
  [ -n "$line" ] || { echo "wrk failed for $name:" >&2; cat "$WORK/$name.wrk" >&2; exit 1; }
  read -r _ requests duration_us p50 p99 p999 errors <<<"$line"
  local rps cpu
  rps=$(python3 -c "print(round($requests / ($duration_us / 1e6)))")
  cpu=$(python3 -c "t = 1e6 / $(getconf CLK_TCK) / $requests; print(f'{($u1 - $u0) * t:.2f} {($s1 - $s0) * t:.2f}')")
  echo "$name $rps $p50 $p99 $p999 $errors $cpu"
}

# warm_up PORT: 2 s of load first (upstream connections, caches), not measured.
warm_up() { wrk -t"$WRK_THREADS" -c"$CONNS" -d2s -s "$WORK/load.lua" "http://127.0.0.1:$1/" > /dev/null 2>&1 || true; }


start_ficus() { # start_ficus ROUTES PORT [log]: sets FICUS_PID; with "log", the access log is on
  local admin threads=() level=warn; admin=$(free_port)
  [ "$WORKERS" = auto ] || threads=(--threads "$WORKERS")
  [ "${3:-}" = log ] && level=info   # ficus's default: an access-log line per request
  RUST_LOG=$level "$FICUS" proxy --routes "$1" --listen "127.0.0.1:$2" --admin "127.0.0.1:$admin" "${threads[@]}" > "$WORK/ficus-$2.log" 2>&1 &
  FICUS_PID=$!; PIDS+=("$FICUS_PID"); wait_port "$2"
}

# Every contender is started up front and sits idle until its turn; the rounds interleave
# the contenders, so that a slow spell of the machine does not fall on one of them only.
declare -A PORT PID
PORT[direct]=$UP_A; PID[direct]=""

PORT[ficus]=$(free_port)
start_ficus "$(routes_file 10)" "${PORT[ficus]}"; PID[ficus]=$FICUS_PID

# Shadow cost: the same table with the split shadowed at 100%. The upstreams answer "a" and
# "b", so every comparison is a mismatch, the costlier outcome.
# Access-log cost: the same table with ficus's default logging, one line per request to a file.
PORT[ficus-log]=$(free_port)
start_ficus "$(routes_file 10)" "${PORT[ficus-log]}" log; PID[ficus-log]=$FICUS_PID

PORT[ficus-shadow]=$(free_port)
start_ficus "$(routes_file 10 shadow)" "${PORT[ficus-shadow]}"; PID[ficus-shadow]=$FICUS_PID

# Route-table cost: the same split behind 1,000 routes (prefix and regex) instead of 10.
PORT[ficus-1000-routes]=$(free_port)
start_ficus "$(routes_file 1000)" "${PORT[ficus-1000-routes]}"; PID[ficus-1000-routes]=$FICUS_PID

PORT[nginx]=$(free_port)
cat > "$WORK/proxy.conf" <<CONF
worker_processes $WORKERS;  # "auto": one per core
daemon off;
pid $WORK/proxy.pid;
error_log $WORK/proxy.err;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  split_clients "\${http_x_user}" \$pool { 30% b; * a; }
  upstream a { server 127.0.0.1:$UP_A; keepalive 128; }
  upstream b { server 127.0.0.1:$UP_B; keepalive 128; }
  server {
    listen 127.0.0.1:${PORT[nginx]};
    location / {
      proxy_pass http://\$pool; proxy_http_version 1.1; proxy_set_header Connection "";
      # What ficus does to every request: keep the client's Host, add X-Forwarded-*.
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto \$scheme;
      proxy_set_header X-Forwarded-Host \$host;
    }
  }
}
CONF
nginx -c "$WORK/proxy.conf" & PIDS+=($!); wait_port "${PORT[nginx]}"
PID[nginx]=$(pgrep -P "$!" | tr '\n' ' ')   # the workers, which do the proxying

PORT[haproxy]=$(free_port)
cat > "$WORK/haproxy.cfg" <<CONF
global
$([ "$WORKERS" = auto ] || echo "  nbthread $WORKERS")
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend fe
  bind 127.0.0.1:${PORT[haproxy]}
  # What ficus does to every request: X-Forwarded-* (HAProxy keeps the Host by default).
  option forwardfor
  http-request set-header X-Forwarded-Proto http
  http-request set-header X-Forwarded-Host %[req.hdr(host)]
  default_backend split
backend split
  # Sticky by header, 30/70 by weight.
  balance hdr(x-user)
  hash-type map-based
  server a 127.0.0.1:$UP_A weight 70
  server b 127.0.0.1:$UP_B weight 30
CONF
haproxy -f "$WORK/haproxy.cfg" -db > "$WORK/haproxy.log" 2>&1 & PID[haproxy]=$!; PIDS+=($!); wait_port "${PORT[haproxy]}"

# The floor of any Pingora proxy: Pingora doing the same split and nothing else
# (proxy/examples/pingora_floor.rs). The gap between it and ficus is what ficus adds.
PORT[pingora-floor]=$(free_port)
floor_threads=$WORKERS; [ "$WORKERS" = auto ] && floor_threads=$(nproc)
target/release/examples/pingora_floor "127.0.0.1:${PORT[pingora-floor]}" "127.0.0.1:$UP_A" "127.0.0.1:$UP_B" 30 x-user "$floor_threads" \
  > "$WORK/floor.log" 2>&1 & PID[pingora-floor]=$!; PIDS+=($!); wait_port "${PORT[pingora-floor]}"

ALL="direct ficus nginx haproxy ficus-log ficus-1000-routes ficus-shadow pingora-floor"
[ "${CONTENDERS:-$ALL}" = "$ALL" ] || export SUBSET=1
read -r -a CONTENDERS <<<"${CONTENDERS:-$ALL}"
for name in "${CONTENDERS[@]}"; do warm_up "${PORT[$name]}"; done
runs=()
for round in $(seq "$ROUNDS"); do
  echo "round $round of $ROUNDS" >&2
  for name in "${CONTENDERS[@]}"; do runs+=("$(run_once "$name" "${PORT[$name]}" "${PID[$name]}")"); done
done
# Per contender, the run with the median req/s.
results=()
for name in "${CONTENDERS[@]}"; do
  results+=("$(printf '%s\n' "${runs[@]}" | awk -v n="$name" '$1 == n' | sort -k2,2n | sed -n "$(((ROUNDS + 1) / 2))p")")
done
FICUS_RSS_KIB=$(awk '/VmHWM/ {print $2}' "/proc/${PID[ficus]}/status")
printf '%s\n' "${runs[@]}" > "$WORK/runs.txt"   # every run, round by round, for the ratios
export RUNS_FILE="$WORK/runs.txt"

mkdir -p tests/bench/results
python3 - "$CONNS" "$DURATION" "$WORKERS" "$WRK_THREADS" "$USERS" "$FICUS_RSS_KIB" "${results[@]}" <<'PY'
import json, os, subprocess, sys
conns, duration, workers, wrk_threads, users, rss = sys.argv[1:7]
rows = [r.split() for r in sys.argv[7:]]
data = {r[0]: {"rps": int(r[1]), "p50_us": int(r[2]), "p99_us": int(r[3]), "p999_us": int(r[4]), "errors": int(r[5]),
              "cpu_user_us_per_req": float(r[6]), "cpu_sys_us_per_req": float(r[7])} for r in rows}
def version(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True, shell=True)
    return (out.stdout + out.stderr).strip().splitlines()[0]
meta = {
    "cores": os.cpu_count(),
    "versions": {"ficus": version(f"{os.environ['FICUS']} --version"), "nginx": version("nginx -v"),
                 "haproxy": version("haproxy -v"), "wrk": version("wrk -v 2>&1 | head -1")},
    "ficus_build": os.environ["FICUS_BUILD"],
    "settings": {"connections": int(conns), "duration": duration, "rounds_median_of": int(os.environ.get("ROUNDS", "3")), "proxy_workers": workers,
                 "wrk_threads": int(wrk_threads), "distinct_users": int(users), "split": "30/70 sticky by x-user"},
    "ficus_peak_rss_mib": round(int(rss) / 1024, 1),
}
print(f"\ncores {meta['cores']}; {conns} connections, {duration} each; {workers} proxy worker(s); {users} distinct users; ficus build: {meta['ficus_build']}")
print(f"{'contender':<20}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'p99.9 ms':>10}{'errors':>8}{'CPU us/req user+sys':>22}")
for name, r in data.items():
    cpu = f"{r['cpu_user_us_per_req']:.1f} + {r['cpu_sys_us_per_req']:.1f}" if r['cpu_user_us_per_req'] or r['cpu_sys_us_per_req'] else "-"
    print(f"{name:<20}{r['rps']:>10}{r['p50_us']/1000:>9.2f}{r['p99_us']/1000:>9.2f}{r['p999_us']/1000:>10.2f}{r['errors']:>8}{cpu:>22}")
pairs = {"ficus/nginx": ("ficus", "nginx"), "ficus/haproxy": ("ficus", "haproxy"),
         "ficus-log/nginx": ("ficus-log", "nginx"), "log on / off": ("ficus-log", "ficus"),
         "1000 routes / 10 routes": ("ficus-1000-routes", "ficus"),
         "shadow 100% / off": ("ficus-shadow", "ficus"), "ficus/pingora-floor": ("ficus", "pingora-floor")}
# Each ratio is the median over rounds of the ratio within a round: contenders measured
# seconds apart share the machine's slow and fast spells, which medians taken apart do not.
runs = [line.split() for line in open(os.environ["RUNS_FILE"]) if line.strip()]
rounds = [{r[0]: int(r[1]) for r in runs[i:i + len(data)]} for i in range(0, len(runs), len(data))]
def paired(a, b):
    values = sorted(r[a] / r[b] for r in rounds)
    return values[len(values) // 2]
ratios = {k: paired(a, b) for k, (a, b) in pairs.items() if a in data and b in data}
for k, v in ratios.items():
    print(f"{k:<24}{v:.3f}")
print(f"ficus peak RSS {meta['ficus_peak_rss_mib']} MiB")
if os.environ.get("SUBSET"):
    sys.exit(0)  # a subset of the contenders: printed, not recorded
out = "tests/bench/results/proxy.json" if workers == "1" else f"tests/bench/results/proxy-{workers}-workers.json"
json.dump({**meta, "results": data, "ratios": ratios, "runs": runs}, open(out, "w"), indent=2)
print(f"wrote {out}")
PY
