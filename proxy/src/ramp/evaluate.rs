//! The ramp decision: given a route's ramp, where it stands and the figures of both backends,
//! whether it advances, breaches a limit or waits, and why. Pure: time comes in as an
//! argument, so every rule is unit-tested directly.

use std::time::Duration;

use ficus_routes::ramp::{OnBreach, Ramp};
use serde::{Deserialize, Serialize};

/// Latencies below this are compared as this: at sub-millisecond levels a ratio is noise.
pub const P99_FLOOR: Duration = Duration::from_millis(5);

/// Where a ramp stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Walking the steps.
    Ramping,
    /// Stopped by an operator; the share stays.
    Paused,
    /// A limit was breached with `on_breach = "hold"`; the share stays.
    Held,
    /// A limit was breached: everyone back on `from`.
    RolledBack,
    /// The last step is reached.
    Done,
}

impl Status {
    pub const ALL: [Status; 5] =
        [Status::Ramping, Status::Paused, Status::Held, Status::RolledBack, Status::Done];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ramping => "ramping",
            Status::Paused => "paused",
            Status::Held => "held",
            Status::RolledBack => "rolled_back",
            Status::Done => "done",
        }
    }
}

/// A ramp's state: what is persisted and shared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// The share of clients on `to`, as a bucket threshold (`percent * 100`). Usually one of
    /// the steps; after the ramp was edited, possibly between two, until the next advance.
    pub threshold: u16,
    pub status: Status,
    /// When the current step began, in milliseconds since the Unix epoch.
    pub step_since_ms: u64,
    /// Why the last transition happened.
    pub reason: String,
}

impl State {
    /// `ramp` starting on its first step at `now_ms`.
    pub fn start(ramp: &Ramp, now_ms: u64, reason: &str) -> State {
        let threshold = ramp.steps.first().copied().unwrap_or(0);
        State { threshold, status: Status::Ramping, step_since_ms: now_ms, reason: reason.into() }
    }

    pub fn percent(&self) -> f64 {
        f64::from(self.threshold) / 100.0
    }
}

/// The ramp's next state when it advances at `now_ms`: the first step above the current
/// share, or done.
pub fn advance(ramp: &Ramp, state: &State, now_ms: u64, reason: String) -> State {
    match ramp.step_above(state.threshold) {
        Some(next) => State {
            threshold: ramp.steps[next],
            status: Status::Ramping,
            step_since_ms: now_ms,
            reason,
        },
        None => State { status: Status::Done, reason, ..state.clone() },
    }
}

/// One backend's answers over a span.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Side {
    pub answers: u64,
    /// 5xx and answers that never came (connection errors, cut-short responses).
    pub failures: u64,
    pub p99: Option<Duration>,
}

impl Side {
    fn failure_percent(&self) -> f64 {
        if self.answers == 0 {
            0.0
        } else {
            100.0 * self.failures as f64 / self.answers as f64
        }
    }
}

/// Both backends' answers and the shadow comparisons over a span.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Figures {
    pub to: Side,
    pub from: Side,
    pub compared: u64,
    pub mismatched: u64,
}

/// What the evaluation decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// A transition to this state.
    Move(State),
    /// Nothing to do; why the ramp is not moving (shown to operators).
    Wait(String),
}

