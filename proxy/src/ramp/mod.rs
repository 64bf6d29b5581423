//! Automatic ramps: a ramped route's share grows step by step while `to` answers as well as
//! `from`, and goes back to 0% on a breach. This module owns the ramp states (one per ramped
//! route, kept across reloads and restarts in a file or, for several replicas, in PostgreSQL
//! ([`shared`]), counts each ramped route's answers, ticks the decisions of [`evaluate`] once
//! a second, and applies operators' commands.

pub mod evaluate;
pub mod shared;
pub mod store;
pub mod window;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use ficus_routes::ramp::Ramp;
use ficus_routes::RouteTable;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde_json::{json, Value};

pub use self::evaluate::State;
use self::evaluate::{Status, Verdict};
use self::shared::{SharedError, SharedStore};
use self::store::{FileStore, StoreError};
use self::window::{Counts, SideCounts, Span};
use crate::metrics::Metrics;
use crate::state::{ActiveTable, Shared};

/// The clock of ramp decisions, in milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves consistent data: keep going.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One ramped route.
pub struct RouteRamp {
    pub route: String,
    ramp: Mutex<Ramp>,
    /// The share in force, read on every request.
    threshold: AtomicU16,
    state: Mutex<State>,
    /// No state was known when the route was attached (a shared store out of reach): the
    /// route stays at 0% until the store says where it is.
    provisional: std::sync::atomic::AtomicBool,
    /// Touched by the ticker and the admin API only, never by requests: answers are read
    /// from the request metrics' running totals.
    counts: Mutex<Counts>,
    /// The running totals (`to`, `from`) at the last tick.
    totals: Mutex<Option<(SideCounts, SideCounts)>>,
    /// Why the ramp is not moving, from the last tick.
    waiting: Mutex<String>,
    /// Shadow comparisons (compared, mismatched) counted so far.
    comparisons_seen: Mutex<(u64, u64)>,
}

impl RouteRamp {
    fn new(route: &str, ramp: Ramp, state: State, provisional: bool) -> RouteRamp {
        RouteRamp {
            route: route.to_string(),
            threshold: AtomicU16::new(state.threshold),
            ramp: Mutex::new(ramp),
            state: Mutex::new(state),
            provisional: std::sync::atomic::AtomicBool::new(provisional),
            counts: Mutex::new(Counts::default()),
            totals: Mutex::new(None),
            waiting: Mutex::new(String::new()),
            comparisons_seen: Mutex::new((0, 0)),
        }
    }

    /// The share of clients on `to` now, as a bucket threshold.
    pub fn threshold(&self) -> u16 {
        self.threshold.load(Ordering::Relaxed)
    }

    /// Takes in the answers that came since the last call, from running totals.
    fn sample(&self, now: u64, to: SideCounts, from: SideCounts) {
        let mut totals = lock(&self.totals);
        if let Some((last_to, last_from)) = totals.as_ref() {
            let mut counts = lock(&self.counts);
            counts.add(now / 1000, true, &to.since(last_to));
            counts.add(now / 1000, false, &from.since(last_from));
        }
        *totals = Some((to, from));
    }

    pub fn state(&self) -> State {
        lock(&self.state).clone()
    }

    fn ramp(&self) -> Ramp {
        lock(&self.ramp).clone()
    }

    /// Moves to `next`, decided here (logged and counted as a transition).
    fn apply(&self, next: State, metrics: &Metrics, kind: &str) {
        let previous = self.state();
        tracing::warn!(
            route = self.route,
            from_percent = previous.percent(),
            to_percent = next.percent(),
            from_status = previous.status.as_str(),
            to_status = next.status.as_str(),
            reason = next.reason,
            "ramp transition"
        );
        let (from, to) = (previous.percent().to_string(), next.percent().to_string());
        metrics.ramp_transitions.with_label_values(&[&self.route, &from, &to, kind]).inc();
        self.adopt(next, metrics);
    }

    /// Takes `next` as the state in force (decided here or by another replica).
    fn adopt(&self, next: State, metrics: &Metrics) {
        self.provisional.store(false, Ordering::Relaxed);
        let mut state = lock(&self.state);
        if *state == next {
            return;
        }
        if next.threshold != state.threshold || next.step_since_ms != state.step_since_ms {
            lock(&self.counts).new_step();
        }
        self.threshold.store(next.threshold, Ordering::Relaxed);
        *state = next;
        self.export(&state, metrics);
    }

    fn export(&self, state: &State, metrics: &Metrics) {
        metrics.route_percent.with_label_values(&[&self.route]).set(state.percent());
        for status in Status::ALL {
            let value = i64::from(status == state.status);
            metrics.ramp_state.with_label_values(&[&self.route, status.as_str()]).set(value);
        }
    }

