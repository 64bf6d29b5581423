//! Incremental snapshots, the DBLog way: which tables are to be read while streaming goes
//! on, chunk by chunk in key order, and how each chunk is reconciled with the stream so that
//! a table's topic ends equal to the table. Pure: the pipeline writes the watermarks and
//! reads the chunks; [`Backfill`] decides what they mean.
//!
//! A chunk is read between two watermarks written into the WAL: low, then the rows in a
//! REPEATABLE READ snapshot, then high. Every change of the table that the stream carries
//! between the two may be newer than the chunk's copy of its row, so those rows are dropped
//! from the chunk; the rest are sent at the high watermark, where they are exactly the
//! table's state. One more case is checked: a transaction whose commit was streamed before
//! the low watermark but that the chunk's snapshot still saw as running (PostgreSQL makes a
//! commit visible a moment after writing it); the chunk is then read again.
//!
//! A request to snapshot tables is itself a message in the WAL (written with the table's
//! addition to the publication, or by `ficus cdc snapshot`): the confirmed position is held
//! behind it until the last chunk is acknowledged, so a restart reads the request again and
//! takes the snapshot from the beginning; nothing is lost.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use crate::event::{self, Op, Record, Source, Table};
use crate::lsn::Lsn;
use crate::names::{quote_literal, TableName};
use crate::pgoutput::Datum;

/// The prefix of the logical message that asks for tables to be snapshotted.
pub const REQUEST_PREFIX: &str = "ficus.snapshot";
/// The prefix of the low and high watermarks around each chunk.
pub const WATERMARK_PREFIX: &str = "ficus.watermark";

/// The content of a request to the pipeline reading `slot` for `tables`:
/// `{"slot":"ficus","tables":[{"schema":"public","name":"t"}]}`. Every slot of the database
/// sees it; only the one it names acts on it.
pub fn request_content(slot: &str, tables: &[TableName]) -> String {
    let names: Vec<_> =
        tables.iter().map(|t| serde_json::json!({ "schema": t.schema, "name": t.name })).collect();
    serde_json::json!({ "slot": slot, "tables": names }).to_string()
}

/// The slot a request is for and the tables it names; an error says what is wrong with it.
pub fn parse_request(content: &[u8]) -> Result<(String, Vec<TableName>), String> {
    #[derive(serde::Deserialize)]
    struct Request {
        slot: String,
        tables: Vec<Name>,
    }
    #[derive(serde::Deserialize)]
    struct Name {
        schema: String,
        name: String,
    }
    let request: Request = serde_json::from_slice(content).map_err(|e| {
        format!("expected {{\"slot\": ..., \"tables\": [{{\"schema\": ..., \"name\": ...}}]}}: {e}")
    })?;
    let tables = request.tables.into_iter().map(|t| TableName::new(t.schema, t.name)).collect();
    Ok((request.slot, tables))
}

/// The SQL that writes a request to `slot`'s pipeline for `tables` into the WAL, in the
/// caller's transaction.
pub fn request_sql(slot: &str, tables: &[TableName]) -> String {
    format!(
        "SELECT pg_logical_emit_message(true, {}, {})",
        quote_literal(REQUEST_PREFIX),
        quote_literal(&request_content(slot, tables))
    )
}

/// The content of a watermark: `low <chunk id>` or `high <chunk id>`.
pub fn watermark_content(high: bool, id: &str) -> String {
    format!("{} {id}", if high { "high" } else { "low" })
}

/// Which transactions a snapshot saw as running, from `pg_current_snapshot()`:
/// `xmin:xmax:xip,...`. Transaction ids are kept as the 32 bits pgoutput carries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Visibility {
    pub xmin: u32,
    /// Transactions from this one on had not started.
    pub xmax: u32,
    pub running: Vec<u32>,
}

impl Visibility {
    /// Whether `xid` was not yet visible to the snapshot: running, or not started.
    pub fn invisible(&self, xid: u32) -> bool {
        self.running.contains(&xid) || !precedes(xid, self.xmax)
    }
}

