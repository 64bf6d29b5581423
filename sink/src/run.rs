//! The sink's I/O: reads the topics from the offsets kept in the target database, applies
//! each batch in one transaction that also stores the offsets after it, so that a crash at
//! any moment neither loses nor repeats an event's effect.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ficus_cdc::error::{sqlstate_recovery, Recovery};
use ficus_cdc::names::TableName;
use rdkafka::message::{Message, OwnedMessage};
use tokio::sync::watch;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls};

use crate::config::{KafkaConfig, OnError, PostgresConfig, SinkConfig, TableConfig};
use crate::metrics::{Delivery, Metrics};
use crate::plan::{self, Event, Mode, Step, Target};
use crate::{schema, source};

const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often the partitions' high watermarks are asked for, busy or idle.
const LAG_EVERY: Duration = Duration::from_secs(2);

/// Why the sink stopped or restarts.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("invalid sink configuration: {0}")]
    Config(String),
    #[error("target PostgreSQL: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("Kafka: {0}")]
    Kafka(String),
    #[error("{topic} partition {partition} offset {offset}: {problem}. The partition is stopped: nothing from this event on is applied (other partitions go on); fix the target or the event and restart, or set postgres.on_error = \"skip\"")]
    Event { topic: String, partition: i32, offset: i64, problem: String },
    /// Not a failure: topics matching `kafka.topic_regex` appeared; the tables' delivery
    /// starts again from its stored offsets to read them too.
    #[error("new topics match kafka.topic_regex: {}", .0.join(", "))]
    NewTopics(Vec<String>),
    #[error("applying {topic} partition {partition} offsets {first}..={last} failed: {source}")]
    Apply { topic: String, partition: i32, first: i64, last: i64, source: tokio_postgres::Error },
}

impl SinkError {
    /// Whether starting again from the stored offsets may succeed.
    fn is_retryable(&self) -> bool {
        match self {
            SinkError::Postgres(e) | SinkError::Apply { source: e, .. } => match e.code() {
                // The target restarting, out of connections, ...: it passes with time.
                Some(code) => sqlstate_recovery(code.code()) != Recovery::Stop,
                None => true,
            },
            SinkError::Kafka(_) | SinkError::NewTopics(_) => true,
            _ => false,
        }
    }
}

/// Runs until `shutdown` turns true: the target tables and the webhook side by side, each
/// retrying what may pass (the database, the endpoint or Kafka away) from its stored offsets.
pub async fn run(
    config: SinkConfig,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), SinkError> {
    let tables = async {
        let Some(postgres) = &config.postgres else { return Ok(()) };
        retrying(Delivery::Tables, &metrics, shutdown.clone(), || {
            let source = config.source.as_ref().map(|s| s.url.as_str());
            run_once(&config.kafka, postgres, source, &metrics, shutdown.clone())
        })
        .await
    };
    let hooks = async {
        let Some(hook) = &config.webhook else { return Ok(()) };
        let topics = config.webhook_topics();
        retrying(Delivery::Webhook, &metrics, shutdown.clone(), || {
            crate::deliver::run_once(&config.kafka, &topics, hook, &metrics, shutdown.clone())
        })
        .await
    };
    tokio::try_join!(tables, hooks).map(|_| ())
}