    /// This replica's counts at `now`: since the step began, and over the window. Shadow
    /// comparisons made since the last call are added first.
    fn spans(&self, now: u64, comparisons: Option<(u64, u64)>) -> (Span, Span) {
        let mut counts = lock(&self.counts);
        if let Some((compared, mismatched)) = comparisons {
            let mut seen = lock(&self.comparisons_seen);
            let new = (compared.saturating_sub(seen.0), mismatched.saturating_sub(seen.1));
            *seen = (compared, mismatched);
            counts.record_comparisons(now / 1000, new.0, new.1);
        }
        (counts.step_span(), counts.window_span(now / 1000))
    }

    /// Evaluates the ramp on `step` and `window` counts; the move it decides, if any, with
    /// its kind. The reason it waits is kept for operators.
    fn decide(&self, now: u64, step: &Span, window: &Span) -> Option<(State, &'static str)> {
        let verdict = evaluate::evaluate(
            &self.ramp(),
            &self.state(),
            &step.figures(),
            &window.figures(),
            now,
        );
        match verdict {
            Verdict::Move(next) => {
                lock(&self.waiting).clear();
                let kind = match next.status {
                    Status::RolledBack | Status::Held => "breach",
                    _ => "advance",
                };
                Some((next, kind))
            }
            Verdict::Wait(why) => {
                *lock(&self.waiting) = why;
                None
            }
        }
    }

    /// The state an operator's `command` leads to from `state`.
    fn command_next(&self, state: &State, command: Command, now: u64) -> Result<State, String> {
        let ramp = self.ramp();
        Ok(match command {
            Command::Pause if state.status == Status::Ramping => State {
                status: Status::Paused,
                reason: "paused by an operator".into(),
                ..state.clone()
            },
            Command::Pause => {
                return Err(format!("cannot pause: the ramp is {}", state.status.as_str()))
            }
            Command::Resume => match state.status {
                Status::RolledBack => {
                    State::start(&ramp, now, "resumed by an operator after a rollback")
                }
                Status::Paused | Status::Held => State {
                    status: Status::Ramping,
                    reason: "resumed by an operator".into(),
                    ..state.clone()
                },
                status => return Err(format!("cannot resume: the ramp is {}", status.as_str())),
            },
            Command::Rollback => State {
                threshold: 0,
                status: Status::RolledBack,
                step_since_ms: now,
                reason: "rolled back by an operator".into(),
            },
            Command::Advance { force } => {
                if !force {
                    let step = lock(&self.counts).step();
                    if let Some(breach) = evaluate::breach(&ramp, &step) {
                        return Err(format!("a limit is not kept over the step ({breach}); add ?force=true to advance anyway"));
                    }
                }
                evaluate::advance(&ramp, state, now, "advanced by an operator".into())
            }
        })
    }

    /// The ramp as `GET /routes` shows it.
    pub fn json(&self) -> Value {
        let ramp = self.ramp();
        let state = self.state();
        let (step, window) = {
            let mut counts = lock(&self.counts);
            (counts.step(), counts.window(now_ms() / 1000))
        };
        let side = |s: &evaluate::Side| {
            json!({
                "answers": s.answers,
                "failures": s.failures,
                "p99_ms": s.p99.map(|d| d.as_secs_f64() * 1000.0),
            })
        };
        let figures = |f: &evaluate::Figures| json!({"to": side(&f.to), "from": side(&f.from), "compared": f.compared, "mismatched": f.mismatched});
        let steps: Vec<f64> = ramp.steps.iter().map(|&s| f64::from(s) / 100.0).collect();
        json!({
            "status": state.status.as_str(),
            "percent": state.percent(),
            "steps": steps,
            "on_step_seconds": now_ms().saturating_sub(state.step_since_ms) / 1000,
            "hold_seconds": ramp.hold.as_secs(),
            "min_requests": ramp.min_requests,
            "limits": {
                "max_error_rate": ramp.max_error_rate,
                "max_p99_ratio": ramp.max_p99_ratio,
                "max_mismatch_rate": ramp.max_mismatch_rate,
            },
            "reason": state.reason,
            "waiting": *lock(&self.waiting),
            "step": figures(&step),
            "window": figures(&window),
            "window_seconds": window::WINDOW.as_secs(),
        })
    }
}

/// An operator's command on a ramp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Pause,
    Resume,
    Rollback,
    /// Skip the rest of the hold; the limits still apply unless forced.
    Advance {
        force: bool,
    },
}

