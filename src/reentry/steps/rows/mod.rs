//! Rows: the restored copy against the current primary, table by table,
//! for both ways back.
//!
//! - selective repair: good rows flow from restored to current, only
//!   inside the damage's scope;
//! - cutover: the legitimate writes made on current after T flow to the
//!   restored copy before it takes traffic (by default the rows whose
//!   `updated-at` is after T).
//!
//! `rows-stage:<table>` diffs the table (`diff`), and stages every
//! differing row, with its class and the hash of the target row as the
//! diff saw it, in its staging table `reentry_repair."<table>_<hash>"` on
//! the target.
//! `rows-apply:<table>` writes them in batches, one transaction each, only
//! where the target row still has that hash; `rows-delete:<table>` removes
//! delete candidates when the playbook allows it, children first. With
//! `triggers = "disable"` (which disables foreign-key checks too),
//! `rows-foreign-keys:<table>` then counts the rows left without a
//! parent, and fails if there are any.

pub mod diff;
mod foreign_keys;
mod repair;

use serde::{Deserialize, Serialize};

use super::{PlanCtx, StepKind};
use crate::reentry::check::{Need, Prepared};
use crate::reentry::plan::{step, PlannedStep};
use crate::reentry::playbook::{section, Meaning, Playbook, Seg, WayBack, WAY_BACK};
use crate::reentry::schema::{opt, req, Field, Kind};
use crate::reentry::steps::Phase;

pub use foreign_keys::ForeignKeys;
pub use repair::{record_changed, run_diff, staging, Apply, Changed, Stage, CHANGED_FILE, SCHEMA};

pub const ON_CONFLICT: &[&str] = &["review", "source-wins", "target-wins"];
pub const TRIGGERS: &[&str] = &["keep", "disable"];

section! {
    /// One `[[repair]]` table.
    #[derive(PartialEq)]
    pub struct Repair {
        pub table: String => req("table", Kind::Str),
        pub key: Option<Vec<String>> => opt("key", Kind::Strs),
        pub columns: Option<Vec<String>> => opt("columns", Kind::Strs),
        pub filter: Option<String> => opt("where", Kind::Str),
        pub ids: Option<String> => opt("ids", Kind::Str),
        pub ids_database: Option<String> => opt("ids-database", Kind::Str),
        pub updated_at: Option<String> => opt("updated-at", Kind::Str),
        pub changed_after_t: Option<String> => opt("changed-after-t", Kind::Str),
        pub on_conflict: Option<String> => opt("on-conflict", Kind::OneOf(ON_CONFLICT)),
        pub allow_delete: Option<bool> => opt("allow-delete", Kind::Bool),
        pub triggers: Option<String> => opt("triggers", Kind::OneOf(TRIGGERS)),
        pub batch_size: Option<i64> => opt("batch-size", Kind::Int),
        pub way_back: Option<WayBack> => opt("way-back", Kind::OneOf(WAY_BACK)),
    }
}

section! {
    /// Its top-level key.
    #[derive(Default)]
    pub struct Keys {
        #[serde(default)]
        pub repair: Vec<Repair> => opt("repair", Kind::Tables(Repair::FIELDS)),
    }
}

/// The playbook's `[[repair]]` tables for its way back: those that name
/// none, and those that name this one.
pub fn repairs(p: &Playbook) -> Vec<Repair> {
    indexed(p).into_iter().map(|(_, r)| r).collect()
}

/// `repairs`, each with its place among all the file's `[[repair]]`
/// tables, to locate what is wrong with it.
fn indexed(p: &Playbook) -> Vec<(usize, Repair)> {
    p.part::<Keys>(None)
        .repair
        .into_iter()
        .enumerate()
        .filter(|(_, r)| r.way_back.is_none_or(|w| w == p.playbook.way_back))
        .collect()
}

/// Which way rows flow: (source, target).
pub fn direction(way: WayBack) -> (&'static str, &'static str) {
    match way {
        WayBack::SelectiveRepair => ("restored", "current"),
        WayBack::Cutover => ("current", "restored"),
    }
}

