//! What routing needs to know about a request, independent of any HTTP library.

use std::net::IpAddr;

/// A read-only view of an incoming request.
///
/// The proxy implements it over Pingora's request header; `explain` and tests over
/// [`SimpleRequest`]. Header names passed in are lowercase.
pub trait RequestView {
    /// The method, uppercase (`GET`).
    fn method(&self) -> &str;
    /// The path, without the query string.
    fn path(&self) -> &str;
    /// The raw query string, without `?`.
    fn query(&self) -> Option<&str>;
    /// The Host header (or HTTP/2 `:authority`), possibly with a port.
    fn host(&self) -> Option<&str>;
    /// The first value of a header.
    fn header(&self, name: &str) -> Option<&str>;
    /// The value of a cookie, searched in every Cookie header.
    fn cookie(&self, name: &str) -> Option<&str>;
    /// The address of the client as seen by the proxy.
    fn client_ip(&self) -> Option<IpAddr>;
}

/// Finds cookie `name` in one `Cookie` header value (`a=1; b=2`).
pub fn find_cookie<'v>(header_value: &'v str, name: &str) -> Option<&'v str> {
    header_value.split(';').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key.trim() == name).then(|| value.trim().trim_matches('"'))
    })
}

/// Finds parameter `name` in a raw query string (`a=1&b=2`), value left undecoded.
pub fn find_query_param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then_some(value)
    })
}

/// A request assembled from parts, for `explain` and tests.
#[derive(Debug, Clone, Default)]
pub struct SimpleRequest {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// Headers with lowercase names, in the order given.
    pub headers: Vec<(String, String)>,
    pub client_ip: Option<IpAddr>,
}

impl SimpleRequest {
    /// Builds a request from a method and a target such as `/a/b?x=1`.
    pub fn new(method: &str, target: &str) -> Self {
        let (path, query) = match target.split_once('?') {
            Some((path, query)) => (path, Some(query.to_string())),
            None => (target, None),
        };
        SimpleRequest {
            method: method.to_ascii_uppercase(),
            path: path.to_string(),
            query,
            ..SimpleRequest::default()
        }
    }

    /// Adds a header; the name is lowercased.
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_ascii_lowercase(), value.to_string()));
        self
    }
}

impl RequestView for SimpleRequest {
    fn method(&self) -> &str {
        &self.method
    }

    fn path(&self) -> &str {
        &self.path
    }

    fn query(&self) -> Option<&str> {
        self.query.as_deref()
    }

    fn host(&self) -> Option<&str> {
        self.header("host")
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
    }

    fn cookie(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .filter(|(key, _)| key == "cookie")
            .find_map(|(_, value)| find_cookie(value, name))
    }

    fn client_ip(&self) -> Option<IpAddr> {
        self.client_ip
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_among_several() {
        assert_eq!(find_cookie("a=1; session_id=xyz; b=2", "session_id"), Some("xyz"));
        assert_eq!(find_cookie("a=1;b=2", "b"), Some("2"));
        assert_eq!(find_cookie("session_idx=1", "session_id"), None);
    }

    #[test]
    fn query_params_are_found_undecoded() {
        assert_eq!(find_query_param("a=1&user=x%20y", "user"), Some("x%20y"));
        assert_eq!(find_query_param("flag&a=1", "flag"), Some(""));
        assert_eq!(find_query_param("ab=1", "a"), None);
    }

    #[test]
    fn simple_request_splits_the_query() {
        let req = SimpleRequest::new("get", "/a?b=c").with_header("Cookie", "x=1");
        assert_eq!(req.method(), "GET");
        assert_eq!(req.path(), "/a");
        assert_eq!(req.query(), Some("b=c"));
        assert_eq!(req.cookie("x"), Some("1"));
    }
}