impl Command {
    pub fn parse(name: &str, force: bool) -> Option<Command> {
        match name {
            "pause" => Some(Command::Pause),
            "resume" => Some(Command::Resume),
            "rollback" => Some(Command::Rollback),
            "advance" => Some(Command::Advance { force }),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Command::Pause => "operator_pause",
            Command::Resume => "operator_resume",
            Command::Rollback => "operator_rollback",
            Command::Advance { .. } => "operator_advance",
        }
    }
}

/// A ramp to tick, with its route's shadow comparisons so far (compared, mismatched).
type Ticked = (Arc<RouteRamp>, Option<(u64, u64)>);

/// Takes the answers of every ramped route in since the last tick, from the request metrics.
fn sample_answers(active: &ActiveTable, metrics: &Metrics, now: u64) {
    let table = &active.table;
    for (index, (route, ramp)) in table.routes.iter().zip(&active.ramps).enumerate() {
        let Some(ramp) = ramp else { continue };
        let totals = |backend: usize| {
            let name = &table.backends[backend].name;
            active.series.get(metrics, Some(index), backend, &route.name, name).totals()
        };
        ramp.sample(now, totals(route.to), totals(route.from));
    }
}

/// Where ramp states live.
pub enum StateStore {
    /// One replica: a local file.
    File(FileStore),
    /// Several replicas: PostgreSQL.
    Shared(Box<SharedStore>),
}

/// Whether the store was reachable on the last tick.
#[derive(Debug, Clone, Default)]
struct StoreHealth {
    error: Option<String>,
    deciding: bool,
    /// Ticks that read and wrote the shared store: a replica whose count stands still is
    /// not following the others.
    syncs: u64,
}

/// The ramps of every ramped route, and where their states are kept.
pub struct Ramps {
    routes: Mutex<BTreeMap<String, Arc<RouteRamp>>>,
    store: StateStore,
    /// States known at start, for routes not attached yet.
    saved: Mutex<store::States>,
    health: Mutex<StoreHealth>,
}

impl Ramps {
    /// Opens the store and reads the states saved in it. A garbled state file is an error:
    /// starting every ramp over would undo rollbacks. A shared store out of reach is not:
    /// its routes stay at 0% until it answers.
    pub fn open(store: StateStore) -> Result<Ramps, StoreError> {
        let (saved, error) = match &store {
            StateStore::File(file) => (file.load()?, None),
            StateStore::Shared(shared) => match initial_states(shared) {
                Ok(states) => (states, None),
                Err(e) => {
                    tracing::error!(error = %e, "ramp state database unreachable at start: ramped routes stay at 0% until it answers");
                    (store::States::new(), Some(e.to_string()))
                }
            },
        };
        let health = StoreHealth { error, ..StoreHealth::default() };
        Ok(Ramps {
            routes: Mutex::new(BTreeMap::new()),
            store,
            saved: Mutex::new(saved),
            health: Mutex::new(health),
        })
    }

    /// The ramps of `table`'s routes (indexed like its routes): kept for routes ramped
    /// before, continued from the saved state after a restart, else started. A route whose
    /// ramp is gone hands its share back to the file.
    pub fn attach(&self, table: &RouteTable, metrics: &Metrics) -> Vec<Option<Arc<RouteRamp>>> {
        let now = now_ms();
        let unknown =
            matches!(self.store, StateStore::Shared(_)) && lock(&self.health).error.is_some();
        let mut routes = lock(&self.routes);
        let mut saved = lock(&self.saved);
        let mut attached = BTreeMap::new();
        let list = table
            .routes
            .iter()
            .map(|route| {
                let ramp = route.ramp.as_ref()?;
                let existing = routes.remove(&route.name).or_else(|| {
                    let state = saved.remove(&route.name)?;
                    Some(Arc::new(RouteRamp::new(&route.name, ramp.clone(), state, false)))
                });
                let ramp_state = existing.unwrap_or_else(|| {
                    let (state, provisional) = if unknown {
                        let reason = "the ramp state database is out of reach";
                        (
                            State {
                                threshold: 0,
                                status: Status::Paused,
                                step_since_ms: now,
                                reason: reason.into(),
                            },
                            true,
                        )
                    } else {
                        (State::start(ramp, now, "started"), false)
                    };
                    Arc::new(RouteRamp::new(&route.name, ramp.clone(), state, provisional))
                });
                // An edited ramp keeps its share; its next advance goes to the first step
                // above it.
                *lock(&ramp_state.ramp) = ramp.clone();
                ramp_state.export(&ramp_state.state(), metrics);
                attached.insert(route.name.clone(), ramp_state.clone());
                Some(ramp_state)
            })
            .collect();
        for gone in routes.keys() {
            tracing::info!(
                route = gone,
                "ramp removed from the route file; the file's percent applies"
            );
        }
        *routes = attached;
        drop(routes);
        drop(saved);
        self.save_file();
        list
    }