fn at(i: usize, key: &'static str) -> Vec<Seg<'static>> {
    vec![Seg::Key("repair"), Seg::Index(i), Seg::Key(key)]
}

/// Stage each table in the declared order, apply them in that order
/// (parents first, which the online check holds the playbook to), then
/// delete candidates, where allowed, children first.
fn plan(p: &Playbook, ctx: &PlanCtx) -> Vec<PlannedStep> {
    let (source, target) = direction(p.playbook.way_back);
    let rs = repairs(p);
    let mut out = Vec::new();
    for r in &rs {
        out.push(step(
            format!("rows-stage:{}", r.table),
            Phase::Repair,
            format!(
                "diff `{}` ({source} → {target}) and stage what differs",
                r.table
            ),
            super::Action::RowsStage(Stage {
                repair: r.clone(),
                source: source.into(),
                target: target.into(),
                t_ms: ctx.t_ms,
                carry_forward: p.playbook.way_back == WayBack::Cutover,
            }),
        ));
    }
    for r in &rs {
        out.push(step(
            format!("rows-apply:{}", r.table),
            Phase::Repair,
            format!("apply the staged rows of `{}` to {target}", r.table),
            super::Action::RowsApply(Apply::new(r, target, false, p.playbook.way_back)),
        ));
    }
    for r in rs.iter().rev().filter(|r| r.allow_delete == Some(true)) {
        out.push(step(
            format!("rows-delete:{}", r.table),
            Phase::Repair,
            format!(
                "delete the staged delete candidates of `{}` on {target}",
                r.table
            ),
            super::Action::RowsDelete(Apply::new(r, target, true, p.playbook.way_back)),
        ));
    }
    // Replica mode skips foreign-key checks: what they would have
    // refused is counted once every table is written.
    for r in rs
        .iter()
        .filter(|r| r.triggers.as_deref() == Some("disable"))
    {
        out.push(step(
            format!("rows-foreign-keys:{}", r.table),
            Phase::Validate,
            format!(
                "check the foreign keys of `{}` on {target} (repaired with triggers, and so foreign-key checks, disabled)",
                r.table
            ),
            super::Action::RowsForeignKeys(ForeignKeys {
                table: r.table.clone(),
                database: target.into(),
            }),
        ));
    }
    out
}

/// A cutover carries forward what changed after T, and `updated-at`
/// tells a conflict by a change after T: either needs T as a time.
fn needs_time(p: &Playbook) -> bool {
    let rs = repairs(p);
    (p.playbook.way_back == WayBack::Cutover && !rs.is_empty())
        || rs.iter().any(|r| r.updated_at.is_some())
}

fn meaning(m: &mut Meaning) {
    let rs = indexed(m.p);
    let way = m.p.playbook.way_back;
    if way == WayBack::SelectiveRepair && rs.is_empty() {
        m.error(
            &[Seg::Key("playbook"), Seg::Key("way-back")],
            "selective-repair needs at least one [[repair]] table to take good rows from the restored copy".into(),
        );
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, r) in rs.iter().map(|(i, r)| (*i, r)) {
        if !seen.insert(r.table.clone()) {
            m.error(
                &at(i, "table"),
                format!(
                    "`{}` is repaired twice on this way back: merge its [[repair]] entries, or give each its `way-back`",
                    r.table
                ),
            );
        }
        if r.key.as_ref().is_some_and(Vec::is_empty) {
            m.error(
                &at(i, "key"),
                "`key` names no column: leave it out to use the primary key".into(),
            );
        }
        if r.columns.as_ref().is_some_and(Vec::is_empty) {
            m.error(
                &at(i, "columns"),
                "`columns` names no column: leave it out to compare every column both sides share"
                    .into(),
            );
        }
        if let Some(d) = &r.ids_database {
            m.database(&at(i, "ids-database"), d);
        }
        if r.ids_database.is_some() && r.ids.is_none() {
            m.error(
                &at(i, "ids-database"),
                "`ids-database` without `ids`: give the SQL that returns the keys".into(),
            );
        }
        if way == WayBack::Cutover
            && r.updated_at.is_none()
            && r.filter.is_none()
            && r.ids.is_none()
        {
            m.error(
                &at(i, "table"),
                format!("carrying `{}` forward needs a scope: `updated-at` (rows changed after T, the default), `where` or `ids`", r.table),
            );
        }
        if r.batch_size.is_some_and(|b| b < 1) {
            m.error(
                &at(i, "batch-size"),
                "`batch-size` must be at least 1".into(),
            );
        }
    }
}

/// Each table, on both databases, with its key and `updated-at`.
fn needs(p: &Playbook) -> Vec<Need<'_>> {
    let mut out = Vec::new();
    for (i, r) in indexed(p) {
        for d in ["current", "restored"] {
            out.push(Need {
                database: d,
                table: r.table.clone(),
                columns: r
                    .key
                    .iter()
                    .flatten()
                    .cloned()
                    .chain(r.updated_at.clone())
                    .collect(),
                path: at(i, "table"),
                what: format!("repair table `{}`", r.table),
            });
        }
    }
    out
}

