//! Compiled request matchers: path (exact, segment prefix, regex), host, methods and headers.

use regex::Regex;

use crate::request::RequestView;

/// How a route matches the request path.
#[derive(Debug, Clone)]
pub enum PathMatch {
    /// Any path.
    Any,
    /// Exactly this path.
    Exact(String),
    /// This path or anything below it, matching whole segments; stored without a trailing `/`.
    Prefix(String),
    /// The regular expression is found in the path.
    Regex(Regex),
}

impl PathMatch {
    /// Builds a segment prefix; `/api/orders/` and `/api/orders` mean the same.
    pub fn prefix(prefix: &str) -> PathMatch {
        PathMatch::Prefix(prefix.trim_end_matches('/').to_string())
    }

    /// Whether `path` meets this condition.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Any => true,
            PathMatch::Exact(exact) => path == exact,
            PathMatch::Prefix(prefix) => is_segment_prefix(prefix, path),
            PathMatch::Regex(regex) => regex.is_match(path),
        }
    }
}

/// True when `path` is `prefix` or continues it with a new segment (`/`).
///
/// An empty prefix (from `path_prefix = "/"`) matches every path.
pub fn is_segment_prefix(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || prefix.is_empty(),
        None => false,
    }
}

/// All the conditions of one route; a request must meet every one.
#[derive(Debug, Clone)]
pub struct Matcher {
    pub path: PathMatch,
    /// Lowercase host without port.
    pub host: Option<String>,
    /// Uppercase methods; empty means any.
    pub methods: Vec<String>,
    /// Lowercase header names with the exact values required.
    pub headers: Vec<(String, String)>,
}

impl Matcher {
    /// Whether the request meets every condition. Cheap checks run first.
    pub fn matches(&self, req: &impl RequestView) -> bool {
        self.matches_with(req, |path| path.matches(req.path()))
    }

    /// Like [`Matcher::matches`], with the path condition decided by `path_matches`: the
    /// route table answers regex conditions from one pass of a `RegexSet`.
    pub fn matches_with(
        &self,
        req: &impl RequestView,
        path_matches: impl FnOnce(&PathMatch) -> bool,
    ) -> bool {
        (self.methods.is_empty() || self.methods.iter().any(|m| m == req.method()))
            && self.host.as_deref().is_none_or(|host| host_matches(host, req.host()))
            && path_matches(&self.path)
            && self.headers.iter().all(|(name, value)| req.header(name) == Some(value.as_str()))
    }

    /// A short human description, for `routes check` and `explain`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        match &self.path {
            PathMatch::Any => {}
            PathMatch::Exact(path) => parts.push(format!("path {path}")),
            PathMatch::Prefix(prefix) if prefix.is_empty() => parts.push("path_prefix /".into()),
            PathMatch::Prefix(prefix) => parts.push(format!("path_prefix {prefix}")),
            PathMatch::Regex(regex) => parts.push(format!("path_regex {}", regex.as_str())),
        }
        if let Some(host) = &self.host {
            parts.push(format!("host {host}"));
        }
        if !self.methods.is_empty() {
            parts.push(format!("methods {}", self.methods.join(",")));
        }
        for (name, value) in &self.headers {
            parts.push(format!("header {name}={value}"));
        }
        if parts.is_empty() {
            "every request".to_string()
        } else {
            parts.join(", ")
        }
    }
}

/// Compares a Host header value (maybe with a port, maybe an IPv6 literal) to a host.
fn host_matches(expected: &str, actual: Option<&str>) -> bool {
    let Some(actual) = actual else { return false };
    let without_port = if actual.starts_with('[') {
        actual.split_once(']').map_or(actual, |(host, _)| &host[1..])
    } else {
        actual.rsplit_once(':').map_or(actual, |(host, _)| host)
    };
    without_port.eq_ignore_ascii_case(expected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::SimpleRequest;

    fn matcher(path: PathMatch) -> Matcher {
        Matcher { path, host: None, methods: vec![], headers: vec![] }
    }

    #[test]
    fn prefix_matches_whole_segments_only() {
        let m = matcher(PathMatch::prefix("/api/orders"));
        assert!(m.matches(&SimpleRequest::new("GET", "/api/orders")));
        assert!(m.matches(&SimpleRequest::new("GET", "/api/orders/7")));
        assert!(m.matches(&SimpleRequest::new("GET", "/api/orders/")));
        assert!(!m.matches(&SimpleRequest::new("GET", "/api/ordersx")));
        assert!(!m.matches(&SimpleRequest::new("GET", "/api")));
    }

    #[test]
    fn root_prefix_matches_everything() {
        let m = matcher(PathMatch::prefix("/"));
        assert!(m.matches(&SimpleRequest::new("GET", "/")));
        assert!(m.matches(&SimpleRequest::new("GET", "/anything/else")));
    }

    #[test]
    fn exact_and_regex_paths() {
        assert!(matcher(PathMatch::Exact("/a".into())).matches(&SimpleRequest::new("GET", "/a")));
        assert!(!matcher(PathMatch::Exact("/a".into())).matches(&SimpleRequest::new("GET", "/a/b")));
        let re = matcher(PathMatch::Regex(Regex::new(r"^/users/\d+$").expect("valid regex")));
        assert!(re.matches(&SimpleRequest::new("GET", "/users/42")));
        assert!(!re.matches(&SimpleRequest::new("GET", "/users/me")));
    }

    #[test]
    fn host_ignores_port_and_case() {
        let mut m = matcher(PathMatch::Any);
        m.host = Some("shop.example.com".into());
        let req = |host: &str| SimpleRequest::new("GET", "/").with_header("host", host);
        assert!(m.matches(&req("shop.example.com:8443")));
        assert!(m.matches(&req("SHOP.example.com")));
        assert!(!m.matches(&req("api.example.com")));
        assert!(!m.matches(&SimpleRequest::new("GET", "/")));
        m.host = Some("::1".into());
        assert!(m.matches(&req("[::1]:8080")));
    }

    #[test]
    fn methods_and_headers_must_all_hold() {
        let mut m = matcher(PathMatch::Any);
        m.methods = vec!["GET".into(), "POST".into()];
        m.headers = vec![("x-beta".into(), "1".into())];
        assert!(m.matches(&SimpleRequest::new("POST", "/").with_header("X-Beta", "1")));
        assert!(!m.matches(&SimpleRequest::new("DELETE", "/").with_header("X-Beta", "1")));
        assert!(!m.matches(&SimpleRequest::new("GET", "/").with_header("X-Beta", "2")));
        assert!(!m.matches(&SimpleRequest::new("GET", "/")));
    }
}
