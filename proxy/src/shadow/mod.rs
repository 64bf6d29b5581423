//! Shadow traffic: a share of a route's requests is also sent to the backend that did not
//! serve it, once the client has its answer, and the two answers are compared.
//!
//! [`compare`] and [`report`] are pure; [`send`] is the I/O. This module owns the per-route
//! state (the in-flight cap, the report) and the capture of one request's bodies.

pub mod compare;
pub mod report;
pub mod send;

use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use ficus_routes::shadow::Shadow;
use ficus_routes::Route;
use pingora::connectors::http::Connector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::upstreams::peer::HttpPeer;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use self::compare::Answer;
use self::report::{Mismatch, Outcome, OutcomeCounts, Report};
use self::send::Fetched;
use crate::metrics::Metrics;

/// The shadow state of one route, kept across reloads while the route is unchanged.
pub struct RouteShadow {
    pub route: String,
    pub policy: Shadow,
    fingerprint: u64,
    slots: Arc<Semaphore>,
    /// Taken by requests (a dropped or skipped shadow): atomics, no lock.
    pub outcomes: OutcomeCounts,
    /// `ficus_shadow_requests_total` of this route, by `Outcome as usize`.
    series: [prometheus::IntCounter; 5],
    /// Taken only by comparisons and readers, never by requests.
    pub report: Mutex<Report>,
}

impl RouteShadow {
    /// The state for `route`: `previous` (of the table before a reload) when the route is
    /// unchanged, else new.
    pub fn for_route<'a>(
        route: &Route,
        mut previous: impl Iterator<Item = &'a Arc<RouteShadow>>,
        metrics: &Metrics,
    ) -> Option<Arc<RouteShadow>> {
        let policy = route.shadow.as_ref()?;
        let same = |old: &&Arc<RouteShadow>| {
            old.route == route.name && old.fingerprint == route.fingerprint
        };
        Some(previous.find(same).cloned().unwrap_or_else(|| {
            Arc::new(RouteShadow {
                route: route.name.clone(),
                policy: policy.clone(),
                fingerprint: route.fingerprint,
                slots: Arc::new(Semaphore::new(policy.max_in_flight)),
                outcomes: OutcomeCounts::default(),
                series: Outcome::ALL
                    .map(|o| metrics.shadow.with_label_values(&[&route.name, o.as_str()])),
                report: Mutex::new(Report::default()),
            })
        }))
    }

    /// Starts capturing a request for the shadow, if one of the route's slots is free (else
    /// the request is counted as dropped).
    pub fn capture(self: &Arc<Self>) -> Option<Capture> {
        match self.slots.clone().try_acquire_owned() {
            Ok(slot) => Some(Capture::new(self.clone(), slot)),
            Err(_) => {
                self.record(Outcome::Dropped);
                None
            }
        }
    }

    fn record(&self, outcome: Outcome) {
        self.outcomes.add(outcome);
        self.series[outcome as usize].inc();
    }
}

/// A body kept up to a limit; past it, only the fact that it was too large.
struct Tee {
    chunks: BytesMut,
    limit: usize,
    overflow: bool,
}

impl Tee {
    fn new(limit: usize) -> Tee {
        Tee { chunks: BytesMut::new(), limit, overflow: false }
    }

    fn push(&mut self, chunk: &[u8]) {
        if self.overflow {
            return;
        }
        if self.chunks.len() + chunk.len() > self.limit {
            self.overflow = true;
            self.chunks = BytesMut::new();
        } else {
            self.chunks.extend_from_slice(chunk);
        }
    }

    fn take(self) -> Option<Bytes> {
        (!self.overflow).then(|| self.chunks.freeze())
    }
}

/// One request's capture: its body and the primary's answer, each up to `max_body`. Holds
/// one of the route's in-flight slots until the comparison is done.
pub struct Capture {
    route: Arc<RouteShadow>,
    _slot: OwnedSemaphorePermit,
    request_body: Tee,
    response: Option<(u16, http::HeaderMap)>,
    response_body: Tee,
    /// The exchange became a tunnel (WebSocket) or an event stream (SSE): replaying it would
    /// open a stream on the other backend that lasts until the shadow timeout.
    streamed: bool,
}

impl Capture {
    fn new(route: Arc<RouteShadow>, slot: OwnedSemaphorePermit) -> Capture {
        let limit = route.policy.max_body;
        Capture {
            route,
            _slot: slot,
            request_body: Tee::new(limit),
            response: None,
            response_body: Tee::new(limit),
            streamed: false,
        }
    }

    pub fn request_chunk(&mut self, chunk: &[u8]) {
        self.request_body.push(chunk);
    }

    pub fn response_header(&mut self, response: &ResponseHeader) {
        let event_stream = response
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("text/event-stream"));
        self.streamed |= event_stream || response.status == http::StatusCode::SWITCHING_PROTOCOLS;
        self.response = Some((response.status.as_u16(), response.headers.clone()));
    }

    pub fn response_chunk(&mut self, chunk: &[u8]) {
        self.response_body.push(chunk);
    }

    /// Gives up on a request whose primary exchange failed: nothing to compare it with.
    pub fn skip(self) {
        self.route.record(Outcome::Skipped);
    }
}

