//! Debezium change events (JSON, schemas disabled, as `ficus cdc` and Debezium write them)
//! as the row changes they stand for. Pure: bytes in, a [`Change`] or what is wrong out.

use serde_json::{Map, Value};

/// What an event does to the target table.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// `c`, `r` and `u`: the row as it is now (columns by source name).
    Upsert(Map<String, Value>),
    /// `d` and tombstones: the row with this key (columns by source name) is gone.
    Delete(Map<String, Value>),
    /// `t`: every row is gone.
    Truncate,
}

/// The change an event (Kafka key and value) stands for; `Ok(None)` for a tombstone
/// without a key (nothing to delete).
pub fn parse(key: Option<&[u8]>, value: Option<&[u8]>) -> Result<Option<Change>, String> {
    let key = match key {
        Some(bytes) => match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(key)) => Some(key),
            Ok(Value::Null) => None,
            Ok(other) => return Err(format!("the key is not a JSON object: {other}")),
            Err(e) => return Err(format!("the key is not JSON: {e}")),
        },
        None => None,
    };
    let Some(value) = value else {
        // A tombstone follows a delete; applying it again is harmless.
        return Ok(key.map(Change::Delete));
    };
    let event: Value =
        serde_json::from_slice(value).map_err(|e| format!("the value is not JSON: {e}"))?;
    // Debezium's JSON converter with schemas enabled wraps the event in "payload".
    let event = event.get("payload").filter(|p| p.is_object()).unwrap_or(&event);
    let op = event.get("op").and_then(Value::as_str).ok_or("the value has no \"op\"")?;
    let row = |field: &str| match event.get(field) {
        Some(Value::Object(row)) => Ok(row.clone()),
        _ => Err(format!("a \"{op}\" event without its \"{field}\" row")),
    };
    Ok(Some(match op {
        "c" | "r" | "u" => Change::Upsert(row("after")?),
        "d" => Change::Delete(match key {
            Some(key) => key,
            None => row("before")?,
        }),
        "t" => Change::Truncate,
        other => return Err(format!("unknown op {other:?}")),
    }))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn bytes(value: Value) -> Vec<u8> {
        value.to_string().into_bytes()
    }

    #[test]
    fn each_op_is_its_change() {
        let key = bytes(json!({"id": 1}));
        let event = |op: &str| {
            bytes(json!({"before": {"id": 1, "v": 0}, "after": {"id": 1, "v": 2}, "op": op}))
        };
        let after = json!({"id": 1, "v": 2}).as_object().cloned().expect("object");
        for op in ["c", "r", "u"] {
            assert_eq!(
                parse(Some(&key), Some(&event(op))),
                Ok(Some(Change::Upsert(after.clone())))
            );
        }
        let id = json!({"id": 1}).as_object().cloned().expect("object");
        assert_eq!(parse(Some(&key), Some(&event("d"))), Ok(Some(Change::Delete(id.clone()))));
        assert_eq!(parse(Some(&key), None), Ok(Some(Change::Delete(id))), "a tombstone");
        assert_eq!(parse(None, None), Ok(None));
        assert_eq!(parse(None, Some(&bytes(json!({"op": "t"})))), Ok(Some(Change::Truncate)));
        // Schemas enabled: the event is the payload.
        let wrapped =
            bytes(json!({"schema": {}, "payload": {"after": {"id": 1, "v": 2}, "op": "c"}}));
        assert_eq!(parse(Some(&key), Some(&wrapped)), Ok(Some(Change::Upsert(after))));
    }

    #[test]
    fn numbers_keep_every_digit() {
        // The float8 nearest 632 / 7 and a bigint past 2^53, as ficus cdc writes them.
        let value =
            br#"{"op": "c", "after": {"ratio": 90.28571428571429, "big": 9007199254740993}}"#;
        let Ok(Some(Change::Upsert(after))) = parse(None, Some(value)) else { panic!("upsert") };
        assert_eq!(after["ratio"].to_string(), "90.28571428571429");
        assert_eq!(after["big"].to_string(), "9007199254740993");
    }

    #[test]
    fn what_is_wrong_with_an_event_is_said() {
        let key = bytes(json!({"id": 1}));
        for (value, problem) in [
            (b"not json".to_vec(), "the value is not JSON"),
            (bytes(json!({"after": {}})), "no \"op\""),
            (bytes(json!({"op": "x"})), "unknown op \"x\""),
            (bytes(json!({"op": "c", "after": null})), "without its \"after\" row"),
        ] {
            let error = parse(Some(&key), Some(&value)).expect_err("bad");
            assert!(error.contains(problem), "{error}");
        }
        assert!(parse(Some(b"[1]"), None).expect_err("bad key").contains("not a JSON object"));
    }
}
