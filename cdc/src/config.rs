//! The `ficus cdc` configuration file (`cdc.toml`), every key also settable through
//! `FICUS_`-prefixed environment variables (`FICUS_SOURCE__URL`).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::error::CdcError;
use crate::wire::ConnectParams;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CdcConfig {
    pub source: SourceConfig,
    pub kafka: KafkaConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
}

/// What to read: the database, its publication and slot, and which tables.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// `postgres://user:password@host:port/db?sslmode=...`.
    pub url: String,
    /// Publication to stream; created for `tables` if missing.
    #[serde(default = "default_name")]
    pub publication: String,
    /// Logical replication slot (pgoutput); created if missing.
    #[serde(default = "default_name")]
    pub slot: String,
    /// `schema.table` names; absent means every table (a publication FOR ALL TABLES).
    #[serde(default)]
    pub tables: Option<Vec<String>>,
    #[serde(default)]
    pub snapshot: SnapshotMode,
    /// Longest time between two confirmations to PostgreSQL while idle.
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    pub heartbeat: Duration,
}

/// Whether to copy existing rows before streaming changes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotMode {
    /// Copy every row when the slot is new, then stream.
    #[default]
    Initial,
    /// Only stream changes from the slot's creation on.
    Never,
    /// Copy every row, then exit.
    InitialOnly,
}

/// Where events go.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    pub brokers: String,
    /// Topics are `<topic_prefix>.<schema>.<table>`; also the events' `source.name`.
    pub topic_prefix: String,
    /// Partitions of topics ficus creates (-1: the broker's default).
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// Replication factor of topics ficus creates (-1: the broker's default).
    #[serde(default = "default_partitions")]
    pub replication_factor: i32,
    /// Records handed to the producer and not yet acknowledged before reading pauses.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Any librdkafka producer property, passed through (`"compression.type" = "lz4"`).
    #[serde(default)]
    pub producer: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the Prometheus `/metrics` and `/healthz` endpoint.
    #[serde(default)]
    pub listen: Option<String>,
}

fn default_name() -> String {
    "ficus".into()
}

fn default_heartbeat() -> Duration {
    Duration::from_secs(10)
}

fn default_partitions() -> i32 {
    -1
}

fn default_max_in_flight() -> usize {
    100_000
}

impl SourceConfig {
    /// The connection settings in `url`, checked.
    pub fn pg_config(&self) -> Result<tokio_postgres::Config, CdcError> {
        let config: tokio_postgres::Config =
            self.url.parse().map_err(|e| CdcError::Config(format!("source.url: {e}")))?;
        if matches!(config.get_ssl_mode(), tokio_postgres::config::SslMode::Require) {
            return Err(CdcError::Config(
                "source.url: sslmode=require is not supported yet; use sslmode=prefer or disable"
                    .into(),
            ));
        }
        Ok(config)
    }

    /// The parameters of the replication connection.
    pub fn connect_params(&self) -> Result<ConnectParams, CdcError> {
        let config = self.pg_config()?;
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
            #[cfg(unix)]
            Some(tokio_postgres::config::Host::Unix(_)) => {
                return Err(CdcError::Config(
                    "source.url: Unix sockets are not supported; give a TCP host".into(),
                ))
            }
            None => "localhost".to_string(),
        };
        let user = config
            .get_user()
            .map(str::to_string)
            .or_else(|| std::env::var("USER").ok())
            .ok_or_else(|| CdcError::Config("source.url: no user".into()))?;
        Ok(ConnectParams {
            host,
            port: config.get_ports().first().copied().unwrap_or(5432),
            database: config.get_dbname().map_or_else(|| user.clone(), str::to_string),
            password: config.get_password().map(<[u8]>::to_vec),
            user,
        })
    }

    /// Configured tables split into (schema, table), `public` when no schema is given.
    pub fn table_names(&self) -> Option<Vec<(String, String)>> {
        self.tables.as_ref().map(|tables| {
            tables
                .iter()
                .map(|t| match t.split_once('.') {
                    Some((schema, table)) => (schema.to_string(), table.to_string()),
                    None => ("public".to_string(), t.clone()),
                })
                .collect()
        })
    }
}

impl KafkaConfig {
    /// librdkafka properties: ficus's safe defaults, then the user's overrides.
    pub fn producer_properties(&self) -> Vec<(String, String)> {
        let mut props: BTreeMap<String, String> = [
            ("bootstrap.servers", self.brokers.as_str()),
            ("acks", "all"),
            ("enable.idempotence", "true"),
            // Never give up on a record: an unreachable broker pauses ficus instead.
            ("message.timeout.ms", "0"),
            ("linger.ms", "5"),
            ("queue.buffering.max.kbytes", "65536"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (key, value) in &self.producer {
            let value = match value {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            props.insert(key.clone(), value);
        }
        props.into_iter().collect()
    }
}