/// Its SQL, prepared where it runs: `where` on the source, `ids` on its
/// database, `changed-after-t` on the target.
fn queries(p: &Playbook) -> Vec<Prepared<'_>> {
    let (source, target) = direction(p.playbook.way_back);
    let mut out = Vec::new();
    for (i, r) in indexed(p) {
        let table = crate::reentry::check::quote_qualified(&r.table);
        if let Some(w) = &r.filter {
            out.push(Prepared {
                path: at(i, "where"),
                database: source,
                sql: format!("SELECT FROM {table} WHERE ({w})").into(),
            });
        }
        if let Some(sql) = r.ids {
            let db = match r.ids_database.as_deref() {
                Some("restored") => "restored",
                Some("current") | None => "current",
                // Another declared database: its name lives as long as the playbook.
                Some(other) => p
                    .databases
                    .keys()
                    .find(|k| k.as_str() == other)
                    .map_or("current", String::as_str),
            };
            out.push(Prepared {
                path: at(i, "ids"),
                database: db,
                sql: sql.into(),
            });
        }
        if let Some(sql) = r.changed_after_t {
            out.push(Prepared {
                path: at(i, "changed-after-t"),
                database: target,
                sql: sql.into(),
            });
        }
    }
    out
}

pub const KIND: StepKind = StepKind {
    online: repair::online,
    meaning,
    steps: plan,
    needs_time,
    notes: super::no_notes,
    needs,
    queries,
    keys: &[(None, Keys::FIELDS)],
};

/// Keys of each class `rows diff` and the report show.
const SAMPLE: usize = 5;

/// What the diff found for one table, as `rows diff` and the stage step
/// report it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct TableDiff {
    pub table: String,
    pub source: String,
    pub target: String,
    pub counts: std::collections::BTreeMap<diff::Class, u64>,
    /// A few keys of each class.
    pub sample: std::collections::BTreeMap<diff::Class, Vec<Vec<String>>>,
    /// Columns only the source has: staged, not applied.
    pub source_only: Vec<String>,
    pub stats: diff::Stats,
}

impl TableDiff {
    pub fn new(spec: &diff::Spec, source: &str, target: &str) -> TableDiff {
        TableDiff {
            table: spec.table.clone(),
            source: source.into(),
            target: target.into(),
            counts: Default::default(),
            sample: Default::default(),
            source_only: spec.source_only.clone(),
            stats: diff::Stats::default(),
        }
    }

    /// Counts a group of differing rows, and keeps the first keys of each
    /// class in key order as the sample.
    pub fn add(&mut self, rows: &[diff::Found]) {
        for r in rows {
            *self.counts.entry(r.class).or_default() += 1;
            let s = self.sample.entry(r.class).or_default();
            let at = s.partition_point(|k| diff::key_order(k, &r.key).is_lt());
            if at < SAMPLE {
                s.insert(at, r.key.clone());
                s.truncate(SAMPLE);
            }
        }
    }

    pub fn differences(&self) -> u64 {
        self.counts.values().sum()
    }

