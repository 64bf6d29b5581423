# Shared by the proxy benchmark and profile, the PGO training load and scripts/build-pgo:
# Debian packages, loopback ports, the two NGINX upstreams, the split's route file and load.
# Source it; the helpers that start processes expect WORK (a scratch directory) and PIDS (an
# array of processes to stop at exit).

# install PACKAGE...: installs the Debian packages that are missing, and only those.
install() {
  local missing=()
  for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p"); done
  if ((${#missing[@]})); then
    local sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    DEBIAN_FRONTEND=noninteractive $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# scratch: a scratch directory (WORK) with a routes/ directory of its own (ficus watches its
# route file's directory, and logs written beside it would wake the watcher on every write),
# removed at exit with the processes listed in PIDS.
scratch() {
  WORK=$(mktemp -d)
  mkdir -p "$WORK/routes"
  PIDS=()
  trap 'for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"' EXIT
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_port PORT [SECONDS]: until something listens on it (10 s at most unless told);
# otherwise the scratch logs, and exit.
wait_port() {
  for _ in $(seq $((${2:-10} * 20))); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done
  echo "nothing listens on $1; logs:" >&2; tail -n 20 "$WORK"/*.err "$WORK"/*.log >&2 2>/dev/null; exit 1
}

# start_upstreams: one NGINX on two ports, UP_A answering "a" and UP_B "b" (a fixed 2-byte
# body; /big, 64 KiB), keep-alive, no logs. Sets UP_A and UP_B.
start_upstreams() {
  UP_A=$(free_port); UP_B=$(free_port)
  # NGINX's workers run as an unprivileged user: they must be able to read the file they serve.
  mkdir -p "$WORK/www"; chmod 755 "$WORK" "$WORK/www"
  head -c 65536 /dev/zero | tr '\0' x > "$WORK/www/big"; chmod 644 "$WORK/www/big"
  cat > "$WORK/upstream.conf" <<CONF
worker_processes 1;
daemon off;
pid $WORK/upstream.pid;
error_log $WORK/upstream.err;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$UP_A; location / { return 200 "a"; } location /big { alias $WORK/www/big; } }
  server { listen 127.0.0.1:$UP_B; location / { return 200 "b"; } location /big { alias $WORK/www/big; } }
}
CONF
  nginx -c "$WORK/upstream.conf" & PIDS+=($!)
  wait_port "$UP_A"; wait_port "$UP_B"
}

# split_load_script: $WORK/load.lua, wrk's load for the split: GET / with an x-user header of
# one of USERS (default 100,000) users; at the end a RESULT line (requests, duration, p50, p99,
# p99.9 in microseconds, errors).
split_load_script() {
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
}

# routes_file N [shadow]: a route file of N-1 routes that match nothing (prefix and regex), then
# the split: 30% of the users of UP_A to UP_B, sticky by x-user. Prints its path.
routes_file() {
  local n=$1 file="$WORK/routes/routes-$1${2:+-$2}.toml"
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
    # Every request shadowed and compared; in-flight cap high enough that none is dropped.
    if [ "${2:-}" = shadow ]; then echo "[routes.shadow]"; echo "max_in_flight = 4096"; fi
  } > "$file"
  echo "$file"
}