/// Whether transaction id `a` is older than `b`, in PostgreSQL's circular order.
fn precedes(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

impl std::str::FromStr for Visibility {
    type Err = String;

    fn from_str(text: &str) -> Result<Visibility, String> {
        let bad = || format!("not a snapshot (xmin:xmax:xip,...): {text:?}");
        let mut parts = text.split(':');
        let (Some(xmin), Some(xmax), Some(running), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        // Full (64-bit) ids: the low 32 bits are the transaction id.
        let xid = |part: &str| part.parse::<u64>().map(|x| x as u32).map_err(|_| bad());
        let running: Result<Vec<u32>, String> =
            running.split(',').filter(|p| !p.is_empty()).map(xid).collect();
        Ok(Visibility { xmin: xid(xmin)?, xmax: xid(xmax)?, running: running? })
    }
}

/// How a table's chunks are read (made by [`crate::chunk::query`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkQuery {
    /// The table's relation id.
    pub relation: u32,
    /// The table, quoted.
    pub table: String,
    /// `SELECT <columns> FROM [ONLY] <table>`.
    pub select: String,
    /// The publication's row filter.
    pub row_filter: Option<String>,
    /// The key columns (qualified, quoted) and their types, in order.
    pub keys: Vec<(String, String)>,
    pub limit: usize,
    /// The table's columns when it was looked up: a chunk that finds others is not read.
    pub fingerprint: String,
}

/// What to read next: the rows of `table` after `after` (its key columns' text values; from
/// the start when `None`), between watermarks carrying `id`.
#[derive(Debug, Clone)]
pub struct ChunkPlan {
    pub id: String,
    pub table: Arc<Table>,
    pub query: Arc<ChunkQuery>,
    pub after: Option<Vec<Datum>>,
}

/// A chunk as read: its rows in key order, the snapshot they were read in, and whether they
/// are the last of the table.
#[derive(Debug, Clone)]
pub struct ChunkRead {
    pub id: String,
    pub rows: Vec<Vec<Datum>>,
    pub visibility: Visibility,
    pub complete: bool,
}

/// The chunk at a high watermark: the records to send there, and what they mean for the
/// table's progress.
#[derive(Debug)]
pub struct Reconciled {
    pub records: Vec<Record>,
    /// `schema.table`.
    pub label: String,
    /// Rows sent (the chunk's rows the stream did not supersede).
    pub sent: u64,
    /// Rows read from the table so far.
    pub read: u64,
    /// The table is done: the position its request held may be released once these records
    /// are acknowledged.
    pub done: Option<Lsn>,
    /// The chunk was read while a transaction streamed before its low watermark was not yet
    /// visible: nothing is sent, and it is read again.
    pub reread: bool,
}

/// A table waiting to be snapshotted, and the position of the request that asked for it.
#[derive(Debug, Clone)]
struct Queued {
    name: TableName,
    request: Lsn,
}

/// The table being snapshotted.
struct Current {
    name: TableName,
    request: Lsn,
    /// Its catalog view and chunk query, once the pipeline has looked it up.
    table: Option<(Arc<Table>, Arc<ChunkQuery>)>,
    after: Option<Vec<Datum>>,
    read: u64,
    /// Chunks that failed to read in a row.
    failures: u32,
    /// The names of the key columns it is paged by.
    key: Option<Vec<String>>,
}

/// A chunk between its watermarks.
struct Window {
    id: String,
    /// The number of commits streamed before its low watermark, once seen.
    low: Option<u64>,
    /// What the stream changed of the table since the low watermark.
    stream: Superseded,
    read: Option<ChunkRead>,
}

/// What the stream changed between a chunk's watermarks: the keys of rows, every row (a
/// truncate), or a row whose key it did not carry (the chunk must be read again).
#[derive(Default)]
struct Superseded {
    touched: HashSet<Vec<u8>>,
    truncated: bool,
    unknown: bool,
}

/// Which rows a change of the table being read touched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Touched {
    /// The row with this key (as `event::key_json` gives it).
    Row(Vec<u8>),
    /// Every row: a truncate.
    All,
    /// A row whose key the change did not carry.
    Unknown,
}

