//! The streaming core: what each pgoutput message means, as state and actions, without I/O.
//! [`Core`] owns the transaction in progress, the relations seen (which are streamed, under
//! which topic) and the events built from changes; the pipeline performs what it asks for (a
//! catalog lookup, sending records, confirming a commit once acknowledged) and hands back the
//! results. [`Positions`] owns what may be confirmed to PostgreSQL, and when.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use crate::error::CdcError;
use crate::event::{
    self, Op, Record, Source, Table, TransactionBlock, NEW_KEY_HEADER, OLD_KEY_HEADER,
};
use crate::incremental::{self, Backfill, Reconciled, Touched};
use crate::lsn::Lsn;
use crate::names::{TableName, Topics};
use crate::outbox::{self, OutboxTable, Resolved};
use crate::pgoutput::{Datum, Message, OldKind, Relation, PG_EPOCH_OFFSET_MICROS};
use crate::sink::Commit;

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What the pipeline does after a message.
#[derive(Debug)]
pub enum Action {
    /// Nothing (a transaction's start, a change of a table not streamed, ...).
    None,
    /// Look `relation` up in the catalog and make sure `topic` exists, then hand the table to
    /// [`Core::learned`]: the changes that follow need it.
    Learn { relation: Relation, topic: String },
    /// Send `records`, in order (making sure their topics exist first); `counted` are the
    /// changes they stand for, by table label (`schema.table`).
    Send { records: Vec<Record>, counted: Vec<(String, Op)> },
    /// A transaction ended: send `records` (its END event, with transaction metadata), then
    /// its end may be confirmed once Kafka has acknowledged every record sent before it.
    Commit { records: Vec<Record>, commit: Commit },
    /// An incremental snapshot of `tables` was requested at `lsn`: hold the confirmed
    /// position behind it, once per table, until each table's last chunk is acknowledged.
    Hold { lsn: Lsn, tables: Vec<TableName> },
    /// A chunk of an incremental snapshot reached its high watermark: send its records.
    Backfill(Reconciled),
}

/// The transaction being streamed.
#[derive(Debug, Clone)]
struct Txn {
    xid: u32,
    /// Commit time, microseconds since the Unix epoch.
    commit_time_us: i64,
    /// Debezium's transaction id: `<xid>:<commit LSN>`.
    id: String,
    /// With transaction metadata: whether its BEGIN event went out, its events so far, and
    /// per table.
    begun: bool,
    total: u64,
    counts: BTreeMap<String, u64>,
}

impl Txn {
    fn new(xid: u32, final_lsn: Lsn, commit_time_us: i64) -> Txn {
        let id = format!("{xid}:{}", final_lsn.0);
        Txn { xid, commit_time_us, id, begun: false, total: 0, counts: BTreeMap::new() }
    }
}

/// The state of the stream between messages.
pub struct Core {
    prefix: String,
    database: String,
    topics: Topics,
    /// The configured tables: only these are streamed. `None`: whatever the publication sends.
    include: Option<HashSet<TableName>>,
    /// Each relation seen, by id: its table, or `None` when it is not streamed.
    known: HashMap<u32, Option<Arc<Table>>>,
    txn: Option<Txn>,
    last_commit: Option<Lsn>,
    /// The configured outbox tables, and those met, by relation id.
    outbox: Vec<OutboxTable>,
    outboxes: HashMap<u32, Resolved>,
    /// Debezium's `transaction` blocks and BEGIN/END events on `<prefix>.transaction`.
    transaction_metadata: bool,
    /// Incremental snapshots: the tables to read while streaming, and their chunks.
    backfill: Backfill,
}

/// The metrics label of a table.
fn label(table: &Table) -> String {
    format!("{}.{}", table.relation.namespace, table.relation.name)
}

impl Core {
    /// `topics` holds the topics already claimed (the published tables'), so that a new
    /// relation whose topic would collide with one of them is refused. `backfill` takes the
    /// incremental snapshots requested of this pipeline's slot.
    pub fn new(
        prefix: &str,
        database: &str,
        topics: Topics,
        include: Option<HashSet<TableName>>,
        outbox: Vec<OutboxTable>,
        transaction_metadata: bool,
        backfill: Backfill,
    ) -> Core {
        Core {
            prefix: prefix.to_string(),
            database: database.to_string(),
            topics,
            include,
            known: HashMap::new(),
            txn: None,
            last_commit: None,
            outbox,
            outboxes: HashMap::new(),
            transaction_metadata,
            backfill,
        }
    }