/// Decides what a ramp in `state` does at `now_ms`, from the figures since its step began
/// (`step`) and over the recent sliding window (`window`).
pub fn evaluate(
    ramp: &Ramp,
    state: &State,
    step: &Figures,
    window: &Figures,
    now_ms: u64,
) -> Verdict {
    if state.status != Status::Ramping {
        return Verdict::Wait(format!("{}: {}", state.status.as_str(), state.reason));
    }
    // A breach is judged on the recent window, so that it is acted on within seconds.
    if window.to.answers >= ramp.window_min_requests() {
        if let Some(breach) = breach(ramp, window) {
            let reason = format!("breach over the last window: {breach}");
            return Verdict::Move(match ramp.on_breach {
                OnBreach::Rollback => State {
                    threshold: 0,
                    status: Status::RolledBack,
                    step_since_ms: now_ms,
                    reason,
                },
                OnBreach::Hold => State { status: Status::Held, reason, ..state.clone() },
            });
        }
    }
    let on_step = Duration::from_millis(now_ms.saturating_sub(state.step_since_ms));
    if on_step < ramp.hold {
        return Verdict::Wait(format!(
            "holding the step: {}s of {}s",
            on_step.as_secs(),
            ramp.hold.as_secs()
        ));
    }
    if step.to.answers < ramp.min_requests {
        return Verdict::Wait(format!(
            "too little traffic: {} of {} answers from `to` on this step",
            step.to.answers, ramp.min_requests
        ));
    }
    if let Some(breach) = breach(ramp, step) {
        return Verdict::Wait(format!("limit not kept over the step: {breach}"));
    }
    let reason = format!(
        "{}% held for {}s with {} answers from `to` ({:.2}% failed, `from` {:.2}%)",
        state.percent(),
        on_step.as_secs(),
        step.to.answers,
        step.to.failure_percent(),
        step.from.failure_percent()
    );
    Verdict::Move(advance(ramp, state, now_ms, reason))
}

