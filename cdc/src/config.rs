//! The `ficus cdc` configuration file (`cdc.toml`), every key also settable through
//! `FICUS_`-prefixed environment variables (`FICUS_SOURCE__URL`).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use std::path::PathBuf;

use crate::error::CdcError;
use crate::mask::{ColumnRules, Masking};
use crate::names::TableName;
use crate::outbox::{self, OutboxConfig, OutboxTable};
use crate::tls::{client_config, SslMode, TlsSettings};
use crate::value::TimePrecision;
use crate::wire::ConnectParams;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CdcConfig {
    pub source: SourceConfig,
    pub kafka: KafkaConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Per table (`"schema.table"`), columns excluded or masked in every event.
    #[serde(default)]
    pub columns: BTreeMap<String, ColumnRules>,
    #[serde(default)]
    pub masking: MaskingConfig,
    /// Outbox tables whose inserted rows are routed as events.
    #[serde(default)]
    pub outbox: Vec<OutboxConfig>,
    /// Where events go; set by `ficus cdc --stdout`, not in the file.
    #[serde(skip)]
    pub output: Output,
}

/// The destination of events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Output {
    #[default]
    Kafka,
    /// JSON lines on standard output, one per record.
    Stdout,
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
    /// `schema.table` names (quoted as in SQL where a name holds dots or quotes:
    /// `'"a.b".c'`); exactly these are snapshotted and streamed. Absent: the publication's
    /// tables (every table, for the publication ficus creates).
    #[serde(default)]
    pub tables: Option<Vec<String>>,
    #[serde(default)]
    pub snapshot: SnapshotMode,
    /// Longest time between two confirmations to PostgreSQL while idle.
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    pub heartbeat: Duration,
    /// `micros` (always) or `adaptive` (milliseconds for `time(0..3)`, `timestamp(0..3)`).
    #[serde(default)]
    pub time_precision: TimePrecision,
    /// Debezium's `transaction` block in events, and BEGIN/END events on
    /// `<prefix>.transaction` (Debezium's `provide.transaction.metadata`).
    #[serde(default)]
    pub transaction_metadata: bool,
    /// Rows per chunk of an incremental snapshot (a table added later, or `ficus cdc
    /// snapshot`): larger chunks read faster, smaller ones hold less memory and pause the
    /// stream for less time.
    #[serde(default = "default_chunk_rows")]
    pub snapshot_chunk_rows: usize,
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
    /// Bootstrap servers; not needed with `--stdout`.
    #[serde(default)]
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

/// The secret of `mask = "hash"`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskingConfig {
    /// A file holding the salt (at least 16 bytes; a trailing newline is not part of it).
    #[serde(default)]
    pub salt_file: Option<PathBuf>,
}

/// A librdkafka property as configured (`"lz4"`, `5`, `true`) as the text librdkafka takes.
pub fn property(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The sections of a cdc configuration.
pub const SECTIONS: [&str; 6] = ["source", "kafka", "metrics", "columns", "masking", "outbox"];

impl CdcConfig {
    /// The configuration from its sections (the file's, merged with the environment's),
    /// compiled section by section so that every problem is reported at once, each with its
    /// key: unknown, missing or malformed keys first, then what the values mean.
    pub fn from_sections(
        sections: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<CdcConfig, Vec<String>> {
        let mut errors = Vec::new();
        fn section<T: serde::de::DeserializeOwned>(
            name: &str,
            value: Option<&serde_json::Value>,
            errors: &mut Vec<String>,
        ) -> Option<T> {
            let value = value.cloned().unwrap_or(serde_json::Value::Null);
            let value = match value {
                // An absent optional section is its default; an absent required one is named.
                serde_json::Value::Null => serde_json::Value::Object(Default::default()),
                other => other,
            };
            match serde_path_to_error::deserialize(value) {
                Ok(parsed) => Some(parsed),
                Err(e) => {
                    let path = e.path().to_string();
                    let at = match path.as_str() {
                        "." => name.to_string(),
                        index if index.starts_with('[') => format!("{name}{index}"),
                        key => format!("{name}.{key}"),
                    };
                    errors.push(format!("{at}: {}", e.into_inner()));
                    None
                }
            }
        }
        let source = section::<SourceConfig>("source", sections.get("source"), &mut errors);
        let kafka = section::<KafkaConfig>("kafka", sections.get("kafka"), &mut errors);
        let metrics = section::<MetricsConfig>("metrics", sections.get("metrics"), &mut errors);
        let columns = section("columns", sections.get("columns"), &mut errors);
        let masking = section::<MaskingConfig>("masking", sections.get("masking"), &mut errors);
        let outbox = match sections.get("outbox") {
            None => Some(Vec::new()),
            some => section::<Vec<OutboxConfig>>("outbox", some, &mut errors),
        };
        let (Some(source), Some(kafka), Some(metrics), Some(columns), Some(masking), Some(outbox)) =
            (source, kafka, metrics, columns, masking, outbox)
        else {
            return Err(errors);
        };
        let config = CdcConfig {
            source,
            kafka,
            metrics,
            columns,
            masking,
            outbox,
            output: Output::default(),
        };
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(problems)
        }
    }

    /// Every problem with the values, each naming its key.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut add = |result: Result<(), CdcError>| {
            if let Err(e) = result {
                let text = match e {
                    CdcError::Config(text) => text,
                    other => other.to_string(),
                };
                problems.extend(text.split("; ").map(str::to_string));
            }
        };
        add(self.source.validate());
        add(self.kafka.validate());
        add(self.masking().map(drop));
        add(self.outbox_tables().map(drop));
        problems
    }

    /// The `[[outbox]]` tables compiled, every error named with its key.
    pub fn outbox_tables(&self) -> Result<Vec<OutboxTable>, CdcError> {
        outbox::compile(&self.outbox).map_err(|errors| CdcError::Config(errors.join("; ")))
    }

    /// The column rules compiled, with the salt read: every error named with its key.
    pub fn masking(&self) -> Result<Masking, CdcError> {
        let salt = match &self.masking.salt_file {
            None => None,
            Some(path) => {
                let mut salt = std::fs::read(path).map_err(|e| {
                    CdcError::Config(format!(
                        "masking.salt_file: cannot read {}: {e}",
                        path.display()
                    ))
                })?;
                while salt.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    salt.pop();
                }
                Some(salt)
            }
        };
        Masking::compile(&self.columns, salt).map_err(|errors| CdcError::Config(errors.join("; ")))
    }
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

