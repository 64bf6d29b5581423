//! Reading the topics: a consumer of every partition from given offsets, batches of
//! messages, and the check that reading resumed where it should (a broker may answer a
//! fetch from the middle of a record batch with a later batch), for both deliveries.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures_util::StreamExt;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    Consumer, ConsumerContext, DefaultConsumerContext, MessageStream, StreamConsumer,
};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use regex::Regex;

use crate::config::KafkaConfig;
use crate::metrics::Metrics;
use crate::run::SinkError;

/// How often the topics are listed again for `kafka.topic_regex`.
pub const LIST_EVERY: Duration = Duration::from_secs(5);

/// How far before its stored offset a partition is read again at start.
const LOOK_BACK: i64 = 1000;

/// Each partition's position, by topic and partition.
pub type Positions = BTreeMap<(String, i32), Position>;

/// The positions to check reading against, from the offsets after the last delivered events.
pub fn positions(stored: &BTreeMap<(String, i32), i64>) -> Positions {
    stored
        .iter()
        .map(|(key, &next)| (key.clone(), Position { next, verified: false, step: 2 * LOOK_BACK }))
        .collect()
}

/// A consumer of the configured brokers, not reading yet.
pub fn client(kafka: &KafkaConfig) -> Result<StreamConsumer, SinkError> {
    client_with(kafka, DefaultConsumerContext)
}

/// A consumer of the configured brokers whose callbacks `context` answers.
pub fn client_with<C: ConsumerContext + 'static>(
    kafka: &KafkaConfig,
    context: C,
) -> Result<StreamConsumer<C>, SinkError> {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &kafka.brokers)
        .set("group.id", kafka.name())
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // Some Kafka-compatible brokers (Tansu) answer a fetch only once this wait is over,
        // even with data at hand: librdkafka's 500 ms held reading to 28k events/s there.
        // Kafka answers as soon as there is data; the wait only paces fetches when idle.
        .set("fetch.wait.max.ms", "100")
        // A start a little before the stored offset that is no longer in the topic starts
        // at its beginning (then checked by `admit`), not at its end.
        .set("auto.offset.reset", "earliest")
        // For the webhook's group membership (the tables' delivery assigns itself every
        // partition): a member joining or leaving moves only the partitions that must move,
        // the others' deliveries go on; and change topics often have one partition, which
        // `range` would give, every one, to the same member. With Tansu, the eager
        // `roundrobin` left a dead member's partition unassigned; this one takes it over.
        .set("partition.assignment.strategy", "cooperative-sticky");
    for (key, value) in &kafka.consumer {
        client.set(key, ficus_cdc::config::property(value));
    }
    client
        .create_with_context(context)
        .map_err(|e| SinkError::Config(format!("kafka consumer: {e}")))
}

/// Every partition of `topics`.
pub fn partitions<C: ConsumerContext>(
    consumer: &StreamConsumer<C>,
    topics: &[String],
) -> Result<Vec<(String, i32)>, SinkError> {
    let mut partitions = Vec::new();
    for topic in topics {
        let metadata = tokio::task::block_in_place(|| {
            consumer.fetch_metadata(Some(topic), Duration::from_secs(10))
        })
        .map_err(|e| SinkError::Kafka(format!("metadata of {topic}: {e}")))?;
        let count = metadata
            .topics()
            .first()
            .filter(|t| t.error().is_none())
            .map_or(0, |t| t.partitions().len());
        if count == 0 {
            return Err(SinkError::Kafka(format!("topic {topic} does not exist (yet)")));
        }
        partitions.extend((0..count as i32).map(|p| (topic.clone(), p)));
    }
    Ok(partitions)
}