/// Runs `attempt` again with back-off while it fails with what may pass.
async fn retrying<F, Fut>(
    delivery: Delivery,
    metrics: &Metrics,
    mut shutdown: watch::Receiver<bool>,
    mut attempt: F,
) -> Result<(), SinkError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), SinkError>>,
{
    let mut backoff = Duration::from_millis(250);
    loop {
        metrics.set_up(delivery, false);
        let started = Instant::now();
        let result = attempt().await;
        metrics.set_up(delivery, false);
        match result {
            Ok(()) => return Ok(()),
            // Stopping anyway: what failed on the way out is no reason to fail.
            Err(e) if e.is_retryable() && *shutdown.borrow() => return Ok(()),
            Err(e @ SinkError::NewTopics(_)) => tracing::info!(?delivery, "{e}: reading them too"),
            Err(e) if e.is_retryable() => {
                if started.elapsed() > Duration::from_secs(60) {
                    backoff = Duration::from_millis(250);
                }
                tracing::warn!(?delivery, error = %e, retry_in = ?backoff, "sink failed; resuming from the stored offsets");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return Ok(()),
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Err(e) => return Err(e),
        }
    }
}

async fn run_once(
    kafka: &KafkaConfig,
    postgres: &PostgresConfig,
    source_url: Option<&str>,
    metrics: &Metrics,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), SinkError> {
    let mut client = connect("postgres.url", &postgres.url).await?;
    if !applier(&client, kafka.name(), &mut shutdown).await? {
        return Ok(());
    }
    let offsets_table = TableName::parse(&postgres.offsets_table).map_err(SinkError::Config)?.sql();
    client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {offsets_table} (sink text NOT NULL, topic text NOT NULL, \
             \"partition\" int NOT NULL, next_offset bigint NOT NULL, PRIMARY KEY (sink, topic, \"partition\"))"
        ))
        .await?;
    // The topics read: those the tables name and, with `all_topics`, `kafka.topics` or those
    // `kafka.topic_regex` matches now (one appearing later starts the delivery again).
    let pattern = kafka.topic_pattern().map_err(SinkError::Config)?;
    let pattern = pattern.filter(|_| postgres.all_topics);
    let consumer = source::client(kafka)?;
    let matched = match &pattern {
        Some(pattern) => source::matching(&consumer, pattern)?,
        None => kafka.topics.clone(),
    };
    let wanted = postgres.tables_for(&matched);
    // The source's catalog, for tables created or grown from it.
    let source = match source_url {
        Some(url) if wanted.iter().any(|t| t.create) => Some(connect("source.url", url).await?),
        _ => None,
    };
    let mut tables = Vec::with_capacity(wanted.len());
    let mut targets = Vec::with_capacity(wanted.len());
    // Topics without an entry that cannot be applied: left unread (until a restart), named,
    // and counted as stopped, while the others go on.
    let mut unread = 0;
    for table in wanted {
        let entry = postgres.tables.iter().any(|t| t.topic == table.topic);
        let taken = tables.iter().find(|t: &&TableConfig| t.table_name() == table.table_name());
        let prepared = match taken {
            Some(other) if !entry => Err(SinkError::Config(format!(
                "its table is the one topic {} feeds: give it a [[postgres.tables]] entry",
                other.topic
            ))),
            _ => prepared(&client, source.as_ref(), &table).await,
        };
        match prepared {
            Ok(target) => {
                tables.push(table);
                targets.push(target);
            }
            Err(SinkError::Config(why)) if !entry => {
                tracing::error!(topic = table.topic, "topic not applied: {why}; its events wait in Kafka until this is fixed and the sink restarted");
                unread += source::partitions(&consumer, std::slice::from_ref(&table.topic))
                    .map_or(1, |p| p.len());
            }
            Err(e) => return Err(e),
        }
    }
    // The applier replaces them when it adds a column; the reader plans with the latest.
    let shared = std::sync::RwLock::new(Arc::new(targets));
    let latest = || shared.read().map_or_else(|e| e.into_inner().clone(), |t| t.clone());
    // Each topic once; a topic may feed several tables (its rows, and an audit of them).
    let mut topics: Vec<String> = tables.iter().map(|t| t.topic.clone()).collect();
    topics.sort_unstable();
    topics.dedup();
    let stored = stored_offsets(&client, &offsets_table, kafka.name()).await?;
    let partitions = source::partitions(&consumer, &topics)?;
    source::assign(&consumer, &partitions, &stored)?;
    tracing::info!(topics = %topics.join(", "), from = ?stored, "sink started");
    // Counted from here on, where every way out takes it back.
    metrics.stopped.add(unread as i64);
    metrics.set_up(Delivery::Tables, true);
    let skip = postgres.on_error == OnError::Skip;
    // Partitions stopped at an event that cannot be applied: the applier adds them, the
    // reader pauses them and drops what it still holds of them.
    let stopped: Mutex<BTreeSet<(String, i32)>> = Mutex::default();
    let stopped_now = || stopped.lock().map_or_else(|e| e.into_inner().clone(), |s| s.clone());
    // Reading and planning the next batch overlaps with applying this one: one batch waits
    // between them at most.
    let (planned, mut to_apply) = tokio::sync::mpsc::channel::<Planned>(1);
    let read = async {
        // Owned here: when reading stops, the applier sees the end once it applied the rest.
        let planned = planned;
        let mut lag_read = Instant::now().checked_sub(LAG_EVERY).unwrap_or_else(Instant::now);
        let mut positions = source::positions(&stored);
        let mut paused = BTreeSet::new();
        let mut listed = Instant::now();
        // One stream for the whole run: waiting on its next message may be given up
        // without losing one (a `recv` given up may have taken a message already).
        let mut messages = consumer.stream();
        loop {
            if let Some(pattern) =
                pattern.as_ref().filter(|_| listed.elapsed() >= source::LIST_EVERY)
            {
                listed = Instant::now();
                let now = source::matching(&consumer, pattern)?;
                let new: Vec<String> = now.into_iter().filter(|t| !matched.contains(t)).collect();
                if !new.is_empty() {
                    // Applied up to here; the delivery starts again with them from the
                    // stored offsets (their tables prepared, or made, first).
                    return Ok(Some(new));
                }
            }
            let mut batch = tokio::select! {
                batch = source::collect(&mut messages, postgres.batch, postgres.linger) => batch?,
                _ = shutdown.changed() => return Ok(None),
            };
            let halted = stopped_now();
            for (topic, partition) in halted.difference(&paused) {
                source::pause(&consumer, topic, *partition);
            }
            paused.clone_from(&halted);
            let mut sought = BTreeSet::new();
            batch.retain(|m| {
                let halted = halted.iter().any(|(t, p)| t == m.topic() && *p == m.partition());
                !halted && source::admit(&consumer, &mut positions, &mut sought, m)
            });
            if lag_read.elapsed() >= LAG_EVERY {
                lag_read = Instant::now();
                source::lag(&consumer, positions.iter().map(|(k, p)| (k, p.next)), metrics);
            }
            if batch.is_empty() {
                continue;
            }
            let targets = latest();
            let events = events(&tables, &batch);
            let (plan, skipped) = plan::plan(&targets, &events, skip);
            drop(events);
            let batch = Planned { messages: batch, targets, plan, skipped };
            if planned.send(batch).await.is_err() {
                // The applier stopped; its error is the answer.
                return Ok(None);
            }
        }
    };
    let apply_all = async {
        let mut warned = BTreeSet::new();
        while let Some(batch) = to_apply.recv().await {
            let Planned { messages, mut targets, mut plan, skipped } = batch;
            let mut events = events(&tables, &messages);
            // Planned before a column was added: planned again.
            if !Arc::ptr_eq(&targets, &latest()) {
                targets = latest();
                plan = plan::plan(&targets, &events, skip).0;
            }
            if let Some(grown) =
                grow(&client, source.as_ref(), &tables, &targets, &plan.unknown_columns).await?
            {
                targets = Arc::new(grown);
                if let Ok(mut shared) = shared.write() {
                    *shared = targets.clone();
                }
                plan = plan::plan(&targets, &events, skip).0;
            }
            for (at, problem) in &skipped {
                skipped_event(metrics, &targets, &events[*at], problem);
            }
            for (target, column) in &plan.unknown_columns {
                if warned.insert((*target, column.clone())) {
                    tracing::warn!(
                        table = targets[*target].sql,
                        column,
                        "events carry a column the target table lacks: it is not applied"
                    );
                }
            }
            // Read before its partition stopped: left out.
            let halted = stopped_now();
            let halted_event =
                |e: &Event<'_>| halted.iter().any(|(t, p)| t == e.topic && *p == e.partition);
            if events.iter().any(halted_event) {
                events.retain(|e| !halted_event(e));
                plan = plan::plan(&targets, &events, skip).0;
            }
            let sink = kafka.name();
            loop {
                // Applied up to the message of the first event that could not be planned:
                // a message feeding two tables is applied to both or neither, or its offset
                // would be stored with one table missing it.
                let upto = match &plan.failed {
                    Some((at, _)) => message_start(&events, *at),
                    None => events.len(),
                };
                let applied = &events[..upto];
                let replanned;
                let steps = match &plan.failed {
                    Some((at, _)) if *at > upto => {
                        replanned = plan::plan(&targets, applied, skip).0.steps;
                        &replanned
                    }
                    _ => &plan.steps,
                };
                let started = Instant::now();
                let refusal = match apply(
                    &mut client,
                    &targets,
                    steps,
                    applied,
                    &offsets_table,
                    sink,
                )
                .await
                {
                    Err(SinkError::Apply { source, .. }) if refused(&source) => {
                        settle(&mut client, &targets, applied, skip, &offsets_table, sink, metrics)
                            .await?
                    }
                    Err(e) => return Err(e),
                    Ok(()) => {
                        count(metrics, &targets, steps);
                        None
                    }
                };
                metrics.apply.observe(started.elapsed().as_secs_f64());
                metrics.batch.observe(applied.len() as f64);
                let Some((at, problem)) = refusal.or(plan.failed.take()) else { break };
                // Its partition stops there; the others' events after it are applied.
                let (topic, partition) = (events[at].topic, events[at].partition);
                let stop = SinkError::Event {
                    topic: topic.to_string(),
                    partition,
                    offset: events[at].offset,
                    problem,
                };
                tracing::error!("{stop}");
                if let Ok(mut stopped) = stopped.lock() {
                    stopped.insert((topic.to_string(), partition));
                }
                metrics.stopped.inc();
                let mut rest = events.split_off(at + 1);
                rest.retain(|e| !(e.topic == topic && e.partition == partition));
                events = rest;
                plan = plan::plan(&targets, &events, skip).0;
            }
        }
        Ok(())
    };
    let result = match tokio::try_join!(read, apply_all) {
        Ok((Some(new), ())) => Err(SinkError::NewTopics(new)),
        Ok((None, ())) => Ok(()),
        Err(e) => Err(e),
    };
    // A restart reads a stopped partition (and tries an unread topic) again.
    metrics.stopped.sub((stopped_now().len() + unread) as i64);
    result
}

