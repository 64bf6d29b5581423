//! The `ficus sink` configuration, compiled once into what the runner needs, every problem
//! reported at once with its key.

use std::collections::BTreeMap;
use std::time::Duration;

use ficus_cdc::names::TableName;
use serde::Deserialize;

use crate::plan::Mode;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    pub kafka: KafkaConfig,
    pub postgres: PostgresConfig,
    /// `listen`: Prometheus `/metrics` and `/healthz`.
    #[serde(default)]
    pub metrics: ficus_cdc::config::MetricsConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    pub brokers: String,
    /// The sink's name: its offsets are kept under it in the target database, and it is the
    /// consumer group id (no offsets are committed to Kafka).
    #[serde(default = "default_name")]
    pub name: String,
    /// Any librdkafka consumer property, passed through.
    #[serde(default)]
    pub consumer: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://user:password@host:port/db`.
    pub url: String,
    pub tables: Vec<TableConfig>,
    /// Events applied per transaction, at most.
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// How long a batch waits for more events once it has one.
    #[serde(default = "default_linger", with = "humantime_serde")]
    pub linger: Duration,
    /// Where the sink keeps its offsets, in the target database, updated in the same
    /// transaction as the rows.
    #[serde(default = "default_offsets_table")]
    pub offsets_table: String,
    /// `stop` (default): an event that cannot be applied stops the sink, naming it;
    /// `skip`: it is logged, counted and left out.
    #[serde(default)]
    pub on_error: OnError,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    pub topic: String,
    /// `schema.table`; default: the topic's last two parts (`shop.public.orders`:
    /// `public.orders`).
    #[serde(default)]
    pub table: Option<String>,
    /// Source column name to target column name.
    #[serde(default)]
    pub columns: BTreeMap<String, String>,
    #[serde(default)]
    pub mode: Mode,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    #[default]
    Stop,
    Skip,
}

fn default_name() -> String {
    "ficus-sink".into()
}

fn default_batch() -> usize {
    5000
}

fn default_linger() -> Duration {
    Duration::from_millis(20)
}

fn default_offsets_table() -> String {
    "public.ficus_sink_offsets".into()
}

impl SinkConfig {
    /// The configuration from its sections, with every problem at once.
    pub fn from_value(value: serde_json::Value) -> Result<SinkConfig, Vec<String>> {
        let config: SinkConfig = serde_path_to_error::deserialize(value)
            .map_err(|e| vec![format!("{}: {}", e.path(), e.inner())])?;
        let mut problems = Vec::new();
        if config.kafka.brokers.is_empty() {
            problems.push("kafka.brokers is required".to_string());
        }
        if config.postgres.tables.is_empty() {
            problems
                .push("postgres.tables: at least one [[postgres.tables]] is needed".to_string());
        }
        if config.postgres.batch == 0 {
            problems.push("postgres.batch must be at least 1".to_string());
        }
        if let Err(e) = TableName::parse(&config.postgres.offsets_table) {
            problems.push(format!("postgres.offsets_table: {e}"));
        }
        for (n, table) in config.postgres.tables.iter().enumerate() {
            if let Err(e) = table.table_name() {
                problems.push(format!("postgres.tables[{n}].table: {e}"));
            }
            let same =
                |t: &TableConfig| t.topic == table.topic && t.table_name() == table.table_name();
            if config.postgres.tables[..n].iter().any(same) {
                problems.push(format!(
                    "postgres.tables[{n}]: topic {} into the same table is listed twice",
                    table.topic
                ));
            }
        }
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(problems)
        }
    }
}

impl TableConfig {
    /// The target table.
    pub fn table_name(&self) -> Result<TableName, String> {
        match &self.table {
            Some(table) => TableName::parse(table),
            None => {
                let mut parts = self.topic.rsplitn(3, '.');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(table), Some(schema), Some(_)) => Ok(TableName::new(schema, table)),
                    _ => Err(format!(
                        "topic {} is not <prefix>.<schema>.<table>: name the table",
                        self.topic
                    )),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn tables_default_to_the_topics_schema_and_table() {
        let config = SinkConfig::from_value(json!({
            "kafka": {"brokers": "b:9092"},
            "postgres": {"url": "postgres://u@h/db", "tables": [
                {"topic": "shop.public.orders"},
                {"topic": "shop.public.customers", "table": "view.clients", "columns": {"id": "client_id"}},
            ]},
        }))
        .expect("valid");
        assert_eq!(config.postgres.tables[0].table_name(), Ok(TableName::new("public", "orders")));
        assert_eq!(config.postgres.tables[1].table_name(), Ok(TableName::new("view", "clients")));
        assert_eq!(config.postgres.batch, 5000);
    }

    #[test]
    fn every_problem_is_named() {
        let problems = SinkConfig::from_value(json!({
            "kafka": {"brokers": ""},
            "postgres": {"url": "u", "batch": 0, "tables": [{"topic": "orders"}, {"topic": "o", "table": "a.b"}, {"topic": "o", "table": "a.b"}]},
        }))
        .expect_err("invalid");
        assert_eq!(
            problems,
            [
                "kafka.brokers is required",
                "postgres.batch must be at least 1",
                "postgres.tables[0].table: topic orders is not <prefix>.<schema>.<table>: name the table",
                "postgres.tables[2]: topic o into the same table is listed twice",
            ]
        );
        let unknown = SinkConfig::from_value(
            json!({"kafka": {"brokers": "b", "oops": 1}, "postgres": {"url": "u", "tables": []}}),
        )
        .expect_err("unknown key");
        assert!(unknown[0].starts_with("kafka.oops: unknown field `oops`"), "{unknown:?}");
    }
}
