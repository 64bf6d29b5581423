//! Reads the chunks of an incremental snapshot (decided by [`crate::incremental`]) on a
//! SQL connection of its own: the low watermark, a page of rows in key order inside a
//! REPEATABLE READ snapshot with that snapshot's visibility, and the high watermark.

use std::sync::Arc;

use bytes::Bytes;
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

use crate::catalog::{self, PublishedTable};
use crate::error::CdcError;
use crate::event::Table;
use crate::incremental::{watermark_content, ChunkPlan, ChunkRead, Visibility, WATERMARK_PREFIX};
use crate::names::quote_ident;
use crate::pgoutput::Datum;

/// The statements that read one table's chunks.
#[derive(Debug)]
pub struct ChunkQuery {
    /// The first page.
    first: String,
    /// A page after a key, given as text parameters.
    after: String,
    limit: usize,
}

impl ChunkQuery {
    /// The pages of `table` in key order, `limit` rows each, holding what the stream holds:
    /// the publication's columns and row filter, and only the table itself when its
    /// children are streamed apart. `None` when the table has no key to page by.
    pub async fn prepare(
        client: &Client,
        table: &Table,
        published: &PublishedTable,
        limit: usize,
    ) -> Result<Option<ChunkQuery>, CdcError> {
        if table.key.is_empty() {
            return Ok(None);
        }
        let columns: Vec<String> = table
            .relation
            .columns
            .iter()
            .map(|c| format!("{}::text", quote_ident(&c.name)))
            .collect();
        let mut keys = Vec::with_capacity(table.key.len());
        let mut bounds = Vec::with_capacity(table.key.len());
        for (n, &index) in table.key.iter().enumerate() {
            let column = &table.relation.columns[index];
            let type_name: String = client
                .query_one("SELECT format_type($1, $2)", &[&column.type_oid, &column.type_modifier])
                .await?
                .get(0);
            // Qualified: a bare name in ORDER BY would mean the output column, its text.
            keys.push(format!("{}.{}", published.name.sql(), quote_ident(&column.name)));
            bounds.push(format!("${}::text::{type_name}", n + 1));
        }
        let only = if catalog::copy_only(client, table.relation.id).await? { "ONLY " } else { "" };
        let from = format!("FROM {only}{}", published.name.sql());
        let (keys, bounds) = (keys.join(", "), bounds.join(", "));
        let select = format!("SELECT {}", columns.join(", "));
        let filter = published.row_filter.as_ref().map_or(String::new(), |f| format!("({f}) AND "));
        Ok(Some(ChunkQuery {
            first: format!(
                "{select} {from} {} ORDER BY {keys} LIMIT {limit}",
                published.row_filter.as_ref().map_or(String::new(), |f| format!("WHERE {f}"))
            ),
            after: format!(
                "{select} {from} WHERE {filter}({keys}) > ({bounds}) ORDER BY {keys} LIMIT {limit}"
            ),
            limit,
        }))
    }
}

/// Writes `plan`'s low watermark, then reads its rows; the high watermark is written by
/// [`high`] once the stream's core has them.
pub async fn read(
    client: Arc<Client>,
    query: Arc<ChunkQuery>,
    plan: ChunkPlan,
) -> Result<ChunkRead, CdcError> {
    watermark(&client, false, &plan.id).await?;
    client.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await?;
    let read = async {
        // The snapshot is taken by the transaction's first statement: this one.
        let snapshot: String =
            client.query_one("SELECT pg_current_snapshot()::text", &[]).await?.get(0);
        let rows = match &plan.after {
            None => client.query(&query.first, &[]).await?,
            Some(after) => {
                let bounds: Vec<Option<&str>> = after.iter().map(text).collect();
                let params: Vec<&(dyn ToSql + Sync)> =
                    bounds.iter().map(|b| b as &(dyn ToSql + Sync)).collect();
                client.query(&query.after, &params).await?
            }
        };
        Ok::<_, CdcError>((snapshot, rows))
    }
    .await;
    let (snapshot, rows) = match read {
        Ok(read) => read,
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(e);
        }
    };
    client.batch_execute("COMMIT").await?;
    let visibility: Visibility = snapshot.parse().map_err(CdcError::Protocol)?;
    let complete = rows.len() < query.limit;
    let rows = rows
        .iter()
        .map(|row| {
            (0..row.len())
                .map(|i| match row.get::<_, Option<&str>>(i) {
                    Some(value) => Datum::Text(Bytes::copy_from_slice(value.as_bytes())),
                    None => Datum::Null,
                })
                .collect()
        })
        .collect();
    Ok(ChunkRead { id: plan.id, rows, visibility, complete })
}

/// Writes the high watermark of chunk `id`.
pub async fn high(client: Arc<Client>, id: String) -> Result<(), CdcError> {
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

fn text(datum: &Datum) -> Option<&str> {
    match datum {
        Datum::Text(bytes) => std::str::from_utf8(bytes).ok(),
        _ => None,
    }
}