/// Where the events of `events[at]`'s message start (a message feeding several tables is
/// one event per table, side by side).
fn message_start(events: &[Event<'_>], at: usize) -> usize {
    let same = |e: &Event<'_>| {
        e.topic == events[at].topic
            && e.partition == events[at].partition
            && e.offset == events[at].offset
    };
    events[..at].iter().rposition(|e| !same(e)).map_or(0, |before| before + 1)
}

/// A batch read and planned, on its way to be applied.
struct Planned {
    messages: Vec<OwnedMessage>,
    /// The tables as they were planned for.
    targets: Arc<Vec<Target>>,
    plan: plan::Plan,
    /// Events left out (`on_error = "skip"`), by index in the batch's events, and why.
    skipped: Vec<(usize, String)>,
}

/// The events of `messages`: each message once for every table its topic feeds.
fn events<'m>(tables: &[TableConfig], messages: &'m [OwnedMessage]) -> Vec<Event<'m>> {
    messages
        .iter()
        .flat_map(|m| {
            let tables = tables.iter().enumerate();
            tables.filter(|(_, t)| t.topic == m.topic()).map(|(target, _)| Event {
                target,
                topic: m.topic(),
                partition: m.partition(),
                offset: m.offset(),
                key: m.key(),
                value: m.payload(),
            })
        })
        .collect()
}

