//! The console's memory: the last 15 minutes of each route that has traffic, sampled every
//! 5 seconds from the request metrics' running totals (so requests take no lock for it): its
//! share and fallbacks, per backend the rate, failed share, p50 and p99, and the shadow
//! mismatch rate. Served as JSON by `GET /history`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde::Serialize;
use serde_json::{json, Value};

use crate::ramp::now_ms;
use crate::ramp::window::SideCounts;
use crate::state::{ActiveTable, Shared};

/// Time between two samples.
pub const INTERVAL: Duration = Duration::from_secs(5);
/// Samples kept per route: 15 minutes.
pub const KEEP: usize = 180;
/// Routes followed at most; a table with more follows the first that have traffic.
pub const MAX_ROUTES: usize = 200;

/// A route's running totals at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    pub to: SideCounts,
    pub from: SideCounts,
    /// Shadow comparisons made, and how many mismatched.
    pub compared: u64,
    pub mismatched: u64,
    /// Requests sent to `from` because `to` was down or refused.
    pub fallbacks: u64,
}

/// One backend over one interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BackendPoint {
    pub requests_per_second: f64,
    /// `None` without answers.
    pub failed_percent: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// One route over one interval, ending at `at_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Point {
    pub at_ms: u64,
    pub percent: f64,
    pub to: BackendPoint,
    pub from: BackendPoint,
    /// `None` without comparisons.
    pub mismatch_percent: Option<f64>,
    pub fallbacks_per_second: f64,
}

/// One route's samples.
#[derive(Debug, Default)]
pub struct RouteHistory {
    last: Option<(u64, Totals)>,
    points: VecDeque<Point>,
}

impl RouteHistory {
    /// Adds the interval since the previous sample, from running totals taken at `at_ms`.
    pub fn sample(&mut self, at_ms: u64, percent: f64, totals: Totals) {
        if let Some((then, last)) = self.last {
            let seconds = at_ms.saturating_sub(then) as f64 / 1000.0;
            if seconds > 0.0 {
                let backend = |now: &SideCounts, before: &SideCounts| {
                    let interval = now.since(before);
                    let side = interval.side();
                    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
                    BackendPoint {
                        requests_per_second: side.answers as f64 / seconds,
                        failed_percent: (side.answers > 0)
                            .then(|| 100.0 * side.failures as f64 / side.answers as f64),
                        p50_ms: interval.quantile(50).map(ms),
                        p99_ms: side.p99.map(ms),
                    }
                };
                let compared = totals.compared.saturating_sub(last.compared);
                let mismatched = totals.mismatched.saturating_sub(last.mismatched);
                if self.points.len() == KEEP {
                    self.points.pop_front();
                }
                self.points.push_back(Point {
                    at_ms,
                    percent,
                    to: backend(&totals.to, &last.to),
                    from: backend(&totals.from, &last.from),
                    mismatch_percent: (compared > 0)
                        .then(|| 100.0 * mismatched as f64 / compared as f64),
                    fallbacks_per_second: totals.fallbacks.saturating_sub(last.fallbacks) as f64
                        / seconds,
                });
            }
        }
        self.last = Some((at_ms, totals));
    }

    pub fn points(&self) -> impl Iterator<Item = &Point> {
        self.points.iter()
    }
}

/// Every followed route's history.
#[derive(Default)]
pub struct History {
    routes: Mutex<BTreeMap<String, RouteHistory>>,
}

impl History {
    /// Samples every route of `active` that has traffic.
    pub fn sample(&self, active: &ActiveTable, at_ms: u64) {
        let table = &active.table;
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        // Routes gone from the table are forgotten.
        routes.retain(|name, _| table.routes.iter().any(|r| &r.name == name));
        for (index, route) in table.routes.iter().enumerate() {
            let (to, from) = (
                active.series.existing(index, route.to),
                active.series.existing(index, route.from),
            );
            let quiet = to.is_none() && from.is_none() && active.fallbacks_total(index) == 0;
            if quiet && !routes.contains_key(&route.name) {
                continue;
            }
            if !routes.contains_key(&route.name) && routes.len() >= MAX_ROUTES {
                continue;
            }
            let (compared, mismatched) = active.shadows[index]
                .as_ref()
                .map(|s| s.outcomes.compared_totals())
                .unwrap_or_default();
            let totals = Totals {
                to: to.map(|s| s.totals()).unwrap_or_default(),
                from: from.map(|s| s.totals()).unwrap_or_default(),
                compared,
                mismatched,
                fallbacks: active.fallbacks_total(index),
            };
            let percent = active.ramps[index]
                .as_ref()
                .map_or(route.percent(), |r| f64::from(r.threshold()) / 100.0);
            routes.entry(route.name.clone()).or_default().sample(at_ms, percent, totals);
        }
    }

    /// The samples of every followed route (or of `route`) taken after `since_ms`, oldest
    /// first.
    pub fn json(&self, route: Option<&str>, since_ms: u64) -> Value {
        let routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        let series: serde_json::Map<String, Value> = routes
            .iter()
            .filter(|(name, _)| route.is_none_or(|wanted| wanted == name.as_str()))
            .map(|(name, history)| {
                let points: Vec<&Point> = history.points().filter(|p| p.at_ms > since_ms).collect();
                (name.clone(), json!(points))
            })
            .collect();
        json!({"interval_seconds": INTERVAL.as_secs(), "routes": series})
    }
}

/// Samples the history every [`INTERVAL`].
pub struct HistorySampler {
    pub shared: Arc<Shared>,
}

#[async_trait]
impl BackgroundService for HistorySampler {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut interval = tokio::time::interval(INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => {
                    let active = self.shared.active.load_full();
                    self.shared.history.sample(&active, now_ms());
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(answers: u64, failures: u64, cumulative: &[u64]) -> SideCounts {
        SideCounts::from_totals(answers, failures, cumulative)
    }

    #[test]
    fn a_sample_is_the_interval_since_the_previous_one() {
        let mut history = RouteHistory::default();
        history.sample(1_000, 10.0, Totals::default());
        assert_eq!(history.points().count(), 0, "the first sample only sets the start");
        let totals = Totals {
            to: side(10, 1, &[0, 0, 10]),
            from: side(90, 0, &[90]),
            compared: 20,
            mismatched: 5,
            fallbacks: 3,
        };
        history.sample(6_000, 10.0, totals);
        let point = *history.points().next().expect("a point");
        assert_eq!(point.at_ms, 6_000);
        assert_eq!(point.to.requests_per_second, 2.0);
        assert_eq!(point.to.failed_percent, Some(10.0));
        assert_eq!(point.to.p99_ms, Some(2.0));
        assert_eq!(point.from.p50_ms, Some(0.5));
        assert_eq!(point.fallbacks_per_second, 0.6);
        assert_eq!(point.from.requests_per_second, 18.0);
        assert_eq!(point.mismatch_percent, Some(25.0));
        // Nothing new: no rates, no percents.
        history.sample(11_000, 10.0, totals);
        let quiet = *history.points().nth(1).expect("a point");
        assert_eq!((quiet.to.requests_per_second, quiet.to.failed_percent), (0.0, None));
        assert_eq!(quiet.mismatch_percent, None);
    }

    #[test]
    fn only_the_last_fifteen_minutes_are_kept() {
        let mut history = RouteHistory::default();
        for i in 0..(KEEP as u64 + 10) {
            history.sample(i * 5_000, 1.0, Totals::default());
        }
        assert_eq!(history.points().count(), KEEP);
        assert_eq!(history.points().next().map(|p| p.at_ms), Some(10 * 5_000));
    }
}