/// Commits remembered between snapshots.
const RECENT_COMMITS: usize = 4096;

/// The incremental snapshots of one pipeline run.
pub struct Backfill {
    /// Unique per run: watermarks of an earlier run, met again after a restart, are not ours.
    run: String,
    /// The slot this pipeline reads: requests name the slot they are for.
    slot: String,
    queue: VecDeque<Queued>,
    current: Option<Current>,
    window: Option<Window>,
    chunks: u64,
    /// Commits streamed (while snapshots run, since the oldest transaction their chunks saw
    /// running; else the last [`RECENT_COMMITS`]), by transaction id: their order.
    commits: u64,
    committed: HashMap<u32, u64>,
}

impl Backfill {
    pub fn new(run: impl Into<String>, slot: impl Into<String>) -> Backfill {
        Backfill {
            run: run.into(),
            slot: slot.into(),
            queue: VecDeque::new(),
            current: None,
            window: None,
            chunks: 0,
            commits: 0,
            committed: HashMap::new(),
        }
    }

    /// The slot whose requests this backfill takes.
    pub fn slot(&self) -> &str {
        &self.slot
    }

    /// Tables whose snapshot is running or waiting.
    pub fn tables(&self) -> usize {
        self.queue.len() + usize::from(self.current.is_some())
    }

    /// Whether a snapshot is running or waiting.
    pub fn is_active(&self) -> bool {
        self.current.is_some() || !self.queue.is_empty()
    }

    /// A request at `lsn` for `tables`: those not already waiting are queued (one being read
    /// is read again after), and returned (the caller holds `lsn` once for each).
    pub fn request(&mut self, tables: Vec<TableName>, lsn: Lsn) -> Vec<TableName> {
        let mut queued = Vec::new();
        for name in tables {
            let waiting = self.queue.iter().any(|q| q.name == name);
            if !waiting && !queued.contains(&name) {
                queued.push(name.clone());
                self.queue.push_back(Queued { name, request: lsn });
            }
        }
        queued
    }

    /// The table whose catalog view is needed before its next chunk, if any, and whether
    /// its snapshot starts (rather than goes on after an `ALTER TABLE` or a failed read).
    pub fn needs_table(&mut self) -> Option<(TableName, bool)> {
        if self.current.is_none() {
            let Queued { name, request } = self.queue.pop_front()?;
            self.current = Some(Current {
                name,
                request,
                table: None,
                after: None,
                read: 0,
                failures: 0,
                key: None,
            });
        }
        let current = self.current.as_ref().filter(|c| c.table.is_none())?;
        Some((current.name.clone(), current.after.is_none() && current.read == 0))
    }

    /// The catalog view and chunk query of the table [`Backfill::needs_table`] named.
    pub fn table_found(&mut self, table: Arc<Table>, query: Arc<ChunkQuery>) {
        let Some(current) = &mut self.current else { return };
        // Rows are paged by key: another key starts the table again.
        let key: Vec<String> =
            table.key.iter().map(|&k| table.relation.columns[k].name.clone()).collect();
        if current.key.as_ref().is_some_and(|was| *was != key) {
            tracing::warn!(table = %current.name, "the table's key changed during its incremental snapshot: it starts again");
            (current.after, current.read) = (None, 0);
        }
        current.key = Some(key);
        current.table = Some((table, query));
    }

    /// The table being read changed (its columns, its name): the chunk under way is dropped
    /// and the table looked up again, to go on from the same row.
    pub fn look_up_again(&mut self) {
        if let Some(current) = &mut self.current {
            current.table = None;
            self.window = None;
        }
    }

