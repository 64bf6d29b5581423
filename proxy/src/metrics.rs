//! The proxy's Prometheus metrics, registered once and served on the admin port.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use pingora::services::listening::ConnectionLimit;

use crate::ramp::window::SideCounts;
use prometheus::{
    exponential_buckets, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Label used for requests that matched no route.
pub const NO_ROUTE: &str = "(default)";

/// Every metric the proxy exports.
pub struct Metrics {
    registry: Registry,
    /// Requests by route, backend and status class (`2xx`, `5xx`, `error` when nothing was sent).
    pub requests: IntCounterVec,
    /// Request duration from the first byte read to the last byte written, by route and backend.
    pub duration: HistogramVec,
    /// Failed connection attempts to a backend, by backend.
    pub connect_failures: IntCounterVec,
    /// Requests sent to a route's `from` because its `to` was down or refused the connection.
    pub fallbacks: IntCounterVec,
    /// Route-table reloads by trigger and result (`ok`, `unchanged`, `error`).
    pub reloads: IntCounterVec,
    /// 1 when a backend's health check passes, 0 when it is marked down.
    pub backend_up: IntGaugeVec,
    /// Shadowed requests by route and result (`match`, `mismatch`, `error`, `skipped`,
    /// `dropped`).
    pub shadow: IntCounterVec,
    /// Differences found by route and field (a JSON pointer with indices as `*`, `status`,
    /// `header:NAME`; past 20 fields per route, `other`).
    pub shadow_differences: IntCounterVec,
    /// Shadow request duration by route and the backend shadowed to.
    pub shadow_duration: HistogramVec,
    /// Ramp transitions by route, percents before and after, and kind (`advance`,
    /// `breach`, `operator_pause`, ...).
    pub ramp_transitions: IntCounterVec,
    /// The share of a ramped route's clients on `to`, in percent.
    pub route_percent: GaugeVec,
    /// 1 for the state a ramp is in (`ramping`, `paused`, `held`, `rolled_back`, `done`).
    pub ramp_state: IntGaugeVec,
    /// 1 while the shared ramp state store answers (always 1 with a state file).
    pub ramp_store_up: IntGauge,
    /// Client connections, read from the proxy service's cap when rendered.
    connections: ConnectionSeries,
}

/// The client-connection series, mirrored from the proxy service's [`ConnectionLimit`].
struct ConnectionSeries {
    limit: OnceLock<Arc<ConnectionLimit>>,
    open: IntGauge,
    max: IntGauge,
    accept_waits: IntCounter,
    /// The waits already added to `accept_waits`.
    waits_reported: AtomicU64,
}

impl ConnectionSeries {
    fn new() -> prometheus::Result<ConnectionSeries> {
        Ok(ConnectionSeries {
            limit: OnceLock::new(),
            open: IntGauge::new("ficus_client_connections", "Client connections open")?,
            max: IntGauge::new(
                "ficus_client_connections_max",
                "The most client connections open at once (proxy.max_connections)",
            )?,
            accept_waits: IntCounter::new(
                "ficus_client_connection_limit_reached_total",
                "Times accepting paused because max_connections were open",
            )?,
            waits_reported: AtomicU64::new(0),
        })
    }

    fn refresh(&self) {
        let Some(limit) = self.limit.get() else { return };
        self.open.set(i64::try_from(limit.open()).unwrap_or(i64::MAX));
        self.max.set(i64::try_from(limit.max()).unwrap_or(i64::MAX));
        // fetch_max: two renders at once add each wait once.
        let waits = limit.waits();
        let reported = self.waits_reported.fetch_max(waits, Ordering::Relaxed);
        if waits > reported {
            self.accept_waits.inc_by(waits - reported);
        }
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("ficus_requests_total", "Requests by route, backend and status class"),
            &["route", "backend", "status"],
        );
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "ficus_request_duration_seconds",
                "Request duration by route and backend",
            )
            .buckets(exponential_buckets(0.0005, 2.0, 16).unwrap_or_default()),
            &["route", "backend"],
        );
        let connect_failures = IntCounterVec::new(
            Opts::new(
                "ficus_upstream_connect_failures_total",
                "Failed upstream connection attempts",
            ),
            &["backend"],
        );
        let fallbacks = IntCounterVec::new(
            Opts::new(
                "ficus_fallbacks_total",
                "Requests sent to a route's `from` because `to` failed",
            ),
            &["route", "from", "to", "reason"],
        );
        let reloads = IntCounterVec::new(
            Opts::new("ficus_reloads_total", "Route table reloads by trigger and result"),
            &["trigger", "result"],
        );
        let backend_up = IntGaugeVec::new(
            Opts::new("ficus_backend_up", "Health-check status of a backend (1 up, 0 down)"),
            &["backend"],
        );
        let shadow = IntCounterVec::new(
            Opts::new("ficus_shadow_total", "Shadowed requests by route and result"),
            &["route", "result"],
        );
        let shadow_differences = IntCounterVec::new(
            Opts::new(
                "ficus_shadow_differences_total",
                "Differences between the legacy and the new answer, by route and field",
            ),
            &["route", "field"],
        );
        let shadow_duration = HistogramVec::new(
            HistogramOpts::new("ficus_shadow_duration_seconds", "Shadow request duration")
                .buckets(exponential_buckets(0.0005, 2.0, 16).unwrap_or_default()),
            &["route", "backend"],
        );
        let ramp_transitions = IntCounterVec::new(
            Opts::new("ficus_ramp_transitions_total", "Ramp transitions"),
            &["route", "from", "to", "reason"],
        );
        let route_percent = GaugeVec::new(
            Opts::new("ficus_route_percent", "Share of a ramped route's clients on `to`"),
            &["route"],
        );
        let ramp_state = IntGaugeVec::new(
            Opts::new("ficus_ramp_state", "The state of a ramp"),
            &["route", "state"],
        );
        let ramp_store_up =
            IntGauge::new("ficus_ramp_store_up", "1 while the ramp state store answers");
        // The names above are static and distinct, so creation and registration cannot fail.
        let metrics = Metrics {
            ramp_store_up: ramp_store_up.expect("valid metric"),
            ramp_transitions: ramp_transitions.expect("valid metric"),
            route_percent: route_percent.expect("valid metric"),
            ramp_state: ramp_state.expect("valid metric"),
            shadow: shadow.expect("valid metric"),
            shadow_differences: shadow_differences.expect("valid metric"),
            shadow_duration: shadow_duration.expect("valid metric"),
            connections: ConnectionSeries::new().expect("valid metrics"),
            requests: requests.expect("valid metric"),
            duration: duration.expect("valid metric"),
            connect_failures: connect_failures.expect("valid metric"),
            fallbacks: fallbacks.expect("valid metric"),
            reloads: reloads.expect("valid metric"),
            backend_up: backend_up.expect("valid metric"),
            registry,
        };
        for collector in [
            Box::new(metrics.requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(metrics.duration.clone()),
            Box::new(metrics.connect_failures.clone()),
            Box::new(metrics.fallbacks.clone()),
            Box::new(metrics.reloads.clone()),
            Box::new(metrics.backend_up.clone()),
            Box::new(metrics.ramp_transitions.clone()),
            Box::new(metrics.route_percent.clone()),
            Box::new(metrics.ramp_state.clone()),
            Box::new(metrics.ramp_store_up.clone()),
            Box::new(metrics.shadow.clone()),
            Box::new(metrics.shadow_differences.clone()),
            Box::new(metrics.shadow_duration.clone()),
            Box::new(metrics.connections.open.clone()),
            Box::new(metrics.connections.max.clone()),
            Box::new(metrics.connections.accept_waits.clone()),
        ] {
            metrics.registry.register(collector).expect("metric registered once");
        }
        metrics
    }

    /// Creates the series a table can produce at zero, so dashboards and alerts see them
    /// before the first event instead of a missing series.
    pub fn prime(&self, table: &ficus_routes::RouteTable) {
        for backend in &table.backends {
            self.connect_failures.with_label_values(&[&backend.name]);
        }
        for route in &table.routes {
            let (from, to) = (&table.backends[route.from].name, &table.backends[route.to].name);
            for reason in crate::state::Fallback::ALL {
                self.fallbacks.with_label_values(&[&route.name, from, to, reason.as_str()]);
            }
            if route.shadow.is_some() {
                for outcome in crate::shadow::report::Outcome::ALL {
                    self.shadow.with_label_values(&[&route.name, outcome.as_str()]);
                }
            }
        }
        for trigger in ["file", "sighup", "admin"] {
            for result in ["ok", "unchanged", "error"] {
                self.reloads.with_label_values(&[trigger, result]);
            }
        }
    }

    /// Reports the client connections of `limit` from now on.
    pub fn watch_connections(&self, limit: Arc<ConnectionLimit>) {
        // Set once, by the proxy at start.
        let _ = self.connections.limit.set(limit);
    }

    /// The metrics in Prometheus text exposition format.
    pub fn render(&self) -> Vec<u8> {
        self.connections.refresh();
        let mut out = Vec::new();
        // Encoding into a Vec only fails on invalid metric families, which we never build.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The request series of one (route, backend) pair, resolved once and then used without
/// hashing label values on every request.
pub struct PairSeries {
    /// Indexed by [`status_index`].
    pub requests: [prometheus::IntCounter; 6],
    pub duration: prometheus::Histogram,
}

impl PairSeries {
    /// The running totals: answers, failures (5xx and none), and the latency histogram.
    /// Read off the request path (the ramp ticker, the console's history): requests only add
    /// to these atomics.
    pub fn totals(&self) -> SideCounts {
        use prometheus::core::Metric;
        let answers = self.requests.iter().map(|c| c.get()).sum();
        let failures = self.requests[4].get() + self.requests[5].get();
        let histogram = self.duration.metric();
        let cumulative: Vec<u64> =
            histogram.get_histogram().get_bucket().iter().map(|b| b.cumulative_count()).collect();
        SideCounts::from_totals(answers, failures, &cumulative)
    }
}

/// Lazily resolved [`PairSeries`] of a route table: only pairs that see traffic are created,
/// so a big table does not export thousands of zero series.
pub struct SeriesCache {
    cells: Vec<std::sync::OnceLock<PairSeries>>,
    backends: usize,
    routes: usize,
}

impl SeriesCache {
    pub fn new(routes: usize, backends: usize) -> SeriesCache {
        let cells = (0..(routes + 1) * backends).map(|_| std::sync::OnceLock::new()).collect();
        SeriesCache { cells, backends, routes }
    }

    /// The series of a pair that has seen traffic, without creating it.
    pub fn existing(&self, route: usize, backend: usize) -> Option<&PairSeries> {
        self.cells.get(route * self.backends + backend)?.get()
    }

    /// The series of `route` (None: no route matched) and `backend`, named `route_name` and
    /// `backend_name` in labels.
    pub fn get(
        &self,
        metrics: &Metrics,
        route: Option<usize>,
        backend: usize,
        route_name: &str,
        backend_name: &str,
    ) -> &PairSeries {
        let slot = route.unwrap_or(self.routes) * self.backends + backend;
        self.cells[slot].get_or_init(|| PairSeries {
            requests: STATUS_CLASSES.map(|class| {
                metrics.requests.with_label_values(&[route_name, backend_name, class])
            }),
            duration: metrics.duration.with_label_values(&[route_name, backend_name]),
        })
    }
}

const STATUS_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "error"];

