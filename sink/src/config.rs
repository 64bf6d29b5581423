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
    /// Target tables kept exactly once.
    #[serde(default)]
    pub postgres: Option<PostgresConfig>,
    /// An HTTP endpoint the events are posted to, at least once, in order per partition.
    #[serde(default)]
    pub webhook: Option<WebhookConfig>,
    /// The source database, read (its catalog only) for tables with `create = true`.
    #[serde(default)]
    pub source: Option<SourceRef>,
    /// `listen`: Prometheus `/metrics` and `/healthz`.
    #[serde(default)]
    pub metrics: ficus_cdc::config::MetricsConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    pub brokers: String,
    /// The sink's name: the tables' offsets are kept under it in the target database, and it
    /// is the webhook's consumer group (its replicas share the partitions and the offsets).
    /// Required with `[webhook]`: two sinks sharing a group would split the events.
    #[serde(default)]
    pub name: Option<String>,
    /// The topics the webhook delivers (default: the topics of `postgres.tables`), and, with
    /// `postgres.all_topics`, those `[postgres]` applies.
    #[serde(default)]
    pub topics: Vec<String>,
    /// Instead of `topics`: every topic whose whole name this matches, also those created
    /// later (`shop\\.public\\..*`).
    #[serde(default)]
    pub topic_regex: Option<String>,
    /// Any librdkafka consumer property, passed through.
    #[serde(default)]
    pub consumer: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://user:password@host:port/db`.
    pub url: String,
    /// How topics map to tables.
    #[serde(default)]
    pub tables: Vec<TableConfig>,
    /// Apply every topic of `kafka.topics` (or matching `kafka.topic_regex`, also those made
    /// later), those without a `[[postgres.tables]]` entry to the topic's schema.table.
    #[serde(default)]
    pub all_topics: bool,
    /// `create` for the topics without an entry (with `all_topics`): a table added to ficus
    /// cdc later gets its target table made from the source's catalog.
    #[serde(default)]
    pub create: bool,
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
    /// Create the table from the source's catalog when it does not exist, and add the
    /// columns events carry that it lacks (needs `[source] url`).
    #[serde(default)]
    pub create: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceRef {
    /// `postgres://user:password@host:port/db?sslmode=...`, as `ficus cdc`'s `source.url`.
    pub url: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where each batch of events is POSTed, as a JSON array.
    pub url: String,
    /// Events per request, at most, all of one partition and in order.
    #[serde(default = "default_hook_batch")]
    pub batch: usize,
    /// How long a request may take before it is retried.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// How long a request waits for more events once it has one.
    #[serde(default = "default_linger", with = "humantime_serde")]
    pub linger: Duration,
    /// A file holding the signing secret (`whsec_` and base64, or any text); without one,
    /// requests are not signed.
    #[serde(default)]
    pub secret_file: Option<std::path::PathBuf>,
    /// `stop` (default): a 4xx answer stops the partition, saying why; `skip`: the request's
    /// events are counted and passed over.
    #[serde(default)]
    pub on_4xx: OnError,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    #[default]
    Stop,
    Skip,
}

fn default_batch() -> usize {
    5000
}

fn default_linger() -> Duration {
    Duration::from_millis(20)
}

fn default_hook_batch() -> usize {
    100
}

fn default_timeout() -> Duration {
    Duration::from_secs(5)
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
        if config.postgres.is_none() && config.webhook.is_none() {
            problems.push("nothing to deliver to: add [postgres], [webhook] or both".to_string());
        }
        if let Some(postgres) = &config.postgres {
            postgres.check(&config.kafka, &mut problems);
            let creates = postgres.tables.iter().position(|t| t.create);
            if let (Some(n), None) = (creates, &config.source) {
                problems.push(format!(
                    "postgres.tables[{n}].create needs [source] url: the table is made from the source's catalog"
                ));
            }
            if postgres.create && !postgres.all_topics {
                problems.push(
                    "postgres.create is for topics without an entry: set postgres.all_topics = true, or create on each [[postgres.tables]]"
                        .to_string(),
                );
            }
            if postgres.create && config.source.is_none() {
                problems.push(
                    "postgres.create needs [source] url: tables are made from the source's catalog"
                        .to_string(),
                );
            }
        }
        if let Some(webhook) = &config.webhook {
            if let Err(e) = reqwest::Url::parse(&webhook.url) {
                problems.push(format!("webhook.url {}: {e}", webhook.url));
            }
            if config.kafka.name.is_none() {
                problems.push(
                    "kafka.name is required with [webhook]: it is the consumer group whose members share the partitions, and two sinks in one group would split the events"
                        .to_string(),
                );
            }
            if webhook.batch == 0 {
                problems.push("webhook.batch must be at least 1".to_string());
            }
            if config.webhook_topics().is_empty() && config.kafka.topic_regex.is_none() {
                problems.push("kafka.topics: name the topics the webhook delivers".to_string());
            }
        }
        if let Err(e) = config.kafka.topic_pattern() {
            problems.push(e);
        }
        if config.kafka.topic_regex.is_some() && !config.kafka.topics.is_empty() {
            problems.push("kafka: give topics or topic_regex, not both".to_string());
        }
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(problems)
        }
    }
}

