//! The outbox pattern, as Debezium's outbox event router does it: a row inserted into an
//! outbox table, or a `pg_logical_emit_message(true, 'ficus.outbox', ...)` message, becomes
//! one event on `<prefix>.outbox.<aggregate_type>`, keyed by the aggregate id, whose value is
//! the payload and whose `id` and `type` headers say which event it is. Pure: compiled from
//! the configuration, resolved against each outbox table's columns, and turned into records.

use serde::Deserialize;
use serde_json::Value;

use crate::event::Record;
use crate::names::TableName;
use crate::pgoutput::{Datum, Relation};

/// The prefix of logical messages that are outbox events.
pub const MESSAGE_PREFIX: &str = "ficus.outbox";

const JSON: u32 = 114;
const JSONB: u32 = 3802;

/// `[[outbox]]`: an outbox table and the names of its columns.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxConfig {
    /// `schema.table`.
    pub table: String,
    #[serde(default = "default_id")]
    pub id: String,
    #[serde(default = "default_aggregate_type")]
    pub aggregate_type: String,
    #[serde(default = "default_aggregate_id")]
    pub aggregate_id: String,
    #[serde(default = "default_type", rename = "type")]
    pub event_type: String,
    #[serde(default = "default_payload")]
    pub payload: String,
}

fn default_id() -> String {
    "id".into()
}
fn default_aggregate_type() -> String {
    "aggregate_type".into()
}
fn default_aggregate_id() -> String {
    "aggregate_id".into()
}
fn default_type() -> String {
    "type".into()
}
fn default_payload() -> String {
    "payload".into()
}

/// An outbox table, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxTable {
    pub name: TableName,
    /// Column names: id, aggregate type, aggregate id, type, payload.
    columns: [String; 5],
}

/// Compiles every `[[outbox]]`, naming each problem with its key.
pub fn compile(configs: &[OutboxConfig]) -> Result<Vec<OutboxTable>, Vec<String>> {
    let mut tables: Vec<OutboxTable> = Vec::new();
    let mut errors = Vec::new();
    for (index, config) in configs.iter().enumerate() {
        match TableName::parse(&config.table) {
            Ok(name) if tables.iter().any(|t| t.name == name) => {
                errors.push(format!("outbox[{index}].table: {name} is listed twice"))
            }
            Ok(name) => tables.push(OutboxTable {
                name,
                columns: [
                    config.id.clone(),
                    config.aggregate_type.clone(),
                    config.aggregate_id.clone(),
                    config.event_type.clone(),
                    config.payload.clone(),
                ],
            }),
            Err(e) => errors.push(format!("outbox[{index}].table: {e}")),
        }
    }
    if errors.is_empty() {
        Ok(tables)
    } else {
        Err(errors)
    }
}

/// An outbox table's columns found in its relation: where each is, and whether the payload
/// is JSON already.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    table: TableName,
    positions: [usize; 5],
    payload_is_json: bool,
    /// Every column's name, for the dead-letter copy of a row that cannot be routed.
    names: Vec<String>,
}

impl OutboxTable {
    /// Finds the configured columns in `relation`; a missing one is named.
    pub fn resolve(&self, relation: &Relation) -> Result<Resolved, String> {
        let mut positions = [0; 5];
        for (slot, name) in positions.iter_mut().zip(&self.columns) {
            *slot = relation.columns.iter().position(|c| &c.name == name).ok_or_else(|| {
                let have: Vec<&str> = relation.columns.iter().map(|c| c.name.as_str()).collect();
                format!(
                    "outbox table {} has no column \"{name}\" (it has {}): name it in [[outbox]]",
                    self.name,
                    have.join(", ")
                )
            })?;
        }
        let payload = &relation.columns[positions[4]];
        Ok(Resolved {
            table: self.name.clone(),
            positions,
            payload_is_json: matches!(payload.type_oid, JSON | JSONB),
            names: relation.columns.iter().map(|c| c.name.clone()).collect(),
        })
    }
}

impl Resolved {
    pub fn table(&self) -> &TableName {
        &self.table
    }

    /// The event of an inserted outbox row, or, when it cannot be routed, its dead letter.
    pub fn route(&self, prefix: &str, row: &[Datum]) -> Record {
        self.record(prefix, row).unwrap_or_else(|error| {
            let original: serde_json::Map<String, Value> = self
                .names
                .iter()
                .zip(row)
                .map(|(name, datum)| {
                    let value = match datum {
                        Datum::Text(bytes) | Datum::Binary(bytes) => {
                            Value::String(String::from_utf8_lossy(bytes).into_owned())
                        }
                        _ => Value::Null,
                    };
                    (name.clone(), value)
                })
                .collect();
            invalid(prefix, Value::Object(original), &error)
        })
    }

