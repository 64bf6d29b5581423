//! `ficus cdc` against a real PostgreSQL and a real Kafka-protocol broker: the events of each
//! kind of change, every documented type, and schema changes mid-stream.

mod common;

use std::time::Duration;

use common::broker::Broker;
use common::cdc::{config, Cdc};
use common::pg::PgCluster;
use serde_json::json;

const QUIET: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_change_and_every_type_as_documented() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    let db = pg.database("shop").await;
    db.batch_execute(
        "CREATE TYPE mood AS ENUM ('sad', 'happy');
         CREATE TABLE everything (
           id int PRIMARY KEY, small smallint, big bigint, flag boolean, price numeric(10,2),
           ratio double precision, f4 real, name text, code varchar(10), uid uuid, feeling mood,
           doc jsonb, js json, blob bytea, tags text[], nums int[], day date, at timestamp,
           at_tz timestamptz, t time);",
    )
    .await
    .expect("schema");
    let mut cdc =
        Cdc::start(&config(&pg.url("shop"), &broker, "shop", "tables = [\"public.everything\"]"));
    cdc.wait_log("streaming changes", QUIET);

    db.batch_execute(
        "INSERT INTO everything VALUES (1, 2, 9007199254740993, true, 12.5, 1.5, 0.25, 'héllo', 'abc',
           'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'happy', '{\"a\":1}', '{\"b\":2}', '\\x0001ff',
           '{x,\"y z\"}', '{1,2,NULL}', '2022-01-01', '2022-01-01 10:00:00.5', '2022-01-01 10:00:00+02', '01:02:03');
         UPDATE everything SET name = 'changed', nums = NULL WHERE id = 1;
         DELETE FROM everything WHERE id = 1;
         INSERT INTO everything (id) VALUES (2);
         TRUNCATE everything;",
    )
    .await
    .expect("changes");

    let records = broker.consume("shop.public.everything", 6, QUIET);
    assert_eq!(records.len(), 6, "{records:#?}");
    let ops: Vec<_> = records.iter().map(|r| r.value.as_ref().map(|v| v["op"].clone())).collect();
    assert_eq!(
        ops,
        [
            Some(json!("c")),
            Some(json!("u")),
            Some(json!("d")),
            None,
            Some(json!("c")),
            Some(json!("t"))
        ]
    );

    let created = records[0].value.as_ref().expect("value");
    assert_eq!(records[0].key, Some(json!({"id": 1})));
    assert_eq!(created["before"], json!(null));
    assert_eq!(
        created["after"],
        json!({"id": 1, "small": 2, "big": 9_007_199_254_740_993_i64, "flag": true, "price": "12.50",
               "ratio": 1.5, "f4": 0.25, "name": "héllo", "code": "abc",
               "uid": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "feeling": "happy",
               "doc": "{\"a\": 1}", "js": "{\"b\":2}", "blob": "AAH/", "tags": ["x", "y z"],
               "nums": [1, 2, null], "day": 18993, "at": 1_641_031_200_500_000_i64,
               "at_tz": "2022-01-01T08:00:00Z", "t": 3_723_000_000_i64})
    );
    let source = &created["source"];
    assert_eq!(source["connector"], "postgresql");
    assert_eq!(
        (source["name"].as_str(), source["db"].as_str()),
        (Some(broker.topic("shop").as_str()), Some("shop"))
    );
    assert_eq!(
        (source["schema"].as_str(), source["table"].as_str()),
        (Some("public"), Some("everything"))
    );
    assert_eq!(source["snapshot"], "false");
    assert!(
        source["txId"].as_u64().is_some()
            && source["lsn"].as_u64().is_some()
            && source["ts_ms"].as_i64() > Some(0)
    );
    assert!(source["sequence"].as_str().expect("sequence").starts_with('['));
    assert_eq!(created["transaction"], json!(null));

    let updated = records[1].value.as_ref().expect("value");
    assert_eq!(updated["before"], json!(null), "default replica identity sends no old row");
    assert_eq!(updated["after"]["name"], "changed");
    assert_eq!(updated["after"]["nums"], json!(null));
    // Each change of one transaction has its own LSN.
    assert_ne!(updated["source"]["lsn"], created["source"]["lsn"]);
    assert_eq!(updated["source"]["txId"], created["source"]["txId"]);

    let deleted = records[2].value.as_ref().expect("value");
    assert_eq!(deleted["before"]["id"], 1);
    assert_eq!(deleted["after"], json!(null));
    assert_eq!(records[3].key, Some(json!({"id": 1})), "the tombstone has the deleted key");
    let truncated = records[5].value.as_ref().expect("value");
    assert_eq!(
        (truncated["before"].clone(), truncated["after"].clone()),
        (json!(null), json!(null))
    );
    cdc.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_identity_full_gives_before_and_toast_placeholders() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    let db = pg.database("shop").await;
    db.batch_execute(
        "CREATE TABLE docs (id int PRIMARY KEY, title text, body text);
         ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
         CREATE TABLE notes (id int PRIMARY KEY, title text, body text);
         ALTER TABLE notes ALTER COLUMN body SET STORAGE EXTERNAL;
         ALTER TABLE notes REPLICA IDENTITY FULL;",
    )
    .await
    .expect("schema");
    let mut cdc = Cdc::start(&config(&pg.url("shop"), &broker, "shop", ""));
    cdc.wait_log("streaming changes", QUIET);
    let long = "x".repeat(10_000);
    for table in ["docs", "notes"] {
        db.execute(&format!("INSERT INTO {table} VALUES (1, 'a', $1)"), &[&long])
            .await
            .expect("insert");
        db.execute(&format!("UPDATE {table} SET title = 'b' WHERE id = 1"), &[])
            .await
            .expect("update");
    }
    let docs = broker.consume("shop.public.docs", 2, QUIET);
    let update = docs[1].value.as_ref().expect("value");
    assert_eq!(update["before"], json!(null));
    assert_eq!(update["after"]["body"], "__debezium_unavailable_value");
    let notes = broker.consume("shop.public.notes", 2, QUIET);
    let update = notes[1].value.as_ref().expect("value");
    assert_eq!(update["before"]["title"], "a");
    assert_eq!(
        update["after"]["body"].as_str().map(str::len),
        Some(10_000),
        "FULL gives the old value"
    );
    cdc.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alter_table_mid_stream_changes_the_columns_of_later_events() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    let db = pg.database("shop").await;
    db.batch_execute("CREATE TABLE customers (id int PRIMARY KEY, email text, legacy text)")
        .await
        .expect("schema");
    let mut cdc = Cdc::start(&config(&pg.url("shop"), &broker, "shop", "tables = [\"customers\"]"));
    cdc.wait_log("streaming changes", QUIET);
    db.batch_execute(
        "INSERT INTO customers VALUES (1, 'a@x', 'old');
         ALTER TABLE customers ADD COLUMN phone text;
         INSERT INTO customers VALUES (2, 'b@x', 'old', '555');
         ALTER TABLE customers DROP COLUMN legacy;
         UPDATE customers SET phone = '556' WHERE id = 2;",
    )
    .await
    .expect("changes");
    let records = broker.consume("shop.public.customers", 3, QUIET);
    let after = |i: usize| records[i].value.as_ref().expect("value")["after"].clone();
    assert_eq!(after(0), json!({"id": 1, "email": "a@x", "legacy": "old"}));
    assert_eq!(after(1), json!({"id": 2, "email": "b@x", "legacy": "old", "phone": "555"}));
    assert_eq!(after(2), json!({"id": 2, "email": "b@x", "phone": "556"}));
    cdc.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_md5_and_cleartext_passwords_authenticate_and_a_wrong_one_is_named() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    let db = pg.database("shop").await;
    db.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY);
         SET password_encryption = 'scram-sha-256'; CREATE ROLE scram LOGIN SUPERUSER PASSWORD 'sécret';
         SET password_encryption = 'md5'; CREATE ROLE md5 LOGIN SUPERUSER PASSWORD 'pw5';
         CREATE ROLE clear LOGIN SUPERUSER PASSWORD 'plain';",
    )
    .await
    .expect("roles");
    pg.hba_first("host all md5 127.0.0.1/32 md5");
    pg.hba_first("host all clear 127.0.0.1/32 password");
    pg.hba_first("host replication clear 127.0.0.1/32 password");
    pg.hba_first("host all scram 127.0.0.1/32 scram-sha-256");
    pg.hba_first("host replication md5 127.0.0.1/32 md5");
    pg.hba_first("host replication scram 127.0.0.1/32 scram-sha-256");
    for (user, password, slot) in
        [("scram", "s%C3%A9cret", "s1"), ("md5", "pw5", "s2"), ("clear", "plain", "s4")]
    {
        let url = format!("postgres://{user}:{password}@127.0.0.1:{}/shop", pg.port);
        let extra = format!("tables = [\"t\"]\nslot = \"{slot}\"\npublication = \"p{slot}\"");
        let mut cdc = Cdc::start(&config(&url, &broker, user, &extra));
        cdc.wait_log("streaming changes", QUIET);
        db.batch_execute(&format!("INSERT INTO t VALUES ({})", &slot[1..])).await.expect("insert");
        assert_eq!(broker.consume(&format!("{user}.public.t"), 1, QUIET).len(), 1, "{user}");
        cdc.terminate();
    }
    let url = format!("postgres://scram:wrong@127.0.0.1:{}/shop", pg.port);
    let mut cdc = Cdc::start(&config(&url, &broker, "w", "tables = [\"t\"]\nslot = \"s3\""));
    assert!(!cdc.wait_exit().success());
    assert!(
        cdc.logs().contains("password authentication failed for user \"scram\""),
        "{}",
        cdc.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_modes_never_and_initial_only() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    let db = pg.database("shop").await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1), (2);")
        .await
        .expect("setup");

    // initial_only: the existing rows, then exit, leaving no slot behind.
    let extra = "tables = [\"t\"]\nsnapshot = \"initial_only\"";
    let mut cdc = Cdc::start(&config(&pg.url("shop"), &broker, "once", extra));
    assert!(cdc.wait_exit().success(), "{}", cdc.logs());
    let records = broker.consume("once.public.t", 2, QUIET);
    assert_eq!(
        records.iter().filter(|r| r.value.as_ref().is_some_and(|v| v["op"] == "r")).count(),
        2
    );
    let slots: i64 =
        db.query_one("SELECT count(*) FROM pg_replication_slots", &[]).await.expect("slots").get(0);
    assert_eq!(slots, 0);

    // never: only changes made after the slot exists.
    let extra = "tables = [\"t\"]\nsnapshot = \"never\"";
    let mut cdc = Cdc::start(&config(&pg.url("shop"), &broker, "live", extra));
    cdc.wait_log("streaming changes", QUIET);
    db.batch_execute("INSERT INTO t VALUES (3)").await.expect("insert");
    let records = broker.consume("live.public.t", 5, Duration::from_secs(3));
    let ops: Vec<_> = records.iter().map(|r| r.value.as_ref().map(|v| v["op"].clone())).collect();
    assert_eq!(ops, [Some(json!("c"))]);
    cdc.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_variables_override_the_config_file() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    let db = pg.database("shop").await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY)").await.expect("setup");
    // The file names a database that does not exist; FICUS_SOURCE__URL fixes it.
    let file = config(
        &format!("postgres://postgres@127.0.0.1:{}/nowhere", pg.port),
        &broker,
        "env",
        "tables = [\"t\"]",
    );
    let mut cdc = Cdc::start(&file);
    cdc.kill9();
    let output_dir = cdc.dir.path().to_path_buf();
    let log = std::fs::File::create(output_dir.join("env.log")).expect("log");
    let mut child = common::ficus()
        .args(["cdc", "--config", cdc.config.to_str().expect("path")])
        .env("FICUS_SOURCE__URL", pg.url("shop"))
        .stderr(log)
        .spawn()
        .expect("spawn");
    let deadline = std::time::Instant::now() + QUIET;
    while !std::fs::read_to_string(output_dir.join("env.log"))
        .unwrap_or_default()
        .contains("streaming changes")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            std::fs::read_to_string(output_dir.join("env.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    db.batch_execute("INSERT INTO t VALUES (1)").await.expect("insert");
    assert_eq!(broker.consume("env.public.t", 1, QUIET).len(), 1);
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_configuration_and_resumes() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    let db = pg.database("shop").await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY)").await.expect("setup");
    let cdc = Cdc::start(&config(&pg.url("shop"), &broker, "hup", "tables = [\"t\"]"));
    cdc.wait_log("streaming changes", QUIET);
    db.batch_execute("INSERT INTO t VALUES (1)").await.expect("insert");
    cdc.hangup();
    cdc.wait_log("configuration reloaded; resuming", QUIET);
    db.batch_execute("INSERT INTO t VALUES (2)").await.expect("insert");
    let records = broker.consume("hup.public.t", 2, QUIET);
    let ids: Vec<_> = records.iter().map(|r| r.key.clone()).collect();
    assert_eq!(
        ids,
        [Some(json!({"id": 1})), Some(json!({"id": 2}))],
        "nothing lost across the reload"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdout_sink_writes_one_json_line_per_record() {
    let pg = PgCluster::start();
    let db = pg.database("shop").await;
    db.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, name text); INSERT INTO t VALUES (1, 'a');",
    )
    .await
    .expect("setup");
    // No broker at all: --stdout needs none.
    let text = format!(
        "[source]\nurl = \"{}\"\ntables = [\"t\"]\n\n[kafka]\ntopic_prefix = \"shop\"\n",
        pg.url("shop")
    );
    let mut cdc = Cdc::start_stdout(&text);
    cdc.wait_log("streaming changes", QUIET);
    db.batch_execute(
        "UPDATE t SET name = 'b' WHERE id = 1; DELETE FROM t WHERE id = 1;
         INSERT INTO t VALUES (5, 'c'); UPDATE t SET id = 6 WHERE id = 5;",
    )
    .await
    .expect("changes");
    let lines: Vec<serde_json::Value> = cdc
        .stdout_lines(8, QUIET)
        .await
        .iter()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let ops: Vec<_> = lines.iter().map(|l| l["value"]["op"].clone()).collect();
    assert_eq!(
        ops,
        ["r", "u", "d", "tombstone", "c", "d", "tombstone", "c"].map(|op| if op == "tombstone" {
            json!(null)
        } else {
            json!(op)
        })
    );
    assert_eq!(lines[0]["topic"], "shop.public.t");
    assert_eq!(lines[0]["key"], json!({"id": 1}));
    assert_eq!(lines[3]["value"], json!(null), "the tombstone");
    assert_eq!(lines[0].get("headers"), None, "no headers unless a record has some");
    // The key change, with Debezium's headers linking its two halves.
    assert_eq!(lines[5]["headers"], json!({"__debezium.newkey": {"id": 6}}));
    assert_eq!(lines[7]["headers"], json!({"__debezium.oldkey": {"id": 5}}));
    cdc.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_rows_and_messages_arrive_routed_in_commit_order() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    let db = pg.database("shop").await;
    db.batch_execute(
        "CREATE TABLE orders (id int PRIMARY KEY);
         CREATE TABLE outbox (id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
           aggregate_type text NOT NULL, aggregate_id text NOT NULL, type text NOT NULL,
           payload jsonb);",
    )
    .await
    .expect("schema");
    let config = config(&pg.url("shop"), &broker, "shop", "tables = [\"public.orders\"]")
        + "\n[[outbox]]\ntable = \"public.outbox\"\n";
    let mut cdc = Cdc::start(&config);
    cdc.wait_log("streaming changes", QUIET);
    db.batch_execute(
        "BEGIN;
         INSERT INTO orders VALUES (1);
         INSERT INTO outbox (aggregate_type, aggregate_id, type, payload)
           VALUES ('Order', '1', 'OrderPlaced', '{\"total\": 10}');
         DELETE FROM outbox;
         COMMIT;
         INSERT INTO outbox (aggregate_type, aggregate_id, type, payload)
           VALUES ('Order', '1', 'OrderPaid', '{\"paid\": true}'),
                  ('Customer', '7', 'CustomerMoved', '{\"city\": \"Oslo\"}');
         SELECT pg_logical_emit_message(true, 'ficus.outbox',
           '{\"aggregate_type\": \"Order\", \"aggregate_id\": \"2\", \"type\": \"OrderPlaced\",
             \"id\": \"m-1\", \"payload\": {\"total\": 5}}');
         SELECT pg_logical_emit_message(true, 'another.prefix', 'not an event');",
    )
    .await
    .expect("events");

    broker.wait_topic("shop.outbox.Customer", QUIET);
    let orders = broker.consume("shop.outbox.Order", 3, QUIET);
    let seen: Vec<_> = orders
        .iter()
        .map(|r| (r.key.clone(), r.header("type").cloned(), r.value.clone()))
        .collect();
    assert_eq!(
        seen,
        [
            (Some(json!("1")), Some(json!("OrderPlaced")), Some(json!({"total": 10}))),
            (Some(json!("1")), Some(json!("OrderPaid")), Some(json!({"paid": true}))),
            (Some(json!("2")), Some(json!("OrderPlaced")), Some(json!({"total": 5}))),
        ]
    );
    // The row's uuid and the message's id, as the `id` header.
    let id = orders[0].header("id").and_then(|v| v.as_str()).unwrap_or_default();
    assert_eq!(id.len(), 36, "{id}");
    assert_eq!(orders[2].header("id"), Some(&json!("m-1")));
    let customers = broker.consume("shop.outbox.Customer", 1, QUIET);
    assert_eq!(customers[0].value, Some(json!({"city": "Oslo"})));
    // The outbox table's own changes are not streamed as a table.
    assert!(!broker.has_topic("shop.public.outbox"));
    assert_eq!(broker.consume("shop.public.orders", 1, QUIET).len(), 1);
    cdc.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_metadata_brackets_each_transaction() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    let db = pg.database("shop").await;
    db.batch_execute("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY);")
        .await
        .expect("schema");
    let extra = "tables = [\"public.a\", \"public.b\"]\ntransaction_metadata = true";
    let mut cdc = Cdc::start(&config(&pg.url("shop"), &broker, "shop", extra));
    cdc.wait_log("streaming changes", QUIET);
    db.batch_execute("BEGIN; INSERT INTO a VALUES (1), (2); INSERT INTO b VALUES (1); COMMIT;")
        .await
        .expect("transaction");

    broker.wait_topic("shop.transaction", QUIET);
    let bracket = broker.consume("shop.transaction", 2, QUIET);
    let statuses: Vec<_> =
        bracket.iter().map(|r| r.value.as_ref().map(|v| v["status"].clone())).collect();
    assert_eq!(statuses, [Some(json!("BEGIN")), Some(json!("END"))]);
    let end = bracket[1].value.as_ref().expect("end");
    let id = end["id"].as_str().expect("id");
    assert_eq!(bracket[1].key, Some(json!({"id": id})));
    assert_eq!(end["event_count"], 3);
    assert_eq!(
        end["data_collections"],
        json!([{"data_collection": "public.a", "event_count": 2},
               {"data_collection": "public.b", "event_count": 1}])
    );
    let a = broker.consume("shop.public.a", 2, QUIET);
    let blocks: Vec<_> =
        a.iter().map(|r| r.value.as_ref().map(|v| v["transaction"].clone())).collect();
    assert_eq!(
        blocks,
        [
            Some(json!({"id": id, "total_order": 1, "data_collection_order": 1})),
            Some(json!({"id": id, "total_order": 2, "data_collection_order": 2})),
        ]
    );
    let b = broker.consume("shop.public.b", 1, QUIET);
    assert_eq!(
        b[0].value.as_ref().map(|v| v["transaction"].clone()),
        Some(json!({"id": id, "total_order": 3, "data_collection_order": 1}))
    );
    cdc.terminate();
}
