//! Requests ficus refuses (400) before routing them: a request target that is neither
//! origin-form (`/path`), absolute-form (`http://host/path`) nor `OPTIONS *`, an HTTP/1.1
//! request without a usable Host (RFC 9112, section 3.2), and body framing that ficus and the
//! backend could read differently (a Content-Length list, a transfer coding besides chunked).

use http::{Method, Version};

/// Why a request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `GET admin/users`, `GET *`: a target ficus would route as one path and forward as another.
    TargetForm,
    /// HTTP/1.1 without a Host header.
    MissingHost,
    /// A Host header with nothing in it.
    EmptyHost,
    /// `Content-Length: 5, 5`: a list, which the backend may read otherwise.
    ContentLengthList,
    /// `Transfer-Encoding: gzip, chunked`: a coding ficus would not pass on.
    TransferCoding,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::TargetForm => "request target is not origin-form, absolute-form or OPTIONS *",
            Refusal::MissingHost => "HTTP/1.1 request without Host",
            Refusal::EmptyHost => "empty Host",
            Refusal::ContentLengthList => "Content-Length is a list",
            Refusal::TransferCoding => "Transfer-Encoding other than chunked",
        }
    }
}

/// Whether a `101 Switching Protocols` may be relayed: only when the protocol the backend
/// switches to is one the client asked for. Otherwise the connection would become a tunnel
/// the route table never routes again (a DELETE could follow a GET-only route).
pub fn upgrade_accepted(requested: Option<&[u8]>, switched_to: Option<&[u8]>) -> bool {
    let (Some(requested), Some(switched_to)) = (requested, switched_to) else { return false };
    let protocol = |token: &[u8]| {
        token.split(|&b| b == b'/').next().unwrap_or_default().trim_ascii().to_ascii_lowercase()
    };
    let switched = protocol(switched_to);
    !switched.is_empty() && requested.split(|&b| b == b',').any(|offer| protocol(offer) == switched)
}

/// Checks a request's body framing headers: each Content-Length one number, and no
/// Transfer-Encoding but `chunked`.
pub fn check_framing<'a>(
    content_lengths: impl Iterator<Item = &'a [u8]>,
    transfer_encodings: impl Iterator<Item = &'a [u8]>,
) -> Result<(), Refusal> {
    for value in content_lengths {
        if value.contains(&b',') {
            return Err(Refusal::ContentLengthList);
        }
    }
    for value in transfer_encodings {
        if !value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
            return Err(Refusal::TransferCoding);
        }
    }
    Ok(())
}

/// Checks a request's target (as received) and Host header.
pub fn check(
    method: &Method,
    version: Version,
    raw_target: &[u8],
    host: Option<&[u8]>,
) -> Result<(), Refusal> {
    let target_ok = match raw_target {
        [b'/', ..] => true,
        b"*" => method == Method::OPTIONS,
        _ => is_absolute_form(raw_target),
    };
    if !target_ok {
        return Err(Refusal::TargetForm);
    }
    match host {
        Some(host) if host.iter().all(u8::is_ascii_whitespace) => Err(Refusal::EmptyHost),
        None if version == Version::HTTP_11 => Err(Refusal::MissingHost),
        _ => Ok(()),
    }
}

/// `http://...` or `https://...`, in any case.
fn is_absolute_form(target: &[u8]) -> bool {
    let starts =
        |prefix: &[u8]| target.get(..prefix.len()).is_some_and(|t| t.eq_ignore_ascii_case(prefix));
    starts(b"http://") || starts(b"https://")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http11(method: Method, target: &str, host: Option<&str>) -> Result<(), Refusal> {
        check(&method, Version::HTTP_11, target.as_bytes(), host.map(str::as_bytes))
    }

    #[test]
    fn origin_and_absolute_form_and_options_star_pass() {
        assert_eq!(http11(Method::GET, "/api/orders?x=1", Some("shop")), Ok(()));
        assert_eq!(http11(Method::GET, "http://shop/api", Some("shop")), Ok(()));
        assert_eq!(http11(Method::GET, "HTTPS://shop/api", Some("shop")), Ok(()));
        assert_eq!(http11(Method::OPTIONS, "*", Some("shop")), Ok(()));
    }

    #[test]
    fn other_targets_are_refused() {
        assert_eq!(http11(Method::GET, "admin/users", Some("shop")), Err(Refusal::TargetForm));
        assert_eq!(http11(Method::GET, "*", Some("shop")), Err(Refusal::TargetForm));
        assert_eq!(http11(Method::GET, "shop:80", Some("shop")), Err(Refusal::TargetForm));
    }

    #[test]
    fn only_an_upgrade_the_client_asked_for_is_relayed() {
        let accepted = |requested: Option<&str>, switched: Option<&str>| {
            upgrade_accepted(requested.map(str::as_bytes), switched.map(str::as_bytes))
        };
        assert!(accepted(Some("websocket"), Some("WebSocket")));
        assert!(accepted(Some("h2c, websocket"), Some("websocket")));
        assert!(accepted(Some("foo/2"), Some("foo/1")), "the protocol, whatever its version");
        assert!(!accepted(Some("websocket"), Some("h2c")));
        assert!(!accepted(None, Some("websocket")));
        assert!(!accepted(Some("websocket"), None));
    }

    #[test]
    fn framing_is_one_length_or_plain_chunked() {
        let framing = |lengths: &[&str], codings: &[&str]| {
            check_framing(
                lengths.iter().map(|v| v.as_bytes()),
                codings.iter().map(|v| v.as_bytes()),
            )
        };
        assert_eq!(framing(&["5"], &[]), Ok(()));
        assert_eq!(framing(&[], &["chunked"]), Ok(()));
        assert_eq!(framing(&[], &[" Chunked "]), Ok(()));
        assert_eq!(framing(&["5, 5"], &[]), Err(Refusal::ContentLengthList));
        assert_eq!(framing(&[], &["gzip, chunked"]), Err(Refusal::TransferCoding));
        assert_eq!(framing(&[], &["gzip", "chunked"]), Err(Refusal::TransferCoding));
    }

    #[test]
    fn http_1_1_needs_a_host_and_no_host_may_be_empty() {
        assert_eq!(http11(Method::GET, "/", None), Err(Refusal::MissingHost));
        assert_eq!(http11(Method::GET, "/", Some("")), Err(Refusal::EmptyHost));
        assert_eq!(http11(Method::GET, "/", Some("  ")), Err(Refusal::EmptyHost));
        assert_eq!(check(&Method::GET, Version::HTTP_10, b"/", None), Ok(()));
        assert_eq!(check(&Method::GET, Version::HTTP_2, b"/", None), Ok(()));
    }
}
