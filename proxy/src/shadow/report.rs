//! What one route's shadow comparisons found: counts by result, the fields that differ most,
//! learnt noise and the last mismatches. Pure bookkeeping, served by `GET /shadow`.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{json, Value};

use super::compare::Difference;

/// How one shadowed request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Match,
    Mismatch,
    /// The shadow request failed or timed out.
    Error,
    /// A body was above `max_body`, or the exchange cannot be replayed (an upgrade).
    Skipped,
    /// `max_in_flight` shadow requests were already running.
    Dropped,
}

impl Outcome {
    pub const ALL: [Outcome; 5] =
        [Outcome::Match, Outcome::Mismatch, Outcome::Error, Outcome::Skipped, Outcome::Dropped];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Match => "match",
            Outcome::Mismatch => "mismatch",
            Outcome::Error => "error",
            Outcome::Skipped => "skipped",
            Outcome::Dropped => "dropped",
        }
    }
}

/// How many shadowed requests ended each way, counted without a lock: requests add to them
/// (a shadow dropped or skipped), the report is only touched by comparisons.
#[derive(Debug, Default)]
pub struct OutcomeCounts([AtomicU64; 5]);

impl OutcomeCounts {
    pub fn add(&self, outcome: Outcome) {
        self.0[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// The counts, indexed by `Outcome as usize`.
    pub fn get(&self) -> [u64; 5] {
        self.0.each_ref().map(|count| count.load(Ordering::Relaxed))
    }

    /// Comparisons made so far, and how many mismatched.
    pub fn compared_totals(&self) -> (u64, u64) {
        let counts = self.get();
        let mismatched = counts[Outcome::Mismatch as usize];
        (counts[Outcome::Match as usize] + mismatched, mismatched)
    }
}

/// One mismatch as shown to the operator: no request headers, no query string.
#[derive(Debug, Clone)]
pub struct Mismatch {
    pub at: String,
    pub method: String,
    pub path: String,
    pub from_status: u16,
    pub to_status: u16,
    pub differences: Vec<Difference>,
}

/// Mismatches kept per route.
const LAST_MISMATCHES: usize = 100;
/// Distinct differing fields tracked per route; beyond, they count as `other`.
const MAX_FIELDS: usize = 100;
/// Fields with a series of their own in `ficus_shadow_differences_total`.
pub const MAX_METRIC_FIELDS: usize = 20;
/// Fields listed as "top" in the report.
const TOP_FIELDS: usize = 10;
pub const OTHER_FIELD: &str = "other";

#[derive(Debug, Clone)]
struct FieldCount {
    count: u64,
    from: String,
    to: String,
}

/// What one route's comparisons found, beyond the counts.
#[derive(Debug, Default)]
pub struct Report {
    fields: HashMap<String, FieldCount>,
    noise: BTreeSet<String>,
    last: VecDeque<Mismatch>,
    metric_fields: BTreeSet<String>,
}

impl Report {
    /// Learns the fields that differ between two answers of the legacy backend as noise.
    pub fn learn_noise(&mut self, differences: &[Difference]) {
        for difference in differences {
            self.noise.insert(difference.pattern.clone());
        }
    }

    /// `differences` without learnt noise.
    pub fn without_noise(&self, mut differences: Vec<Difference>) -> Vec<Difference> {
        differences.retain(|d| !self.noise.contains(&d.pattern));
        differences
    }

    /// Records a mismatch; returns the metric label of each differing field.
    pub fn mismatch(&mut self, mismatch: Mismatch) -> Vec<String> {
        let mut labels = Vec::new();
        for difference in &mismatch.differences {
            let pattern = &difference.pattern;
            if let Some(field) = self.fields.get_mut(pattern) {
                field.count += 1;
            } else if self.fields.len() < MAX_FIELDS {
                let (from, to) = (difference.from.clone(), difference.to.clone());
                self.fields.insert(pattern.clone(), FieldCount { count: 1, from, to });
            }
            if self.metric_fields.contains(pattern) || self.metric_fields.len() < MAX_METRIC_FIELDS
            {
                self.metric_fields.insert(pattern.clone());
                labels.push(pattern.clone());
            } else {
                labels.push(OTHER_FIELD.to_string());
            }
        }
        if self.last.len() == LAST_MISMATCHES {
            self.last.pop_front();
        }
        self.last.push_back(mismatch);
        labels
    }

    /// The report as JSON, with `counts` (indexed by `Outcome as usize`).
    pub fn to_json(&self, counts: [u64; 5]) -> Value {
        let compared = counts[Outcome::Match as usize] + counts[Outcome::Mismatch as usize];
        let mismatch_rate = if compared == 0 {
            Value::Null
        } else {
            json!(100.0 * counts[Outcome::Mismatch as usize] as f64 / compared as f64)
        };
        let counts: serde_json::Map<String, Value> = Outcome::ALL
            .iter()
            .map(|o| (o.as_str().to_string(), json!(counts[*o as usize])))
            .collect();
        let mut top: Vec<(&String, &FieldCount)> = self.fields.iter().collect();
        top.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(b.0)));
        let top: Vec<Value> = top
            .into_iter()
            .take(TOP_FIELDS)
            .map(|(field, c)| json!({"field": field, "count": c.count, "from": c.from, "to": c.to}))
            .collect();
        let last: Vec<Value> = self.last.iter().rev().map(mismatch_json).collect();
        json!({
            "counts": counts,
            "mismatch_rate_percent": mismatch_rate,
            "top_fields": top,
            "noise": self.noise,
            "last_mismatches": last,
        })
    }
}

