//! The CDC pipeline: preconditions, the initial snapshot, then the replication stream, with
//! a position confirmed to PostgreSQL only after Kafka has acknowledged everything before it.
//!
//! Retryable failures (connection loss, broker errors, slot briefly in use) restart the
//! pipeline from the slot after a backoff; since nothing unacknowledged was confirmed, the
//! restart resends the unconfirmed tail and loses nothing.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_postgres::{Client, NoTls};

use crate::catalog::{self, Catalog, PublishedTable};
use crate::chunk;
use crate::config::{CdcConfig, SnapshotMode};
use crate::copy::CopyRows;
use crate::error::{bytes_summary, CdcError, DecodeFailures, Recovery};
use crate::event::{self, Op, Record, Source, Table};
use crate::incremental::ChunkQuery;
use crate::incremental::{Backfill, ChunkRead, Reconciled};
use crate::lsn::Lsn;
use crate::mask::Masking;
use crate::metrics::Metrics;
use crate::names::{quote_ident, TableName, Topics};
use crate::outbox::OutboxTable;
use crate::pgoutput::{self, Datum};
use crate::sink::{Commit, InFlight, Marker, SendError, Sink};
use crate::slot;
use crate::stream::{Action, Core, Positions};
use crate::value::ValueType;
use crate::wire::{ReplicationConnection, Sender, StreamMessage, SESSION_SETTINGS};

const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The pause before resuming after an error: the first of a back-off, or a resume at once.
const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Reads of an incremental snapshot's chunk that may fail in a row before its table is
/// given up.
const CHUNK_ATTEMPTS: u32 = 3;
/// How often a standby asks for the slot's lead.
const STANDBY_POLL: Duration = Duration::from_secs(1);

/// What the process asks of a running pipeline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Shutdown {
    #[default]
    Run,
    /// Stop to start again (a new configuration): a snapshot in progress finishes first, so
    /// a reload never throws one away.
    Restart,
    /// Stop now: a snapshot in progress is abandoned.
    Stop,
}

