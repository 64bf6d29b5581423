//! Bad input gives `ficus cdc` a clear error naming the thing at fault.

mod common;

use std::time::Duration;

use common::broker::Broker;
use common::cdc::{config, Cdc};
use common::pg::PgCluster;

const QUIET: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_not_logical_says_how_to_fix_it() {
    let (pg, broker) = (PgCluster::start_with(&[("wal_level", "replica")]), Broker::start());
    let mut cdc = Cdc::start(&config(&pg.url("postgres"), &broker, "x", ""));
    let status = cdc.wait_exit();
    assert!(!status.success());
    let logs = cdc.logs();
    assert!(
        logs.contains("wal_level is 'replica'")
            && logs.contains("ALTER SYSTEM SET wal_level = logical"),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_table_is_named() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    let mut cdc =
        Cdc::start(&config(&pg.url("postgres"), &broker, "x", "tables = [\"public.nope\"]"));
    assert!(!cdc.wait_exit().success());
    assert!(cdc.logs().contains("table public.nope does not exist"), "{}", cdc.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_without_replication_privilege_is_told_what_it_needs() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    let db = pg.database("shop").await;
    db.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY); CREATE ROLE app LOGIN; GRANT SELECT ON t TO app;
         CREATE PUBLICATION ficus FOR TABLE t;",
    )
    .await
    .expect("setup");
    let url = format!("postgres://app@127.0.0.1:{}/shop", pg.port);
    let mut cdc = Cdc::start(&config(&url, &broker, "x", "tables = [\"t\"]"));
    assert!(!cdc.wait_exit().success());
    let logs = cdc.logs();
    assert!(logs.contains("permission denied") && logs.contains("REPLICATION"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_reader_of_a_slot_waits_as_a_standby_and_says_so() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    let db = pg.database("shop").await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY)").await.expect("setup");
    let first = Cdc::start(&config(&pg.url("shop"), &broker, "x", ""));
    first.wait_log("streaming changes", QUIET);
    let second = Cdc::start(&config(&pg.url("shop"), &broker, "x", ""));
    second.wait_log("another ficus cdc reads this slot: waiting as a standby", QUIET);
    // It neither fights for the slot nor restarts in a loop of "slot in use" errors.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let logs = second.logs();
    assert!(!logs.contains("in use by another process") && !logs.contains("resuming"), "{logs}");
    assert!(!logs.contains("streaming changes"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_slot_says_to_drop_it_and_snapshot_again() {
    let (pg, broker, db) = slot_limited_to_1mb().await;
    let mut cdc = Cdc::start(&config(&pg.url("shop"), &broker, "x", "tables = [\"t\"]"));
    cdc.wait_log("streaming changes", QUIET);
    cdc.terminate();
    write_wal_until_the_slot_is_lost(&db).await;
    cdc.spawn();
    assert!(!cdc.wait_exit().success());
    assert_says_the_slot_is_lost(&cdc.logs());
}

/// A cluster whose slot may hold back at most 1 MB of WAL, with tables `t` (streamed) and
/// `noise` (to write WAL with) in database `shop`.
async fn slot_limited_to_1mb() -> (PgCluster, Broker, tokio_postgres::Client) {
    let (pg, broker) = (
        PgCluster::start_with(&[("max_slot_wal_keep_size", "'1MB'"), ("wal_keep_size", "0")]),
        Broker::start(),
    );
    let db = pg.database("shop").await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY); CREATE TABLE noise (payload text)")
        .await
        .expect("setup");
    (pg, broker, db)
}

/// Writes and checkpoints WAL until PostgreSQL invalidates slot `ficus`.
async fn write_wal_until_the_slot_is_lost(db: &tokio_postgres::Client) {
    for _ in 0..10 {
        db.batch_execute("INSERT INTO noise SELECT repeat('x', 1000) FROM generate_series(1, 20000); SELECT pg_switch_wal(); CHECKPOINT;")
            .await
            .expect("make WAL");
        let status: Option<String> = db
            .query_one("SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'ficus'", &[])
            .await
            .expect("slot")
            .get(0);
        if status.as_deref() == Some("lost") {
            return;
        }
    }
    panic!("the slot was not invalidated");
}

fn assert_says_the_slot_is_lost(logs: &str) {
    assert!(
        logs.contains("replication slot \"ficus\" is lost")
            && logs.contains("pg_drop_replication_slot('ficus')"),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_lost_while_running_stops_ficus_with_the_same_advice() {
    let (pg, broker, db) = slot_limited_to_1mb().await;
    if !broker.is_own() {
        eprintln!("skipped: an external Kafka (KAFKA_BROKERS) cannot be paused by the test");
        return;
    }
    let mut cdc = Cdc::start(&config(&pg.url("shop"), &broker, "x", "tables = [\"t\"]"));
    cdc.wait_log("streaming changes", QUIET);
    // A record Kafka cannot take holds the slot back while WAL piles up past its limit.
    broker.pause();
    db.batch_execute("INSERT INTO t VALUES (1)").await.expect("insert");
    cdc.wait_metric("ficus_cdc_in_flight_records", 1.0, QUIET).await;
    write_wal_until_the_slot_is_lost(&db).await;
    broker.resume();
    assert!(!cdc.wait_exit().success(), "ficus went on with a lost slot");
    assert_says_the_slot_is_lost(&cdc.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_is_named_and_retried() {
    let broker = Broker::start();
    let port = common::free_addr().port();
    let cdc = Cdc::start(&config(
        &format!("postgres://postgres@127.0.0.1:{port}/shop"),
        &broker,
        "x",
        "",
    ));
    cdc.wait_log(&format!("cannot reach PostgreSQL at 127.0.0.1:{port}"), QUIET);
    cdc.wait_log("resuming from the slot", QUIET);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_config_key_is_named() {
    let broker = Broker::start();
    let mut cdc = Cdc::start(&format!(
        "{}\nslott = \"typo\"\n",
        config("postgres://x@127.0.0.1:1/x", &broker, "x", "")
    ));
    assert!(!cdc.wait_exit().success());
    assert!(cdc.logs().contains("unknown field `slott`"), "{}", cdc.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misspelt_section_is_named_not_ignored() {
    let broker = Broker::start();
    let mut cdc = Cdc::start(&format!(
        "{}\n[colums.\"public.customers\"]\nexclude = [\"ssn\"]\n",
        config("postgres://x@127.0.0.1:1/x", &broker, "x", "")
    ));
    assert!(!cdc.wait_exit().success());
    assert!(cdc.logs().contains("unknown section [colums]"), "{}", cdc.logs());
}
