//! Ramp state shared by several replicas in PostgreSQL (`proxy.state = "postgres://..."`):
//! the states every replica applies, the counts every replica publishes, and the advisory lock
//! that lets one replica at a time decide. I/O only; the decisions are [`super::evaluate`]'s.

use std::collections::BTreeMap;

use tokio::sync::Mutex;
use tokio_postgres::{Client, NoTls};

use super::evaluate::State;
use super::window::Span;

/// Session advisory lock held by the deciding replica ("ficus ramp").
const DECIDER_LOCK: i64 = 0x6669_6375_7372_6d70;
/// Transaction advisory lock serialising schema creation.
const SCHEMA_LOCK: i64 = 0x6669_6375_7373_6368;
/// Published counts older than this are ignored: their replica is gone or cut off.
const FRESH_SECONDS: i64 = 10;
/// The longest one exchange with the database may take, connecting included: a database that
/// hangs (a dropped network path) must not hold the ticker or an operator's command.
const STORE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

const SCHEMA: &str = "
CREATE SCHEMA IF NOT EXISTS ficus;
CREATE TABLE IF NOT EXISTS ficus.ramp_state (
    route text PRIMARY KEY,
    state text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS ficus.ramp_counts (
    replica text NOT NULL,
    route text NOT NULL,
    step_since_ms bigint NOT NULL,
    step text NOT NULL,
    recent text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (replica, route)
);";

#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("ramp state database unreachable: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("ramp state of route {route} in the database is not valid: {message}")]
    Garbled { route: String, message: String },
    #[error("ramp state database did not answer within {0:?}")]
    Timeout(std::time::Duration),
}

/// The connection to the shared store, reopened when it breaks.
pub struct SharedStore {
    url: String,
    /// This replica's name in the counts table.
    pub replica: String,
    connection: Mutex<Option<Connection>>,
}

struct Connection {
    client: Client,
    /// Whether this session holds the decider lock.
    leading: bool,
}

impl SharedStore {
    pub fn new(url: String) -> SharedStore {
        let replica = format!("{}-{:08x}", std::process::id(), rand::random::<u32>());
        SharedStore { url, replica, connection: Mutex::new(None) }
    }

    /// Runs `work` on an open connection, opening one first if needed; a connection that
    /// failed is dropped (releasing the decider lock with it) and reopened next time.
    async fn with<T>(
        &self,
        work: impl AsyncFnOnce(&mut Connection) -> Result<T, SharedError>,
    ) -> Result<T, SharedError> {
        let mut slot = self.connection.lock().await;
        let exchange = async {
            let connection = match slot.take() {
                Some(open) if !open.client.is_closed() => slot.insert(open),
                _ => slot.insert(self.connect().await?),
            };
            work(connection).await
        };
        let result = match tokio::time::timeout(STORE_TIMEOUT, exchange).await {
            Ok(result) => result,
            Err(_) => Err(SharedError::Timeout(STORE_TIMEOUT)),
        };
        if matches!(result, Err(SharedError::Postgres(_) | SharedError::Timeout(_))) {
            *slot = None;
        }
        result
    }

