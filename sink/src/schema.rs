//! The target tables' shape: what a configured table is in the target's catalog and, with
//! `create = true`, the DDL that creates it from the source's catalog or adds a column the
//! events carry. The DDL text is pure; the catalog reads are I/O.

use std::collections::BTreeMap;

use ficus_cdc::names::{quote_ident, TableName};
use tokio_postgres::Client;

use crate::config::TableConfig;
use crate::plan::{Column, Mode, Target};
use crate::run::SinkError;
use crate::value::Kind;

/// A column of the source table, with a type the target can have: enums as `text`, domains
/// as their base type (user-defined types exist only in the source).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceColumn {
    pub name: String,
    pub type_sql: String,
    pub key: bool,
}

/// The source table's columns, in order; empty when it does not exist.
pub async fn source_columns(
    client: &Client,
    table: &TableName,
) -> Result<Vec<SourceColumn>, SinkError> {
    // The type a column of `t` can have in the target, when it is not its own name.
    let portable = |t: &str| {
        format!(
            "CASE WHEN {t}.typtype = 'e' THEN 'text' \
             WHEN {t}.typtype = 'd' THEN format_type({t}.typbasetype, {t}.typtypmod) END"
        )
    };
    let sql = format!(
        "SELECT a.attname::text, \
           coalesce({}, CASE WHEN t.typcategory = 'A' THEN {} || '[]' END, format_type(a.atttypid, a.atttypmod)), \
           coalesce(a.attnum = ANY(i.indkey::int2[]), false) \
         FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
         LEFT JOIN pg_type e ON e.oid = t.typelem \
         LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary \
         WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
        portable("t"),
        portable("e"),
    );
    let rows = client.query(&sql, &[&table.sql()]).await?;
    Ok(rows
        .iter()
        .map(|r| SourceColumn { name: r.get(0), type_sql: r.get(1), key: r.get(2) })
        .collect())
}

/// `CREATE TABLE` of `table` for `columns` (renamed as `renames` says), keyed as the source
/// is; an append table takes each event whole.
pub fn create_sql(
    table: &TableName,
    mode: Mode,
    columns: &[SourceColumn],
    renames: &BTreeMap<String, String>,
) -> String {
    let schema = format!("CREATE SCHEMA IF NOT EXISTS {}; ", quote_ident(&table.schema));
    if mode == Mode::Append {
        return format!(
            "{schema}CREATE TABLE IF NOT EXISTS {} (topic text NOT NULL, \"partition\" int NOT NULL, \
             \"offset\" bigint NOT NULL, key jsonb, value jsonb, PRIMARY KEY (topic, \"partition\", \"offset\"))",
            table.sql()
        );
    }
    let name = |c: &SourceColumn| quote_ident(renames.get(&c.name).unwrap_or(&c.name));
    let mut parts: Vec<String> =
        columns.iter().map(|c| format!("{} {}", name(c), c.type_sql)).collect();
    let key: Vec<String> = columns.iter().filter(|c| c.key).map(name).collect();
    if !key.is_empty() {
        parts.push(format!("PRIMARY KEY ({})", key.join(", ")));
    }
    format!("{schema}CREATE TABLE IF NOT EXISTS {} ({})", table.sql(), parts.join(", "))
}

/// `ALTER TABLE ... ADD COLUMN` of a source column the target lacks.
pub fn add_column_sql(
    table: &str,
    column: &SourceColumn,
    renames: &BTreeMap<String, String>,
) -> String {
    let name = renames.get(&column.name).unwrap_or(&column.name);
    format!(
        "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {} {}",
        quote_ident(name),
        column.type_sql
    )
}

/// The target catalog's view of a configured table; `None` when it does not exist.
pub async fn target(client: &Client, table: &TableConfig) -> Result<Option<Target>, SinkError> {
    let name = table.table_name().map_err(SinkError::Config)?;
    let sql = name.sql();
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), b.oid, \
             CASE WHEN b.typcategory = 'A' THEN b.typelem ELSE 0::oid END \
             FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
             JOIN pg_type b ON b.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END \
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY a.attnum",
            &[&sql],
        )
        .await?;
    if rows.is_empty() {
        return Ok(None);
    }
    let columns: Vec<Column> = rows
        .iter()
        .map(|r| {
            let element: u32 = r.get(3);
            Column {
                name: r.get(0),
                type_sql: r.get(1),
                kind: Kind::of(r.get(2), (element != 0).then_some(element)),
            }
        })
        .collect();
    let key_names: Vec<String> = client
        .query(
            "SELECT a.attname::text FROM pg_index i \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
             WHERE i.indrelid = to_regclass($1) AND i.indisprimary \
             ORDER BY array_position(i.indkey::int2[], a.attnum)",
            &[&sql],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if key_names.is_empty() && table.mode == Mode::Upsert {
        return Err(SinkError::Config(format!(
            "target table {name} has no primary key: upserts need one (or mode = \"append\")"
        )));
    }
    let key = key_names.iter().filter_map(|k| columns.iter().position(|c| &c.name == k)).collect();
    Ok(Some(Target {
        label: name.to_string(),
        sql,
        columns,
        key,
        renames: table.columns.clone().into_iter().collect(),
        mode: table.mode,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(name: &str, type_sql: &str, key: bool) -> SourceColumn {
        SourceColumn { name: name.into(), type_sql: type_sql.into(), key }
    }

    #[test]
    fn tables_are_created_renamed_and_keyed_as_the_source_is() {
        let columns = [column("id", "integer", true), column("total", "numeric(10,2)", false)];
        let renames = BTreeMap::from([("total".to_string(), "amount".to_string())]);
        let table = TableName::new("view", "orders");
        assert_eq!(
            create_sql(&table, Mode::Upsert, &columns, &renames),
            "CREATE SCHEMA IF NOT EXISTS \"view\"; CREATE TABLE IF NOT EXISTS \"view\".\"orders\" \
             (\"id\" integer, \"amount\" numeric(10,2), PRIMARY KEY (\"id\"))"
        );
        assert!(
            create_sql(&table, Mode::Append, &columns, &renames).contains("key jsonb, value jsonb")
        );
        assert_eq!(
            add_column_sql("view.orders", &column("Note", "text", false), &renames),
            "ALTER TABLE view.orders ADD COLUMN IF NOT EXISTS \"Note\" text"
        );
    }
}
