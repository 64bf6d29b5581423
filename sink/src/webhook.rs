//! What a webhook request carries and what its answer means: the body (the events of one
//! partition, in order, as a JSON array), the `Idempotency-Key`, the signature headers of
//! the Standard Webhooks scheme, and the verdict on a status. No I/O.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

/// One event of a request.
pub struct HookEvent<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
}

/// The request body: `[{"topic", "partition", "offset", "key", "value"}, ...]`, key and
/// value as the JSON they are (a tombstone's value is `null`; bytes that are not JSON are
/// given as a string), so that a receiver can deduplicate event by event.
pub fn body(events: &[HookEvent<'_>]) -> Vec<u8> {
    let embed = |bytes: Option<&[u8]>| match bytes {
        None => Value::Null,
        Some(bytes) => serde_json::from_slice(bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned())),
    };
    let events: Vec<Value> = events
        .iter()
        .map(|e| {
            json!({
                "topic": e.topic,
                "partition": e.partition,
                "offset": e.offset,
                "key": embed(e.key),
                "value": embed(e.value),
            })
        })
        .collect();
    Value::Array(events).to_string().into_bytes()
}

/// The `Idempotency-Key` (and `webhook-id`) of a request: `topic/partition/offset`, or
/// `topic/partition/first-last` for several events. A request sent again after a failure
/// carries the same key.
pub fn idempotency_key(topic: &str, partition: i32, first: i64, last: i64) -> String {
    if first == last {
        format!("{topic}/{partition}/{first}")
    } else {
        format!("{topic}/{partition}/{first}-{last}")
    }
}

/// A signing secret.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// `whsec_` followed by base64 (as Standard Webhooks libraries hand them out), or any
    /// other text, used as it is (surrounding whitespace trimmed).
    pub fn parse(text: &str) -> Result<Secret, String> {
        let text = text.trim();
        let bytes = match text.strip_prefix("whsec_") {
            Some(encoded) => STANDARD
                .decode(encoded)
                .map_err(|e| format!("a whsec_ secret must be base64: {e}"))?,
            None => text.as_bytes().to_vec(),
        };
        if bytes.is_empty() {
            return Err("the secret is empty".into());
        }
        Ok(Secret(bytes))
    }

    /// The `webhook-signature` header: `v1,` and the base64 HMAC-SHA256 of
    /// `{id}.{timestamp}.{body}`.
    pub fn sign(&self, id: &str, timestamp: u64, body: &[u8]) -> String {
        // HMAC takes a key of any length.
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

/// What an answer means for the request's events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Taken (2xx).
    Delivered,
    /// Send it again later: the endpoint is failing, overloaded or slow (5xx, 408, 429).
    Retry,
    /// The endpoint will not take it as it is (another 4xx, or an unexpected status).
    Refused,
}

impl Verdict {
    pub fn of(status: u16) -> Verdict {
        match status {
            200..=299 => Verdict::Delivered,
            408 | 429 | 500..=599 => Verdict::Retry,
            _ => Verdict::Refused,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_carries_each_event_with_its_position_and_json_as_json() {
        let events = [
            HookEvent {
                topic: "shop.public.orders",
                partition: 0,
                offset: 7,
                key: Some(br#"{"id":1}"#),
                value: Some(br#"{"op":"c","after":{"id":1}}"#),
            },
            HookEvent {
                topic: "shop.public.orders",
                partition: 0,
                offset: 8,
                key: Some(b"not json"),
                value: None,
            },
        ];
        let body: Value = serde_json::from_slice(&body(&events)).expect("json");
        assert_eq!(
            body,
            json!([
                {"topic": "shop.public.orders", "partition": 0, "offset": 7, "key": {"id": 1}, "value": {"op": "c", "after": {"id": 1}}},
                {"topic": "shop.public.orders", "partition": 0, "offset": 8, "key": "not json", "value": null},
            ])
        );
        assert_eq!(idempotency_key("t", 0, 7, 8), "t/0/7-8");
        assert_eq!(idempotency_key("t", 3, 9, 9), "t/3/9");
    }

    #[test]
    fn signatures_follow_the_standard_webhooks_scheme() {
        // The example of the Standard Webhooks specification.
        let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n").expect("secret");
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            secret.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        let plain = Secret::parse("  hunter2 ").expect("plain secret");
        assert_ne!(plain.sign("a", 1, b"x"), plain.sign("a", 2, b"x"), "the time is signed");
        assert!(Secret::parse("whsec_%%%").is_err());
        assert!(Secret::parse("  \n").is_err());
    }

    #[test]
    fn server_trouble_is_retried_and_a_refusal_is_not() {
        assert_eq!(Verdict::of(204), Verdict::Delivered);
        for status in [503, 500, 429, 408] {
            assert_eq!(Verdict::of(status), Verdict::Retry, "{status}");
        }
        for status in [400, 401, 404, 422, 301] {
            assert_eq!(Verdict::of(status), Verdict::Refused, "{status}");
        }
    }
}
