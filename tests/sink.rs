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
    // Two replicas of one sink: one applies, the other stands by.
    let config = sink_config(&broker, &pg.url("view"), &topic);
    let mut sinks = [Cdc::start_sink(&config), Cdc::start_sink(&config)];
    // Changes keep coming while a sink is killed three times: the applying one or the
    // standby, whichever; a killed one comes back as a standby.
    let load = load(pg.client("shop").await, 100, 1600);
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let sink = &mut sinks[round % 2];
        sink.kill9();
        sink.spawn();
    }
    load.await.expect("load");
    assert_caught_up(&source, &target, &broker, &sinks[0]).await;
    let logs = format!("{}{}", sinks[0].logs(), sinks[1].logs());
    assert!(logs.contains("standing by"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_restarted_mid_stream_is_waited_for_and_nothing_is_lost_or_doubled() {
    let (pg, target_pg, broker) = (PgCluster::start(), PgCluster::start(), Broker::start());
    let (source, _, _cdc, topic) = setup(&pg, &target_pg, &broker).await;
    let mut sink = Cdc::start_sink(&sink_config(&broker, &target_pg.url("view"), &topic));
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
    assert!(sink.terminate().success(), "SIGTERM stops the sink cleanly:\n{}", sink.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_target_refuses_stops_its_partition_naming_it_or_is_skipped() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    let source = pg.database("shop").await;
    source
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, qty text);
             CREATE TABLE others (id int PRIMARY KEY);
             INSERT INTO items VALUES (1, '5'), (2, 'many'), (3, '7');
             INSERT INTO others VALUES (1);",
        )
        .await
        .expect("source");
    let target = pg.database("view").await;
    target
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, qty int); CREATE TABLE others (id int PRIMARY KEY);
             CREATE TABLE items_audit (topic text, \"partition\" int, \"offset\" bigint, key jsonb, value jsonb)",
        )
        .await
        .expect("target");
    let cdc =
        Cdc::start(&config(&pg.url("shop"), &broker, "bad", "tables = [\"items\", \"others\"]"));
    cdc.wait_log("streaming changes", QUIET);
    let topic = format!("{}.public.items", broker.topic("bad"));
    let sink_config = |on_error: &str| {
        format!(
            "[kafka]\nbrokers = \"{}\"\n[postgres]\nurl = \"{}\"\non_error = \"{on_error}\"\n\
             [[postgres.tables]]\ntopic = \"{topic}\"\ntable = \"public.items_audit\"\nmode = \"append\"\n\
             [[postgres.tables]]\ntopic = \"{topic}\"\n[[postgres.tables]]\ntopic = \"{}.public.others\"\n",
            broker.addr,
            pg.url("view"),
            broker.topic("bad"),
        )
    };
    let ids = |table: &'static str| {
        let target = &target;
        async move {
            let sql = format!("SELECT id FROM {table} ORDER BY id");
            let rows = target.query(&sql, &[]).await.expect("ids");
            rows.iter().map(|r| r.get::<_, i32>(0)).collect::<Vec<_>>()
        }
    };
    let wait_ids = |table: &'static str, expected: Vec<i32>, sink: &Cdc| {
        let logs = sink.logs();
        async move {
            let deadline = Instant::now() + QUIET;
            while ids(table).await != expected {
                assert!(Instant::now() < deadline, "{table}: {:?}\n{logs}", ids(table).await);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };

    // Stop: the partition stops at the event, naming it; the other table's partition goes on.
    let mut sink = Cdc::start_sink(&sink_config("stop"));
    sink.wait_log("The partition is stopped", QUIET);
    let log = sink.logs();
    assert!(
        log.contains(&format!(
            "{topic} partition 0 offset 1: column qty: invalid input syntax for type integer"
        )),
        "{log}"
    );
    sink.wait_metric("ficus_sink_stopped_partitions", 1.0, QUIET).await;
    let health = reqwest::get(format!("http://{}/healthz", sink.metrics)).await.expect("healthz");
    assert_eq!(health.status(), 503, "a stopped partition needs an operator");
    source
        .batch_execute("INSERT INTO others VALUES (2); INSERT INTO items VALUES (4, '8');")
        .await
        .expect("more");
    wait_ids("others", vec![1, 2], &sink).await;
    assert_eq!(ids("items").await, [1], "what came before it is applied, nothing after");
    // Its message feeds the audit too: neither table has it, or its offset would be stored
    // with the items table missing it.
    let audited = || async {
        let rows = target.query("SELECT \"offset\" FROM items_audit ORDER BY 1", &[]).await;
        rows.expect("audit").iter().map(|r| r.get::<_, i64>(0)).collect::<Vec<_>>()
    };
    assert_eq!(audited().await, [0]);
    assert!(sink.terminate().success(), "{}", sink.logs());

    // Skip: it is logged, counted and passed over; the partition reads on.
    sink.write_config(&sink_config("skip"));
    sink.spawn();
    sink.wait_log("event skipped", QUIET);
    wait_ids("items", vec![1, 3, 4], &sink).await;
    assert_eq!(audited().await, [0, 1, 2, 3], "the audit takes what the items table skips");
}

