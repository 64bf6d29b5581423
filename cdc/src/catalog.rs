//! Everything ficus asks PostgreSQL with ordinary SQL: preconditions, tables, publication,
//! slot state and key columns.

use tokio_postgres::Client;

use crate::error::CdcError;
use crate::event::Table;
use crate::pgoutput::{Column, Relation};
use crate::wire::quote_ident;

/// Fails with instructions when the server cannot do logical replication.
pub async fn check_wal_level(client: &Client) -> Result<(), CdcError> {
    let row = client.query_one("SHOW wal_level", &[]).await?;
    let level: String = row.get(0);
    if level != "logical" {
        return Err(CdcError::WalLevel(level));
    }
    Ok(())
}

/// The tables to stream: the configured ones (each must exist), or every user table.
pub async fn resolve_tables(
    client: &Client,
    configured: Option<&[(String, String)]>,
) -> Result<Vec<(String, String)>, CdcError> {
    match configured {
        Some(tables) => {
            for (schema, table) in tables {
                let exists = client
                    .query_opt(
                        "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                         WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
                        &[schema, table],
                    )
                    .await?;
                if exists.is_none() {
                    return Err(CdcError::MissingTable(format!("{schema}.{table}")));
                }
            }
            Ok(tables.to_vec())
        }
        None => {
            let rows = client
                .query(
                    "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition \
                     AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%' \
                     ORDER BY 1, 2",
                    &[],
                )
                .await?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        }
    }
}

/// Creates the publication if missing, and adds configured tables it lacks.
pub async fn ensure_publication(
    client: &Client,
    name: &str,
    tables: Option<&[(String, String)]>,
) -> Result<(), CdcError> {
    let exists = client
        .query_opt("SELECT puballtables FROM pg_publication WHERE pubname = $1", &[&name])
        .await?;
    let qualified = |(schema, table): &(String, String)| {
        format!("{}.{}", quote_ident(schema), quote_ident(table))
    };
    let result = match (exists, tables) {
        (None, None) => {
            client
                .batch_execute(&format!(
                    "CREATE PUBLICATION {} FOR ALL TABLES WITH (publish_via_partition_root = true)",
                    quote_ident(name)
                ))
                .await
        }
        (None, Some(tables)) => {
            let list = tables.iter().map(qualified).collect::<Vec<_>>().join(", ");
            client
                .batch_execute(&format!(
                    "CREATE PUBLICATION {} FOR TABLE {list} WITH (publish_via_partition_root = true)",
                    quote_ident(name)
                ))
                .await
        }
        (Some(row), Some(tables)) if !row.get::<_, bool>(0) => {
            let mut missing = Vec::new();
            for table in tables {
                let included = client
                    .query_opt(
                        "SELECT 1 FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid \
                         JOIN pg_class c ON c.oid = r.prrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
                         WHERE p.pubname = $1 AND n.nspname = $2 AND c.relname = $3",
                        &[&name, &table.0, &table.1],
                    )
                    .await?;
                if included.is_none() {
                    missing.push(qualified(table));
                }
            }
            if missing.is_empty() {
                return Ok(());
            }
            tracing::info!(publication = name, tables = %missing.join(", "), "adding tables to the publication");
            client
                .batch_execute(&format!(
                    "ALTER PUBLICATION {} ADD TABLE {}",
                    quote_ident(name),
                    missing.join(", ")
                ))
                .await
        }
        (Some(_), _) => return Ok(()),
    };
    result.map_err(privilege_or_sql)
}

fn privilege_or_sql(e: tokio_postgres::Error) -> CdcError {
    match e.as_db_error() {
        Some(db) if db.code().code() == "42501" => CdcError::Privilege(db.message().to_string()),
        _ => CdcError::Sql(e),
    }
}

/// The state of a replication slot, if it exists.
pub struct SlotState {
    pub active_pid: Option<i32>,
    pub wal_status: Option<String>,
    pub plugin: Option<String>,
}

pub async fn slot_state(client: &Client, slot: &str) -> Result<Option<SlotState>, CdcError> {
    let row = client
        .query_opt(
            "SELECT active_pid, wal_status, plugin FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.map(|r| SlotState { active_pid: r.get(0), wal_status: r.get(1), plugin: r.get(2) }))
}

/// A table's columns in order and its key, as the snapshot needs before any Relation message.
pub async fn table_schema(
    client: &Client,
    schema: &str,
    table: &str,
    topic_prefix: &str,
) -> Result<Table, CdcError> {
    let row = client
        .query_one(
            "SELECT c.oid, c.relreplident::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&schema, &table],
        )
        .await?;
    let oid: u32 = row.get(0);
    let identity: String = row.get(1);
    let rows = client
        .query(
            "SELECT a.attname, a.atttypid, a.atttypmod FROM pg_attribute a \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' ORDER BY a.attnum",
            &[&oid],
        )
        .await?;
    let columns = rows
        .iter()
        .map(|r| Column {
            is_key: false,
            name: r.get(0),
            type_oid: r.get(1),
            type_modifier: r.get(2),
        })
        .collect();
    let relation = Relation {
        id: oid,
        namespace: schema.to_string(),
        name: table.to_string(),
        replica_identity: identity.bytes().next().unwrap_or(b'd'),
        columns,
    };
    table_for(client, relation, topic_prefix).await
}

/// Builds the event view of a relation: its topic and key columns.
///
/// The key is the primary key, except under `REPLICA IDENTITY USING INDEX`, where it is that
/// index's columns: those are the values a delete carries. Without either (or under FULL
/// without a primary key) events have a null key.
pub async fn table_for(
    client: &Client,
    relation: Relation,
    topic_prefix: &str,
) -> Result<Table, CdcError> {
    let index =
        if relation.replica_identity == b'i' { "i.indisreplident" } else { "i.indisprimary" };
    let rows = client
        .query(
            &format!(
                "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                 WHERE i.indrelid = $1 AND {index} ORDER BY array_position(i.indkey::int2[], a.attnum)"
            ),
            &[&relation.id],
        )
        .await?;
    let names: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let key = names
        .iter()
        .filter_map(|name| relation.columns.iter().position(|c| &c.name == name))
        .collect();
    let topic = topic_name(topic_prefix, &relation.namespace, &relation.name);
    Ok(Table { relation, key, topic })
}

/// `<prefix>.<schema>.<table>`, with characters Kafka does not allow in topic names replaced
/// by `_`, as Debezium does.
pub fn topic_name(prefix: &str, schema: &str, table: &str) -> String {
    format!("{prefix}.{schema}.{table}")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' })
        .collect()
}

/// Whether `COPY` of the table must say `ONLY`: plain tables may have inheritance children,
/// which are snapshotted on their own; a partitioned table is read through its root.
pub async fn copy_only(client: &Client, oid: u32) -> Result<bool, CdcError> {
    let kind: i8 =
        client.query_one("SELECT relkind FROM pg_class WHERE oid = $1", &[&oid]).await?.get(0);
    Ok(kind as u8 == b'r')
}