    /// `cases: 3 insert, 100 update (of 5000 in scope)`.
    pub fn summary(&self) -> String {
        let classes: Vec<String> = self
            .counts
            .iter()
            .map(|(c, n)| format!("{n} {}", c.as_str()))
            .collect();
        let mut s = format!(
            "{}: {} ({} source row(s) compared, {:.2}s)",
            self.table,
            if classes.is_empty() {
                "no differences".to_owned()
            } else {
                classes.join(", ")
            },
            self.stats.source_rows,
            self.stats.seconds
        );
        if !self.source_only.is_empty() {
            s.push_str(&format!(
                "; column(s) missing on {}: {} (staged, not applied)",
                self.target,
                self.source_only.join(", ")
            ));
        }
        s
    }
}

/// Where a cache or an index finds the entities changed around T: the
/// run's `changed-entities.jsonl` (what the rows steps staged, and the
/// orphans of the named outboxes), and the rows of `table` on current
/// whose `updated-at` is after T.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Entities {
    pub table: String,
    /// Empty: the table's primary key, read when the step runs.
    #[serde(default)]
    pub key: Vec<String>,
    #[serde(default)]
    pub updated_at: Option<String>,
    #[serde(default)]
    pub outboxes: Vec<String>,
    pub t_ms: Option<i64>,
}

/// The entities found, each its key's values as text in key order,
/// sorted and without repeats, with the key's columns.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Found {
    pub key: Vec<String>,
    pub entities: Vec<Vec<String>>,
    /// How many came from the run's file, and from `updated-at`.
    pub from_file: u64,
    pub from_updated_at: u64,
}

impl Entities {
    /// Checks the `outboxes` an entry names against the playbook's
    /// `[[outbox]]` names.
    pub fn check_outboxes(m: &mut Meaning, at: &[Seg], named: Option<&Vec<String>>) {
        let declared: Vec<String> = m.p.outbox.iter().map(|o| o.name.clone()).collect();
        for o in named.into_iter().flatten() {
            if !declared.contains(o) {
                m.error(
                    at,
                    format!(
                        "no [[outbox]] named `{o}` (declared: {})",
                        declared.join(", ")
                    ),
                );
            }
        }
    }

    /// Reads both sources. `current` is the database whose rows were
    /// written after T (the one the caches were filled from).
    pub fn find(&self, env: &mut super::Env, current: &str) -> Result<Found, super::StepError> {
        use super::OnDatabase;
        let mut set = std::collections::BTreeSet::new();
        let mut found = Found::default();
        if let Some(dir) = &env.run_dir {
            match std::fs::read_to_string(dir.join(CHANGED_FILE)) {
                Ok(text) => {
                    for l in text.lines() {
                        let Ok(c) = serde_json::from_str::<Changed>(l) else {
                            continue;
                        };
                        if c.table == self.table || self.outboxes.contains(&c.table) {
                            found.from_file += u64::from(set.insert(c.key));
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(super::StepError::Io {
                        what: "read the changed entities",
                        source,
                    })
                }
            }
        }
        let db = env.db(current)?;
        found.key = if self.key.is_empty() {
            let d = diff::describe(db, &self.table)
                .on(current)?
                .ok_or_else(|| {
                    super::StepError::Config(format!("no table `{}` on {current}", self.table))
                })?;
            if d.primary_key.is_empty() {
                return Err(super::StepError::Config(format!(
                    "`{}` has no primary key on {current}: name its `key`",
                    self.table
                )));
            }
            d.primary_key
        } else {
            self.key.clone()
        };
        if let (Some(col), Some(t)) = (&self.updated_at, self.t_ms) {
            let cols: Vec<String> = found
                .key
                .iter()
                .map(|k| format!("{}::text", diff::quote_ident(k)))
                .collect();
            let sql = format!(
                "SELECT ARRAY[{}] FROM {} WHERE {} > to_timestamp($1::float8 / 1000)",
                cols.join(", "),
                db.table(&self.table).on(current)?,
                diff::quote_ident(col)
            );
            let rows = db
                .query("read the rows changed after T", &sql, &[&(t as f64)])
                .on(current)?;
            for r in rows {
                let key: Vec<Option<String>> = r.get(0);
                let key: Vec<String> = key.into_iter().map(Option::unwrap_or_default).collect();
                found.from_updated_at += u64::from(set.insert(key));
            }
        }
        found.entities = set.into_iter().collect();
        Ok(found)
    }
}
