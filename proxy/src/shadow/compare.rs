//! Compares the legacy (`from`) and the new (`to`) answer to one request: status, headers and
//! body, as a route's shadow policy says. Pure: no I/O, no clock.

use std::collections::BTreeSet;
use std::io::Read;

use bytes::Bytes;
use ficus_routes::shadow::{pointer, FieldPattern, Shadow};
use http::HeaderMap;
use serde_json::Value;

/// One backend's answer, its body as received (possibly content-encoded).
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A place where the two answers differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// `status`, `header:NAME`, `body`, or a JSON pointer into the body (`/items/0/price`).
    pub field: String,
    /// `field` with array indices folded to `*`: what is counted and learnt as noise.
    pub pattern: String,
    /// The legacy side's value, compact JSON or text; `(absent)` when it has none.
    pub from: String,
    pub to: String,
}

/// Differences kept per comparison; more are summed up in one last `...` difference.
const MAX_DIFFERENCES: usize = 50;
/// Characters of a value kept in a difference.
const MAX_VALUE_CHARS: usize = 200;
const ABSENT: &str = "(absent)";

/// Headers that describe the connection or this one response rather than the resource.
const NOT_COMPARED: [&str; 13] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "date",
    "content-length",
    // Bodies are compared decoded, so the coding itself is not a difference.
    "content-encoding",
    "set-cookie",
    "x-ficus-shadow",
];

/// The differences between the two answers, leaving out what `policy` ignores. Empty: match.
pub fn compare(from: &Answer, to: &Answer, policy: &Shadow) -> Vec<Difference> {
    let mut out = Differences::default();
    if from.status != to.status {
        out.push("status", "status".into(), from.status.to_string(), to.status.to_string());
    }
    compare_headers(&from.headers, &to.headers, policy, &mut out);
    compare_bodies(from, to, policy, &mut out);
    out.finish()
}

#[derive(Default)]
struct Differences {
    list: Vec<Difference>,
    more: usize,
}

impl Differences {
    fn push(&mut self, field: &str, pattern: String, from: String, to: String) {
        if self.list.len() < MAX_DIFFERENCES {
            let (from, to) = (clip(from), clip(to));
            self.list.push(Difference { field: field.to_string(), pattern, from, to });
        } else {
            self.more += 1;
        }
    }

    fn finish(mut self) -> Vec<Difference> {
        if self.more > 0 {
            let more = format!("{} more differences", self.more);
            self.list.push(Difference {
                field: "...".into(),
                pattern: "...".into(),
                from: more.clone(),
                to: more,
            });
        }
        self.list
    }
}

fn clip(mut text: String) -> String {
    if let Some((index, _)) = text.char_indices().nth(MAX_VALUE_CHARS) {
        text.truncate(index);
        text.push('…');
    }
    text
}

fn compare_headers(from: &HeaderMap, to: &HeaderMap, policy: &Shadow, out: &mut Differences) {
    let names: BTreeSet<&str> = from.keys().chain(to.keys()).map(|name| name.as_str()).collect();
    for name in names {
        if NOT_COMPARED.contains(&name) || policy.ignore_headers.iter().any(|h| h == name) {
            continue;
        }
        let (a, b) = (header_value(from, name), header_value(to, name));
        if a != b {
            let field = format!("header:{name}");
            out.push(&field, field.clone(), a.unwrap_or_else(absent), b.unwrap_or_else(absent));
        }
    }
    // Cookies by name only: their values are per client and never shown.
    let (a, b) = (cookie_names(from), cookie_names(to));
    if a != b {
        let join = |names: BTreeSet<String>| names.into_iter().collect::<Vec<_>>().join(", ");
        let field = "header:set-cookie";
        out.push(field, field.into(), join(a), join(b));
    }
}

fn absent() -> String {
    ABSENT.to_string()
}

fn header_value(headers: &HeaderMap, name: &str) -> Option<String> {
    let values: Vec<String> = headers
        .get_all(name)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    (!values.is_empty()).then(|| values.join(", "))
}

fn cookie_names(headers: &HeaderMap) -> BTreeSet<String> {
    headers
        .get_all(http::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|cookie| cookie.split_once('=').map(|(name, _)| name.trim().to_string()))
        .collect()
}