    /// The event of an inserted outbox row.
    pub fn record(&self, prefix: &str, row: &[Datum]) -> Result<Record, String> {
        let text = |index: usize, what: &str| -> Result<Option<String>, String> {
            match row.get(self.positions[index]) {
                Some(Datum::Text(bytes) | Datum::Binary(bytes)) => {
                    Ok(Some(String::from_utf8_lossy(bytes).into_owned()))
                }
                Some(Datum::Null) | None => Ok(None),
                Some(Datum::UnchangedToast) => {
                    Err(format!("outbox row of {}: no value for {what}", self.table))
                }
            }
        };
        let required = |index: usize, what: &str| {
            text(index, what)?
                .ok_or_else(|| format!("outbox row of {}: {what} is NULL", self.table))
        };
        let aggregate_type = required(1, "aggregate_type")?;
        let payload = match text(4, "payload")? {
            None => Value::Null,
            Some(json) if self.payload_is_json => serde_json::from_str(&json)
                .map_err(|e| format!("outbox row of {}: payload: {e}", self.table))?,
            Some(text) => Value::String(text),
        };
        Ok(event(
            prefix,
            &aggregate_type,
            &required(2, "aggregate_id")?,
            text(0, "id")?,
            text(3, "type")?,
            &payload,
        ))
    }
}

/// The event of a `ficus.outbox` logical message, or, when it cannot be routed, its dead
/// letter.
pub fn route_message(prefix: &str, content: &[u8]) -> Record {
    message_record(prefix, content).unwrap_or_else(|error| {
        invalid(prefix, Value::String(String::from_utf8_lossy(content).into_owned()), &error)
    })
}

/// The dead-letter topic's suffix: `<prefix>.outbox.__invalid`.
pub const INVALID: &str = "__invalid";

/// What a row or message that cannot be routed becomes: the original on the dead-letter
/// topic, with the reason in an `error` header, so that nothing is lost and the stream goes
/// on (and the operator is told).
fn invalid(prefix: &str, original: Value, error: &str) -> Record {
    tracing::warn!(error, "an outbox event cannot be routed: sent to {prefix}.outbox.{INVALID}");
    Record {
        topic: topic(prefix, INVALID),
        key: None,
        value: Some(original.to_string().into_bytes()),
        headers: vec![("error", Value::String(error.to_string()).to_string().into_bytes())],
    }
}

/// The event of a `ficus.outbox` logical message, whose content is a JSON object:
/// `{"aggregate_type": .., "aggregate_id": .., "type": .., "id": .., "payload": ..}`.
pub fn message_record(prefix: &str, content: &[u8]) -> Result<Record, String> {
    let message: Value = serde_json::from_slice(content)
        .map_err(|e| format!("{MESSAGE_PREFIX} message is not JSON: {e}"))?;
    let field = |name: &str| match &message[name] {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        other => Some(other.to_string()),
    };
    let required = |name: &str| {
        field(name).ok_or_else(|| format!("{MESSAGE_PREFIX} message has no \"{name}\""))
    };
    Ok(event(
        prefix,
        &required("aggregate_type")?,
        &required("aggregate_id")?,
        field("id"),
        field("type"),
        &message["payload"],
    ))
}

fn event(
    prefix: &str,
    aggregate_type: &str,
    aggregate_id: &str,
    id: Option<String>,
    event_type: Option<String>,
    payload: &Value,
) -> Record {
    let json_string = |text: &str| Value::String(text.to_string()).to_string().into_bytes();
    let mut headers = Vec::new();
    if let Some(id) = id {
        headers.push(("id", json_string(&id)));
    }
    if let Some(event_type) = event_type {
        headers.push(("type", json_string(&event_type)));
    }
    Record {
        topic: topic(prefix, aggregate_type),
        key: Some(json_string(aggregate_id)),
        value: Some(payload.to_string().into_bytes()),
        headers,
    }
}