fn default_chunk_rows() -> usize {
    8192
}

/// The most rows a chunk may hold: its rows wait in memory for their high watermark.
const MAX_CHUNK_ROWS: usize = 1_000_000;

fn default_partitions() -> i32 {
    -1
}

fn default_max_in_flight() -> usize {
    100_000
}

/// A PostgreSQL URL (the setting `key`) without its TLS options, and those options:
/// libpq's `sslmode` values and `sslrootcert` are handled by ficus, not by tokio-postgres.
pub fn split_pg_url(key: &str, url: &str) -> Result<(String, TlsSettings), CdcError> {
    let problem = |e: &dyn std::fmt::Display| CdcError::Config(format!("{key}: {e}"));
    let mut url = url::Url::parse(url).map_err(|e| problem(&e))?;
    let mut tls = TlsSettings { mode: SslMode::Prefer, root_cert: None };
    let mut kept = Vec::new();
    for (name, value) in url.query_pairs() {
        match name.as_ref() {
            "sslmode" => tls.mode = SslMode::parse(&value).map_err(|e| problem(&e))?,
            "sslrootcert" => tls.root_cert = Some(PathBuf::from(value.as_ref())),
            _ => kept.push((name.to_string(), value.to_string())),
        }
    }
    url.set_query(None);
    if !kept.is_empty() {
        url.query_pairs_mut().extend_pairs(kept);
    }
    Ok((url.to_string(), tls))
}

/// The settings of an SQL connection (tokio-postgres) to `url` (the setting `key`), and its
/// TLS settings, which [`crate::tls::client_config`] turns into a TLS client.
pub fn sql_config(key: &str, url: &str) -> Result<(tokio_postgres::Config, TlsSettings), CdcError> {
    let (url, tls) = split_pg_url(key, url)?;
    let mut config: tokio_postgres::Config =
        url.parse().map_err(|e| CdcError::Config(format!("{key}: {e}")))?;
    // Notice a connection the network dropped while idle (a NAT, a load balancer).
    config.keepalives(true).keepalives_idle(Duration::from_secs(30));
    config.ssl_mode(match tls.mode {
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        _ => tokio_postgres::config::SslMode::Require,
    });
    Ok((config, tls))
}

impl SourceConfig {
    /// `url` without its TLS options, and those options.
    pub fn split_url(&self) -> Result<(String, TlsSettings), CdcError> {
        split_pg_url("source.url", &self.url)
    }

    /// The settings of the SQL connection (tokio-postgres); TLS is set up separately.
    pub fn pg_config(&self) -> Result<tokio_postgres::Config, CdcError> {
        Ok(sql_config("source.url", &self.url)?.0)
    }