impl KafkaConfig {
    /// The sink's name, `ficus-sink` when not given.
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("ficus-sink")
    }

    /// `topic_regex`, matching whole topic names.
    pub fn topic_pattern(&self) -> Result<Option<regex::Regex>, String> {
        let Some(pattern) = &self.topic_regex else { return Ok(None) };
        regex::Regex::new(&format!("^(?:{pattern})$"))
            .map(Some)
            .map_err(|e| format!("kafka.topic_regex {pattern}: {e}"))
    }
}

impl SinkConfig {
    /// The topics the webhook delivers: `kafka.topics`, or else those of the target tables.
    pub fn webhook_topics(&self) -> Vec<String> {
        if !self.kafka.topics.is_empty() {
            return self.kafka.topics.clone();
        }
        let tables = self.postgres.iter().flat_map(|p| &p.tables);
        let mut topics: Vec<String> = tables.map(|t| t.topic.clone()).collect();
        topics.sort_unstable();
        topics.dedup();
        topics
    }
}

impl PostgresConfig {
    fn check(&self, kafka: &KafkaConfig, problems: &mut Vec<String>) {
        let named = !kafka.topics.is_empty() || kafka.topic_regex.is_some();
        if self.all_topics && !named {
            problems
                .push("postgres.all_topics needs kafka.topics or kafka.topic_regex".to_string());
        }
        if self.tables.is_empty() && !self.all_topics {
            problems.push(
                "postgres.tables: at least one [[postgres.tables]] is needed (or postgres.all_topics = true)"
                    .to_string(),
            );
        }
        let unlisted = if self.all_topics { kafka.topics.as_slice() } else { &[] };
        for (n, topic) in unlisted.iter().enumerate() {
            let listed = self.tables.iter().any(|t| &t.topic == topic);
            if let (false, Err(e)) = (listed, self.default_table(topic).source_table()) {
                problems.push(format!("kafka.topics[{n}]: {e} in a [[postgres.tables]] entry"));
            }
        }
        if self.batch == 0 {
            problems.push("postgres.batch must be at least 1".to_string());
        }
        if let Err(e) = TableName::parse(&self.offsets_table) {
            problems.push(format!("postgres.offsets_table: {e}"));
        }
        for (n, table) in self.tables.iter().enumerate() {
            if let Err(e) = table.table_name() {
                problems.push(format!("postgres.tables[{n}].table: {e}"));
            }
            let same =
                |t: &TableConfig| t.topic == table.topic && t.table_name() == table.table_name();
            if self.tables[..n].iter().any(same) {
                problems.push(format!(
                    "postgres.tables[{n}]: topic {} into the same table is listed twice",
                    table.topic
                ));
            }
        }
    }
}

impl PostgresConfig {
    /// The tables to apply: the configured ones and, with `all_topics`, the topic's
    /// schema.table for each of `topics` (those of `kafka.topics` or matching
    /// `kafka.topic_regex`) without one.
    pub fn tables_for(&self, topics: &[String]) -> Vec<TableConfig> {
        let mut tables = self.tables.clone();
        let topics = if self.all_topics { topics } else { &[] };
        for topic in topics {
            if !self.tables.iter().any(|t| &t.topic == topic) {
                tables.push(self.default_table(topic));
            }
        }
        tables
    }

    fn default_table(&self, topic: &str) -> TableConfig {
        TableConfig {
            topic: topic.to_string(),
            table: None,
            columns: BTreeMap::new(),
            mode: Mode::default(),
            create: self.create,
        }
    }
}

