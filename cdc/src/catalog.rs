//! Everything ficus asks PostgreSQL with ordinary SQL: preconditions, the publication and
//! the tables it streams, slot state, and each table's key columns and column types.

use std::collections::{HashMap, HashSet};

use tokio_postgres::Client;

use crate::error::CdcError;
use crate::event::Table;
use crate::incremental;
use crate::names::{quote_ident, TableName};
use crate::pgoutput::{Column, Relation};
use crate::value::{oid, ValueType};

/// The comment ficus puts on the publications it creates: only those it changes itself.
const OWNED_MARKER: &str = "created by ficus cdc";

/// The server's version, as `server_version_num` (150004 for 15.4).
pub async fn server_version(client: &Client) -> Result<i32, CdcError> {
    Ok(client.query_one("SELECT current_setting('server_version_num')::int", &[]).await?.get(0))
}

/// The first version that streams logical messages, which incremental snapshots need.
pub const MESSAGES_VERSION: i32 = 140_000;

/// Fails with instructions when the server cannot do logical replication.
pub async fn check_wal_level(client: &Client) -> Result<(), CdcError> {
    let row = client.query_one("SHOW wal_level", &[]).await?;
    let level: String = row.get(0);
    if level != "logical" {
        return Err(CdcError::WalLevel(level));
    }
    Ok(())
}

/// A table the publication streams, as the snapshot must read it to match the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedTable {
    pub name: TableName,
    /// The publication's column list (PostgreSQL 15+), or every column.
    pub columns: Option<HashSet<String>>,
    /// The publication's row filter (PostgreSQL 15+), as SQL.
    pub row_filter: Option<String>,
}

/// Makes the publication stream the configured tables (or takes its tables when none are
/// configured) and returns the tables to snapshot and stream.
///
/// A missing publication is created, and marked as ficus's. One that lacks configured tables
/// is extended only when ficus created it; anyone else's is left alone and the SQL to run
/// is returned in the error. Tables it publishes beyond the configured ones are filtered
/// out of the stream by the caller.
///
/// With `announce` (the slot, when it streams already, and tables never snapshotted: outbox
/// tables), tables added to the publication get an
/// incremental snapshot: its request is written into the WAL in the same transaction, so
/// that the stream cannot carry the table without the request.
pub async fn prepare_publication(
    client: &Client,
    publication: &str,
    configured: Option<&[TableName]>,
    announce: Option<(&str, &[TableName])>,
) -> Result<Vec<PublishedTable>, CdcError> {
    let mut partitioned = Vec::new();
    for table in configured.unwrap_or_default() {
        match relkind(client, table).await? {
            None => return Err(CdcError::MissingTable(table.to_string())),
            Some(b'p') => partitioned.push(table.to_string()),
            Some(_) => {}
        }
    }
    let quoted = quote_ident(publication);
    let row = client
        .query_opt(
            "SELECT p.pubviaroot, coalesce(obj_description(p.oid, 'pg_publication'), '') = $2, \
             p.pubinsert, p.pubupdate, p.pubdelete, p.pubtruncate \
             FROM pg_publication p WHERE p.pubname = $1",
            &[&publication, &OWNED_MARKER],
        )
        .await?;
    let Some(row) = row else {
        let target = match configured {
            Some(tables) => {
                format!(
                    "TABLE {}",
                    tables.iter().map(TableName::sql).collect::<Vec<_>>().join(", ")
                )
            }
            None => "ALL TABLES".to_string(),
        };
        client
            .batch_execute(&format!(
                "CREATE PUBLICATION {quoted} FOR {target} WITH (publish_via_partition_root = true); \
                 COMMENT ON PUBLICATION {quoted} IS '{OWNED_MARKER}'"
            ))
            .await
            .map_err(privilege_or_sql)?;
        tracing::info!(publication, "created publication");
        return published_tables(client, publication, configured).await;
    };
    let (via_root, owned): (bool, bool) = (row.get(0), row.get(1));
    let unpublished: Vec<&str> = ["insert", "update", "delete", "truncate"]
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !row.get::<_, bool>(i + 2))
        .map(|(_, op)| op)
        .collect();
    if !unpublished.is_empty() {
        tracing::warn!(publication, operations = %unpublished.join(", "), "the publication does not publish these operations: they will not reach Kafka");
    }
    let Some(configured) = configured else {
        return published_tables(client, publication, None).await;
    };

    // Partitions are streamed under their partitioned table only with this option.
    if !via_root && !partitioned.is_empty() {
        let sql = format!("ALTER PUBLICATION {quoted} SET (publish_via_partition_root = true)");
        if !owned {
            return Err(CdcError::Publication {
                publication: publication.to_string(),
                problem: format!(
                    "it streams the partitions of {} as separate tables",
                    partitioned.join(", ")
                ),
                sql,
            });
        }
        tracing::warn!(publication, "setting publish_via_partition_root on the publication");
        client.batch_execute(&sql).await.map_err(privilege_or_sql)?;
    }

    let published = published_tables(client, publication, None).await?;
    let missing: Vec<&TableName> =
        configured.iter().filter(|t| !published.iter().any(|p| &p.name == *t)).collect();
    if !missing.is_empty() {
        let names = missing.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", ");
        let sql = format!(
            "ALTER PUBLICATION {quoted} ADD TABLE {}",
            missing.iter().map(|t| t.sql()).collect::<Vec<_>>().join(", ")
        );
        if !owned {
            return Err(CdcError::Publication {
                publication: publication.to_string(),
                problem: format!("it does not publish the configured tables {names}"),
                sql,
            });
        }
        tracing::warn!(publication, tables = %names, "adding configured tables to the publication");
        let missing: Vec<TableName> = missing.into_iter().cloned().collect();
        // One simple query with several statements is one transaction.
        let sql = match announce {
            Some((slot, except)) => {
                let snapshot: Vec<TableName> =
                    missing.into_iter().filter(|t| !except.contains(t)).collect();
                if snapshot.is_empty() {
                    sql
                } else {
                    tracing::info!(tables = %names, "their existing rows will be sent by an incremental snapshot while streaming goes on");
                    format!("{sql}; {}", incremental::request_sql(slot, &snapshot))
                }
            }
            None => sql,
        };
        client.batch_execute(&sql).await.map_err(privilege_or_sql)?;
    }
    published_tables(client, publication, Some(configured)).await
}