    /// The incremental snapshots, for the pipeline to look tables up and read chunks.
    pub fn backfill(&mut self) -> &mut Backfill {
        &mut self.backfill
    }

    /// Whether a transaction is open: its end has not been seen.
    pub fn in_transaction(&self) -> bool {
        self.txn.is_some()
    }

    /// Takes in the table a [`Action::Learn`] asked for.
    pub fn learned(&mut self, table: Arc<Table>) {
        self.backfill.relation_changed(&table);
        self.known.insert(table.relation.id, Some(table));
    }

    /// What message `message`, at `lsn`, means; `now_ms` is the events' `ts_ms`.
    pub fn on_message(
        &mut self,
        message: Message,
        lsn: Lsn,
        now_ms: i64,
    ) -> Result<Action, CdcError> {
        let change = |core: &mut Core,
                      table: &Arc<Table>,
                      op: Op,
                      before: Option<&[Datum]>,
                      after: Option<&[Datum]>,
                      old: Option<&[Datum]>| {
            let (begin, place) = core.place(&label(table));
            let source = core.source(lsn, now_ms, place);
            let mut records = Vec::from_iter(begin);
            records.extend(event::change(table, op, before, after, old, &source, now_ms));
            records
        };
        let (table, op, records) = match message {
            Message::Begin { xid, final_lsn, commit_time } => {
                let commit_time_us = commit_time + PG_EPOCH_OFFSET_MICROS;
                self.txn = Some(Txn::new(xid, final_lsn, commit_time_us));
                return Ok(Action::None);
            }
            Message::Commit { commit_lsn, end_lsn, commit_time, .. } => {
                self.last_commit = Some(commit_lsn);
                let txn = self.txn.take();
                if let Some(txn) = &txn {
                    self.backfill.committed(txn.xid);
                }
                let end = txn.filter(|t| t.begun).map(|t| {
                    event::transaction_event(
                        &self.prefix,
                        &t.id,
                        t.commit_time_us / 1000,
                        Some(&t.counts),
                    )
                });
                let commit_time_us = commit_time + PG_EPOCH_OFFSET_MICROS;
                let commit = Commit { lsn: end_lsn, commit_time_us };
                return Ok(Action::Commit { records: Vec::from_iter(end), commit });
            }
            Message::Relation(relation) => return self.relation(relation),
            Message::Insert { relation, new } => {
                if let Some(outbox) = self.outboxes.get(&relation) {
                    let records = vec![outbox.route(&self.prefix, &new)];
                    let table = outbox.table();
                    let label = format!("{}.{}", table.schema, table.name);
                    return Ok(Action::Send { records, counted: vec![(label, Op::Create)] });
                }
                let Some(table) = self.table(relation)? else { return Ok(Action::None) };
                self.touched(&table, &new, None);
                let records = change(self, &table, Op::Create, None, Some(&new[..]), None);
                (table, Op::Create, records)
            }
            Message::Update { relation, old, new } => {
                let Some(table) = self.table(relation)? else { return Ok(Action::None) };
                let old_row = old.as_ref().map(|(_, row)| row.as_slice());
                self.touched(&table, &new, old_row);
                if let Some(old_row) = old_row {
                    self.touched(&table, old_row, None);
                }
                return Ok(self.update(table, old, &new, lsn, now_ms));
            }
            Message::Delete { relation, old: (_, old) } => {
                let Some(table) = self.table(relation)? else { return Ok(Action::None) };
                self.touched(&table, &old, None);
                let records = change(self, &table, Op::Delete, Some(&old[..]), None, None);
                (table, Op::Delete, records)
            }
            Message::Truncate { relations, .. } => {
                let (mut records, mut counted) = (Vec::new(), Vec::new());
                for id in relations {
                    if let Some(table) = self.table(id)? {
                        self.backfill.changed(id, Touched::All);
                        let (begin, place) = self.place(&label(&table));
                        records.extend(begin);
                        records.push(event::truncate(
                            &table,
                            &self.source(lsn, now_ms, place),
                            now_ms,
                        ));
                        counted.push((label(&table), Op::Truncate));
                    }
                }
                return Ok(Action::Send { records, counted });
            }
            Message::LogicalMessage { prefix, content, .. } if prefix == outbox::MESSAGE_PREFIX => {
                let records = vec![outbox::route_message(&self.prefix, &content)];
                return Ok(Action::Send { records, counted: vec![(prefix, Op::Create)] });
            }
            Message::LogicalMessage { prefix, content, .. }
                if prefix == incremental::REQUEST_PREFIX =>
            {
                return Ok(self.snapshot_request(&content, lsn));
            }
            Message::LogicalMessage { prefix, content, .. }
                if prefix == incremental::WATERMARK_PREFIX =>
            {
                let reconciled = self
                    .backfill
                    .watermark(&content, lsn, &self.prefix, &self.database, now_ms)
                    .map_err(CdcError::Protocol)?;
                return Ok(reconciled.map_or(Action::None, Action::Backfill));
            }
            Message::Type { .. } | Message::Origin { .. } | Message::LogicalMessage { .. } => {
                return Ok(Action::None)
            }
        };
        Ok(Action::Send { records, counted: vec![(label(&table), op)] })
    }

