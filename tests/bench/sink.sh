#!/usr/bin/env bash
# Sink benchmark: rows/s from a change topic into a target table with `ficus sink`, against a
# plain COPY of the same rows into the same table (the ceiling).
#
#   tests/bench/sink.sh             # 500,000 inserts (1,000-row transactions), then 250,000 updates
#   ROWS=100000 tests/bench/sink.sh
#
# `ficus cdc` first writes the workload's events to a topic (Tansu, or KAFKA_BROKERS); the sink
# then starts on the full topic and is timed until its stored offset reaches the end of the
# inserts, then of the updates. Prints a table and writes tests/bench/results/sink.json.
# Figures, not a test.
set -euo pipefail
cd "$(dirname "$0")/../.."

ROWS=${ROWS:-500000}
UPDATES=${UPDATES:-$((ROWS / 2))}
BATCH=${BATCH:-5000}

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

# One server holds the source (`shop`) and the target (`view`), as cheap to write as the
# cdc benchmark's: what is measured is the sink, not fsync.
PG_PORT=$(free_port)
mkdir -p "$WORK/pg"; [ "$(id -u)" = 0 ] && chown postgres "$WORK/pg"
as_pg "$BIN/initdb" -D "$WORK/pg/data" -A trust -U postgres --no-sync -E UTF8 --locale=C >/dev/null
as_pg "$BIN/pg_ctl" -D "$WORK/pg/data" -l "$WORK/pg/log" -w start -o "-c port=$PG_PORT -c listen_addresses=127.0.0.1 \
  -c unix_socket_directories=$WORK/pg -c wal_level=logical -c max_replication_slots=10 -c max_wal_senders=10 \
  -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_wal_size=8GB -c shared_buffers=512MB" >/dev/null
psql() { local db=$1; shift; command psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d "$db" -v ON_ERROR_STOP=1 -qAt "$@"; }
psql postgres -c "CREATE DATABASE shop" -c "CREATE DATABASE view"

if [ -n "${KAFKA_BROKERS:-}" ]; then
  BROKERS=$KAFKA_BROKERS
else
  KAFKA_PORT=$(free_port); BROKERS=127.0.0.1:$KAFKA_PORT
  "${CARGO_HOME:-$HOME/.cargo}/bin/tansu" broker --listener-url "tcp://$BROKERS" --advertised-listener-url "tcp://$BROKERS" \
    --storage-engine memory://tansu/ >/dev/null 2>&1 & PIDS+=($!)
fi

TABLE="(id bigint PRIMARY KEY, name text, qty int, price numeric(10,2), ratio float8,
  active bool, created timestamptz, day date, tags text[], payload jsonb)"
psql shop -c "CREATE TABLE items $TABLE; CREATE PUBLICATION bench FOR TABLE items" \
  -c "SELECT pg_create_logical_replication_slot('bench', 'pgoutput')" >/dev/null
psql view -c "CREATE TABLE items $TABLE; CREATE TABLE items_copy $TABLE"

echo "workload: $ROWS inserts, then $UPDATES updates, in 1,000-row transactions" >&2
psql shop -c "DO \$\$ BEGIN FOR b IN 0..($ROWS/1000 - 1) LOOP
  INSERT INTO items SELECT g, 'item ' || g, g % 100, g * 0.01, g / 7.0, g % 2 = 0, now(), current_date,
    ARRAY['a', 'b'], jsonb_build_object('n', g) FROM generate_series(b * 1000 + 1, b * 1000 + 1000) g;
  COMMIT; END LOOP; END \$\$"
psql shop -c "DO \$\$ BEGIN FOR b IN 0..($UPDATES/1000 - 1) LOOP
  UPDATE items SET qty = qty + 1, payload = payload || '{\"u\": 1}' WHERE id BETWEEN b * 1000 + 1 AND b * 1000 + 1000;
  COMMIT; END LOOP; END \$\$"
EVENTS=$((ROWS + UPDATES))

# The topic: ficus cdc until the slot confirmed the workload's last position.
cat > "$WORK/cdc.toml" <<TOML
[source]
url = "postgres://postgres@127.0.0.1:$PG_PORT/shop"
publication = "bench"
slot = "bench"
tables = ["public.items"]
snapshot = "never"
[kafka]
brokers = "$BROKERS"
topic_prefix = "bench"
partitions = 1
replication_factor = 1
TOML
target=$(psql shop -c "SELECT pg_current_wal_lsn()")
RUST_LOG=warn "$FICUS" cdc --config "$WORK/cdc.toml" & CDC_PID=$!; PIDS+=($CDC_PID)
until [ "$(psql shop -c "SELECT pg_wal_lsn_diff('$target', confirmed_flush_lsn) <= 0 FROM pg_replication_slots WHERE slot_name = 'bench'")" = t ]; do
  kill -0 "$CDC_PID" || { echo "ficus cdc exited early" >&2; exit 1; }
  sleep 0.2
done
kill "$CDC_PID"; wait "$CDC_PID" 2>/dev/null || true
echo "topic bench.public.items holds $EVENTS events" >&2

# The ceiling: the final rows, COPYed into an empty table with the same primary key.
psql shop -c "\\copy items TO '$WORK/items.copy'"
start=$(date +%s.%N)
psql view -c "\\copy items_copy FROM '$WORK/items.copy'"
end=$(date +%s.%N)
COPY_SECONDS=$(python3 -c "print(round($end - $start, 3))")

