//! Incremental snapshots with real processes: a table added to a running `ficus cdc` is read
//! chunk by chunk while it and the other tables keep changing, and `ficus cdc snapshot`
//! reads a table again on demand.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::broker::{fold, Broker, Consumed};
use common::cdc::{config, Cdc};
use common::pg::PgCluster;
use common::{ficus, metric};
use serde_json::{json, Value};
use tokio::task::JoinHandle;

const QUIET: Duration = Duration::from_secs(10);
const ROWS: i32 = 200_000;

/// Runs `statements(n)` as one transaction every `pause` until `stop`; returns how many ran.
fn writer(
    client: tokio_postgres::Client,
    stop: Arc<AtomicBool>,
    pause: Duration,
    statements: impl Fn(u64) -> String + Send + 'static,
) -> JoinHandle<u64> {
    tokio::spawn(async move {
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            client.batch_execute(&statements(n)).await.expect("write");
            tokio::time::sleep(pause).await;
        }
        n
    })
}

/// Changes all over `big` while it is snapshotted: updates, deletes, inserts past the end
/// and key changes, spread over the whole key range by a fixed pseudo-random sequence.
fn churn(n: u64) -> String {
    let pick = |salt: u64| {
        (n.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(salt) >> 33) % ROWS as u64 + 1
    };
    let mut sql = format!("BEGIN; UPDATE big SET v = v + 1 WHERE id = {};", pick(1));
    if n % 3 == 0 {
        sql += &format!("DELETE FROM big WHERE id = {};", pick(2));
    }
    if n % 4 == 0 {
        sql += &format!("INSERT INTO big VALUES ({}, 0, 'new');", ROWS as u64 + n);
    }
    if n % 5 == 0 {
        sql += &format!("UPDATE big SET id = id + 1000000 WHERE id = {};", pick(3));
    }
    sql + "COMMIT;"
}

/// `big` as rows keyed by id, NULL columns left out (an event made before a column was
/// added does not have it; the row holds NULL there).
async fn table_state(db: &tokio_postgres::Client) -> BTreeMap<i64, Value> {
    db.query("SELECT id, jsonb_strip_nulls(to_jsonb(big))::text FROM big", &[])
        .await
        .expect("select")
        .iter()
        .map(|row| {
            let (id, json): (i32, String) = (row.get(0), row.get(1));
            (i64::from(id), serde_json::from_str(&json).expect("json"))
        })
        .collect()
}

/// The state the topic's records fold to, NULL columns left out as in [`table_state`].
fn topic_state(records: &[Consumed]) -> BTreeMap<i64, Value> {
    let strip = |mut row: Value| {
        if let Some(columns) = row.as_object_mut() {
            columns.retain(|_, value| !value.is_null());
        }
        row
    };
    fold(records).into_iter().map(|(id, row)| (id, strip(row))).collect()
}

/// Fails naming the first rows where the topic and the table differ, and how many do.
fn assert_equal(topic: &BTreeMap<i64, Value>, table: &BTreeMap<i64, Value>) {
    let differing: Vec<i64> = table
        .keys()
        .chain(topic.keys())
        .filter(|k| table.get(k) != topic.get(k))
        .copied()
        .collect();
    let shown: Vec<String> = differing
        .iter()
        .take(3)
        .map(|id| format!("id {id}: topic {:?}, table {:?}", topic.get(id), table.get(id)))
        .collect();
    assert!(
        differing.is_empty(),
        "the topic ends unlike the table at {} rows; first: {}",
        differing.len(),
        shown.join("; ")
    );
}