/// One side of a route as a shadow exchange needs it.
pub struct Side {
    pub name: String,
    pub peer: HttpPeer,
    /// The client's request as it would be forwarded to this side, marked as a shadow.
    pub request: RequestHeader,
}

/// A completed primary exchange, ready to be shadowed.
pub struct Job {
    pub capture: Capture,
    pub method: String,
    /// Without the query string.
    pub path: String,
    pub from: Side,
    pub to: Side,
    /// Whether `to` served the client.
    pub served_by_to: bool,
}

/// Runs the shadow exchange of `job` and records its outcome. Called after the client has
/// its answer; never fails.
pub async fn run(job: Job, connector: &Connector, metrics: &Metrics) {
    let route = job.capture.route.clone();
    let policy = &route.policy;
    let capture = job.capture;
    let (Some((status, headers)), Some(request_body), Some(body), false) = (
        capture.response,
        capture.request_body.take(),
        capture.response_body.take(),
        capture.streamed,
    ) else {
        return route.record(Outcome::Skipped);
    };
    let primary = Answer { status, headers, body };
    let (shadow, legacy) =
        if job.served_by_to { (&job.from, &job.from) } else { (&job.to, &job.from) };
    let started = Instant::now();
    let answer = send::fetch(
        connector,
        &shadow.peer,
        shadow.request.clone(),
        request_body.clone(),
        policy.max_body,
        policy.timeout,
    )
    .await;
    metrics
        .shadow_duration
        .with_label_values(&[&route.route, &shadow.name])
        .observe(started.elapsed().as_secs_f64());
    let answer = match answer {
        Ok(Fetched::Answer(answer)) => answer,
        Ok(Fetched::TooLarge) => return route.record(Outcome::Skipped),
        Err(error) => {
            tracing::debug!(route = route.route, backend = shadow.name, %error, "shadow request failed");
            return route.record(Outcome::Error);
        }
    };
    let (from_answer, to_answer) =
        if job.served_by_to { (&answer, &primary) } else { (&primary, &answer) };
    // Noise: what differs between two answers of the legacy side to the same request. Only
    // for safe methods: an unsafe one is not sent to the legacy side a third time.
    if policy.noise && matches!(job.method.as_str(), "GET" | "HEAD" | "OPTIONS") {
        let again = send::fetch(
            connector,
            &legacy.peer,
            legacy.request.clone(),
            request_body,
            policy.max_body,
            policy.timeout,
        )
        .await;
        if let Ok(Fetched::Answer(again)) = again {
            let noise = compare::compare(from_answer, &again, policy);
            if let Ok(mut report) = route.report.lock() {
                report.learn_noise(&noise);
            }
        }
    }
    let differences = compare::compare(from_answer, to_answer, policy);
    let Ok(mut report) = route.report.lock() else { return };
    let differences = report.without_noise(differences);
    if differences.is_empty() {
        drop(report);
        return route.record(Outcome::Match);
    }
    let labels = report.mismatch(Mismatch {
        at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        method: job.method,
        path: job.path,
        from_status: from_answer.status,
        to_status: to_answer.status,
        differences,
    });
    drop(report);
    route.record(Outcome::Mismatch);
    for field in labels {
        metrics.shadow_differences.with_label_values(&[&route.route, &field]).inc();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn requests_never_wait_for_a_reader_of_the_report() {
        let table = ficus_routes::RouteTable::parse(
            "[backends.a]\nurl = \"http://127.0.0.1:1\"\n[backends.b]\nurl = \"http://127.0.0.1:2\"\n\
             [defaults]\nbackend = \"a\"\n[[routes]]\nname = \"r\"\nmatch = {}\nto = \"b\"\n\
             percent = 1\n[routes.shadow]\nmax_in_flight = 1\n",
            ficus_routes::Format::Toml,
            "t.toml",
        )
        .expect("valid table");
        let metrics = Metrics::new();
        let shadow =
            RouteShadow::for_route(&table.routes[0], std::iter::empty(), &metrics).expect("shadow");
        let _in_flight = shadow.capture().expect("the one slot");
        // The console (or /shadow) reading the report holds its lock...
        let reading = shadow.report.lock().expect("report");
        // ...while a request finds every slot taken and counts a dropped shadow.
        let (done, finished) = mpsc::channel();
        let request = shadow.clone();
        std::thread::spawn(move || {
            let captured = request.capture().is_some();
            let _ = done.send(captured);
        });
        let captured = finished.recv_timeout(Duration::from_secs(5));
        assert_eq!(captured, Ok(false), "the request waited for the report's lock");
        drop(reading);
        assert_eq!(shadow.outcomes.get()[Outcome::Dropped as usize], 1);
        let text = String::from_utf8(metrics.render()).expect("utf8");
        assert!(text.contains(r#"ficus_shadow_total{result="dropped",route="r"} 1"#), "{text}");
    }
}
