//! The pipeline's Prometheus metrics and the `/metrics` + `/healthz` endpoint.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::net::TcpListener;

/// Every metric of `ficus cdc`.
pub struct Metrics {
    registry: Registry,
    /// Events handed to Kafka, by table and op (c, u, d, r, t).
    pub events: IntCounterVec,
    /// Rows copied so far by the snapshot, by table.
    pub snapshot_rows: IntGaugeVec,
    /// PostgreSQL's estimate of each table's rows when its snapshot started.
    pub snapshot_estimate: IntGaugeVec,
    /// The last LSN confirmed to PostgreSQL (everything before it is on Kafka).
    pub confirmed_lsn: IntGauge,
    /// The last LSN received from PostgreSQL.
    pub received_lsn: IntGauge,
    /// Records handed to Kafka and not yet acknowledged.
    pub in_flight: IntGauge,
    /// Reconnections after a retryable error.
    pub restarts: IntCounter,
    /// 1 while reading is paused because Kafka does not keep up or is unreachable.
    pub backpressure: IntGauge,
    /// True while connected and snapshotting or streaming.
    pub healthy: AtomicBool,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let registry = Registry::new();
        // Static, distinct names: creation and registration cannot fail.
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(metric.clone())).expect("registered once");
            metric
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(metric.clone())).expect("registered once");
            metric
        };
        let gauge = |name: &str, help: &str| {
            let metric = IntGauge::new(name, help).expect("valid metric");
            registry.register(Box::new(metric.clone())).expect("registered once");
            metric
        };
        let restarts =
            IntCounter::new("ficus_cdc_restarts_total", "Reconnections after a retryable error")
                .expect("valid metric");
        registry.register(Box::new(restarts.clone())).expect("registered once");
        Arc::new(Metrics {
            events: counter_vec(
                "ficus_cdc_events_total",
                "Change events produced, by table and op",
                &["table", "op"],
            ),
            snapshot_rows: gauge_vec(
                "ficus_cdc_snapshot_rows",
                "Rows copied by the snapshot, by table",
                &["table"],
            ),
            snapshot_estimate: gauge_vec(
                "ficus_cdc_snapshot_rows_estimate",
                "PostgreSQL's row estimate of each snapshotted table",
                &["table"],
            ),
            confirmed_lsn: gauge("ficus_cdc_confirmed_lsn", "Last LSN confirmed to PostgreSQL"),
            received_lsn: gauge("ficus_cdc_received_lsn", "Last LSN received from PostgreSQL"),
            in_flight: gauge(
                "ficus_cdc_in_flight_records",
                "Records awaiting a Kafka acknowledgement",
            ),
            backpressure: gauge("ficus_cdc_backpressure", "1 while reading waits for Kafka"),
            restarts,
            healthy: AtomicBool::new(false),
            registry,
        })
    }

    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

/// Serves `/metrics` and `/healthz` (200 while connected, 503 otherwise) until the task is
/// dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move {
                    let (status, body) = match req.uri().path() {
                        "/metrics" => (StatusCode::OK, metrics.render()),
                        "/healthz" if metrics.healthy.load(Ordering::Relaxed) => {
                            (StatusCode::OK, b"ok\n".to_vec())
                        }
                        "/healthz" => {
                            (StatusCode::SERVICE_UNAVAILABLE, b"not connected\n".to_vec())
                        }
                        _ => (
                            StatusCode::NOT_FOUND,
                            b"not found: try /metrics or /healthz\n".to_vec(),
                        ),
                    };
                    let mut response = Response::new(Full::new(Bytes::from(body)));
                    *response.status_mut() = status;
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
