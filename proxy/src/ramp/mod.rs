//! Automatic ramps: a ramped route's share grows step by step while `to` answers as well as
//! `from`, and goes back to 0% on a breach. This module owns the ramp states (one per ramped
//! route, kept across reloads and restarts), counts each ramped route's answers, ticks the
//! decisions of [`evaluate`] once a second, and applies operators' commands.

pub mod evaluate;
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
use self::store::{FileStore, StoreError};
use self::window::Counts;
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
    counts: Mutex<Counts>,
    /// Why the ramp is not moving, from the last tick.
    waiting: Mutex<String>,
    /// Shadow comparisons (compared, mismatched) counted so far.
    comparisons_seen: Mutex<(u64, u64)>,
}

impl RouteRamp {
    fn new(route: &str, ramp: Ramp, state: State) -> RouteRamp {
        RouteRamp {
            route: route.to_string(),
            threshold: AtomicU16::new(state.threshold),
            ramp: Mutex::new(ramp),
            state: Mutex::new(state),
            counts: Mutex::new(Counts::default()),
            waiting: Mutex::new(String::new()),
            comparisons_seen: Mutex::new((0, 0)),
        }
    }

    /// The share of clients on `to` now, as a bucket threshold.
    pub fn threshold(&self) -> u16 {
        self.threshold.load(Ordering::Relaxed)
    }

    /// One answer of the route: from `to` or `from`, failed (5xx or none) or not.
    pub fn record(&self, to: bool, failed: bool, latency: Duration) {
        lock(&self.counts).record(now_ms() / 1000, to, failed, latency);
    }

    pub fn state(&self) -> State {
        lock(&self.state).clone()
    }

    /// Moves to `next`; the caller persists it.
    fn set(&self, next: State, metrics: &Metrics, kind: &str) {
        let mut state = lock(&self.state);
        if next.threshold != state.threshold || next.step_since_ms != state.step_since_ms {
            lock(&self.counts).new_step();
        }
        let (from, to) = (state.percent().to_string(), next.percent().to_string());
        tracing::warn!(
            route = self.route,
            from_percent = state.percent(),
            to_percent = next.percent(),
            from_status = state.status.as_str(),
            to_status = next.status.as_str(),
            reason = next.reason,
            "ramp transition"
        );
        metrics.ramp_transitions.with_label_values(&[&self.route, &from, &to, kind]).inc();
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

    /// Evaluates the ramp at `now`; true when it moved.
    fn tick(&self, now: u64, comparisons: Option<(u64, u64)>, metrics: &Metrics) -> bool {
        let (step, window) = {
            let mut counts = lock(&self.counts);
            if let Some((compared, mismatched)) = comparisons {
                let mut seen = lock(&self.comparisons_seen);
                let new = (compared.saturating_sub(seen.0), mismatched.saturating_sub(seen.1));
                *seen = (compared, mismatched);
                counts.record_comparisons(now / 1000, new.0, new.1);
            }
            (counts.step(), counts.window(now / 1000))
        };
        let ramp = lock(&self.ramp).clone();
        let state = self.state();
        match evaluate::evaluate(&ramp, &state, &step, &window, now) {
            Verdict::Move(next) => {
                let kind = match next.status {
                    Status::RolledBack | Status::Held => "breach",
                    _ => "advance",
                };
                self.set(next, metrics, kind);
                lock(&self.waiting).clear();
                true
            }
            Verdict::Wait(why) => {
                *lock(&self.waiting) = why;
                false
            }
        }
    }

    /// Applies an operator's command at `now`.
    fn command(&self, command: Command, now: u64, metrics: &Metrics) -> Result<State, String> {
        let ramp = lock(&self.ramp).clone();
        let state = self.state();
        let next = match command {
            Command::Pause if state.status == Status::Ramping => {
                State { status: Status::Paused, reason: "paused by an operator".into(), ..state }
            }
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
                    ..state
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
                evaluate::advance(&ramp, &state, now, "advanced by an operator".into())
            }
        };
        self.set(next.clone(), metrics, command.as_str());
        Ok(next)
    }

    /// The ramp as `GET /routes` shows it.
    pub fn json(&self) -> Value {
        let ramp = lock(&self.ramp).clone();
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

/// The ramps of every ramped route, and where their states are kept.
pub struct Ramps {
    routes: Mutex<BTreeMap<String, Arc<RouteRamp>>>,
    store: FileStore,
    /// States read from the store at start, for routes not attached yet.
    saved: Mutex<store::States>,
}

impl Ramps {
    /// Reads the states saved in `store`. A garbled file is an error: starting every ramp
    /// over would undo rollbacks.
    pub fn open(store: FileStore) -> Result<Ramps, StoreError> {
        let saved = store.load()?;
        Ok(Ramps { routes: Mutex::new(BTreeMap::new()), store, saved: Mutex::new(saved) })
    }

    /// The ramps of `table`'s routes (indexed like its routes): kept for routes ramped
    /// before, continued from the saved state after a restart, else started. A route whose
    /// ramp is gone hands its share back to the file.
    pub fn attach(&self, table: &RouteTable, metrics: &Metrics) -> Vec<Option<Arc<RouteRamp>>> {
        let now = now_ms();
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
                    Some(Arc::new(RouteRamp::new(&route.name, ramp.clone(), state)))
                });
                let ramp_state = existing.unwrap_or_else(|| {
                    let state = State::start(ramp, now, "started");
                    Arc::new(RouteRamp::new(&route.name, ramp.clone(), state))
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
        self.save();
        list
    }

    /// Evaluates every ramp once.
    pub fn tick(&self, active: &ActiveTable, metrics: &Metrics) {
        let now = now_ms();
        let mut moved = false;
        for (ramp, shadow) in active.ramps.iter().zip(&active.shadows) {
            let Some(ramp) = ramp else { continue };
            let comparisons = shadow.as_ref().map(|s| lock(&s.report).compared_totals());
            moved |= ramp.tick(now, comparisons, metrics);
        }
        if moved {
            self.save();
        }
    }

    /// Applies `command` to the ramp of `route`.
    pub fn command(
        &self,
        route: &str,
        command: Command,
        metrics: &Metrics,
    ) -> Result<State, CommandError> {
        let ramp = lock(&self.routes).get(route).cloned().ok_or(CommandError::NoRamp)?;
        let state = ramp.command(command, now_ms(), metrics).map_err(CommandError::Refused)?;
        self.save();
        Ok(state)
    }

    fn save(&self) {
        let states: store::States =
            lock(&self.routes).iter().map(|(name, ramp)| (name.clone(), ramp.state())).collect();
        if let Err(e) = self.store.save(&states) {
            tracing::error!(error = %e, "ramp state not saved; a restart would lose the latest transitions");
        }
    }
}

/// Why a command was not applied.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("no ramped route of that name")]
    NoRamp,
    #[error("{0}")]
    Refused(String),
}

/// Ticks every ramp once a second.
pub struct RampTicker {
    pub shared: Arc<Shared>,
}

#[async_trait]
impl BackgroundService for RampTicker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut interval = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = interval.tick() => {
                    let active = self.shared.active.load_full();
                    self.shared.ramps.tick(&active, &self.shared.metrics);
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}