    /// The stream describes `table` anew: when its columns are not those the chunks are read
    /// with (an `ALTER TABLE`), the table is looked up again.
    pub fn relation_changed(&mut self, table: &Table) {
        let Some(reading) = self.reading() else { return };
        let shape = |t: &Table| -> Vec<(String, u32, i32)> {
            t.relation
                .columns
                .iter()
                .map(|c| (c.name.clone(), c.type_oid, c.type_modifier))
                .collect()
        };
        if reading.relation.id == table.relation.id && shape(reading) != shape(table) {
            self.look_up_again();
        }
    }

    /// A chunk failed to read (the table renamed or dropped meanwhile): the table is looked
    /// up again and the chunk read again, up to `attempts` times in a row; then the table is
    /// given up, returning the position its request held.
    pub fn chunk_failed(&mut self, attempts: u32) -> Option<Lsn> {
        let current = self.current.as_mut()?;
        current.failures += 1;
        if current.failures >= attempts {
            return self.abandon();
        }
        self.look_up_again();
        None
    }

    /// Gives up the current table (it is gone, or cannot be read in key order): returns the
    /// position its request held.
    pub fn abandon(&mut self) -> Option<Lsn> {
        self.window = None;
        self.current.take().map(|c| c.request)
    }

    /// The table whose chunks are being read.
    fn reading(&self) -> Option<&Arc<Table>> {
        self.current.as_ref().and_then(|c| c.table.as_ref()).map(|(table, _)| table)
    }

    /// Whether a chunk is due: a table is known and no chunk is being read or reconciled.
    pub fn chunk_due(&self) -> bool {
        self.window.is_none() && self.reading().is_some()
    }

    /// The next chunk to read, when none is being read or reconciled.
    pub fn next_chunk(&mut self) -> Option<ChunkPlan> {
        if self.window.is_some() {
            return None;
        }
        let current = self.current.as_ref()?;
        let (table, query) = current.table.clone()?;
        self.chunks += 1;
        let id = format!("{}:{}", self.run, self.chunks);
        self.window =
            Some(Window { id: id.clone(), low: None, stream: Superseded::default(), read: None });
        Some(ChunkPlan { id, table, query, after: current.after.clone() })
    }

    /// The rows of the chunk being read; its high watermark is written after this.
    pub fn chunk_read(&mut self, read: ChunkRead) {
        if let Some(window) = self.window.as_mut().filter(|w| w.id == read.id) {
            // Only transactions the chunk's snapshot did not see can matter to it, or to
            // the chunks after it (their snapshots see at least as much).
            self.committed.retain(|&xid, _| read.visibility.invisible(xid));
            window.read = Some(read);
        }
    }

    /// A transaction `xid` committed in the stream.
    pub fn committed(&mut self, xid: u32) {
        self.commits += 1;
        let seen = self.window.as_ref().and_then(|w| w.read.as_ref());
        if seen.is_some_and(|read| !read.visibility.invisible(xid)) {
            return;
        }
        self.committed.insert(xid, self.commits);
        // Between chunks, only the recent past is kept: enough for the next chunk to find a
        // commit streamed just before it. While one is read, everything: it is short.
        if self.window.is_none() && self.committed.len() >= 2 * RECENT_COMMITS {
            let oldest = self.commits - RECENT_COMMITS as u64;
            self.committed.retain(|_, order| *order > oldest);
        }
    }

    /// A change of the table with relation id `relation`, to the row keyed `key`.
    pub fn changed(&mut self, relation: u32, key: Touched) {
        if !self.watches(relation) {
            return;
        }
        let Some(window) = self.window.as_mut() else { return };
        match key {
            Touched::Row(key) => {
                window.stream.touched.insert(key);
            }
            Touched::All => window.stream.truncated = true,
            Touched::Unknown => window.stream.unknown = true,
        }
    }

    /// Whether changes of `relation` matter to a chunk between its watermarks.
    pub fn watches(&self, relation: u32) -> bool {
        self.window.as_ref().is_some_and(|w| w.low.is_some())
            && self.reading().is_some_and(|t| t.relation.id == relation)
    }

