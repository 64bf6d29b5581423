//! `ficus sink` with real processes: a source PostgreSQL streamed by `ficus cdc` through a
//! real broker into a target PostgreSQL, the sink killed with -9 under load.

mod common;

use std::time::{Duration, Instant};

use common::broker::Broker;
use common::cdc::{config, Cdc};
use common::pg::PgCluster;
use tokio_postgres::Client;

const QUIET: Duration = Duration::from_secs(20);

/// The sink's configuration: `topic` into the renamed target table and into an audit of
/// every event.
fn sink_config(broker: &Broker, url: &str, topic: &str) -> String {
    format!(
        "[kafka]\nbrokers = \"{}\"\nname = \"orders-view\"\n\
         [postgres]\nurl = \"{url}\"\nbatch = 500\n\
         [[postgres.tables]]\ntopic = \"{topic}\"\ntable = \"view.orders\"\ncolumns = {{ total = \"amount\" }}\n\
         [[postgres.tables]]\ntopic = \"{topic}\"\ntable = \"view.audit\"\nmode = \"append\"\n",
        broker.addr
    )
}

const COLUMNS: &str =
    "id int PRIMARY KEY, {total} numeric(10,2), placed date, at timestamp, paid timestamptz, \
     note text, tags text[], data jsonb, raw bytea, ok boolean, dates date[]";

/// The rows of `table` as text, by id, with `total` read from `amount` in the target.
async fn rows(db: &tokio_postgres::Client, table: &str, total: &str) -> Vec<String> {
    let sql = format!(
        "SELECT concat_ws('|', id, {total}, placed, at, paid, note, tags, data, raw, ok, dates) FROM {table} ORDER BY id"
    );
    db.query(&sql, &[]).await.expect("select").iter().map(|r| r.get(0)).collect()
}

/// Inserts, updates (of every column), deletes and key changes, spread by `n`.
fn workload(n: i32) -> String {
    let id = n % 300;
    format!(
        "INSERT INTO orders VALUES ({id}, {n}.25, DATE '2024-01-01' + {n}, TIMESTAMP '2024-01-01 10:00' + {n} * INTERVAL '1 minute', \
           TIMESTAMPTZ '2024-01-01 10:00+02' + {n} * INTERVAL '1 second', 'note \"{n}\" ''q''', ARRAY['a', 'b{n}'], '{{\"n\": {n}}}', '\\x00ff{n:04x}'::bytea, {n} % 2 = 0, ARRAY[DATE '0044-03-15 BC', NULL]) \
         ON CONFLICT (id) DO UPDATE SET total = EXCLUDED.total, note = EXCLUDED.note, data = EXCLUDED.data;
         DELETE FROM orders WHERE id = ({n} * 7) % 300;
         UPDATE orders SET id = 100000 + {n} WHERE id = ({n} * 13) % 300;"
    )
}

/// The source (`shop`) and target (`view`) databases with their tables, the first rows, and
/// `ficus cdc` streaming them; the target on `target_pg`.
async fn setup(
    pg: &PgCluster,
    target_pg: &PgCluster,
    broker: &Broker,
) -> (Client, Client, Cdc, String) {
    let source = pg.database("shop").await;
    source
        .batch_execute(&format!("CREATE TABLE orders ({})", COLUMNS.replace("{total}", "total")))
        .await
        .expect("source");
    let target = target_pg.database("view").await;
    target
        .batch_execute(&format!(
            "CREATE SCHEMA view; CREATE TABLE view.orders ({}, kept text DEFAULT 'mine');
             CREATE TABLE view.audit (topic text, \"partition\" int, \"offset\" bigint, key jsonb, value jsonb);",
            COLUMNS.replace("{total}", "amount")
        ))
        .await
        .expect("target");
    for n in 0..100 {
        source.batch_execute(&workload(n)).await.expect("initial rows");
    }
    let cdc = Cdc::start(&config(&pg.url("shop"), broker, "sk", "tables = [\"orders\"]"));
    cdc.wait_log("streaming changes", QUIET);
    let topic = format!("{}.public.orders", broker.topic("sk"));
    (source, target, cdc, topic)
}

/// Runs the workload's transactions `from..to` on the source, in the background.
fn load(writer: Client, from: i32, to: i32) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for n in from..to {
            writer.batch_execute(&workload(n)).await.expect("workload");
        }
    })
}

