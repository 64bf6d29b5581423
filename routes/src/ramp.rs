//! A route's `[routes.ramp]`, compiled: the steps an automatic ramp walks, how long it holds
//! each, and the limits `to` must keep against `from` to advance.

use std::time::Duration;

/// A validated ramp.
#[derive(Debug, Clone, PartialEq)]
pub struct Ramp {
    /// Bucket thresholds (`percent * 100`), strictly increasing, all above 0.
    pub steps: Vec<u16>,
    pub hold: Duration,
    pub min_requests: u64,
    /// Percentage points of failed answers `to` may have above `from`.
    pub max_error_rate: Option<f64>,
    /// `to`'s p99 at most this times `from`'s.
    pub max_p99_ratio: Option<f64>,
    /// Percent of shadow comparisons that may mismatch.
    pub max_mismatch_rate: Option<f64>,
    pub on_breach: OnBreach,
}

/// What a breached limit does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnBreach {
    /// Everyone back on `from` (0%) until an operator resumes the ramp.
    Rollback,
    /// Stay on the step and stop advancing until an operator resumes the ramp.
    Hold,
}

impl OnBreach {
    pub fn parse(text: &str) -> Result<OnBreach, String> {
        match text {
            "rollback" => Ok(OnBreach::Rollback),
            "hold" => Ok(OnBreach::Hold),
            other => Err(format!("\"{other}\" is neither \"rollback\" nor \"hold\"")),
        }
    }
}

impl Ramp {
    /// The answers from `to` a breach is judged on: a tenth of a step's, at least one.
    pub fn window_min_requests(&self) -> u64 {
        (self.min_requests / 10).max(1)
    }

    /// The first step whose share is above `threshold` (where a ramp edited mid-way goes on).
    pub fn step_above(&self, threshold: u16) -> Option<usize> {
        self.steps.iter().position(|&step| step > threshold)
    }
}