    /// A watermark in the stream at `lsn`: the high one of the chunk read gives its records
    /// (events of `prefix`'s server `database`, made at `now_ms`). Watermarks of other runs
    /// (or garbled ones) are ignored; a high watermark for a chunk whose rows were never handed over is an
    /// error.
    pub fn watermark(
        &mut self,
        content: &[u8],
        lsn: Lsn,
        prefix: &str,
        database: &str,
        now_ms: i64,
    ) -> Result<Option<Reconciled>, String> {
        let text = String::from_utf8_lossy(content);
        // Another run's, another tool's, or garbled: not a chunk of ours.
        let Some((kind, id)) = text.split_once(' ') else { return Ok(None) };
        let Some(window) = self.window.as_mut().filter(|w| w.id == id) else { return Ok(None) };
        match kind {
            "low" => {
                window.low = Some(self.commits);
                Ok(None)
            }
            "high" => {
                let window = self.window.take().ok_or("no chunk")?;
                let (Some(low), Some(read)) = (window.low, window.read) else {
                    return Err(format!("the high watermark of chunk {id} came before its low watermark or its rows"));
                };
                self.reconcile(low, read, window.stream, lsn, (prefix, database, now_ms)).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// The records of chunk `read`, whose low watermark came after `low` commits, less the
    /// rows the stream superseded; `server` is the events' prefix, database and time.
    fn reconcile(
        &mut self,
        low: u64,
        read: ChunkRead,
        stream: Superseded,
        lsn: Lsn,
        server: (&str, &str, i64),
    ) -> Result<Reconciled, String> {
        let (prefix, database, now_ms) = server;
        let current = self.current.as_mut().ok_or("a chunk without a table")?;
        let (table, _) = current.table.clone().ok_or("a chunk without a table")?;
        let label = format!("{}.{}", table.relation.namespace, table.relation.name);
        let committed = &self.committed;
        let reread = stream.unknown
            || read
                .visibility
                .running
                .iter()
                .any(|xid| committed.get(xid).is_some_and(|&order| order <= low));
        // Transactions older than the oldest the snapshot saw running are never asked about.
        let xmin = read.visibility.xmin;
        self.committed.retain(|&xid, _| xid.wrapping_sub(xmin) < u32::MAX / 2);
        if reread {
            return Ok(Reconciled {
                records: Vec::new(),
                label,
                sent: 0,
                read: current.read,
                done: None,
                reread: true,
            });
        }
        let source = Source {
            version: env!("CARGO_PKG_VERSION"),
            name: prefix,
            db: database,
            ts_ms: now_ms,
            snapshot: "incremental",
            tx_id: None,
            transaction: None,
            lsn,
            last_commit_lsn: None,
        };
        let mut records = Vec::with_capacity(read.rows.len());
        let mut sent = 0;
        for row in &read.rows {
            let key = event::key_json(&table, row, None);
            if stream.truncated || key.is_some_and(|key| stream.touched.contains(&key)) {
                continue;
            }
            records.extend(event::change(&table, Op::Read, None, Some(row), None, &source, now_ms));
            sent += 1;
        }
        current.read += read.rows.len() as u64;
        current.failures = 0;
        if let Some(last) = read.rows.last() {
            current.after = Some(table.key.iter().map(|&i| last[i].clone()).collect());
        }
        let read_so_far = current.read;
        let done = if read.complete {
            let request = current.request;
            self.current = None;
            Some(request)
        } else {
            None
        };
        Ok(Reconciled { records, label, sent, read: read_so_far, done, reread: false })
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use serde_json::Value;

    use super::*;
    use crate::pgoutput::{Column, Relation};
    use crate::value::ValueType;

    fn text(s: &str) -> Datum {
        Datum::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn table() -> Arc<Table> {
        let column = |name: &str, is_key| Column {
            is_key,
            name: name.into(),
            type_oid: crate::value::oid::INT4,
            type_modifier: -1,
        };
        let relation = Relation {
            id: 42,
            namespace: "public".into(),
            name: "big".into(),
            replica_identity: b'd',
            columns: vec![column("id", true), column("v", false)],
        };
        let types = vec![ValueType::Scalar(crate::value::oid::INT4); 2];
        Arc::new(Table {
            relation,
            types,
            key: vec![0],
            topic: "shop.public.big".into(),
            masks: vec![],
        })
    }

    fn query() -> Arc<ChunkQuery> {
        Arc::new(ChunkQuery {
            relation: 42,
            table: String::new(),
            select: String::new(),
            row_filter: None,
            keys: Vec::new(),
            limit: 2,
            fingerprint: String::new(),
        })
    }

    fn rows(ids: &[i32]) -> Vec<Vec<Datum>> {
        ids.iter().map(|id| vec![text(&id.to_string()), text("1")]).collect()
    }

    fn key(id: i32) -> Vec<u8> {
        format!("{{\"id\":{id}}}").into_bytes()
    }

    /// A backfill of `big` whose first chunk is being read.
    fn started() -> (Backfill, ChunkPlan) {
        let mut backfill = Backfill::new("run", "slot");
        let name = TableName::new("public", "big");
        assert_eq!(
            backfill.request(vec![name.clone(), name.clone()], Lsn(10)),
            std::slice::from_ref(&name)
        );
        assert_eq!(backfill.needs_table(), Some((name, true)));
        assert!(backfill.next_chunk().is_none(), "not before the table is known");
        backfill.table_found(table(), query());
        assert_eq!(backfill.needs_table(), None);
        let plan = backfill.next_chunk().expect("a chunk");
        assert!(backfill.next_chunk().is_none(), "one chunk at a time");
        (backfill, plan)
    }

    fn high(backfill: &mut Backfill, id: &str) -> Reconciled {
        backfill
            .watermark(watermark_content(true, id).as_bytes(), Lsn(99), "shop", "db", 5)
            .expect("valid")
            .expect("our chunk")
    }

    fn ids(records: &[Record]) -> Vec<i64> {
        records
            .iter()
            .map(|r| {
                let value: Value =
                    serde_json::from_slice(r.value.as_deref().expect("value")).expect("json");
                assert_eq!(value["op"], "r");
                assert_eq!(value["source"]["snapshot"], "incremental");
                value["after"]["id"].as_i64().expect("id")
            })
            .collect()
    }

    #[test]
    fn rows_changed_between_the_watermarks_are_left_to_the_stream() {
        let (mut backfill, plan) = started();
        assert!(plan.after.is_none());
        // Before the low watermark: the chunk's snapshot already holds this change.
        backfill.changed(42, Touched::Row(key(1)));
        backfill
            .watermark(watermark_content(false, &plan.id).as_bytes(), Lsn(20), "shop", "db", 5)
            .expect("low");
        assert!(backfill.watches(42) && !backfill.watches(7));
        backfill.changed(42, Touched::Row(key(2)));
        backfill.changed(7, Touched::Row(key(3))); // another table
        backfill.chunk_read(ChunkRead {
            id: plan.id.clone(),
            rows: rows(&[1, 2, 3]),
            visibility: Visibility::default(),
            complete: false,
        });
        let done = high(&mut backfill, &plan.id);
        assert_eq!(ids(&done.records), [1, 3]);
        assert_eq!((done.sent, done.read, done.done, done.reread), (2, 3, None, false));

        // The next chunk starts after the last row read, even one left to the stream.
        let next = backfill.next_chunk().expect("next");
        assert_eq!(next.after, Some(vec![text("3")]));
        backfill
            .watermark(watermark_content(false, &next.id).as_bytes(), Lsn(30), "shop", "db", 5)
            .expect("low");
        backfill.changed(42, Touched::All); // a truncate
        backfill.chunk_read(ChunkRead {
            id: next.id.clone(),
            rows: rows(&[4]),
            visibility: Visibility::default(),
            complete: true,
        });
        let last = high(&mut backfill, &next.id);
        assert!(last.records.is_empty(), "a truncate supersedes the whole chunk");
        assert_eq!((last.read, last.done), (4, Some(Lsn(10))));
        assert!(!backfill.is_active());
    }

    #[test]
    fn a_commit_streamed_before_the_low_watermark_but_unseen_by_the_chunk_rereads_it() {
        let mut backfill = Backfill::new("run", "slot");
        for xid in 1..=2 * RECENT_COMMITS as u32 {
            backfill.committed(1000 + xid);
        }
        assert!(backfill.committed.len() <= 2 * RECENT_COMMITS, "bounded between snapshots");
        // Streamed before the snapshot was even requested.
        backfill.committed(700);
        let name = TableName::new("public", "big");
        backfill.request(vec![name], Lsn(10));
        backfill.needs_table();
        backfill.table_found(table(), query());
        let plan = backfill.next_chunk().expect("a chunk");
        backfill
            .watermark(watermark_content(false, &plan.id).as_bytes(), Lsn(20), "shop", "db", 5)
            .expect("low");
        backfill.committed(701);
        let visibility: Visibility = "690:702:700,701".parse().expect("snapshot");
        backfill.chunk_read(ChunkRead {
            id: plan.id.clone(),
            rows: rows(&[1]),
            visibility,
            complete: true,
        });
        let outcome = high(&mut backfill, &plan.id);
        assert!(outcome.reread && outcome.records.is_empty() && outcome.done.is_none());
        let again = backfill.next_chunk().expect("read again");
        assert!(again.after.is_none() && again.id != plan.id);
        // A transaction committed after the low watermark is covered by the window.
        backfill
            .watermark(watermark_content(false, &again.id).as_bytes(), Lsn(30), "shop", "db", 5)
            .expect("low");
        backfill.committed(703);
        let visibility: Visibility = "703:704:703".parse().expect("snapshot");
        backfill.chunk_read(ChunkRead {
            id: again.id.clone(),
            rows: rows(&[1]),
            visibility,
            complete: true,
        });
        assert_eq!(ids(&high(&mut backfill, &again.id).records), [1]);
    }

    #[test]
    fn an_altered_table_or_a_failed_read_is_looked_up_again_and_goes_on_from_its_row() {
        let (mut backfill, plan) = started();
        backfill.chunk_read(ChunkRead {
            id: plan.id.clone(),
            rows: rows(&[1, 2]),
            visibility: Visibility::default(),
            complete: false,
        });
        backfill
            .watermark(watermark_content(false, &plan.id).as_bytes(), Lsn(20), "p", "d", 0)
            .expect("low");
        high(&mut backfill, &plan.id);
        // The same columns described again (a new session): nothing changes.
        backfill.relation_changed(&table());
        let next = backfill.next_chunk().expect("next");
        backfill.relation_changed(&table());
        assert!(backfill.next_chunk().is_none(), "still reading {}", next.id);
        // A column added: the chunk under way is dropped, the table looked up again.
        let mut altered = (*table()).clone();
        altered.relation.columns.push(Column {
            is_key: false,
            name: "w".into(),
            type_oid: 25,
            type_modifier: -1,
        });
        backfill.relation_changed(&altered);
        assert_eq!(backfill.needs_table(), Some((TableName::new("public", "big"), false)));
        backfill.table_found(Arc::new(altered), query());
        let again = backfill.next_chunk().expect("again");
        assert_eq!(again.after, Some(vec![text("2")]), "from the same row");
        assert_eq!(again.table.relation.columns.len(), 3);
        // Reads that keep failing give the table up, releasing its request.
        assert_eq!(backfill.chunk_failed(3), None);
        assert!(backfill.needs_table().is_some());
        backfill.table_found(table(), query());
        assert_eq!(backfill.chunk_failed(2), Some(Lsn(10)));
        assert!(!backfill.is_active());
    }

    #[test]
    fn watermarks_of_another_run_or_garbled_are_ignored() {
        let (mut backfill, plan) = started();
        for other in
            [watermark_content(true, "earlier:1"), "middle".into(), format!("mid {}", plan.id)]
        {
            let outcome = backfill.watermark(other.as_bytes(), Lsn(1), "p", "d", 0);
            assert!(matches!(outcome, Ok(None)), "{other}");
        }
        // A high watermark before the rows were handed over cannot be reconciled.
        backfill
            .watermark(watermark_content(false, &plan.id).as_bytes(), Lsn(1), "p", "d", 0)
            .expect("low");
        let error = backfill
            .watermark(watermark_content(true, &plan.id).as_bytes(), Lsn(2), "p", "d", 0)
            .expect_err("no rows");
        assert!(error.contains("before its low watermark or its rows"), "{error}");
    }

    #[test]
    fn requests_and_snapshots_round_trip() {
        let tables = vec![TableName::new("public", "big"), TableName::new("odd.schema", "it's")];
        let content = request_content("slot", &tables);
        assert_eq!(
            parse_request(content.as_bytes()).expect("valid"),
            ("slot".into(), tables.clone())
        );
        assert!(request_sql("slot", &tables).contains("it''s"));
        assert!(parse_request(b"{\"tables\": 3}").expect_err("bad").contains("\"schema\""));
        let visibility: Visibility =
            "4294967396:4294967400:4294967397,4294967398".parse().expect("valid");
        assert_eq!(visibility, Visibility { xmin: 100, xmax: 104, running: vec![101, 102] });
        assert!(
            visibility.invisible(101) && visibility.invisible(104) && visibility.invisible(7000)
        );
        assert!(!visibility.invisible(103) && !visibility.invisible(99));
        assert_eq!("5:5:".parse::<Visibility>().expect("none running").running, Vec::<u32>::new());
        assert!("5:5".parse::<Visibility>().is_err());
    }

    #[test]
    fn a_change_without_its_key_rereads_the_chunk_and_a_new_key_starts_the_table_again() {
        let (mut backfill, plan) = started();
        backfill
            .watermark(watermark_content(false, &plan.id).as_bytes(), Lsn(20), "p", "d", 0)
            .expect("low");
        backfill.changed(42, Touched::Unknown);
        backfill.chunk_read(ChunkRead {
            id: plan.id.clone(),
            rows: rows(&[1, 2]),
            visibility: Visibility::default(),
            complete: false,
        });
        assert!(high(&mut backfill, &plan.id).reread);
        let again = backfill.next_chunk().expect("again");
        backfill
            .watermark(watermark_content(false, &again.id).as_bytes(), Lsn(30), "p", "d", 0)
            .expect("low");
        backfill.chunk_read(ChunkRead {
            id: again.id.clone(),
            rows: rows(&[1, 2]),
            visibility: Visibility::default(),
            complete: false,
        });
        assert_eq!(high(&mut backfill, &again.id).read, 2);
        // The table now keyed by another column: paged from its start again.
        let mut rekeyed = (*table()).clone();
        rekeyed.key = vec![1];
        backfill.look_up_again();
        backfill.needs_table();
        backfill.table_found(Arc::new(rekeyed), query());
        assert!(backfill.next_chunk().expect("next").after.is_none());
    }

    #[test]
    fn a_table_requested_while_it_is_read_is_read_again_after() {
        let (mut backfill, _plan) = started();
        let name = TableName::new("public", "big");
        assert_eq!(backfill.request(vec![name.clone()], Lsn(50)), std::slice::from_ref(&name));
        assert_eq!(
            backfill.request(vec![name.clone()], Lsn(60)),
            Vec::<TableName>::new(),
            "already waiting"
        );
        assert_eq!(backfill.tables(), 2);
    }
}
