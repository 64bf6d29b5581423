//! The webhook delivery's I/O: reads the partitions the consumer group gives this member
//! (replicas share them) from the group's committed offsets, POSTs each partition's events
//! in order, sends again with back-off what the endpoint fails or does not answer in time
//! (never skipping), and commits the offsets after what it took: at least once. Partitions go side by side: one being sent again, or stopped by a refusal
//! (4xx, saying why), holds only itself, and holds about `MIN_HELD` (or 4 requests) of
//! events read ahead before its fetching pauses.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::future::{AbortHandle, Abortable};
use futures_util::stream::{FuturesUnordered, StreamExt};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::ClientContext;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;

use crate::config::{KafkaConfig, OnError, WebhookConfig};
use crate::metrics::{Delivery, Metrics};
use crate::run::SinkError;
use crate::source;
use crate::webhook::{self, HookEvent, Secret, Verdict};

/// The longest wait between two tries of one request (a `Retry-After` may ask for more, up
/// to `MAX_RETRY_AFTER`).
const MAX_BACKOFF: Duration = Duration::from_secs(10);
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// How often the partitions' high watermarks are asked for.
const LAG_EVERY: Duration = Duration::from_secs(2);

/// Delivers `topics` (or those `kafka.topic_regex` matches, as they appear) to the webhook
/// until `shutdown` turns true or Kafka fails. Replicas of the sink share the partitions as
/// members of the consumer group `kafka.name`: each partition is delivered by one of them.
pub async fn run_once(
    kafka: &KafkaConfig,
    topics: &[String],
    hook: &WebhookConfig,
    metrics: &Metrics,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), SinkError> {
    let poster = Poster::new(hook, metrics)?;
    let pattern = kafka.topic_pattern().map_err(SinkError::Config)?;
    let (changes, mut changed) = tokio::sync::mpsc::unbounded_channel();
    let consumer = source::client_with(kafka, Group { changes })?;
    let mut topics = match &pattern {
        Some(pattern) => source::matching(&consumer, pattern)?,
        None => topics.to_vec(),
    };
    if topics.is_empty() {
        return Err(SinkError::Kafka("no topic matches kafka.topic_regex yet".into()));
    }
    // Each exists, or this says which does not (a subscription would wait in silence).
    source::partitions(&consumer, &topics)?;
    subscribe(&consumer, &topics)?;
    tracing::info!(url = poster.shown_url, topics = %topics.join(", "), group = kafka.name(), "webhook delivery started");
    metrics.set_up(Delivery::Webhook, true);
    let mut owned = Owned::new(hook, metrics);
    let mut sending = FuturesUnordered::new();
    let mut lag_read = Instant::now().checked_sub(LAG_EVERY).unwrap_or_else(Instant::now);
    let mut listed = Instant::now();
    let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
    // One stream for the whole run, taken a message at a time: waiting on its next message
    // may be given up without losing one.
    let mut messages = consumer.stream();
    let delivered: Result<(), SinkError> = async {
        loop {
            // The group's changes come from inside the stream's poll, before the messages
            // of the partitions they give.
            owned.follow(&mut changed)?;
            // Each partition on its own: one request under way at a time, in order, so one
            // being sent again holds only its own partition.
            let now = tokio::time::Instant::now();
            for (key, queue) in &mut owned.queues {
                if let Some(events) = queue.due(now, hook.batch) {
                    let (abort, registration) = AbortHandle::new_pair();
                    queue.abort = Some(abort);
                    let request = poster.partition(key.clone(), events, shutdown.clone());
                    sending.push(Abortable::new(request, registration));
                }
            }
            let next_due = owned.queues.values().filter_map(Queue::waiting_until).min();
            tokio::select! {
                message = messages.next() => {
                    let message = message.ok_or_else(|| SinkError::Kafka("the consumer stopped".into()))?;
                    let message = message.map_err(|e| SinkError::Kafka(e.to_string()))?.detach();
                    owned.follow(&mut changed)?;
                    owned.read(&consumer, message, tokio::time::Instant::now() + hook.linger);
                }
                Some(done) = sending.next(), if !sending.is_empty() => {
                    // A partition taken away meanwhile is given up before its outcome counts.
                    owned.follow(&mut changed)?;
                    // Aborted: the partition went to another member, which sends it again.
                    let Ok((key, outcome)) = done else { continue };
                    owned.delivered(&consumer, key, outcome)?;
                }
                // A partition taken away: its request under way is given up at once.
                Some(change) = changed.recv() => owned.apply(change)?,
                () = sleep_until(next_due), if next_due.is_some() => {}
                _ = housekeeping.tick() => {
                    if let Some(pattern) = pattern.as_ref().filter(|_| listed.elapsed() >= source::LIST_EVERY) {
                        listed = Instant::now();
                        // A table added to ficus cdc later is a new topic: read it too.
                        let now = source::matching(&consumer, pattern)?;
                        let new: Vec<&String> = now.iter().filter(|t| !topics.contains(t)).collect();
                        if !new.is_empty() {
                            tracing::info!(topics = ?new, "new topics match kafka.topic_regex: delivering them too");
                            subscribe(&consumer, &now)?;
                            topics = now;
                        }
                    }
                    if lag_read.elapsed() >= LAG_EVERY {
                        lag_read = Instant::now();
                        owned.lag(&consumer);
                    }
                }
                _ = shutdown.changed() => return Ok(()),
            }
        }
    }
    .await;
    // A restart reads a stopped partition again.
    metrics.stopped.sub(owned.stopped.len() as i64);
    delivered
}

