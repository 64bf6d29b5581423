# Shared by the proxy benchmark, its PGO training load and scripts/build-pgo: Debian packages,
# loopback ports, and the two NGINX upstreams. Source it; the helpers that start processes
# expect WORK (a scratch directory) and PIDS (an array of processes to stop at exit).

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

# wait_port PORT: until something listens on it; otherwise the scratch logs, and exit.
wait_port() {
  for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done
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
