//! The ficus CDC pipeline: PostgreSQL logical replication (pgoutput) to Kafka as
//! Debezium-compatible JSON events, confirming a position to PostgreSQL only once Kafka has
//! acknowledged everything before it.
//!
//! Pure parts: [`pgoutput`] (decoding), [`stream`] (what each message means, and what may
//! be confirmed when), [`incremental`] (incremental snapshots' chunks and watermarks),
//! [`copy`] (snapshot rows), [`value`] (type mapping), [`event`]
//! (encoding), [`wire::split_frame`] (framing). I/O at the edges: [`wire`] (replication
//! protocol), [`catalog`] (SQL), [`sink`] (Kafka), driven by [`pipeline`].

#![forbid(unsafe_code)]

pub mod catalog;
pub mod chunk;
pub mod config;
pub mod copy;
pub mod error;
pub mod event;
pub mod incremental;
pub mod lsn;
pub mod mask;
pub mod metrics;
pub mod names;
pub mod outbox;
pub mod pgoutput;
pub mod pipeline;
pub mod sink;
pub mod slot;
pub mod stream;
pub mod time;
pub mod tls;
pub mod value;
pub mod wire;

pub use config::CdcConfig;
pub use error::CdcError;
pub use lsn::Lsn;
pub use metrics::Metrics;
pub use pipeline::{run, Shutdown};