fn subscribe<C: ConsumerContext>(
    consumer: &StreamConsumer<C>,
    topics: &[String],
) -> Result<(), SinkError> {
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics).map_err(|e| SinkError::Kafka(format!("subscribe: {e}")))
}

/// A change of the partitions the consumer group gives this member.
enum Change {
    /// A rebalance began: librdkafka paused and will refetch every partition kept, from
    /// this member's position, which a broker may answer with a later record batch.
    Rebalancing,
    /// Given, with the offsets committed for them (reading starts a little before).
    Assigned(BTreeMap<(String, i32), i64>),
    Revoked(Vec<(String, i32)>),
    /// The rebalance could not be carried out: the delivery starts again.
    Failed(String),
}

/// The consumer's callbacks: each partition the group gives is read from a little before
/// its committed offset ([`source::start`]), and every change is handed to the delivery.
struct Group {
    changes: tokio::sync::mpsc::UnboundedSender<Change>,
}

impl ClientContext for Group {}

impl ConsumerContext for Group {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        partitions: &mut TopicPartitionList,
    ) {
        let _ = self.changes.send(Change::Rebalancing);
        let change = if err == RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS {
            take(consumer, partitions)
        } else {
            give_up(consumer, partitions)
        };
        let _ = self.changes.send(change.unwrap_or_else(Change::Failed));
    }
}

/// Takes the partitions the group gives, each from a little before its committed offset.
fn take(
    consumer: &BaseConsumer<Group>,
    partitions: &mut TopicPartitionList,
) -> Result<Change, String> {
    // Blocking is what a rebalance callback does (the group waits for it); not the worker.
    let committed = tokio::task::block_in_place(|| {
        consumer.committed_offsets(partitions.clone(), Duration::from_secs(10))
    })
    .map_err(|e| format!("the group's committed offsets of the given partitions: {e}"))?;
    let stored = source::offsets(&committed);
    for element in committed.elements() {
        let key = (element.topic().to_string(), element.partition());
        partitions
            .set_partition_offset(&key.0, key.1, source::start(stored.get(&key).copied()))
            .map_err(|e| format!("where to read {} partition {}: {e}", key.0, key.1))?;
    }
    let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
    let taken = if cooperative {
        consumer.incremental_assign(partitions)
    } else {
        consumer.assign(partitions)
    };
    taken.map_err(|e| format!("taking the given partitions: {e}"))?;
    // Paused here before it went to another member (full, or stopped at a refusal), a
    // partition given back is read again: this member holds nothing of it now.
    consumer.resume(partitions).map_err(|e| format!("resuming the given partitions: {e}"))?;
    tracing::info!(from = ?stored, partitions = partitions.count(), "the consumer group gave these partitions");
    Ok(Change::Assigned(stored))
}

