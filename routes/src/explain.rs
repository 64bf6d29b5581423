//! `ficus routes explain`: which route a request matches, how its client is bucketed, and why
//! it goes where it goes, in words an operator can check against the route file.

use std::fmt::Write;

use crate::request::RequestView;
use crate::table::{Entropy, KeySource, Reason, RouteTable};

/// Entropy for explaining: a recognisable placeholder id, and bucket 0 (never shown).
struct Placeholder;

impl Entropy for Placeholder {
    fn new_client_id(&mut self) -> String {
        "(new id)".to_string()
    }

    fn random_bucket(&mut self) -> u16 {
        0
    }
}

/// Whether a `method` request of `route` is shadowed, and where to.
fn shadow_summary(table: &RouteTable, route: &crate::Route, method: &str) -> String {
    let Some(shadow) = &route.shadow else { return "off".to_string() };
    let (to, from) = (&table.backends[route.to].name, &table.backends[route.from].name);
    if !shadow.methods.iter().any(|m| m == method) {
        return format!("not for {method} (shadow.methods: {})", shadow.methods.join(", "));
    }
    format!(
        "{:.2}% of {method} requests are also sent to the backend not serving them (\"{to}\" when \"{from}\" serves, \"{from}\" when \"{to}\" does) and the answers compared",
        f64::from(shadow.threshold) / 100.0
    )
}

/// Describes the routing of `req` through `table`, one `label: text` line each.
pub fn explain(table: &RouteTable, req: &impl RequestView) -> String {
    let decision = table.decide(req, &mut Placeholder);
    let backend = &table.backends[decision.backend];
    let mut out = String::new();
    let target = match req.query() {
        Some(query) => format!("{}?{query}", req.path()),
        None => req.path().to_string(),
    };
    // Writing to a String cannot fail.
    let _ = writeln!(out, "request: {} {target}", req.method());
    let Some((index, route)) = decision.route else {
        let default = &backend.name;
        let _ = writeln!(out, "route:   none of the {} routes matches", table.routes.len());
        let _ = writeln!(out, "backend: {default} ({})", backend.url);
        let _ = writeln!(out, "why:     unmatched requests go to defaults.backend \"{default}\"");
        return out;
    };
    let to = &table.backends[route.to].name;
    let from = &table.backends[route.from].name;
    let _ =
        writeln!(out, "route:   {} (routes[{index}]: {})", route.name, route.matcher.describe());
    let _ = writeln!(
        out,
        "split:   {:.2}% of clients to \"{to}\", the rest stay on \"{from}\"",
        route.percent()
    );
    let _ = writeln!(out, "shadow:  {}", shadow_summary(table, route, req.method()));
    let why = match &decision.reason {
        Reason::NoRoute => "no route matched".to_string(),
        Reason::Override => {
            let header = table.override_header.as_deref().unwrap_or_default();
            format!("the {header} header names \"{}\"", backend.name)
        }
        Reason::Split { key, bucket } => match key.source {
            KeySource::Random => {
                let _ = writeln!(out, "sticky:  none (each request is bucketed at random)");
                format!(
                    "not sticky: each request goes to \"{to}\" with probability {:.2}%",
                    route.percent()
                )
            }
            KeySource::Minted => {
                let _ = writeln!(
                    out,
                    "sticky:  {} is absent, and so is cookie {}",
                    route.sticky, table.client_id_cookie
                );
                let _ = writeln!(
                    out,
                    "backend: \"{to}\" for {:.2}% of such clients, else \"{from}\"",
                    route.percent()
                );
                let _ = writeln!(
                    out,
                    "why:     a new client gets a random id in cookie {}, which buckets it from then on",
                    table.client_id_cookie
                );
                return out;
            }
            KeySource::Sticky | KeySource::ClientIdCookie => {
                let source = if key.source == KeySource::Sticky {
                    route.sticky.to_string()
                } else {
                    format!(
                        "cookie:{} (fallback: {} is absent)",
                        table.client_id_cookie, route.sticky
                    )
                };
                let _ = writeln!(out, "sticky:  {source} = \"{}\"", key.value);
                let _ = writeln!(
                    out,
                    "bucket:  {bucket} of 10000 (buckets below {} go to \"{to}\")",
                    route.threshold
                );
                if *bucket < route.threshold {
                    format!(
                        "bucket {bucket} < {}: this client is in the {:.2}% moved to \"{to}\"",
                        route.threshold,
                        route.percent()
                    )
                } else {
                    format!(
                        "bucket {bucket} >= {}: this client stays on \"{from}\"",
                        route.threshold
                    )
                }
            }
        },
    };
    let path = table.upstream_path(Some(index), decision.backend, req.path(), req.query());
    let _ = writeln!(out, "backend: {} (forwarded as {path})", backend.name);
    let _ = writeln!(out, "why:     {why}");
    out
}