/// The publication's tables, with their column lists and row filters; only `only`'s when
/// given, in its order.
pub async fn published_tables(
    client: &Client,
    publication: &str,
    only: Option<&[TableName]>,
) -> Result<Vec<PublishedTable>, CdcError> {
    let version = server_version(client).await?;
    let details =
        if version >= 150_000 { "attnames, rowfilter" } else { "NULL::name[], NULL::text" };
    let rows = client
        .query(
            &format!(
                "SELECT schemaname::text, tablename::text, {details} FROM pg_publication_tables \
                 WHERE pubname = $1 ORDER BY 1, 2"
            ),
            &[&publication],
        )
        .await?;
    let all: Vec<PublishedTable> = rows
        .iter()
        .map(|r| PublishedTable {
            name: TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
            columns: r.get::<_, Option<Vec<String>>>(2).map(|c| c.into_iter().collect()),
            row_filter: r.get(3),
        })
        .collect();
    Ok(match only {
        None => all,
        Some(only) => {
            let missing: Vec<String> = only
                .iter()
                .filter(|name| !all.iter().any(|t| &t.name == *name))
                .map(|name| name.to_string())
                .collect();
            if !missing.is_empty() {
                return Err(CdcError::Config(format!(
                    "source.tables: publication \"{publication}\" does not stream {} as tables of \
                     their own (a partition streams under its partitioned table): list the \
                     partitioned table only",
                    missing.join(", ")
                )));
            }
            only.iter().filter_map(|name| all.iter().find(|t| &t.name == name).cloned()).collect()
        }
    })
}

/// The `relkind` of a table, if it exists as a table (`r`) or partitioned table (`p`).
async fn relkind(client: &Client, table: &TableName) -> Result<Option<u8>, CdcError> {
    let row = client
        .query_opt(
            "SELECT c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&table.schema, &table.name],
        )
        .await?;
    Ok(row.map(|r| r.get::<_, i8>(0) as u8))
}

