//! `ficus sink`: the data half of a migration. Reads the change events `ficus cdc` (or
//! Debezium) writes to Kafka and keeps a new service's own PostgreSQL tables in step with
//! them, exactly once: each batch is applied in one transaction that also stores the Kafka
//! offsets after it, and a start reads on from the stored offsets.
//!
//! It also delivers the events to an HTTP endpoint (a webhook), at least once and in order
//! per partition, as a member of the Kafka consumer group that shares the partitions among
//! replicas and keeps the offsets.
//!
//! Pure parts: [`change`] (events as row changes), [`value`] (JSON values back to column
//! text), [`plan`] (a batch as statements), [`webhook`] (requests and answers). I/O: [`run`]
//! (the tables), [`deliver`] (the webhook), [`source`] (reading the topics).

#![forbid(unsafe_code)]

pub mod change;
pub mod config;
pub mod deliver;
pub mod metrics;
pub mod plan;
pub mod run;
pub mod schema;
pub mod source;
pub mod value;
pub mod webhook;

pub use config::SinkConfig;
pub use metrics::Metrics;
pub use run::{run, SinkError};