/// The longest time, in ms, from a commit to ficus's event for it (`ts_ms` minus
/// `source.ts_ms`), over the first delivery of each change.
fn longest_delay(records: &[Consumed]) -> i64 {
    let mut seen = HashSet::new();
    records
        .iter()
        .filter_map(|r| r.value.as_ref())
        .filter(|v| seen.insert(v["source"]["lsn"].as_i64()))
        .map(|v| v["ts_ms"].as_i64().unwrap_or(0) - v["source"]["ts_ms"].as_i64().unwrap_or(0))
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_added_to_a_running_pipeline_is_snapshotted_while_every_table_streams() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    let db = pg.database("shop").await;
    db.batch_execute(&format!(
        "CREATE TABLE orders (id serial PRIMARY KEY, at timestamptz DEFAULT clock_timestamp());
         CREATE TABLE big (id int PRIMARY KEY, v int NOT NULL, note text NOT NULL);
         INSERT INTO big SELECT g, 0, 'row ' || g FROM generate_series(1, {ROWS}) g;
         ANALYZE big;"
    ))
    .await
    .expect("setup");
    let url = pg.url("shop");
    let cdc = Cdc::start(&config(&url, &broker, "inc", "tables = [\"orders\"]"));
    cdc.wait_log("streaming changes", QUIET);

    let stop = Arc::new(AtomicBool::new(false));
    let orders = writer(pg.client("shop").await, stop.clone(), Duration::from_millis(20), |_| {
        "INSERT INTO orders DEFAULT VALUES".into()
    });
    let changes = writer(pg.client("shop").await, stop.clone(), Duration::from_millis(2), churn);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The table joins the configuration of the running pipeline.
    cdc.write_config(&config(&url, &broker, "inc", "tables = [\"orders\", \"big\"]"));
    let started = Instant::now();
    cdc.hangup();
    cdc.wait_log("incremental snapshot on Kafka", Duration::from_secs(240));
    let took = started.elapsed();
    let metrics = cdc.metrics_text().await;
    stop.store(true, Ordering::Relaxed);
    let (orders, changes) = (orders.await.expect("orders"), changes.await.expect("changes"));

    assert_eq!(metric(&metrics, "ficus_cdc_incremental_snapshot_tables"), 0.0);
    assert!(metric(&metrics, "ficus_cdc_snapshot_rows{table=\"public.big\"}") >= f64::from(ROWS));
    let sent = metric(&metrics, "ficus_cdc_incremental_snapshot_rows_total{table=\"public.big\"}");
    let rereads = metric(&metrics, "ficus_cdc_incremental_snapshot_rereads_total");

    let expected = table_state(&db).await;
    let records = broker.consume("inc.public.big", usize::MAX, QUIET);
    assert_equal(&topic_state(&records), &expected);
    assert!(records
        .iter()
        .any(|r| r.value.as_ref().is_some_and(|v| v["source"]["snapshot"] == "incremental")));

    let order_events = broker.consume("inc.public.orders", orders as usize, QUIET);
    assert!(order_events.len() as u64 >= orders, "every order streamed");
    let delay = longest_delay(&order_events);
    eprintln!(
        "incremental snapshot of {ROWS} rows in {took:?} under {changes} concurrent transactions: \
         {sent} rows sent, {rereads} chunks read again; orders never waited more than {delay} ms"
    );
    assert!(delay <= 1000, "the other table's events waited {delay} ms during the snapshot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ficus_cdc_snapshot_reads_a_table_again_and_survives_a_kill_mid_way() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    let db = pg.database("shop").await;
    db.batch_execute(
        "CREATE TABLE big (id int PRIMARY KEY, v int NOT NULL, note text NOT NULL);
         INSERT INTO big SELECT g, 0, 'row ' || g FROM generate_series(1, 30000) g;",
    )
    .await
    .expect("setup");
    let url = pg.url("shop");
    let base = config(&url, &broker, "again", "tables = [\"big\"]\nsnapshot_chunk_rows = 500");
    let mut cdc = Cdc::start(&base);
    cdc.wait_log("streaming changes", QUIET);

    // Asking for a table the pipeline does not stream is refused, naming it.
    let refused = ficus()
        .args(["cdc", "snapshot", "--config"])
        .arg(&cdc.config)
        .arg("public.other")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("public.other is not in source.tables"),
        "{stderr}"
    );

    let requested = ficus()
        .args(["cdc", "snapshot", "--config"])
        .arg(&cdc.config)
        .arg("big")
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&requested.stdout);
    assert!(
        requested.status.success()
            && stdout.contains("requested an incremental snapshot of public.big"),
        "{stdout} {}",
        String::from_utf8_lossy(&requested.stderr)
    );

    // Killed mid-way, the next run reads the request again and takes the snapshot anew.
    cdc.wait_metric("ficus_cdc_snapshot_rows{table=\"public.big\"}", 5000.0, QUIET).await;
    db.batch_execute(
        "UPDATE big SET v = 7 WHERE id % 1000 = 0; DELETE FROM big WHERE id % 999 = 0",
    )
    .await
    .expect("changes");
    cdc.kill9();
    cdc.spawn();

    // A column added mid-way: the chunks after it are read with it.
    cdc.wait_metric("ficus_cdc_snapshot_rows{table=\"public.big\"}", 5000.0, QUIET).await;
    db.batch_execute(
        "ALTER TABLE big ADD COLUMN extra int; UPDATE big SET extra = id WHERE id % 100 = 1",
    )
    .await
    .expect("alter");
    cdc.wait_log("incremental snapshot on Kafka", Duration::from_secs(120));

    let expected = table_state(&db).await;
    let records = broker.consume("again.public.big", usize::MAX, QUIET);
    assert_equal(&topic_state(&records), &expected);
    let with_extra = |r: &&Consumed| {
        r.value.as_ref().is_some_and(|v| {
            v["source"]["snapshot"] == "incremental" && v["after"]["extra"] == json!(29_901)
        })
    };
    assert!(
        records.iter().any(|r| with_extra(&r)),
        "rows read after the ALTER carry the new column"
    );
    let incremental = records
        .iter()
        .filter(|r| r.value.as_ref().is_some_and(|v| v["source"]["snapshot"] == "incremental"))
        .count();
    // The initial snapshot, then at least one whole incremental one.
    assert!(
        incremental >= expected.len(),
        "{incremental} incremental rows for {} in the table",
        expected.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_rows_read_like_the_stream_and_key_by_a_replica_identity_index() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    let db = pg.database("shop").await;
    // Values whose cast to text differs from their output form (padding, a /32 mask), and a
    // table keyed only by its replica identity index.
    db.batch_execute(
        "CREATE TABLE odd (code char(6) PRIMARY KEY, addr inet, pad char(5));
         INSERT INTO odd VALUES ('ab', '10.0.0.1', 'x'), ('abc d', '::1', NULL);
         CREATE TABLE ident (a int NOT NULL, b text);
         CREATE UNIQUE INDEX ident_a ON ident (a);
         ALTER TABLE ident REPLICA IDENTITY USING INDEX ident_a;
         INSERT INTO ident VALUES (1, 'one'), (2, 'two');",
    )
    .await
    .expect("setup");
    let cdc = Cdc::start(&config(&pg.url("shop"), &broker, "odd", "tables = [\"odd\", \"ident\"]"));
    cdc.wait_log("streaming changes", QUIET);
    let requested = ficus()
        .args(["cdc", "snapshot", "--config"])
        .arg(&cdc.config)
        .args(["odd", "ident"])
        .output()
        .expect("run");
    assert!(requested.status.success(), "{}", String::from_utf8_lossy(&requested.stderr));
    cdc.wait_log("incremental snapshot on Kafka table=\"public.ident\"", QUIET);

    for (topic, rows) in [("odd.public.odd", 2), ("odd.public.ident", 2)] {
        let records = broker.consume(topic, 2 * rows, QUIET);
        let (initial, incremental): (Vec<&Consumed>, Vec<&Consumed>) =
            records.iter().partition(|r| {
                r.value.as_ref().is_some_and(|v| v["source"]["snapshot"] != "incremental")
            });
        assert_eq!(incremental.len(), rows, "{topic}: {records:?}");
        for (first, again) in initial.iter().zip(&incremental) {
            assert!(first.key.is_some(), "{topic}: keyed");
            assert_eq!(first.key, again.key, "{topic}: the same key");
            let after = |r: &Consumed| r.value.as_ref().map(|v| v["after"].clone());
            assert_eq!(after(first), after(again), "{topic}: the same values");
        }
    }
}
