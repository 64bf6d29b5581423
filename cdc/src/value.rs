//! PostgreSQL values, in their text output format, as Debezium JSON (JSON converter with
//! schemas disabled, `decimal.handling.mode=string`, default time precision).
//!
//! Both sources of rows produce text: pgoutput tuples and `COPY ... TO STDOUT`. The session
//! settings this relies on (`DateStyle=ISO`, `TimeZone=UTC`, `IntervalStyle=iso_8601`,
//! `extra_float_digits=3`, `bytea_output=hex`) are set on every ficus connection.

use base64::Engine;
use serde_json::{json, Value};

use crate::time;

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

/// How a column's values are encoded, resolved once per column from the catalog: domains
/// become their base type, arrays know their element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueType {
    /// A value of this type OID; types without a mapping below keep their text.
    Scalar(u32),
    /// `money`, read in the C locale (`-$1,234.50`, always two fraction digits of the stored
    /// integer) and scaled by the fraction digits of the database's own `lc_monetary`.
    Money { scale: u32 },
    /// An array of the element type, of any number of dimensions, whose text form separates
    /// elements by the element type's delimiter (`,`; `;` for `box`).
    Array { element: Box<ValueType>, delimiter: char },
    /// `time` or `timestamp` in milliseconds rather than microseconds, as Debezium's
    /// `time.precision.mode = adaptive` gives those of precision 0 to 3
    /// (`io.debezium.time.Time`, `io.debezium.time.Timestamp`).
    Millis(u32),
}

/// How `time` and `timestamp` values are given (`source.time_precision`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimePrecision {
    /// Always microseconds.
    #[default]
    Micros,
    /// Milliseconds for a declared precision of 0 to 3, else microseconds: Debezium's
    /// default.
    Adaptive,
}

impl TimePrecision {
    /// The encoding of a column of type `ty` declared with `type_modifier` (its precision for
    /// `time` and `timestamp`, -1 when not declared, which means 6).
    pub fn apply(self, ty: ValueType, type_modifier: i32) -> ValueType {
        match (self, ty) {
            (TimePrecision::Micros, ty) => ty,
            (_, ValueType::Scalar(oid @ (oid::TIME | oid::TIMESTAMP)))
                if (0..=3).contains(&type_modifier) =>
            {
                ValueType::Millis(oid)
            }
            (_, ValueType::Array { element, delimiter }) => ValueType::Array {
                element: Box::new(self.apply(*element, type_modifier)),
                delimiter,
            },
            (_, ty) => ty,
        }
    }
}

impl ValueType {
    /// An array of a scalar type with the usual `,` delimiter.
    pub fn array_of(element: u32) -> ValueType {
        ValueType::Scalar(element).in_array(',')
    }

    /// An array of this type.
    pub fn in_array(self, delimiter: char) -> ValueType {
        ValueType::Array { element: Box::new(self), delimiter }
    }
}

/// Converts one non-null value from its text form.
///
/// Types without a mapping (enums, geometric types, ranges, ...) become their text, as
/// Debezium does for types it passes through as strings. A value that does not parse as its
/// type also keeps its text rather than being lost.
pub fn to_json(ty: &ValueType, text: &str) -> Value {
    let converted = match ty {
        ValueType::Scalar(type_oid) => scalar(*type_oid, text),
        ValueType::Money { scale } => money(text, *scale).map(Value::String),
        ValueType::Array { element, delimiter } => parse_array(text, element, *delimiter),
        ValueType::Millis(type_oid) => millis(*type_oid, text),
    };
    converted.unwrap_or_else(|| Value::String(text.to_string()))
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
        oid::MONEY => Value::String(money(text, 2)?),
        oid::BYTEA => {
            let bytes = decode_hex(text.strip_prefix("\\x")?)?;
            Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
        }
        oid::DATE => json!(time::date_days(text)?),
        oid::TIME => json!(time::time_micros(text)?),
        oid::TIMESTAMP => {
            let micros = time::timestamp_micros(text)?;
            // Past i64 only in PostgreSQL's last centuries (294247 AD and later).
            match i64::try_from(micros) {
                Ok(micros) => json!(micros),
                Err(_) => json!(u64::try_from(micros).ok()?),
            }
        }
        oid::TIMESTAMPTZ => Value::String(time::timestamptz_iso(text)?),
        oid::INTERVAL => json!(interval_micros(text)?),
        _ => return None,
    })
}

fn millis(type_oid: u32, text: &str) -> Option<Value> {
    let micros = match type_oid {
        oid::TIME => i128::from(time::time_micros(text)?),
        _ => time::timestamp_micros(text)?,
    };
    // Floored, as Java's epoch milliseconds are for times before 1970.
    Some(json!(i64::try_from(micros.div_euclid(1000)).ok()?))
}

