//! Delivery guarantees of `ficus cdc` with real processes: snapshot plus concurrent writes,
//! kill -9 at any moment, a paused broker, and a quiet slot that still advances.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::broker::{fold, Broker};
use common::cdc::{config, Cdc};
use common::pg::PgCluster;
use serde_json::{json, Value};

const QUIET: Duration = Duration::from_secs(20);

async fn table_state(db: &tokio_postgres::Client, table: &str) -> BTreeMap<i64, Value> {
    db.query(&format!("SELECT id, balance FROM {table} ORDER BY id"), &[])
        .await
        .expect("select")
        .iter()
        .map(|row| {
            let id: i32 = row.get(0);
            let balance: i64 = row.get(1);
            (i64::from(id), json!({"id": id, "balance": balance}))
        })
        .collect()
}

/// Writes `n` transactions of random-ish inserts, updates and deletes on `accounts`.
async fn write_load(db: &tokio_postgres::Client, n: i32, seed: i32) {
    for i in 0..n {
        let id = (i * 7 + seed) % 500 + 1;
        let sql = match i % 4 {
            0 | 1 => format!("UPDATE accounts SET balance = balance + {i} WHERE id = {id}"),
            2 => format!("INSERT INTO accounts VALUES ({}, {i})", 1000 + i + seed * 100_000),
            _ => format!("DELETE FROM accounts WHERE id = {}", 1000 + i - 1 + seed * 100_000),
        };
        db.batch_execute(&sql).await.expect("write");
    }
}

