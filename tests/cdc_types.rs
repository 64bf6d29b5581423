//! `ficus cdc` on values at the edges of their types: domains, arrays of non-built-in types,
//! dates and times outside ISO's years and the infinities, and money under other locales.
//! Each value is checked in the snapshot and in the stream, which must agree.

mod common;

use std::time::Duration;

use common::broker::Broker;
use common::cdc::{config, Cdc};
use common::pg::PgCluster;
use serde_json::{json, Value};

const QUIET: Duration = Duration::from_secs(20);
const DAY_US: i64 = 86_400_000_000;

/// Creates `table` with `columns` in a database whose `lc_monetary` is `locale`, inserts
/// `values` as id 1, streams the table, inserts them again as id 2, and returns both rows'
/// `after` without their id: the snapshot's and the stream's.
async fn snapshot_and_stream(
    pg: &PgCluster,
    broker: &Broker,
    db_name: &str,
    locale: &str,
    setup: &str,
    columns: &str,
    values: &str,
) -> (Value, Value) {
    pg.database(db_name).await;
    let admin = pg.client(db_name).await;
    admin
        .batch_execute(&format!("ALTER DATABASE {db_name} SET lc_monetary = '{locale}'"))
        .await
        .expect("lc_monetary");
    // A new session, with the database's lc_monetary.
    let db = pg.client(db_name).await;
    db.batch_execute(&format!(
        "{setup}; CREATE TABLE t (id int PRIMARY KEY, {columns}); INSERT INTO t VALUES (1, {values});"
    ))
    .await
    .expect("schema");
    let extra = format!("tables = [\"t\"]\nslot = \"{db_name}\"\npublication = \"{db_name}\"");
    let mut cdc = Cdc::start(&config(&pg.url(db_name), broker, db_name, &extra));
    cdc.wait_log("streaming changes", QUIET);
    db.batch_execute(&format!("INSERT INTO t VALUES (2, {values})")).await.expect("insert");
    let records = broker.consume(&format!("{db_name}.public.t"), 2, QUIET);
    cdc.terminate();
    assert_eq!(records.len(), 2, "{}", cdc.logs());
    let after = |i: usize| {
        let mut after = records[i].value.as_ref().expect("value")["after"].clone();
        after.as_object_mut().expect("row").remove("id");
        after
    };
    (after(0), after(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domains_arrays_dates_times_and_money_keep_their_json_types() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    let setup = "CREATE TYPE mood AS ENUM ('sad', 'happy');
         CREATE DOMAIN dint AS int CHECK (VALUE > 0); CREATE DOMAIN dint2 AS dint;
         CREATE DOMAIN dbool AS boolean; CREATE DOMAIN dbytea AS bytea;
         CREATE DOMAIN ddate AS date; CREATE DOMAIN dtstz AS timestamptz;
         CREATE DOMAIN dia AS int[]";
    let columns =
        "di dint, ddi dint2, db dbool, dby dbytea, dd ddate, dtz dtstz, dia dia, dis dint[],
         ips inet[], moods mood[], d_bc date, d_big date, d_inf date, d_ninf date,
         ts_bc timestamp, ts_big timestamp, ts_inf timestamp, tz_bc timestamptz, tz_big timestamptz,
         tz_ninf timestamptz, t_end time, m money";
    let values = "42, 7, true, '\\x0102', '2022-01-01', '2022-01-01 10:00:00+02', '{1,2}', '{3,4}',
         '{10.0.0.1,::1}', '{sad,happy}', '0044-03-15 BC', '10000-01-01', 'infinity', '-infinity',
         '0044-03-15 12:00:00 BC', '10000-01-01 00:00:00', 'infinity', '0044-03-15 00:00:00+00 BC',
         '10000-01-01 00:00:00+00', '-infinity', '24:00:00', (-1234.5)::numeric::money";
    let (snapshot, stream) =
        snapshot_and_stream(&pg, &broker, "shop", "de_DE.UTF-8", setup, columns, values).await;
    let expected = json!({
        "di": 42, "ddi": 7, "db": true, "dby": "AQI=", "dd": 18_993, "dtz": "2022-01-01T08:00:00Z",
        "dia": [1, 2], "dis": [3, 4], "ips": ["10.0.0.1", "::1"], "moods": ["sad", "happy"],
        "d_bc": -735_160, "d_big": 2_932_897, "d_inf": 2_146_033_979, "d_ninf": -2_147_472_691,
        "ts_bc": -735_160 * DAY_US + 12 * 3_600_000_000, "ts_big": 2_932_897 * DAY_US,
        "ts_inf": 9_223_372_036_825_200_000_i64,
        "tz_bc": "-0043-03-15T00:00:00Z", "tz_big": "+10000-01-01T00:00:00Z",
        "tz_ninf": "-292275055-05-16T23:00:00Z", "t_end": DAY_US,
        "m": "-1234.50",
    });
    assert_eq!(snapshot, expected, "snapshot");
    assert_eq!(stream, expected, "stream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn money_takes_its_scale_from_the_databases_locale() {
    let (pg, broker) = (PgCluster::start(), Broker::start());
    // Yen have no fraction digits: the stored 123450 means 123450 yen.
    let (snapshot, stream) = snapshot_and_stream(
        &pg,
        &broker,
        "yen",
        "ja_JP.UTF-8",
        "SELECT 1",
        "m money, ms money[]",
        "123450::numeric::money, ARRAY[5::numeric::money]",
    )
    .await;
    let expected = json!({"m": "123450", "ms": ["5"]});
    assert_eq!(snapshot, expected, "snapshot");
    assert_eq!(stream, expected, "stream");
}
