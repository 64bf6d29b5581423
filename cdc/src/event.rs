//! Debezium change events: the Kafka key and value of each row change, as JSON bytes.
//!
//! The JSON is written directly, column by column in table order, instead of through a
//! `serde_json::Value` tree: it keeps the documented field order and avoids a map per row.

use std::fmt::Write;

use serde_json::Value;

use crate::lsn::Lsn;
use crate::mask::{self, Mask};
use crate::pgoutput::{Datum, Relation};
use crate::value::{to_json, ValueType, UNAVAILABLE};

/// A table as events need it: its columns, how each is encoded, and which of them form the
/// Kafka key.
#[derive(Debug, Clone)]
pub struct Table {
    pub relation: Relation,
    /// The encoding of each column of `relation`, in order.
    pub types: Vec<ValueType>,
    /// Indexes of the key columns: the primary key, else the replica identity; empty when
    /// the table has neither (its events then have a null key).
    pub key: Vec<usize>,
    /// `<topic_prefix>.<schema>.<table>`.
    pub topic: String,
    /// What happens to each column (excluded, masked); empty: every column as it is.
    pub masks: Vec<Mask>,
}

impl Table {
    fn mask(&self, index: usize) -> &Mask {
        self.masks.get(index).unwrap_or(&Mask::Keep)
    }
}

/// Debezium's operation codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Create,
    Update,
    Delete,
    Read,
    Truncate,
}

impl Op {
    pub fn code(self) -> &'static str {
        match self {
            Op::Create => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Read => "r",
            Op::Truncate => "t",
        }
    }
}

/// The `source` block fields that vary per event.
#[derive(Debug, Clone)]
pub struct Source<'a> {
    pub version: &'a str,
    /// The logical server name: the topic prefix.
    pub name: &'a str,
    pub db: &'a str,
    /// Commit time (snapshot start time for snapshot rows), in ms since the Unix epoch.
    pub ts_ms: i64,
    /// `"true"`, `"last"` or `"false"`.
    pub snapshot: &'static str,
    pub tx_id: Option<u32>,
    /// The event's place in its transaction, with `source.transaction_metadata`.
    pub transaction: Option<TransactionBlock>,
    /// The LSN of this change.
    pub lsn: Lsn,
    /// The LSN of the last commit before it, for `sequence`.
    pub last_commit_lsn: Option<Lsn>,
}

/// A record ready for Kafka. A `None` value is a tombstone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    /// Kafka headers: Debezium's `__debezium.oldkey` / `__debezium.newkey` on key changes.
    pub headers: Vec<(&'static str, Vec<u8>)>,
}

/// Debezium's `transaction` block: which transaction an event belongs to, and its place in
/// it, overall and among its table's events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransactionBlock {
    /// `<xid>:<commit LSN>`.
    pub id: String,
    pub total_order: u64,
    pub data_collection_order: u64,
}

fn write_transaction(out: &mut String, block: Option<&TransactionBlock>) {
    match block {
        None => out.push_str("null"),
        Some(block) => {
            out.push_str("{\"id\":");
            write_str(out, &block.id);
            let _ = write!(
                out,
                ",\"total_order\":{},\"data_collection_order\":{}}}",
                block.total_order, block.data_collection_order
            );
        }
    }
}

/// The BEGIN (without counts) or END event of a transaction on `<prefix>.transaction`, as
/// Debezium's `provide.transaction.metadata` writes them.
pub fn transaction_event(
    prefix: &str,
    id: &str,
    ts_ms: i64,
    counts: Option<&std::collections::BTreeMap<String, u64>>,
) -> Record {
    let mut key = String::from("{\"id\":");
    write_str(&mut key, id);
    key.push('}');
    let mut value = String::with_capacity(128);
    value.push_str("{\"status\":");
    value.push_str(if counts.is_some() { "\"END\"" } else { "\"BEGIN\"" });
    value.push_str(",\"id\":");
    write_str(&mut value, id);
    match counts {
        None => value.push_str(",\"event_count\":null,\"data_collections\":null"),
        Some(counts) => {
            let _ = write!(
                value,
                ",\"event_count\":{},\"data_collections\":[",
                counts.values().sum::<u64>()
            );
            for (n, (table, count)) in counts.iter().enumerate() {
                if n > 0 {
                    value.push(',');
                }
                value.push_str("{\"data_collection\":");
                write_str(&mut value, table);
                let _ = write!(value, ",\"event_count\":{count}}}");
            }
            value.push(']');
        }
    }
    let _ = write!(value, ",\"ts_ms\":{ts_ms}}}");
    Record {
        topic: format!("{prefix}.transaction"),
        key: Some(key.into_bytes()),
        value: Some(value.into_bytes()),
        headers: Vec::new(),
    }
}