    async fn connect(&self) -> Result<Connection, SharedError> {
        let (mut client, connection) = tokio_postgres::connect(&self.url, NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "ramp state database connection closed");
            }
        });
        let transaction = client.transaction().await?;
        transaction.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK]).await?;
        transaction.batch_execute(SCHEMA).await?;
        transaction.commit().await?;
        Ok(Connection { client, leading: false })
    }

    /// Every route's state.
    pub async fn states(&self) -> Result<BTreeMap<String, State>, SharedError> {
        self.with(async |c| {
            let rows = c.client.query("SELECT route, state FROM ficus.ramp_state", &[]).await?;
            rows.iter()
                .map(|row| {
                    let (route, text): (String, String) = (row.get(0), row.get(1));
                    let state = serde_json::from_str(&text).map_err(|e| SharedError::Garbled {
                        route: route.clone(),
                        message: e.to_string(),
                    })?;
                    Ok((route, state))
                })
                .collect()
        })
        .await
    }

    /// Stores `state` for `route` unless the route has one already.
    pub async fn insert(&self, route: &str, state: &State) -> Result<(), SharedError> {
        let text = to_text(state);
        self.with(async |c| {
            let sql = "INSERT INTO ficus.ramp_state (route, state) VALUES ($1, $2) ON CONFLICT DO NOTHING";
            c.client.execute(sql, &[&route, &text]).await?;
            Ok(())
        })
        .await
    }

    /// Replaces `route`'s state if it is still `old`; false when someone changed it first.
    pub async fn replace(
        &self,
        route: &str,
        old: &State,
        new: &State,
    ) -> Result<bool, SharedError> {
        let (old, new) = (to_text(old), to_text(new));
        self.with(async |c| {
            let sql = "UPDATE ficus.ramp_state SET state = $3, updated_at = now() WHERE route = $1 AND state = $2";
            Ok(c.client.execute(sql, &[&route, &old, &new]).await? == 1)
        })
        .await
    }

    /// Publishes this replica's counts of `route` on the step that began at `step_since_ms`.
    pub async fn publish(
        &self,
        route: &str,
        step_since_ms: u64,
        step: &Span,
        recent: &Span,
    ) -> Result<(), SharedError> {
        let (step, recent) = (to_text(step), to_text(recent));
        let since = i64::try_from(step_since_ms).unwrap_or(i64::MAX);
        self.with(async |c| {
            let sql = "INSERT INTO ficus.ramp_counts (replica, route, step_since_ms, step, recent)
                       VALUES ($1, $2, $3, $4, $5)
                       ON CONFLICT (replica, route) DO UPDATE SET step_since_ms = $3, step = $4,
                           recent = $5, updated_at = now()";
            c.client.execute(sql, &[&self.replica, &route, &since, &step, &recent]).await?;
            Ok(())
        })
        .await
    }

    /// The counts of `route` summed over every replica that published lately: since the
    /// step that began at `step_since_ms`, and over the recent window.
    pub async fn counts(
        &self,
        route: &str,
        step_since_ms: u64,
    ) -> Result<(Span, Span), SharedError> {
        let since = i64::try_from(step_since_ms).unwrap_or(i64::MAX);
        self.with(async |c| {
            let sql = "SELECT step_since_ms, step, recent FROM ficus.ramp_counts
                       WHERE route = $1 AND updated_at > now() - make_interval(secs => $2)";
            let fresh = FRESH_SECONDS as f64;
            let rows = c.client.query(sql, &[&route, &fresh]).await?;
            let (mut step, mut recent) = (Span::default(), Span::default());
            for row in rows {
                let garbled = |e: serde_json::Error| SharedError::Garbled {
                    route: route.to_string(),
                    message: e.to_string(),
                };
                let their_since: i64 = row.get(0);
                let their_recent: Span = serde_json::from_str(row.get(2)).map_err(garbled)?;
                recent.add(&their_recent);
                // A replica that has not applied the current step yet counts for the window
                // only.
                if their_since == since {
                    let their_step: Span = serde_json::from_str(row.get(1)).map_err(garbled)?;
                    step.add(&their_step);
                }
            }
            Ok((step, recent))
        })
        .await
    }

    /// Whether this replica decides: it holds the decider lock, taking it if it is free.
    pub async fn lead(&self) -> Result<bool, SharedError> {
        self.with(async |c| {
            if !c.leading {
                let row = c.client.query_one("SELECT pg_try_advisory_lock($1)", &[&DECIDER_LOCK]).await?;
                c.leading = row.get(0);
                if c.leading {
                    tracing::info!("this replica now decides the ramps");
                    let sql = "DELETE FROM ficus.ramp_counts WHERE updated_at < now() - interval '1 minute'";
                    c.client.execute(sql, &[]).await?;
                }
            }
            Ok(c.leading)
        })
        .await
    }
}

fn to_text(value: &impl serde::Serialize) -> String {
    // States and spans are plain data: serialising them cannot fail.
    serde_json::to_string(value).unwrap_or_default()
}
