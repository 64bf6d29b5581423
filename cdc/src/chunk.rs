//! Reads the chunks of an incremental snapshot (decided by [`crate::incremental`]) on a
//! SQL connection of its own: the low watermark, a page of rows in key order inside a
//! REPEATABLE READ snapshot with that snapshot's visibility, and the high watermark.

use futures_util::StreamExt;
use tokio_postgres::Client;

use crate::catalog::{self, PublishedTable};
use crate::copy::CopyRows;
use crate::error::CdcError;
use crate::event::Table;
use crate::incremental::{
    watermark_content, ChunkPlan, ChunkQuery, ChunkRead, Visibility, WATERMARK_PREFIX,
};
use crate::names::{quote_ident, quote_literal};
use crate::pgoutput::Datum;

/// The columns of a table as the catalog holds them (name, type, modifier), to notice an
/// `ALTER TABLE` between a table's lookup and a chunk.
const COLUMNS_FINGERPRINT: &str = "SELECT coalesce(string_agg(attname::text || ' ' || atttypid::text || ' ' || atttypmod::text, ',' ORDER BY attnum), '') \
     FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped AND attgenerated = ''";

/// How `table`'s chunks are read, `limit` rows each in key order, holding what the stream
/// holds: the publication's columns and row filter, and only the table itself when its
/// children are streamed apart. `None` when the table has no key to page by.
pub async fn query(
    client: &Client,
    table: &Table,
    published: &PublishedTable,
    limit: usize,
) -> Result<Option<ChunkQuery>, CdcError> {
    if table.key.is_empty() {
        return Ok(None);
    }
    let mut keys = Vec::with_capacity(table.key.len());
    for &index in &table.key {
        let column = &table.relation.columns[index];
        let type_name: String = client
            .query_one("SELECT format_type($1, $2)", &[&column.type_oid, &column.type_modifier])
            .await?
            .get(0);
        // Qualified: a bare name in ORDER BY could mean an output column.
        keys.push((format!("{}.{}", published.name.sql(), quote_ident(&column.name)), type_name));
    }
    let columns: Vec<String> =
        table.relation.columns.iter().map(|c| quote_ident(&c.name)).collect();
    let only = if catalog::copy_only(client, table.relation.id).await? { "ONLY " } else { "" };
    let fingerprint: String =
        client.query_one(COLUMNS_FINGERPRINT, &[&table.relation.id]).await?.get(0);
    Ok(Some(ChunkQuery {
        relation: table.relation.id,
        table: published.name.sql(),
        select: format!("SELECT {} FROM {only}{}", columns.join(", "), published.name.sql()),
        row_filter: published.row_filter.clone(),
        keys,
        limit,
        fingerprint,
    }))
}

/// The statement that reads the rows after `after` (text values of the key columns).
fn statement(query: &ChunkQuery, after: Option<&[Datum]>) -> String {
    let mut conditions: Vec<String> = query.row_filter.iter().map(|f| format!("({f})")).collect();
    if let Some(after) = after {
        let columns: Vec<&str> = query.keys.iter().map(|(column, _)| column.as_str()).collect();
        let bounds: Vec<String> = query
            .keys
            .iter()
            .zip(after)
            .map(|((_, type_name), value)| format!("{}::{type_name}", literal(value)))
            .collect();
        conditions.push(format!("({}) > ({})", columns.join(", "), bounds.join(", ")));
    }
    let filter = if conditions.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conditions.join(" AND "))
    };
    let order: Vec<&str> = query.keys.iter().map(|(column, _)| column.as_str()).collect();
    // COPY, as the initial snapshot reads: values in their output form, as the stream has
    // them (a cast to text would differ for char(n), inet, ...).
    format!(
        "COPY ({}{filter} ORDER BY {} LIMIT {}) TO STDOUT",
        query.select,
        order.join(", "),
        query.limit
    )
}