/// `<prefix>.outbox.<aggregate_type>`, with characters Kafka does not allow replaced by `_`.
pub fn topic(prefix: &str, aggregate_type: &str) -> String {
    format!("{prefix}.outbox.{aggregate_type}")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' })
        .collect()
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use serde_json::json;

    use super::*;
    use crate::pgoutput::Column;

    fn relation(payload_type: u32) -> Relation {
        let column = |name: &str, type_oid| Column {
            is_key: name == "id",
            name: name.into(),
            type_oid,
            type_modifier: -1,
        };
        Relation {
            id: 7,
            namespace: "public".into(),
            name: "outbox".into(),
            replica_identity: b'd',
            columns: vec![
                column("id", 2950),
                column("aggregate_type", 25),
                column("aggregate_id", 25),
                column("type", 25),
                column("payload", payload_type),
                column("created_at", 1184),
            ],
        }
    }

    fn text(s: &str) -> Datum {
        Datum::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn outbox() -> OutboxTable {
        let config: OutboxConfig =
            serde_json::from_value(json!({"table": "public.outbox"})).expect("config");
        compile(&[config]).expect("valid").remove(0)
    }

    #[test]
    fn a_row_becomes_an_event_routed_by_aggregate_type() {
        let resolved = outbox().resolve(&relation(JSONB)).expect("columns");
        let row = [
            text("9b2f"),
            text("Order"),
            text("o-1"),
            text("OrderPlaced"),
            text(r#"{"total": 12.5}"#),
            Datum::Null,
        ];
        let record = resolved.record("shop", &row).expect("event");
        assert_eq!(record.topic, "shop.outbox.Order");
        assert_eq!(record.key.as_deref(), Some(br#""o-1""#.as_slice()));
        let value: Value = serde_json::from_slice(&record.value.expect("value")).expect("json");
        assert_eq!(value, json!({"total": 12.5}));
        assert_eq!(
            record.headers,
            [("id", br#""9b2f""#.to_vec()), ("type", br#""OrderPlaced""#.to_vec())]
        );
    }

    #[test]
    fn a_text_payload_is_a_json_string_and_bad_rows_are_named() {
        let resolved = outbox().resolve(&relation(25)).expect("columns");
        let row = [text("1"), text("a b/c"), text("x"), Datum::Null, text("hello"), Datum::Null];
        let record = resolved.record("shop", &row).expect("event");
        assert_eq!(record.topic, "shop.outbox.a_b_c");
        assert_eq!(record.value.as_deref(), Some(br#""hello""#.as_slice()));
        assert_eq!(record.headers.len(), 1, "no type header for a NULL type");
        let row = [text("1"), Datum::Null, text("x"), Datum::Null, text("p"), Datum::Null];
        let error = resolved.record("shop", &row).expect_err("no aggregate type");
        assert!(error.contains("aggregate_type is NULL"), "{error}");
        // Routed to the dead-letter topic, whole, with the reason.
        let dead = resolved.route("shop", &row);
        assert_eq!(dead.topic, "shop.outbox.__invalid");
        let value: Value = serde_json::from_slice(&dead.value.expect("value")).expect("json");
        assert_eq!(value["aggregate_id"], "x");
        assert!(String::from_utf8_lossy(&dead.headers[0].1).contains("aggregate_type is NULL"));
    }

    #[test]
    fn a_missing_column_is_named() {
        let mut relation = relation(JSONB);
        relation.columns.remove(2);
        let error = outbox().resolve(&relation).expect_err("no aggregate_id");
        assert!(error.contains("no column \"aggregate_id\""), "{error}");
    }

    #[test]
    fn a_logical_message_is_an_event_too() {
        let content = br#"{"aggregate_type":"Customer","aggregate_id":42,"type":"Moved","payload":{"city":"Oslo"}}"#;
        let record = message_record("shop", content).expect("event");
        assert_eq!(record.topic, "shop.outbox.Customer");
        assert_eq!(record.key.as_deref(), Some(br#""42""#.as_slice()));
        assert_eq!(record.value.as_deref(), Some(br#"{"city":"Oslo"}"#.as_slice()));
        assert!(message_record("shop", b"nope").expect_err("not JSON").contains("not JSON"));
        let error = message_record("shop", br#"{"aggregate_id": 1}"#).expect_err("no type");
        assert!(error.contains("no \"aggregate_type\""), "{error}");
    }

    #[test]
    fn every_configuration_error_is_named() {
        let configs: Vec<OutboxConfig> = serde_json::from_value(json!([
            {"table": "public.outbox"}, {"table": "outbox"}, {"table": "a.b.c"}
        ]))
        .expect("configs");
        let errors = compile(&configs).expect_err("invalid");
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].starts_with("outbox[1].table") && errors[0].contains("twice"));
        assert!(errors[1].starts_with("outbox[2].table"));
    }
}
