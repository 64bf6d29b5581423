// Copyright 2026 Cloudflare, Inc.
//
// Licensed under the Apache License, Version 2.0 (the "License");
// you may not use this file except in compliance with the License.
// You may obtain a copy of the License at
//
// http://www.apache.org/licenses/LICENSE-2.0
//
// Unless required by applicable law or agreed to in writing, software
// distributed under the License is distributed on an "AS IS" BASIS,
// WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
// See the License for the specific language governing permissions and
// limitations under the License.

use crate::*;
use bytes::Bytes;
use http::header;
use http::header::InvalidHeaderName;

#[derive(Debug, Clone)]
pub struct CaseHeaderName(Bytes);

impl CaseHeaderName {
    pub fn new(name: String) -> Self {
        CaseHeaderName(name.into())
    }

    /// ficus patch: a name known at compile time, without an allocation.
    pub const fn from_static(name: &'static str) -> Self {
        CaseHeaderName(Bytes::from_static(name.as_bytes()))
    }
}

impl CaseHeaderName {
    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }

    /// ficus patch: the case of a header name read off the wire. A name spelled as the
    /// common fields usually are (`Host`, `User-Agent`, `Content-Type`, ...) takes that
    /// spelling as a static, so the header keeps no reference to the buffer it was read
    /// from, and copying or dropping it counts no references (an atomic operation each);
    /// any other name takes `in_buffer()`, its bytes in that buffer.
    pub fn from_wire(name: &[u8], in_buffer: impl FnOnce() -> Bytes) -> Self {
        match common_spelling(name) {
            Some(spelling) => Self::from_static(spelling),
            None => CaseHeaderName(in_buffer()),
        }
    }

    pub fn from_slice(buf: &[u8]) -> Self {
        CaseHeaderName(Bytes::copy_from_slice(buf))
    }
}

/// A trait that converts into case-sensitive header names.
pub trait IntoCaseHeaderName {
    fn into_case_header_name(self) -> CaseHeaderName;

    /// ficus patch: the header name and the case it is written in. The default parses the
    /// name from its case; a type that holds the name already hands it over, so inserting
    /// a header by [`HeaderName`] (or by a known name and case) parses nothing and, for a
    /// name outside the standard ones, allocates nothing.
    fn into_header_names(self) -> Result<(HeaderName, CaseHeaderName), InvalidHeaderName>
    where
        Self: Sized,
    {
        let case = self.into_case_header_name();
        HeaderName::from_bytes(case.as_slice()).map(|name| (name, case))
    }
}

/// ficus patch: a header name with the case to write it in, both known by the caller (for
/// example two constants). A case that does not spell the name is taken as the name, as
/// text is: parsed, so the two maps always agree and nothing unchecked reaches the wire.
impl IntoCaseHeaderName for (HeaderName, CaseHeaderName) {
    fn into_case_header_name(self) -> CaseHeaderName {
        self.1
    }

    fn into_header_names(self) -> Result<(HeaderName, CaseHeaderName), InvalidHeaderName> {
        // The name's bytes are lowercase token characters: a match also proves the case
        // holds no CR, LF or space.
        if self
            .0
            .as_str()
            .as_bytes()
            .eq_ignore_ascii_case(self.1.as_slice())
        {
            Ok(self)
        } else {
            self.1.into_header_names()
        }
    }
}

impl IntoCaseHeaderName for CaseHeaderName {
    fn into_case_header_name(self) -> CaseHeaderName {
        self
    }
}

impl IntoCaseHeaderName for String {
    fn into_case_header_name(self) -> CaseHeaderName {
        CaseHeaderName(self.into())
    }
}

impl IntoCaseHeaderName for &'static str {
    fn into_case_header_name(self) -> CaseHeaderName {
        CaseHeaderName(self.into())
    }
}

impl IntoCaseHeaderName for HeaderName {
    fn into_case_header_name(self) -> CaseHeaderName {
        CaseHeaderName(titled_header_name(&self))
    }

    fn into_header_names(self) -> Result<(HeaderName, CaseHeaderName), InvalidHeaderName> {
        let case = CaseHeaderName(titled_header_name(&self));
        Ok((self, case))
    }
}

impl IntoCaseHeaderName for &HeaderName {
    fn into_case_header_name(self) -> CaseHeaderName {
        CaseHeaderName(titled_header_name(self))
    }

    fn into_header_names(self) -> Result<(HeaderName, CaseHeaderName), InvalidHeaderName> {
        Ok((self.clone(), CaseHeaderName(titled_header_name(self))))
    }
}

impl IntoCaseHeaderName for Bytes {
    fn into_case_header_name(self) -> CaseHeaderName {
        CaseHeaderName(self)
    }
}

fn titled_header_name(header_name: &HeaderName) -> Bytes {
    titled_header_name_str(header_name).map_or_else(
        || Bytes::copy_from_slice(header_name.as_str().as_bytes()),
        |s| Bytes::from_static(s.as_bytes()),
    )
}

/// ficus patch: the spellings of `name`'s length that equal it, in turn. Each comparison is
/// against a constant of known length, which the compiler turns into a few integer compares
/// instead of a call to `memcmp`.
macro_rules! find_spelling {
    ($name:expr; $($len:literal => [$($spelling:literal),+]),+ $(,)?) => {
        match $name.len() {
            $($len => {
                $(if $name == $spelling.as_bytes() {
                    return Some($spelling);
                })+
                None
            })+
            _ => None,
        }
    };
}