    /// Tells the incremental snapshot of `table`, if one is between watermarks, which row
    /// the stream changed.
    fn touched(&mut self, table: &Table, row: &[Datum], fallback: Option<&[Datum]>) {
        if self.backfill.watches(table.relation.id) {
            let touched =
                event::key_json(table, row, fallback).map_or(Touched::Unknown, Touched::Row);
            self.backfill.changed(table.relation.id, touched);
        }
    }

    /// A request for incremental snapshots: the tables this pipeline streams are queued; a
    /// garbled request or a table it does not stream is logged and skipped.
    fn snapshot_request(&mut self, content: &[u8], lsn: Lsn) -> Action {
        let tables = match incremental::parse_request(content) {
            Ok((slot, tables)) if slot == self.backfill.slot() => tables,
            Ok(_) => return Action::None, // another pipeline's
            Err(problem) => {
                tracing::warn!(%lsn, problem, "ignoring a garbled incremental snapshot request");
                return Action::None;
            }
        };
        // Outbox tables' rows are events, never rows of a topic of their own.
        let (streamed, skipped): (Vec<TableName>, Vec<TableName>) =
            tables.into_iter().partition(|t| {
                self.include.as_ref().is_none_or(|include| include.contains(t))
                    && !self.outbox.iter().any(|o| &o.name == t)
            });
        for table in skipped {
            tracing::warn!(%table, "an incremental snapshot was requested for a table not streamed (not in source.tables, or an outbox table): skipped");
        }
        let tables = self.backfill.request(streamed, lsn);
        if tables.is_empty() {
            return Action::None;
        }
        Action::Hold { lsn, tables }
    }