fn compare_bodies(from: &Answer, to: &Answer, policy: &Shadow, out: &mut Differences) {
    let (Some(a), Some(b)) = (decoded(from, policy.max_body), decoded(to, policy.max_body)) else {
        let side = |answer: &Answer| format!("{} bytes, not decodable", answer.body.len());
        out.push("body", "body".into(), side(from), side(to));
        return;
    };
    if is_json(&from.headers) && is_json(&to.headers) {
        if let (Ok(a), Ok(b)) =
            (serde_json::from_slice::<Value>(&a), serde_json::from_slice::<Value>(&b))
        {
            if !policy.ignores(&[]) {
                let mut walk = Walk { policy, out, path: Vec::new(), indices: Vec::new() };
                walk.values(Some(&a), Some(&b));
            }
            return;
        }
    }
    if a != b {
        let describe = |body: &[u8]| match std::str::from_utf8(body) {
            Ok(text) => text.to_string(),
            Err(_) => format!("{} bytes", body.len()),
        };
        out.push("body", "body".into(), describe(&a), describe(&b));
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(content_type) = headers.get(http::header::CONTENT_TYPE) else { return false };
    let Ok(content_type) = content_type.to_str() else { return false };
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence == "application/json" || essence.ends_with("+json")
}

/// The body with its content coding removed, at most `limit` bytes decoded (a compressed
/// body may expand a thousandfold); `None` for an unknown coding or a corrupt body.
fn decoded(answer: &Answer, limit: usize) -> Option<Vec<u8>> {
    let coding = answer.headers.get(http::header::CONTENT_ENCODING).and_then(|v| v.to_str().ok());
    let coding = coding.map(|c| c.trim().to_ascii_lowercase());
    let body = &answer.body[..];
    let reader: Box<dyn Read + '_> = match coding.as_deref() {
        None | Some("" | "identity") => return Some(body.to_vec()),
        Some("gzip" | "x-gzip") => Box::new(flate2::read::GzDecoder::new(body)),
        Some("deflate") => Box::new(flate2::read::ZlibDecoder::new(body)),
        Some("br") => Box::new(brotli::Decompressor::new(body, 4096)),
        Some(_) => return None,
    };
    let mut out = Vec::new();
    let limit = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    reader.take(limit).read_to_end(&mut out).ok()?;
    Some(out)
}

/// A walk of two JSON documents side by side.
struct Walk<'a> {
    policy: &'a Shadow,
    out: &'a mut Differences,
    path: Vec<String>,
    /// Which segments of `path` are array indices.
    indices: Vec<bool>,
}

impl Walk<'_> {
    fn values(&mut self, a: Option<&Value>, b: Option<&Value>) {
        match (a, b) {
            (Some(Value::Object(a)), Some(Value::Object(b))) => {
                let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
                for key in keys {
                    self.child(key.clone(), false, a.get(key), b.get(key));
                }
            }
            (Some(Value::Array(a)), Some(Value::Array(b))) => {
                for index in 0..a.len().max(b.len()) {
                    self.child(index.to_string(), true, a.get(index), b.get(index));
                }
            }
            (Some(a), Some(b)) if same_scalar(a, b) => {}
            (a, b) => {
                let text = |v: Option<&Value>| v.map_or_else(absent, Value::to_string);
                let pattern = FieldPattern::folded(&self.path, |i| self.indices[i]).to_string();
                self.out.push(&pointer(&self.path), pattern, text(a), text(b));
            }
        }
    }

    fn child(&mut self, key: String, index: bool, a: Option<&Value>, b: Option<&Value>) {
        self.path.push(key);
        self.indices.push(index);
        if !self.policy.ignores(&self.path) {
            self.values(a, b);
        }
        self.path.pop();
        self.indices.pop();
    }
}

