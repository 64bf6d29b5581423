//! A route's `[routes.shadow]` policy, compiled: which requests are also sent to the backend
//! that did not serve them, and which parts of the two answers are not compared.

use std::fmt;
use std::time::Duration;

/// A validated shadow policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Shadow {
    /// Requests below this (of [`crate::BUCKETS`]) are shadowed: `percent * 100`.
    pub threshold: u16,
    /// Upper-case methods shadowed.
    pub methods: Vec<String>,
    /// JSON fields left out of the body comparison.
    pub ignore: Vec<FieldPattern>,
    /// Lower-case response headers left out of the comparison.
    pub ignore_headers: Vec<String>,
    /// Ask the legacy backend twice and learn what differs between its own answers.
    pub noise: bool,
    /// Bodies (request or response) above this many bytes are not compared.
    pub max_body: usize,
    pub timeout: Duration,
    /// Shadow requests in flight for the route; more are dropped.
    pub max_in_flight: usize,
}

/// Methods that may change state: shadowed only when listed, with a warning.
pub const UNSAFE_METHODS: [&str; 4] = ["POST", "PUT", "DELETE", "PATCH"];

impl Shadow {
    /// Whether a request with `method` and random `bucket` (below [`crate::BUCKETS`]) is
    /// shadowed.
    pub fn applies(&self, method: &str, bucket: u16) -> bool {
        bucket < self.threshold && self.methods.iter().any(|m| m == method)
    }

    /// The unsafe methods this policy shadows.
    pub fn unsafe_methods(&self) -> impl Iterator<Item = &str> {
        self.methods.iter().map(String::as_str).filter(|m| UNSAFE_METHODS.contains(m))
    }

    /// Whether the body field at `path` is ignored.
    pub fn ignores(&self, path: &[String]) -> bool {
        self.ignore.iter().any(|pattern| pattern.matches(path))
    }
}

/// A JSON pointer whose segments may be `*` (any key or index): `/items/*/etag`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FieldPattern {
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Segment {
    Any,
    Key(String),
}

impl FieldPattern {
    /// Parses a pointer as RFC 6901 writes it (`~1` is `/`, `~0` is `~`), `*` standing for any
    /// key or index. `""` is the whole document.
    pub fn parse(text: &str) -> Result<FieldPattern, String> {
        if text.is_empty() {
            return Ok(FieldPattern { segments: Vec::new() });
        }
        let Some(rest) = text.strip_prefix('/') else {
            return Err(format!("\"{text}\" is not a JSON pointer: it must start with /"));
        };
        let mut segments = Vec::new();
        for raw in rest.split('/') {
            if raw == "*" {
                segments.push(Segment::Any);
                continue;
            }
            let mut key = String::with_capacity(raw.len());
            let mut chars = raw.chars();
            while let Some(c) = chars.next() {
                match (c, c == '~') {
                    (_, false) => key.push(c),
                    (_, true) => match chars.next() {
                        Some('0') => key.push('~'),
                        Some('1') => key.push('/'),
                        _ => return Err(format!("\"{text}\": `~` must be followed by 0 or 1")),
                    },
                }
            }
            segments.push(Segment::Key(key));
        }
        Ok(FieldPattern { segments })
    }

    /// The pattern of a concrete path with array indices folded to `*`: the form fields are
    /// counted and learnt as noise in.
    pub fn folded(path: &[String], is_index: impl Fn(usize) -> bool) -> FieldPattern {
        let segments = path
            .iter()
            .enumerate()
            .map(|(i, key)| if is_index(i) { Segment::Any } else { Segment::Key(key.clone()) })
            .collect();
        FieldPattern { segments }
    }

    /// Whether the concrete path `path` (keys and indices as text) is matched.
    pub fn matches(&self, path: &[String]) -> bool {
        self.segments.len() == path.len()
            && self.segments.iter().zip(path).all(|(segment, key)| match segment {
                Segment::Any => true,
                Segment::Key(k) => k == key,
            })
    }
}

impl fmt::Display for FieldPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for segment in &self.segments {
            match segment {
                Segment::Any => f.write_str("/*")?,
                Segment::Key(key) => write!(f, "/{}", key.replace('~', "~0").replace('/', "~1"))?,
            }
        }
        Ok(())
    }
}

/// Writes a concrete path as a JSON pointer.
pub fn pointer(path: &[String]) -> String {
    path.iter().map(|key| format!("/{}", key.replace('~', "~0").replace('/', "~1"))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(p: &[&str]) -> Vec<String> {
        p.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn patterns_match_keys_and_any_segment() {
        let pattern = FieldPattern::parse("/items/*/etag").expect("valid");
        assert!(pattern.matches(&path(&["items", "0", "etag"])));
        assert!(pattern.matches(&path(&["items", "name", "etag"])));
        assert!(!pattern.matches(&path(&["items", "0"])));
        assert!(!pattern.matches(&path(&["items", "0", "etag", "x"])));
        assert_eq!(pattern.to_string(), "/items/*/etag");
    }

    #[test]
    fn escapes_follow_rfc_6901() {
        let pattern = FieldPattern::parse("/a~1b/c~0d").expect("valid");
        assert!(pattern.matches(&path(&["a/b", "c~d"])));
        assert_eq!(pattern.to_string(), "/a~1b/c~0d");
        assert_eq!(pointer(&path(&["a/b", "0"])), "/a~1b/0");
        assert!(FieldPattern::parse("/a~2").expect_err("refused").contains("~"));
        assert!(FieldPattern::parse("items").expect_err("refused").contains("must start with /"));
        assert!(FieldPattern::parse("").expect("valid").matches(&[]));
    }

    #[test]
    fn folding_replaces_indices() {
        let p = path(&["items", "3", "price"]);
        assert_eq!(FieldPattern::folded(&p, |i| i == 1).to_string(), "/items/*/price");
    }

    #[test]
    fn applies_by_method_and_share() {
        let shadow = Shadow {
            threshold: 5000,
            methods: vec!["GET".into(), "POST".into()],
            ignore: Vec::new(),
            ignore_headers: Vec::new(),
            noise: false,
            max_body: 1024,
            timeout: Duration::from_secs(1),
            max_in_flight: 1,
        };
        assert!(shadow.applies("GET", 4999));
        assert!(!shadow.applies("GET", 5000));
        assert!(!shadow.applies("HEAD", 0));
        assert_eq!(shadow.unsafe_methods().collect::<Vec<_>>(), ["POST"]);
    }
}