impl TableConfig {
    /// The source table: the topic's last two parts (`shop.public.orders`: `public.orders`).
    pub fn source_table(&self) -> Result<TableName, String> {
        let mut parts = self.topic.rsplitn(3, '.');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(table), Some(schema), Some(_)) => Ok(TableName::new(schema, table)),
            _ => Err(format!(
                "topic {} is not <prefix>.<schema>.<table>: name the table",
                self.topic
            )),
        }
    }

    /// The target table.
    pub fn table_name(&self) -> Result<TableName, String> {
        match &self.table {
            Some(table) => TableName::parse(table),
            None => self.source_table(),
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
        let postgres = config.postgres.as_ref().expect("postgres");
        assert_eq!(postgres.tables[0].table_name(), Ok(TableName::new("public", "orders")));
        assert_eq!(postgres.tables[1].table_name(), Ok(TableName::new("view", "clients")));
        assert_eq!(postgres.batch, 5000);
        assert_eq!(config.webhook_topics(), ["shop.public.customers", "shop.public.orders"]);
    }

    #[test]
    fn topics_without_an_entry_go_to_their_schema_and_table() {
        let config = SinkConfig::from_value(json!({
            "kafka": {"brokers": "b", "topics": ["shop.public.orders", "shop.public.customers"]},
            "postgres": {"url": "u", "all_topics": true, "create": true, "tables": [
                {"topic": "shop.public.orders", "table": "view.orders"},
            ]},
            "source": {"url": "postgres://u@h/shop"},
        }))
        .expect("valid");
        let postgres = config.postgres.as_ref().expect("postgres");
        let topics = config.webhook_topics();
        let tables = postgres.tables_for(&topics);
        let names: Vec<_> = tables.iter().map(|t| t.table_name().expect("name").sql()).collect();
        assert_eq!(names, ["\"view\".\"orders\"", "\"public\".\"customers\""]);
        assert!(!tables[0].create && tables[1].create, "postgres.create is for the unlisted");
        let mut listed_only = postgres.clone();
        listed_only.all_topics = false;
        assert_eq!(listed_only.tables_for(&topics).len(), 1, "without all_topics, the entries");

        let problems = |kafka: serde_json::Value, postgres: serde_json::Value| {
            SinkConfig::from_value(json!({"kafka": kafka, "postgres": postgres}))
                .expect_err("invalid")
        };
        assert_eq!(
            problems(json!({"brokers": "b"}), json!({"url": "u"})),
            ["postgres.tables: at least one [[postgres.tables]] is needed (or postgres.all_topics = true)"]
        );
        assert_eq!(
            problems(
                json!({"brokers": "b"}),
                json!({"url": "u", "all_topics": true, "create": true})
            ),
            [
                "postgres.all_topics needs kafka.topics or kafka.topic_regex",
                "postgres.create needs [source] url: tables are made from the source's catalog",
            ]
        );
        assert_eq!(
            problems(json!({"brokers": "b", "topics": ["orders"]}), json!({"url": "u", "all_topics": true})),
            ["kafka.topics[0]: topic orders is not <prefix>.<schema>.<table>: name the table in a [[postgres.tables]] entry"]
        );
        assert_eq!(
            problems(json!({"brokers": "b", "topics": ["orders"]}), json!({"url": "u", "create": true, "tables": [{"topic": "a.b.c"}]})),
            [
                "postgres.create is for topics without an entry: set postgres.all_topics = true, or create on each [[postgres.tables]]",
                "postgres.create needs [source] url: tables are made from the source's catalog",
            ]
        );
        let regex = json!({"brokers": "b", "topic_regex": "shop\\.public\\..*"});
        let config = SinkConfig::from_value(
            json!({"kafka": regex, "postgres": {"url": "u", "all_topics": true}}),
        );
        assert!(config.is_ok(), "a regex names the topics: {config:?}");
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
        let hook = |webhook: serde_json::Value| {
            SinkConfig::from_value(
                json!({"kafka": {"brokers": "b", "name": "hook"}, "webhook": webhook}),
            )
        };
        assert_eq!(
            hook(json!({"url": "not a url", "batch": 0})).expect_err("invalid"),
            [
                "webhook.url not a url: relative URL without a base",
                "webhook.batch must be at least 1",
                "kafka.topics: name the topics the webhook delivers",
            ]
        );
        let config = hook(json!({"url": "https://hooks.example.com/orders", "timeout": "2s"}))
            .map(|_| ())
            .expect_err("no topics");
        assert_eq!(config, ["kafka.topics: name the topics the webhook delivers"]);
        let unnamed = SinkConfig::from_value(json!({"kafka": {"brokers": "b", "topics": ["t"]},
            "webhook": {"url": "http://h/"}}));
        assert_eq!(
            unnamed.expect_err("no name"),
            ["kafka.name is required with [webhook]: it is the consumer group whose members share the partitions, and two sinks in one group would split the events"]
        );
        let regex = |pattern: &str| {
            SinkConfig::from_value(
                json!({"kafka": {"brokers": "b", "name": "n", "topic_regex": pattern},
                "webhook": {"url": "http://h/"}}),
            )
        };
        let config = regex(r"shop\.public\..*").expect("a regex instead of topics");
        let pattern = config.kafka.topic_pattern().expect("valid").expect("given");
        assert!(pattern.is_match("shop.public.orders") && !pattern.is_match("xshop.public.orders"));
        assert!(
            regex("(").expect_err("bad")[0].starts_with("kafka.topic_regex (: regex parse error")
        );
        let create =
            SinkConfig::from_value(json!({"kafka": {"brokers": "b"}, "postgres": {"url": "u",
            "tables": [{"topic": "shop.public.orders", "create": true}]}}));
        assert_eq!(
            create.expect_err("no source"),
            ["postgres.tables[0].create needs [source] url: the table is made from the source's catalog"]
        );
        assert_eq!(
            SinkConfig::from_value(json!({"kafka": {"brokers": "b"}})).expect_err("nothing"),
            ["nothing to deliver to: add [postgres], [webhook] or both"]
        );
        let unknown = SinkConfig::from_value(
            json!({"kafka": {"brokers": "b", "oops": 1}, "postgres": {"url": "u", "tables": []}}),
        )
        .expect_err("unknown key");
        assert!(unknown[0].starts_with("kafka.oops: unknown field `oops`"), "{unknown:?}");
    }
}
