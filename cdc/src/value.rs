//! PostgreSQL values, in their text output format, as Debezium JSON (JSON converter with
//! schemas disabled, `decimal.handling.mode=string`, default time precision).
//!
//! Both sources of rows produce text: pgoutput tuples and `COPY ... TO STDOUT`. The session
//! settings this relies on (`DateStyle=ISO`, `TimeZone=UTC`, `IntervalStyle=iso_8601`,
//! `extra_float_digits=3`, `bytea_output=hex`) are set on every ficus connection.

use base64::Engine;
use chrono::{NaiveDate, NaiveDateTime, NaiveTime, Timelike};
use serde_json::{json, Value};

/// What Debezium puts in place of a TOASTed value that PostgreSQL did not send.
pub const UNAVAILABLE: &str = "__debezium_unavailable_value";

/// Built-in type OIDs that need more than "send it as a string".
pub mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const OID: u32 = 26;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const DATE: u32 = 1082;
    pub const TIME: u32 = 1083;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const INTERVAL: u32 = 1186;
    pub const NUMERIC: u32 = 1700;
    pub const MONEY: u32 = 790;
}

/// The element type of a built-in array type, if `type_oid` is one.
pub fn array_element(type_oid: u32) -> Option<u32> {
    Some(match type_oid {
        1000 => 16,   // bool[]
        1001 => 17,   // bytea[]
        1005 => 21,   // int2[]
        1007 => 23,   // int4[]
        1016 => 20,   // int8[]
        1021 => 700,  // float4[]
        1022 => 701,  // float8[]
        1009 => 25,   // text[]
        1015 => 1043, // varchar[]
        1014 => 1042, // bpchar[]
        1231 => 1700, // numeric[]
        2951 => 2950, // uuid[]
        1182 => 1082, // date[]
        1183 => 1083, // time[]
        1115 => 1114, // timestamp[]
        1185 => 1184, // timestamptz[]
        1187 => 1186, // interval[]
        199 => 114,   // json[]
        3807 => 3802, // jsonb[]
        1028 => 26,   // oid[]
        _ => return None,
    })
}

/// Converts one non-null value from its text form.
///
/// Unknown types (enums, domains, geometric types, ...) become their text, as Debezium does
/// for types it passes through as strings. A value that does not parse as its type also falls
/// back to its text rather than being lost.
pub fn to_json(type_oid: u32, text: &str) -> Value {
    if let Some(element) = array_element(type_oid) {
        return parse_array(text, element).unwrap_or_else(|| Value::String(text.to_string()));
    }
    scalar(type_oid, text).unwrap_or_else(|| Value::String(text.to_string()))
}

fn scalar(type_oid: u32, text: &str) -> Option<Value> {
    Some(match type_oid {
        oid::BOOL => Value::Bool(text == "t" || text == "true"),
        oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => json!(text.parse::<i64>().ok()?),
        oid::FLOAT4 | oid::FLOAT8 => match text.parse::<f64>().ok()? {
            // JSON has no NaN or infinities: keep their names.
            f if f.is_finite() => json!(f),
            _ => Value::String(text.to_string()),
        },
        oid::NUMERIC => Value::String(text.to_string()),
        // `$1,234.50` as `1234.50`: the amount without currency symbol or grouping.
        oid::MONEY => Value::String(
            text.chars().filter(|c| c.is_ascii_digit() || *c == '.' || *c == '-').collect(),
        ),
        oid::BYTEA => {
            let bytes = decode_hex(text.strip_prefix("\\x")?)?;
            Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
        }
        oid::DATE => {
            let date = NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()?;
            json!(date.signed_duration_since(NaiveDate::from_ymd_opt(1970, 1, 1)?).num_days())
        }
        oid::TIME => {
            let time = NaiveTime::parse_from_str(text, "%H:%M:%S%.f").ok()?;
            json!(
                i64::from(time.num_seconds_from_midnight()) * 1_000_000
                    + i64::from(time.nanosecond() / 1000)
            )
        }
        oid::TIMESTAMP => {
            let ts = NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f").ok()?;
            json!(ts.and_utc().timestamp_micros())
        }
        oid::TIMESTAMPTZ => Value::String(iso_timestamptz(text)?),
        oid::INTERVAL => json!(interval_micros(text)?),
        _ => return None,
    })
}

/// `2024-01-02 03:04:05.5+00` (TimeZone=UTC) as `2024-01-02T03:04:05.5Z`.
fn iso_timestamptz(text: &str) -> Option<String> {
    let local = text.strip_suffix("+00")?;
    let ts = NaiveDateTime::parse_from_str(local, "%Y-%m-%d %H:%M:%S%.f").ok()?;
    Some(format!("{}Z", ts.format("%Y-%m-%dT%H:%M:%S%.f")))
}

/// An ISO 8601 interval (IntervalStyle=iso_8601, `P1Y2M3DT4H5M6.5S`) in microseconds, with
/// Debezium's month of 30.4375 days and year of 365.25 days.
fn interval_micros(text: &str) -> Option<i64> {
    const DAY: f64 = 86_400_000_000.0;
    let body = text.strip_prefix('P')?;
    let (date, time) = body.split_once('T').unwrap_or((body, ""));
    let mut total = 0.0;
    for (part, units) in [
        (date, [("Y", 365.25 * DAY), ("M", 30.4375 * DAY), ("W", 7.0 * DAY), ("D", DAY)]),
        (time, [("H", 3_600_000_000.0), ("M", 60_000_000.0), ("S", 1_000_000.0), ("", 0.0)]),
    ] {
        let mut rest = part;
        while !rest.is_empty() {
            let end = rest.find(|c: char| c.is_ascii_alphabetic())?;
            let (number, unit) = (&rest[..end], &rest[end..=end]);
            let factor = units.iter().find(|(u, _)| *u == unit)?.1;
            total += number.parse::<f64>().ok()? * factor;
            rest = &rest[end + 1..];
        }
    }
    Some(total.round() as i64)
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if hex.len() % 2 != 0 {
        return None;
    }
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()).collect()
}

