#!/usr/bin/env bash
# CDC benchmark: the same WAL decoded by PostgreSQL's own pg_recvlogical (pgoutput to
# /dev/null, the ceiling), `ficus cdc --stdout` to /dev/null, and `ficus cdc` into a Kafka
# broker with acknowledgements (Tansu, or KAFKA_BROKERS).
#
#   tests/bench/cdc.sh            # 1,000,000 inserts (1,000-row transactions), 500,000 updates,
#                                 # 200,000 deletes, then a pgbench TPC-B-like run
#   ROWS=200000 tests/bench/cdc.sh
#
# Each contender reads its own slot, created before the workload, until it has confirmed the
# WAL position reached by the workload. Prints a table and writes tests/bench/results/cdc.json.
# Figures, not a test.
set -euo pipefail
cd "$(dirname "$0")/../.."

ROWS=${ROWS:-1000000}
UPDATES=${UPDATES:-$((ROWS / 2))}
DELETES=${DELETES:-$((ROWS / 5))}
BIG_TX=${BIG_TX:-2000000}
PGBENCH_SECONDS=${PGBENCH_SECONDS:-20}
LAT_RATE=${LAT_RATE:-5000}       # rows/s of the steady workload, one row per transaction
LAT_SECONDS=${LAT_SECONDS:-20}

scripts/install-deps
scripts/install-tansu
cargo build --release -j2 --bin ficus >&2
FICUS=$PWD/target/release/ficus
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)

WORK=$(mktemp -d)
chmod 755 "$WORK"
PIDS=()
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  as_pg "$BIN/pg_ctl" -D "$WORK/pg/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

PG_PORT=$(free_port)
mkdir -p "$WORK/pg"; [ "$(id -u)" = 0 ] && chown postgres "$WORK/pg"
as_pg "$BIN/initdb" -D "$WORK/pg/data" -A trust -U postgres --no-sync -E UTF8 --locale=C >/dev/null
as_pg "$BIN/pg_ctl" -D "$WORK/pg/data" -l "$WORK/pg/log" -w start -o "-c port=$PG_PORT -c listen_addresses=127.0.0.1 \
  -c unix_socket_directories=$WORK/pg -c wal_level=logical -c max_replication_slots=20 -c max_wal_senders=20 \
  -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_wal_size=8GB -c shared_buffers=512MB" >/dev/null
psql() { command psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d bench -v ON_ERROR_STOP=1 -qAt "$@"; }
command psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -qc "CREATE DATABASE bench"

if [ -n "${KAFKA_BROKERS:-}" ]; then
  BROKERS=$KAFKA_BROKERS
else
  KAFKA_PORT=$(free_port); BROKERS=127.0.0.1:$KAFKA_PORT
  "${CARGO_HOME:-$HOME/.cargo}/bin/tansu" broker --listener-url "tcp://$BROKERS" --advertised-listener-url "tcp://$BROKERS" \
    --storage-engine memory://tansu/ >/dev/null 2>&1 & PIDS+=($!)
fi

cdc_config() { # cdc_config SLOT PREFIX TABLES
  cat <<TOML
[source]
url = "postgres://postgres@127.0.0.1:$PG_PORT/bench"
publication = "bench"
slot = "$1"
tables = [$3]
snapshot = "never"
heartbeat = "1s"
[kafka]
brokers = "$BROKERS"
topic_prefix = "$2"
partitions = 1
replication_factor = 1
TOML
}

# measure NAME SLOT TARGET_LSN CHANGES COMMAND...: runs COMMAND until SLOT has confirmed
# TARGET_LSN, prints "NAME rows/s seconds peak_rss_kib".
measure() {
  local name=$1 slot=$2 target=$3 changes=$4; shift 4
  local start; start=$(date +%s.%N)
  "$@" & local pid=$!
  local peak=0
  while :; do
    local behind; behind=$(psql -c "SELECT pg_wal_lsn_diff('$target', confirmed_flush_lsn) > 0 FROM pg_replication_slots WHERE slot_name = '$slot'")
    local rss; rss=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    ((rss > peak)) && peak=$rss
    [ "$behind" = f ] && break
    kill -0 "$pid" 2>/dev/null || { echo "$name exited early" >&2; exit 1; }
    sleep 0.1
  done
  local end; end=$(date +%s.%N)
  kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true
  python3 -c "d=$end-$start; print('$name', round($changes/d), round(d,2), $peak)"
}