/// Equal scalars; numbers by value (`12.5` is `12.50`, `1` is `1.0`).
fn same_scalar(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            if let (Some(x), Some(y)) = (x.as_i64(), y.as_i64()) {
                return x == y;
            }
            if let (Some(x), Some(y)) = (x.as_u64(), y.as_u64()) {
                return x == y;
            }
            x.as_f64() == y.as_f64()
        }
        (Value::Object(_) | Value::Array(_), _) | (_, Value::Object(_) | Value::Array(_)) => false,
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::Duration;

    use super::*;

    fn policy(ignore: &[&str], ignore_headers: &[&str]) -> Shadow {
        Shadow {
            threshold: 10_000,
            methods: vec!["GET".into()],
            ignore: ignore.iter().map(|p| FieldPattern::parse(p).expect("pattern")).collect(),
            ignore_headers: ignore_headers.iter().map(|h| h.to_string()).collect(),
            noise: false,
            max_body: 1 << 20,
            timeout: Duration::from_secs(1),
            max_in_flight: 1,
        }
    }

    fn json(status: u16, body: &str) -> Answer {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", "application/json; charset=utf-8".parse().expect("value"));
        Answer { status, headers, body: Bytes::from(body.to_string()) }
    }

    fn fields(differences: &[Difference]) -> Vec<(&str, &str, &str)> {
        differences.iter().map(|d| (d.field.as_str(), d.from.as_str(), d.to.as_str())).collect()
    }

    #[test]
    fn key_order_whitespace_and_number_forms_do_not_differ() {
        let a = json(200, r#"{"id": 7, "total": 12.5, "tags": ["a", "b"], "n": 1}"#);
        let b = json(200, r#"{"tags":["a","b"],"total":12.50,"id":7,"n":1.0}"#);
        assert_eq!(compare(&a, &b, &policy(&[], &[])), vec![]);
    }

    #[test]
    fn differing_fields_are_reported_with_both_sides() {
        let a = json(200, r#"{"items": [{"price": 12.50, "sku": "x"}], "gone": true}"#);
        let b = json(200, r#"{"items": [{"price": 12.49, "sku": "x"}], "new": 1}"#);
        let differences = compare(&a, &b, &policy(&[], &[]));
        assert_eq!(
            fields(&differences),
            [
                ("/gone", "true", "(absent)"),
                ("/items/0/price", "12.5", "12.49"),
                ("/new", "(absent)", "1"),
            ]
        );
        assert_eq!(differences[1].pattern, "/items/*/price");
    }

    #[test]
    fn ignored_fields_and_headers_are_left_out() {
        let mut a = json(200, r#"{"generated_at": 1, "items": [{"etag": "a", "id": 1}]}"#);
        let mut b = json(200, r#"{"generated_at": 2, "items": [{"etag": "b", "id": 1}]}"#);
        a.headers.insert("x-request-id", "1".parse().expect("value"));
        b.headers.insert("x-request-id", "2".parse().expect("value"));
        a.headers.insert("date", "Mon".parse().expect("value"));
        let policy = policy(&["/generated_at", "/items/*/etag"], &["x-request-id"]);
        assert_eq!(compare(&a, &b, &policy), vec![]);
    }

    #[test]
    fn status_headers_and_cookie_names_are_compared() {
        let mut a = json(200, "{}");
        let mut b = json(404, "{}");
        a.headers.insert("cache-control", "max-age=60".parse().expect("value"));
        a.headers.append("set-cookie", "session=secret1; Path=/".parse().expect("value"));
        b.headers.append("set-cookie", "session=secret2; Path=/".parse().expect("value"));
        b.headers.append("set-cookie", "theme=dark".parse().expect("value"));
        let differences = compare(&a, &b, &policy(&[], &[]));
        assert_eq!(
            fields(&differences),
            [
                ("status", "200", "404"),
                ("header:cache-control", "max-age=60", "(absent)"),
                ("header:set-cookie", "session", "session, theme"),
            ]
        );
        assert!(differences.iter().all(|d| !d.from.contains("secret") && !d.to.contains("secret")));
    }

    #[test]
    fn other_bodies_are_compared_byte_for_byte_after_decoding() {
        let text = |body: &[u8], coding: Option<&str>| {
            let mut headers = HeaderMap::new();
            headers.insert("content-type", "text/plain".parse().expect("value"));
            if let Some(coding) = coding {
                headers.insert("content-encoding", coding.parse().expect("value"));
            }
            Answer { status: 200, headers, body: Bytes::copy_from_slice(body) }
        };
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"hello").expect("compress");
        let gzipped = gz.finish().expect("compress");
        let policy = policy(&[], &[]);
        assert_eq!(compare(&text(b"hello", None), &text(&gzipped, Some("gzip")), &policy), vec![]);
        let differences = compare(&text(b"hello", None), &text(b"hullo", None), &policy);
        assert_eq!(fields(&differences), [("body", "hello", "hullo")]);
    }

    #[test]
    fn differences_are_capped() {
        let a: Vec<u32> = (0..80).collect();
        let b: Vec<u32> = (1..81).collect();
        let a = json(200, &serde_json::to_string(&a).expect("json"));
        let b = json(200, &serde_json::to_string(&b).expect("json"));
        let differences = compare(&a, &b, &policy(&[], &[]));
        assert_eq!(differences.len(), MAX_DIFFERENCES + 1);
        assert_eq!(differences[MAX_DIFFERENCES].from, "30 more differences");
    }
}
