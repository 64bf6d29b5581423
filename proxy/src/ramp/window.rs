//! A ramped route's answers counted per second and per side (`to`, `from`), with latency
//! histograms: the figures of the recent sliding window and of the current step. Pure data;
//! time comes in as seconds.

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::evaluate::{Figures, Side};

/// The sliding window a breach is judged on.
pub const WINDOW: Duration = Duration::from_secs(30);
/// Latency buckets: upper bounds of 0.5 ms doubling, the last one open. The same bounds as
/// `ficus_request_duration_seconds`'s, so that its counts can be taken as they are.
pub const BUCKETS: usize = 24;

/// One backend's answers: counts and a latency histogram (per bucket, not cumulative).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SideCounts {
    answers: u64,
    failures: u64,
    latency: [u64; BUCKETS],
}

impl SideCounts {
    /// From running totals: answers, failures, and the cumulative counts of a histogram
    /// whose bucket `i` ends at 0.5 ms * 2^i.
    pub fn from_totals(answers: u64, failures: u64, cumulative: &[u64]) -> SideCounts {
        let mut latency = [0; BUCKETS];
        let mut below = 0;
        for (bucket, &count) in cumulative.iter().take(BUCKETS).enumerate() {
            latency[bucket] = count.saturating_sub(below);
            below = count;
        }
        // Answers slower than the last bound count in the next bucket.
        if let Some(last) = latency.get_mut(cumulative.len().min(BUCKETS - 1)) {
            *last += answers.saturating_sub(below);
        }
        SideCounts { answers, failures, latency }
    }

    /// What was added since `earlier`, running totals of the same series.
    pub fn since(&self, earlier: &SideCounts) -> SideCounts {
        let mut latency = [0; BUCKETS];
        for (i, slot) in latency.iter_mut().enumerate() {
            *slot = self.latency[i].saturating_sub(earlier.latency[i]);
        }
        SideCounts {
            answers: self.answers.saturating_sub(earlier.answers),
            failures: self.failures.saturating_sub(earlier.failures),
            latency,
        }
    }

    fn add(&mut self, other: &SideCounts) {
        self.answers += other.answers;
        self.failures += other.failures;
        for (a, b) in self.latency.iter_mut().zip(&other.latency) {
            *a += b;
        }
    }

    #[cfg(test)]
    fn record(&mut self, failed: bool, latency: Duration) {
        self.answers += 1;
        self.failures += u64::from(failed);
        self.latency[bucket_of(latency)] += 1;
    }

    /// The counts as figures: answers, failures, p99.
    pub fn side(&self) -> Side {
        Side { answers: self.answers, failures: self.failures, p99: self.quantile(99) }
    }

    /// The upper bound of the bucket holding the `percent`th percentile of the latencies.
    pub fn quantile(&self, percent: u64) -> Option<Duration> {
        quantile(&self.latency, percent)
    }
}

/// Counts over a span of time: what replicas publish to each other, and add up.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Span {
    to: SideCounts,
    from: SideCounts,
    compared: u64,
    mismatched: u64,
}

impl Span {
    pub fn add(&mut self, other: &Span) {
        self.to.add(&other.to);
        self.from.add(&other.from);
        self.compared += other.compared;
        self.mismatched += other.mismatched;
    }

    pub fn figures(&self) -> Figures {
        let (compared, mismatched) = (self.compared, self.mismatched);
        Figures { to: self.to.side(), from: self.from.side(), compared, mismatched }
    }
}

/// The counts of one route.
#[derive(Debug, Default)]
pub struct Counts {
    /// (second, counts of that second), oldest first, none older than the window.
    seconds: VecDeque<(u64, Span)>,
    step: Span,
}

impl Counts {
    /// One answer of `to` (or `from`) at second `now`.
    #[cfg(test)]
    pub fn record(&mut self, now: u64, to: bool, failed: bool, latency: Duration) {
        let mut one = SideCounts::default();
        one.record(failed, latency);
        self.add(now, to, &one);
    }

    /// Answers of `to` (or `from`) that came in by second `now`.
    pub fn add(&mut self, now: u64, to: bool, counts: &SideCounts) {
        let span = self.second(now);
        if to { &mut span.to } else { &mut span.from }.add(counts);
        let step = if to { &mut self.step.to } else { &mut self.step.from };
        step.add(counts);
    }

    /// Shadow comparisons finished at second `now`.
    pub fn record_comparisons(&mut self, now: u64, compared: u64, mismatched: u64) {
        let span = self.second(now);
        span.compared += compared;
        span.mismatched += mismatched;
        self.step.compared += compared;
        self.step.mismatched += mismatched;
    }