run_contenders() { # run_contenders WORKLOAD CHANGES TABLES: slots already hold the workload
  local workload=$1 changes=$2 tables=$3 target
  target=$(psql -c "SELECT pg_current_wal_lsn()")
  measure "$workload/pg_recvlogical" "${workload}_recv" "$target" "$changes" \
    "$BIN/pg_recvlogical" -h 127.0.0.1 -p "$PG_PORT" -U postgres -d bench --slot "${workload}_recv" --start \
    -o proto_version=1 -o publication_names=bench -f /dev/null -F 1 -s 1
  cdc_config "${workload}_stdout" "$workload" "$tables" > "$WORK/$workload-stdout.toml"
  measure "$workload/ficus-stdout" "${workload}_stdout" "$target" "$changes" \
    sh -c "RUST_LOG=warn exec '$FICUS' cdc --config '$WORK/$workload-stdout.toml' --stdout > /dev/null"
  cdc_config "${workload}_kafka" "$workload" "$tables" > "$WORK/$workload-kafka.toml"
  measure "$workload/ficus-kafka" "${workload}_kafka" "$target" "$changes" \
    sh -c "RUST_LOG=warn exec '$FICUS' cdc --config '$WORK/$workload-kafka.toml'"
}

create_slots() { for s in "$@"; do psql -c "SELECT pg_create_logical_replication_slot('$s', 'pgoutput')" >/dev/null; done; }

results=()
# 1. Mixed-type table: inserts in 1,000-row transactions, then updates, then deletes.
psql -c "CREATE TABLE items (id bigint PRIMARY KEY, name text, qty int, price numeric(10,2), ratio float8,
  active bool, created timestamptz, day date, tags text[], payload jsonb);
  CREATE PUBLICATION bench FOR ALL TABLES WITH (publish_via_partition_root = true)"
create_slots rows_recv rows_stdout rows_kafka
echo "workload: $ROWS inserts, $UPDATES updates, $DELETES deletes" >&2
psql -c "DO \$\$ BEGIN FOR b IN 0..($ROWS/1000 - 1) LOOP
  INSERT INTO items SELECT g, 'item ' || g, g % 100, g * 0.01, g / 7.0, g % 2 = 0, now(), current_date,
    ARRAY['a', 'b'], jsonb_build_object('n', g) FROM generate_series(b * 1000 + 1, b * 1000 + 1000) g;
  COMMIT; END LOOP; END \$\$"
psql -c "DO \$\$ BEGIN FOR b IN 0..($UPDATES/1000 - 1) LOOP
  UPDATE items SET qty = qty + 1 WHERE id BETWEEN b * 1000 + 1 AND b * 1000 + 1000; COMMIT; END LOOP; END \$\$"
psql -c "DO \$\$ BEGIN FOR b IN 0..($DELETES/1000 - 1) LOOP
  DELETE FROM items WHERE id BETWEEN b * 1000 + 1 AND b * 1000 + 1000; COMMIT; END LOOP; END \$\$"
while read -r line; do results+=("$line"); done < <(run_contenders rows $((ROWS + UPDATES + DELETES)) '"public.items"')

