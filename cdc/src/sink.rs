//! The Kafka side: topic creation and an idempotent, `acks=all` producer whose delivery
//! results are awaited in order by [`InFlight`].

use std::collections::HashSet;
use std::time::Duration;

use std::future::Future;
use std::pin::Pin;

use futures_util::stream::{FuturesOrdered, StreamExt};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode as Code;

use crate::config::{CdcConfig, KafkaConfig, Output};
use crate::error::CdcError;
use crate::event::Record;
use crate::lsn::Lsn;

/// The acknowledgement of a record (`Ok(None)`) or a marker (`Ok(Some(marker))`). `Sync` so
/// that the pipeline's futures can move between threads.
pub type Delivery = Pin<Box<dyn Future<Output = Result<Option<Marker>, CdcError>> + Send + Sync>>;

/// What travels behind records, and completes once they are all acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Marker {
    Commit(Commit),
    /// An incremental snapshot's last chunk, of the table named: the position its request
    /// held may be released.
    Release(Lsn, String),
}

/// The end of a source transaction, as it travels behind the transaction's records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    /// The position to confirm once every record before it is acknowledged.
    pub lsn: Lsn,
    /// When the transaction committed on PostgreSQL, in microseconds since the Unix epoch.
    pub commit_time_us: i64,
}

/// Where events go: Kafka, or JSON lines on standard output.
pub enum Sink {
    Kafka(KafkaSink),
    Stdout(StdoutSink),
}

impl Sink {
    pub fn new(config: &CdcConfig) -> Result<Sink, CdcError> {
        Ok(match config.output {
            Output::Kafka => Sink::Kafka(KafkaSink::new(&config.kafka)?),
            Output::Stdout => Sink::Stdout(StdoutSink::new()),
        })
    }

    /// Creates missing topics (Kafka only).
    pub async fn ensure_topics(&mut self, topics: &[String]) -> Result<(), CdcError> {
        match self {
            Sink::Kafka(kafka) => kafka.ensure_topics(topics).await,
            Sink::Stdout(_) => Ok(()),
        }
    }

    /// Whether `topic` is known to exist (always, for standard output).
    pub fn knows(&self, topic: &str) -> bool {
        match self {
            Sink::Kafka(kafka) => kafka.known_topics.contains(topic),
            Sink::Stdout(_) => true,
        }
    }

    /// Hands a record over; the future resolves once it is delivered.
    pub fn send(&mut self, record: &Record) -> Result<Delivery, SendError> {
        match self {
            Sink::Kafka(kafka) => kafka.send(record),
            Sink::Stdout(stdout) => stdout.send(record).map_err(SendError::Fatal),
        }
    }

    /// Makes everything sent so far durable before a position is confirmed: a no-op for
    /// Kafka, whose acknowledgements already say so, a flush for standard output.
    pub fn flush(&mut self) -> Result<(), CdcError> {
        match self {
            Sink::Kafka(_) => Ok(()),
            Sink::Stdout(stdout) => stdout.flush(),
        }
    }
}

/// Writes each record as one JSON line: `{"topic":..,"key":..,"value":..}`, and
/// `"headers":{name: value}` when it has headers (their values are JSON keys).
pub struct StdoutSink {
    out: std::io::BufWriter<std::io::Stdout>,
}

impl StdoutSink {
    pub fn new() -> StdoutSink {
        StdoutSink { out: std::io::BufWriter::with_capacity(1 << 20, std::io::stdout()) }
    }

    fn send(&mut self, record: &Record) -> Result<Delivery, CdcError> {
        use std::io::Write;
        let json = |bytes: &Option<Vec<u8>>| bytes.as_deref().unwrap_or(b"null").to_vec();
        let topic = serde_json::to_string(&record.topic).unwrap_or_default();
        let mut headers = Vec::new();
        for (n, (name, value)) in record.headers.iter().enumerate() {
            headers.extend_from_slice(if n == 0 { b",\"headers\":{" } else { b"," });
            headers.extend_from_slice(serde_json::to_string(name).unwrap_or_default().as_bytes());
            headers.push(b':');
            headers.extend_from_slice(value);
        }
        if !headers.is_empty() {
            headers.push(b'}');
        }
        let line = [
            b"{\"topic\":".as_slice(),
            topic.as_bytes(),
            b",\"key\":",
            &json(&record.key),
            b",\"value\":",
            &json(&record.value),
            &headers,
            b"}\n",
        ]
        .concat();
        self.out
            .write_all(&line)
            .map_err(|e| CdcError::Kafka(format!("cannot write to standard output: {e}")))?;
        Ok(Box::pin(std::future::ready(Ok(None))))
    }

    fn flush(&mut self) -> Result<(), CdcError> {
        use std::io::Write;
        self.out
            .flush()
            .map_err(|e| CdcError::Kafka(format!("cannot write to standard output: {e}")))
    }
}

impl Default for StdoutSink {
    fn default() -> Self {
        StdoutSink::new()
    }
}

/// Produces records to Kafka.
pub struct KafkaSink {
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    partitions: i32,
    replication_factor: i32,
    known_topics: HashSet<String>,
}

/// Why a record was not handed to the producer.
pub enum SendError {
    /// The producer's queue is full: wait for deliveries and try again.
    QueueFull,
    Fatal(CdcError),
}