    /// The TLS settings of `url`.
    pub fn tls(&self) -> Result<TlsSettings, CdcError> {
        Ok(self.split_url()?.1)
    }

    /// The parameters of the replication connection.
    pub fn connect_params(&self) -> Result<ConnectParams, CdcError> {
        let config = self.pg_config()?;
        let tls = self.tls()?;
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
            ssl_mode: tls.mode,
            tls: client_config(&tls)?,
        })
    }

    /// Rejects settings that cannot work.
    pub fn validate(&self) -> Result<(), CdcError> {
        let mut errors = Vec::new();
        if self.heartbeat.is_zero() {
            errors.push("source.heartbeat must be above zero".to_string());
        }
        if !(1..=MAX_CHUNK_ROWS).contains(&self.snapshot_chunk_rows) {
            errors.push(format!(
                "source.snapshot_chunk_rows must be between 1 and {MAX_CHUNK_ROWS}, not {}",
                self.snapshot_chunk_rows
            ));
        }
        for result in [self.table_names().map(drop), self.split_url().map(drop)] {
            if let Err(e) = result {
                errors.push(match e {
                    CdcError::Config(text) => text,
                    other => other.to_string(),
                });
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(CdcError::Config(errors.join("; ")))
        }
    }

    /// The configured tables, parsed; every malformed or repeated name is reported.
    pub fn table_names(&self) -> Result<Option<Vec<TableName>>, CdcError> {
        let Some(tables) = &self.tables else { return Ok(None) };
        let mut names = Vec::with_capacity(tables.len());
        let mut errors = Vec::new();
        for (index, text) in tables.iter().enumerate() {
            match TableName::parse(text) {
                Ok(name) if names.contains(&name) => {
                    errors.push(format!("source.tables[{index}]: {name} is listed twice"))
                }
                Ok(name) => names.push(name),
                Err(e) => errors.push(format!("source.tables[{index}]: {e}")),
            }
        }
        if !errors.is_empty() {
            return Err(CdcError::Config(errors.join("; ")));
        }
        Ok(Some(names))
    }
}

