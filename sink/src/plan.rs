//! A batch of events as the statements that apply it to the target tables, in order: runs
//! of upserts and of deletes become one multi-row statement each. Pure: the runner executes
//! the statements in one transaction with the batch's offsets.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap};

use serde_json::{Map, Value};

use crate::change::{self, Change};
use crate::value::{self, Input, Kind};

/// A target table's column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    /// Its type in SQL (`numeric(10,2)`), for the cast from text.
    pub type_sql: String,
    pub kind: Kind,
}

/// What the events of a topic do to their table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The table holds each key's current row.
    #[default]
    Upsert,
    /// The table holds every event (`topic`, `partition`, `offset`, `key`, `value`).
    Append,
}

/// A table events are applied to, as the catalog describes it.
#[derive(Debug, Clone)]
pub struct Target {
    /// The table in SQL, quoted.
    pub sql: String,
    /// The table for people and metrics: `schema.table`.
    pub label: String,
    pub columns: Vec<Column>,
    /// The primary key's columns (indexes into `columns`).
    pub key: Vec<usize>,
    /// Source column name to target column name, where they differ.
    pub renames: HashMap<String, String>,
    pub mode: Mode,
}

/// One event of a batch.
#[derive(Debug, Clone, Copy)]
pub struct Event<'a> {
    /// Index of its target.
    pub target: usize,
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
}

/// A statement of the plan, with its parameters (text arrays, one per column).
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Insert or update rows (of the given columns) by primary key.
    Upsert {
        target: usize,
        columns: Vec<usize>,
        rows: Vec<Vec<Option<String>>>,
    },
    /// Delete rows by primary key.
    Delete {
        target: usize,
        keys: Vec<Vec<Option<String>>>,
    },
    Truncate {
        target: usize,
    },
    /// Append events as rows.
    Append {
        target: usize,
        rows: Vec<AppendRow>,
    },
}

/// An event as a row of an append-mode table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendRow {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub value: Option<String>,
}

/// The plan of a batch: its steps, the columns events carry that their targets lack, and
/// the first event that could not be planned (its index and why), before which the plan
/// stops.
#[derive(Debug, Default)]
pub struct Plan {
    pub steps: Vec<Step>,
    pub unknown_columns: BTreeSet<(usize, String)>,
    pub failed: Option<(usize, String)>,
}