/// Parses an array literal (`{1,2,NULL}`, `{"a b","c\"d"}`, `{{1,2},{3,4}}`) into nested
/// JSON arrays, converting each element by `element`.
pub fn parse_array(text: &str, element: u32) -> Option<Value> {
    // A lower bound decoration (`[0:1]={1,2}`) precedes the braces for unusual arrays.
    let start = text.find('{')?;
    let mut chars = text[start..].chars().peekable();
    let value = array_level(&mut chars, element)?;
    chars.next().is_none().then_some(value)
}

fn array_level(
    chars: &mut std::iter::Peekable<std::str::Chars<'_>>,
    element: u32,
) -> Option<Value> {
    if chars.next()? != '{' {
        return None;
    }
    let mut items = Vec::new();
    if chars.peek() == Some(&'}') {
        chars.next();
        return Some(Value::Array(items));
    }
    loop {
        match chars.peek()? {
            '{' => items.push(array_level(chars, element)?),
            '"' => {
                chars.next();
                let mut item = String::new();
                loop {
                    match chars.next()? {
                        '\\' => item.push(chars.next()?),
                        '"' => break,
                        c => item.push(c),
                    }
                }
                items.push(to_json(element, &item));
            }
            _ => {
                let mut item = String::new();
                while let Some(&c) = chars.peek() {
                    if c == ',' || c == '}' {
                        break;
                    }
                    item.push(c);
                    chars.next();
                }
                let item = item.trim();
                items.push(if item.eq_ignore_ascii_case("NULL") {
                    Value::Null
                } else {
                    to_json(element, item)
                });
            }
        }
        match chars.next()? {
            ',' => continue,
            '}' => return Some(Value::Array(items)),
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_booleans_and_decimals() {
        assert_eq!(to_json(oid::INT4, "42"), json!(42));
        assert_eq!(to_json(oid::INT8, "-9223372036854775808"), json!(i64::MIN));
        assert_eq!(to_json(oid::FLOAT8, "1.5"), json!(1.5));
        assert_eq!(to_json(oid::FLOAT8, "NaN"), json!("NaN"));
        assert_eq!(to_json(oid::FLOAT4, "-Infinity"), json!("-Infinity"));
        assert_eq!(
            to_json(oid::NUMERIC, "12345678901234567890.123"),
            json!("12345678901234567890.123")
        );
        assert_eq!(to_json(oid::MONEY, "-$1,234.50"), json!("-1234.50"));
        assert_eq!(to_json(oid::BOOL, "t"), json!(true));
        assert_eq!(to_json(oid::BOOL, "f"), json!(false));
    }

    #[test]
    fn text_like_types_are_strings() {
        assert_eq!(to_json(25, "héllo"), json!("héllo"));
        assert_eq!(
            to_json(2950, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
        );
        assert_eq!(to_json(3802, r#"{"a": 1}"#), json!(r#"{"a": 1}"#));
        assert_eq!(to_json(99_999, "happy"), json!("happy"), "unknown types such as enums");
    }

    #[test]
    fn bytea_is_base64() {
        assert_eq!(to_json(oid::BYTEA, "\\x0001ff"), json!("AAH/"));
        assert_eq!(to_json(oid::BYTEA, "\\x"), json!(""));
    }

    #[test]
    fn dates_and_times() {
        assert_eq!(to_json(oid::DATE, "1970-01-02"), json!(1));
        assert_eq!(to_json(oid::DATE, "1969-12-31"), json!(-1));
        assert_eq!(to_json(oid::TIMESTAMP, "1970-01-01 00:00:01.5"), json!(1_500_000));
        assert_eq!(
            to_json(oid::TIMESTAMP, "2024-02-29 12:00:00"),
            json!(1_709_208_000_000_000_i64)
        );
        assert_eq!(
            to_json(oid::TIMESTAMPTZ, "2024-02-29 12:00:00.123456+00"),
            json!("2024-02-29T12:00:00.123456Z")
        );
        assert_eq!(
            to_json(oid::TIMESTAMPTZ, "2024-02-29 12:00:00+00"),
            json!("2024-02-29T12:00:00Z")
        );
        assert_eq!(to_json(oid::TIME, "01:00:00.25"), json!(3_600_250_000_i64));
        assert_eq!(to_json(oid::INTERVAL, "P1DT2H"), json!(93_600_000_000_i64));
        assert_eq!(to_json(oid::INTERVAL, "PT-1.5S"), json!(-1_500_000));
        assert_eq!(
            to_json(oid::DATE, "infinity"),
            json!("infinity"),
            "unparseable values keep their text"
        );
    }

    #[test]
    fn arrays_become_json_arrays() {
        assert_eq!(to_json(1007, "{1,2,NULL}"), json!([1, 2, null]));
        assert_eq!(
            to_json(1009, r#"{a,"b c","d\"e",NULL,"NULL"}"#),
            json!(["a", "b c", "d\"e", null, "NULL"])
        );
        assert_eq!(to_json(1007, "{{1,2},{3,4}}"), json!([[1, 2], [3, 4]]));
        assert_eq!(to_json(1007, "{}"), json!([]));
        assert_eq!(to_json(1000, "{t,f}"), json!([true, false]));
        assert_eq!(to_json(1007, "[0:1]={1,2}"), json!([1, 2]));
        assert_eq!(to_json(1007, "{1,2"), json!("{1,2"), "a malformed literal keeps its text");
    }
}