/// The header of the delete half of a key change: the key the row moved to.
pub const NEW_KEY_HEADER: &str = "__debezium.newkey";
/// The header of the create half of a key change: the key the row came from.
pub const OLD_KEY_HEADER: &str = "__debezium.oldkey";

/// A row image: one optional text value per column (`None` is SQL NULL), or the marker of
/// an unchanged TOASTed value.
pub type Row<'a> = &'a [Datum];

/// The records of one row change: the event, and for a delete with a key its tombstone.
///
/// `before` and `after` are the row images the event shows; `old` is the whole old row when
/// PostgreSQL sent it (REPLICA IDENTITY FULL), where an unchanged TOASTed column of `after`
/// takes its value from; without it, such a column gets Debezium's placeholder.
pub fn change(
    table: &Table,
    op: Op,
    before: Option<Row<'_>>,
    after: Option<Row<'_>>,
    old: Option<Row<'_>>,
    source: &Source<'_>,
    now_ms: i64,
) -> Vec<Record> {
    let key_row = after.or(before);
    let key = key_row.and_then(|row| key_json(table, row, old));
    let mut value = String::with_capacity(256);
    value.push_str("{\"before\":");
    write_row(&mut value, table, before, None);
    value.push_str(",\"after\":");
    write_row(&mut value, table, after, old);
    value.push_str(",\"source\":");
    write_source(&mut value, table, source);
    let _ = write!(value, ",\"op\":\"{}\",\"ts_ms\":{now_ms},\"transaction\":", op.code());
    write_transaction(&mut value, source.transaction.as_ref());
    value.push('}');
    let mut records = vec![Record {
        topic: table.topic.clone(),
        key: key.clone(),
        value: Some(value.into_bytes()),
        headers: Vec::new(),
    }];
    // A tombstone removes a key from a compacted topic; without a key there is nothing to
    // remove, and Kafka would refuse it.
    if op == Op::Delete && key.is_some() {
        records.push(Record { topic: table.topic.clone(), key, value: None, headers: Vec::new() });
    }
    records
}

/// The truncate event of one table: no key, no rows.
pub fn truncate(table: &Table, source: &Source<'_>, now_ms: i64) -> Record {
    let mut value = String::with_capacity(256);
    value.push_str("{\"before\":null,\"after\":null,\"source\":");
    write_source(&mut value, table, source);
    let _ = write!(value, ",\"op\":\"t\",\"ts_ms\":{now_ms},\"transaction\":");
    write_transaction(&mut value, source.transaction.as_ref());
    value.push('}');
    Record {
        topic: table.topic.clone(),
        key: None,
        value: Some(value.into_bytes()),
        headers: Vec::new(),
    }
}

/// The key of a row: `{"id":1}`, or `None` for a table without key columns, or when the row
/// image does not carry every key column (a key column is never NULL: a NULL there is a
/// column the replica identity left out).
pub fn key_json(table: &Table, row: Row<'_>, fallback: Option<Row<'_>>) -> Option<Vec<u8>> {
    let carried = |index: usize| match row.get(index) {
        Some(Datum::Text(_) | Datum::Binary(_)) => true,
        Some(Datum::UnchangedToast) => {
            matches!(fallback.and_then(|f| f.get(index)), Some(Datum::Text(_) | Datum::Binary(_)))
        }
        Some(Datum::Null) | None => false,
    };
    if table.key.is_empty() || !table.key.iter().all(|&index| carried(index)) {
        return None;
    }
    let mut out = String::with_capacity(32);
    out.push('{');
    for (n, &index) in table.key.iter().enumerate() {
        if n > 0 {
            out.push(',');
        }
        write_str(&mut out, &table.relation.columns[index].name);
        out.push(':');
        write_column(&mut out, table, index, row.get(index), fallback.and_then(|f| f.get(index)));
    }
    out.push('}');
    Some(out.into_bytes())
}

fn write_row(out: &mut String, table: &Table, row: Option<Row<'_>>, fallback: Option<Row<'_>>) {
    let Some(row) = row else {
        out.push_str("null");
        return;
    };
    out.push('{');
    let mut first = true;
    for (index, column) in table.relation.columns.iter().enumerate() {
        if *table.mask(index) == Mask::Exclude {
            continue;
        }
        if !first {
            out.push(',');
        }
        first = false;
        write_str(out, &column.name);
        out.push(':');
        write_column(out, table, index, row.get(index), fallback.and_then(|f| f.get(index)));
    }
    out.push('}');
}