    /// Evaluates every ramp once (the deciding replica's job with a shared store).
    pub async fn tick(&self, active: &ActiveTable, metrics: &Metrics) {
        let now = now_ms();
        sample_answers(active, metrics, now);
        let ramps: Vec<Ticked> = active
            .ramps
            .iter()
            .zip(&active.shadows)
            .filter_map(|(ramp, shadow)| {
                let comparisons = shadow.as_ref().map(|s| s.outcomes.compared_totals());
                Some((ramp.clone()?, comparisons))
            })
            .collect();
        match &self.store {
            StateStore::File(_) => {
                let mut moved = false;
                for (ramp, comparisons) in ramps {
                    let (step, window) = ramp.spans(now, comparisons);
                    if let Some((next, kind)) = ramp.decide(now, &step, &window) {
                        ramp.apply(next, metrics, kind);
                        moved = true;
                    }
                }
                if moved {
                    self.save_file();
                }
            }
            StateStore::Shared(shared) => {
                let result = tick_shared(shared, &ramps, now, metrics).await;
                self.record_health(result, metrics);
            }
        }
    }

    fn record_health(&self, result: Result<bool, SharedError>, metrics: &Metrics) {
        let mut health = lock(&self.health);
        match result {
            Ok(deciding) => {
                if health.error.take().is_some() {
                    tracing::info!("ramp state database reachable again");
                }
                health.deciding = deciding;
                health.syncs += 1;
                metrics.ramp_store_up.set(1);
            }
            Err(e) => {
                if health.error.is_none() {
                    tracing::error!(error = %e, "ramp state database unreachable: every ramp keeps its step and none advances");
                }
                health.error = Some(e.to_string());
                health.deciding = false;
                metrics.ramp_store_up.set(0);
            }
        }
    }

    /// Applies `command` to the ramp of `route`.
    pub async fn command(
        &self,
        route: &str,
        command: Command,
        metrics: &Metrics,
    ) -> Result<State, CommandError> {
        let ramp = lock(&self.routes).get(route).cloned().ok_or(CommandError::NoRamp)?;
        let now = now_ms();
        match &self.store {
            StateStore::File(_) => {
                let next = ramp
                    .command_next(&ramp.state(), command, now)
                    .map_err(CommandError::Refused)?;
                ramp.apply(next.clone(), metrics, command.as_str());
                self.save_file();
                Ok(next)
            }
            StateStore::Shared(shared) => {
                let store_error = |e: SharedError| CommandError::Store(e.to_string());
                let states = shared.states().await.map_err(store_error)?;
                let current = states.get(route).cloned().unwrap_or_else(|| ramp.state());
                let next =
                    ramp.command_next(&current, command, now).map_err(CommandError::Refused)?;
                if !shared.replace(route, &current, &next).await.map_err(store_error)? {
                    let why = "the ramp changed meanwhile; look again and retry";
                    return Err(CommandError::Refused(why.into()));
                }
                ramp.apply(next.clone(), metrics, command.as_str());
                Ok(next)
            }
        }
    }

    /// Whether the store answered last (a state file always does).
    pub fn reachable(&self) -> bool {
        lock(&self.health).error.is_none()
    }

    /// The store as `GET /routes` shows it.
    pub fn store_json(&self) -> Value {
        let health = lock(&self.health).clone();
        match &self.store {
            StateStore::File(file) => {
                json!({"kind": "file", "path": file.path().display().to_string()})
            }
            StateStore::Shared(shared) => json!({
                "kind": "postgres",
                "replica": shared.replica,
                "reachable": health.error.is_none(),
                "error": health.error,
                "deciding": health.deciding,
                "syncs": health.syncs,
            }),
        }
    }

    fn save_file(&self) {
        let StateStore::File(file) = &self.store else { return };
        let states: store::States =
            lock(&self.routes).iter().map(|(name, ramp)| (name.clone(), ramp.state())).collect();
        // A table without ramps leaves no file behind (the route file's directory may be
        // read-only, as a Kubernetes ConfigMap is).
        if states.is_empty() && !file.path().exists() {
            return;
        }
        if let Err(e) = file.save(&states) {
            tracing::error!(error = %e, "ramp state not saved; a restart would lose the latest transitions");
        }
    }
}