/// Plans `events` in order; with `skip_bad`, events that cannot be planned are left out
/// (their indexes in `skipped`) instead of ending the plan.
pub fn plan(
    targets: &[Target],
    events: &[Event<'_>],
    skip_bad: bool,
) -> (Plan, Vec<(usize, String)>) {
    let mut plan = Plan::default();
    let mut rows_by_key = HashMap::new();
    let mut skipped = Vec::new();
    for (index, event) in events.iter().enumerate() {
        let target = &targets[event.target];
        let step = match target.mode {
            Mode::Append => Ok(Some(Step::Append {
                target: event.target,
                rows: vec![AppendRow {
                    topic: event.topic.to_string(),
                    partition: event.partition,
                    offset: event.offset,
                    key: event.key.map(|k| String::from_utf8_lossy(k).into_owned()),
                    value: event.value.map(|v| String::from_utf8_lossy(v).into_owned()),
                }],
            })),
            Mode::Upsert => change::parse(event.key, event.value)
                .and_then(|change| step(event.target, target, change, &mut plan.unknown_columns)),
        };
        match step {
            Ok(Some(step)) => push(&mut plan.steps, &mut rows_by_key, step, target),
            Ok(None) => {}
            Err(problem) if skip_bad => skipped.push((index, problem)),
            Err(problem) => {
                plan.failed = Some((index, problem));
                break;
            }
        }
    }
    (plan, skipped)
}

/// The step of one change.
fn step(
    index: usize,
    target: &Target,
    change: Option<Change>,
    unknown: &mut BTreeSet<(usize, String)>,
) -> Result<Option<Step>, String> {
    Ok(Some(match change {
        None => return Ok(None),
        Some(Change::Truncate) => Step::Truncate { target: index },
        Some(Change::Upsert(row)) => {
            let (columns, values) = target.row(&row, index, unknown)?;
            if let Some(&k) = target.key.iter().find(|k| !columns.contains(k)) {
                return Err(target.missing_key(k));
            }
            Step::Upsert { target: index, columns, rows: vec![values] }
        }
        Some(Change::Delete(key)) => {
            let (columns, values) = target.row(&key, index, unknown)?;
            let key = target
                .key
                .iter()
                .map(|k| match columns.iter().position(|c| c == k) {
                    Some(at) => Ok(values[at].clone()),
                    None => Err(target.missing_key(*k)),
                })
                .collect::<Result<_, _>>()?;
            Step::Delete { target: index, keys: vec![key] }
        }
    }))
}

/// Adds `step` to the plan, into the last statement when it is of the same kind, table and
/// columns. Upserts of a key already in the statement replace its row: one statement may
/// not touch a row twice. `rows_by_key` indexes the rows of the last statement by key.
fn push(
    steps: &mut Vec<Step>,
    rows_by_key: &mut HashMap<Vec<Option<String>>, usize>,
    step: Step,
    target: &Target,
) {
    match (steps.last_mut(), step) {
        (
            Some(Step::Upsert { target: t, columns: c, rows }),
            Step::Upsert { target: new_t, columns: new_c, rows: new_rows },
        ) if *t == new_t && *c == new_c => {
            for row in new_rows {
                match rows_by_key.entry(target.key_of(c, &row)) {
                    Entry::Occupied(at) => rows[*at.get()] = row,
                    Entry::Vacant(at) => {
                        at.insert(rows.len());
                        rows.push(row);
                    }
                }
            }
        }
        (
            Some(Step::Delete { target: t, keys }),
            Step::Delete { target: new_t, keys: new_keys },
        ) if *t == new_t => keys.extend(new_keys),
        (
            Some(Step::Append { target: t, rows }),
            Step::Append { target: new_t, rows: new_rows },
        ) if *t == new_t => rows.extend(new_rows),
        (_, step) => {
            rows_by_key.clear();
            if let Step::Upsert { columns, rows, .. } = &step {
                for (at, row) in rows.iter().enumerate() {
                    rows_by_key.insert(target.key_of(columns, row), at);
                }
            }
            steps.push(step);
        }
    }
}

impl Target {
    /// The target columns an event row (columns by source name) sets, in the target's
    /// order, and their text. Columns the target lacks are noted in `unknown`.
    fn row(
        &self,
        row: &Map<String, Value>,
        index: usize,
        unknown: &mut BTreeSet<(usize, String)>,
    ) -> Result<(Vec<usize>, Vec<Option<String>>), String> {
        let mut set: Vec<(usize, Option<String>)> = Vec::with_capacity(row.len());
        for (source, value) in row {
            let name = self.renames.get(source).unwrap_or(source);
            let Some(at) = self.columns.iter().position(|c| &c.name == name) else {
                unknown.insert((index, name.clone()));
                continue;
            };
            let column = &self.columns[at];
            match value::input(&column.kind, value)
                .map_err(|problem| format!("column {}: {problem}", column.name))?
            {
                Input::Value(text) => set.push((at, text)),
                Input::Unchanged => {}
            }
        }
        set.sort_by_key(|(at, _)| *at);
        Ok(set.into_iter().unzip())
    }

    /// The key values of an upsert row setting `columns`.
    fn key_of(&self, columns: &[usize], row: &[Option<String>]) -> Vec<Option<String>> {
        let at = |k: &usize| columns.iter().position(|c| c == k);
        self.key.iter().filter_map(at).map(|at| row[at].clone()).collect()
    }

    fn missing_key(&self, column: usize) -> String {
        format!("the event does not carry key column {} of {}", self.columns[column].name, self.sql)
    }

    /// `INSERT ... ON CONFLICT (key) DO UPDATE` of `columns` (which hold the key: the plan
    /// checks), their values given as one text array per column.
    pub fn upsert_sql(&self, columns: &[usize]) -> String {
        let names: Vec<String> = columns.iter().map(|&c| quote(&self.columns[c].name)).collect();
        let update: Vec<String> = columns
            .iter()
            .filter(|c| !self.key.contains(c))
            .map(|&c| format!("{0} = EXCLUDED.{0}", quote(&self.columns[c].name)))
            .collect();
        let key: Vec<String> = self.key.iter().map(|&c| quote(&self.columns[c].name)).collect();
        let action = if update.is_empty() {
            "DO NOTHING".to_string()
        } else {
            format!("DO UPDATE SET {}", update.join(", "))
        };
        format!(
            "INSERT INTO {} ({}) SELECT {} FROM {} ON CONFLICT ({}) {action}",
            self.sql,
            names.join(", "),
            self.casts(columns),
            unnest(columns.len()),
            key.join(", ")
        )
    }

    /// `DELETE` by primary key, the keys given as one text array per key column.
    pub fn delete_sql(&self) -> String {
        let matches: Vec<String> = self
            .key
            .iter()
            .enumerate()
            .map(|(n, &c)| {
                let column = &self.columns[c];
                format!("t.{} = u.c{n}::{}", quote(&column.name), column.type_sql)
            })
            .collect();
        format!(
            "DELETE FROM {} t USING {} WHERE {}",
            self.sql,
            unnest(self.key.len()),
            matches.join(" AND ")
        )
    }

    pub fn truncate_sql(&self) -> String {
        format!("TRUNCATE {}", self.sql)
    }

    /// Appends events: topic, partition, offset, key and value (JSON).
    pub fn append_sql(&self) -> String {
        format!(
            "INSERT INTO {} (topic, \"partition\", \"offset\", key, value) \
             SELECT * FROM unnest($1::text[], $2::int4[], $3::int8[], $4::text[]::jsonb[], $5::text[]::jsonb[])",
            self.sql
        )
    }

    fn casts(&self, columns: &[usize]) -> String {
        let casts: Vec<String> = columns
            .iter()
            .enumerate()
            .map(|(n, &c)| format!("u.c{n}::{}", self.columns[c].type_sql))
            .collect();
        casts.join(", ")
    }
}

/// `unnest($1::text[], ...) AS u(c0, ...)`.
fn unnest(columns: usize) -> String {
    let arrays: Vec<String> = (1..=columns).map(|n| format!("${n}::text[]")).collect();
    let names: Vec<String> = (0..columns).map(|n| format!("c{n}")).collect();
    format!("unnest({}) AS u({})", arrays.join(", "), names.join(", "))
}

fn quote(name: &str) -> String {
    ficus_cdc::names::quote_ident(name)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn target() -> Target {
        let column = |name: &str, type_sql: &str, kind| Column {
            name: name.into(),
            type_sql: type_sql.into(),
            kind,
        };
        Target {
            sql: "\"v\".\"orders\"".into(),
            label: "v.orders".into(),
            columns: vec![
                column("id", "integer", Kind::Plain),
                column("amount", "numeric", Kind::Plain),
                column("placed", "date", Kind::Date),
            ],
            key: vec![0],
            renames: HashMap::from([("total".to_string(), "amount".to_string())]),
            mode: Mode::Upsert,
        }
    }

    fn bytes(value: serde_json::Value) -> Vec<u8> {
        value.to_string().into_bytes()
    }

    fn events(values: &[(Vec<u8>, Option<Vec<u8>>)]) -> Vec<Event<'_>> {
        values
            .iter()
            .enumerate()
            .map(|(n, (key, value))| Event {
                target: 0,
                topic: "t",
                partition: 0,
                offset: n as i64,
                key: Some(key),
                value: value.as_deref(),
            })
            .collect()
    }

    fn text(s: &str) -> Option<String> {
        Some(s.to_string())
    }

    #[test]
    fn runs_of_changes_become_one_statement_each_in_order() {
        let key = |id: i64| bytes(json!({"id": id}));
        let upsert = |id: i64, total: &str| {
            Some(bytes(
                json!({"op": "u", "after": {"id": id, "total": total, "placed": 0, "extra": 1}}),
            ))
        };
        let input = vec![
            (key(1), upsert(1, "1.00")),
            (key(2), upsert(2, "2.00")),
            (key(1), upsert(1, "1.50")),
            (key(2), Some(bytes(json!({"op": "d", "before": {"id": 2}})))),
            (key(2), None),
            (key(3), upsert(3, "3.00")),
            (key(0), Some(bytes(json!({"op": "t"})))),
        ];
        let (plan, skipped) = plan(&[target()], &events(&input), false);
        assert!(plan.failed.is_none() && skipped.is_empty());
        assert_eq!(plan.unknown_columns, BTreeSet::from([(0, "extra".to_string())]));
        let row = |id: &str, amount: &str| vec![text(id), text(amount), text("1970-01-01")];
        assert_eq!(
            plan.steps,
            [
                // The second upsert of key 1 replaces its row in the same statement.
                Step::Upsert {
                    target: 0,
                    columns: vec![0, 1, 2],
                    rows: vec![row("1", "1.50"), row("2", "2.00")]
                },
                Step::Delete { target: 0, keys: vec![vec![text("2")], vec![text("2")]] },
                Step::Upsert { target: 0, columns: vec![0, 1, 2], rows: vec![row("3", "3.00")] },
                Step::Truncate { target: 0 },
            ]
        );
    }

    #[test]
    fn a_bad_event_ends_the_plan_or_is_skipped() {
        let input = vec![
            (bytes(json!({"id": 1})), Some(bytes(json!({"op": "c", "after": {"id": 1}})))),
            (
                bytes(json!({"id": 2})),
                Some(bytes(json!({"op": "c", "after": {"id": 2, "placed": "x"}}))),
            ),
            (bytes(json!({"id": 3})), Some(b"garbage".to_vec())),
            (bytes(json!({"id": 4})), Some(bytes(json!({"op": "c", "after": {"id": 4}})))),
        ];
        let (stopped, _) = plan(&[target()], &events(&input), false);
        assert_eq!(stopped.steps.len(), 2, "two column sets, two statements");
        let (at, problem) = stopped.failed.expect("failed");
        // A string is taken as the date's own text; the garbage is the failure.
        assert_eq!(at, 2, "{problem}");
        assert!(problem.contains("not JSON"), "{problem}");
        let (skipping, skipped) = plan(&[target()], &events(&input), true);
        assert_eq!(skipped.iter().map(|(at, _)| *at).collect::<Vec<_>>(), [2]);
        assert!(skipping.failed.is_none());
        let bad_date = vec![(
            bytes(json!({"id": 5})),
            Some(bytes(json!({"op": "c", "after": {"id": 5, "placed": 1.5}}))),
        )];
        let (plan, _) = plan(&[target()], &events(&bad_date), false);
        assert!(plan.failed.expect("failed").1.contains("column placed"));
    }

    #[test]
    fn statements_cast_text_arrays_to_the_columns_types() {
        let target = target();
        assert_eq!(
            target.upsert_sql(&[0, 1]),
            "INSERT INTO \"v\".\"orders\" (\"id\", \"amount\") SELECT u.c0::integer, u.c1::numeric \
             FROM unnest($1::text[], $2::text[]) AS u(c0, c1) ON CONFLICT (\"id\") DO UPDATE SET \"amount\" = EXCLUDED.\"amount\""
        );
        let keyless = vec![(
            bytes(json!({"id": 1})),
            Some(bytes(json!({"op": "c", "after": {"total": "1"}}))),
        )];
        let (plan, _) = plan(std::slice::from_ref(&target), &events(&keyless), false);
        assert!(plan.failed.expect("failed").1.contains("key column id"));
        assert_eq!(
            target.delete_sql(),
            "DELETE FROM \"v\".\"orders\" t USING unnest($1::text[]) AS u(c0) WHERE t.\"id\" = u.c0::integer"
        );
    }
}