/// Column `index`'s value, masked as the table says.
fn write_column(
    out: &mut String,
    table: &Table,
    index: usize,
    datum: Option<&Datum>,
    fallback: Option<&Datum>,
) {
    // An unchanged TOASTed value is the old row's, when PostgreSQL sent it.
    let datum = match (datum, fallback) {
        (Some(Datum::UnchangedToast), Some(old @ (Datum::Text(_) | Datum::Binary(_)))) => Some(old),
        _ => datum,
    };
    match (table.mask(index), datum) {
        (Mask::Keep | Mask::Exclude, _) | (_, Some(Datum::Null) | None) => {
            write_datum(out, &table.types[index], datum, None)
        }
        (Mask::Hash(salt), Some(Datum::Text(bytes) | Datum::Binary(bytes))) => {
            write_str(out, &mask::hash(salt, bytes))
        }
        (Mask::Hash(_), Some(Datum::UnchangedToast)) => write_str(out, UNAVAILABLE),
        (Mask::Redact, Some(_)) => write_str(out, mask::REDACTED),
    }
}

fn write_datum(out: &mut String, ty: &ValueType, datum: Option<&Datum>, fallback: Option<&Datum>) {
    match datum {
        Some(Datum::Text(bytes)) | Some(Datum::Binary(bytes)) => {
            let text = String::from_utf8_lossy(bytes);
            write_value(out, &to_json(ty, &text));
        }
        Some(Datum::UnchangedToast) => match fallback {
            Some(old @ Datum::Text(_)) => write_datum(out, ty, Some(old), None),
            _ => write_str(out, UNAVAILABLE),
        },
        Some(Datum::Null) | None => out.push_str("null"),
    }
}

fn write_source(out: &mut String, table: &Table, s: &Source<'_>) {
    out.push_str("{\"version\":");
    write_str(out, s.version);
    out.push_str(",\"connector\":\"postgresql\",\"name\":");
    write_str(out, s.name);
    let _ = write!(out, ",\"ts_ms\":{},\"snapshot\":\"{}\",\"db\":", s.ts_ms, s.snapshot);
    write_str(out, s.db);
    let sequence = format!(
        "[{},\"{}\"]",
        s.last_commit_lsn.map_or("null".to_string(), |lsn| format!("\"{}\"", lsn.0)),
        s.lsn.0
    );
    out.push_str(",\"sequence\":");
    write_str(out, &sequence);
    out.push_str(",\"schema\":");
    write_str(out, &table.relation.namespace);
    out.push_str(",\"table\":");
    write_str(out, &table.relation.name);
    match s.tx_id {
        Some(xid) => {
            let _ = write!(out, ",\"txId\":{xid}");
        }
        None => out.push_str(",\"txId\":null"),
    }
    let _ = write!(out, ",\"lsn\":{},\"xmin\":null}}", s.lsn.0);
}

fn write_str(out: &mut String, s: &str) {
    write_value(out, &Value::String(s.to_string()));
}

