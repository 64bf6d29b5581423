//! Debezium JSON values back into the text a PostgreSQL column takes in: the inverse of
//! `ficus cdc`'s encodings, chosen by the target column's type (days for `date`,
//! microseconds for `time` and `timestamp`, base64 for `bytea`, arrays element by element).
//! Pure.

use base64::Engine;
use ficus_cdc::time;
use ficus_cdc::value::{oid, UNAVAILABLE};
use serde_json::Value;

const JSON: u32 = 114;
const JSONB: u32 = 3802;

/// How a target column's values are given in events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Days since 1970-01-01.
    Date,
    /// Microseconds since midnight.
    Time,
    /// Microseconds since 1970-01-01.
    Timestamp,
    /// An ISO 8601 instant (signed years beyond 0001..9999).
    TimestampTz,
    /// Microseconds.
    Interval,
    /// Base64.
    Bytea,
    /// JSON text, or JSON itself.
    Json,
    /// An array of the element kind.
    Array(Box<Kind>),
    /// Its text, a number or a boolean, taken as it is.
    Plain,
}

impl Kind {
    /// The kind of a column whose base type (domains resolved) is `type_oid`, with the
    /// element type `element` when it is an array.
    pub fn of(type_oid: u32, element: Option<u32>) -> Kind {
        if let Some(element) = element {
            return Kind::Array(Box::new(Kind::of(element, None)));
        }
        match type_oid {
            oid::DATE => Kind::Date,
            oid::TIME => Kind::Time,
            oid::TIMESTAMP => Kind::Timestamp,
            oid::TIMESTAMPTZ => Kind::TimestampTz,
            oid::INTERVAL => Kind::Interval,
            oid::BYTEA => Kind::Bytea,
            JSON | JSONB => Kind::Json,
            _ => Kind::Plain,
        }
    }
}

/// What an event's value means for a column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The column's new value, as text (`None`: NULL).
    Value(Option<String>),
    /// Debezium's placeholder for a TOASTed value that did not change: keep the stored one.
    Unchanged,
}

/// The text a column of `kind` takes in for `value`; an error says why it cannot be.
pub fn input(kind: &Kind, value: &Value) -> Result<Input, String> {
    if value.as_str() == Some(UNAVAILABLE) {
        return Ok(Input::Unchanged);
    }
    text(kind, value).map(Input::Value)
}

fn text(kind: &Kind, value: &Value) -> Result<Option<String>, String> {
    let number = |value: &Value| {
        value
            .as_i64()
            .ok_or_else(|| format!("expected a whole number for a {kind:?} column, got {value}"))
    };
    Ok(Some(match (kind, value) {
        (_, Value::Null) => return Ok(None),
        // Strings are already PostgreSQL's text (another time precision, `infinity`).
        (Kind::Date, Value::Number(_)) => time::date_text(number(value)?),
        (Kind::Time, Value::Number(_)) => time::time_text(number(value)?),
        (Kind::Timestamp, Value::Number(_)) => time::timestamp_text(number(value)?.into()),
        (Kind::TimestampTz, Value::String(iso)) => time::timestamptz_text(iso),
        // Whole days and the rest: what PostgreSQL keeps of a days-and-time interval. Months
        // and years arrive as Debezium's 30.4375 and 365.25 days, not as calendar units.
        (Kind::Interval, Value::Number(_)) => {
            let micros = number(value)?;
            const DAY: i64 = 86_400_000_000;
            // The clock as text: older servers read `N microseconds` as a 32-bit number.
            let (days, rest) = (micros / DAY, micros % DAY);
            let sign = if rest < 0 { "-" } else { "" };
            format!("{days} days {sign}{}", time::time_text(rest.abs()))
        }
        (Kind::Bytea, Value::String(base64)) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(base64)
                .map_err(|e| format!("a bytea value is not base64: {e}"))?;
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            format!("\\x{hex}")
        }
        (Kind::Array(element), Value::Array(items)) => array(element, items)?,
        (_, Value::String(text)) => text.clone(),
        (_, Value::Bool(b)) => b.to_string(),
        (_, Value::Number(n)) => n.to_string(),
        // JSON columns, and anything else given as JSON.
        (_, other) => other.to_string(),
    }))
}

