#!/usr/bin/env bash
# Proxy benchmark: the same 30/70 sticky split done by ficus, NGINX and HAProxy, side by side,
# against the same two upstreams (NGINX serving a fixed small response), plus the floor
# (wrk straight to an upstream) and the cost of a 1,000-route table against 10 routes.
#
#   tests/bench/proxy.sh                 # defaults: 64 connections, 10 s per contender
#   CONNS=128 DURATION=30s tests/bench/proxy.sh
#
# Prints a table and writes tests/bench/results/proxy.json. Figures, not a test: nothing fails
# on a slow result.
set -euo pipefail
cd "$(dirname "$0")/../.."

CONNS=${CONNS:-64}
DURATION=${DURATION:-10s}
WORKERS=${WORKERS:-1}          # worker threads/processes of every proxy
WRK_THREADS=${WRK_THREADS:-1}
USERS=${USERS:-100000}         # distinct x-user values

install() {
  local missing=()
  for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p"); done
  if ((${#missing[@]})); then
    local sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    DEBIAN_FRONTEND=noninteractive $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}
scripts/install-deps
install nginx haproxy wrk
cargo build --release -j2 --bin ficus >&2
FICUS=target/release/ficus

WORK=$(mktemp -d)
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done
  echo "nothing listens on $1; logs:" >&2; tail -n 20 "$WORK"/*.err "$WORK"/*.log >&2 2>/dev/null; exit 1
}

UP_A=$(free_port); UP_B=$(free_port)
# The upstreams: one NGINX, two ports, a fixed 2-byte body, keep-alive, no logs.
cat > "$WORK/upstream.conf" <<CONF
worker_processes 1;
daemon off;
pid $WORK/upstream.pid;
error_log $WORK/upstream.err;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$UP_A; location / { return 200 "a"; } }
  server { listen 127.0.0.1:$UP_B; location / { return 200 "b"; } }
}
CONF
nginx -c "$WORK/upstream.conf" & PIDS+=($!)
wait_port "$UP_A"; wait_port "$UP_B"

cat > "$WORK/load.lua" <<'LUA'
math.randomseed(42)
request = function()
  wrk.headers["x-user"] = "u" .. math.random(1, tonumber(os.getenv("USERS") or "100000"))
  return wrk.format("GET", "/")
end
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %.0f %.0f %.0f %d\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9),
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.status + summary.errors.timeout))
end
LUA

# run NAME PORT: prints "name rps p50 p99 p999 errors" (latencies in microseconds).
run() {
  local name=$1 port=$2
  wrk -t"$WRK_THREADS" -c"$CONNS" -d"$DURATION" --latency -s "$WORK/load.lua" "http://127.0.0.1:$port/" > "$WORK/$name.wrk" 2>&1 || true
  local line; line=$(grep '^RESULT' "$WORK/$name.wrk" || true)
  [ -n "$line" ] || { echo "wrk failed for $name:" >&2; cat "$WORK/$name.wrk" >&2; exit 1; }
  read -r _ requests duration_us p50 p99 p999 errors <<<"$line"
  local rps; rps=$(python3 -c "print(round($requests / ($duration_us / 1e6)))")
  echo "$name $rps $p50 $p99 $p999 $errors"
}

routes_file() { # routes_file N: N-1 non-matching routes (prefix and regex), then the split
  local n=$1 file="$WORK/routes-$1.toml"
  {
    echo "[backends.a]"; echo "url = \"http://127.0.0.1:$UP_A\""
    echo "[backends.b]"; echo "url = \"http://127.0.0.1:$UP_B\""
    echo "[defaults]"; echo "backend = \"a\""; echo "sticky = \"header:x-user\""
    for i in $(seq 1 $((n - 1))); do
      echo "[[routes]]"; echo "name = \"r$i\""
      if ((i % 2)); then echo "match = { path_prefix = \"/svc$i/api\" }"; else echo "match = { path_regex = \"^/legacy$i/[0-9]+/items\$\" }"; fi
      echo "to = \"b\""; echo "percent = 50"
    done
    echo "[[routes]]"; echo "name = \"split\""; echo "match = { path_prefix = \"/\" }"
    echo "to = \"b\""; echo "percent = 30"; echo "from = \"a\""
  } > "$file"
  echo "$file"
}

start_ficus() { # start_ficus ROUTES PORT
  local admin; admin=$(free_port)
  RUST_LOG=warn "$FICUS" proxy --routes "$1" --listen "127.0.0.1:$2" --admin "127.0.0.1:$admin" --threads "$WORKERS" > "$WORK/ficus.log" 2>&1 &
  FICUS_PID=$!; PIDS+=("$FICUS_PID"); wait_port "$2"
}

results=()
results+=("$(run direct "$UP_A")")

FICUS_PORT=$(free_port)
start_ficus "$(routes_file 10)" "$FICUS_PORT"
results+=("$(run ficus "$FICUS_PORT")")
FICUS_RSS_KIB=$(awk '/VmHWM/ {print $2}' "/proc/$FICUS_PID/status")
kill "$FICUS_PID"; wait "$FICUS_PID" 2>/dev/null || true

NGINX_PORT=$(free_port)
cat > "$WORK/proxy.conf" <<CONF
worker_processes $WORKERS;
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
    listen 127.0.0.1:$NGINX_PORT;
    location / { proxy_pass http://\$pool; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
CONF
nginx -c "$WORK/proxy.conf" & NGINX_PID=$!; PIDS+=("$NGINX_PID"); wait_port "$NGINX_PORT"
results+=("$(run nginx "$NGINX_PORT")")
kill "$NGINX_PID"; wait "$NGINX_PID" 2>/dev/null || true

HAPROXY_PORT=$(free_port)
cat > "$WORK/haproxy.cfg" <<CONF
global
  nbthread $WORKERS
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend fe
  bind 127.0.0.1:$HAPROXY_PORT
  default_backend split
backend split
  # Sticky by header, 30/70 by weight.
  balance hdr(x-user)
  hash-type map-based
  server a 127.0.0.1:$UP_A weight 70
  server b 127.0.0.1:$UP_B weight 30
CONF
haproxy -f "$WORK/haproxy.cfg" -db > "$WORK/haproxy.log" 2>&1 & HAPROXY_PID=$!; PIDS+=("$HAPROXY_PID"); wait_port "$HAPROXY_PORT"
results+=("$(run haproxy "$HAPROXY_PORT")")
kill "$HAPROXY_PID"; wait "$HAPROXY_PID" 2>/dev/null || true

# Route-table cost: the same split behind 1,000 routes (prefix and regex) instead of 10.
start_ficus "$(routes_file 1000)" "$FICUS_PORT"
results+=("$(run ficus-1000-routes "$FICUS_PORT")")
kill "$FICUS_PID"; wait "$FICUS_PID" 2>/dev/null || true

mkdir -p tests/bench/results
python3 - "$CONNS" "$DURATION" "$WORKERS" "$WRK_THREADS" "$USERS" "$FICUS_RSS_KIB" "${results[@]}" <<'PY'
import json, os, subprocess, sys
conns, duration, workers, wrk_threads, users, rss = sys.argv[1:7]
rows = [r.split() for r in sys.argv[7:]]
data = {r[0]: {"rps": int(r[1]), "p50_us": int(r[2]), "p99_us": int(r[3]), "p999_us": int(r[4]), "errors": int(r[5])} for r in rows}
def version(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True, shell=True)
    return (out.stdout + out.stderr).strip().splitlines()[0]
meta = {
    "cores": os.cpu_count(),
    "versions": {"ficus": version("target/release/ficus --version"), "nginx": version("nginx -v"),
                 "haproxy": version("haproxy -v"), "wrk": version("wrk -v 2>&1 | head -1")},
    "settings": {"connections": int(conns), "duration": duration, "proxy_workers": int(workers),
                 "wrk_threads": int(wrk_threads), "distinct_users": int(users), "split": "30/70 sticky by x-user"},
    "ficus_peak_rss_mib": round(int(rss) / 1024, 1),
}
print(f"\ncores {meta['cores']}; {conns} connections, {duration} each; {workers} proxy worker(s); {users} distinct users")
print(f"{'contender':<20}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'p99.9 ms':>10}{'errors':>8}")
for name, r in data.items():
    print(f"{name:<20}{r['rps']:>10}{r['p50_us']/1000:>9.2f}{r['p99_us']/1000:>9.2f}{r['p999_us']/1000:>10.2f}{r['errors']:>8}")
f = data["ficus"]
ratios = {"ficus/nginx": f["rps"] / data["nginx"]["rps"], "ficus/haproxy": f["rps"] / data["haproxy"]["rps"],
          "1000 routes / 10 routes": data["ficus-1000-routes"]["rps"] / f["rps"]}
for k, v in ratios.items():
    print(f"{k:<24}{v:.3f}")
print(f"ficus peak RSS {meta['ficus_peak_rss_mib']} MiB")
json.dump({**meta, "results": data, "ratios": ratios}, open("tests/bench/results/proxy.json", "w"), indent=2)
print("wrote tests/bench/results/proxy.json")
PY