fn write_value(out: &mut String, value: &Value) {
    // Serializing a Value to a String cannot fail.
    out.push_str(&serde_json::to_string(value).unwrap_or_default());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::Column;
    use crate::value::ValueType;
    use bytes::Bytes;
    use serde_json::json;

    fn table() -> Table {
        let column = |name: &str, type_oid, is_key| Column {
            is_key,
            name: name.into(),
            type_oid,
            type_modifier: -1,
        };
        Table {
            relation: Relation {
                id: 1,
                namespace: "public".into(),
                name: "orders".into(),
                replica_identity: b'd',
                columns: vec![
                    column("id", 23, true),
                    column("email", 25, false),
                    column("note", 25, false),
                ],
            },
            types: vec![ValueType::Scalar(23), ValueType::Scalar(25), ValueType::Scalar(25)],
            key: vec![0],
            topic: "shop.public.orders".into(),
            masks: Vec::new(),
        }
    }

    fn text(s: &str) -> Datum {
        Datum::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn source() -> Source<'static> {
        Source {
            version: "0.1.0",
            name: "shop",
            db: "shop",
            ts_ms: 1_700_000_000_000,
            snapshot: "false",
            tx_id: Some(556),
            transaction: None,
            lsn: Lsn(24_023_128),
            last_commit_lsn: Some(Lsn(24_023_119)),
        }
    }

    fn parse(bytes: &Option<Vec<u8>>) -> serde_json::Value {
        serde_json::from_slice(bytes.as_deref().expect("bytes")).expect("json")
    }

    #[test]
    fn masks_apply_to_both_images_and_to_the_key() {
        let salt: std::sync::Arc<[u8]> = b"0123456789abcdef".as_slice().into();
        let mut table = table();
        table.masks = vec![Mask::Hash(salt.clone()), Mask::Redact, Mask::Exclude];
        let before = [text("1"), text("a@x"), text("secret")];
        let after = [text("1"), Datum::Null, text("secret")];
        let records = change(&table, Op::Update, Some(&before), Some(&after), None, &source(), 5);
        let id = crate::mask::hash(&salt, b"1");
        assert_eq!(parse(&records[0].key), json!({ "id": id }));
        let value = parse(&records[0].value);
        assert_eq!(value["before"], json!({"id": id, "email": "***"}));
        assert_eq!(value["after"], json!({"id": id, "email": null}));
        let bytes = String::from_utf8(records[0].value.clone().expect("value")).expect("utf8");
        assert!(!bytes.contains("secret") && !bytes.contains("note"), "{bytes}");
    }

    #[test]
    fn an_update_is_the_documented_envelope() {
        let after = [text("1"), text("a@x"), Datum::Null];
        let records = change(&table(), Op::Update, None, Some(&after), None, &source(), 5);
        assert_eq!(records.len(), 1);
        assert_eq!(parse(&records[0].key), json!({"id": 1}));
        assert_eq!(
            parse(&records[0].value),
            json!({"before": null, "after": {"id": 1, "email": "a@x", "note": null},
                   "source": {"version": "0.1.0", "connector": "postgresql", "name": "shop", "ts_ms": 1_700_000_000_000_i64,
                              "snapshot": "false", "db": "shop", "sequence": "[\"24023119\",\"24023128\"]",
                              "schema": "public", "table": "orders", "txId": 556, "lsn": 24_023_128, "xmin": null},
                   "op": "u", "ts_ms": 5, "transaction": null})
        );
        let raw = String::from_utf8(records[0].value.clone().expect("value")).expect("utf8");
        assert!(raw.starts_with("{\"before\":null,\"after\":{\"id\":1,\"email\""), "{raw}");
    }

    #[test]
    fn a_delete_is_followed_by_a_tombstone() {
        let before = [text("7"), Datum::Null, Datum::Null];
        let records = change(&table(), Op::Delete, Some(&before), None, None, &source(), 5);
        assert_eq!(records.len(), 2);
        assert_eq!(
            parse(&records[0].value)["before"],
            json!({"id": 7, "email": null, "note": null})
        );
        assert_eq!(parse(&records[0].value)["after"], json!(null));
        assert_eq!(records[1].key, records[0].key);
        assert_eq!(records[1].value, None);
    }

    #[test]
    fn unchanged_toast_uses_the_old_value_or_the_placeholder() {
        let before = [text("1"), text("a@x"), text("long text")];
        let after = [text("1"), text("b@x"), Datum::UnchangedToast];
        let full =
            change(&table(), Op::Update, Some(&before), Some(&after), Some(&before), &source(), 5);
        assert_eq!(parse(&full[0].value)["after"]["note"], json!("long text"));
        let moved = change(&table(), Op::Create, None, Some(&after), Some(&before), &source(), 5);
        assert_eq!(parse(&moved[0].value)["before"], json!(null));
        assert_eq!(parse(&moved[0].value)["after"]["note"], json!("long text"));
        let keyed = change(&table(), Op::Update, None, Some(&after), None, &source(), 5);
        assert_eq!(parse(&keyed[0].value)["after"]["note"], json!(UNAVAILABLE));
    }

    #[test]
    fn tables_without_key_give_null_keys_and_truncates_have_no_rows() {
        let mut t = table();
        t.key.clear();
        let after = [text("1"), text("a"), text("b")];
        assert_eq!(change(&t, Op::Create, None, Some(&after), None, &source(), 5)[0].key, None);
        let record = truncate(&t, &source(), 5);
        let value = parse(&record.value);
        assert_eq!(value["op"], "t");
        assert_eq!(value["after"], json!(null));
    }

    #[test]
    fn a_delete_whose_image_lacks_the_key_has_no_key_and_no_tombstone() {
        // REPLICA IDENTITY USING INDEX on (email): the old image carries email, not id.
        let before = [Datum::Null, text("a@x"), Datum::Null];
        let records = change(&table(), Op::Delete, Some(&before), None, None, &source(), 5);
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].key, None);
        assert_eq!(parse(&records[0].value)["before"]["email"], json!("a@x"));
    }
}