impl KafkaConfig {
    /// Rejects settings that cannot work.
    pub fn validate(&self) -> Result<(), CdcError> {
        let mut errors = Vec::new();
        if self.max_in_flight == 0 {
            errors.push("kafka.max_in_flight must be at least 1");
        }
        if self.topic_prefix.is_empty() {
            errors.push("kafka.topic_prefix must not be empty");
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(CdcError::Config(errors.join("; ")))
        }
    }

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
            props.insert(key.clone(), property(value));
        }
        props.into_iter().collect()
    }

    /// The properties of the admin client that creates topics: the producer's, so that it
    /// reaches the same cluster the same way (SASL, TLS, client id, ...), less those only a
    /// producer has. Kept by leaving out, not by picking, so that a connection property
    /// this list does not know still reaches the admin client.
    pub fn admin_properties(&self) -> Vec<(String, String)> {
        const PRODUCER_ONLY: [&str; 10] = [
            "acks",
            "request.required.acks",
            "enable.idempotence",
            "enable.gapless.guarantee",
            "transactional.id",
            "transaction.timeout.ms",
            "linger.ms",
            "queue.buffering.max.ms",
            "message.timeout.ms",
            "delivery.timeout.ms",
        ];
        const PRODUCER_ONLY_PREFIXES: [&str; 8] = [
            "queue.buffering.",
            "batch.",
            "compression.",
            "message.send.",
            "retries",
            "partitioner",
            "sticky.partitioning",
            "max.in.flight",
        ];
        self.producer_properties()
            .into_iter()
            .filter(|(key, _)| {
                !PRODUCER_ONLY.contains(&key.as_str())
                    && !PRODUCER_ONLY_PREFIXES.iter().any(|prefix| key.starts_with(prefix))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(url: &str) -> SourceConfig {
        SourceConfig {
            url: url.into(),
            publication: "p".into(),
            slot: "s".into(),
            tables: None,
            snapshot: SnapshotMode::Initial,
            heartbeat: Duration::from_secs(1),
            time_precision: Default::default(),
            transaction_metadata: false,
            snapshot_chunk_rows: default_chunk_rows(),
        }
    }

    fn sections(value: serde_json::Value) -> Result<CdcConfig, Vec<String>> {
        CdcConfig::from_sections(value.as_object().expect("object"))
    }

    #[test]
    fn every_section_is_checked_and_every_problem_named() {
        let errors = sections(serde_json::json!({
            "source": {"url": "postgres://u@h/db", "tables": ["a", 5]},
            "kafka": {"topic_prefix": "", "max_in_flight": 0},
            "columns": {"a.b.c": {}},
            "outbox": [{"table": "public.outbox", "typo": 1}],
        }))
        .expect_err("invalid");
        assert!(
            errors.iter().any(|e| e.starts_with("source.tables[1]: invalid type")),
            "{errors:?}"
        );
        assert!(
            errors.iter().any(|e| e.starts_with("outbox[0]") && e.contains("typo")),
            "{errors:?}"
        );
        // The values of sections that parsed are checked too, once all parse.
        let errors = sections(serde_json::json!({
            "source": {"url": "postgres://u@h/db", "heartbeat": "0s", "tables": ["a", "a"]},
            "kafka": {"topic_prefix": "", "max_in_flight": 0},
            "columns": {"a.b.c": {}},
            "outbox": [{"table": "x.y.z"}],
        }))
        .expect_err("invalid");
        for expected in [
            "source.heartbeat must be above zero",
            "source.tables[1]: public.a is listed twice",
            "kafka.max_in_flight must be at least 1",
            "kafka.topic_prefix must not be empty",
            "columns.\"a.b.c\"",
            "outbox[0].table",
        ] {
            assert!(errors.iter().any(|e| e.starts_with(expected)), "{expected}: {errors:?}");
        }
        let missing = sections(serde_json::json!({})).expect_err("no source");
        assert!(
            missing.iter().any(|e| e.starts_with("source: missing field `url`")),
            "{missing:?}"
        );
    }

    #[test]
    fn the_admin_client_reaches_the_cluster_as_the_producer_does() {
        let kafka: KafkaConfig = serde_json::from_value(serde_json::json!({
            "brokers": "kafka:9093",
            "topic_prefix": "shop",
            "producer": {
                "security.protocol": "SASL_SSL",
                "sasl.mechanisms": "SCRAM-SHA-512",
                "sasl.username": "ficus",
                "sasl.password": "secret",
                "ssl.ca.location": "/etc/ficus/ca.pem",
                "client.id": "ficus-cdc",
                "compression.type": "lz4",
                "batch.size": 100000,
            },
        }))
        .expect("kafka config");
        let admin: BTreeMap<String, String> = kafka.admin_properties().into_iter().collect();
        for key in [
            "bootstrap.servers",
            "security.protocol",
            "sasl.mechanisms",
            "sasl.username",
            "sasl.password",
            "ssl.ca.location",
            "client.id",
        ] {
            assert!(admin.contains_key(key), "{key} missing: {admin:?}");
        }
        for key in ["acks", "enable.idempotence", "linger.ms", "compression.type", "batch.size"] {
            assert!(!admin.contains_key(key), "{key} is the producer's: {admin:?}");
        }
    }

    #[test]
    fn tls_options_are_taken_out_of_the_url() {
        let (url, tls) = source("postgres://u:p@db:5433/shop?sslmode=verify-full&sslrootcert=/ca.pem&application_name=x")
            .split_url()
            .expect("valid");
        assert_eq!(url, "postgres://u:p@db:5433/shop?application_name=x");
        assert_eq!(
            tls,
            TlsSettings { mode: SslMode::VerifyFull, root_cert: Some("/ca.pem".into()) }
        );
        let (_, tls) = source("postgres://u@db/shop").split_url().expect("valid");
        assert_eq!(tls.mode, SslMode::Prefer);
        assert!(source("postgres://u@db/shop?sslmode=sometimes").split_url().is_err());
    }

    #[test]
    fn connect_params_come_from_the_url() {
        let params = source("postgres://app:s%C3%A9cret@db.internal:6432/shop?sslmode=disable")
            .connect_params()
            .expect("valid");
        assert_eq!(
            (params.host.as_str(), params.port, params.user.as_str(), params.database.as_str()),
            ("db.internal", 6432, "app", "shop")
        );
        assert_eq!(params.password.as_deref(), Some("sécret".as_bytes()));
        assert!(params.tls.is_none());
    }

    #[test]
    fn configured_tables_parse_and_every_bad_one_is_named() {
        let mut config = source("postgres://u@db/shop");
        config.tables = Some(vec!["orders".into(), "\"a.b\".c".into()]);
        let names = config.table_names().expect("valid").expect("configured");
        assert_eq!(names, [TableName::new("public", "orders"), TableName::new("a.b", "c")]);
        config.tables = Some(vec!["a.b.c".into(), "ok".into(), "public.ok".into(), "\"x".into()]);
        let error = config.validate().expect_err("invalid").to_string();
        assert!(
            error.contains("source.tables[0]") && error.contains("source.tables[3]"),
            "{error}"
        );
        assert!(error.contains("source.tables[2]: public.ok is listed twice"), "{error}");
    }
}