/// Runs until `shutdown` asks it to stop, or until an `initial_only` snapshot is done.
pub async fn run(
    config: CdcConfig,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<Shutdown>,
) -> Result<(), CdcError> {
    let problems = config.problems();
    if !problems.is_empty() {
        return Err(CdcError::Config(problems.join("; ")));
    }
    if config.output == crate::config::Output::Kafka && config.kafka.brokers.is_empty() {
        return Err(CdcError::Config("kafka.brokers is required (or run with --stdout)".into()));
    }
    let masking = config.masking()?;
    let outbox = config.outbox_tables()?;
    let mut backoff = MIN_BACKOFF;
    let mut catalog = Catalog::default();
    let mut decode_failures = DecodeFailures::default();
    loop {
        let started = Instant::now();
        let result = Pipeline::new(&config, &masking, &outbox, metrics.clone())?
            .run_once(&mut catalog, shutdown.clone())
            .await
            .map_err(|e| decode_failures.check(e));
        metrics.healthy.store(false, Ordering::Relaxed);
        match result {
            Ok(()) => return Ok(()),
            Err(e) if e.is_retryable() && *shutdown.borrow() == Shutdown::Run => {
                if started.elapsed() > Duration::from_secs(60) {
                    backoff = MIN_BACKOFF;
                }
                let pause = match e.recovery() {
                    Recovery::Resume => MIN_BACKOFF,
                    _ => {
                        let pause = backoff;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        pause
                    }
                };
                tracing::warn!(error = %e, hint = e.hint(), retry_in = ?pause, "cdc pipeline failed; resuming from the slot");
                metrics.restarts.inc();
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shutdown.changed() => return Ok(()),
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// One attempt: connections, Kafka producer, and the state of the stream.
struct Pipeline<'c> {
    config: &'c CdcConfig,
    masking: &'c Masking,
    outbox: &'c [OutboxTable],
    metrics: Arc<Metrics>,
    sink: Sink,
    in_flight: InFlight,
    /// Records (and commit markers) waiting for room in the producer.
    pending: VecDeque<Pending>,
    database: String,
    /// When incremental snapshot progress was last logged.
    progress_logged: Instant,
}

enum Pending {
    Record(Record),
    Commit(Commit),
    /// After an incremental snapshot's last rows: the position its request held, and the
    /// table.
    Release(Lsn, String),
}

/// The I/O side of incremental snapshots: the connection that reads chunks and the step
/// under way. One step at a time, so at most one chunk waits in memory for its high
/// watermark.
#[derive(Default)]
struct Chunks {
    client: Option<Arc<Client>>,
    step: Option<Step>,
    /// After a connection failure: not before then, and the pause after the next one.
    retry_at: Option<tokio::time::Instant>,
    backoff: Duration,
}

enum Step {
    /// Writing the low watermark and reading the rows (`None`: the table was altered).
    Reading(BoxFuture<'static, Result<Option<ChunkRead>, CdcError>>),
    /// Writing the high watermark, once the core has the rows.
    Marking(BoxFuture<'static, Result<(), CdcError>>),
}

/// A step done.
enum StepDone {
    Read(ChunkRead),
    /// The table's columns changed since it was looked up.
    Altered,
    Marked,
}

impl Chunks {
    /// The chunks' connection failed (or could not be made): a new one is tried after a
    /// pause that grows while it fails.
    fn failed(&mut self, error: &CdcError) {
        self.client = None;
        self.backoff = (self.backoff * 2).clamp(Duration::from_secs(1), MAX_BACKOFF);
        self.retry_at = Some(tokio::time::Instant::now() + self.backoff);
        tracing::warn!(%error, retry_in = ?self.backoff, "the incremental snapshot's connection failed; the chunk is read again on a new one");
    }

    /// Completes the step under way. Pending forever without a step, so it can sit in a
    /// `select!`.
    async fn step_done(&mut self) -> Result<StepDone, CdcError> {
        let done = match &mut self.step {
            Some(Step::Reading(read)) => {
                read.await.map(|read| read.map_or(StepDone::Altered, StepDone::Read))
            }
            Some(Step::Marking(mark)) => mark.await.map(|()| StepDone::Marked),
            None => std::future::pending().await,
        };
        self.step = None;
        done
    }
}

/// A snapshot on Kafka whose temporary slot still lives on its replication connection.
struct Exported {
    /// Holds the temporary slot: dropping it drops the slot.
    _slot: ReplicationConnection,
    /// The snapshot's SQL connection.
    reader: Client,
    temporary: String,
    consistent: Lsn,
}

fn now_ms() -> i64 {
    now_us() / 1000
}

fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

impl<'c> Pipeline<'c> {
    fn new(
        config: &'c CdcConfig,
        masking: &'c Masking,
        outbox: &'c [OutboxTable],
        metrics: Arc<Metrics>,
    ) -> Result<Pipeline<'c>, CdcError> {
        let database = config.source.connect_params()?.database;
        Ok(Pipeline {
            config,
            masking,
            outbox,
            metrics,
            sink: Sink::new(config)?,
            in_flight: InFlight::default(),
            pending: VecDeque::new(),
            database,
            progress_logged: Instant::now(),
        })
    }

    async fn sql_client(&self) -> Result<Client, CdcError> {
        sql_client(self.config).await
    }

    async fn run_once(
        mut self,
        catalog: &mut Catalog,
        shutdown: watch::Receiver<Shutdown>,
    ) -> Result<(), CdcError> {
        let source = &self.config.source;
        let prefix = &self.config.kafka.topic_prefix;
        let client = self.sql_client().await?;
        catalog::check_wal_level(&client).await?;
        // One reader per slot; others wait as standbys, before touching anything.
        let Some(leader) = self.lead(&shutdown).await? else { return Ok(()) };
        let slot = catalog::slot_state(&client, &source.slot).await?;
        match &slot {
            Some(state) if matches!(state.wal_status.as_deref(), Some("lost")) => {
                return Err(CdcError::SlotLost { slot: source.slot.clone(), status: "lost".into() })
            }
            Some(state) if state.plugin.as_deref() != Some("pgoutput") => {
                return Err(CdcError::Config(format!(
                    "slot \"{}\" uses plugin {:?}, not pgoutput",
                    source.slot, state.plugin
                )))
            }
            Some(state) if state.active_pid.is_some() => {
                return Err(CdcError::SlotInUse {
                    slot: source.slot.clone(),
                    pid: state.active_pid.unwrap_or_default().to_string(),
                })
            }
            _ => {}
        }
        // Tables added to a slot that streams already get their rows by an incremental
        // snapshot; a new slot's initial snapshot reads every table.
        let announce = if slot.is_none() || source.snapshot != SnapshotMode::Initial {
            None
        } else if catalog::server_version(&client).await? < catalog::MESSAGES_VERSION {
            tracing::info!("PostgreSQL before 14 does not stream logical messages: a table added to source.tables streams from then on, without an incremental snapshot of its rows");
            None
        } else {
            Some(source.slot.as_str())
        };
        let outbox_names: Vec<TableName> = self.outbox.iter().map(|o| o.name.clone()).collect();
        let announce = announce.map(|slot| (slot, outbox_names.as_slice()));
        let is_outbox =
            |name: &crate::names::TableName| self.outbox.iter().any(|o| &o.name == name);
        // Outbox tables are published with the configured tables...
        let configured = source.table_names()?.map(|mut names| {
            for outbox in self.outbox {
                if !names.contains(&outbox.name) {
                    names.push(outbox.name.clone());
                }
            }
            names
        });
        let mut tables = catalog::prepare_publication(
            &client,
            &source.publication,
            configured.as_deref(),
            announce,
        )
        .await?;
        catalog::check_replica_identities(&client, &tables).await?;
        // ...but their rows are events from the stream, not rows to copy to a topic of theirs.
        tables.retain(|table| !is_outbox(&table.name));
        let mut topics = Topics::default();
        let mut topic_names = Vec::with_capacity(tables.len());
        for table in &tables {
            topic_names.push(topics.claim(prefix, &table.name)?);
        }
        self.sink.ensure_topics(&topic_names).await?;
        catalog.refresh(&client).await?;
        let include = configured.map(|tables| tables.into_iter().collect());
        let core = Core::new(
            prefix,
            &self.database,
            topics,
            include,
            self.outbox.to_vec(),
            source.transaction_metadata,
            Backfill::new(format!("{}-{}", std::process::id(), now_us()), &source.slot),
        );
        match (slot.is_some(), source.snapshot) {
            (_, SnapshotMode::InitialOnly) => {
                if !self.snapshot_unless_stopped(&tables, false, catalog, &shutdown).await? {
                    return Err(CdcError::Stopped(
                        "the initial_only snapshot was stopped before it finished".into(),
                    ));
                }
                return Ok(());
            }
            (false, SnapshotMode::Initial) => {
                if !self.snapshot_unless_stopped(&tables, true, catalog, &shutdown).await? {
                    return Ok(());
                }
            }
            (false, SnapshotMode::Never) => {
                let mut repl = ReplicationConnection::connect(&source.connect_params()?).await?;
                let sql = format!(
                    "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput NOEXPORT_SNAPSHOT",
                    quote_ident(&source.slot)
                );
                repl.simple_query(&sql).await.map_err(|e| privilege(e, &source.slot))?;
                tracing::info!(slot = source.slot, "created replication slot");
            }
            (true, _) => {}
        }
        self.stream(leader, &client, catalog, core, shutdown).await
    }

    /// A replication connection holding the slot's lead: a session advisory lock, taken on
    /// the connection that will stream, so that it goes with its walsender (at once when the
    /// process dies, within `wal_sender_timeout` when its host is lost). Without the lock,
    /// waits as a standby, asking every [`STANDBY_POLL`]; `None` when told to stop first.
    async fn lead(
        &self,
        shutdown: &watch::Receiver<Shutdown>,
    ) -> Result<Option<ReplicationConnection>, CdcError> {
        let slot = &self.config.source.slot;
        let mut repl =
            ReplicationConnection::connect(&self.config.source.connect_params()?).await?;
        let sql = format!(
            "SELECT pg_try_advisory_lock(hashtextextended('ficus cdc slot ' || '{}', 0))",
            slot.replace('\'', "''")
        );
        let mut shutdown = shutdown.clone();
        let mut waiting_since: Option<Instant> = None;
        loop {
            let rows = repl.simple_query(&sql).await?;
            let taken = rows.first().and_then(|row| row.first()).cloned().flatten();
            if taken.as_deref() == Some("t") {
                if let Some(since) = waiting_since {
                    tracing::warn!(slot, waited = ?since.elapsed(), "the active reader is gone: this standby takes over");
                }
                self.metrics.standby.set(0);
                return Ok(Some(repl));
            }
            if waiting_since.is_none() {
                tracing::info!(slot, "another ficus cdc reads this slot: waiting as a standby, to take over when it stops");
                waiting_since = Some(Instant::now());
            }
            self.metrics.standby.set(1);
            // Connected and ready: a standby is healthy.
            self.metrics.healthy.store(true, Ordering::Relaxed);
            tokio::select! {
                _ = tokio::time::sleep(STANDBY_POLL) => {}
                _ = shutdown.changed() => return Ok(None),
            }
        }
    }

    /// Runs the snapshot, unless a stop comes first: then it stops at once, and the false it
    /// returns says so. Stopping loses nothing: the slot is made permanent only once every
    /// row is on Kafka, so the next start takes the snapshot again from the beginning.
    async fn snapshot_unless_stopped(
        &mut self,
        tables: &[PublishedTable],
        make_permanent: bool,
        catalog: &mut Catalog,
        shutdown: &watch::Receiver<Shutdown>,
    ) -> Result<bool, CdcError> {
        let mut shutdown = shutdown.clone();
        // A stop that came before the snapshot started counts too; a restart waits for it.
        let stop = async {
            while *shutdown.borrow_and_update() != Shutdown::Stop {
                if shutdown.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        let exported = tokio::select! {
            exported = self.snapshot(tables, catalog) => exported?,
            () = stop => {
                tracing::warn!("snapshot stopped before it finished; the next start takes it again from the beginning, so the rows sent so far will be sent again");
                return Ok(false);
            }
        };
        if make_permanent {
            // On the snapshot's own connection, busy until now: the other one sat idle for
            // the whole snapshot and may have been dropped by the network meanwhile.
            exported
                .reader
                .query(
                    "SELECT pg_copy_logical_replication_slot($1, $2, false)",
                    &[&exported.temporary, &self.config.source.slot],
                )
                .await?;
            tracing::info!(slot = self.config.source.slot, consistent = %exported.consistent, "snapshot on Kafka; replication slot created");
        } else {
            tracing::info!("snapshot on Kafka (initial_only: not streaming)");
        }
        Ok(true)
    }

    /// Copies every table inside the snapshot of a new temporary slot, and waits until Kafka
    /// has acknowledged every row.
    ///
    /// The slot is TEMPORARY: if the process dies or stops mid-snapshot, PostgreSQL drops it,
    /// and the next start takes a fresh snapshot. The caller copies it to its permanent name,
    /// at the same consistent point, through the connections returned.
    async fn snapshot(
        &mut self,
        tables: &[PublishedTable],
        catalog: &mut Catalog,
    ) -> Result<Exported, CdcError> {
        let source = &self.config.source;
        let mut repl = ReplicationConnection::connect(&source.connect_params()?).await?;
        // Unique per process: a previous attempt's walsender may not have exited yet.
        let suffix = format!("_snapshot_{}", std::process::id());
        let temporary: String =
            source.slot.chars().take(63 - suffix.len()).chain(suffix.chars()).collect();
        let sql = format!(
            "CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT",
            quote_ident(&temporary)
        );
        let rows = repl.simple_query(&sql).await.map_err(|e| privilege(e, &temporary))?;
        let row = rows
            .first()
            .ok_or_else(|| CdcError::Protocol("CREATE_REPLICATION_SLOT returned no row".into()))?;
        let consistent: Lsn = row
            .get(1)
            .cloned()
            .flatten()
            .unwrap_or_default()
            .parse()
            .map_err(CdcError::Protocol)?;
        let snapshot_name = row
            .get(2)
            .cloned()
            .flatten()
            .ok_or_else(|| CdcError::Protocol("no exported snapshot".into()))?;
        tracing::info!(%consistent, snapshot = snapshot_name, tables = tables.len(), "snapshot started");
        self.metrics.healthy.store(true, Ordering::Relaxed);

        let reader = self.sql_client().await?;
        reader
            .batch_execute(&format!("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{snapshot_name}'"))
            .await?;
        let started_ms = now_ms();
        let mut held: Option<(usize, Vec<Datum>)> = None;
        let mut schemas = Vec::with_capacity(tables.len());
        for (index, published) in tables.iter().enumerate() {
            let topic = published.name.topic(&self.config.kafka.topic_prefix);
            let table = self.configured(catalog.table_schema(&reader, published, topic).await?)?;
            schemas.push(table);
            let table = &schemas[index];
            let label = format!("{}.{}", published.name.schema, published.name.name);
            let estimate: f32 = reader
                .query_one("SELECT reltuples FROM pg_class WHERE oid = $1", &[&table.relation.id])
                .await?
                .get(0);
            self.metrics.snapshot_estimate.with_label_values(&[&label]).set(row_estimate(estimate));
            let columns = table
                .relation
                .columns
                .iter()
                .map(|c| quote_ident(&c.name))
                .collect::<Vec<_>>()
                .join(", ");
            let only =
                if catalog::copy_only(&reader, table.relation.id).await? { "ONLY " } else { "" };
            // The publication's row filter, so that the snapshot holds what the stream would.
            let filter =
                published.row_filter.as_ref().map_or(String::new(), |f| format!(" WHERE {f}"));
            let copy = format!(
                "COPY (SELECT {columns} FROM {only}{}{filter}) TO STDOUT",
                published.name.sql()
            );
            let stream = reader.copy_out(&copy).await?;
            futures_util::pin_mut!(stream);
            let mut parser = CopyRows::default();
            let (mut copied, mut last_log) = (0_i64, Instant::now());
            while let Some(chunk) = stream.next().await {
                // COPY data arrives through a channel that is always ready and producing rarely
                // waits: without this, the snapshot would never give a shutdown its turn.
                tokio::task::consume_budget().await;
                for row in parser.push(&chunk?) {
                    if let Some((table_index, previous)) = held.replace((index, row)) {
                        self.snapshot_row(
                            &schemas[table_index],
                            &previous,
                            consistent,
                            started_ms,
                            "true",
                        )
                        .await?;
                    }
                    copied += 1;
                }
                if last_log.elapsed() >= Duration::from_secs(5) {
                    tracing::info!(table = label, copied, estimate, "snapshot progress");
                    last_log = Instant::now();
                }
                self.metrics.snapshot_rows.with_label_values(&[&label]).set(copied);
            }
            self.metrics.snapshot_rows.with_label_values(&[&label]).set(copied);
            tracing::info!(table = label, copied, "table snapshot done");
        }
        if let Some((table_index, last)) = held.take() {
            self.snapshot_row(&schemas[table_index], &last, consistent, started_ms, "last").await?;
        }
        reader.batch_execute("COMMIT").await?;
        self.sink.flush()?;
        while !self.in_flight.is_empty() {
            self.in_flight.next().await?;
        }
        Ok(Exported { _slot: repl, reader, temporary, consistent })
    }

    async fn snapshot_row(
        &mut self,
        table: &Table,
        row: &[Datum],
        lsn: Lsn,
        ts_ms: i64,
        snapshot: &'static str,
    ) -> Result<(), CdcError> {
        let source = Source {
            version: VERSION,
            name: &self.config.kafka.topic_prefix,
            db: &self.database,
            ts_ms,
            snapshot,
            tx_id: None,
            transaction: None,
            lsn,
            last_commit_lsn: None,
        };
        let records = event::change(table, Op::Read, None, Some(row), None, &source, now_ms());
        self.count(table, Op::Read);
        for record in records {
            self.send_now(record).await?;
        }
        Ok(())
    }

    /// Sends a record, waiting for room in the producer. For the snapshot, where nothing
    /// else needs attention meanwhile.
    async fn send_now(&mut self, record: Record) -> Result<(), CdcError> {
        loop {
            if self.in_flight.records() < self.config.kafka.max_in_flight {
                match self.sink.send(&record) {
                    Ok(delivery) => {
                        self.in_flight.push_record(delivery);
                        return Ok(());
                    }
                    Err(SendError::Fatal(e)) => return Err(e),
                    Err(SendError::QueueFull) => {}
                }
            }
            if self.in_flight.is_empty() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            } else {
                self.in_flight.next().await?;
            }
        }
    }

    /// `table` as the configuration shapes its events: its columns' masks (a rule that does
    /// not fit it stops the pipeline) and the precision of its times.
    fn configured(&self, mut table: Table) -> Result<Table, CdcError> {
        table.masks = self.masking.masks(&table).map_err(CdcError::Config)?;
        let precision = self.config.source.time_precision;
        for (ty, column) in table.types.iter_mut().zip(&table.relation.columns) {
            *ty =
                precision.apply(std::mem::replace(ty, ValueType::Scalar(0)), column.type_modifier);
        }
        Ok(table)
    }

    fn count(&self, table: &Table, op: Op) {
        let label = format!("{}.{}", table.relation.namespace, table.relation.name);
        self.metrics.events.with_label_values(&[&label, op.code()]).inc();
    }

    /// Streams the slot on `repl` until shutdown.
    async fn stream(
        &mut self,
        mut repl: ReplicationConnection,
        client: &Client,
        catalog: &mut Catalog,
        mut core: Core,
        mut shutdown: watch::Receiver<Shutdown>,
    ) -> Result<(), CdcError> {
        let source = &self.config.source;
        let flushed: Option<String> = client
            .query_opt(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&source.slot],
            )
            .await?
            .and_then(|row| row.get(0));
        let mut positions =
            Positions::new(flushed.and_then(|text| text.parse::<Lsn>().ok()).unwrap_or_default());
        repl.start_replication(&source.slot, Lsn::ZERO, &source.publication).await?;
        // The slot's health, on a side connection; the task ends with this attempt.
        let side = self.sql_client().await?;
        let mut slot_lost =
            AbortOnDrop(tokio::spawn(slot::watch(side, source.slot.clone(), self.metrics.clone())));
        tracing::info!(slot = source.slot, publication = source.publication, "streaming changes");
        self.metrics.healthy.store(true, Ordering::Relaxed);
        let ReplicationConnection { mut rx, mut tx, .. } = repl;
        let mut heartbeat = tokio::time::interval(source.heartbeat);
        let mut status = tokio::time::interval(Duration::from_secs(1).min(source.heartbeat));
        let mut retry = tokio::time::interval(Duration::from_millis(50));
        let mut chunks = Chunks::default();
        // After a pause (back-pressure), tick once, not once per missed period.
        for timer in [&mut heartbeat, &mut status, &mut retry] {
            timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        loop {
            let can_read = self.pending.is_empty()
                && self.in_flight.records() < self.config.kafka.max_in_flight;
            self.metrics.backpressure.set(i64::from(!can_read));
            self.metrics.in_flight.set(self.in_flight.records() as i64);
            // Nothing open and nothing unacknowledged: the server's position is safe.
            let idle =
                !core.in_transaction() && self.in_flight.is_empty() && self.pending.is_empty();
            tokio::select! {
                biased;
                _ = shutdown.changed() => {
                    self.drain(&mut positions, Duration::from_secs(10)).await;
                    let (received, confirmed) = positions.report();
                    tx.status_update(received, confirmed, false).await?;
                    tracing::info!(%confirmed, "cdc stopped");
                    return Ok(());
                }
                done = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    match done? {
                        Some(Marker::Commit(commit)) => {
                            positions.acknowledged(commit.lsn);
                            self.metrics.observe_commit_acked(commit.commit_time_us, now_us());
                        }
                        Some(Marker::Release(lsn, table)) => {
                            positions.release(lsn);
                            tracing::info!(table, "incremental snapshot on Kafka");
                        }
                        None => {}
                    }
                    self.send_pending()?;
                }
                done = chunks.step_done(), if chunks.step.is_some() => match done {
                    Ok(StepDone::Read(read)) => {
                        (chunks.retry_at, chunks.backoff) = (None, Duration::ZERO);
                        let id = read.id.clone();
                        core.backfill().chunk_read(read);
                        let client = chunks.client.clone().ok_or_else(|| CdcError::Protocol("no chunk connection".into()))?;
                        chunks.step = Some(Step::Marking(Box::pin(chunk::high(client, id))));
                    }
                    Ok(StepDone::Marked) => {}
                    Ok(StepDone::Altered) => {
                        tracing::info!("the table of the incremental snapshot was altered: looking it up again");
                        core.backfill().look_up_again();
                    }
                    // The table renamed or dropped since, or no longer readable: look it up
                    // again, a few times.
                    Err(CdcError::Sql(e)) if e.as_db_error().is_some() => {
                        tracing::warn!(error = %e, "an incremental snapshot chunk failed to read");
                        if let Some(lsn) = core.backfill().chunk_failed(CHUNK_ATTEMPTS) {
                            tracing::error!(error = %e, attempts = CHUNK_ATTEMPTS, "incremental snapshot given up: its chunks keep failing to read");
                            positions.release(lsn);
                        }
                    }
                    // The chunk connection lost: the next chunk takes a new one.
                    Err(e) if e.is_retryable() => {
                        chunks.failed(&e);
                        core.backfill().look_up_again();
                    }
                    Err(e) => return Err(e),
                },
                _ = retry.tick(), if !self.pending.is_empty() => self.send_pending()?,
                lost = &mut slot_lost.0 => {
                    return Err(lost.unwrap_or_else(|e| CdcError::Protocol(format!("slot watch failed: {e}"))));
                }
                message = rx.recv(), if can_read => match message? {
                    StreamMessage::XLogData { start, data, .. } => {
                        positions.received(start);
                        let message = pgoutput::decode(&data).map_err(|source| {
                            CdcError::Decode { lsn: start, source, bytes: bytes_summary(&data) }
                        })?;
                        let action = match core.on_message(message, start, now_ms())? {
                            Action::Hold { lsn, tables } => {
                                for table in &tables {
                                    positions.hold(lsn);
                                    tracing::info!(%table, %lsn, "incremental snapshot requested");
                                }
                                Action::None
                            }
                            action => action,
                        };
                        let acting = self.act(client, catalog, &mut core, action);
                        alive_while(acting, &mut tx, &mut positions).await?;
                        self.send_pending()?;
                    }
                    StreamMessage::Keepalive { wal_end, reply } => {
                        positions.keepalive(wal_end, idle);
                        if reply {
                            let (received, confirmed) = positions.report();
                            tx.status_update(received, confirmed, false).await?;
                        }
                    }
                },
                _ = status.tick(), if positions.unreported() => {
                    let (received, confirmed) = positions.report();
                    tx.status_update(received, confirmed, false).await?;
                }
                _ = heartbeat.tick() => {
                    // When idle, ask for a keepalive: its position confirms a quiet slot.
                    let (received, confirmed) = positions.report();
                    tx.status_update(received, confirmed, idle).await?;
                }
            }
            if chunks.step.is_none() {
                self.next_chunk(client, catalog, &mut core, &mut chunks, &mut positions).await?;
            }
            self.metrics.confirmed_lsn.set(positions.confirmed().0 as i64);
            self.metrics.received_lsn.set(positions.last_received().0 as i64);
        }
    }

    /// Starts reading the next chunk of an incremental snapshot, if one is due, looking up
    /// a table first when its snapshot starts. A table that cannot be read in key order is
    /// skipped, and its request's hold released.
    async fn next_chunk(
        &mut self,
        client: &Client,
        catalog: &mut Catalog,
        core: &mut Core,
        chunks: &mut Chunks,
        positions: &mut Positions,
    ) -> Result<(), CdcError> {
        if chunks.retry_at.is_some_and(|at| tokio::time::Instant::now() < at) {
            return Ok(());
        }
        while let Some((name, starts)) = core.backfill().needs_table() {
            // One snapshot for every catalog read, so that an ALTER TABLE between them
            // cannot pair one table's columns with another's fingerprint.
            client.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await?;
            let found = self.chunk_query(client, catalog, &name, starts).await;
            client.batch_execute(if found.is_ok() { "COMMIT" } else { "ROLLBACK" }).await?;
            match found? {
                Ok((table, query)) => core.backfill().table_found(table, Arc::new(query)),
                Err(problem) => {
                    tracing::error!(table = %name, problem, "incremental snapshot skipped");
                    if let Some(lsn) = core.backfill().abandon() {
                        positions.release(lsn);
                    }
                }
            }
        }
        self.metrics.incremental_tables.set(core.backfill().tables() as i64);
        if !core.backfill().chunk_due() {
            return Ok(());
        }
        let reader = match &chunks.client {
            Some(reader) => reader.clone(),
            None => match self.sql_client().await {
                Ok(reader) => Arc::new(reader),
                Err(e) => {
                    chunks.failed(&e);
                    return Ok(());
                }
            },
        };
        chunks.client = Some(reader.clone());
        let Some(plan) = core.backfill().next_chunk() else { return Ok(()) };
        chunks.step = Some(Step::Reading(Box::pin(chunk::read(reader, plan))));
        Ok(())
    }

    /// The catalog view and chunk query of a table to snapshot incrementally (whose snapshot
    /// `starts`, or goes on after a change), or why it cannot be.
    async fn chunk_query(
        &mut self,
        client: &Client,
        catalog: &mut Catalog,
        name: &TableName,
        starts: bool,
    ) -> Result<Result<(Arc<Table>, ChunkQuery), String>, CdcError> {
        let source = &self.config.source;
        let published = catalog::published_tables(client, &source.publication, None).await?;
        let Some(published) = published.into_iter().find(|t| &t.name == name) else {
            return Ok(Err(format!(
                "publication \"{}\" does not stream it (was it dropped?)",
                source.publication
            )));
        };
        let topic = published.name.topic(&self.config.kafka.topic_prefix);
        let table =
            Arc::new(self.configured(catalog.table_schema(client, &published, topic).await?)?);
        let Some(query) =
            chunk::query(client, &table, &published, source.snapshot_chunk_rows).await?
        else {
            return Ok(Err("it has neither a primary key nor a replica identity index to read it by in key order".into()));
        };
        if starts {
            let estimate: f32 = client
                .query_one("SELECT reltuples FROM pg_class WHERE oid = $1", &[&table.relation.id])
                .await?
                .get(0);
            let label = format!("{}.{}", name.schema, name.name);
            self.metrics.snapshot_estimate.with_label_values(&[&label]).set(row_estimate(estimate));
            self.metrics.snapshot_rows.with_label_values(&[&label]).set(0);
            tracing::info!(
                table = label,
                estimate = row_estimate(estimate),
                chunk_rows = source.snapshot_chunk_rows,
                "incremental snapshot started"
            );
        }
        Ok(Ok((table, query)))
    }

    /// Does what the core asked for after a message (but a hold, which is the stream loop's:
    /// it owns the positions).
    async fn act(
        &mut self,
        client: &Client,
        catalog: &mut Catalog,
        core: &mut Core,
        action: Action,
    ) -> Result<(), CdcError> {
        match action {
            Action::None => {}
            Action::Learn { relation, topic } => {
                let table =
                    Arc::new(self.configured(catalog.table_for(client, relation, topic).await?)?);
                self.sink.ensure_topics(std::slice::from_ref(&table.topic)).await?;
                core.learned(table);
            }
            Action::Send { records, counted } => {
                self.ensure_topics_of(&records).await?;
                for (table, op) in &counted {
                    self.metrics.events.with_label_values(&[table, op.code()]).inc();
                }
                self.pending.extend(records.into_iter().map(Pending::Record));
            }
            Action::Commit { records, commit } => {
                self.ensure_topics_of(&records).await?;
                self.pending.extend(records.into_iter().map(Pending::Record));
                self.pending.push_back(Pending::Commit(commit));
            }
            Action::Hold { .. } => {}
            Action::Backfill(reconciled) => self.backfilled(reconciled).await?,
        }
        Ok(())
    }

    /// Sends the rows of an incremental snapshot's chunk, and after the last one the
    /// release of its request's hold.
    async fn backfilled(&mut self, chunk: Reconciled) -> Result<(), CdcError> {
        let label = &chunk.label;
        if chunk.reread {
            self.metrics.incremental_rereads.inc();
            tracing::debug!(
                table = label,
                "a chunk missed a commit streamed before it: reading it again"
            );
            return Ok(());
        }
        self.ensure_topics_of(&chunk.records).await?;
        self.metrics.events.with_label_values(&[label, Op::Read.code()]).inc_by(chunk.sent);
        self.metrics.incremental_rows.with_label_values(&[label]).inc_by(chunk.sent);
        self.metrics.snapshot_rows.with_label_values(&[label]).set(chunk.read as i64);
        self.pending.extend(chunk.records.into_iter().map(Pending::Record));
        if let Some(lsn) = chunk.done {
            self.pending.push_back(Pending::Release(lsn, label.clone()));
            tracing::info!(
                table = label,
                read = chunk.read,
                "incremental snapshot read to the end"
            );
        } else if self.progress_logged.elapsed() >= Duration::from_secs(5) {
            self.progress_logged = Instant::now();
            tracing::info!(table = label, read = chunk.read, "incremental snapshot progress");
        }
        Ok(())
    }

    /// Creates the topics of `records` not known yet: outbox events go to a topic per
    /// aggregate type, transaction events to `<prefix>.transaction`, met as they come.
    async fn ensure_topics_of(&mut self, records: &[Record]) -> Result<(), CdcError> {
        for record in records {
            if !self.sink.knows(&record.topic) {
                self.sink.ensure_topics(std::slice::from_ref(&record.topic)).await?;
            }
        }
        Ok(())
    }

    /// Waits, up to `limit`, for records in flight to be acknowledged.
    async fn drain(&mut self, positions: &mut Positions, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while !self.in_flight.is_empty() {
            match tokio::time::timeout_at(deadline, self.in_flight.next()).await {
                Ok(Ok(Some(Marker::Commit(commit)))) => positions.acknowledged(commit.lsn),
                Ok(Ok(Some(Marker::Release(lsn, _)))) => positions.release(lsn),
                Ok(Ok(None)) => {}
                Ok(Err(_)) | Err(_) => return,
            }
        }
    }

    /// Hands pending records to the producer until it is full.
    fn send_pending(&mut self) -> Result<(), CdcError> {
        while let Some(item) = self.pending.front() {
            match item {
                Pending::Commit(commit) => {
                    self.sink.flush()?;
                    self.in_flight.push_marker(Marker::Commit(*commit));
                }
                Pending::Release(lsn, table) => {
                    self.sink.flush()?;
                    self.in_flight.push_marker(Marker::Release(*lsn, table.clone()));
                }
                Pending::Record(record) => {
                    if self.in_flight.records() >= self.config.kafka.max_in_flight {
                        return Ok(());
                    }
                    match self.sink.send(record) {
                        Ok(delivery) => self.in_flight.push_record(delivery),
                        Err(SendError::QueueFull) => return Ok(()),
                        Err(SendError::Fatal(e)) => return Err(e),
                    }
                }
            }
            self.pending.pop_front();
        }
        Ok(())
    }
}

/// A SQL connection to the source, with ficus's session settings.
async fn sql_client(config: &CdcConfig) -> Result<Client, CdcError> {
    let params = config.source.connect_params()?;
    let pg_config = config.source.pg_config()?;
    let connect_error = |e: tokio_postgres::Error| {
        let message = e.to_string();
        if e.as_db_error().is_some() {
            CdcError::Sql(e)
        } else if message.contains("TLS") {
            // A certificate the settings reject does not fix itself: no retry.
            let detail = std::error::Error::source(&e).map_or(message, |s| s.to_string());
            CdcError::Tls { addr: format!("{}:{}", params.host, params.port), message: detail }
        } else {
            CdcError::Connect {
                addr: format!("{}:{}", params.host, params.port),
                source: std::io::Error::other(e.to_string()),
            }
        }
    };
    let client = match &params.tls {
        Some(tls) => {
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new((**tls).clone());
            let (client, connection) = pg_config.connect(tls).await.map_err(connect_error)?;
            tokio::spawn(log_end(connection));
            client
        }
        None => {
            let (client, connection) = pg_config.connect(NoTls).await.map_err(connect_error)?;
            tokio::spawn(log_end(connection));
            client
        }
    };
    let settings: String =
        SESSION_SETTINGS.iter().map(|(k, v)| format!("SET {k} = '{v}';")).collect();
    client.batch_execute(&settings).await?;
    Ok(client)
}

/// Asks the `ficus cdc` streaming `config`'s slot to snapshot `tables` again, incrementally,
/// while it streams: the request is a message in the WAL, so it reaches the reader on
/// whichever host it runs, and survives its restarts. Returns the request's position and
/// whether a reader streams the slot now.
pub async fn request_snapshot(
    config: &CdcConfig,
    tables: &[TableName],
) -> Result<(Lsn, bool), CdcError> {
    let source = &config.source;
    let client = sql_client(config).await?;
    let Some(slot) = catalog::slot_state(&client, &source.slot).await? else {
        return Err(CdcError::Config(format!(
            "replication slot \"{}\" does not exist: no ficus cdc has streamed it yet, and the first one's initial snapshot reads every table",
            source.slot
        )));
    };
    if catalog::server_version(&client).await? < catalog::MESSAGES_VERSION {
        return Err(CdcError::Config(
            "incremental snapshots need PostgreSQL 14 or later (earlier versions do not stream logical messages)".into(),
        ));
    }
    let configured = source.table_names()?;
    let published = catalog::published_tables(&client, &source.publication, None).await?;
    let mut problems = Vec::new();
    for table in tables {
        if configured.as_ref().is_some_and(|names| !names.contains(table)) {
            problems.push(format!("{table} is not in source.tables"));
        } else if !published.iter().any(|p| &p.name == table) {
            problems
                .push(format!("publication \"{}\" does not stream {table}", source.publication));
        }
    }
    if !problems.is_empty() {
        return Err(CdcError::Config(problems.join("; ")));
    }
    let content = crate::incremental::request_content(&source.slot, tables);
    let lsn: String = client
        .query_one(
            "SELECT pg_logical_emit_message(true, $1::text, $2::text)::text",
            &[&crate::incremental::REQUEST_PREFIX, &content],
        )
        .await?
        .get(0);
    Ok((lsn.parse().map_err(CdcError::Protocol)?, slot.active_pid.is_some()))
}

/// Awaits `work` (a catalog lookup, topics to create) while telling the server every second
/// that this reader is alive: a Kafka slow to answer must not let the server's
/// `wal_sender_timeout` end the replication connection meanwhile.
async fn alive_while<T>(
    work: impl std::future::Future<Output = Result<T, CdcError>>,
    tx: &mut Sender,
    positions: &mut Positions,
) -> Result<T, CdcError> {
    tokio::pin!(work);
    let start = tokio::time::Instant::now() + Duration::from_secs(1);
    let mut alive = tokio::time::interval_at(start, Duration::from_secs(1));
    loop {
        tokio::select! {
            done = &mut work => return done,
            _ = alive.tick() => {
                let (received, confirmed) = positions.report();
                tx.status_update(received, confirmed, false).await?;
            }
        }
    }
}

/// A task aborted when its handle is dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Drives a SQL connection to its end.
async fn log_end<F: std::future::Future<Output = Result<(), tokio_postgres::Error>>>(
    connection: F,
) {
    if let Err(e) = connection.await {
        tracing::debug!(error = %e, "SQL connection ended");
    }
}

fn privilege(e: CdcError, slot: &str) -> CdcError {
    match e {
        CdcError::Server(server) => CdcError::from_server(server, slot),
        other => other,
    }
}

/// `pg_class.reltuples` as the snapshot's row estimate: -1 when PostgreSQL has none (since
/// PostgreSQL 14, a table never vacuumed or analyzed has -1; an empty one analyzed, 0).
fn row_estimate(reltuples: f32) -> i64 {
    if reltuples < 0.0 {
        -1
    } else {
        reltuples.round() as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_never_analyzed_has_no_estimate() {
        assert_eq!(row_estimate(-1.0), -1);
        assert_eq!(row_estimate(0.0), 0);
        assert_eq!(row_estimate(1234.4), 1234);
    }
}
