//! Requests ficus refuses (400) before routing them, because the route table cannot say what
//! they are for: a request target that is neither origin-form (`/path`), absolute-form
//! (`http://host/path`) nor `OPTIONS *`, and an HTTP/1.1 request without a usable Host
//! (RFC 9112, section 3.2).

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
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::TargetForm => "request target is not origin-form, absolute-form or OPTIONS *",
            Refusal::MissingHost => "HTTP/1.1 request without Host",
            Refusal::EmptyHost => "empty Host",
        }
    }
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
    fn http_1_1_needs_a_host_and_no_host_may_be_empty() {
        assert_eq!(http11(Method::GET, "/", None), Err(Refusal::MissingHost));
        assert_eq!(http11(Method::GET, "/", Some("")), Err(Refusal::EmptyHost));
        assert_eq!(http11(Method::GET, "/", Some("  ")), Err(Refusal::EmptyHost));
        assert_eq!(check(&Method::GET, Version::HTTP_10, b"/", None), Ok(()));
        assert_eq!(check(&Method::GET, Version::HTTP_2, b"/", None), Ok(()));
    }
}