fn literal(value: &Datum) -> String {
    match value {
        Datum::Text(bytes) => quote_literal(&String::from_utf8_lossy(bytes)),
        _ => "NULL".into(),
    }
}

/// Writes `plan`'s low watermark, then reads its rows; the high watermark is written by
/// [`high`] once the stream's core has them. `None` when the table's columns changed since
/// it was looked up: it must be looked up again.
pub async fn read(
    client: std::sync::Arc<Client>,
    plan: ChunkPlan,
) -> Result<Option<ChunkRead>, CdcError> {
    watermark(&client, false, &plan.id).await?;
    // The lock before the snapshot: a table rewrite (ALTER COLUMN TYPE) committed after the
    // snapshot would otherwise show the chunk an empty table.
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; LOCK TABLE {} IN ACCESS SHARE MODE",
            plan.query.table
        ))
        .await?;
    let read = async {
        // The snapshot is taken by the transaction's first statement: this one.
        let snapshot: String =
            client.query_one("SELECT pg_current_snapshot()::text", &[]).await?.get(0);
        let fingerprint: String =
            client.query_one(COLUMNS_FINGERPRINT, &[&plan.query.relation]).await?.get(0);
        if fingerprint != plan.query.fingerprint {
            return Ok(None);
        }
        let stream = client.copy_out(&statement(&plan.query, plan.after.as_deref())).await?;
        futures_util::pin_mut!(stream);
        let (mut parser, mut rows) = (CopyRows::default(), Vec::new());
        while let Some(data) = stream.next().await {
            rows.extend(parser.push(&data?));
        }
        Ok::<_, CdcError>(Some((snapshot, rows)))
    }
    .await;
    let (snapshot, rows) = match read {
        Ok(Some(read)) => read,
        Ok(None) => {
            client.batch_execute("ROLLBACK").await?;
            return Ok(None);
        }
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(e);
        }
    };
    client.batch_execute("COMMIT").await?;
    let visibility: Visibility = snapshot.parse().map_err(CdcError::Protocol)?;
    let complete = rows.len() < plan.query.limit;
    Ok(Some(ChunkRead { id: plan.id, rows, visibility, complete }))
}

/// Writes the high watermark of chunk `id`.
pub async fn high(client: std::sync::Arc<Client>, id: String) -> Result<(), CdcError> {
    watermark(&client, true, &id).await
}

async fn watermark(client: &Client, high: bool, id: &str) -> Result<(), CdcError> {
    let content = watermark_content(high, id);
    client
        .execute(
            "SELECT pg_logical_emit_message(true, $1::text, $2::text)",
            &[&WATERMARK_PREFIX, &content],
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    #[test]
    fn chunks_page_by_key_with_the_bounds_quoted() {
        let query = ChunkQuery {
            relation: 1,
            table: "\"s\".\"t\"".into(),
            select: "SELECT \"a\", \"b\" FROM \"s\".\"t\"".into(),
            row_filter: Some("b > 0".into()),
            keys: vec![
                ("\"s\".\"t\".\"a\"".into(), "integer".into()),
                ("\"s\".\"t\".\"b\"".into(), "text".into()),
            ],
            limit: 10,
            fingerprint: String::new(),
        };
        assert_eq!(
            statement(&query, None),
            "COPY (SELECT \"a\", \"b\" FROM \"s\".\"t\" WHERE (b > 0) ORDER BY \"s\".\"t\".\"a\", \"s\".\"t\".\"b\" LIMIT 10) TO STDOUT"
        );
        let after =
            [Datum::Text(Bytes::from_static(b"7")), Datum::Text(Bytes::from_static(b"it's"))];
        let sql = statement(&query, Some(&after));
        assert!(
            sql.contains("WHERE (b > 0) AND (\"s\".\"t\".\"a\", \"s\".\"t\".\"b\") > ('7'::integer, 'it''s'::text) ORDER BY"),
            "{sql}"
        );
    }
}