impl KafkaSink {
    pub fn new(config: &KafkaConfig) -> Result<KafkaSink, CdcError> {
        let mut client = ClientConfig::new();
        for (key, value) in config.producer_properties() {
            client.set(key, value);
        }
        let producer: FutureProducer =
            client.create().map_err(|e| CdcError::Config(format!("kafka producer: {e}")))?;
        let mut admin = ClientConfig::new();
        for (key, value) in config.admin_properties() {
            admin.set(key, value);
        }
        let admin: AdminClient<DefaultClientContext> =
            admin.create().map_err(|e| CdcError::Config(format!("kafka admin client: {e}")))?;
        Ok(KafkaSink {
            producer,
            admin,
            partitions: config.partitions,
            replication_factor: config.replication_factor,
            known_topics: HashSet::new(),
        })
    }

    /// Creates the topics that do not exist yet.
    pub async fn ensure_topics(&mut self, topics: &[String]) -> Result<(), CdcError> {
        if topics.iter().all(|t| self.known_topics.contains(t)) {
            return Ok(());
        }
        // Topics created beforehand (by an operator, or on clusters without CreateTopics
        // rights) are used as they are.
        self.known_topics.extend(self.existing_topics().await?);
        let missing: Vec<&String> =
            topics.iter().filter(|t| !self.known_topics.contains(*t)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        let new_topics: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|t| {
                NewTopic::new(
                    t.as_str(),
                    self.partitions,
                    TopicReplication::Fixed(self.replication_factor),
                )
            })
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let results = self
            .admin
            .create_topics(&new_topics, &options)
            .await
            .map_err(|e| CdcError::Kafka(format!("cannot create topics: {e}")))?;
        for result in results {
            match result {
                Ok(topic) => tracing::info!(topic, "created topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    return Err(CdcError::Kafka(format!("cannot create topic {topic}: {code}")))
                }
            }
        }
        self.known_topics.extend(missing.into_iter().cloned());
        Ok(())
    }

    /// Every topic of the cluster.
    async fn existing_topics(&self) -> Result<Vec<String>, CdcError> {
        let producer = self.producer.clone();
        let metadata = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, Duration::from_secs(30))
                .map(|m| m.topics().iter().map(|t| t.name().to_string()).collect::<Vec<_>>())
        })
        .await
        .map_err(|e| CdcError::Kafka(format!("metadata task failed: {e}")))?;
        metadata.map_err(|e| CdcError::Kafka(format!("cannot list topics: {e}")))
    }

    /// Hands a record to the producer; the returned future resolves when Kafka acknowledges it.
    pub fn send(&self, record: &Record) -> Result<Delivery, SendError> {
        let mut kafka_record = FutureRecord::<[u8], [u8]>::to(&record.topic);
        if let Some(key) = &record.key {
            kafka_record = kafka_record.key(key.as_slice());
        }
        if let Some(value) = &record.value {
            kafka_record = kafka_record.payload(value.as_slice());
        }
        if !record.headers.is_empty() {
            let headers = record.headers.iter().fold(
                OwnedHeaders::new_with_capacity(record.headers.len()),
                |headers, (key, value)| headers.insert(Header { key, value: Some(value) }),
            );
            kafka_record = kafka_record.headers(headers);
        }
        match self.producer.send_result(kafka_record) {
            Ok(delivery) => {
                let topic = record.topic.clone();
                Ok(Box::pin(async move {
                    match delivery.await {
                        Ok(Ok(_)) => Ok(None),
                        Ok(Err((e, _))) => {
                            Err(CdcError::KafkaDelivery { topic, message: e.to_string() })
                        }
                        Err(_) => Err(CdcError::Kafka("the producer was dropped".into())),
                    }
                }))
            }
            Err((KafkaError::MessageProduction(Code::QueueFull), _)) => Err(SendError::QueueFull),
            Err((e, _)) => Err(SendError::Fatal(CdcError::KafkaDelivery {
                topic: record.topic.clone(),
                message: e.to_string(),
            })),
        }
    }

    /// Waits up to `timeout` for every record handed over to be delivered.
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.producer.flush(timeout) {
            tracing::warn!(error = %e, "not every record was delivered before shutdown; they will be sent again");
        }
    }
}

/// Records and commit markers in the order they were produced. A commit marker completes
/// only after every record before it has been acknowledged, so the LSNs it yields are safe
/// to confirm to PostgreSQL.
#[derive(Default)]
pub struct InFlight {
    queue: FuturesOrdered<Delivery>,
    records: usize,
}

impl InFlight {
    pub fn push_record(&mut self, delivery: Delivery) {
        self.records += 1;
        self.queue.push_back(delivery);
    }

    /// Marks a point in the records (a transaction's end, whose LSN may be confirmed once it
    /// completes; a snapshot's last row).
    pub fn push_marker(&mut self, marker: Marker) {
        self.queue.push_back(Box::pin(async move { Ok(Some(marker)) }));
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Records awaiting acknowledgement.
    pub fn records(&self) -> usize {
        self.records
    }

    /// The next completion, in order: `Some(marker)` for a marker, `None` for a record.
    /// Pending forever when empty, so it can sit in a `select!`.
    pub async fn next(&mut self) -> Result<Option<Marker>, CdcError> {
        match self.queue.next().await {
            Some(Ok(marker)) => {
                if marker.is_none() {
                    self.records -= 1;
                }
                Ok(marker)
            }
            Some(Err(e)) => Err(e),
            None => std::future::pending().await,
        }
    }
}