/// The topics whose whole name `pattern` matches, sorted (Kafka's own `__` topics left out).
pub fn matching<C: ConsumerContext>(
    consumer: &StreamConsumer<C>,
    pattern: &Regex,
) -> Result<Vec<String>, SinkError> {
    let metadata =
        tokio::task::block_in_place(|| consumer.fetch_metadata(None, Duration::from_secs(10)))
            .map_err(|e| SinkError::Kafka(format!("the list of topics: {e}")))?;
    let mut topics: Vec<String> = metadata
        .topics()
        .iter()
        .map(|t| t.name().to_string())
        .filter(|name| !name.starts_with("__") && pattern.is_match(name))
        .collect();
    topics.sort_unstable();
    Ok(topics)
}

/// The offsets of `list` that are offsets (a partition with none committed has none).
pub fn offsets(list: &TopicPartitionList) -> BTreeMap<(String, i32), i64> {
    list.elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(next) => Some(((e.topic().to_string(), e.partition()), next)),
            _ => None,
        })
        .collect()
}

/// Reads every partition from a little before its stored offset, or from the start.
pub fn assign<C: ConsumerContext>(
    consumer: &StreamConsumer<C>,
    partitions: &[(String, i32)],
    stored: &BTreeMap<(String, i32), i64>,
) -> Result<(), SinkError> {
    let mut assignment = TopicPartitionList::new();
    for key in partitions {
        assignment
            .add_partition_offset(&key.0, key.1, start(stored.get(key).copied()))
            .map_err(|e| SinkError::Kafka(e.to_string()))?;
    }
    consumer.assign(&assignment).map_err(|e| SinkError::Kafka(format!("assign: {e}")))
}

/// Where to start reading a partition whose next event to deliver is `stored` (none: all
/// of it): a little before it, since a broker may answer a fetch from the middle of a record
/// batch with nothing until the next batch (Tansu does). The events before it are
/// recognised and passed over (`admit`).
pub fn start(stored: Option<i64>) -> Offset {
    match stored {
        Some(next) if next > LOOK_BACK => Offset::Offset(next - LOOK_BACK),
        _ => Offset::Beginning,
    }
}

/// Stops fetching a partition (stopped at an event that cannot be delivered, or holding
/// enough); its events already fetched are for the caller to drop or keep.
pub fn pause<C: ConsumerContext>(consumer: &StreamConsumer<C>, topic: &str, partition: i32) {
    if let Err(e) = consumer.pause(&one(topic, partition)) {
        tracing::warn!(error = %e, topic, partition, "cannot pause a partition; its events are dropped or held instead");
    }
}

/// Fetches a paused partition again, from the event after the last one admitted, checked
/// as a start is: librdkafka refetches from there, which may be the middle of a record
/// batch, and a broker may answer that with the next batch (Tansu does: a test lost 181
/// events so before this check).
pub fn resume<C: ConsumerContext>(
    consumer: &StreamConsumer<C>,
    positions: &mut Positions,
    topic: &str,
    partition: i32,
) -> Result<(), SinkError> {
    consumer
        .resume(&one(topic, partition))
        .map_err(|e| SinkError::Kafka(format!("resume {topic} partition {partition}: {e}")))?;
    let Some(position) = positions.get_mut(&(topic.to_string(), partition)) else {
        return Ok(());
    };
    // Events fetched before the seek are dropped by librdkafka (a new fetch version).
    tokio::task::block_in_place(|| {
        consumer.seek(topic, partition, Offset::Offset(position.next), Duration::from_secs(10))
    })
    .map_err(|e| SinkError::Kafka(format!("seek {topic} partition {partition}: {e}")))?;
    position.unverify();
    Ok(())
}

/// A list of one partition.
fn one(topic: &str, partition: i32) -> TopicPartitionList {
    let mut list = TopicPartitionList::new();
    list.add_partition(topic, partition);
    list
}