# 2. pgbench TPC-B-like: small transactions on several tables.
"$BIN/pgbench" -h 127.0.0.1 -p "$PG_PORT" -U postgres -i -q -s 10 bench >/dev/null 2>&1
create_slots oltp_recv oltp_stdout oltp_kafka
before=$(psql -c "SELECT sum(n_tup_ins + n_tup_upd + n_tup_del) FROM pg_stat_user_tables WHERE relname LIKE 'pgbench%'")
"$BIN/pgbench" -h 127.0.0.1 -p "$PG_PORT" -U postgres -c 4 -j 2 -T "$PGBENCH_SECONDS" bench >/dev/null 2>&1
sleep 1   # statistics are reported asynchronously
after=$(psql -c "SELECT sum(n_tup_ins + n_tup_upd + n_tup_del) FROM pg_stat_user_tables WHERE relname LIKE 'pgbench%'")
tables='"public.pgbench_accounts", "public.pgbench_branches", "public.pgbench_tellers", "public.pgbench_history"'
while read -r line; do results+=("$line"); done < <(run_contenders oltp $((after - before)) "$tables")

# 3. Peak memory through Kafka during one 2,000,000-row transaction.
psql -c "CREATE TABLE big (id bigint PRIMARY KEY, note text)"
create_slots big_kafka
psql -c "INSERT INTO big SELECT g, 'row ' || g FROM generate_series(1, $BIG_TX) g"
target=$(psql -c "SELECT pg_current_wal_lsn()")
cdc_config big_kafka big '"public.big"' > "$WORK/big.toml"
results+=("$(measure big/ficus-kafka big_kafka "$target" "$BIG_TX" sh -c "RUST_LOG=warn exec '$FICUS' cdc --config '$WORK/big.toml'")")

# 4. Commit-to-ack latency at a steady rate: single-row transactions at LAT_RATE/s, with
# ficus already streaming. ficus observes, for every transaction, the time from its commit
# on PostgreSQL to Kafka's acknowledgement of its last event
# (ficus_cdc_commit_to_ack_seconds); the percentiles are read off that histogram.
psql -c "CREATE TABLE steady (id bigserial PRIMARY KEY, note text, at timestamptz DEFAULT now())"
create_slots steady_kafka
METRICS_PORT=$(free_port)
{ cdc_config steady_kafka steady '"public.steady"'; printf '[metrics]\nlisten = "127.0.0.1:%s"\n' "$METRICS_PORT"; } > "$WORK/steady.toml"
RUST_LOG=warn "$FICUS" cdc --config "$WORK/steady.toml" & STEADY_PID=$!; PIDS+=($STEADY_PID)
metrics() { curl -fsS "http://127.0.0.1:$METRICS_PORT/metrics"; }
for _ in $(seq 100); do metrics 2>/dev/null | grep -q '^ficus_cdc_commit_to_ack_seconds_count' && break; sleep 0.1; done
echo "INSERT INTO steady (note) VALUES ('steady');" > "$WORK/steady.sql"
echo "steady: $LAT_RATE single-row transactions/s for $LAT_SECONDS s" >&2
# synchronous_commit=on, PostgreSQL's default: the server runs with it off for the throughput
# workloads, where commits would then wait up to wal_writer_delay (200 ms) before the WAL
# sender may read them, which would be measured here as latency.
PGOPTIONS="-c synchronous_commit=on" \
  "$BIN/pgbench" -h 127.0.0.1 -p "$PG_PORT" -U postgres -n -f "$WORK/steady.sql" -R "$LAT_RATE" -c 4 -j 2 \
  -T "$LAT_SECONDS" bench > "$WORK/steady.pgbench" 2>&1
target=$(psql -c "SELECT pg_current_wal_lsn()")
until [ "$(psql -c "SELECT pg_wal_lsn_diff('$target', confirmed_flush_lsn) <= 0 FROM pg_replication_slots WHERE slot_name = 'steady_kafka'")" = t ]; do
  kill -0 "$STEADY_PID" || { echo "ficus cdc (steady) exited early" >&2; exit 1; }
  sleep 0.1
done
metrics > "$WORK/steady.metrics"
STEADY_TPS=$(awk '/^tps = / {printf "%d", $3}' "$WORK/steady.pgbench")
kill "$STEADY_PID"; wait "$STEADY_PID" 2>/dev/null || true

