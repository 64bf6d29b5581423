//! Request-path normalisation, as NGINX and Envoy do it before routing: percent-encoded
//! unreserved characters decoded, `.` and `..` segments resolved, repeated slashes merged.
//! Routing and forwarding both use the result, so `/api/orders/../../admin` can neither slip
//! past a route nor climb out of a backend's path prefix.

use std::borrow::Cow;

/// Why a path is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path climbs above the root with `..`")]
    AboveRoot,
    #[error("the path does not start with `/`")]
    NotAbsolute,
    /// A `%` not followed by two hex digits (RFC 3986): decoding around it could make a new
    /// escape appear, so no two readers would agree on the path.
    #[error("the path has a `%` that is not followed by two hex digits")]
    BadEscape,
}

/// The normalised form of `path` (without its query); borrowed when already normal, which is
/// the common case and costs no allocation.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if !needs_work(path) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path)?;
    let mut segments: Vec<&str> = Vec::new();
    let parts: Vec<&str> = decoded.split('/').skip(1).collect();
    for (i, segment) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        match *segment {
            // `//` merges; a trailing `/` stays (as an empty last segment).
            "" if !last => {}
            "." => {
                if last {
                    segments.push("");
                }
            }
            ".." => {
                if segments.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
                if last {
                    segments.push("");
                }
            }
            other => segments.push(other),
        }
    }
    let mut normal = String::with_capacity(decoded.len());
    for segment in &segments {
        normal.push('/');
        normal.push_str(segment);
    }
    if normal.is_empty() {
        normal.push('/');
    }
    Ok(Cow::Owned(normal))
}

/// Whether the path has anything to normalise: a `%`, `//`, or a `.` or `..` segment.
fn needs_work(path: &str) -> bool {
    let bytes = path.as_bytes();
    bytes.contains(&b'%')
        || bytes.windows(2).any(|w| w == b"//")
        || path.split('/').any(|s| s == "." || s == "..")
}

/// Decodes `%XX` where it stands for an unreserved character (letters, digits, `-._~`);
/// every other escape (`%2F`, `%20`, ...) is kept, with its hex digits in upper case.
fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let mut out = String::with_capacity(path.len());
    let mut rest = path;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let hex = rest.get(at + 1..at + 3).ok_or(PathError::BadEscape)?;
        let byte = u8::from_str_radix(hex, 16).map_err(|_| PathError::BadEscape)?;
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(PathError::BadEscape); // from_str_radix takes a sign, too
        }
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push('%');
            out.push_str(&hex.to_ascii_uppercase());
        }
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(path: &str) -> Result<String, PathError> {
        normalize(path).map(Cow::into_owned)
    }

    #[test]
    fn normal_paths_are_borrowed_unchanged() {
        for path in ["/", "/api/orders/7", "/a/b/", "/a.b/c..d/.e"] {
            assert!(matches!(normalize(path), Ok(Cow::Borrowed(p)) if p == path), "{path}");
        }
    }

    #[test]
    fn dot_segments_are_resolved_and_slashes_merged() {
        assert_eq!(norm("/api/orders/../admin"), Ok("/api/admin".into()));
        assert_eq!(norm("/api/./orders/"), Ok("/api/orders/".into()));
        assert_eq!(norm("/api/orders/.."), Ok("/api/".into()));
        assert_eq!(norm("/api/orders/."), Ok("/api/orders/".into()));
        assert_eq!(norm("//api///orders"), Ok("/api/orders".into()));
        assert_eq!(norm("/a/b/../../"), Ok("/".into()));
        assert_eq!(norm("/.."), Err(PathError::AboveRoot));
        assert_eq!(norm("/api/orders/../../../admin"), Err(PathError::AboveRoot));
        assert_eq!(norm("api"), Err(PathError::NotAbsolute));
    }

    #[test]
    fn unreserved_escapes_are_decoded_and_others_kept() {
        assert_eq!(norm("/%61pi/%7Euser"), Ok("/api/~user".into()));
        assert_eq!(norm("/api/%2e%2e/admin"), Ok("/admin".into()), "encoded dots are dots");
        assert_eq!(norm("/api/%2E%2e/%2e%2E/x"), Err(PathError::AboveRoot));
        assert_eq!(norm("/a%2fb/%20c"), Ok("/a%2Fb/%20c".into()), "an encoded slash is no slash");
        assert_eq!(norm("/caf%C3%A9/x"), Ok("/caf%C3%A9/x".into()));
        for bad in ["/%zz", "/a%", "/a%4", "/%+1", "//E%%32e/"] {
            assert_eq!(norm(bad), Err(PathError::BadEscape), "{bad}");
        }
        assert_eq!(norm("/héllo//x"), Ok("/héllo/x".into()));
        // Found by fuzzing: a multi-byte character right after an escape.
        assert_eq!(norm("/caf%9Cܼ51c9"), Ok("/caf%9Cܼ51c9".into()));
        assert_eq!(norm("/%41é/x"), Ok("/Aé/x".into()));
    }
}
