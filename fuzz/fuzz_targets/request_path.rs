//! Request-path normalisation on any path: never a panic, and a normal result that is
//! absolute, has no empty, `.` or `..` segment, and normalises to itself.
#![no_main]

use ficus_routes::path::normalize;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else { return };
    let Ok(normal) = normalize(path) else { return };
    assert!(normal.starts_with('/'), "{path:?} -> {normal:?}");
    let inner = normal.trim_start_matches('/');
    let inner = inner.strip_suffix('/').unwrap_or(inner);
    if !inner.is_empty() {
        for segment in inner.split('/') {
            assert!(!segment.is_empty() && segment != "." && segment != "..", "{path:?} -> {normal:?}");
        }
    }
    assert_eq!(normalize(&normal).as_deref(), Ok(normal.as_ref()), "not idempotent: {path:?}");
});