/// A configured table as the target has it; created first from the source's catalog when
/// it does not exist and `create` is set.
async fn prepared(
    client: &Client,
    source: Option<&Client>,
    table: &TableConfig,
) -> Result<Target, SinkError> {
    if let Some(target) = schema::target(client, table).await? {
        return Ok(target);
    }
    let name = table.table_name().map_err(SinkError::Config)?;
    let missing = || {
        SinkError::Config(format!(
            "target table {name} (for topic {}) does not exist; create it, or set create = true",
            table.topic
        ))
    };
    let (true, Some(source)) = (table.create, source) else { return Err(missing()) };
    let from = table.source_table().map_err(SinkError::Config)?;
    let columns = schema::source_columns(source, &from).await?;
    if columns.is_empty() && table.mode == Mode::Upsert {
        return Err(SinkError::Config(format!(
            "cannot create {name}: the source has no table {from} (from topic {})",
            table.topic
        )));
    }
    client.batch_execute(&schema::create_sql(&name, table.mode, &columns, &table.columns)).await?;
    tracing::info!(table = %name, from = %from, "created the target table from the source's catalog");
    schema::target(client, table).await?.ok_or_else(missing)
}

/// Adds to `create = true` tables the columns events carry that they lack (`unknown`, by
/// target), typed as the source has them; the tables as they are then, or `None` when none
/// was added.
async fn grow(
    client: &Client,
    source: Option<&Client>,
    tables: &[TableConfig],
    targets: &[Target],
    unknown: &BTreeSet<(usize, String)>,
) -> Result<Option<Vec<Target>>, SinkError> {
    let Some(source) = source else { return Ok(None) };
    let mut grown: Option<Vec<Target>> = None;
    for (index, name) in unknown {
        let table = &tables[*index];
        if !table.create {
            continue;
        }
        let from = table.source_table().map_err(SinkError::Config)?;
        let columns = schema::source_columns(source, &from).await?;
        let renamed =
            |c: &&schema::SourceColumn| table.columns.get(&c.name).unwrap_or(&c.name) == name;
        let Some(column) = columns.iter().find(renamed) else {
            // Gone from the source again; left to the warning.
            continue;
        };
        let target = &targets[*index];
        client.batch_execute(&schema::add_column_sql(&target.sql, column, &table.columns)).await?;
        tracing::info!(
            table = target.label,
            column = name,
            type_sql = column.type_sql,
            "added a column the events carry"
        );
        if let Some(now) = schema::target(client, table).await? {
            grown.get_or_insert_with(|| targets.to_vec())[*index] = now;
        }
    }
    Ok(grown)
}