/// Gives up the partitions the group takes away.
fn give_up(
    consumer: &BaseConsumer<Group>,
    partitions: &TopicPartitionList,
) -> Result<Change, String> {
    let keys: Vec<(String, i32)> =
        partitions.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect();
    let given_up = match consumer.rebalance_protocol() {
        RebalanceProtocol::Cooperative => consumer.incremental_unassign(partitions),
        _ => consumer.unassign(),
    };
    given_up.map_err(|e| format!("giving up the revoked partitions: {e}"))?;
    tracing::info!(partitions = ?keys, "the consumer group took these partitions away");
    Ok(Change::Revoked(keys))
}

/// The partitions this member delivers, and their events read and not yet delivered.
struct Owned<'a> {
    positions: source::Positions,
    queues: BTreeMap<(String, i32), Queue>,
    /// Stopped at a refusal; not read again until a restart.
    stopped: BTreeSet<(String, i32)>,
    /// A partition holds this many events at most; then it is paused until it is under half.
    most: usize,
    metrics: &'a Metrics,
}

impl<'a> Owned<'a> {
    fn new(hook: &WebhookConfig, metrics: &'a Metrics) -> Owned<'a> {
        Owned {
            positions: BTreeMap::new(),
            queues: BTreeMap::new(),
            stopped: BTreeSet::new(),
            most: hook.batch.saturating_mul(4).max(MIN_HELD),
            metrics,
        }
    }

    /// Takes in the group's changes waiting.
    fn follow(
        &mut self,
        changed: &mut tokio::sync::mpsc::UnboundedReceiver<Change>,
    ) -> Result<(), SinkError> {
        while let Ok(change) = changed.try_recv() {
            self.apply(change)?;
        }
        Ok(())
    }

    fn apply(&mut self, change: Change) -> Result<(), SinkError> {
        match change {
            Change::Rebalancing => source::unverify(&mut self.positions),
            Change::Failed(why) => return Err(SinkError::Kafka(format!("consumer group: {why}"))),
            Change::Assigned(stored) => self.positions.extend(source::positions(&stored)),
            Change::Revoked(keys) => {
                for key in keys {
                    self.positions.remove(&key);
                    if let Some(abort) = self.queues.remove(&key).and_then(|q| q.abort) {
                        abort.abort();
                    }
                    if self.stopped.remove(&key) {
                        self.metrics.stopped.dec();
                    }
                    let partition = key.1.to_string();
                    let _ = self.metrics.lag.remove_label_values(&[&key.0, &partition]);
                }
            }
        }
        Ok(())
    }

    /// Queues a message read, unless it is of a stopped partition or was delivered already.
    fn read<C: ConsumerContext>(
        &mut self,
        consumer: &StreamConsumer<C>,
        message: OwnedMessage,
        send_at: tokio::time::Instant,
    ) {
        let key = (message.topic().to_string(), message.partition());
        if self.stopped.contains(&key)
            || !source::admit(consumer, &mut self.positions, &mut BTreeSet::new(), &message)
        {
            return;
        }
        let queue = self.queues.entry(key.clone()).or_default();
        queue.push(message, send_at);
        if queue.events.len() >= self.most && !queue.paused {
            queue.paused = true;
            source::pause(consumer, &key.0, key.1);
        }
    }

    /// Commits what a request delivered; stops its partition if it was refused.
    fn delivered<C: ConsumerContext>(
        &mut self,
        consumer: &StreamConsumer<C>,
        key: (String, i32),
        outcome: Outcome,
    ) -> Result<(), SinkError> {
        let Some(queue) = self.queues.get_mut(&key) else { return Ok(()) };
        queue.finished();
        if let Some(next) = outcome.delivered {
            let mut commit = TopicPartitionList::new();
            commit
                .add_partition_offset(&key.0, key.1, Offset::Offset(next))
                .map_err(|e| SinkError::Kafka(e.to_string()))?;
            // Committed in the background, so that no partition waits on the group
            // coordinator: a crash repeats the requests whose commit had not landed.
            match consumer
                .commit(&commit, CommitMode::Async)
                .map_err(|e| (e.rdkafka_error_code(), e))
            {
                Ok(()) => {}
                // The group is moving the partition: its new member sends these again.
                Err((Some(code), e)) if GROUP_MOVING.contains(&code) => {
                    tracing::warn!(error = %e, topic = key.0, partition = key.1, "commit refused while the group rebalances: the partition's next member sends these events again");
                }
                Err((_, e)) => {
                    return Err(SinkError::Kafka(format!("commit of the webhook's offsets: {e}")))
                }
            }
        }
        if let Some(reason) = outcome.stopped {
            tracing::error!("{reason}");
            if !queue.paused {
                source::pause(consumer, &key.0, key.1);
            }
            self.queues.remove(&key);
            self.stopped.insert(key);
            self.metrics.stopped.inc();
        } else if queue.paused && queue.events.len() <= self.most / 2 {
            queue.paused = false;
            source::resume(consumer, &mut self.positions, &key.0, key.1)?;
        }
        Ok(())
    }

    /// Publishes how far each partition is behind what was delivered (held events count).
    fn lag<C: ConsumerContext>(&self, consumer: &StreamConsumer<C>) {
        let done = self.positions.iter().map(|(key, position)| {
            let held = self.queues.get(key).map_or(0, Queue::held);
            (key, position.next - held as i64)
        });
        source::lag(consumer, done, self.metrics);
    }
}

/// Commit errors that mean the group is moving partitions, not that Kafka failed.
const GROUP_MOVING: [RDKafkaErrorCode; 4] = [
    RDKafkaErrorCode::RebalanceInProgress,
    RDKafkaErrorCode::IllegalGeneration,
    RDKafkaErrorCode::UnknownMemberId,
    RDKafkaErrorCode::AssignmentLost,
];

/// Sleeps until `until`, or forever without one.
async fn sleep_until(until: Option<tokio::time::Instant>) {
    match until {
        Some(until) => tokio::time::sleep_until(until).await,
        None => std::future::pending().await,
    }
}

/// The fewest events a partition may hold before it is paused, whatever `webhook.batch`.
const MIN_HELD: usize = 1000;

/// A partition's events read and not yet delivered.
#[derive(Default)]
struct Queue {
    events: VecDeque<OwnedMessage>,
    /// When the first waiting event goes without a full request (it waited `linger`).
    send_at: Option<tokio::time::Instant>,
    /// Events in the request under way (0: none is).
    sending: usize,
    /// Whether fetching is paused because the queue is full.
    paused: bool,
    /// Cancels the request under way (the partition went to another member).
    abort: Option<AbortHandle>,
}

impl Queue {
    fn push(&mut self, message: OwnedMessage, send_at: tokio::time::Instant) {
        self.send_at.get_or_insert(send_at);
        self.events.push_back(message);
    }