/// The first limit `figures` breach, described with its values.
pub fn breach(ramp: &Ramp, figures: &Figures) -> Option<String> {
    if let Some(limit) = ramp.max_error_rate {
        let (to, from) = (figures.to.failure_percent(), figures.from.failure_percent());
        if to - from > limit {
            return Some(format!(
                "`to` failed {to:.2}% of {} answers, `from` {from:.2}%: more than {limit} points above",
                figures.to.answers
            ));
        }
    }
    if let (Some(limit), Some(to), Some(from)) =
        (ramp.max_p99_ratio, figures.to.p99, figures.from.p99)
    {
        let ratio = to.max(P99_FLOOR).as_secs_f64() / from.max(P99_FLOOR).as_secs_f64();
        if ratio > limit {
            return Some(format!(
                "p99 of `to` {:.1} ms is {ratio:.2}x `from`'s {:.1} ms, above {limit}x",
                to.as_secs_f64() * 1000.0,
                from.as_secs_f64() * 1000.0
            ));
        }
    }
    if let Some(limit) = ramp.max_mismatch_rate {
        if figures.compared > 0 {
            let rate = 100.0 * figures.mismatched as f64 / figures.compared as f64;
            if rate > limit {
                return Some(format!(
                    "{rate:.2}% of {} shadow comparisons mismatched, above {limit}%",
                    figures.compared
                ));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(on_breach: OnBreach) -> Ramp {
        Ramp {
            steps: vec![100, 500, 10_000],
            hold: Duration::from_secs(10),
            min_requests: 100,
            max_error_rate: Some(1.0),
            max_p99_ratio: Some(1.5),
            max_mismatch_rate: Some(0.5),
            on_breach,
        }
    }

    fn side(answers: u64, failures: u64, p99_ms: u64) -> Side {
        Side { answers, failures, p99: Some(Duration::from_millis(p99_ms)) }
    }

    fn healthy(answers: u64) -> Figures {
        Figures {
            to: side(answers, 0, 20),
            from: side(answers * 9, 0, 20),
            compared: 0,
            mismatched: 0,
        }
    }

    #[test]
    fn a_step_advances_after_hold_and_enough_answers() {
        let ramp = ramp(OnBreach::Rollback);
        let state = State::start(&ramp, 0, "started");
        assert_eq!(state.threshold, 100);
        assert_eq!(
            evaluate(&ramp, &state, &healthy(500), &healthy(50), 9_000),
            Verdict::Wait("holding the step: 9s of 10s".into())
        );
        let Verdict::Move(next) = evaluate(&ramp, &state, &healthy(500), &healthy(50), 10_000)
        else {
            panic!("no advance")
        };
        assert_eq!(
            (next.threshold, next.status, next.step_since_ms),
            (500, Status::Ramping, 10_000)
        );
        assert!(next.reason.contains("1% held for 10s with 500 answers"), "{}", next.reason);
    }

    #[test]
    fn too_little_traffic_waits_and_says_so() {
        let ramp = ramp(OnBreach::Rollback);
        let verdict =
            evaluate(&ramp, &State::start(&ramp, 0, ""), &healthy(3), &healthy(3), 60_000);
        assert_eq!(
            verdict,
            Verdict::Wait("too little traffic: 3 of 100 answers from `to` on this step".into())
        );
    }

    #[test]
    fn failures_above_from_roll_back_once_the_window_has_enough_answers() {
        let ramp = ramp(OnBreach::Rollback);
        let state = State::start(&ramp, 0, "");
        let mut window = healthy(10);
        window.to.failures = 1; // 10% against 0%
        let Verdict::Move(next) = evaluate(&ramp, &state, &healthy(10), &window, 1_000) else {
            panic!("no rollback")
        };
        assert_eq!((next.threshold, next.status), (0, Status::RolledBack));
        assert!(next.reason.contains("`to` failed 10.00% of 10 answers"), "{}", next.reason);
        // One bad answer among too few is not a rollback.
        let mut window = healthy(9);
        window.to.failures = 1;
        assert!(matches!(evaluate(&ramp, &state, &healthy(9), &window, 1_000), Verdict::Wait(_)));
    }

    #[test]
    fn slow_answers_and_mismatches_breach_and_hold_keeps_the_step() {
        let ramp = ramp(OnBreach::Hold);
        let state = State { threshold: 500, ..State::start(&ramp, 0, "") };
        let mut slow = healthy(50);
        slow.to.p99 = Some(Duration::from_millis(61));
        let Verdict::Move(next) = evaluate(&ramp, &state, &healthy(50), &slow, 1_000) else {
            panic!("no breach")
        };
        assert_eq!((next.threshold, next.status), (500, Status::Held));
        assert!(next.reason.contains("3.05x"), "{}", next.reason);
        let mut mismatching = healthy(50);
        (mismatching.compared, mismatching.mismatched) = (200, 2);
        assert!(matches!(
            evaluate(&ramp, &state, &healthy(50), &mismatching, 1_000),
            Verdict::Move(_)
        ));
    }

    #[test]
    fn sub_millisecond_latencies_are_not_compared_as_ratios() {
        let ramp = ramp(OnBreach::Rollback);
        let mut window = healthy(50);
        (window.to.p99, window.from.p99) =
            (Some(Duration::from_micros(900)), Some(Duration::from_micros(300)));
        let state = State::start(&ramp, 0, "");
        assert!(matches!(evaluate(&ramp, &state, &healthy(50), &window, 1_000), Verdict::Wait(_)));
    }

    #[test]
    fn the_last_step_is_done_and_stopped_ramps_wait() {
        let ramp = ramp(OnBreach::Rollback);
        let last = State { threshold: 10_000, ..State::start(&ramp, 0, "") };
        let Verdict::Move(done) = evaluate(&ramp, &last, &healthy(500), &healthy(50), 20_000)
        else {
            panic!("not done")
        };
        assert_eq!((done.threshold, done.status), (10_000, Status::Done));
        // An edited ramp goes on from the first step above the share it had.
        let between = State { threshold: 300, ..last };
        assert_eq!(advance(&ramp, &between, 1, String::new()).threshold, 500);
        let paused = State { status: Status::Paused, reason: "operator".into(), ..last };
        assert_eq!(
            evaluate(&ramp, &paused, &healthy(500), &healthy(50), 20_000),
            Verdict::Wait("paused: operator".into())
        );
    }
}
