//! The pipeline's Prometheus metrics and the `/metrics` + `/healthz` endpoint.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
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
    /// From a transaction's commit on PostgreSQL to the acknowledgement of its last event.
    pub commit_to_ack: Histogram,
    /// True while connected and snapshotting or streaming.
    pub healthy: AtomicBool,
    /// WAL the server keeps for the slot.
    pub slot_retained_wal: IntGauge,
    /// WAL written since the slot's confirmed position.
    pub slot_lag: IntGauge,
    /// WAL that can still be written before the slot is in danger (-1: no limit).
    pub slot_safe_wal: IntGauge,
    /// 1 for the slot's `wal_status`.
    pub slot_wal_status: IntGaugeVec,
    /// 1 while waiting as a standby for another reader of the slot to stop.
    pub standby: IntGauge,
    /// Tables whose incremental snapshot is running or waiting.
    pub incremental_tables: IntGauge,
    /// Rows an incremental snapshot has sent, by table (rows the stream changed while their
    /// chunk was read are left to the stream and not counted).
    pub incremental_rows: IntCounterVec,
    /// Chunks read again because a transaction's commit was not yet visible to them.
    pub incremental_rereads: IntCounter,
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
        let incremental_rereads = IntCounter::new(
            "ficus_cdc_incremental_snapshot_rereads_total",
            "Incremental snapshot chunks read again: a commit was not yet visible to them",
        )
        .expect("valid metric");
        registry.register(Box::new(incremental_rereads.clone())).expect("registered once");
        let commit_to_ack = Histogram::with_opts(
            HistogramOpts::new(
                "ficus_cdc_commit_to_ack_seconds",
                "From a transaction's commit on PostgreSQL to Kafka's acknowledgement of its \
                 last event (the sink's flush with --stdout)",
            )
            .buckets(COMMIT_TO_ACK_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        registry.register(Box::new(commit_to_ack.clone())).expect("registered once");
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
            commit_to_ack,
            healthy: AtomicBool::new(false),
            slot_retained_wal: gauge(
                "ficus_cdc_slot_retained_wal_bytes",
                "WAL the server keeps for the replication slot",
            ),
            slot_lag: gauge(
                "ficus_cdc_slot_lag_bytes",
                "WAL written since the replication slot's confirmed position",
            ),
            slot_safe_wal: gauge(
                "ficus_cdc_slot_safe_wal_bytes",
                "WAL that can be written before the slot nears max_slot_wal_keep_size (-1: no limit)",
            ),
            standby: gauge(
                "ficus_cdc_standby",
                "1 while waiting as a standby for the slot's active reader to stop",
            ),
            slot_wal_status: gauge_vec(
                "ficus_cdc_slot_wal_status",
                "1 for the replication slot's wal_status (reserved, extended, unreserved, lost)",
                &["status"],
            ),
            incremental_tables: gauge(
                "ficus_cdc_incremental_snapshot_tables",
                "Tables whose incremental snapshot is running or waiting",
            ),
            incremental_rows: counter_vec(
                "ficus_cdc_incremental_snapshot_rows_total",
                "Rows sent by incremental snapshots, by table",
                &["table"],
            ),
            incremental_rereads,
            registry,
        })
    }

    /// Records that a transaction committed at `commit_time_us` is fully acknowledged at
    /// `now_us` (both microseconds since the Unix epoch; PostgreSQL's clock and ours).
    pub fn observe_commit_acked(&self, commit_time_us: i64, now_us: i64) {
        // A clock step backwards must not record a negative latency.
        let micros = now_us.saturating_sub(commit_time_us).max(0);
        self.commit_to_ack.observe(micros as f64 / 1e6);
    }

    /// Publishes one reading of the slot's health.
    pub fn observe_slot(&self, health: &crate::slot::SlotHealth) {
        self.slot_retained_wal.set(health.retained_bytes);
        self.slot_lag.set(health.lag_bytes);
        self.slot_safe_wal.set(health.safe_wal_bytes.unwrap_or(-1));
        for status in ["reserved", "extended", "unreserved", "lost"] {
            let current = health.wal_status.as_deref() == Some(status);
            self.slot_wal_status.with_label_values(&[status]).set(i64::from(current));
        }
    }

    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

/// Fine below 50 ms, where a healthy pipeline sits, coarse up to a minute of lag.
const COMMIT_TO_ACK_BUCKETS: [f64; 24] = [
    0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
    0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// What `/metrics` and `/healthz` show: the metrics of `ficus cdc`, or of `ficus sink`.
pub trait Exported: Send + Sync + 'static {
    /// The Prometheus text.
    fn render(&self) -> Vec<u8>;
    /// Whether connected and working.
    fn healthy(&self) -> bool;
}

impl Exported for Metrics {
    fn render(&self) -> Vec<u8> {
        Metrics::render(self)
    }

    fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
}

/// Serves `/metrics` and `/healthz` (200 while connected, 503 otherwise) until the task is
/// dropped.
pub async fn serve<M: Exported>(listener: TcpListener, metrics: Arc<M>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move {
                    let (status, body) = match req.uri().path() {
                        "/metrics" => (StatusCode::OK, metrics.render()),
                        "/healthz" if metrics.healthy() => (StatusCode::OK, b"ok\n".to_vec()),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_to_ack_is_observed_in_seconds_and_never_negative() {
        let metrics = Metrics::new();
        metrics.observe_commit_acked(1_000_000, 1_012_000);
        // PostgreSQL's clock ahead of ours: recorded as zero, not as a negative latency.
        metrics.observe_commit_acked(2_000_000, 1_999_000);
        assert_eq!(metrics.commit_to_ack.get_sample_count(), 2);
        assert!((metrics.commit_to_ack.get_sample_sum() - 0.012).abs() < 1e-9);
        let text = String::from_utf8(metrics.render()).expect("utf-8");
        assert!(text.contains("ficus_cdc_commit_to_ack_seconds_bucket{le=\"0.0125\"} 2"), "{text}");
        assert!(text.contains("ficus_cdc_commit_to_ack_seconds_bucket{le=\"0.01\"} 1"), "{text}");
    }
}