/// The next batch: waits up to a second for a first event, then up to `linger` for more,
/// `max` at most.
pub async fn collect(
    messages: &mut MessageStream<'_, DefaultConsumerContext>,
    max: usize,
    linger: Duration,
) -> Result<Vec<OwnedMessage>, SinkError> {
    let mut batch = Vec::new();
    let mut wait = tokio::time::Instant::now() + Duration::from_secs(1);
    while batch.len() < max {
        let Ok(message) = tokio::time::timeout_at(wait, messages.next()).await else { break };
        let message = message.ok_or_else(|| SinkError::Kafka("the consumer stopped".into()))?;
        batch.push(message.map_err(|e| SinkError::Kafka(e.to_string()))?.detach());
        if batch.len() == 1 {
            wait = tokio::time::Instant::now() + linger;
        }
    }
    Ok(batch)
}

/// Checks every partition's reading again, as at a start: after a consumer-group rebalance,
/// librdkafka refetches the partitions kept from this member's positions.
pub fn unverify(positions: &mut Positions) {
    positions.values_mut().for_each(Position::unverify);
}

/// Where a partition is read from: the offset after the last applied event.
pub struct Position {
    pub next: i64,
    /// Whether reading is known to have resumed at or before `next`. A broker may answer a
    /// fetch from the middle of a record batch with a later batch (Tansu does), which would
    /// skip events; so the first event must not be past `next`.
    verified: bool,
    /// How far back to seek when it is.
    step: i64,
}

impl Position {
    /// Reading is to be checked again, as at a start (after a seek or a refetch).
    fn unverify(&mut self) {
        self.verified = false;
        self.step = LOOK_BACK;
    }
}

/// Whether to apply `message`: not one applied already, and not one read past a gap that
/// seeking from the stored offset left (then the partition is read again from further
/// back: the rest of the batch from it, in `sought`, is dropped too).
pub fn admit<C: ConsumerContext>(
    consumer: &StreamConsumer<C>,
    positions: &mut Positions,
    sought: &mut BTreeSet<(String, i32)>,
    message: &OwnedMessage,
) -> bool {
    let key = (message.topic().to_string(), message.partition());
    if sought.contains(&key) {
        return false;
    }
    let Some(position) = positions.get_mut(&key) else {
        // Read from its beginning: nothing before it.
        positions.insert(key, Position { next: message.offset() + 1, verified: true, step: 0 });
        return true;
    };
    let offset = message.offset();
    if !position.verified {
        if offset > position.next && position.step > 0 {
            let from = position.next - position.step;
            let seek = if from <= 0 { Offset::Beginning } else { Offset::Offset(from) };
            tracing::debug!(
                topic = key.0,
                partition = key.1,
                expected = position.next,
                got = offset,
                ?seek,
                "the broker skipped events: reading the partition again from further back"
            );
            let result = tokio::task::block_in_place(|| {
                consumer.seek(&key.0, key.1, seek, Duration::from_secs(10))
            });
            if let Err(e) = result {
                // Held, not passed over: the next message of the partition tries again.
                tracing::warn!(error = %e, topic = key.0, partition = key.1, "cannot seek back; the partition waits");
            } else {
                position.step = if from <= 0 { 0 } else { position.step * 2 };
            }
            sought.insert(key);
            return false;
        }
        if offset > position.next {
            tracing::error!(
                topic = key.0,
                partition = key.1,
                "offsets {}..{offset} are no longer in the topic (retention?): they were never applied or delivered",
                position.next
            );
        }
        position.verified = true;
    }
    if offset < position.next {
        return false;
    }
    position.next = offset + 1;
    true
}

/// Publishes how far each partition is behind its high watermark, given the offset after
/// the last event it has done with (asked of the broker; a partition that does not answer
/// in time keeps its last figure).
pub fn lag<'a, C: ConsumerContext>(
    consumer: &StreamConsumer<C>,
    done: impl IntoIterator<Item = (&'a (String, i32), i64)>,
    metrics: &Metrics,
) {
    for (key, next) in done {
        let asked = tokio::task::block_in_place(|| {
            consumer.fetch_watermarks(&key.0, key.1, Duration::from_secs(1))
        });
        if let Ok((_, high)) = asked {
            let partition = key.1.to_string();
            let behind = (high - next).max(0);
            metrics.lag.with_label_values(&[&key.0, &partition]).set(behind);
        }
    }
}