    /// The figures of the window ending at second `now`.
    pub fn window(&mut self, now: u64) -> Figures {
        self.window_span(now).figures()
    }

    /// The counts of the window ending at second `now`.
    pub fn window_span(&mut self, now: u64) -> Span {
        self.expire(now);
        let mut sum = Span::default();
        for (_, span) in &self.seconds {
            sum.add(span);
        }
        sum
    }

    /// The figures since the step began.
    pub fn step(&self) -> Figures {
        self.step.figures()
    }

    /// The counts since the step began.
    pub fn step_span(&self) -> Span {
        self.step
    }

    /// A new step begins: its figures start from zero; the window goes on.
    pub fn new_step(&mut self) {
        self.step = Span::default();
    }

    fn second(&mut self, now: u64) -> &mut Span {
        self.expire(now);
        if self.seconds.back().is_none_or(|(at, _)| *at < now) {
            self.seconds.push_back((now, Span::default()));
        }
        // Never empty here; a clock that went back counts into the newest second.
        let last = self.seconds.len() - 1;
        &mut self.seconds[last].1
    }

    fn expire(&mut self, now: u64) {
        let oldest = now.saturating_sub(WINDOW.as_secs() - 1);
        while self.seconds.front().is_some_and(|(at, _)| *at < oldest) {
            self.seconds.pop_front();
        }
    }
}

#[cfg(test)]
fn bucket_of(latency: Duration) -> usize {
    let halves_ms = latency.as_micros() / 500;
    let bucket = (u128::BITS - halves_ms.leading_zeros()) as usize;
    bucket.min(BUCKETS - 1)
}

fn upper_bound(bucket: usize) -> Duration {
    Duration::from_micros(500u64 << bucket)
}

/// The upper bound of the bucket holding the `percent`th percentile.
fn quantile(latency: &[u64; BUCKETS], percent: u64) -> Option<Duration> {
    let total: u64 = latency.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = total - total * (100 - percent.min(100)) / 100;
    let mut seen = 0;
    for (bucket, count) in latency.iter().enumerate() {
        seen += count;
        if seen >= rank {
            return Some(upper_bound(bucket));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_window_forgets_what_is_older_than_it() {
        let mut counts = Counts::default();
        counts.record(100, true, true, MS);
        counts.record(100, false, false, MS);
        counts.record(129, true, false, MS);
        let window = counts.window(129);
        assert_eq!((window.to.answers, window.to.failures, window.from.answers), (2, 1, 1));
        let window = counts.window(130);
        assert_eq!((window.to.answers, window.to.failures, window.from.answers), (1, 0, 0));
        // The step keeps everything since it began.
        assert_eq!(counts.step().to.answers, 2);
        counts.new_step();
        assert_eq!(counts.step().to.answers, 0);
    }

    #[test]
    fn p99_is_the_bound_of_the_bucket_holding_it() {
        let mut counts = Counts::default();
        for _ in 0..99 {
            counts.record(1, true, false, 3 * MS);
        }
        counts.record(1, true, false, 900 * MS);
        assert_eq!(counts.window(1).to.p99, Some(4 * MS));
        counts.record(1, true, false, 900 * MS);
        assert_eq!(counts.window(1).to.p99, Some(1024 * MS));
        assert_eq!(counts.window(1).from.p99, None);
    }

    #[test]
    fn running_totals_become_counts_per_bucket() {
        // 3 answers at most 0.5 ms, 2 more at most 1 ms, 1 beyond the last bound.
        let earlier = SideCounts::from_totals(5, 1, &[3, 5, 5]);
        let now = SideCounts::from_totals(6, 1, &[3, 5, 5]);
        let mut counts = Counts::default();
        counts.add(1, true, &now.since(&earlier));
        let window = counts.window(1);
        assert_eq!((window.to.answers, window.to.failures), (1, 0));
        assert_eq!(window.to.p99, Some(upper_bound(3)), "the slow one is past the last bound");
        let all = SideCounts::from_totals(6, 1, &[3, 5, 5]);
        counts.add(1, false, &all);
        assert_eq!(counts.window(1).from.p99, Some(upper_bound(3)));
    }

    #[test]
    fn comparisons_count_in_window_and_step() {
        let mut counts = Counts::default();
        counts.record_comparisons(5, 10, 1);
        let (window, step) = (counts.window(5), counts.step());
        assert_eq!((window.compared, window.mismatched, step.compared), (10, 1, 10));
    }
}
