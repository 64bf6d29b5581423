//! The sink's Prometheus metrics: events applied by table and kind, batch sizes, the time
//! to apply a batch, how far each partition is behind, webhook requests and events, and
//! stopped partitions; served with `/healthz` by
//! `ficus_cdc::metrics::serve`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    /// Events applied, by target table and kind (upsert, delete, truncate, append, skipped).
    pub events: IntCounterVec,
    /// Events per applied batch.
    pub batch: Histogram,
    /// Seconds to apply a batch and store its offsets.
    pub apply: Histogram,
    /// Events of a partition not taken yet: its high watermark less the next offset.
    pub lag: IntGaugeVec,
    /// Whether each delivery (tables, webhook) is down: configured and not connected and
    /// reading. One not configured is never down.
    down: [AtomicBool; 2],
    /// Webhook events, by topic and outcome (delivered, skipped).
    pub hook_events: IntCounterVec,
    /// Webhook requests, by answer (2xx, 4xx, 5xx, ... or timeout, error).
    pub hook_requests: IntCounterVec,
    /// Seconds a webhook request took, answered or not.
    pub hook_seconds: Histogram,
    /// Partitions stopped by an event that cannot be delivered; while any is, the sink is
    /// not healthy.
    pub stopped: IntGauge,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let registry = Registry::new();
        // Static, distinct names: creation and registration cannot fail.
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let metric = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("valid metric");
            registry.register(Box::new(metric.clone())).expect("registered once");
            metric
        };
        let events = IntCounterVec::new(
            Opts::new("ficus_sink_events_total", "Events applied, by target table and kind"),
            &["table", "kind"],
        )
        .expect("valid metric");
        registry.register(Box::new(events.clone())).expect("registered once");
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(metric.clone())).expect("registered once");
            metric
        };
        let stopped = IntGauge::new(
            "ficus_sink_stopped_partitions",
            "Partitions stopped by an event that cannot be delivered",
        )
        .expect("valid metric");
        registry.register(Box::new(stopped.clone())).expect("registered once");
        let lag = IntGaugeVec::new(
            Opts::new("ficus_sink_lag_events", "Events of a partition not taken yet"),
            &["topic", "partition"],
        )
        .expect("valid metric");
        registry.register(Box::new(lag.clone())).expect("registered once");
        Arc::new(Metrics {
            events,
            batch: histogram(
                "ficus_sink_batch_events",
                "Events per applied batch",
                prometheus::exponential_buckets(1.0, 4.0, 8).expect("valid buckets"),
            ),
            apply: histogram(
                "ficus_sink_apply_seconds",
                "Time to apply a batch and store its offsets",
                prometheus::exponential_buckets(0.001, 2.5, 12).expect("valid buckets"),
            ),
            lag,
            down: [AtomicBool::new(false), AtomicBool::new(false)],
            hook_events: counter(
                "ficus_sink_webhook_events_total",
                "Webhook events, by topic and outcome",
                &["topic", "outcome"],
            ),
            hook_requests: counter(
                "ficus_sink_webhook_requests_total",
                "Webhook requests, by answer",
                &["answer"],
            ),
            hook_seconds: histogram(
                "ficus_sink_webhook_seconds",
                "Time a webhook request took",
                prometheus::exponential_buckets(0.001, 2.5, 12).expect("valid buckets"),
            ),
            stopped,
            registry,
        })
    }
}

/// One of the sink's two deliveries, each healthy or not on its own.
#[derive(Debug, Clone, Copy)]
pub enum Delivery {
    Tables = 0,
    Webhook = 1,
}

impl Metrics {
    /// Marks `delivery` as connected and reading, or not.
    pub fn set_up(&self, delivery: Delivery, up: bool) {
        self.down[delivery as usize].store(!up, Ordering::Relaxed);
    }
}

impl ficus_cdc::metrics::Exported for Metrics {
    fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }

    fn healthy(&self) -> bool {
        self.down.iter().all(|down| !down.load(Ordering::Relaxed)) && self.stopped.get() == 0
    }
}
