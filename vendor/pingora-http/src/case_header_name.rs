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
