//! `ficus sink`: the data half of a migration. Reads the change events `ficus cdc` (or
//! Debezium) writes to Kafka and keeps a new service's own PostgreSQL tables in step with
//! them, exactly once: each batch is applied in one transaction that also stores the Kafka
//! offsets after it, and a start reads on from the stored offsets.
//!
//! Pure parts: [`change`] (events as row changes), [`value`] (JSON values back to column
//! text), [`plan`] (a batch as statements). I/O: [`run`].

#![forbid(unsafe_code)]

pub mod change;
pub mod config;
pub mod metrics;
pub mod plan;
pub mod run;
pub mod value;

pub use config::SinkConfig;
pub use metrics::Metrics;
pub use run::{run, SinkError};
