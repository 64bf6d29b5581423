//! Sticky bucketing: how a client is identified and which of 10,000 buckets it falls in.
//!
//! The bucket of a key is `XXH3-64(seed 0, UTF-8 bytes of the key) mod 10000`. This is part of
//! ficus's contract: it never changes between versions, restarts or replicas, so every proxy
//! puts a client in the same bucket, and a route at `percent` sends buckets
//! `0 .. percent * 100` to its `to` backend. Raising `percent` only adds buckets.

use std::fmt;

use xxhash_rust::xxh3::xxh3_64;

/// The number of buckets clients are spread over; `percent` has 0.01 steps because of it.
pub const BUCKETS: u16 = 10_000;

/// The bucket of a client key.
pub fn bucket_of(key: &str) -> u16 {
    // The remainder is below 10,000, so the cast cannot truncate.
    (xxh3_64(key.as_bytes()) % u64::from(BUCKETS)) as u16
}

/// Where a route finds the key that identifies a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sticky {
    /// A request header (name lowercase).
    Header(String),
    /// A cookie.
    Cookie(String),
    /// A query-string parameter.
    Query(String),
    /// The client's IP address, in its usual text form.
    Ip,
    /// No stickiness: each request is bucketed at random.
    None,
}

impl Sticky {
    /// Parses `header:NAME`, `cookie:NAME`, `query:NAME`, `ip` or `none`.
    pub fn parse(spec: &str) -> Result<Sticky, String> {
        let spec = spec.trim();
        match spec {
            "ip" => return Ok(Sticky::Ip),
            "none" => return Ok(Sticky::None),
            _ => {}
        }
        let Some((kind, name)) = spec.split_once(':') else {
            return Err(format!(
                "\"{spec}\" is not one of header:NAME, cookie:NAME, query:NAME, ip, none"
            ));
        };
        if name.is_empty() {
            return Err(format!("\"{spec}\" names no {kind}"));
        }
        match kind {
            "header" if is_token(name) => Ok(Sticky::Header(name.to_ascii_lowercase())),
            "header" => Err(format!("\"{name}\" is not a valid header name")),
            "cookie" if is_token(name) => Ok(Sticky::Cookie(name.to_string())),
            "cookie" => Err(format!("\"{name}\" is not a valid cookie name")),
            "query" => Ok(Sticky::Query(name.to_string())),
            _ => Err(format!(
                "\"{kind}\" is not one of header:NAME, cookie:NAME, query:NAME, ip, none"
            )),
        }
    }
}

impl fmt::Display for Sticky {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sticky::Header(name) => write!(f, "header:{name}"),
            Sticky::Cookie(name) => write!(f, "cookie:{name}"),
            Sticky::Query(name) => write!(f, "query:{name}"),
            Sticky::Ip => f.write_str("ip"),
            Sticky::None => f.write_str("none"),
        }
    }
}

/// True for an RFC 9110 token: what header and cookie names are made of.
pub fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_hash_is_pinned() {
        // These values are the contract: changing them moves clients between backends.
        assert_eq!(xxh3_64(b""), 0x2D06_8005_38D3_94C2);
        assert_eq!(bucket_of("user-1"), (xxh3_64(b"user-1") % 10_000) as u16);
        assert_eq!(bucket_of(""), (0x2D06_8005_38D3_94C2_u64 % 10_000) as u16);
        // The README's examples.
        assert_eq!(bucket_of("14"), 998);
        assert_eq!(bucket_of("42"), 5473);
    }

    #[test]
    fn buckets_spread_evenly() {
        let mut below_2500 = 0;
        for i in 0..100_000 {
            if bucket_of(&format!("client-{i}")) < 2500 {
                below_2500 += 1;
            }
        }
        assert!((24_000..26_000).contains(&below_2500), "{below_2500}");
    }

    #[test]
    fn sticky_specs_parse() {
        assert_eq!(Sticky::parse("header:X-User-Id"), Ok(Sticky::Header("x-user-id".into())));
        assert_eq!(Sticky::parse("cookie:session_id"), Ok(Sticky::Cookie("session_id".into())));
        assert_eq!(Sticky::parse("query:u"), Ok(Sticky::Query("u".into())));
        assert_eq!(Sticky::parse("ip"), Ok(Sticky::Ip));
        assert_eq!(Sticky::parse("none"), Ok(Sticky::None));
        assert!(Sticky::parse("header:").is_err());
        assert!(Sticky::parse("header:bad name").is_err());
        assert!(Sticky::parse("session").is_err());
        assert!(Sticky::parse("body:x").is_err());
    }
}