    /// The `source` block of an event at `lsn`.
    fn source(&self, lsn: Lsn, now_ms: i64, transaction: Option<TransactionBlock>) -> Source<'_> {
        let (xid, commit_ms) =
            self.txn.as_ref().map_or((None, now_ms), |t| (Some(t.xid), t.commit_time_us / 1000));
        Source {
            version: VERSION,
            name: &self.prefix,
            db: &self.database,
            ts_ms: commit_ms,
            snapshot: "false",
            tx_id: xid,
            transaction,
            lsn,
            last_commit_lsn: self.last_commit,
        }
    }

    /// With transaction metadata, the next event of `table`'s place in its transaction, and
    /// the transaction's BEGIN event when this is its first.
    fn place(&mut self, table: &str) -> (Option<Record>, Option<TransactionBlock>) {
        let Some(txn) = self.txn.as_mut().filter(|_| self.transaction_metadata) else {
            return (None, None);
        };
        let begin = (!txn.begun).then(|| {
            txn.begun = true;
            event::transaction_event(&self.prefix, &txn.id, txn.commit_time_us / 1000, None)
        });
        let in_table = txn.counts.entry(table.to_string()).or_default();
        *in_table += 1;
        let data_collection_order = *in_table;
        txn.total += 1;
        let block =
            TransactionBlock { id: txn.id.clone(), total_order: txn.total, data_collection_order };
        (begin, Some(block))
    }

    /// The records of an update. One that changes the key becomes, as in Debezium, a delete
    /// of the old key (with its tombstone, and the new key in a `__debezium.newkey` header)
    /// and a create of the new one (with `__debezium.oldkey`). Under REPLICA IDENTITY FULL
    /// the old row fills in the unchanged TOASTed values PostgreSQL did not send again.
    fn update(
        &mut self,
        table: Arc<Table>,
        old: Option<(OldKind, Vec<Datum>)>,
        new: &[Datum],
        lsn: Lsn,
        now_ms: i64,
    ) -> Action {
        let label = label(&table);
        let old_row = old.as_ref().map(|(_, row)| row.as_slice());
        let full_old =
            old.as_ref().filter(|(kind, _)| *kind == OldKind::Full).map(|(_, row)| row.as_slice());
        // Most updates carry no old row (default identity, key unchanged): no keys to compare.
        let moved =
            old_row.and_then(|row| event::key_json(&table, row, None)).and_then(|old_key| {
                let new_key = event::key_json(&table, new, old_row);
                (new_key.as_ref() != Some(&old_key)).then_some((old_key, new_key))
            });
        let (begin, place) = self.place(&label);
        let mut records = Vec::from_iter(begin);
        let source = self.source(lsn, now_ms, place);
        let Some((old_key, new_key)) = moved else {
            records.extend(event::change(
                &table,
                Op::Update,
                full_old,
                Some(new),
                full_old,
                &source,
                now_ms,
            ));
            return Action::Send { records, counted: vec![(label, Op::Update)] };
        };
        let mut deleted = event::change(&table, Op::Delete, old_row, None, None, &source, now_ms);
        if let Some(new_key) = &new_key {
            for record in &mut deleted {
                record.headers.push((NEW_KEY_HEADER, new_key.clone()));
            }
        }
        records.extend(deleted);
        let (_, place) = self.place(&label);
        let source = self.source(lsn, now_ms, place);
        let mut created =
            event::change(&table, Op::Create, None, Some(new), full_old, &source, now_ms);
        for record in &mut created {
            record.headers.push((OLD_KEY_HEADER, old_key.clone()));
        }
        records.extend(created);
        Action::Send { records, counted: vec![(label.clone(), Op::Delete), (label, Op::Create)] }
    }

    /// What a change of relation `id` is for: `Ok(None)` for a table not streamed.
    fn table(&self, id: u32) -> Result<Option<Arc<Table>>, CdcError> {
        self.known.get(&id).cloned().ok_or_else(|| {
            CdcError::Protocol(format!("change for relation {id} before its Relation message"))
        })
    }

    /// A Relation message: a table not streamed is noted as such; a streamed one needs its
    /// catalog view and topic, which the pipeline gets.
    fn relation(&mut self, relation: Relation) -> Result<Action, CdcError> {
        let name = TableName::new(&relation.namespace, &relation.name);
        // An outbox table's rows are events, not changes: its inserts are routed, the rest
        // (the application emptying it) ignored.
        if let Some(outbox) = self.outbox.iter().find(|o| o.name == name) {
            let resolved = outbox.resolve(&relation).map_err(CdcError::Config)?;
            self.outboxes.insert(relation.id, resolved);
            self.known.insert(relation.id, None);
            return Ok(Action::None);
        }
        self.outboxes.remove(&relation.id);
        if self.include.as_ref().is_some_and(|include| !include.contains(&name)) {
            if let Some(Some(was)) = self.known.get(&relation.id) {
                let was = TableName::new(&was.relation.namespace, &was.relation.name);
                tracing::warn!(table = %was, now = %name, "a streamed table was renamed to a name not in source.tables: its changes are no longer streamed");
            }
            self.known.insert(relation.id, None);
            return Ok(Action::None);
        }
        let topic = self.topics.claim(&self.prefix, &name)?;
        Ok(Action::Learn { relation, topic })
    }
}

/// The stream's positions. The confirmed one moves only here, and only forward: to the end
/// of a transaction Kafka has wholly acknowledged, or to the server's position when nothing
/// is open or unacknowledged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Positions {
    received: Lsn,
    confirmed: Lsn,
    /// The confirmed position last sent in a status update.
    reported: Lsn,
    /// Positions the confirmed one must not pass (incremental snapshot requests, one per
    /// table, so that a restart reads them again). Few: a small list.
    holds: Vec<Lsn>,
}