/// Waits until the target equals the source, then checks the column the events do not
/// carry and that the audit holds each of the topic's offsets exactly once.
async fn assert_caught_up(source: &Client, target: &Client, broker: &Broker, sink: &Cdc) {
    let expected = rows(source, "orders", "total").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = rows(target, "view.orders", "amount").await;
        if now == expected {
            break;
        }
        if Instant::now() > deadline {
            // Offsets the audit lacks tell a skipped event from a wrong row.
            let gaps: Vec<i64> = target
                .query(
                    "SELECT s FROM generate_series(0, (SELECT max(\"offset\") FROM view.audit)) s \
                     WHERE s NOT IN (SELECT \"offset\" FROM view.audit) LIMIT 20",
                    &[],
                )
                .await
                .expect("gaps")
                .iter()
                .map(|r| r.get(0))
                .collect();
            let missing: Vec<&String> =
                expected.iter().filter(|r| !now.contains(r)).take(3).collect();
            let extra: Vec<&String> =
                now.iter().filter(|r| !expected.contains(r)).take(3).collect();
            panic!(
                "the target never caught up: {} rows of {}; missing {missing:#?}, extra {extra:#?}; \
                 offsets not applied: {gaps:?}; sink log:\n{}",
                now.len(),
                expected.len(),
                sink.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let kept: i64 = target
        .query_one("SELECT count(*) FROM view.orders WHERE kept = 'mine'", &[])
        .await
        .expect("kept")
        .get(0);
    assert_eq!(kept as usize, expected.len(), "a column the events do not carry is left alone");

    // The audit: every offset of the topic, each exactly once.
    let (events, _) = broker.count("sk.public.orders", usize::MAX, Duration::from_secs(5));
    let deadline = Instant::now() + QUIET;
    loop {
        let row = target
            .query_one(
                "SELECT count(*), count(DISTINCT \"offset\"), coalesce(max(\"offset\") + 1, 0) FROM view.audit",
                &[],
            )
            .await
            .expect("audit");
        let (rows, distinct, next): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        assert_eq!(rows, distinct, "an offset applied twice");
        if rows as usize == events {
            assert_eq!(next as usize, events, "no offset missing");
            break;
        }
        assert!(Instant::now() < deadline, "{rows} audited of {events}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stored: i64 = target
        .query_one("SELECT next_offset FROM ficus_sink_offsets WHERE sink = 'orders-view'", &[])
        .await
        .expect("offsets")
        .get(0);
    assert_eq!(stored as usize, events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_target_ends_equal_to_the_source_and_each_offset_is_applied_once_across_kill_9() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    let (source, target, _cdc, topic) = setup(&pg, &pg, &broker).await;
    let mut sink = Cdc::start_sink(&sink_config(&broker, &pg.url("view"), &topic));
    // Changes keep coming while the sink is killed three times.
    let load = load(pg.client("shop").await, 100, 1600);
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        sink.kill9();
        sink.spawn();
    }
    load.await.expect("load");
    assert_caught_up(&source, &target, &broker, &sink).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_restarted_mid_stream_is_waited_for_and_nothing_is_lost_or_doubled() {
    let (pg, target_pg, broker) = (PgCluster::start(), PgCluster::start(), Broker::start());
    let (source, _, _cdc, topic) = setup(&pg, &target_pg, &broker).await;
    let sink = Cdc::start_sink(&sink_config(&broker, &target_pg.url("view"), &topic));
    let load = load(pg.client("shop").await, 100, 1600);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // As a crash would: in-flight transactions are lost with the server.
    target_pg.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    target_pg.start_again();
    load.await.expect("load");
    sink.wait_log("resuming from the stored offsets", QUIET);
    let target = target_pg.client("view").await;
    assert_caught_up(&source, &target, &broker, &sink).await;

    // What an operator sees: events by table and kind, the lag, and health.
    let text = sink
        .wait_metric("ficus_sink_events_total{kind=\"upsert\",table=\"view.orders\"}", 1.0, QUIET)
        .await;
    assert!(
        common::metric(&text, "ficus_sink_events_total{kind=\"append\",table=\"view.audit\"}")
            > 0.0,
        "{text}"
    );
    let caught_up = format!("ficus_sink_lag_events{{partition=\"0\",topic=\"{topic}\"}} 0");
    let deadline = Instant::now() + QUIET;
    while !sink.metrics_text().await.contains(&caught_up) {
        assert!(Instant::now() < deadline, "no {caught_up} in:\n{}", sink.metrics_text().await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let health = reqwest::get(format!("http://{}/healthz", sink.metrics)).await.expect("healthz");
    assert_eq!(health.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_target_refuses_stops_the_sink_naming_it_or_is_skipped() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    let source = pg.database("shop").await;
    source
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, qty text);
             INSERT INTO items VALUES (1, '5'), (2, 'many'), (3, '7');",
        )
        .await
        .expect("source");
    let target = pg.database("view").await;
    target.batch_execute("CREATE TABLE items (id int PRIMARY KEY, qty int)").await.expect("target");
    let cdc = Cdc::start(&config(&pg.url("shop"), &broker, "bad", "tables = [\"items\"]"));
    cdc.wait_log("streaming changes", QUIET);
    let topic = format!("{}.public.items", broker.topic("bad"));
    let sink_config = |on_error: &str| {
        format!(
            "[kafka]\nbrokers = \"{}\"\n[postgres]\nurl = \"{}\"\non_error = \"{on_error}\"\n\
             [[postgres.tables]]\ntopic = \"{topic}\"\n",
            broker.addr,
            pg.url("view")
        )
    };
    let ids = || async {
        let rows = target.query("SELECT id FROM items ORDER BY id", &[]).await.expect("ids");
        rows.iter().map(|r| r.get::<_, i32>(0)).collect::<Vec<_>>()
    };

    let mut sink = Cdc::start_sink(&sink_config("stop"));
    assert!(!sink.wait_exit().success(), "the sink stops");
    let log = sink.logs();
    assert!(
        log.contains(&format!(
            "{topic} partition 0 offset 1: column qty: invalid input syntax for type integer"
        )),
        "{log}"
    );
    assert_eq!(ids().await, [1], "what came before it is applied, nothing after");

    sink.write_config(&sink_config("skip"));
    sink.spawn();
    sink.wait_log("event skipped", QUIET);
    let deadline = Instant::now() + QUIET;
    while ids().await != [1, 3] {
        assert!(Instant::now() < deadline, "{:?}\n{}", ids().await, sink.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