/// The index of a status class in [`PairSeries::requests`].
pub fn status_index(status: Option<u16>) -> usize {
    match status {
        Some(100..=599) => usize::from(status.unwrap_or(0) / 100 - 1),
        _ => 5,
    }
}

/// `2xx`, `4xx`... for a status code; `error` when no response was sent.
pub fn status_class(status: Option<u16>) -> &'static str {
    match status {
        Some(100..=199) => "1xx",
        Some(200..=299) => "2xx",
        Some(300..=399) => "3xx",
        Some(400..=499) => "4xx",
        Some(500..=599) => "5xx",
        _ => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_indexes_match_the_classes() {
        for status in [Some(101), Some(204), Some(302), Some(404), Some(503), None] {
            assert_eq!(STATUS_CLASSES[status_index(status)], status_class(status));
        }
    }

    #[test]
    fn status_classes() {
        assert_eq!(status_class(Some(204)), "2xx");
        assert_eq!(status_class(Some(502)), "5xx");
        assert_eq!(status_class(Some(101)), "1xx");
        assert_eq!(status_class(None), "error");
    }

    #[test]
    fn primed_series_are_exported_at_zero() {
        let table = ficus_routes::RouteTable::parse(
            "[backends.a]\nurl = \"http://127.0.0.1:1\"\n[backends.b]\nurl = \"http://127.0.0.1:2\"\n\
             [defaults]\nbackend = \"a\"\n[[routes]]\nname = \"r\"\nmatch = {}\nto = \"b\"\npercent = 1\n",
            ficus_routes::Format::Toml,
            "t.toml",
        )
        .expect("valid table");
        let metrics = Metrics::new();
        metrics.prime(&table);
        let text = String::from_utf8(metrics.render()).expect("utf8");
        assert!(text.contains(r#"ficus_upstream_connect_failures_total{backend="b"} 0"#), "{text}");
        assert!(text
            .contains(r#"ficus_fallbacks_total{from="a",reason="unhealthy",route="r",to="b"} 0"#));
        assert!(text.contains(r#"ficus_reloads_total{result="error",trigger="sighup"} 0"#));
    }
}