/// ficus patch: `name` as a static, if it is one of the common spellings of common fields.
fn common_spelling(name: &[u8]) -> Option<&'static str> {
    find_spelling!(name;
        3 => ["Age"],
        4 => ["Date", "ETag", "Host", "Vary"],
        6 => ["Accept", "Cookie", "Origin", "Pragma", "Server"],
        7 => ["Expires", "Referer", "Upgrade"],
        8 => ["Location"],
        10 => ["Connection", "Keep-Alive", "Set-Cookie", "User-Agent"],
        12 => ["Content-Type"],
        13 => ["Accept-Ranges", "Authorization", "Cache-Control", "If-None-Match", "Last-Modified"],
        14 => ["Content-Length"],
        15 => ["Accept-Encoding", "Accept-Language", "X-Forwarded-For", "X-Frame-Options"],
        16 => ["Content-Encoding"],
        17 => ["If-Modified-Since", "Transfer-Encoding", "X-Forwarded-Proto"],
        22 => ["X-Content-Type-Options"],
        25 => ["Strict-Transport-Security"],
        27 => ["Access-Control-Allow-Origin"],
    )
}

pub(crate) fn titled_header_name_str(header_name: &HeaderName) -> Option<&'static str> {
    Some(match *header_name {
        header::ACCEPT_RANGES => "Accept-Ranges",
        header::AGE => "Age",
        header::CACHE_CONTROL => "Cache-Control",
        header::CONNECTION => "Connection",
        header::CONTENT_TYPE => "Content-Type",
        header::CONTENT_ENCODING => "Content-Encoding",
        header::CONTENT_LENGTH => "Content-Length",
        header::DATE => "Date",
        header::TRANSFER_ENCODING => "Transfer-Encoding",
        header::HOST => "Host",
        header::SERVER => "Server",
        header::SET_COOKIE => "Set-Cookie",
        // TODO: add more const header here to map to their titled case
        // TODO: automatically upper case the first letter?
        _ => {
            return None;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_case_header_name() {
        assert_eq!("FoO".into_case_header_name().as_slice(), b"FoO");
        assert_eq!("FoO".to_string().into_case_header_name().as_slice(), b"FoO");
        assert_eq!(header::SERVER.into_case_header_name().as_slice(), b"Server");
    }

    // ficus patch: common spellings are static; any other name, a common one in another
    // case included, is the buffer's bytes, as before.
    #[test]
    fn names_read_off_the_wire_keep_their_spelling() {
        let common = [
            "Accept", "Accept-Encoding", "Accept-Language", "Accept-Ranges",
            "Access-Control-Allow-Origin", "Age", "Authorization", "Cache-Control",
            "Connection", "Content-Encoding", "Content-Length", "Content-Type", "Cookie",
            "Date", "ETag", "Expires", "Host", "If-Modified-Since", "If-None-Match",
            "Keep-Alive", "Last-Modified", "Location", "Origin", "Pragma", "Referer", "Server",
            "Set-Cookie", "Strict-Transport-Security", "Transfer-Encoding", "Upgrade",
            "User-Agent", "Vary", "X-Content-Type-Options", "X-Forwarded-For",
            "X-Forwarded-Proto", "X-Frame-Options",
        ];
        for name in common {
            let case = CaseHeaderName::from_wire(name.as_bytes(), || {
                panic!("{name} was taken from the buffer")
            });
            assert_eq!(case.as_slice(), name.as_bytes());
        }
        for name in ["host", "HOST", "Content-type", "X-User", "Hosts", "Hos", ""] {
            let buffer = Bytes::copy_from_slice(name.as_bytes());
            let case = CaseHeaderName::from_wire(name.as_bytes(), || buffer.clone());
            assert_eq!(case.as_slice().as_ptr(), buffer.as_ptr(), "{name}");
            assert_eq!(case.as_slice(), name.as_bytes());
        }
    }

    #[test]
    fn known_names_are_handed_over_and_others_parsed() {
        let (name, case) = "X-Forwarded-For".into_header_names().expect("valid");
        assert_eq!(
            (name.as_str(), case.as_slice()),
            ("x-forwarded-for", &b"X-Forwarded-For"[..])
        );
        let known = (
            HeaderName::from_static("x-forwarded-for"),
            CaseHeaderName::from_static("X-Forwarded-For"),
        );
        let (name, case) = known.into_header_names().expect("valid");
        assert_eq!(
            (name.as_str(), case.as_slice()),
            ("x-forwarded-for", &b"X-Forwarded-For"[..])
        );
        let (name, case) = header::HOST.into_header_names().expect("valid");
        assert_eq!((name, case.as_slice()), (header::HOST, &b"Host"[..]));
        assert!("bad name".into_header_names().is_err());
        // A case that does not spell the name is taken as the name, never written unchecked.
        let (name, case) = (header::HOST, CaseHeaderName::from_static("X-Host"))
            .into_header_names()
            .expect("valid");
        assert_eq!((name.as_str(), case.as_slice()), ("x-host", &b"X-Host"[..]));
        let injected = (header::HOST, CaseHeaderName::from_static("Host\r\nX-Evil"));
        assert!(injected.into_header_names().is_err());
    }
}