/// Rows of the two-table tests: two in `a`, one in `b`.
const ROWS: &str = "INSERT INTO a VALUES (1), (2); INSERT INTO b VALUES (10);";

/// Two source tables, `a` and `b` (an int key each, `rows` inserted first), and `ficus cdc`
/// streaming `tables` of them under `prefix`: the cluster, the broker, the source, the
/// reader, and the topic prefix as the broker names it.
async fn two_tables(
    prefix: &str,
    rows: &str,
    tables: &str,
) -> (PgCluster, Broker, Client, Cdc, String) {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    let source = pg.database("shop").await;
    source
        .batch_execute(&format!(
            "CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY); {rows}"
        ))
        .await
        .expect("source");
    let cdc =
        Cdc::start(&config(&pg.url("shop"), &broker, prefix, &format!("tables = [{tables}]")));
    cdc.wait_log("streaming changes", QUIET);
    let prefix = broker.topic(prefix);
    (pg, broker, source, cdc, prefix)
}

/// A request the webhook endpoint received, and its answer.
struct Hooked {
    key: String,
    body: Vec<u8>,
    status: u16,
    /// Whether the Standard Webhooks signature verifies with the shared secret.
    signed: bool,
}

/// Verifies `webhook-signature` as a receiver would: HMAC-SHA256 of `id.timestamp.body`.
fn verifies(secret: &[u8], seen: &common::Seen) -> bool {
    use base64::Engine;
    use hmac::{Hmac, KeyInit, Mac};
    let header = |name: &str| seen.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("");
    let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(secret).expect("key");
    mac.update(format!("{}.{}.", header("webhook-id"), header("webhook-timestamp")).as_bytes());
    mac.update(&seen.body);
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    header("webhook-signature") == format!("v1,{expected}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_failing_with_503_for_10s_gets_every_event_in_order_and_signed() {
    use std::sync::atomic::{AtomicU16, Ordering};
    use std::sync::{Arc, Mutex};

    let (pg, broker) = (PgCluster::start(), Broker::start());
    let source = pg.database("shop").await;
    source
        .batch_execute("CREATE TABLE orders (id int PRIMARY KEY, note text)")
        .await
        .expect("table");
    let cdc = Cdc::start(&config(&pg.url("shop"), &broker, "hook", "tables = [\"orders\"]"));
    cdc.wait_log("streaming changes", QUIET);
    let topic = format!("{}.public.orders", broker.topic("hook"));

    // The endpoint: 503 for its first 10 s, then `answer`; every request recorded.
    let secret = b"a shared secret of the orders team".to_vec();
    let failing_until = Instant::now() + Duration::from_secs(10);
    let answer = Arc::new(AtomicU16::new(200));
    let hooked = Arc::new(Mutex::new(Vec::<Hooked>::new()));
    let endpoint = {
        let (answer, hooked, secret) = (answer.clone(), hooked.clone(), secret.clone());
        common::AppBackend::start(move |seen| {
            let status =
                if Instant::now() < failing_until { 503 } else { answer.load(Ordering::SeqCst) };
            let key = seen.headers.get("idempotency-key").and_then(|v| v.to_str().ok());
            hooked.lock().expect("log").push(Hooked {
                key: key.unwrap_or("").to_string(),
                body: seen.body.to_vec(),
                status,
                signed: verifies(&secret, seen),
            });
            (status, "text/plain", if status == 200 { "ok" } else { "not now" }.to_string())
        })
        .await
    };
    let dir = tempfile::tempdir().expect("dir");
    let secret_file = dir.path().join("hook.secret");
    std::fs::write(&secret_file, &secret).expect("secret");
    let hook_config = |on_4xx: &str| {
        format!(
            "[kafka]\nbrokers = \"{}\"\nname = \"orders-hook\"\ntopics = [\"{topic}\"]\n\
             [webhook]\nurl = \"{}/events\"\nbatch = 20\ntimeout = \"2s\"\nsecret_file = \"{}\"\non_4xx = \"{on_4xx}\"\n",
            broker.addr,
            endpoint.url(),
            secret_file.display()
        )
    };
    let mut sink = Cdc::start_sink(&hook_config("stop"));
    for n in 0..300 {
        source.execute("INSERT INTO orders VALUES ($1, 'n')", &[&n]).await.expect("insert");
        if n % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    let (events, _) = broker.count("hook.public.orders", 300, QUIET);
    assert_eq!(events, 300);

    // Every event arrives once the endpoint recovers; taken requests deduplicated by their
    // key hold each offset once, in order.
    let offsets_taken = |hooked: &[Hooked]| {
        let mut keys = std::collections::BTreeSet::new();
        let mut offsets = Vec::new();
        for request in hooked.iter().filter(|r| r.status == 200) {
            if keys.insert(request.key.clone()) {
                let body: serde_json::Value = serde_json::from_slice(&request.body).expect("json");
                let batch = body.as_array().expect("an array of events");
                offsets.extend(batch.iter().map(|e| e["offset"].as_i64().expect("offset")));
            }
        }
        offsets
    };
    let deadline = Instant::now() + Duration::from_secs(40);
    while offsets_taken(&hooked.lock().expect("log")).len() < events {
        assert!(Instant::now() < deadline, "not all delivered:\n{}", sink.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    {
        let hooked = hooked.lock().expect("log");
        assert_eq!(offsets_taken(&hooked), (0..events as i64).collect::<Vec<_>>());
        assert!(hooked.iter().any(|r| r.status == 503), "the endpoint failed first");
        assert!(hooked.iter().all(|r| r.signed), "every request's signature verifies");
        // A request sent again is the same request: same key, same events.
        for failed in hooked.iter().filter(|r| r.status == 503) {
            let taken = hooked.iter().find(|r| r.status == 200 && r.key == failed.key);
            let taken = taken.unwrap_or_else(|| panic!("{} never taken", failed.key));
            assert_eq!(taken.body, failed.body, "{} changed between tries", failed.key);
        }
        let first: serde_json::Value = serde_json::from_slice(&hooked[0].body).expect("json");
        assert_eq!(first[0]["topic"], topic.as_str());
        assert_eq!(first[0]["value"]["op"], "c", "the event itself, as JSON");
    }
    let delivered =
        format!("ficus_sink_webhook_events_total{{outcome=\"delivered\",topic=\"{topic}\"}}");
    let text = sink.wait_metric(&delivered, events as f64, QUIET).await;
    assert!(common::metric(&text, "ficus_sink_webhook_requests_total{answer=\"5xx\"}") > 0.0);

    // A refusal stops the partition, saying why, and the sink reports itself unhealthy.
    answer.store(422, Ordering::SeqCst);
    source.execute("INSERT INTO orders VALUES (1000, 'refused')", &[]).await.expect("insert");
    sink.wait_log("The partition is stopped", QUIET);
    let log = sink.logs();
    assert!(log.contains(&format!("{topic} partition 0 offset 300: the webhook")), "{log}");
    assert!(log.contains("answered 422"), "{log}");
    sink.wait_metric("ficus_sink_stopped_partitions", 1.0, QUIET).await;
    let health = reqwest::get(format!("http://{}/healthz", sink.metrics)).await.expect("healthz");
    assert_eq!(health.status(), 503);

    // With on_4xx = "skip" it is counted and passed over; nothing before it is sent again.
    sink.terminate();
    sink.write_config(&hook_config("skip"));
    sink.spawn();
    let skipped =
        format!("ficus_sink_webhook_events_total{{outcome=\"skipped\",topic=\"{topic}\"}}");
    sink.wait_metric(&skipped, 1.0, QUIET).await;
    let hooked = hooked.lock().expect("log");
    let refused: Vec<&Hooked> = hooked.iter().filter(|r| r.status == 422).collect();
    assert!(refused.iter().all(|r| r.key == format!("{topic}/0/300")), "only the new event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_of_the_cdc_type_tests_and_a_truncate_arrive_as_the_source_has_them() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    // The columns of `every_kind_of_change_and_every_type_as_documented` and of
    // `domains_arrays_dates_times_and_money_keep_their_json_types`, in both databases.
    // (An interval arrives as microseconds, as Debezium writes it: its months and years as
    // average days, days and time of opposite signs as their sum. Days and time of one sign.)
    let schema = "CREATE TYPE mood AS ENUM ('sad', 'happy');
        CREATE DOMAIN dint AS int CHECK (VALUE > 0); CREATE DOMAIN dint2 AS dint;
        CREATE DOMAIN dbool AS boolean; CREATE DOMAIN dbytea AS bytea;
        CREATE DOMAIN ddate AS date; CREATE DOMAIN dtstz AS timestamptz; CREATE DOMAIN dia AS int[];
        CREATE TABLE t (id int PRIMARY KEY, small smallint, big bigint, flag boolean,
          price numeric(10,2), ratio double precision, f4 real, name text, code varchar(10),
          uid uuid, feeling mood, doc jsonb, js json, blob bytea, tags text[], nums int[], day date,
          at timestamp, at_tz timestamptz, t time, iv interval, di dint, ddi dint2, db dbool,
          dby dbytea, dd ddate, dtz dtstz, dia dia, dis dint[], ips inet[], moods mood[],
          d_bc date, d_big date, d_inf date, d_ninf date, ts_bc timestamp, ts_big timestamp,
          ts_inf timestamp, tz_bc timestamptz, tz_big timestamptz, tz_ninf timestamptz,
          t_end time, m money, ms money[]);";
    let values = |id: i32| {
        format!(
            "INSERT INTO t VALUES ({id}, 2, 9007199254740993, true, 12.5, 1.5, 0.25, 'héllo \"q\"', 'abc',
              'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'happy', '{{\"a\": [1, {{\"b\": null}}]}}', '{{\"b\":2}}',
              '\\x0001ff', '{{x,\"y z\",NULL}}', '{{1,2,NULL}}', '2022-01-01', '2022-01-01 10:00:00.5',
              '2022-01-01 10:00:00.123456+02', '01:02:03.5', '-3 days -04:05:06.7',
              42, 7, true, '\\x0102', '2022-01-01', '2022-01-01 10:00:00+02', '{{1,2}}', '{{3,4}}',
              '{{10.0.0.1,::1}}', '{{sad,happy}}', '0044-03-15 BC', '10000-01-01', 'infinity', '-infinity',
              '0044-03-15 12:00:00 BC', '10000-01-01 00:00:00', 'infinity', '0044-03-15 00:00:00+00 BC',
              '10000-01-01 00:00:00+00', '-infinity', '24:00:00', (-1234.5)::numeric::money,
              ARRAY[1.5::numeric::money, NULL]);"
        )
    };
    let source = pg.database("shop").await;
    let target = pg.database("view").await;
    source.batch_execute(&format!("{schema}{}", values(1))).await.expect("source");
    target.batch_execute(schema).await.expect("target");
    let cdc = Cdc::start(&config(&pg.url("shop"), &broker, "ty", "tables = [\"t\"]"));
    cdc.wait_log("streaming changes", QUIET);
    source
        .batch_execute(&format!(
            "{} INSERT INTO t (id) VALUES (3);
             UPDATE t SET name = 'changed', nums = NULL, f4 = -0.5, ts_inf = '-infinity' WHERE id = 2;
             TRUNCATE t;
             {} {} INSERT INTO t (id) VALUES (6);
             UPDATE t SET id = 7, day = '1999-12-31' WHERE id = 5;",
            values(2),
            values(4),
            values(5)
        ))
        .await
        .expect("changes");
    let topic = format!("{}.public.t", broker.topic("ty"));
    let sink = Cdc::start_sink(&format!(
        "[kafka]\nbrokers = \"{}\"\n[postgres]\nurl = \"{}\"\n[[postgres.tables]]\ntopic = \"{topic}\"\ntable = \"public.t\"\n",
        broker.addr,
        pg.url("view")
    ));
    // Each row as PostgreSQL prints it: equal text is an equal value of every column.
    let rows = |db: &'static str| {
        let client = if db == "shop" { &source } else { &target };
        async move {
            let sql = "SELECT r::text FROM t r ORDER BY id";
            let rows = client.query(sql, &[]).await.expect("rows");
            rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>()
        }
    };
    let expected = rows("shop").await;
    assert_eq!(expected.len(), 3, "rows 4, 6 and 7 after the truncate");
    let deadline = Instant::now() + QUIET;
    while rows("view").await != expected {
        if Instant::now() > deadline {
            assert_eq!(rows("view").await, expected, "{}", sink.logs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_made_from_the_source_catalog_grows_with_the_columns_events_carry() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    let source = pg.database("shop").await;
    source
        .batch_execute(
            "CREATE TYPE mood AS ENUM ('sad', 'happy'); CREATE DOMAIN dint AS int CHECK (VALUE > 0);
             CREATE TABLE orders (id int PRIMARY KEY, total numeric(10,2), feeling mood, moods mood[],
               qty dint, placed date);
             INSERT INTO orders VALUES (1, 9.99, 'happy', '{sad,happy}', 3, '2024-02-29'), (2, 5, NULL, NULL, 1, NULL);",
        )
        .await
        .expect("source");
    // The service's database has nothing yet: not the schema, not the table, not the types.
    let target = pg.database("view").await;
    let cdc = Cdc::start(&config(&pg.url("shop"), &broker, "mk", "tables = [\"orders\"]"));
    cdc.wait_log("streaming changes", QUIET);
    let sink = Cdc::start_sink(&format!(
        "[kafka]\nbrokers = \"{}\"\n[source]\nurl = \"{}\"\n[postgres]\nurl = \"{}\"\n\
         [[postgres.tables]]\ntopic = \"{}.public.orders\"\ntable = \"view.orders\"\ncolumns = {{ total = \"amount\" }}\ncreate = true\n",
        broker.addr,
        pg.url("shop"),
        pg.url("view"),
        broker.topic("mk")
    ));
    let rows = |db: &'static str| {
        let (client, total) = if db == "shop" { (&source, "total") } else { (&target, "amount") };
        async move {
            let table = if db == "shop" { "orders" } else { "view.orders" };
            let sql = format!(
                "SELECT concat_ws('|', id, {total}, feeling, moods, qty, placed, \
                 CASE WHEN EXISTS (SELECT FROM information_schema.columns WHERE column_name = 'note' \
                   AND table_name = 'orders') THEN to_jsonb(o) ->> 'note' END) FROM {table} o ORDER BY id"
            );
            match client.query(&sql, &[]).await {
                Ok(rows) => rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>(),
                Err(_) => Vec::new(),
            }
        }
    };
    let caught_up = || async {
        let expected = rows("shop").await;
        let deadline = Instant::now() + QUIET;
        while rows("view").await != expected {
            assert!(
                Instant::now() < deadline,
                "{:?} != {expected:?}\n{}",
                rows("view").await,
                sink.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    caught_up().await;
    assert!(sink.logs().contains("created the target table from the source's catalog"));

    // A column added at the source is added to the target when events first carry it.
    source
        .batch_execute(
            "ALTER TABLE orders ADD COLUMN note varchar(20);
             INSERT INTO orders VALUES (3, 1.5, 'sad', '{}', 2, '2024-03-01', 'new');
             UPDATE orders SET note = 'later' WHERE id = 1;",
        )
        .await
        .expect("evolve");
    caught_up().await;
    let types: Vec<String> = target
        .query(
            "SELECT column_name || ' ' || format_type(atttypid, atttypmod) FROM information_schema.columns c \
             JOIN pg_attribute a ON a.attrelid = 'view.orders'::regclass AND a.attname = c.column_name \
             WHERE table_schema = 'view' AND table_name = 'orders' ORDER BY ordinal_position",
            &[],
        )
        .await
        .expect("types")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        types,
        [
            "id integer",
            "amount numeric(10,2)",
            "feeling text",
            "moods text[]",
            "qty integer",
            "placed date",
            "note character varying(20)"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_regex_delivers_and_applies_a_table_added_later() {
    use std::sync::{Arc, Mutex};

    let (pg, broker, source, cdc, prefix) = two_tables("rx", ROWS, "\"a\"").await;
    let topics = Arc::new(Mutex::new(Vec::<String>::new()));
    let endpoint = {
        let topics = topics.clone();
        common::AppBackend::start(move |seen| {
            let body: serde_json::Value = serde_json::from_slice(&seen.body).unwrap_or_default();
            for event in body.as_array().into_iter().flatten() {
                let topic = event["topic"].as_str().unwrap_or_default().to_string();
                topics.lock().expect("topics").push(topic);
            }
            (200, "text/plain", "ok".to_string())
        })
        .await
    };
    // The tables too: each topic into its schema.table, made from the source's catalog.
    let target = pg.database("view").await;
    let sink = Cdc::start_sink(&format!(
        "[kafka]\nbrokers = \"{}\"\nname = \"rx\"\ntopic_regex = '{prefix}\\.public\\..*'\n[webhook]\nurl = \"{}/\"\n\
         [source]\nurl = \"{}\"\n[postgres]\nurl = \"{}\"\nall_topics = true\ncreate = true\n",
        broker.addr,
        endpoint.url(),
        pg.url("shop"),
        pg.url("view"),
    ));
    let ids = |table: &'static str| {
        let target = &target;
        async move {
            let sql = format!("SELECT id FROM public.{table} ORDER BY id");
            let rows = target.query(&sql, &[]).await.unwrap_or_default();
            rows.iter().map(|r| r.get::<_, i32>(0)).collect::<Vec<_>>()
        }
    };
    let applied = |table: &'static str, expected: Vec<i32>| {
        let (ids, sink) = (&ids, &sink);
        async move {
            let deadline = Instant::now() + QUIET;
            while ids(table).await != expected {
                let (now, logs) = (ids(table).await, sink.logs());
                assert!(Instant::now() < deadline, "{table}: {now:?}\n{logs}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let delivered = |topic: String| {
        let topics = topics.clone();
        move || topics.lock().expect("topics").iter().filter(|t| **t == topic).count()
    };
    let (of_a, of_b) =
        (delivered(format!("{prefix}.public.a")), delivered(format!("{prefix}.public.b")));
    let deadline = Instant::now() + QUIET;
    while of_a() < 2 {
        assert!(Instant::now() < deadline, "{:?}\n{}", topics.lock(), sink.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    applied("a", vec![1, 2]).await;
    // Table b joins ficus cdc: its topic appears and the sink delivers it too.
    cdc.write_config(&config(&pg.url("shop"), &broker, "rx", "tables = [\"a\", \"b\"]"));
    cdc.hangup();
    source.batch_execute("INSERT INTO b VALUES (11)").await.expect("insert");
    let deadline = Instant::now() + QUIET;
    while of_b() < 2 {
        assert!(Instant::now() < deadline, "{:?}\n{}\n{}", topics.lock(), sink.logs(), cdc.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(sink.logs().contains("new topics match kafka.topic_regex"), "{}", sink.logs());
    assert_eq!(of_a(), 2, "nothing of a delivered twice");
    applied("b", vec![10, 11]).await;
    source
        .batch_execute("INSERT INTO a VALUES (3); DELETE FROM b WHERE id = 10")
        .await
        .expect("more");
    applied("a", vec![1, 2, 3]).await;
    applied("b", vec![11]).await;
    let stored: Vec<String> = target
        .query("SELECT topic FROM ficus_sink_offsets ORDER BY topic", &[])
        .await
        .expect("offsets")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(stored, [format!("{prefix}.public.a"), format!("{prefix}.public.b")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_partition_sent_again_holds_only_itself_and_resumes_without_a_gap() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let (_pg, broker, source, _cdc, prefix) = two_tables("held", "", "\"a\", \"b\"").await;
    let (topic_a, topic_b) = (format!("{prefix}.public.a"), format!("{prefix}.public.b"));

    // The endpoint fails every request of b's partition while `b_fails`; it records the
    // (topic, offset) of every event it takes, and how many requests of b it failed.
    let b_fails = Arc::new(AtomicBool::new(true));
    let taken = Arc::new(Mutex::new(Vec::<(String, i64)>::new()));
    let b_failed = Arc::new(Mutex::new(0_usize));
    let endpoint = {
        let (b_fails, taken, b_failed) = (b_fails.clone(), taken.clone(), b_failed.clone());
        let topic_b = topic_b.clone();
        common::AppBackend::start(move |seen| {
            let body: serde_json::Value = serde_json::from_slice(&seen.body).unwrap_or_default();
            let events = body.as_array().cloned().unwrap_or_default();
            let of_b = events.iter().any(|e| e["topic"] == topic_b.as_str());
            if of_b && b_fails.load(Ordering::SeqCst) {
                *b_failed.lock().expect("count") += 1;
                return (503, "text/plain", "b is down".to_string());
            }
            let mut taken = taken.lock().expect("taken");
            for event in &events {
                let topic = event["topic"].as_str().unwrap_or_default().to_string();
                taken.push((topic, event["offset"].as_i64().unwrap_or(-1)));
            }
            (200, "text/plain", "ok".to_string())
        })
        .await
    };
    let sink = Cdc::start_sink(&format!(
        "[kafka]\nbrokers = \"{}\"\nname = \"held\"\ntopics = [\"{topic_a}\", \"{topic_b}\"]\n\
         [webhook]\nurl = \"{}/\"\nbatch = 20\ntimeout = \"2s\"\n",
        broker.addr,
        endpoint.url()
    ));
    let offsets_of = |topic: &str| -> Vec<i64> {
        let taken = taken.lock().expect("taken");
        let mut seen = std::collections::BTreeSet::new();
        // Requests sent again may repeat events: each offset once, in the order first taken.
        taken.iter().filter(|(t, o)| t == topic && seen.insert(*o)).map(|(_, o)| *o).collect()
    };
    let wait_for = |what: &str, done: &dyn Fn() -> bool, limit: Duration| {
        let deadline = Instant::now() + limit;
        while !done() {
            let (of_a, of_b) = (offsets_of(&topic_a).len(), offsets_of(&topic_b).len());
            assert!(
                Instant::now() < deadline,
                "{what} ({of_a} of a, {of_b} of b):\n{}",
                sink.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };

    // b's partition fails, with more events than a partition may hold (1,000 at batch 20),
    // so that it is paused; a's events, written after, arrive while b is still failing.
    source.batch_execute("INSERT INTO b SELECT generate_series(1, 1500)").await.expect("b");
    wait_for("b's requests failing", &|| *b_failed.lock().expect("count") >= 2, QUIET);
    for n in 0..5 {
        source.execute("INSERT INTO a VALUES ($1)", &[&n]).await.expect("a");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_for("a's events while b fails", &|| offsets_of(&topic_a).len() == 5, QUIET);
    assert!(b_fails.load(Ordering::SeqCst) && offsets_of(&topic_b).is_empty());
    assert_eq!(offsets_of(&topic_a), (0..5).collect::<Vec<_>>());

    // b recovers: every one of its events arrives, in order, none lost across the pause.
    b_fails.store(false, Ordering::SeqCst);
    wait_for("all of b", &|| offsets_of(&topic_b).len() >= 1500, QUIET);
    assert_eq!(offsets_of(&topic_b), (0..1500).collect::<Vec<_>>());
    let delivered =
        format!("ficus_sink_webhook_events_total{{outcome=\"delivered\",topic=\"{topic_b}\"}}");
    sink.wait_metric(&delivered, 1500.0, QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_replicas_share_the_partitions_and_one_takes_over_after_a_kill_9() {
    use std::collections::BTreeSet;
    use std::sync::{Arc, Mutex};

    let (_pg, broker, source, _cdc, prefix) = two_tables("pair", "", "\"a\", \"b\"").await;
    let (topic_a, topic_b) = (format!("{prefix}.public.a"), format!("{prefix}.public.b"));

    // Every event taken, with the replica that sent it (each posts to its own path).
    let taken = Arc::new(Mutex::new(Vec::<(String, String, i64)>::new()));
    let endpoint = {
        let taken = taken.clone();
        common::AppBackend::start(move |seen| {
            let body: serde_json::Value = serde_json::from_slice(&seen.body).unwrap_or_default();
            let mut taken = taken.lock().expect("taken");
            for event in body.as_array().into_iter().flatten() {
                let topic = event["topic"].as_str().unwrap_or_default().to_string();
                taken.push((seen.path.clone(), topic, event["offset"].as_i64().unwrap_or(-1)));
            }
            (200, "text/plain", "ok".to_string())
        })
        .await
    };
    let replica = |path: &str| {
        Cdc::start_sink(&format!(
            "[kafka]\nbrokers = \"{}\"\nname = \"pair\"\ntopics = [\"{topic_a}\", \"{topic_b}\"]\n\
             [kafka.consumer]\n\"session.timeout.ms\" = 6000\n\"heartbeat.interval.ms\" = 500\n\
             [webhook]\nurl = \"{}{path}\"\nbatch = 10\n",
            broker.addr,
            endpoint.url()
        ))
    };
    let given =
        |sink: &Cdc| sink.logs().matches("the consumer group gave these partitions").count();
    let one = replica("/one");
    one.wait_log("the consumer group gave these partitions", QUIET);
    let mut two = replica("/two");
    let deadline = Instant::now() + QUIET;
    // The second member's arrival moves one of the first member's partitions to it.
    while given(&two) == 0 || given(&one) < 2 {
        assert!(Instant::now() < deadline, "no rebalance:\n{}\n{}", one.logs(), two.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let insert = |from: i32, count: i32| {
        let source = &source;
        async move {
            for n in from..from + count {
                source.execute("INSERT INTO a VALUES ($1)", &[&n]).await.expect("a");
                source.execute("INSERT INTO b VALUES ($1)", &[&n]).await.expect("b");
            }
        }
    };
    // Each topic's offsets once, in the order first taken, and who sent them.
    let offsets = |topic: &str| -> Vec<i64> {
        let mut seen = BTreeSet::new();
        let taken = taken.lock().expect("taken");
        taken.iter().filter(|(_, t, o)| t == topic && seen.insert(*o)).map(|(_, _, o)| *o).collect()
    };
    let senders = |topic: &str| -> BTreeSet<String> {
        let taken = taken.lock().expect("taken");
        taken.iter().filter(|(_, t, _)| t == topic).map(|(path, _, _)| path.clone()).collect()
    };
    let all_taken = |count: i64, other: &Cdc| {
        let deadline = Instant::now() + QUIET;
        while offsets(&topic_a).len() < count as usize || offsets(&topic_b).len() < count as usize {
            let logs = format!("{}\n{}", one.logs(), other.logs());
            assert!(Instant::now() < deadline, "not all taken:\n{logs}");
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(offsets(&topic_a), (0..count).collect::<Vec<_>>());
        assert_eq!(offsets(&topic_b), (0..count).collect::<Vec<_>>());
    };
    insert(0, 50).await;
    all_taken(50, &two);
    // Each partition went to one member: no event was sent by both.
    let (of_a, of_b) = (senders(&topic_a), senders(&topic_b));
    assert_eq!((of_a.len(), of_b.len()), (1, 1), "a by {of_a:?}, b by {of_b:?}");
    assert_ne!(of_a, of_b, "the two members share the two partitions");
    assert_eq!(taken.lock().expect("taken").len(), 100, "each event sent once");

    // The second member dies; after the group's session timeout the first takes its
    // partition over from the committed offset, and every event arrives, in order. Events
    // keep coming across the rebalance, which pauses and refetches the partition the first
    // member keeps.
    two.kill9();
    for round in 0..16 {
        insert(50 + round * 10, 10).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    all_taken(210, &two);
    let one_sent = |topic: &str| {
        let taken = taken.lock().expect("taken");
        taken.iter().any(|(path, t, o)| path == "/one" && t == topic && *o >= 200)
    };
    assert!(one_sent(&topic_a) && one_sent(&topic_b), "{}", one.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_without_a_target_table_is_named_and_the_others_are_applied() {
    let (pg, broker, _source, _cdc, prefix) = two_tables("some", ROWS, "\"a\", \"b\"").await;
    // The service made a table for a only.
    let target = pg.database("view").await;
    target.batch_execute("CREATE TABLE a (id int PRIMARY KEY)").await.expect("target");
    let sink = Cdc::start_sink(&format!(
        "[kafka]\nbrokers = \"{}\"\ntopics = [\"{prefix}.public.a\", \"{prefix}.public.b\"]\n\
         [postgres]\nurl = \"{}\"\nall_topics = true\n",
        broker.addr,
        pg.url("view"),
    ));
    sink.wait_log("topic not applied", QUIET);
    let log = sink.logs();
    assert!(log.contains(&format!("topic=\"{prefix}.public.b\"")), "{log}");
    assert!(log.contains("target table public.b (for topic"), "{log}");
    sink.wait_metric("ficus_sink_stopped_partitions", 1.0, QUIET).await;
    let health = reqwest::get(format!("http://{}/healthz", sink.metrics)).await.expect("healthz");
    assert_eq!(health.status(), 503, "a topic left unread is reported");
    let deadline = Instant::now() + QUIET;
    loop {
        let rows = target.query("SELECT id FROM a ORDER BY id", &[]).await.expect("a");
        let ids: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
        if ids == [1, 2] {
            break;
        }
        assert!(Instant::now() < deadline, "{ids:?}\n{}", sink.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