impl Positions {
    /// Starting from what the slot already holds as confirmed, so that keepalives seen while
    /// the server catches up never report an older position.
    pub fn new(slot_confirmed: Lsn) -> Positions {
        Positions { confirmed: slot_confirmed, ..Positions::default() }
    }

    /// WAL at `lsn` was received.
    pub fn received(&mut self, lsn: Lsn) {
        self.received = self.received.max(lsn);
    }

    /// Kafka acknowledged every record up to the end of the transaction ending at `commit`.
    pub fn acknowledged(&mut self, commit: Lsn) {
        self.advance(commit);
    }

    /// The server is at `wal_end`; `idle` when no transaction is open and nothing sent is
    /// unacknowledged, so that its position is safe to confirm (a quiet slot advances).
    pub fn keepalive(&mut self, wal_end: Lsn, idle: bool) {
        self.received(wal_end);
        if idle {
            self.advance(wal_end);
        }
    }

    /// Keeps the confirmed position at or before `lsn` until [`Positions::release`]: the
    /// transaction holding `lsn` ends after it, so a restart streams it again.
    pub fn hold(&mut self, lsn: Lsn) {
        self.holds.push(lsn);
    }

    /// Ends one [`Positions::hold`] of `lsn`.
    pub fn release(&mut self, lsn: Lsn) {
        if let Some(index) = self.holds.iter().position(|&held| held == lsn) {
            self.holds.swap_remove(index);
        }
    }

    fn advance(&mut self, to: Lsn) {
        let limit = self.holds.iter().copied().min().unwrap_or(to);
        self.confirmed = self.confirmed.max(to.min(limit));
    }

    pub fn confirmed(&self) -> Lsn {
        self.confirmed
    }

    pub fn last_received(&self) -> Lsn {
        self.received
    }

    /// Whether the confirmed position moved since the last status update.
    pub fn unreported(&self) -> bool {
        self.confirmed != self.reported
    }

