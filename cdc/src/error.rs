//! Errors of the CDC pipeline, each knowing whether retrying (after a reconnect) can help.

use crate::pgoutput::DecodeError;

/// An error reported by PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    pub severity: String,
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)?;
        if let Some(detail) = &self.detail {
            write!(f, " ({detail})")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "; hint: {hint}")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CdcError {
    #[error("invalid cdc configuration: {0}")]
    Config(String),
    #[error("cannot reach PostgreSQL at {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("TLS with PostgreSQL at {addr} failed: {message}")]
    Tls { addr: String, message: String },
    #[error("PostgreSQL connection lost: {0}")]
    Io(#[from] std::io::Error),
    #[error("PostgreSQL refused: {0}")]
    Server(ServerError),
    #[error("PostgreSQL: {0}")]
    Sql(#[from] tokio_postgres::Error),
    #[error("unexpected message from PostgreSQL: {0}")]
    Protocol(String),
    #[error("garbled pgoutput message at {lsn} ({bytes}): {source}")]
    Decode { lsn: crate::lsn::Lsn, source: DecodeError, bytes: String },
    #[error("the pgoutput message at {lsn} ({bytes}) failed to decode {attempts} times in a row: {source}. It is not a network fault; ficus stops rather than skip a change. Report it with this message; the slot still holds the change")]
    Undecodable { lsn: crate::lsn::Lsn, source: DecodeError, bytes: String, attempts: u32 },
    #[error("wal_level is '{0}', but logical replication needs 'logical': run `ALTER SYSTEM SET wal_level = logical` (or set it in postgresql.conf) and restart PostgreSQL")]
    WalLevel(String),
    #[error("table {0} does not exist (check source.tables)")]
    MissingTable(String),
    #[error("permission denied: {0}. The cdc user needs the REPLICATION attribute (ALTER ROLE ... REPLICATION), SELECT on the published tables, and ownership of the publication or CREATE on the database to create it")]
    Privilege(String),
    #[error("replication slot \"{slot}\" is in use by another process (pid {pid}); only one ficus cdc may read a slot")]
    SlotInUse { slot: String, pid: String },
    #[error("replication slot \"{slot}\" is {status}: PostgreSQL removed WAL it still needed, so changes were lost. Drop the slot (SELECT pg_drop_replication_slot('{slot}')) and start again to take a new snapshot")]
    SlotLost { slot: String, status: String },
    #[error("table {0}: {1}")]
    ReplicaIdentity(String, String),
    #[error("publication \"{publication}\": {problem}. ficus changes only publications it created; run as a user who may: {sql}")]
    Publication { publication: String, problem: String, sql: String },
    #[error("tables {first} (topic {first_topic}) and {second} (topic {second_topic}) would share one Kafka topic (where '.' and '_' are alike), mixing their rows under the same keys: list only one of them in source.tables, or rename one")]
    TopicCollision { first: String, first_topic: String, second: String, second_topic: String },
    #[error("stopped: {0}")]
    Stopped(String),
    #[error("Kafka: {0}")]
    Kafka(String),
    #[error("Kafka refused a record for {topic}: {message}")]
    KafkaDelivery { topic: String, message: String },
}

impl From<Box<crate::names::TopicCollision>> for CdcError {
    fn from(c: Box<crate::names::TopicCollision>) -> CdcError {
        CdcError::TopicCollision {
            first: c.first.0.to_string(),
            first_topic: c.first.1,
            second: c.second.0.to_string(),
            second_topic: c.second.1,
        }
    }
}

/// A summary of a message's bytes for an error: its length and first bytes in hex.
pub fn bytes_summary(bytes: &[u8]) -> String {
    const SHOWN: usize = 32;
    let hex: String = bytes.iter().take(SHOWN).map(|b| format!("{b:02x}")).collect();
    let more = if bytes.len() > SHOWN { "..." } else { "" };
    format!("{} bytes: {hex}{more}", bytes.len())
}

/// Counts the same message failing to decode across restarts: a garbled network read
/// decodes on the next try, a message ficus cannot decode never does.
#[derive(Debug, Default)]
pub struct DecodeFailures {
    last: Option<crate::lsn::Lsn>,
    attempts: u32,
}

impl DecodeFailures {
    /// Restarts allowed for a message that fails to decode, before ficus stops.
    pub const ATTEMPTS: u32 = 3;

    /// Takes in the error of a failed run: a decode failure of the same message as the
    /// last, `ATTEMPTS` times in a row, becomes a fatal [`CdcError::Undecodable`].
    pub fn check(&mut self, error: CdcError) -> CdcError {
        let CdcError::Decode { lsn, source, bytes } = error else {
            return error;
        };
        self.attempts = if self.last == Some(lsn) { self.attempts + 1 } else { 1 };
        self.last = Some(lsn);
        if self.attempts >= Self::ATTEMPTS {
            CdcError::Undecodable { lsn, source, bytes, attempts: self.attempts }
        } else {
            CdcError::Decode { lsn, source, bytes }
        }
    }
}

/// What the pipeline does after an error. Every retry resumes from the slot's confirmed
/// position, so nothing is lost by one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Resume at once: the next try normally succeeds (a garbled read, a serialization
    /// conflict). A message that never decodes is stopped by [`DecodeFailures`].
    Resume,
    /// Resume after a pause that grows while the error repeats: something away comes back
    /// on its own (the database, the network, Kafka, a previous reader still stopping).
    BackOff,
    /// Stop: retrying cannot help; the message says what to do.
    Stop,
}

/// How to recover from an error PostgreSQL reported with SQLSTATE `code`: the classes of a
/// server going away or not yet there (08 connection, 57 shutdown or starting up, 53 out of
/// resources such as connections), a slot briefly in use (55006) pass with time; a
/// serialization conflict (40001) at once; anything else is a fact to report.
pub fn sqlstate_recovery(code: &str) -> Recovery {
    match code {
        "40001" => Recovery::Resume,
        "55006" => Recovery::BackOff,
        _ if ["08", "57", "53"].iter().any(|class| code.starts_with(class)) => Recovery::BackOff,
        _ => Recovery::Stop,
    }
}

impl CdcError {
    /// How the pipeline recovers from this error.
    pub fn recovery(&self) -> Recovery {
        match self {
            CdcError::Decode { .. } => Recovery::Resume,
            CdcError::Connect { .. }
            | CdcError::Io(_)
            | CdcError::Protocol(_)
            | CdcError::Kafka(_)
            | CdcError::SlotInUse { .. } => Recovery::BackOff,
            CdcError::Sql(e) => match e.code() {
                Some(code) => sqlstate_recovery(code.code()),
                None => Recovery::BackOff,
            },
            CdcError::Server(e) => sqlstate_recovery(&e.code),
            _ => Recovery::Stop,
        }
    }

    /// Whether reconnecting and resuming from the slot's confirmed position may succeed.
    pub fn is_retryable(&self) -> bool {
        self.recovery() != Recovery::Stop
    }

    /// What an operator can check while ficus retries (errors that stop say it themselves).
    pub fn hint(&self) -> &'static str {
        match self {
            CdcError::Connect { .. } => "is PostgreSQL up and reachable from this host?",
            CdcError::Io(_) | CdcError::Sql(_) | CdcError::Server(_) => {
                "the connection to PostgreSQL was lost (restart, failover, network)"
            }
            CdcError::Kafka(_) => {
                "are the brokers of kafka.brokers up and reachable? Nothing is confirmed meanwhile"
            }
            CdcError::SlotInUse { .. } => {
                "a previous ficus cdc may still be stopping; if another program holds the slot, stop it"
            }
            CdcError::Decode { .. } => "a garbled read; the same message failing again stops ficus",
            _ => "",
        }
    }

    /// Maps a server error to the specific error an operator can act on.
    pub fn from_server(e: ServerError, slot: &str) -> CdcError {
        match e.code.as_str() {
            "42501" => CdcError::Privilege(e.message),
            "55006" => {
                let pid = e.message.rsplit(' ').next().unwrap_or("?").to_string();
                CdcError::SlotInUse { slot: slot.to_string(), pid }
            }
            _ => CdcError::Server(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::Lsn;

    fn decode_error(lsn: u64) -> CdcError {
        let source = DecodeError::UnknownMessage('?');
        CdcError::Decode { lsn: Lsn(lsn), source, bytes: bytes_summary(&[0x3f; 40]) }
    }

    #[test]
    fn a_message_that_never_decodes_stops_the_pipeline() {
        let mut failures = DecodeFailures::default();
        assert!(failures.check(decode_error(10)).is_retryable());
        // Another message failing resets the count: that was the network.
        assert!(failures.check(decode_error(20)).is_retryable());
        assert!(failures.check(decode_error(20)).is_retryable());
        let fatal = failures.check(decode_error(20));
        assert!(!fatal.is_retryable());
        let text = fatal.to_string();
        assert!(text.contains("0/14") && text.contains("3 times"), "{text}");
        assert!(
            text.contains("40 bytes: 3f3f") && text.ends_with("the slot still holds the change"),
            "{text}"
        );
        // Other errors pass through untouched.
        assert!(matches!(failures.check(CdcError::Kafka("down".into())), CdcError::Kafka(_)));
    }

    #[test]
    fn each_kind_of_error_has_its_recovery_and_a_hint_when_retried() {
        let server = |code: &str| {
            CdcError::Server(ServerError {
                severity: "FATAL".into(),
                code: code.into(),
                message: "m".into(),
                detail: None,
                hint: None,
            })
        };
        let connect =
            CdcError::Connect { addr: "h:5432".into(), source: std::io::Error::other("refused") };
        let cases = [
            (decode_error(1), Recovery::Resume),
            (server("40001"), Recovery::Resume),
            (connect, Recovery::BackOff),
            (CdcError::Kafka("all brokers down".into()), Recovery::BackOff),
            (CdcError::SlotInUse { slot: "s".into(), pid: "7".into() }, Recovery::BackOff),
            (server("57P01"), Recovery::BackOff),
            (server("08006"), Recovery::BackOff),
            // Starting up, not yet accepting connections: a restart in progress.
            (server("57P03"), Recovery::BackOff),
            (server("53300"), Recovery::BackOff),
            (server("42501"), Recovery::Stop),
            (CdcError::WalLevel("replica".into()), Recovery::Stop),
            (CdcError::SlotLost { slot: "s".into(), status: "lost".into() }, Recovery::Stop),
            (CdcError::Config("x".into()), Recovery::Stop),
        ];
        for (error, recovery) in cases {
            assert_eq!(error.recovery(), recovery, "{error}");
            if recovery != Recovery::Stop {
                assert!(!error.hint().is_empty(), "a retried error says what to check: {error}");
            }
        }
    }
}