# The sink on the full topic, timed to the end of the inserts and of the updates.
METRICS_PORT=$(free_port)
cat > "$WORK/sink.toml" <<TOML
[kafka]
brokers = "$BROKERS"
name = "bench"
[postgres]
url = "postgres://postgres@127.0.0.1:$PG_PORT/view"
batch = $BATCH
[[postgres.tables]]
topic = "bench.public.items"
[metrics]
listen = "127.0.0.1:$METRICS_PORT"
TOML
# CPU seconds (user + system) of processes: where the sink's time goes.
cpu() { for pid in "$@"; do cat "/proc/$pid/stat" 2>/dev/null; done | awk '{s += $14 + $15} END {print s / 100}'; }
minus() { awk "BEGIN {print $1 - $2}"; }
pg_pids() { pgrep -x postgres | tr '\n' ' '; }
TANSU_PID=${PIDS[0]:-}
stored() { psql view -c "SELECT coalesce((SELECT next_offset FROM ficus_sink_offsets WHERE sink = 'bench'), 0)" 2>/dev/null || echo 0; }
pg_before=$(cpu $(pg_pids)); tansu_before=$(cpu $TANSU_PID)
start=$(date +%s.%N)
RUST_LOG=warn "$FICUS" sink --config "$WORK/sink.toml" & SINK_PID=$!; PIDS+=($SINK_PID)
peak=0; inserted=""
while :; do
  next=$(stored)
  rss=$(awk '/VmHWM/ {print $2}' "/proc/$SINK_PID/status" 2>/dev/null || echo 0)
  ((rss > peak)) && peak=$rss
  [ -z "$inserted" ] && [ "$next" -ge "$ROWS" ] && inserted=$(date +%s.%N)
  [ "$next" -ge "$EVENTS" ] && break
  kill -0 "$SINK_PID" || { echo "ficus sink exited early" >&2; exit 1; }
  sleep 0.05
done
end=$(date +%s.%N)
APPLY_SECONDS=$(python3 -c "import urllib.request, re
text = urllib.request.urlopen('http://127.0.0.1:$METRICS_PORT/metrics').read().decode()
print(re.search(r'^ficus_sink_apply_seconds_sum (\S+)', text, re.M).group(1))")
SINK_CPU=$(cpu $SINK_PID); PG_CPU=$(minus "$(cpu $(pg_pids))" "$pg_before")
TANSU_CPU=$(minus "$(cpu $TANSU_PID)" "${tansu_before:-0}")
kill "$SINK_PID"; wait "$SINK_PID" 2>/dev/null || true
same=$(psql view -c "SELECT count(*) = $ROWS AND NOT EXISTS (SELECT * FROM items EXCEPT SELECT * FROM items_copy) FROM items")
if [ "$same" != t ]; then
  echo "the sink's table differs from the copy: $(psql view -c "SELECT count(*) FROM items") rows; first differences:" >&2
  psql view -c "(SELECT 'sink', * FROM items EXCEPT SELECT 'sink', * FROM items_copy) UNION ALL
    (SELECT 'copy', * FROM items_copy EXCEPT SELECT 'copy', * FROM items) ORDER BY 2, 1 LIMIT 6" >&2
  exit 1
fi

mkdir -p tests/bench/results
python3 - "$ROWS" "$UPDATES" "$BATCH" "$BROKERS" "$COPY_SECONDS" "$start" "$inserted" "$end" "$peak" "$BIN" \
  "$SINK_CPU" "$PG_CPU" "${TANSU_CPU:-0}" "$APPLY_SECONDS" <<'PY'
import json, os, subprocess, sys
rows, updates, batch, brokers, copy_s, start, inserted, end, peak, pgbin, sink_cpu, pg_cpu, tansu_cpu, apply_s = sys.argv[1:15]
rows, updates = int(rows), int(updates)
insert_s, update_s = float(inserted) - float(start), float(end) - float(inserted)
def version(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True, shell=True)
    return (out.stdout + out.stderr).strip().splitlines()[0]
results = {
    "copy": {"rows_per_s": round(rows / float(copy_s)), "seconds": float(copy_s)},
    "ficus-sink/inserts": {"rows_per_s": round(rows / insert_s), "seconds": round(insert_s, 2)},
    "ficus-sink/updates": {"rows_per_s": round(updates / update_s), "seconds": round(update_s, 2)},
}
meta = {"cores": os.cpu_count(),
        "versions": {"ficus": version("target/release/ficus --version"),
                     "postgresql": version(f"{pgbin}/postgres --version"),
                     "tansu": version("${CARGO_HOME:-$HOME/.cargo}/bin/tansu --version") if "KAFKA_BROKERS" not in os.environ else brokers},
        "settings": {"inserts": rows, "updates": updates, "sink_batch": int(batch), "brokers": brokers,
                     "sink_peak_rss_mib": round(int(peak) / 1024, 1)},
        "cpu_seconds_during_the_sink_run": {"ficus-sink": float(sink_cpu), "postgresql": float(pg_cpu),
                                            "tansu": float(tansu_cpu), "wall": round(float(end) - float(start), 2),
                                            "applying_batches": round(float(apply_s), 2)}}
print(f"\ncores {meta['cores']}; rows/s into the target table (the sink: from its start on the full topic)")
print(f"{'contender':<22}{'rows/s':>10}{'seconds':>9}{'vs COPY':>9}")
ceiling = results["copy"]["rows_per_s"]
for name, r in results.items():
    print(f"{name:<22}{r['rows_per_s']:>10}{r['seconds']:>9}{r['rows_per_s'] / ceiling:>9.2f}")
print(f"sink peak RSS {meta['settings']['sink_peak_rss_mib']} MiB; CPU seconds during its run: "
      + ", ".join(f"{k} {v}" for k, v in meta["cpu_seconds_during_the_sink_run"].items()))
json.dump({**meta, "results": results}, open("tests/bench/results/sink.json", "w"), indent=2)
print("wrote tests/bench/results/sink.json")
PY