/// A connection to the target, over TLS as `sslmode` in its URL asks (libpq's meanings).
async fn connect(key: &str, url: &str) -> Result<Client, SinkError> {
    let config_error = |e: ficus_cdc::error::CdcError| match e {
        ficus_cdc::error::CdcError::Config(problem) => SinkError::Config(problem),
        other => SinkError::Config(other.to_string()),
    };
    let (config, tls) = ficus_cdc::config::sql_config(key, url).map_err(config_error)?;
    let ended = |result: Result<(), tokio_postgres::Error>| {
        if let Err(e) = result {
            tracing::debug!(error = %e, "target connection ended");
        }
    };
    Ok(match ficus_cdc::tls::client_config(&tls).map_err(config_error)? {
        Some(tls) => {
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*tls).clone());
            let (client, connection) = config.connect(tls).await?;
            tokio::spawn(async move { ended(connection.await) });
            client
        }
        None => {
            let (client, connection) = config.connect(NoTls).await?;
            tokio::spawn(async move { ended(connection.await) });
            client
        }
    })
}

/// Waits until this process is the one applying for the sink `name` (a session advisory
/// lock on the target connection: a second replica stands by, and takes over when the
/// first one's connection is gone). False when shutdown came first.
async fn applier(
    client: &Client,
    name: &str,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<bool, SinkError> {
    let key = format!("ficus-sink:{name}");
    let mut announced = false;
    loop {
        let row = client.query_one("SELECT pg_try_advisory_lock(hashtext($1))", &[&key]).await?;
        if row.get::<_, bool>(0) {
            if announced {
                tracing::info!(sink = name, "the other sink is gone: taking over");
            }
            return Ok(true);
        }
        if !announced {
            tracing::info!(
                sink = name,
                "another sink of this name applies to the target: standing by"
            );
            announced = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => return Ok(false),
        }
    }
}

/// The offsets after the last applied event, by topic and partition.
async fn stored_offsets(
    client: &Client,
    table: &str,
    sink: &str,
) -> Result<BTreeMap<(String, i32), i64>, SinkError> {
    let rows = client
        .query(
            &format!("SELECT topic, \"partition\", next_offset FROM {table} WHERE sink = $1"),
            &[&sink],
        )
        .await?;
    Ok(rows.iter().map(|r| ((r.get(0), r.get(1)), r.get(2))).collect())
}

/// Applies `steps`, and stores the offsets after `events`, in one transaction.
async fn apply(
    client: &mut Client,
    targets: &[Target],
    steps: &[Step],
    events: &[Event<'_>],
    offsets_table: &str,
    sink: &str,
) -> Result<(), SinkError> {
    if events.is_empty() {
        return Ok(());
    }
    let failed = |source: tokio_postgres::Error| {
        let (first, last) = (&events[0], &events[events.len() - 1]);
        SinkError::Apply {
            topic: first.topic.to_string(),
            partition: first.partition,
            first: first.offset,
            last: last.offset,
            source,
        }
    };
    let tx = client.transaction().await?;
    execute(&tx, targets, steps).await.map_err(failed)?;
    let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for event in events {
        next.insert((event.topic, event.partition), event.offset + 1);
    }
    let topics: Vec<&str> = next.keys().map(|(t, _)| *t).collect();
    let partitions: Vec<i32> = next.keys().map(|(_, p)| *p).collect();
    let offsets: Vec<i64> = next.values().copied().collect();
    tx.execute(
        &format!(
            "INSERT INTO {offsets_table} (sink, topic, \"partition\", next_offset) \
             SELECT $1, * FROM unnest($2::text[], $3::int4[], $4::int8[]) \
             ON CONFLICT (sink, topic, \"partition\") DO UPDATE SET next_offset = EXCLUDED.next_offset"
        ),
        &[&sink, &topics, &partitions, &offsets],
    )
    .await?;
    tx.commit().await?;
    tracing::debug!(
        first = events[0].offset,
        last = events[events.len() - 1].offset,
        events = events.len(),
        ?next,
        "batch applied"
    );
    Ok(())
}

/// Logs and counts an event left out under `on_error = "skip"`.
fn skipped_event(metrics: &Metrics, targets: &[Target], event: &Event<'_>, problem: &str) {
    tracing::warn!(
        topic = event.topic,
        partition = event.partition,
        offset = event.offset,
        problem,
        "event skipped (on_error = \"skip\")"
    );
    metrics.events.with_label_values(&[&targets[event.target].label, "skipped"]).inc();
}

/// Counts the events `steps` applied, by table and kind.
fn count(metrics: &Metrics, targets: &[Target], steps: &[Step]) {
    for step in steps {
        let (target, kind, events) = match step {
            Step::Upsert { target, rows, .. } => (target, "upsert", rows.len()),
            Step::Delete { target, keys } => (target, "delete", keys.len()),
            Step::Truncate { target } => (target, "truncate", 1),
            Step::Append { target, rows } => (target, "append", rows.len()),
        };
        metrics.events.with_label_values(&[&targets[*target].label, kind]).inc_by(events as u64);
    }
}

/// Whether the database refused a value (a data exception, a violated constraint), rather
/// than failed.
fn refused(error: &tokio_postgres::Error) -> bool {
    error.code().is_some_and(|code| matches!(&code.code()[..2], "22" | "23"))
}

/// Applies a batch the database refused as a whole: finds the event it refuses, applies the
/// events before it and returns it (its index and why), or with `skip` leaves it out and
/// goes on.
async fn settle(
    client: &mut Client,
    targets: &[Target],
    events: &[Event<'_>],
    skip: bool,
    offsets_table: &str,
    sink: &str,
    metrics: &Metrics,
) -> Result<Option<(usize, String)>, SinkError> {
    let mut remaining = events;
    while !remaining.is_empty() {
        let Some((at, problem)) = refused_event(client, targets, remaining).await? else {
            // Each applies alone: together they fail, and that error is the answer.
            let (plan, _) = plan::plan(targets, remaining, true);
            apply(client, targets, &plan.steps, remaining, offsets_table, sink).await?;
            return Ok(None);
        };
        let (before, _) = plan::plan(targets, &remaining[..at], true);
        let event = &remaining[at];
        if !skip {
            // Not the events of its message for other tables either.
            let upto = message_start(remaining, at);
            let (before, _) = plan::plan(targets, &remaining[..upto], true);
            apply(client, targets, &before.steps, &remaining[..upto], offsets_table, sink).await?;
            // As an index into `events`.
            return Ok(Some((events.len() - remaining.len() + at, problem)));
        }
        skipped_event(metrics, targets, event, &problem);
        // Its offset is stored with those before it: it is not read again.
        apply(client, targets, &before.steps, &remaining[..=at], offsets_table, sink).await?;
        remaining = &remaining[at + 1..];
    }
    Ok(None)
}

/// The first of `events` the database refuses on its own, and why (with the column when it
/// can be named); each is tried in a transaction rolled back.
async fn refused_event(
    client: &mut Client,
    targets: &[Target],
    events: &[Event<'_>],
) -> Result<Option<(usize, String)>, SinkError> {
    for (at, event) in events.iter().enumerate() {
        let (plan, _) = plan::plan(targets, std::slice::from_ref(event), true);
        let tx = client.transaction().await?;
        let result = execute(&tx, targets, &plan.steps).await;
        tx.rollback().await?;
        let Err(error) = result else { continue };
        let Some(db) = error.as_db_error() else { return Err(error.into()) };
        let column = match db.column() {
            Some(column) => Some(column.to_string()),
            None => refused_column(client, targets, &plan.steps).await?,
        };
        let problem = match column {
            Some(column) => format!("column {column}: {}", db.message()),
            None => db.message().to_string(),
        };
        return Ok(Some((at, problem)));
    }
    Ok(None)
}

/// The column whose value does not convert to its type, in a one-event plan.
async fn refused_column(
    client: &Client,
    targets: &[Target],
    steps: &[Step],
) -> Result<Option<String>, SinkError> {
    let Some(Step::Upsert { target, columns, rows }) = steps.first() else { return Ok(None) };
    let (Some(row), target) = (rows.first(), &targets[*target]) else { return Ok(None) };
    for (&column, value) in columns.iter().zip(row) {
        let column = &target.columns[column];
        let cast = format!("SELECT $1::text::{}", column.type_sql);
        if client.query_one(&cast, &[value]).await.is_err() {
            return Ok(Some(column.name.clone()));
        }
    }
    Ok(None)
}

/// Executes `steps` in `tx`.
async fn execute(
    tx: &tokio_postgres::Transaction<'_>,
    targets: &[Target],
    steps: &[Step],
) -> Result<(), tokio_postgres::Error> {
    for step in steps {
        match step {
            Step::Upsert { target, columns, rows } => {
                let sql = targets[*target].upsert_sql(columns);
                let arrays: Vec<Vec<Option<String>>> = (0..columns.len())
                    .map(|c| rows.iter().map(|r| r[c].clone()).collect())
                    .collect();
                let params: Vec<&(dyn ToSql + Sync)> =
                    arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
                tx.execute(&sql, &params).await?;
            }
            Step::Delete { target, keys } => {
                let width = targets[*target].key.len();
                let arrays: Vec<Vec<Option<String>>> =
                    (0..width).map(|c| keys.iter().map(|k| k[c].clone()).collect()).collect();
                let params: Vec<&(dyn ToSql + Sync)> =
                    arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
                tx.execute(&targets[*target].delete_sql(), &params).await?;
            }
            Step::Truncate { target } => {
                tx.batch_execute(&targets[*target].truncate_sql()).await?;
            }
            Step::Append { target, rows } => {
                let topics: Vec<&str> = rows.iter().map(|r| r.topic.as_str()).collect();
                let partitions: Vec<i32> = rows.iter().map(|r| r.partition).collect();
                let offsets: Vec<i64> = rows.iter().map(|r| r.offset).collect();
                let keys: Vec<Option<&str>> = rows.iter().map(|r| r.key.as_deref()).collect();
                let values: Vec<Option<&str>> = rows.iter().map(|r| r.value.as_deref()).collect();
                tx.execute(
                    &targets[*target].append_sql(),
                    &[&topics, &partitions, &offsets, &keys, &values],
                )
                .await?;
            }
        }
    }
    Ok(())
}
