//! The cutover console: a web page on the admin listener that shows each route's move from
//! `from` to `to` live, and the history it charts. The page is static (HTML, CSS and
//! JavaScript compiled into the binary); it reads the admin API's JSON like the CLI does.

mod history;

pub use history::{BackendPoint, History, HistorySampler, Point, RouteHistory, Totals};
pub use history::{INTERVAL, KEEP, MAX_ROUTES};

/// One file of the console page, compiled into the binary.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    pub content_type: &'static str,
    pub body: &'static str,
}

/// The console's file served at `path`, if there is one.
pub fn asset(path: &str) -> Option<Asset> {
    let (content_type, body) = match path {
        "/" => ("text/html; charset=utf-8", include_str!("page/index.html")),
        "/console.js" => ("text/javascript; charset=utf-8", include_str!("page/console.js")),
        "/console.css" => ("text/css; charset=utf-8", include_str!("page/console.css")),
        _ => return None,
    };
    Some(Asset { content_type, body })
}

/// Headers the console's files are served with (besides `nosniff`, which every admin answer
/// has). The page loads nothing from anywhere else and may not be framed (its buttons must not
/// be clickjacked); its address never leaks as a referrer; a new binary's page is fetched
/// again rather than taken from a cache.
pub const HEADERS: [(&str, &str); 4] = [
    (
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
         img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    ("cache-control", "no-cache"),
];