/// The shared states, read before the proxy serves, so that a restarted replica starts where
/// the others are.
fn initial_states(shared: &SharedStore) -> Result<store::States, SharedError> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
    let runtime =
        runtime.map_err(|e| SharedError::Garbled { route: "-".into(), message: e.to_string() })?;
    let states = runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(5), shared.states()).await });
    // The connection lived on this runtime; the next use opens a new one.
    drop(runtime);
    match states {
        Ok(states) => states,
        Err(_) => {
            Err(SharedError::Garbled { route: "-".into(), message: "no answer within 5 s".into() })
        }
    }
}

/// One tick with a shared store: adopt the states, publish this replica's counts, and decide
/// when this replica holds the decider lock. Whether it decided.
async fn tick_shared(
    shared: &SharedStore,
    ramps: &[Ticked],
    now: u64,
    metrics: &Metrics,
) -> Result<bool, SharedError> {
    let states = shared.states().await?;
    for (ramp, comparisons) in ramps {
        match states.get(&ramp.route) {
            Some(state) => ramp.adopt(state.clone(), metrics),
            None => {
                let provisional = ramp.provisional.load(Ordering::Relaxed);
                let state = if provisional {
                    State::start(&ramp.ramp(), now, "started")
                } else {
                    ramp.state()
                };
                shared.insert(&ramp.route, &state).await?;
            }
        }
        let (step, window) = ramp.spans(now, *comparisons);
        shared.publish(&ramp.route, ramp.state().step_since_ms, &step, &window).await?;
    }
    let deciding = shared.lead().await?;
    for (ramp, _) in ramps {
        let state = ramp.state();
        let (step, window) = shared.counts(&ramp.route, state.step_since_ms).await?;
        // Every replica says why a ramp waits; only the decider moves it.
        let Some((next, kind)) = ramp.decide(now, &step, &window) else { continue };
        if deciding && shared.replace(&ramp.route, &state, &next).await? {
            ramp.apply(next, metrics, kind);
        }
    }
    Ok(deciding)
}

/// Why a command was not applied.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("no ramped route of that name")]
    NoRamp,
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Store(String),
}

/// Ticks every ramp once a second.
pub struct RampTicker {
    pub shared: Arc<Shared>,
}

#[async_trait]
impl BackgroundService for RampTicker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut interval = tokio::time::interval(Duration::from_secs(1));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => {
                    let active = self.shared.active.load_full();
                    self.shared.ramps.tick(&active, &self.shared.metrics).await;
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp() -> Ramp {
        Ramp {
            steps: vec![1000, 5000, 10_000],
            hold: Duration::from_secs(60),
            min_requests: 10,
            max_error_rate: Some(1.0),
            max_p99_ratio: None,
            max_mismatch_rate: None,
            on_breach: ficus_routes::ramp::OnBreach::Rollback,
        }
    }

    fn route_ramp() -> RouteRamp {
        RouteRamp::new("orders", ramp(), State::start(&ramp(), 0, "started"), false)
    }

    #[test]
    fn commands_follow_the_state_they_find() {
        let route = route_ramp();
        let paused = route.command_next(&route.state(), Command::Pause, 5).expect("pause");
        assert_eq!((paused.status, paused.threshold), (Status::Paused, 1000));
        assert!(route.command_next(&paused, Command::Pause, 5).is_err());
        let resumed = route.command_next(&paused, Command::Resume, 6).expect("resume");
        assert_eq!((resumed.status, resumed.threshold), (Status::Ramping, 1000));
        assert!(route.command_next(&resumed, Command::Resume, 6).is_err());
        let rolled = route.command_next(&resumed, Command::Rollback, 7).expect("rollback");
        assert_eq!((rolled.status, rolled.threshold), (Status::RolledBack, 0));
        // After a rollback, a resume starts over from the first step.
        let again = route.command_next(&rolled, Command::Resume, 8).expect("resume");
        assert_eq!(
            (again.status, again.threshold, again.step_since_ms),
            (Status::Ramping, 1000, 8)
        );
    }

    #[test]
    fn advance_skips_the_hold_but_not_the_limits_unless_forced() {
        let route = route_ramp();
        for _ in 0..10 {
            lock(&route.counts).record(0, true, true, Duration::from_millis(1));
            lock(&route.counts).record(0, false, false, Duration::from_millis(1));
        }
        let refused = route.command_next(&route.state(), Command::Advance { force: false }, 1);
        let refused = refused.expect_err("a breached limit refuses the advance");
        assert!(refused.contains("add ?force=true"), "{refused}");
        let forced = route.command_next(&route.state(), Command::Advance { force: true }, 1);
        assert_eq!(forced.expect("forced").threshold, 5000);
    }
}
