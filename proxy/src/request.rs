//! Pingora's request header seen through the routes crate's [`RequestView`].

use std::net::IpAddr;

use ficus_routes::request::find_cookie;
use ficus_routes::RequestView;
use http::HeaderName;
use pingora::http::RequestHeader;

/// A routing view of one downstream request.
pub struct PingoraRequest<'a> {
    pub header: &'a RequestHeader,
    pub client_ip: Option<IpAddr>,
    /// The names the table looks up, parsed.
    pub names: &'a HeaderNames,
}

/// The request header names a route table looks up ([`RouteTable::looked_up_headers`]),
/// parsed once per table: looking a header up by text parses the text first, each time, which
/// cost twice the lookup itself. Sorted by text, so that a table naming thousands of headers
/// costs a request a binary search, not a scan.
///
/// [`RouteTable::looked_up_headers`]: ficus_routes::RouteTable::looked_up_headers
#[derive(Debug, Default)]
pub struct HeaderNames(Vec<(Box<str>, HeaderName)>);

impl HeaderNames {
    /// The names that are header names (a table's always are).
    pub fn new<'n>(names: impl IntoIterator<Item = &'n str>) -> HeaderNames {
        let mut parsed: Vec<(Box<str>, HeaderName)> = names
            .into_iter()
            .filter_map(|name| {
                HeaderName::from_bytes(name.as_bytes()).ok().map(|parsed| (name.into(), parsed))
            })
            .collect();
        parsed.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        parsed.dedup_by(|a, b| a.0 == b.0);
        HeaderNames(parsed)
    }

    fn get(&self, name: &str) -> Option<&HeaderName> {
        let at = self.0.binary_search_by(|(text, _)| (**text).cmp(name)).ok()?;
        Some(&self.0[at].1)
    }
}

impl<'a> PingoraRequest<'a> {
    /// The first value of a header, if it is text.
    fn value(&self, name: impl http::header::AsHeaderName) -> Option<&'a str> {
        self.header.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

impl RequestView for PingoraRequest<'_> {
    fn method(&self) -> &str {
        self.header.method.as_str()
    }

    fn path(&self) -> &str {
        self.header.uri.path()
    }

    fn query(&self) -> Option<&str> {
        self.header.uri.query()
    }

    fn host(&self) -> Option<&str> {
        // HTTP/2 clients send `:authority` instead of Host.
        self.value(http::header::HOST).or_else(|| self.header.uri.authority().map(|a| a.as_str()))
    }

    fn header(&self, name: &str) -> Option<&str> {
        match self.names.get(name) {
            Some(parsed) => self.value(parsed),
            None => self.value(name),
        }
    }

    fn cookie(&self, name: &str) -> Option<&str> {
        // HTTP/2 may split cookies over several headers.
        self.header
            .headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|v| find_cookie(v, name))
    }

    fn client_ip(&self) -> Option<IpAddr> {
        self.client_ip
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_found_by_their_parsed_names_and_by_text_otherwise() {
        let mut header = RequestHeader::build("GET", b"/", None).expect("a request");
        header.insert_header("X-User-Id", "7").expect("a field");
        header.insert_header("X-Other", "8").expect("a field");
        let names = HeaderNames::new(["x-z", "x-user-id", "not a name", "x-a", "x-user-id"]);
        assert_eq!(names.0.len(), 3, "header names, each once");
        assert!(names.get("x-a").is_some() && names.get("x-z").is_some());
        let view = PingoraRequest { header: &header, client_ip: None, names: &names };
        assert_eq!(view.header("x-user-id"), Some("7"));
        assert_eq!(view.header("x-other"), Some("8"));
        assert_eq!(view.header("x-missing"), None);
    }
}