async fn accounts(pg: &PgCluster, rows: i32) -> tokio_postgres::Client {
    let db = pg.database("bank").await;
    db.batch_execute(&format!(
        "CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL);
         INSERT INTO accounts SELECT g, g * 10 FROM generate_series(1, {rows}) g;
         ANALYZE accounts;"
    ))
    .await
    .expect("schema");
    db
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_with_concurrent_writes_gives_each_rows_final_state() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    let db = accounts(&pg, 20_000).await;
    let writer = pg.client("bank").await;
    let load = tokio::spawn(async move { write_load(&writer, 1_500, 1).await });
    let mut cdc = Cdc::start(&config(&pg.url("bank"), &broker, "bank", "tables = [\"accounts\"]"));
    load.await.expect("load");
    cdc.wait_log("streaming changes", QUIET);
    let expected = table_state(&db, "accounts").await;
    let records = broker.consume("bank.public.accounts", usize::MAX, Duration::from_secs(5));
    let snapshot: Vec<_> =
        records.iter().filter_map(|r| r.value.as_ref()).filter(|v| v["op"] == "r").collect();
    let mut seen = std::collections::BTreeSet::new();
    for row in &snapshot {
        let id = row["after"]["id"].as_i64().expect("id");
        assert!(seen.insert(id), "row {id} twice in the snapshot");
    }
    assert!((1..=20_000).all(|id| seen.contains(&id)), "every pre-existing row is in the snapshot");
    assert_eq!(snapshot.last().map(|v| v["source"]["snapshot"].clone()), Some(json!("last")));
    assert_eq!(snapshot[0]["source"]["snapshot"], "true");
    assert_eq!(fold(&records), expected);
    let metrics = cdc.metrics_text().await;
    assert!(metrics.contains("ficus_cdc_snapshot_rows{table=\"public.accounts\"}"), "{metrics}");
    assert!(
        metrics.contains("ficus_cdc_snapshot_rows_estimate{table=\"public.accounts\"} 20000"),
        "{metrics}"
    );
    assert!(cdc.logs().contains("table snapshot done"));
    cdc.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_streaming_loses_nothing() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    let db = accounts(&pg, 500).await;
    let mut cdc = Cdc::start(&config(&pg.url("bank"), &broker, "bank", "tables = [\"accounts\"]"));
    cdc.wait_log("streaming changes", QUIET);
    let writer = pg.client("bank").await;
    let load = tokio::spawn(async move { write_load(&writer, 3_000, 2).await });
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        cdc.kill9();
        cdc.spawn();
    }
    load.await.expect("load");
    let expected = table_state(&db, "accounts").await;
    let events: usize = 500 + 3_000 + 3_000 / 4; // snapshot, changes, tombstones
    let records = broker.consume("bank.public.accounts", usize::MAX, Duration::from_secs(5));
    assert!(records.len() >= events, "{} records, at least {events} expected", records.len());
    assert_eq!(fold(&records), expected, "every change is on Kafka after kill -9 and restart");
    cdc.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_snapshot_redoes_it_from_a_fresh_slot() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    let db = accounts(&pg, 300_000).await;
    let mut cdc = Cdc::start(&config(&pg.url("bank"), &broker, "bank", "tables = [\"accounts\"]"));
    cdc.wait_log("snapshot started", QUIET);
    tokio::time::sleep(Duration::from_millis(300)).await;
    cdc.kill9();
    let slots: i64 = db
        .query_one("SELECT count(*) FROM pg_replication_slots WHERE NOT temporary", &[])
        .await
        .expect("slots")
        .get(0);
    assert_eq!(slots, 0, "no permanent slot before the snapshot is on Kafka");
    db.batch_execute("UPDATE accounts SET balance = -1 WHERE id <= 10").await.expect("update");
    cdc.spawn();
    cdc.wait_log("streaming changes", Duration::from_secs(120));
    db.batch_execute("UPDATE accounts SET balance = -2 WHERE id = 11").await.expect("update");
    let expected = table_state(&db, "accounts").await;
    let records = broker.consume("bank.public.accounts", usize::MAX, Duration::from_secs(5));
    assert_eq!(fold(&records), expected);
    cdc.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_snapshot_stops_at_once_and_the_next_start_takes_it_again() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    let rows = 300_000;
    let db = accounts(&pg, rows).await;
    let mut cdc = Cdc::start(&config(&pg.url("bank"), &broker, "bank", "tables = [\"accounts\"]"));
    let series = "ficus_cdc_snapshot_rows{table=\"public.accounts\"}";
    cdc.wait_log("snapshot started", QUIET);
    cdc.wait_metric(series, 1.0, QUIET).await;
    let asked = Instant::now();
    assert!(cdc.terminate().success(), "{}", cdc.logs());
    let stopped_in = asked.elapsed();
    assert!(cdc.logs().contains("snapshot stopped before it finished"), "{}", cdc.logs());
    let (sent, _) = broker.count("bank.public.accounts", rows as usize, Duration::from_secs(2));
    assert!(sent < rows as usize, "stopped in {stopped_in:?} after sending {sent} of {rows} rows");
    let slots: i64 =
        db.query_one("SELECT count(*) FROM pg_replication_slots", &[]).await.expect("slots").get(0);
    assert_eq!(slots, 0, "no slot until a whole snapshot is on Kafka");

    cdc.spawn();
    cdc.wait_log("streaming changes", Duration::from_secs(120));
    let metrics = cdc.metrics_text().await;
    assert_eq!(common::metric(&metrics, series), f64::from(rows), "a whole new snapshot");
    cdc.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_during_snapshot_lets_it_finish_before_reloading() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    let rows = 100_000;
    let db = accounts(&pg, rows).await;
    let cdc = Cdc::start(&config(&pg.url("bank"), &broker, "bank", "tables = [\"accounts\"]"));
    cdc.wait_log("snapshot started", QUIET);
    cdc.hangup();
    cdc.wait_log("configuration reloaded; resuming", Duration::from_secs(120));
    cdc.wait_log("streaming changes", QUIET);
    let logs = cdc.logs();
    assert_eq!(logs.matches("snapshot started").count(), 1, "one snapshot, finished:\n{logs}");
    assert!(!logs.contains("snapshot stopped"), "{logs}");
    db.batch_execute("UPDATE accounts SET balance = -1 WHERE id = 1").await.expect("update");
    let (count, last) = broker.count("bank.public.accounts", rows as usize + 1, QUIET);
    assert_eq!(count, rows as usize + 1);
    assert_eq!(last.expect("value")["after"], json!({"id": 1, "balance": -1}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_paused_for_10_seconds_under_load_loses_nothing() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    if !broker.is_own() {
        eprintln!("skipped: an external Kafka (KAFKA_BROKERS) cannot be paused by the test");
        return;
    }
    let db = accounts(&pg, 500).await;
    let mut cdc = Cdc::start(&config(&pg.url("bank"), &broker, "bank", "tables = [\"accounts\"]"));
    cdc.wait_log("streaming changes", QUIET);
    let writer = pg.client("bank").await;
    let load = tokio::spawn(async move { write_load(&writer, 4_000, 3).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    broker.pause();
    tokio::time::sleep(Duration::from_secs(10)).await;
    broker.resume();
    load.await.expect("load");
    let expected = table_state(&db, "accounts").await;
    let records = broker.consume("bank.public.accounts", usize::MAX, Duration::from_secs(10));
    assert_eq!(fold(&records), expected);
    let ours: i64 = db
        .query_one("SELECT count(*) FROM pg_stat_replication WHERE application_name = 'ficus'", &[])
        .await
        .expect("stat")
        .get(0);
    assert_eq!(ours, 1, "the replication connection survived the pause");
    assert!(
        !cdc.logs().contains("resuming from the slot"),
        "no reconnect was needed:\n{}",
        cdc.logs()
    );
    cdc.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_table_met_while_kafka_is_paused_keeps_the_replication_connection() {
    // The server ends a replication connection silent for wal_sender_timeout; creating the
    // new table's topic waits for the paused broker far longer than that.
    let (pg, broker) = (PgCluster::start_with(&[("wal_sender_timeout", "3s")]), Broker::start());
    if !broker.is_own() {
        eprintln!("skipped: an external Kafka (KAFKA_BROKERS) cannot be paused by the test");
        return;
    }
    let db = pg.database("shop").await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY)").await.expect("setup");
    // No `tables`: every table streams, including one created later.
    let cdc = Cdc::start(&config(&pg.url("shop"), &broker, "late", ""));
    cdc.wait_log("streaming changes", QUIET);
    broker.pause();
    db.batch_execute("CREATE TABLE later (id int PRIMARY KEY); INSERT INTO later VALUES (1)")
        .await
        .expect("new table");
    tokio::time::sleep(Duration::from_secs(8)).await;
    broker.resume();
    broker.wait_topic("late.public.later", QUIET);
    let records = broker.consume("late.public.later", 1, QUIET);
    assert_eq!(records.len(), 1, "the new table's row arrives");
    assert!(
        !cdc.logs().contains("resuming from the slot"),
        "the connection stayed up while the topic was created:\n{}",
        cdc.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_slot_still_advances_while_other_tables_write() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    let db = accounts(&pg, 10).await;
    db.batch_execute("CREATE TABLE noise (id serial PRIMARY KEY, payload text)")
        .await
        .expect("noise");
    let mut cdc = Cdc::start(&config(&pg.url("bank"), &broker, "bank", "tables = [\"accounts\"]"));
    cdc.wait_log("streaming changes", QUIET);
    db.batch_execute(
        "INSERT INTO noise (payload) SELECT repeat('x', 1000) FROM generate_series(1, 20000)",
    )
    .await
    .expect("noise");
    let target: String =
        db.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.expect("lsn").get(0);
    let deadline = Instant::now() + QUIET;
    loop {
        let behind: i64 = db
            .query_one(
                "SELECT pg_wal_lsn_diff($1::text::pg_lsn, confirmed_flush_lsn)::bigint FROM pg_replication_slots WHERE slot_name = 'ficus'",
                &[&target],
            )
            .await
            .expect("slot")
            .get(0);
        if behind <= 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slot stayed {behind} bytes behind:\n{}",
            cdc.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cdc.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_to_ack_latency_is_observed_once_per_transaction() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    let db = accounts(&pg, 10).await;
    let mut cdc = Cdc::start(&config(&pg.url("bank"), &broker, "bank", "tables = [\"accounts\"]"));
    cdc.wait_log("streaming changes", QUIET);
    for id in 100..110 {
        db.batch_execute(&format!("INSERT INTO accounts VALUES ({id}, 1)")).await.expect("insert");
    }
    let series = "ficus_cdc_commit_to_ack_seconds";
    let metrics = cdc.wait_metric(&format!("{series}_count"), 10.0, QUIET).await;
    assert_eq!(common::metric(&metrics, &format!("{series}_count")), 10.0, "{metrics}");
    // Each commit was acknowledged within seconds (Tansu on loopback: milliseconds).
    assert_eq!(
        common::metric(&metrics, &format!("{series}_bucket{{le=\"5\"}}")),
        10.0,
        "{metrics}"
    );
    assert!(common::metric(&metrics, &format!("{series}_sum")) > 0.0, "{metrics}");
    cdc.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_is_survived_by_reconnecting() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    let db = accounts(&pg, 100).await;
    let mut cdc = Cdc::start(&config(&pg.url("bank"), &broker, "bank", "tables = [\"accounts\"]"));
    cdc.wait_log("streaming changes", QUIET);
    write_load(&db, 200, 4).await;
    pg.stop();
    pg.start_again();
    let db = pg.client("bank").await;
    write_load(&db, 200, 5).await;
    let expected = table_state(&db, "accounts").await;
    let records = broker.consume("bank.public.accounts", usize::MAX, Duration::from_secs(5));
    assert_eq!(fold(&records), expected);
    assert!(cdc.logs().contains("resuming from the slot"), "{}", cdc.logs());
    cdc.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_row_transaction_streams_in_bounded_memory() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    let db = pg.database("bank").await;
    db.batch_execute("CREATE TABLE big (id int PRIMARY KEY, note text, amount numeric)")
        .await
        .expect("schema");
    let mut cdc = Cdc::start(&config(&pg.url("bank"), &broker, "bank", "tables = [\"big\"]"));
    cdc.wait_log("streaming changes", QUIET);
    let started = Instant::now();
    db.batch_execute(
        "INSERT INTO big SELECT g, 'row ' || g, g * 1.5 FROM generate_series(1, 1000000) g",
    )
    .await
    .expect("insert");
    let (count, last) = broker.count("bank.public.big", 1_000_000, Duration::from_secs(30));
    let elapsed = started.elapsed();
    assert_eq!(count, 1_000_000);
    assert_eq!(
        last.expect("last")["after"],
        json!({"id": 1_000_000, "note": "row 1000000", "amount": "1500000.0"})
    );
    let peak_kib = cdc.peak_rss_kib();
    eprintln!(
        "figure: 1,000,000-row transaction on Kafka in {elapsed:?}, ficus cdc peak RSS {} MiB",
        peak_kib / 1024
    );
    assert!(
        peak_kib < 512 * 1024,
        "peak RSS {peak_kib} KiB: memory must not grow with the transaction"
    );
    cdc.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slot_lag_grows_while_kafka_is_paused_and_drains_after() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    if !broker.is_own() {
        eprintln!("skipped: an external Kafka (KAFKA_BROKERS) cannot be paused by the test");
        return;
    }
    let db = accounts(&pg, 10).await;
    db.batch_execute("CREATE TABLE noise (id serial PRIMARY KEY, payload text)")
        .await
        .expect("noise");
    let mut cdc = Cdc::start(&config(&pg.url("bank"), &broker, "bank", "tables = [\"accounts\"]"));
    cdc.wait_log("streaming changes", QUIET);
    cdc.wait_metric("ficus_cdc_slot_wal_status{status=\"reserved\"}", 1.0, QUIET).await;

    broker.pause();
    // Records stuck in flight hold the confirmed position; the WAL of later transactions is
    // lag. (WAL before their commit is not: a position the server has read past without a
    // commit to send is confirmed, as a quiet slot's is.)
    db.batch_execute("UPDATE accounts SET balance = balance + 1").await.expect("update");
    cdc.wait_metric("ficus_cdc_in_flight_records", 10.0, QUIET).await;
    db.batch_execute(
        "INSERT INTO noise (payload) SELECT repeat('x', 1000) FROM generate_series(1, 5000)",
    )
    .await
    .expect("noise");
    let paused = cdc.wait_metric("ficus_cdc_slot_lag_bytes", 4_000_000.0, QUIET).await;
    assert!(common::metric(&paused, "ficus_cdc_slot_retained_wal_bytes") >= 4_000_000.0);

    broker.resume();
    let deadline = Instant::now() + QUIET;
    loop {
        let lag = common::metric(&cdc.metrics_text().await, "ficus_cdc_slot_lag_bytes");
        if lag < 100_000.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the lag stayed at {lag} bytes:\n{}", cdc.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cdc.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_within_seconds_of_a_kill_9_and_nothing_is_lost() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    let db = accounts(&pg, 500).await;
    let config = config(&pg.url("bank"), &broker, "bank", "tables = [\"accounts\"]");
    let mut active = Cdc::start(&config);
    active.wait_log("streaming changes", QUIET);
    let mut standby = Cdc::start(&config);
    standby.wait_log("waiting as a standby", QUIET);
    standby.wait_metric("ficus_cdc_standby", 1.0, QUIET).await;

    let writer = pg.client("bank").await;
    let load = tokio::spawn(async move { write_load(&writer, 4_000, 3).await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    active.kill9();
    let killed = Instant::now();
    standby.wait_log("this standby takes over", QUIET);
    standby.wait_log("streaming changes", QUIET);
    let took_over = killed.elapsed();
    assert!(took_over < Duration::from_secs(5), "took {took_over:?}:\n{}", standby.logs());
    load.await.expect("load");

    let expected = table_state(&db, "accounts").await;
    let records = broker.consume("bank.public.accounts", usize::MAX, Duration::from_secs(10));
    assert_eq!(fold(&records), expected, "the oracle: the topic ends equal to the table");
    eprintln!("standby streaming {took_over:?} after the kill -9");
    standby.terminate();
}