    /// The next request's events, if none is under way and a full request is waiting or
    /// the first event has waited long enough.
    fn due(&mut self, now: tokio::time::Instant, batch: usize) -> Option<Vec<OwnedMessage>> {
        let ready = self.events.len() >= batch || self.send_at.is_some_and(|at| at <= now);
        if self.sending > 0 || self.events.is_empty() || !ready {
            return None;
        }
        let events: Vec<OwnedMessage> = self.events.drain(..batch.min(self.events.len())).collect();
        self.sending = events.len();
        // What is left has waited already: it goes as soon as this request is taken.
        self.send_at = if self.events.is_empty() { None } else { Some(now) };
        Some(events)
    }

    /// The request under way was taken, refused or given up.
    fn finished(&mut self) {
        self.sending = 0;
    }

    /// When the next request is due, if it waits only for time.
    fn waiting_until(&self) -> Option<tokio::time::Instant> {
        if self.sending > 0 || self.events.is_empty() {
            None
        } else {
            self.send_at
        }
    }

    /// Events read and not yet delivered.
    fn held(&self) -> usize {
        self.events.len() + self.sending
    }
}

/// What became of a partition's events in one round.
struct Outcome {
    /// The offset after the last event taken (or skipped), if any was.
    delivered: Option<i64>,
    /// Why the partition stops, if it does.
    stopped: Option<String>,
}

/// Sends requests to the endpoint.
struct Poster<'a> {
    http: reqwest::Client,
    /// The URL as logs show it: without a password or query, which may hold a token.
    shown_url: String,
    hook: &'a WebhookConfig,
    secret: Option<Secret>,
    metrics: &'a Metrics,
}