    /// The (received, confirmed) positions of a status update about to be sent.
    pub fn report(&mut self) -> (Lsn, Lsn) {
        self.reported = self.confirmed;
        (self.received, self.confirmed)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use serde_json::{json, Value};

    use super::*;
    use crate::pgoutput::Column;
    use crate::value::ValueType;

    fn captured(index: usize) -> Message {
        crate::pgoutput::captured::message(index)
    }

    /// The catalog's view of `relation`: keyed by `id`, as the pipeline would learn it.
    fn table_of(relation: Relation, topic: String) -> Arc<Table> {
        let types =
            relation.columns.iter().map(|c: &Column| ValueType::Scalar(c.type_oid)).collect();
        Arc::new(Table { relation, types, key: vec![0], topic, masks: Vec::new() })
    }

    fn core(include: Option<&[&str]>) -> Core {
        let include =
            include.map(|names| names.iter().map(|n| TableName::new("public", *n)).collect());
        Core::new(
            "shop",
            "shop",
            Topics::default(),
            include,
            Vec::new(),
            false,
            Backfill::new("run", "slot"),
        )
    }

    /// Feeds message `index`, learning tables as the pipeline would.
    fn feed(core: &mut Core, index: usize) -> Action {
        let action = core.on_message(captured(index), Lsn(100 + index as u64), 7).expect("valid");
        if let Action::Learn { relation, topic } = &action {
            core.learned(table_of(relation.clone(), topic.clone()));
        }
        action
    }

    fn values(action: &Action) -> Vec<Value> {
        let Action::Send { records, .. } = action else { panic!("not a send: {action:?}") };
        records
            .iter()
            .map(|r| {
                r.value.as_ref().map_or(Value::Null, |v| serde_json::from_slice(v).expect("json"))
            })
            .collect()
    }

    #[test]
    fn a_transaction_becomes_its_events_then_a_commit() {
        let mut core = core(None);
        assert!(matches!(feed(&mut core, 0), Action::None));
        assert!(core.in_transaction());
        let Action::Learn { topic, .. } = feed(&mut core, 1) else { panic!("relation first") };
        assert_eq!(topic, "shop.public.cap");

        let insert = feed(&mut core, 2);
        let event = &values(&insert)[0];
        assert_eq!(event["op"], "c");
        assert_eq!(event["after"], json!({"id": 1, "name": "a", "big": null}));
        assert_eq!(event["source"]["txId"], 737);
        assert_eq!(event["source"]["lsn"], 102);
        // Commit time from Begin, in ms since the Unix epoch.
        assert_eq!(
            event["source"]["ts_ms"],
            (0x0003_0427_b970_6ad6 + PG_EPOCH_OFFSET_MICROS) / 1000
        );

        let update = feed(&mut core, 3);
        assert_eq!(values(&update)[0]["op"], "u");
        let Action::Send { counted, .. } = &update else { panic!() };
        assert_eq!(counted.iter().map(|(_, op)| *op).collect::<Vec<_>>(), [Op::Update]);

        // A delete is its event and a tombstone.
        let delete = feed(&mut core, 4);
        assert_eq!(values(&delete)[0]["op"], "d");
        assert_eq!(values(&delete)[1], Value::Null);

        assert!(matches!(feed(&mut core, 5), Action::Learn { .. }));
        assert_eq!(values(&feed(&mut core, 6))[0]["op"], "t");
        assert!(matches!(feed(&mut core, 7), Action::None), "logical messages are not streamed");
        let Action::Commit { commit, records } = feed(&mut core, 8) else { panic!("commit") };
        assert!(records.is_empty(), "no END event without transaction metadata");
        assert_eq!(commit.lsn, Lsn(0x15A_4790));
        assert!(!core.in_transaction());
    }

    #[test]
    fn the_next_transaction_names_the_last_commit() {
        let mut core = core(None);
        for index in [0, 1, 2, 8, 0] {
            feed(&mut core, index);
        }
        let event = &values(&feed(&mut core, 2))[0];
        assert_eq!(event["source"]["sequence"], r#"["22693408","102"]"#);
    }

    #[test]
    fn tables_not_configured_are_skipped_and_unknown_relations_refused() {
        let mut core = core(Some(&["other"]));
        feed(&mut core, 0);
        assert!(matches!(feed(&mut core, 1), Action::None), "cap is not in source.tables");
        assert!(matches!(feed(&mut core, 2), Action::None));
        let mut fresh = self::core(None);
        let error = fresh.on_message(captured(2), Lsn(1), 0).expect_err("no Relation yet");
        assert!(error.to_string().contains("before its Relation message"), "{error}");
    }

    #[test]
    fn a_key_change_is_a_delete_and_a_create_carrying_each_others_key() {
        let mut core = core(None);
        for index in [0, 1] {
            feed(&mut core, index);
        }
        let Some(Some(table)) = core.known.get(&16396).cloned() else { panic!("learnt") };
        let text = |s: &str| Datum::Text(Bytes::copy_from_slice(s.as_bytes()));
        let old = Some((OldKind::Key, vec![text("1"), Datum::Null, Datum::Null]));
        let action = core.update(table, old, &[text("2"), text("x"), Datum::Null], Lsn(5), 7);
        let Action::Send { records, counted } = &action else { panic!() };
        let ops: Vec<Op> = counted.iter().map(|(_, op)| *op).collect();
        assert_eq!(ops, [Op::Delete, Op::Create]);
        // The delete, its tombstone, the create.
        assert_eq!(records.len(), 3);
        assert_eq!(records[0].headers, [(NEW_KEY_HEADER, br#"{"id":2}"#.to_vec())]);
        assert_eq!(records[2].headers, [(OLD_KEY_HEADER, br#"{"id":1}"#.to_vec())]);
    }

    #[test]
    fn transaction_metadata_numbers_events_between_begin_and_end() {
        let mut core = core(None);
        core.transaction_metadata = true;
        let mut records = Vec::new();
        for index in 0..9 {
            match feed(&mut core, index) {
                Action::Send { records: sent, .. } | Action::Commit { records: sent, .. } => {
                    records.extend(sent)
                }
                _ => {}
            }
        }
        let value = |record: &Record| -> Value {
            serde_json::from_slice(record.value.as_deref().expect("value")).expect("json")
        };
        let id = "737:22693408";
        assert_eq!(records[0].topic, "shop.transaction");
        assert_eq!(
            value(&records[0]),
            json!({"status": "BEGIN", "id": id, "event_count": null, "data_collections": null,
                   "ts_ms": (0x0003_0427_b970_6ad6 + PG_EPOCH_OFFSET_MICROS) / 1000})
        );
        // Insert, update, delete (and its tombstone), truncate.
        let blocks: Vec<Value> = records[1..6]
            .iter()
            .filter(|r| r.value.is_some())
            .map(|r| value(r)["transaction"].clone())
            .collect();
        assert_eq!(blocks.len(), 4);
        for (n, block) in blocks.iter().enumerate() {
            let order = n as u64 + 1;
            assert_eq!(
                block,
                &json!({"id": id, "total_order": order, "data_collection_order": order})
            );
        }
        let end = value(records.last().expect("end"));
        assert_eq!(end["status"], "END");
        assert_eq!(end["event_count"], 4);
        assert_eq!(
            end["data_collections"],
            json!([{"data_collection": "public.cap", "event_count": 4}])
        );
    }

    #[test]
    fn only_acknowledged_commits_and_idle_keepalives_are_confirmed() {
        let mut positions = Positions::new(Lsn(50));
        // Behind what the slot holds: never reported backwards.
        positions.keepalive(Lsn(40), true);
        assert_eq!(positions.confirmed(), Lsn(50));
        // A keepalive while a transaction is open or records are unacknowledged.
        positions.keepalive(Lsn(90), false);
        assert_eq!((positions.confirmed(), positions.last_received()), (Lsn(50), Lsn(90)));
        positions.acknowledged(Lsn(80));
        assert!(positions.unreported());
        assert_eq!(positions.report(), (Lsn(90), Lsn(80)));
        assert!(!positions.unreported());
        // An acknowledgement older than what is confirmed moves nothing.
        positions.acknowledged(Lsn(70));
        assert_eq!(positions.confirmed(), Lsn(80));
        positions.keepalive(Lsn(95), true);
        assert_eq!(positions.report(), (Lsn(95), Lsn(95)));
    }

    #[test]
    fn a_held_position_is_not_passed_until_every_hold_is_released() {
        let mut positions = Positions::new(Lsn(50));
        positions.hold(Lsn(60));
        positions.hold(Lsn(60));
        positions.acknowledged(Lsn(55));
        assert_eq!(positions.confirmed(), Lsn(55));
        positions.acknowledged(Lsn(80));
        positions.keepalive(Lsn(90), true);
        assert_eq!(positions.confirmed(), Lsn(60), "held at the request");
        positions.release(Lsn(60));
        positions.acknowledged(Lsn(85));
        assert_eq!(positions.confirmed(), Lsn(60), "one table of the request still runs");
        positions.release(Lsn(60));
        positions.acknowledged(Lsn(85));
        assert_eq!(positions.confirmed(), Lsn(85));
    }

    #[test]
    fn a_snapshot_request_in_the_stream_holds_its_position_for_the_streamed_tables() {
        let mut core = core(Some(&["big"]));
        let content = incremental::request_content(
            "slot",
            &[TableName::new("public", "big"), TableName::new("public", "other")],
        );
        let message = Message::LogicalMessage {
            transactional: true,
            lsn: Lsn(70),
            prefix: incremental::REQUEST_PREFIX.into(),
            content: Bytes::from(content.into_bytes()),
        };
        let Action::Hold { lsn, tables } =
            core.on_message(message.clone(), Lsn(70), 0).expect("ok")
        else {
            panic!("a hold")
        };
        assert_eq!((lsn, tables), (Lsn(70), vec![TableName::new("public", "big")]));
        assert!(matches!(core.on_message(message, Lsn(71), 0), Ok(Action::None)), "already queued");
        let elsewhere = incremental::request_content("other", &[TableName::new("public", "big")]);
        let message = Message::LogicalMessage {
            transactional: true,
            lsn: Lsn(80),
            prefix: incremental::REQUEST_PREFIX.into(),
            content: Bytes::from(elsewhere.into_bytes()),
        };
        assert!(matches!(core.on_message(message, Lsn(80), 0), Ok(Action::None)), "another slot's");
    }
}