fn mismatch_json(m: &Mismatch) -> Value {
    let (headers, body): (Vec<&Difference>, Vec<&Difference>) =
        m.differences.iter().partition(|d| d.field.starts_with("header:"));
    let list = |ds: Vec<&Difference>| -> Vec<Value> {
        ds.into_iter().map(|d| json!({"field": d.field, "from": d.from, "to": d.to})).collect()
    };
    json!({
        "at": m.at,
        "method": m.method,
        "path": m.path,
        "from_status": m.from_status,
        "to_status": m.to_status,
        "differences": list(body),
        "header_differences": list(headers),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn difference(field: &str, pattern: &str) -> Difference {
        Difference {
            field: field.into(),
            pattern: pattern.into(),
            from: "1".into(),
            to: "2".into(),
        }
    }

    fn mismatch(differences: Vec<Difference>) -> Mismatch {
        Mismatch {
            at: "t".into(),
            method: "GET".into(),
            path: "/p".into(),
            from_status: 200,
            to_status: 200,
            differences,
        }
    }

    #[test]
    fn counts_rate_and_top_fields() {
        let mut report = Report::default();
        report.mismatch(mismatch(vec![difference("/a/0/x", "/a/*/x")]));
        report.mismatch(mismatch(vec![difference("/a/1/x", "/a/*/x"), difference("/b", "/b")]));
        let counts = OutcomeCounts::default();
        for outcome in [Outcome::Match, Outcome::Match, Outcome::Mismatch, Outcome::Mismatch] {
            counts.add(outcome);
        }
        assert_eq!(counts.compared_totals(), (4, 2));
        let json = report.to_json(counts.get());
        assert_eq!(json["counts"]["match"], 2);
        assert_eq!(json["counts"]["mismatch"], 2);
        assert_eq!(json["mismatch_rate_percent"], 50.0);
        assert_eq!(json["top_fields"][0]["field"], "/a/*/x");
        assert_eq!(json["top_fields"][0]["count"], 2);
        assert_eq!(json["last_mismatches"][0]["differences"][0]["field"], "/a/1/x");
    }

    #[test]
    fn learnt_noise_is_filtered_out() {
        let mut report = Report::default();
        report.learn_noise(&[difference("/items/3/at", "/items/*/at")]);
        let left = report
            .without_noise(vec![difference("/items/0/at", "/items/*/at"), difference("/b", "/b")]);
        assert_eq!(left, vec![difference("/b", "/b")]);
        assert_eq!(report.to_json([0; 5])["noise"][0], "/items/*/at");
    }

    #[test]
    fn metric_fields_are_capped() {
        let mut report = Report::default();
        for i in 0..MAX_METRIC_FIELDS {
            let field = format!("/f{i}");
            report.mismatch(mismatch(vec![difference(&field, &field)]));
        }
        let labels =
            report.mismatch(mismatch(vec![difference("/new", "/new"), difference("/f0", "/f0")]));
        assert_eq!(labels, ["other", "/f0"]);
    }

    #[test]
    fn only_the_last_mismatches_are_kept() {
        let mut report = Report::default();
        for _ in 0..LAST_MISMATCHES + 5 {
            report.mismatch(mismatch(vec![difference("/a", "/a")]));
        }
        assert_eq!(
            report.to_json([0; 5])["last_mismatches"].as_array().map(Vec::len),
            Some(LAST_MISMATCHES)
        );
    }
}
