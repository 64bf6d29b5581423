//! The replication slot's health while streaming, polled from `pg_replication_slots` on a
//! side connection: the WAL it holds back on the server, how far confirmation lags behind the
//! server's WAL, its `wal_status` and `safe_wal_size`, exported as metrics. A warning when the
//! slot nears the end of `max_slot_wal_keep_size`; a slot invalidated while running stops the
//! pipeline with the same error as at start.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;

use crate::error::CdcError;
use crate::metrics::Metrics;

/// Time between two polls.
pub const POLL: Duration = Duration::from_secs(5);
/// Below this `safe_wal_size`, the slot is about to lose WAL: warn.
pub const LOW_SAFE_WAL_BYTES: i64 = 1 << 30;

/// One reading of the slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotHealth {
    /// WAL the server keeps for the slot (from its `restart_lsn`).
    pub retained_bytes: i64,
    /// WAL written since the slot's confirmed position.
    pub lag_bytes: i64,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    /// WAL that can still be written before the slot is in danger; `None` without
    /// `max_slot_wal_keep_size`.
    pub safe_wal_bytes: Option<i64>,
}

/// What a reading means for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Healthy,
    /// Soon past `max_slot_wal_keep_size`: PostgreSQL will then remove WAL the slot needs.
    Low {
        safe_wal_bytes: i64,
    },
    /// Past it: the next checkpoint invalidates the slot unless ficus catches up first.
    Unreserved,
    /// Invalidated: changes were lost.
    Lost,
}

impl SlotHealth {
    pub fn verdict(&self) -> Verdict {
        match self.wal_status.as_deref() {
            Some("lost") => Verdict::Lost,
            Some("unreserved") => Verdict::Unreserved,
            _ => match self.safe_wal_bytes {
                Some(safe) if safe < LOW_SAFE_WAL_BYTES => Verdict::Low { safe_wal_bytes: safe },
                _ => Verdict::Healthy,
            },
        }
    }
}

/// Reads the slot's health; `None` when the slot does not exist.
pub async fn read(client: &Client, slot: &str) -> Result<Option<SlotHealth>, CdcError> {
    let row = client
        .query_opt(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, \
                    pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint, \
                    wal_status, safe_wal_size \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.map(|row| SlotHealth {
        retained_bytes: row.get::<_, Option<i64>>(0).unwrap_or(0),
        lag_bytes: row.get::<_, Option<i64>>(1).unwrap_or(0),
        wal_status: row.get(2),
        safe_wal_bytes: row.get(3),
    }))
}

/// Polls the slot every [`POLL`] until it is found invalidated, and returns that error. A
/// failed poll is logged and tried again: the replication stream, not this, decides whether
/// the database is reachable.
pub async fn watch(client: Client, slot: String, metrics: Arc<Metrics>) -> CdcError {
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = Verdict::Healthy;
    loop {
        poll.tick().await;
        let health = match tokio::time::timeout(POLL, read(&client, &slot)).await {
            Ok(Ok(Some(health))) => health,
            // An active slot cannot be dropped; the stream itself reports it gone.
            Ok(Ok(None)) => continue,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "slot health poll failed");
                continue;
            }
            Err(_) => {
                tracing::debug!("slot health poll timed out");
                continue;
            }
        };
        metrics.observe_slot(&health);
        let verdict = health.verdict();
        if verdict != last {
            match &verdict {
                Verdict::Healthy => tracing::info!(slot, "replication slot healthy again"),
                Verdict::Low { safe_wal_bytes } => tracing::warn!(
                    slot,
                    safe_wal_bytes,
                    lag_bytes = health.lag_bytes,
                    "replication slot near max_slot_wal_keep_size: Kafka or ficus must catch up before PostgreSQL removes WAL the slot needs"
                ),
                Verdict::Unreserved => tracing::error!(
                    slot,
                    lag_bytes = health.lag_bytes,
                    "replication slot past max_slot_wal_keep_size: the next checkpoint invalidates it unless ficus catches up first"
                ),
                Verdict::Lost => {}
            }
        }
        if verdict == Verdict::Lost {
            return CdcError::SlotLost { slot, status: "lost".into() };
        }
        last = verdict;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(wal_status: &str, safe: Option<i64>) -> SlotHealth {
        SlotHealth {
            retained_bytes: 10,
            lag_bytes: 5,
            wal_status: Some(wal_status.into()),
            safe_wal_bytes: safe,
        }
    }

    #[test]
    fn verdicts() {
        assert_eq!(health("reserved", None).verdict(), Verdict::Healthy);
        assert_eq!(health("reserved", Some(LOW_SAFE_WAL_BYTES)).verdict(), Verdict::Healthy);
        assert_eq!(health("extended", Some(1000)).verdict(), Verdict::Low { safe_wal_bytes: 1000 });
        assert_eq!(health("unreserved", Some(-5)).verdict(), Verdict::Unreserved);
        assert_eq!(health("lost", None).verdict(), Verdict::Lost);
    }
}