/// Refuses tables whose deletes could not name their key: a replica identity index that
/// leaves out part of the primary key (the key of every event), so a delete carries neither.
pub async fn check_replica_identities(
    client: &Client,
    tables: &[PublishedTable],
) -> Result<(), CdcError> {
    let schemas: Vec<&str> = tables.iter().map(|t| t.name.schema.as_str()).collect();
    let names: Vec<&str> = tables.iter().map(|t| t.name.name.as_str()).collect();
    // One query for all tables: a publication FOR ALL TABLES may have thousands.
    let row = client
        .query_opt(
            "SELECT n.nspname::text, c.relname::text, ri.indexrelid::regclass::text, \
             (SELECT string_agg(quote_ident(a.attname), ', ') FROM pg_attribute a \
              WHERE a.attrelid = pk.indrelid AND a.attnum = ANY(pk.indkey)) \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_index ri ON ri.indrelid = c.oid AND ri.indisreplident \
             JOIN pg_index pk ON pk.indrelid = c.oid AND pk.indisprimary \
             WHERE (n.nspname, c.relname) IN (SELECT * FROM unnest($1::text[], $2::text[])) \
             AND c.relreplident = 'i' AND NOT (pk.indkey::int2[] <@ ri.indkey::int2[]) \
             ORDER BY 1, 2 LIMIT 1",
            &[&schemas, &names],
        )
        .await?;
    let Some(row) = row else { return Ok(()) };
    let table = TableName::new(row.get::<_, String>(0), row.get::<_, String>(1));
    let (index, key): (String, String) = (row.get(2), row.get(3));
    Err(CdcError::ReplicaIdentity(
        table.to_string(),
        format!(
            "its replica identity index {index} does not contain its primary key ({key}), \
             so its deletes would carry no key: run ALTER TABLE {} REPLICA IDENTITY DEFAULT \
             (or FULL)",
            table.sql()
        ),
    ))
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

/// What ficus knows of the database's schema while it streams: each column type's encoding
/// and each table's primary key, remembered for the life of the process (across reconnects)
/// so that changes decoded after a table was dropped still get their key.
#[derive(Default)]
pub struct Catalog {
    types: HashMap<u32, ValueType>,
    primary_keys: HashMap<u32, Vec<String>>,
    /// Fraction digits of `money` under the database's own `lc_monetary`.
    money_scale: u32,
}

impl Catalog {
    /// Reads (again, on each connection) the database's money scale and every table's
    /// primary key; keys of tables dropped since are kept.
    pub async fn refresh(&mut self, client: &Client) -> Result<(), CdcError> {
        // ficus's sessions use lc_monetary=C; the scale that gives money its meaning is the
        // database's default, which RESET restores until the ROLLBACK.
        client.batch_execute("BEGIN; RESET lc_monetary").await?;
        let scale: i32 = client.query_one("SELECT scale(0::money::numeric)", &[]).await?.get(0);
        client.batch_execute("ROLLBACK").await?;
        self.money_scale = u32::try_from(scale).unwrap_or(2);
        // Types may have changed while ficus was away (ALTER DOMAIN, a new lc_monetary).
        self.types.clear();
        let rows = client
            .query(
                "SELECT i.indrelid, a.attname::text FROM pg_index i \
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                 WHERE i.indisprimary ORDER BY i.indrelid, array_position(i.indkey::int2[], a.attnum)",
                &[],
            )
            .await?;
        let mut primary_keys: HashMap<u32, Vec<String>> = HashMap::new();
        for row in &rows {
            primary_keys.entry(row.get(0)).or_default().push(row.get(1));
        }
        self.primary_keys.extend(primary_keys);
        Ok(())
    }

    /// A published table as the snapshot reads it: its columns (those the publication
    /// streams) in order, its identity and key, as they are now.
    pub async fn table_schema(
        &mut self,
        client: &Client,
        table: &PublishedTable,
        topic: String,
    ) -> Result<Table, CdcError> {
        let row = client
            .query_one(
                "SELECT c.oid, c.relreplident::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2",
                &[&table.name.schema, &table.name.name],
            )
            .await?;
        let oid: u32 = row.get(0);
        let identity: String = row.get(1);
        // The columns the stream's Relation message would flag as the replica identity.
        let flagged: Vec<String> = match identity.as_str() {
            "i" => client
                .query(
                    "SELECT a.attname::text FROM pg_index i \
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                     WHERE i.indrelid = $1 AND i.indisreplident \
                     ORDER BY array_position(i.indkey::int2[], a.attnum)",
                    &[&oid],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect(),
            _ => self.primary_key(client, oid).await?.unwrap_or_default(),
        };
        let rows = client
            .query(
                "SELECT a.attname::text, a.atttypid, a.atttypmod FROM pg_attribute a \
                 WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' \
                 ORDER BY a.attnum",
                &[&oid],
            )
            .await?;
        let columns = rows
            .iter()
            .map(|r| {
                let name: String = r.get(0);
                Column {
                    is_key: identity == "f" || flagged.contains(&name),
                    name,
                    type_oid: r.get(1),
                    type_modifier: r.get(2),
                }
            })
            .filter(|c| table.columns.as_ref().is_none_or(|published| published.contains(&c.name)))
            .collect();
        let relation = Relation {
            id: oid,
            namespace: table.name.schema.clone(),
            name: table.name.name.clone(),
            replica_identity: identity.bytes().next().unwrap_or(b'd'),
            columns,
        };
        self.table_for(client, relation, topic).await
    }

    /// The event view of a relation: its topic, its columns' encodings and its key.
    ///
    /// The key is the primary key, in its index's order. Under the default replica identity,
    /// the Relation message flags exactly the primary key as it was when the change was made.
    /// Under FULL, USING INDEX or NOTHING it flags other columns, so the primary key comes
    /// from the catalog, or from memory when the table has been dropped since. A table
    /// without one is keyed by its replica identity index, or has null keys.
    pub async fn table_for(
        &mut self,
        client: &Client,
        relation: Relation,
        topic: String,
    ) -> Result<Table, CdcError> {
        let flagged: Vec<String> =
            relation.columns.iter().filter(|c| c.is_key).map(|c| c.name.clone()).collect();
        let known = match self.primary_key(client, relation.id).await? {
            Some(pk) => pk,
            None => self.primary_keys.get(&relation.id).cloned().unwrap_or_default(),
        };
        let identity_key =
            if relation.replica_identity == b'i' { flagged.clone() } else { Vec::new() };
        let names = match relation.replica_identity {
            // The same columns in the index's order, as every other identity gives them.
            b'd' if same_columns(&known, &flagged) => known,
            b'd' => flagged.clone(),
            _ if known.is_empty() => identity_key,
            _ => known,
        };
        let table = TableName::new(&relation.namespace, &relation.name);
        if relation.replica_identity == b'i' && !names.iter().all(|n| flagged.contains(n)) {
            tracing::warn!(%table, "the replica identity index does not contain the primary key: deletes carry no key, so their events have a null key and no tombstone; set REPLICA IDENTITY DEFAULT or FULL");
        }
        let key = names
            .iter()
            .filter_map(|name| relation.columns.iter().position(|c| &c.name == name))
            .collect();
        let mut types = Vec::with_capacity(relation.columns.len());
        for column in &relation.columns {
            types.push(self.value_type(client, column.type_oid).await?);
        }
        Ok(Table { relation, types, key, topic, masks: Vec::new() })
    }

    /// The table's primary key columns now (empty without one), remembered; `None` when the
    /// table no longer exists.
    async fn primary_key(
        &mut self,
        client: &Client,
        oid: u32,
    ) -> Result<Option<Vec<String>>, CdcError> {
        let exists = client.query_opt("SELECT 1 FROM pg_class WHERE oid = $1", &[&oid]).await?;
        if exists.is_none() {
            return Ok(None);
        }
        let rows = client
            .query(
                "SELECT a.attname::text FROM pg_index i \
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                 WHERE i.indrelid = $1 AND i.indisprimary ORDER BY array_position(i.indkey::int2[], a.attnum)",
                &[&oid],
            )
            .await?;
        let names: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        if names.is_empty() {
            self.primary_keys.remove(&oid);
        } else {
            self.primary_keys.insert(oid, names.clone());
        }
        Ok(Some(names))
    }

    /// How values of a type are encoded: domains (over domains) resolve to their base type,
    /// arrays to arrays of their element's encoding.
    async fn value_type(&mut self, client: &Client, type_oid: u32) -> Result<ValueType, CdcError> {
        if let Some(known) = self.types.get(&type_oid) {
            return Ok(known.clone());
        }
        let mut base = type_oid;
        // The delimiter of each array level, outermost first: its element type's.
        let mut delimiters: Vec<Option<char>> = Vec::new();
        // Bounded: the catalog has no cycles, but a garbled answer must not loop forever.
        for _ in 0..64 {
            let row = client
                .query_opt(
                    "SELECT typtype::text, typbasetype, typelem, typcategory::text, typlen, typdelim::text \
                     FROM pg_type WHERE oid = $1",
                    &[&base],
                )
                .await?;
            let Some(row) = row else { break };
            let (kind, base_type, element, category, len, delimiter): (
                String,
                u32,
                u32,
                String,
                i16,
                String,
            ) = (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4), row.get(5));
            if let Some(pending @ None) = delimiters.last_mut() {
                *pending = delimiter.chars().next();
            }
            if kind == "d" {
                base = base_type;
            } else if category == "A" && element != 0 && len == -1 {
                delimiters.push(None);
                base = element;
            } else {
                break;
            }
        }
        let mut ty = if base == oid::MONEY {
            ValueType::Money { scale: self.money_scale }
        } else {
            ValueType::Scalar(base)
        };
        for delimiter in delimiters.into_iter().rev() {
            ty = ty.in_array(delimiter.unwrap_or(','));
        }
        self.types.insert(type_oid, ty.clone());
        Ok(ty)
    }
}

/// Whether two lists name the same columns, in any order.
fn same_columns(a: &[String], b: &[String]) -> bool {
    a.len() == b.len() && a.iter().all(|name| b.contains(name))
}

/// Whether `COPY` of the table must say `ONLY`: plain tables may have inheritance children,
/// which are snapshotted on their own; a partitioned table is read through its root.
pub async fn copy_only(client: &Client, oid: u32) -> Result<bool, CdcError> {
    let kind: i8 =
        client.query_one("SELECT relkind FROM pg_class WHERE oid = $1", &[&oid]).await?.get(0);
    Ok(kind as u8 == b'r')
}