impl<'a> Poster<'a> {
    fn new(hook: &'a WebhookConfig, metrics: &'a Metrics) -> Result<Poster<'a>, SinkError> {
        let secret = match &hook.secret_file {
            Some(path) => {
                let problem = |e: String| {
                    SinkError::Config(format!("webhook.secret_file {}: {e}", path.display()))
                };
                let text = std::fs::read_to_string(path).map_err(|e| problem(e.to_string()))?;
                Some(Secret::parse(&text).map_err(problem)?)
            }
            None => {
                tracing::warn!("webhook.secret_file is not set: requests are not signed");
                None
            }
        };
        let http = reqwest::Client::builder()
            .timeout(hook.timeout)
            // A redirect is an answer to fix, not to follow with the events.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| SinkError::Config(format!("webhook client: {e}")))?;
        let shown_url = reqwest::Url::parse(&hook.url).map_or_else(
            |_| "the webhook URL".to_string(),
            |mut url| {
                url.set_query(None);
                // Fails only for URLs that cannot have one.
                let _ = url.set_password(None);
                url.to_string()
            },
        );
        Ok(Poster { http, shown_url, hook, secret, metrics })
    }

    /// Delivers `events` of one partition in order, in requests of `webhook.batch` events,
    /// each sent until the endpoint takes or refuses it (or the sink stops).
    async fn partition(
        &self,
        key: (String, i32),
        events: Vec<OwnedMessage>,
        mut shutdown: watch::Receiver<bool>,
    ) -> ((String, i32), Outcome) {
        let outcome = self.deliver(&key.0, key.1, &events, &mut shutdown).await;
        (key, outcome)
    }

    async fn deliver(
        &self,
        topic: &str,
        partition: i32,
        events: &[OwnedMessage],
        shutdown: &mut watch::Receiver<bool>,
    ) -> Outcome {
        let mut outcome = Outcome { delivered: None, stopped: None };
        for chunk in events.chunks(self.hook.batch) {
            let (first, last) = (chunk[0].offset(), chunk[chunk.len() - 1].offset());
            let events: Vec<HookEvent<'_>> = chunk
                .iter()
                .map(|m| HookEvent {
                    topic,
                    partition,
                    offset: m.offset(),
                    key: m.key(),
                    value: m.payload(),
                })
                .collect();
            let body = webhook::body(&events);
            let id = webhook::idempotency_key(topic, partition, first, last);
            let mut backoff = Duration::from_millis(250);
            loop {
                let wait = match self.post(&id, &body).await {
                    Ok((status, _, _)) if Verdict::of(status) == Verdict::Delivered => {
                        self.count(topic, "delivered", chunk.len());
                        outcome.delivered = Some(last + 1);
                        break;
                    }
                    Ok((status, text, _)) if Verdict::of(status) == Verdict::Refused => {
                        if self.hook.on_4xx == OnError::Skip {
                            tracing::warn!(
                                id,
                                status,
                                answer = text,
                                "webhook refused the events; skipped (on_4xx = \"skip\")"
                            );
                            self.count(topic, "skipped", chunk.len());
                            outcome.delivered = Some(last + 1);
                            break;
                        }
                        outcome.stopped = Some(format!(
                            "{topic} partition {partition} offset {first}: the webhook {} answered {status} ({text}). \
                             The partition is stopped: nothing from this event on is delivered; fix the endpoint \
                             or set webhook.on_4xx = \"skip\", then restart",
                            self.shown_url
                        ));
                        return outcome;
                    }
                    Ok((status, text, retry_after)) => {
                        // Never sooner than the back-off: `Retry-After: 0` is no reason to hammer.
                        let wait = retry_after.map_or(backoff, |asked| asked.max(backoff));
                        tracing::warn!(id, status, answer = text, retry_in = ?wait, "webhook failed; sending again");
                        wait
                    }
                    Err(e) => {
                        tracing::warn!(id, error = %e, retry_in = ?backoff, "webhook not answered; sending again");
                        backoff
                    }
                };
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.changed() => return outcome,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
        outcome
    }

    /// One try: the status, the start of the answer's text, and how long a `Retry-After`
    /// asks to wait.
    async fn post(
        &self,
        id: &str,
        body: &[u8],
    ) -> Result<(u16, String, Option<Duration>), reqwest::Error> {
        let started = Instant::now();
        let mut request = self
            .http
            .post(&self.hook.url)
            .header("content-type", "application/json")
            .header("idempotency-key", id)
            .header("webhook-id", id);
        if let Some(secret) = &self.secret {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
            request = request
                .header("webhook-timestamp", now.to_string())
                .header("webhook-signature", secret.sign(id, now, body));
        }
        let result = request.body(body.to_vec()).send().await;
        self.metrics.hook_seconds.observe(started.elapsed().as_secs_f64());
        let mut response = match result {
            Ok(response) => response,
            Err(e) => {
                let answer = if e.is_timeout() { "timeout" } else { "error" };
                self.metrics.hook_requests.with_label_values(&[answer]).inc();
                return Err(e);
            }
        };
        let status = response.status().as_u16();
        let class = format!("{}xx", status / 100);
        self.metrics.hook_requests.with_label_values(&[&class]).inc();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|seconds| Duration::from_secs(seconds).min(MAX_RETRY_AFTER));
        // Enough of the answer to say why; the rest is not read.
        let mut start = Vec::new();
        while start.len() < 200 {
            match response.chunk().await {
                Ok(Some(chunk)) => start.extend_from_slice(&chunk),
                _ => break,
            }
        }
        let text: String = String::from_utf8_lossy(&start).chars().take(200).collect();
        Ok((status, text, retry_after))
    }

    fn count(&self, topic: &str, outcome: &str, events: usize) {
        self.metrics.hook_events.with_label_values(&[topic, outcome]).inc_by(events as u64);
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::message::Timestamp;
    use tokio::time::Instant;

    use super::*;

    fn event(offset: i64) -> OwnedMessage {
        OwnedMessage::new(None, None, "t".into(), Timestamp::NotAvailable, 0, offset, None)
    }

    fn offsets(events: &[OwnedMessage]) -> Vec<i64> {
        events.iter().map(Message::offset).collect()
    }

    #[test]
    fn a_request_waits_for_a_full_batch_or_the_linger_and_one_at_a_time() {
        let (start, linger) = (Instant::now(), Duration::from_millis(20));
        let mut queue = Queue::default();
        queue.push(event(0), start + linger);
        assert!(queue.due(start, 3).is_none(), "one event waits for more");
        assert_eq!(queue.waiting_until(), Some(start + linger));
        for offset in 1..5 {
            queue.push(event(offset), start + Duration::from_secs(1));
        }
        let first = queue.due(start, 3).expect("a full request goes at once");
        assert_eq!(offsets(&first), [0, 1, 2]);
        assert_eq!(queue.held(), 5, "sent, not yet delivered");
        assert!(queue.due(start + linger, 3).is_none(), "one request under way at a time");
        assert_eq!(queue.waiting_until(), None);
        queue.finished();
        let rest = queue.due(start, 3).expect("what is left has waited already");
        assert_eq!(offsets(&rest), [3, 4]);
        queue.finished();
        assert!(queue.due(start + linger, 3).is_none() && queue.held() == 0);
    }
}