mkdir -p tests/bench/results
python3 - "$ROWS" "$UPDATES" "$DELETES" "$BIG_TX" "$PGBENCH_SECONDS" "$BROKERS" "$LAT_RATE" "$LAT_SECONDS" \
  "$STEADY_TPS" "$WORK/steady.metrics" "${results[@]}" <<'PY'
import json, os, re, subprocess, sys
rows, updates, deletes, big, seconds, brokers, lat_rate, lat_seconds, steady_tps, steady_metrics = sys.argv[1:11]
data = {}
for line in sys.argv[11:]:
    name, rps, secs, rss = line.split()
    data[name] = {"rows_per_s": int(rps), "seconds": float(secs), "peak_rss_mib": round(int(rss) / 1024, 1)}
def version(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True, shell=True)
    return (out.stdout + out.stderr).strip().splitlines()[0]
meta = {"cores": os.cpu_count(),
        "versions": {"ficus": version("target/release/ficus --version"),
                     "postgresql": version("ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1 | xargs -I{} {}/postgres --version"),
                     "tansu": version("${CARGO_HOME:-$HOME/.cargo}/bin/tansu --version") if "KAFKA" not in os.environ else brokers},
        "settings": {"inserts": int(rows), "updates": int(updates), "deletes": int(deletes), "transaction_rows": 1000,
                     "pgbench": f"scale 10, 4 clients, {seconds} s", "big_transaction_rows": int(big), "brokers": brokers}}
print(f"\ncores {meta['cores']}; rows/s until each reader confirmed the workload's last WAL position")
# Percentiles from the cumulative histogram, interpolated linearly inside a bucket as
# Prometheus' histogram_quantile does.
buckets, count = [], 0
for line in open(steady_metrics):
    m = re.match(r'ficus_cdc_commit_to_ack_seconds_bucket\{le="([^"]+)"\} (\d+)', line)
    if m and m.group(1) != "+Inf":
        buckets.append((float(m.group(1)), int(m.group(2))))
    m = re.match(r'ficus_cdc_commit_to_ack_seconds_count (\d+)', line)
    if m:
        count = int(m.group(1))
def quantile(q):
    rank, lower, below = q * count, 0.0, 0
    for bound, cumulative in buckets:
        if cumulative >= rank:
            return lower + (bound - lower) * (rank - below) / max(cumulative - below, 1)
        lower, below = bound, cumulative
    return float("inf")
latency = {"rate_rows_per_s": int(lat_rate), "achieved_tps": int(steady_tps or 0), "seconds": int(lat_seconds),
           "transactions": count, "p50_ms": round(quantile(0.5) * 1000, 1), "p99_ms": round(quantile(0.99) * 1000, 1)}
meta["settings"]["steady"] = (f"{lat_rate} single-row transactions/s, pgbench -c 4 -j 2 -R {lat_rate}, {lat_seconds} s, "
                              "synchronous_commit=on")
print(f"{'workload/contender':<28}{'rows/s':>10}{'seconds':>9}{'peak MiB':>10}{'vs recvlogical':>16}")
for name, r in data.items():
    base = data.get(name.split('/')[0] + "/pg_recvlogical")
    ratio = f"{r['rows_per_s'] / base['rows_per_s']:.2f}" if base else "-"
    print(f"{name:<28}{r['rows_per_s']:>10}{r['seconds']:>9}{r['peak_rss_mib']:>10}{ratio:>16}")
print(f"\ncommit-to-Kafka-ack latency at {latency['achieved_tps']} single-row transactions/s "
      f"({latency['transactions']} transactions): p50 {latency['p50_ms']} ms, p99 {latency['p99_ms']} ms")
json.dump({**meta, "results": data, "commit_to_ack": latency}, open("tests/bench/results/cdc.json", "w"), indent=2)
print("wrote tests/bench/results/cdc.json")
PY
