//! A Kafka-protocol broker for a test: Tansu with in-memory storage on its own port, or the
//! cluster named by `KAFKA_BROKERS`; and a consumer that reads topics from the beginning.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{Message, Offset, TopicPartitionList};

/// A broker owned by a test.
pub struct Broker {
    pub addr: String,
    child: Option<Child>,
    /// Prepended to topic names, so tests sharing an external Kafka do not read each
    /// other's topics; empty for a broker of the test's own.
    namespace: String,
}

/// One consumed record.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub key: Option<serde_json::Value>,
    pub value: Option<serde_json::Value>,
    /// Header names and their values, parsed as JSON.
    pub headers: Vec<(String, serde_json::Value)>,
}

impl Consumed {
    /// The value of header `name`, if the record has it.
    pub fn header(&self, name: &str) -> Option<&serde_json::Value> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }
}

fn tansu() -> String {
    if let Ok(path) = std::env::var("FICUS_TANSU") {
        return path;
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let cargo_bin = format!("{home}/.cargo/bin/tansu");
    if std::path::Path::new(&cargo_bin).exists() {
        cargo_bin
    } else {
        "tansu".into()
    }
}

impl Broker {
    pub fn start() -> Broker {
        if let Ok(brokers) = std::env::var("KAFKA_BROKERS") {
            static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let namespace = format!(
                "t{}x{n}x{}.",
                std::process::id(),
                std::time::UNIX_EPOCH.elapsed().map_or(0, |d| d.as_secs())
            );
            return Broker { addr: brokers, child: None, namespace };
        }
        let addr = super::free_addr().to_string();
        let url = format!("tcp://{addr}");
        let child = Command::new(tansu())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                "memory://tansu/",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "start tansu (cargo install tansu --version 0.6.0 --features dynostore --locked)",
            );
        let deadline = Instant::now() + super::PATIENCE;
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "tansu did not listen on {addr}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Broker { addr, child: Some(child), namespace: String::new() }
    }

    /// The real name of a test's topic or topic prefix.
    pub fn topic(&self, name: &str) -> String {
        format!("{}{name}", self.namespace)
    }

    /// Whether `topic` exists on the broker.
    pub fn has_topic(&self, topic: &str) -> bool {
        let topic = self.topic(topic);
        let consumer: BaseConsumer =
            ClientConfig::new().set("bootstrap.servers", &self.addr).create().expect("client");
        let metadata = consumer.fetch_metadata(None, Duration::from_secs(10)).expect("metadata");
        metadata.topics().iter().any(|t| t.name() == topic)
    }

    /// Waits until `topic` exists: for topics made as events come (the outbox's).
    pub fn wait_topic(&self, topic: &str, patience: Duration) {
        let deadline = Instant::now() + patience;
        while !self.has_topic(topic) {
            assert!(
                Instant::now() < deadline,
                "no topic {} within {patience:?}",
                self.topic(topic)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// False for an external Kafka, which a test cannot pause.
    pub fn is_own(&self) -> bool {
        self.child.is_some()
    }

    /// Freezes the broker (SIGSTOP): connections stay open but nothing is answered, as in a
    /// network partition. Its data survives, unlike a restart of in-memory storage.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("an external broker cannot be paused");
        let status =
            Command::new("kill").args([signal, &child.id().to_string()]).status().expect("kill");
        assert!(status.success());
    }

    /// Reads `topic` (every partition, from the beginning) until `count` records arrived or
    /// `quiet` passed without a new one.
    pub fn consume(&self, topic: &str, count: usize, quiet: Duration) -> Vec<Consumed> {
        let topic = &self.topic(topic);
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.addr)
            .set("group.id", format!("ficus-test-{}", std::process::id()))
            .set("enable.auto.commit", "false")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "500")
            .create()
            .expect("consumer");
        let metadata =
            consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).expect("metadata");
        let partitions = metadata.topics().first().map_or(0, |t| t.partitions().len());
        assert!(partitions > 0, "topic {topic} has no partitions");
        let mut assignment = TopicPartitionList::new();
        for partition in 0..partitions as i32 {
            assignment.add_partition_offset(topic, partition, Offset::Beginning).expect("assign");
        }
        consumer.assign(&assignment).expect("assign");
        let mut records = Vec::new();
        let mut last = Instant::now();
        while records.len() < count && last.elapsed() < quiet {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(message)) => {
                    let parse = |bytes: Option<&[u8]>| {
                        bytes.map(|b| serde_json::from_slice(b).expect("JSON record"))
                    };
                    let headers = message.headers().map_or_else(Vec::new, |headers| {
                        headers
                            .iter()
                            .map(|h| (h.key.to_string(), parse(h.value).unwrap_or_default()))
                            .collect()
                    });
                    records.push(Consumed {
                        key: parse(message.key()),
                        value: parse(message.payload()),
                        headers,
                    });
                    last = Instant::now();
                }
                Some(Err(e)) => panic!("consume {topic}: {e}"),
                None => {}
            }
        }
        records
    }
}

/// The state a consumer ends up with, by the `id` of each key: the last `after` per key,
/// deletes and tombstones removing the key.
pub fn fold(records: &[Consumed]) -> std::collections::BTreeMap<i64, serde_json::Value> {
    let mut state = std::collections::BTreeMap::new();
    for record in records {
        let Some(key) = record.key.as_ref().and_then(|k| k["id"].as_i64()) else { continue };
        match record.value.as_ref().map(|v| v["after"].clone()) {
            Some(serde_json::Value::Null) | None => {
                state.remove(&key);
            }
            Some(after) => {
                state.insert(key, after);
            }
        }
    }
    state
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = Command::new("kill").args(["-CONT", &child.id().to_string()]).status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Broker {
    /// Counts the records of `topic` without parsing them, until `target` arrived or `quiet`
    /// passed without one; also returns the last record's value.
    pub fn count(
        &self,
        topic: &str,
        target: usize,
        quiet: Duration,
    ) -> (usize, Option<serde_json::Value>) {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.addr)
            .set("group.id", format!("ficus-count-{}", std::process::id()))
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let topic = &self.topic(topic);
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(topic, 0, Offset::Beginning).expect("assign");
        consumer.assign(&assignment).expect("assign");
        let (mut count, mut last_value, mut last) = (0, None, Instant::now());
        while count < target && last.elapsed() < quiet {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(message)) => {
                    count += 1;
                    last = Instant::now();
                    last_value = message.payload().map(<[u8]>::to_vec);
                }
                Some(Err(e)) => panic!("consume {topic}: {e}"),
                None => {}
            }
        }
        (count, last_value.map(|v| serde_json::from_slice(&v).expect("JSON")))
    }
}