/// A PostgreSQL array literal (`{"1","2",NULL}`, nested for more dimensions).
fn array(element: &Kind, items: &[Value]) -> Result<String, String> {
    let mut out = String::from("{");
    for (n, item) in items.iter().enumerate() {
        if n > 0 {
            out.push(',');
        }
        match (item, element) {
            (Value::Array(inner), _) if *element != Kind::Json => {
                out.push_str(&array(element, inner)?)
            }
            _ => match text(element, item)? {
                None => out.push_str("NULL"),
                Some(text) => {
                    out.push('"');
                    out.push_str(&text.replace('\\', "\\\\").replace('"', "\\\""));
                    out.push('"');
                }
            },
        }
    }
    out.push('}');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn value(kind: &Kind, json: Value) -> Option<String> {
        match input(kind, &json).expect("valid") {
            Input::Value(text) => text,
            Input::Unchanged => panic!("unchanged"),
        }
    }

    #[test]
    fn encodings_read_back_as_column_text() {
        assert_eq!(value(&Kind::Date, json!(18_993)).as_deref(), Some("2022-01-01"));
        assert_eq!(value(&Kind::Date, json!(-735_160)).as_deref(), Some("0044-03-15 BC"));
        assert_eq!(value(&Kind::Time, json!(30_605_000_000_i64)).as_deref(), Some("08:30:05"));
        assert_eq!(
            value(&Kind::Timestamp, json!(1_640_995_200_500_000_i64)).as_deref(),
            Some("2022-01-01 00:00:00.500000")
        );
        assert_eq!(value(&Kind::Interval, json!(90_000_000)).as_deref(), Some("0 days 00:01:30"));
        assert_eq!(
            value(&Kind::Interval, json!(-90_000_000_000_i64)).as_deref(),
            Some("-1 days -01:00:00")
        );
        assert_eq!(
            value(&Kind::TimestampTz, json!("-0043-03-15T00:00:00Z")).as_deref(),
            Some("0044-03-15 00:00:00+00 BC")
        );
        assert_eq!(value(&Kind::Bytea, json!("AP8=")).as_deref(), Some("\\x00ff"));
        assert_eq!(value(&Kind::Json, json!({"a": [1]})).as_deref(), Some(r#"{"a":[1]}"#));
        assert_eq!(value(&Kind::Json, json!("{\"a\":1}")).as_deref(), Some("{\"a\":1}"));
        assert_eq!(value(&Kind::Plain, json!("12.50")).as_deref(), Some("12.50"));
        assert_eq!(value(&Kind::Plain, json!(true)).as_deref(), Some("true"));
        assert_eq!(value(&Kind::Plain, json!(null)), None);
        assert_eq!(value(&Kind::Timestamp, json!("infinity")).as_deref(), Some("infinity"));
        assert_eq!(input(&Kind::Plain, &json!(UNAVAILABLE)), Ok(Input::Unchanged));
    }

    #[test]
    fn arrays_are_literals_of_their_elements() {
        let dates = Kind::Array(Box::new(Kind::Date));
        assert_eq!(value(&dates, json!([0, null])).as_deref(), Some(r#"{"1970-01-01",NULL}"#));
        let texts = Kind::Array(Box::new(Kind::Plain));
        assert_eq!(
            value(&texts, json!([["a\"b", "c\\d"], ["e", "f"]])).as_deref(),
            Some(r#"{{"a\"b","c\\d"},{"e","f"}}"#)
        );
        let jsons = Kind::Array(Box::new(Kind::Json));
        assert_eq!(value(&jsons, json!([[1, 2]])).as_deref(), Some(r#"{"[1,2]"}"#));
    }

    #[test]
    fn a_value_that_does_not_fit_its_column_is_named() {
        let error = input(&Kind::Date, &json!(1.5)).expect_err("not days");
        assert!(error.contains("whole number for a Date column"), "{error}");
        assert!(input(&Kind::Bytea, &json!("%%")).expect_err("bad").contains("not base64"));
    }
}
