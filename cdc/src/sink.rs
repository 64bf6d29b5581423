//! The Kafka side: topic creation and an idempotent, `acks=all` producer whose delivery
//! results are awaited in order by [`InFlight`].

use std::collections::HashSet;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesOrdered, StreamExt};
use futures_util::FutureExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode as Code;

use crate::config::KafkaConfig;
use crate::error::CdcError;
use crate::event::Record;
use crate::lsn::Lsn;

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
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &config.brokers)
            .create()
            .map_err(|e| CdcError::Config(format!("kafka admin client: {e}")))?;
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

    /// Hands a record to the producer; the returned future resolves when Kafka acknowledges it.
    pub fn send(
        &self,
        record: &Record,
    ) -> Result<BoxFuture<'static, Result<Option<Lsn>, CdcError>>, SendError> {
        let mut kafka_record = FutureRecord::<[u8], [u8]>::to(&record.topic);
        if let Some(key) = &record.key {
            kafka_record = kafka_record.key(key.as_slice());
        }
        if let Some(value) = &record.value {
            kafka_record = kafka_record.payload(value.as_slice());
        }
        match self.producer.send_result(kafka_record) {
            Ok(delivery) => {
                let topic = record.topic.clone();
                Ok(async move {
                    match delivery.await {
                        Ok(Ok(_)) => Ok(None),
                        Ok(Err((e, _))) => {
                            Err(CdcError::KafkaDelivery { topic, message: e.to_string() })
                        }
                        Err(_) => Err(CdcError::Kafka("the producer was dropped".into())),
                    }
                }
                .boxed())
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
    queue: FuturesOrdered<BoxFuture<'static, Result<Option<Lsn>, CdcError>>>,
    records: usize,
}

impl InFlight {
    pub fn push_record(&mut self, delivery: BoxFuture<'static, Result<Option<Lsn>, CdcError>>) {
        self.records += 1;
        self.queue.push_back(delivery);
    }

    /// Marks the end of a transaction: `lsn` may be confirmed once it completes.
    pub fn push_commit(&mut self, lsn: Lsn) {
        self.queue.push_back(async move { Ok(Some(lsn)) }.boxed());
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Records awaiting acknowledgement.
    pub fn records(&self) -> usize {
        self.records
    }

    /// The next completion, in order: `Some(lsn)` for a commit marker, `None` for a record.
    /// Pending forever when empty, so it can sit in a `select!`.
    pub async fn next(&mut self) -> Result<Option<Lsn>, CdcError> {
        match self.queue.next().await {
            Some(Ok(lsn)) => {
                if lsn.is_none() {
                    self.records -= 1;
                }
                Ok(lsn)
            }
            Some(Err(e)) => Err(e),
            None => std::future::pending().await,
        }
    }
}
