//! Pingora's request header seen through the routes crate's [`RequestView`].

use std::net::IpAddr;

use ficus_routes::request::find_cookie;
use ficus_routes::RequestView;
use pingora::http::RequestHeader;

/// A routing view of one downstream request.
pub struct PingoraRequest<'a> {
    pub header: &'a RequestHeader,
    pub client_ip: Option<IpAddr>,
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
        self.value(name)
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