/// `money` as the C locale prints it (`-$1,234.50`) as an exact decimal string with `scale`
/// fraction digits: the C locale always prints the stored integer with two, whatever the
/// database's `lc_monetary` means by it.
fn money(text: &str, scale: u32) -> Option<String> {
    let negative = text.starts_with('-');
    let units: String = text.chars().filter(char::is_ascii_digit).collect();
    let valid = text.chars().all(|c| c.is_ascii_digit() || matches!(c, '-' | '$' | ',' | '.'));
    if units.is_empty() || !valid {
        return None;
    }
    let units = units.trim_start_matches('0');
    let scale = scale as usize;
    let padded = format!("{units:0>width$}", width = scale + 1);
    let (whole, fraction) = padded.split_at(padded.len() - scale);
    let sign = if negative && !units.is_empty() { "-" } else { "" };
    Some(if scale == 0 { format!("{sign}{whole}") } else { format!("{sign}{whole}.{fraction}") })
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
pub fn parse_array(text: &str, element: &ValueType, delimiter: char) -> Option<Value> {
    // A lower bound decoration (`[0:1]={1,2}`) precedes the braces for unusual arrays.
    let start = text.find('{')?;
    let mut chars = text[start..].chars().peekable();
    let value = array_level(&mut chars, element, delimiter)?;
    chars.next().is_none().then_some(value)
}

fn array_level(
    chars: &mut std::iter::Peekable<std::str::Chars<'_>>,
    element: &ValueType,
    delimiter: char,
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
            '{' => items.push(array_level(chars, element, delimiter)?),
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
                    if c == delimiter || c == '}' {
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
            '}' => return Some(Value::Array(items)),
            c if c == delimiter => continue,
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adaptive_precision_gives_milliseconds_up_to_precision_3() {
        let adaptive = TimePrecision::Adaptive;
        let time3 = adaptive.apply(ValueType::Scalar(oid::TIME), 3);
        assert_eq!(time3, ValueType::Millis(oid::TIME));
        assert_eq!(to_json(&time3, "01:02:03.456"), json!(3_723_456));
        let ts0 = adaptive.apply(ValueType::Scalar(oid::TIMESTAMP), 0);
        assert_eq!(to_json(&ts0, "2022-01-01 10:00:00"), json!(1_641_031_200_000_i64));
        // Before 1970 the milliseconds are floored, as Java's are.
        assert_eq!(to_json(&ts0, "1969-12-31 23:59:59.9995"), json!(-1));
        // Undeclared precision is 6; other types and the default mode keep microseconds.
        assert_eq!(adaptive.apply(ValueType::Scalar(oid::TIME), -1), ValueType::Scalar(oid::TIME));
        assert_eq!(adaptive.apply(ValueType::Scalar(oid::TIME), 4), ValueType::Scalar(oid::TIME));
        assert_eq!(adaptive.apply(ValueType::Scalar(oid::DATE), 3), ValueType::Scalar(oid::DATE));
        let micros = TimePrecision::Micros.apply(ValueType::Scalar(oid::TIME), 3);
        assert_eq!(micros, ValueType::Scalar(oid::TIME));
        let array = adaptive.apply(ValueType::array_of(oid::TIMESTAMP), 2);
        assert_eq!(to_json(&array, "{\"1970-01-01 00:00:01\"}"), json!([1000]));
    }

    fn scalar(type_oid: u32, text: &str) -> Value {
        to_json(&ValueType::Scalar(type_oid), text)
    }

    fn array(element: u32, text: &str) -> Value {
        to_json(&ValueType::array_of(element), text)
    }

    #[test]
    fn numbers_booleans_and_decimals() {
        assert_eq!(scalar(oid::INT4, "42"), json!(42));
        assert_eq!(scalar(oid::INT8, "-9223372036854775808"), json!(i64::MIN));
        assert_eq!(scalar(oid::FLOAT8, "1.5"), json!(1.5));
        assert_eq!(scalar(oid::FLOAT8, "NaN"), json!("NaN"));
        assert_eq!(scalar(oid::FLOAT4, "-Infinity"), json!("-Infinity"));
        assert_eq!(
            scalar(oid::NUMERIC, "12345678901234567890.123"),
            json!("12345678901234567890.123")
        );
        assert_eq!(scalar(oid::BOOL, "t"), json!(true));
        assert_eq!(scalar(oid::BOOL, "f"), json!(false));
    }

    #[test]
    fn money_is_read_in_the_c_locale_and_scaled_by_the_databases() {
        let money = |scale, text| to_json(&ValueType::Money { scale }, text);
        assert_eq!(money(2, "-$1,234.50"), json!("-1234.50"));
        assert_eq!(money(2, "$0.05"), json!("0.05"));
        assert_eq!(money(2, "$0.00"), json!("0.00"));
        assert_eq!(money(2, "-$92,233,720,368,547,758.08"), json!("-92233720368547758.08"));
        // ja_JP has no fraction digits: the stored 123450 is 123450 yen, printed as $1,234.50.
        assert_eq!(money(0, "$1,234.50"), json!("123450"));
        assert_eq!(money(3, "-$1,234.50"), json!("-123.450"));
        // Anything but the C locale's form is not guessed at.
        assert_eq!(money(2, "1.234,50 €"), json!("1.234,50 €"));
        assert_eq!(money(2, "($12.00)"), json!("($12.00)"));
    }

    #[test]
    fn text_like_types_are_strings() {
        assert_eq!(scalar(25, "héllo"), json!("héllo"));
        assert_eq!(
            scalar(2950, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
        );
        assert_eq!(scalar(3802, r#"{"a": 1}"#), json!(r#"{"a": 1}"#));
        assert_eq!(scalar(99_999, "happy"), json!("happy"), "unknown types such as enums");
    }

    #[test]
    fn bytea_is_base64() {
        assert_eq!(scalar(oid::BYTEA, "\\x0001ff"), json!("AAH/"));
        assert_eq!(scalar(oid::BYTEA, "\\x"), json!(""));
    }

    #[test]
    fn dates_and_times_are_numbers_over_their_whole_range() {
        assert_eq!(scalar(oid::DATE, "1970-01-02"), json!(1));
        assert_eq!(scalar(oid::DATE, "0044-03-15 BC"), json!(-735_160));
        assert_eq!(scalar(oid::DATE, "infinity"), json!(time::DATE_INFINITY));
        assert_eq!(scalar(oid::TIMESTAMP, "1970-01-01 00:00:01.5"), json!(1_500_000));
        assert_eq!(scalar(oid::TIMESTAMP, "-infinity"), json!(time::TIMESTAMP_NEG_INFINITY));
        assert_eq!(
            scalar(oid::TIMESTAMP, "294276-12-31 23:59:59.999999"),
            json!(9_224_318_015_999_999_999_u64),
            "past i64"
        );
        assert_eq!(
            scalar(oid::TIMESTAMPTZ, "2024-02-29 12:00:00.123456+00"),
            json!("2024-02-29T12:00:00.123456Z")
        );
        assert_eq!(scalar(oid::TIME, "24:00:00"), json!(86_400_000_000_i64));
        assert_eq!(scalar(oid::INTERVAL, "P1DT2H"), json!(93_600_000_000_i64));
        assert_eq!(scalar(oid::INTERVAL, "PT-1.5S"), json!(-1_500_000));
        assert_eq!(scalar(oid::DATE, "someday"), json!("someday"), "unparseable keeps its text");
    }

    #[test]
    fn arrays_become_json_arrays() {
        assert_eq!(array(23, "{1,2,NULL}"), json!([1, 2, null]));
        assert_eq!(
            array(25, r#"{a,"b c","d\"e",NULL,"NULL"}"#),
            json!(["a", "b c", "d\"e", null, "NULL"])
        );
        assert_eq!(array(23, "{{1,2},{3,4}}"), json!([[1, 2], [3, 4]]));
        assert_eq!(array(23, "{}"), json!([]));
        assert_eq!(array(16, "{t,f}"), json!([true, false]));
        assert_eq!(array(23, "[0:1]={1,2}"), json!([1, 2]));
        assert_eq!(array(23, "{1,2"), json!("{1,2"), "a malformed literal keeps its text");
        assert_eq!(array(869, "{10.0.0.1,::1/128}"), json!(["10.0.0.1", "::1/128"]));
        assert_eq!(array(oid::DATE, r#"{"0044-03-15 BC",1970-01-02}"#), json!([-735_160, 1]));
        let boxes = ValueType::Scalar(603).in_array(';');
        assert_eq!(
            to_json(&boxes, "{(1,1),(0,0);(2,2),(1,1)}"),
            json!(["(1,1),(0,0)", "(2,2),(1,1)"])
        );
        let nested = ValueType::array_of(23).in_array(',');
        assert_eq!(to_json(&nested, r#"{"{1,2}","{}"}"#), json!([[1, 2], []]), "domain arrays");
    }
}
