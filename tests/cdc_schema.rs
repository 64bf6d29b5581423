//! `ficus cdc` against schemas as users really have them: publications they made themselves,
//! tables dropped or re-keyed before ficus caught up, unusual replica identities, table
//! names that Kafka topics cannot tell apart, and columns that must not leave the database.

mod common;

use std::time::Duration;

use common::broker::Broker;
use common::cdc::{config, Cdc};
use common::pg::PgCluster;
use serde_json::json;

const QUIET: Duration = Duration::from_secs(20);

/// Three one-row tables, p1 to p3.
async fn three_tables(pg: &PgCluster) -> tokio_postgres::Client {
    let db = pg.database("shop").await;
    db.batch_execute(
        "CREATE TABLE p1 (id int PRIMARY KEY); CREATE TABLE p2 (id int PRIMARY KEY);
         CREATE TABLE p3 (id int PRIMARY KEY);
         INSERT INTO p1 VALUES (1); INSERT INTO p2 VALUES (1); INSERT INTO p3 VALUES (1);",
    )
    .await
    .expect("schema");
    db
}

fn ops(records: &[common::broker::Consumed]) -> Vec<String> {
    records
        .iter()
        .map(|r| {
            r.value.as_ref().map_or("tombstone".into(), |v| v["op"].as_str().unwrap_or("?").into())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tables_the_existing_publication_decides_what_is_snapshotted_and_streamed() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    let db = three_tables(&pg).await;
    db.batch_execute("CREATE PUBLICATION ficus FOR TABLE p2").await.expect("publication");
    let mut cdc = Cdc::start(&config(&pg.url("shop"), &broker, "pub", ""));
    cdc.wait_log("streaming changes", QUIET);
    db.batch_execute(
        "INSERT INTO p1 VALUES (2); INSERT INTO p2 VALUES (2); INSERT INTO p3 VALUES (2);",
    )
    .await
    .expect("changes");
    let p2 = broker.consume("pub.public.p2", 2, QUIET);
    assert_eq!(ops(&p2), ["r", "c"]);
    cdc.terminate();
    assert!(
        !broker.has_topic("pub.public.p1") && !broker.has_topic("pub.public.p3"),
        "tables outside the publication are neither snapshotted nor streamed:\n{}",
        cdc.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_tables_are_exactly_what_is_streamed_from_a_wider_publication() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    let db = three_tables(&pg).await;
    db.batch_execute("CREATE PUBLICATION theirs FOR ALL TABLES").await.expect("publication");
    let extra = "tables = [\"p1\"]\npublication = \"theirs\"";
    let mut cdc = Cdc::start(&config(&pg.url("shop"), &broker, "wide", extra));
    cdc.wait_log("streaming changes", QUIET);
    db.batch_execute("INSERT INTO p2 VALUES (2); INSERT INTO p1 VALUES (2); UPDATE p3 SET id = 3;")
        .await
        .expect("changes");
    let p1 = broker.consume("wide.public.p1", 3, Duration::from_secs(3));
    assert_eq!(ops(&p1), ["r", "c"]);
    cdc.terminate();
    assert!(
        !broker.has_topic("wide.public.p2"),
        "p2 is published, not configured:\n{}",
        cdc.logs()
    );
    assert!(!broker.has_topic("wide.public.p3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_lacking_configured_tables_is_extended_only_if_ficus_made_it() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    let db = three_tables(&pg).await;

    // Someone else's publication: left alone, and the SQL to run is in the error.
    db.batch_execute("CREATE PUBLICATION theirs FOR TABLE p2").await.expect("publication");
    let extra = "tables = [\"p1\"]\npublication = \"theirs\"";
    let mut cdc = Cdc::start(&config(&pg.url("shop"), &broker, "theirs", extra));
    assert!(!cdc.wait_exit().success());
    assert!(
        cdc.logs().contains(r#"ALTER PUBLICATION \"theirs\" ADD TABLE \"public\".\"p1\""#)
            || cdc.logs().contains(r#"ALTER PUBLICATION "theirs" ADD TABLE "public"."p1""#),
        "{}",
        cdc.logs()
    );
    let published: i64 = db
        .query_one("SELECT count(*) FROM pg_publication_tables WHERE pubname = 'theirs'", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(published, 1, "the user's publication is unchanged");
    let slots: i64 =
        db.query_one("SELECT count(*) FROM pg_replication_slots", &[]).await.expect("slots").get(0);
    assert_eq!(slots, 0, "nothing started");

    // ficus's own publication (made by a first run for p1) is extended, with a warning.
    let extra = "tables = [\"p1\"]\npublication = \"mine\"\nsnapshot = \"initial_only\"";
    let mut cdc = Cdc::start(&config(&pg.url("shop"), &broker, "mine", extra));
    assert!(cdc.wait_exit().success(), "{}", cdc.logs());
    let extra = "tables = [\"p1\", \"p2\"]\npublication = \"mine\"";
    let mut cdc = Cdc::start(&config(&pg.url("shop"), &broker, "mine", extra));
    cdc.wait_log("streaming changes", QUIET);
    let warning =
        cdc.logs().lines().find(|l| l.contains("adding configured tables")).map(str::to_string);
    assert!(
        warning.as_ref().is_some_and(|l| l.contains("WARN") && l.contains("public.p2")),
        "{}",
        cdc.logs()
    );
    db.batch_execute("INSERT INTO p2 VALUES (2)").await.expect("insert");
    assert_eq!(ops(&broker.consume("mine.public.p2", 2, QUIET)), ["r", "c"]);
    cdc.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_the_keys_at_the_time_of_the_change_even_after_drop_or_re_key() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    let db = pg.database("shop").await;
    db.batch_execute(
        "CREATE TABLE gone (id int PRIMARY KEY, v text);
         CREATE TABLE rekeyed (a int PRIMARY KEY, b int NOT NULL);",
    )
    .await
    .expect("schema");
    let mut cdc = Cdc::start(&config(&pg.url("shop"), &broker, "keys", ""));
    cdc.wait_log("streaming changes", QUIET);
    cdc.terminate();

    // While ficus is down: changes, then the table's key changes or the table goes.
    db.batch_execute(
        "INSERT INTO gone VALUES (1, 'x'); DELETE FROM gone WHERE id = 1; DROP TABLE gone;
         INSERT INTO rekeyed VALUES (1, 10); DELETE FROM rekeyed WHERE a = 1;
         ALTER TABLE rekeyed DROP CONSTRAINT rekeyed_pkey, ADD PRIMARY KEY (b);
         INSERT INTO rekeyed VALUES (2, 20); DELETE FROM rekeyed WHERE b = 20;",
    )
    .await
    .expect("changes");
    cdc.spawn();
    cdc.wait_log("streaming changes", QUIET);

    let gone = broker.consume("keys.public.gone", 3, QUIET);
    assert_eq!(ops(&gone), ["c", "d", "tombstone"], "{gone:#?}");
    assert!(gone.iter().all(|r| r.key == Some(json!({"id": 1}))), "{gone:#?}");

    let rekeyed = broker.consume("keys.public.rekeyed", 6, QUIET);
    assert_eq!(ops(&rekeyed), ["c", "d", "tombstone", "c", "d", "tombstone"]);
    let keys: Vec<_> = rekeyed.iter().map(|r| r.key.clone()).collect();
    assert_eq!(
        keys,
        [
            json!({"a": 1}),
            json!({"a": 1}),
            json!({"a": 1}),
            json!({"b": 20}),
            json!({"b": 20}),
            json!({"b": 20})
        ]
        .map(Some)
    );
    cdc.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_change_under_replica_identity_full_keeps_unchanged_toasted_values() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    let db = pg.database("shop").await;
    db.batch_execute(
        "CREATE TABLE docs (id int PRIMARY KEY, title text, body text);
         ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
         ALTER TABLE docs REPLICA IDENTITY FULL;",
    )
    .await
    .expect("schema");
    let mut cdc = Cdc::start(&config(&pg.url("shop"), &broker, "full", "tables = [\"docs\"]"));
    cdc.wait_log("streaming changes", QUIET);
    let long = "y".repeat(10_000);
    db.execute("INSERT INTO docs VALUES (1, 'a', $1)", &[&long]).await.expect("insert");
    db.batch_execute("UPDATE docs SET id = 2, title = 'b' WHERE id = 1").await.expect("re-key");
    let records = broker.consume("full.public.docs", 4, QUIET);
    assert_eq!(ops(&records), ["c", "d", "tombstone", "c"]);
    let (deleted, created) = (&records[1], &records[3]);
    let body = |r: &common::broker::Consumed, image: &str| {
        r.value.as_ref().expect("value")[image]["body"].as_str().map(str::len)
    };
    assert_eq!(body(deleted, "before"), Some(10_000));
    assert_eq!(body(created, "after"), Some(10_000), "from the old row, not the placeholder");
    assert_eq!(created.value.as_ref().expect("value")["after"]["title"], "b");
    // Debezium's headers link the two halves of the key change.
    assert_eq!(deleted.header("__debezium.newkey"), Some(&json!({"id": 2})));
    assert_eq!(records[2].header("__debezium.newkey"), Some(&json!({"id": 2})));
    assert_eq!(created.header("__debezium.oldkey"), Some(&json!({"id": 1})));
    assert_eq!(records[0].headers, []);
    cdc.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_is_the_primary_key_under_replica_identity_using_index() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    let db = pg.database("shop").await;
    db.batch_execute(
        "CREATE TABLE users (id int PRIMARY KEY, email text NOT NULL);
         CREATE UNIQUE INDEX users_email_id ON users (email, id);
         ALTER TABLE users REPLICA IDENTITY USING INDEX users_email_id;
         INSERT INTO users VALUES (1, 'a@x');",
    )
    .await
    .expect("schema");
    let mut cdc = Cdc::start(&config(&pg.url("shop"), &broker, "ri", "tables = [\"users\"]"));
    cdc.wait_log("streaming changes", QUIET);
    db.batch_execute(
        "INSERT INTO users VALUES (2, 'b@x'); UPDATE users SET email = 'c@x' WHERE id = 2;
         DELETE FROM users WHERE id = 2;",
    )
    .await
    .expect("changes");
    let records = broker.consume("ri.public.users", 5, QUIET);
    assert_eq!(ops(&records), ["r", "c", "u", "d", "tombstone"], "{records:#?}");
    let keys: Vec<_> = records.iter().map(|r| r.key.clone()).collect();
    assert_eq!(
        keys,
        [json!({"id": 1}), json!({"id": 2}), json!({"id": 2}), json!({"id": 2}), json!({"id": 2})]
            .map(Some)
    );
    cdc.terminate();

    // An identity index without the primary key: deletes could not name their key.
    db.batch_execute(
        "CREATE TABLE accounts (id int PRIMARY KEY, email text NOT NULL UNIQUE);
         ALTER TABLE accounts REPLICA IDENTITY USING INDEX accounts_email_key;",
    )
    .await
    .expect("schema");
    let extra = "tables = [\"accounts\"]\nslot = \"s2\"\npublication = \"p2\"";
    let mut cdc = Cdc::start(&config(&pg.url("shop"), &broker, "ri2", extra));
    assert!(!cdc.wait_exit().success());
    let logs = cdc.logs();
    assert!(
        logs.contains("public.accounts")
            && logs.contains("accounts_email_key")
            && logs.contains("REPLICA IDENTITY DEFAULT"),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_that_would_share_a_topic_are_refused_and_quoted_names_work() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    let db = pg.database("shop").await;
    db.batch_execute(
        r#"CREATE SCHEMA "a.b"; CREATE SCHEMA a;
           CREATE TABLE "a.b".c (id int PRIMARY KEY); CREATE TABLE a."b.c" (id int PRIMARY KEY);
           INSERT INTO "a.b".c VALUES (1); INSERT INTO a."b.c" VALUES (2);"#,
    )
    .await
    .expect("schema");
    let extra = r#"tables = ['"a.b".c', 'a."b.c"']"#;
    let mut cdc = Cdc::start(&config(&pg.url("shop"), &broker, "dots", extra));
    assert!(!cdc.wait_exit().success());
    let logs = cdc.logs();
    assert!(
        logs.contains(r#"\"a.b\".c"#) || logs.contains(r#""a.b".c"#),
        "names the first table: {logs}"
    );
    assert!(logs.contains("would share one Kafka topic"), "{logs}");

    // One of them alone streams, under its quoted name.
    let extra = "tables = ['a.\"b.c\"']\nslot = \"one\"\npublication = \"one\"";
    let mut cdc = Cdc::start(&config(&pg.url("shop"), &broker, "dots", extra));
    cdc.wait_log("streaming changes", QUIET);
    let records = broker.consume("dots.a.b.c", 1, QUIET);
    assert_eq!(records[0].key, Some(json!({"id": 2})));
    assert_eq!(records[0].value.as_ref().expect("value")["source"]["table"], "b.c");
    cdc.terminate();

    // Without `tables`, the publication's: "Foo Bar" and Foo_Bar collide too.
    let other = pg.database("other").await;
    other
        .batch_execute(r#"CREATE TABLE "Foo Bar" (id int); CREATE TABLE "Foo_Bar" (id int);"#)
        .await
        .expect("schema");
    let extra = "slot = \"all\"\npublication = \"all\"";
    let mut cdc = Cdc::start(&config(&pg.url("other"), &broker, "all", extra));
    assert!(!cdc.wait_exit().success());
    assert!(
        cdc.logs().contains("would share one Kafka topic") && cdc.logs().contains("Foo_Bar"),
        "{}",
        cdc.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_composite_key_keeps_the_primary_keys_order_under_every_identity() {
    let pg = PgCluster::start();
    let db = pg.database("shop").await;
    db.batch_execute(
        "CREATE TABLE plain (a int, b int, PRIMARY KEY (b, a));
         CREATE TABLE full_row (a int, b int, PRIMARY KEY (b, a));
         ALTER TABLE full_row REPLICA IDENTITY FULL;
         INSERT INTO plain VALUES (1, 2); INSERT INTO full_row VALUES (1, 2);",
    )
    .await
    .expect("schema");
    let text = format!(
        "[source]\nurl = \"{}\"\ntables = [\"plain\", \"full_row\"]\n\n[kafka]\ntopic_prefix = \"shop\"\n",
        pg.url("shop")
    );
    let mut cdc = Cdc::start_stdout(&text);
    cdc.wait_log("streaming changes", QUIET);
    db.batch_execute("INSERT INTO plain VALUES (3, 4); INSERT INTO full_row VALUES (3, 4);")
        .await
        .expect("inserts");
    // The raw bytes: a key's field order is part of the Kafka key.
    let keys: Vec<String> = cdc
        .stdout_lines(4, QUIET)
        .await
        .iter()
        .filter_map(|l| l.split_once("\"key\":").and_then(|(_, rest)| rest.split('}').next()))
        .map(str::to_string)
        .collect();
    assert_eq!(
        keys,
        ["{\"b\":2,\"a\":1", "{\"b\":2,\"a\":1", "{\"b\":4,\"a\":3", "{\"b\":4,\"a\":3"]
    );
    cdc.terminate();
}

/// The config of the masking tests: `rules` under `[columns."public.customers"]`, and a salt.
fn masking_config(pg: &PgCluster, broker: &Broker, dir: &std::path::Path, rules: &str) -> String {
    let salt = dir.join("salt");
    std::fs::write(&salt, "a salt of sixteen bytes or more\n").expect("salt");
    let base = config(&pg.url("shop"), broker, "shop", "tables = [\"public.customers\"]");
    format!(
        "{base}\n[columns.\"public.customers\"]\n{rules}\n\n[masking]\nsalt_file = \"{}\"\n",
        salt.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn excluded_and_masked_columns_never_leave_the_process() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    let db = pg.database("shop").await;
    db.batch_execute(
        "CREATE TABLE customers (id int PRIMARY KEY, email text, ssn text, phone text, name text);
         INSERT INTO customers VALUES (1, 'ada@example.com', '078-05-1120', '555-0100', 'Ada');",
    )
    .await
    .expect("schema");
    let dir = tempfile::tempdir().expect("dir");
    let rules = "exclude = [\"ssn\"]\nmask = { email = \"hash\", phone = \"redact\" }";
    let mut cdc = Cdc::start(&masking_config(&pg, &broker, dir.path(), rules));
    cdc.wait_log("streaming changes", QUIET);
    db.batch_execute(
        "INSERT INTO customers VALUES (2, 'grace@example.com', '219-09-9999', '555-0199', 'Grace');
         UPDATE customers SET email = 'ada@example.com', ssn = '111-22-3333', phone = NULL
           WHERE id = 2;
         DELETE FROM customers WHERE id = 1;",
    )
    .await
    .expect("changes");

    // The snapshot's read, the insert, the update, the delete and its tombstone.
    let records = broker.consume("shop.public.customers", 5, QUIET);
    assert_eq!(records.len(), 5, "{records:#?}");
    let everything: String =
        records.iter().map(|r| format!("{:?} {:?} {:?}", r.key, r.value, r.headers)).collect();
    for secret in ["078-05", "219-09", "111-22", "ssn", "555-01", "@example.com"] {
        assert!(!everything.contains(secret), "{secret} left the database: {everything}");
    }
    let row =
        |index: usize, image: &str| records[index].value.as_ref().expect("value")[image].clone();
    let (snapshot, updated) = (row(0, "after"), row(2, "after"));
    assert_eq!(snapshot["phone"], "***");
    assert_eq!(snapshot["name"], "Ada", "other columns are kept");
    assert_eq!(updated["phone"], serde_json::Value::Null, "a NULL stays NULL");
    // The same email hashes alike in the snapshot and the stream: joins still work.
    let hash = snapshot["email"].as_str().expect("hashed email");
    assert_eq!(hash.len(), 64);
    assert_eq!(updated["email"], hash);
    assert_ne!(row(1, "after")["email"], hash, "another email, another hash");
    cdc.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_naming_a_column_the_table_lacks_stops_before_any_event() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    let db = pg.database("shop").await;
    db.batch_execute(
        "CREATE TABLE customers (id int PRIMARY KEY, ssn text);
         INSERT INTO customers VALUES (1, '078-05-1120');",
    )
    .await
    .expect("schema");
    let dir = tempfile::tempdir().expect("dir");
    let mut cdc = Cdc::start(&masking_config(&pg, &broker, dir.path(), "exclude = [\"snn\"]"));
    assert!(!cdc.wait_exit().success(), "a typo must not let ssn out");
    let logs = cdc.logs();
    assert!(logs.contains("public.customers streams no column \"snn\""), "{logs}");
    assert!(
        !broker.has_topic("shop.public.customers")
            || broker.consume("shop.public.customers", 1, Duration::from_secs(3)).is_empty()
    );
}
