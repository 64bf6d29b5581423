#!/usr/bin/env bash
# The training load of scripts/build-pgo: runs an instrumented ficus (the one argument) as a
# proxy in front of two NGINX upstreams and drives it with wrk, in each of the ways it is run:
# access log on (the default) and off, one and two worker threads; GETs split by a sticky
# header, 64 KiB answers, request bodies with a Content-Length and chunked. Each ficus exits
# gracefully (SIGTERM), which is when its profile is written. Needs nginx and wrk.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
FICUS=$1
SECONDS_EACH=${SECONDS_EACH:-4}

scratch
start_upstreams

cat > "$WORK/routes/routes.toml" <<TOML
[backends.a]
url = "http://127.0.0.1:$UP_A"
[backends.b]
url = "http://127.0.0.1:$UP_B"
[defaults]
backend = "a"
sticky = "header:x-user"
[[routes]]
name = "downloads"
match = { path_prefix = "/big" }
to = "b"
percent = 100
[[routes]]
name = "split"
match = { path_prefix = "/" }
to = "b"
percent = 30
from = "a"
TOML

cat > "$WORK/get.lua" <<'LUA'
math.randomseed(42)
request = function()
  wrk.headers["x-user"] = "u" .. math.random(1, 100000)
  return wrk.format("GET", "/orders/" .. math.random(1, 1000) .. "?page=2")
end
LUA
cat > "$WORK/big.lua" <<'LUA'
request = function() return wrk.format("GET", "/big") end
LUA
cat > "$WORK/post.lua" <<'LUA'
local body = string.rep("{\"item\": 42}", 300)
request = function()
  wrk.headers["Content-Type"] = "application/json"
  return wrk.format("POST", "/orders", nil, body)
end
LUA
cat > "$WORK/chunked.lua" <<'LUA'
local chunk = string.rep("z", 1024)
local req = "POST /upload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
  .. "400\r\n" .. chunk .. "\r\n400\r\n" .. chunk .. "\r\n0\r\n\r\n"
request = function() return req end
LUA

for mode in "info" "warn" "info 1" "warn 1"; do
  read -r level threads <<<"$mode"
  port=$(free_port)
  RUST_LOG=$level "$FICUS" proxy --routes "$WORK/routes/routes.toml" --listen "127.0.0.1:$port" \
    --admin "127.0.0.1:$(free_port)" ${threads:+--threads "$threads"} > "$WORK/ficus.log" 2>&1 &
  pid=$!; wait_port "$port"
  for load in get get big post chunked; do
    wrk -t2 -c32 -d"${SECONDS_EACH}s" -s "$WORK/$load.lua" "http://127.0.0.1:$port/" > "$WORK/$load.wrk" 2>&1
    grep -q "Non-2xx\|Socket errors" "$WORK/$load.wrk" && { echo "pgo-train: $load failed:" >&2; cat "$WORK/$load.wrk" >&2; exit 1; }
    echo "pgo-train: $mode $load $(awk '/Requests\/sec/ {print $2}' "$WORK/$load.wrk") req/s" >&2
  done
  kill -TERM "$pid"
  wait "$pid" || { echo "pgo-train: ficus did not exit cleanly; its profile is incomplete" >&2; exit 1; }
done
