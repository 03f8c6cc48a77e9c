//! Validation: is the database that will take writes usable? The playbook's
//! invariants, invalid indexes, the extension inventory against the other
//! database, and amcheck's `bt_index_check` where installed. (Sequences
//! behind their columns, the one finding with a fix, are `sequences`.)
//!
//! Queries a playbook writes are one statement each, run in a read-only
//! transaction that is rolled back: an invariant cannot change what it
//! checks.

use serde::{Deserialize, Serialize};

use super::PlanCtx;
use super::{Effect, Env, Nature, OnDatabase, Recorder, Step, StepError, StepKind};
use crate::pg::conn::{Db, SqlState};
use crate::reentry::check::Prepared;
use crate::reentry::plan::{step, PlannedStep};
use crate::reentry::playbook::section;
use crate::reentry::playbook::Playbook;
use crate::reentry::playbook::{Meaning, Seg};
use crate::reentry::schema::{opt, req, Field, Kind};
use crate::reentry::steps::Phase;

// ---- Its playbook section: one typed model; its keys and checks come from it.

section! {
    pub struct NamedQuery {
        pub name: String => req("name", Kind::Str),
        pub database: String => req("database", Kind::Str),
        pub sql: String => req("sql", Kind::Str),
    }
}

section! {
    #[derive(Default)]
    pub struct Validation {
        pub invalid_indexes: Option<bool> => opt("invalid-indexes", Kind::Bool),
        pub extensions: Option<bool> => opt("extensions", Kind::Bool),
        pub amcheck: Option<bool> => opt("amcheck", Kind::Bool),
        #[serde(default)]
        pub invariant: Vec<NamedQuery> => opt("invariant", Kind::Tables(NamedQuery::FIELDS)),
    }
}

/// How many findings an error message lists before "and N more".
const SHOWN: usize = 10;

fn listed(findings: &[String]) -> String {
    let mut s = findings
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join("; ");
    if findings.len() > SHOWN {
        s.push_str(&format!("; and {} more", findings.len() - SHOWN));
    }
    s
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Proves, after the gate cache TTL, that nothing still runs.
    Probe,
    Invariant,
    /// Must pass before a gate re-opens.
    HealthCheck,
}

/// A query from the playbook that must return no rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Query {
    pub role: Role,
    pub name: String,
    pub database: String,
    pub sql: String,
}

/// One playbook statement in a read-only transaction that is always
/// rolled back: not even a `set_config` it makes outlives it.
/// It runs under the application's search path, as its author wrote it.
fn read_only_rows(db: &mut Db, sql: &str) -> Result<Vec<String>, crate::pg::conn::PgError> {
    db.as_application(|db| {
        db.batch("begin a read-only transaction", "BEGIN READ ONLY")?;
        let rows = db.text_rows("run the query", sql);
        db.batch("roll back", "ROLLBACK")?;
        rows
    })
}

impl Step for Query {
    fn nature(&self) -> Nature {
        match self.role {
            Role::Probe => Nature::AfterClose,
            Role::Invariant | Role::HealthCheck => Nature::Reads,
        }
    }

    fn preview(&self, env: &mut Env) -> Result<Effect, StepError> {
        if self.role != Role::Invariant {
            return Ok(Effect::said(format!(
                "{}: must return no rows on {}",
                self.name, self.database
            )));
        }
        let rows = read_only_rows(env.db(&self.database)?, &self.sql).on(&self.database)?;
        Ok(Effect {
            summary: format!(
                "invariant `{}` on {}: {} violating row(s) now",
                self.name,
                self.database,
                rows.len()
            ),
            count: 0,
            items: rows.into_iter().take(SHOWN).collect(),
            detail: serde_json::Value::Null,
        })
    }

    fn apply(&self, env: &mut Env, _rec: &mut Recorder) -> Result<Effect, StepError> {
        let rows = read_only_rows(env.db(&self.database)?, &self.sql).on(&self.database)?;
        if rows.is_empty() {
            return Ok(Effect::said(format!(
                "{}: no rows on {}",
                self.name, self.database
            )));
        }
        let what = match self.role {
            Role::Probe => "the gate probe found activity after the close",
            Role::Invariant => "invariant violated",
            Role::HealthCheck => "health check failed",
        };
        Err(StepError::Check {
            message: format!(
                "{what}: `{}` returned {} row(s) on databases.{}: {}",
                self.name,
                rows.len(),
                self.database,
                listed(&rows)
            ),
            findings: rows,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InvalidIndexes {
    pub database: String,
}

fn invalid_indexes(db: &mut Db) -> Result<Vec<String>, crate::pg::conn::PgError> {
    Ok(db
        .query(
            "list invalid indexes",
            "SELECT format('%I.%I on %I.%I', n.nspname, c.relname, tn.nspname, t.relname)
               FROM pg_index i
               JOIN pg_class c ON c.oid = i.indexrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_class t ON t.oid = i.indrelid
               JOIN pg_namespace tn ON tn.oid = t.relnamespace
              WHERE NOT i.indisvalid OR NOT i.indisready
              ORDER BY 1",
            &[],
        )?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

impl Step for InvalidIndexes {
    fn nature(&self) -> Nature {
        Nature::Reads
    }

    fn preview(&self, env: &mut Env) -> Result<Effect, StepError> {
        let found = invalid_indexes(env.db(&self.database)?).on(&self.database)?;
        Ok(Effect {
            summary: format!("{} invalid index(es) on {} now", found.len(), self.database),
            count: 0,
            items: found,
            detail: serde_json::Value::Null,
        })
    }

    fn apply(&self, env: &mut Env, _rec: &mut Recorder) -> Result<Effect, StepError> {
        let found = invalid_indexes(env.db(&self.database)?).on(&self.database)?;
        if found.is_empty() {
            return Ok(Effect::said(format!(
                "no invalid indexes on {}",
                self.database
            )));
        }
        Err(StepError::Check {
            message: format!(
                "{} invalid index(es) on databases.{} (an interrupted CREATE INDEX CONCURRENTLY?): {}; rebuild each with REINDEX INDEX CONCURRENTLY, then resume",
                found.len(),
                self.database,
                listed(&found)
            ),
            findings: found,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Extensions {
    pub current: String,
    pub restored: String,
}

fn extensions(db: &mut Db) -> Result<Vec<(String, String)>, crate::pg::conn::PgError> {
    Ok(db
        .query(
            "list extensions",
            "SELECT extname::text, extversion FROM pg_extension ORDER BY 1",
            &[],
        )?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

impl Extensions {
    fn differences(&self, env: &mut Env) -> Result<Vec<String>, StepError> {
        let cur = extensions(env.db(&self.current)?).on(&self.current)?;
        let res = extensions(env.db(&self.restored)?).on(&self.restored)?;
        let mut out = Vec::new();
        for (name, v) in &cur {
            match res.iter().find(|(n, _)| n == name) {
                None => out.push(format!("{name} {v} is missing on {}", self.restored)),
                Some((_, rv)) if rv != v => out.push(format!(
                    "{name} is {v} on {} but {rv} on {}",
                    self.current, self.restored
                )),
                _ => {}
            }
        }
        for (name, v) in &res {
            if !cur.iter().any(|(n, _)| n == name) {
                out.push(format!("{name} {v} is only on {}", self.restored));
            }
        }
        Ok(out)
    }
}

impl Step for Extensions {
    fn nature(&self) -> Nature {
        Nature::Reads
    }

    fn preview(&self, env: &mut Env) -> Result<Effect, StepError> {
        let d = self.differences(env)?;
        Ok(Effect {
            summary: format!(
                "extensions of {} and {}: {} difference(s) now",
                self.current,
                self.restored,
                d.len()
            ),
            count: 0,
            items: d,
            detail: serde_json::Value::Null,
        })
    }

    fn apply(&self, env: &mut Env, _rec: &mut Recorder) -> Result<Effect, StepError> {
        let d = self.differences(env)?;
        if d.is_empty() {
            return Ok(Effect::said(format!(
                "extensions of {} and {} agree",
                self.current, self.restored
            )));
        }
        Err(StepError::Check {
            message: format!("the extension inventories differ: {}", listed(&d)),
            findings: d,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Amcheck {
    pub database: String,
}

impl Amcheck {
    /// amcheck's schema, quoted, when the extension is installed.
    fn schema(db: &mut Db) -> Result<Option<String>, crate::pg::conn::PgError> {
        Ok(db
            .query(
                "look for amcheck",
                "SELECT quote_ident(n.nspname) FROM pg_extension e
                   JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'amcheck'",
                &[],
            )?
            .first()
            .map(|r| r.get(0)))
    }

    fn indexes(db: &mut Db) -> Result<Vec<String>, crate::pg::conn::PgError> {
        Ok(db
            .query(
                "list B-tree indexes",
                "SELECT format('%I.%I', n.nspname, c.relname)
                   FROM pg_index i
                   JOIN pg_class c ON c.oid = i.indexrelid
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                   JOIN pg_am am ON am.oid = c.relam
                  WHERE am.amname = 'btree' AND i.indisvalid AND i.indisready
                    AND c.relpersistence <> 't' AND n.nspname <> 'pg_toast'
                  ORDER BY 1",
                &[],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }
}

impl Step for Amcheck {
    fn nature(&self) -> Nature {
        // Every B-tree index of the survivor (production, on a selective
        // repair) read in full: heavy I/O that a dry run during an
        // incident must not cause. It runs with --apply only.
        Nature::AfterClose
    }

    fn preview(&self, env: &mut Env) -> Result<Effect, StepError> {
        let db = env.db(&self.database)?;
        let Some(_) = Amcheck::schema(db).on(&self.database)? else {
            return Ok(Effect::said(format!(
                "amcheck is not installed on {}: nothing to check (CREATE EXTENSION amcheck to have it)",
                self.database
            )));
        };
        let n = Amcheck::indexes(db).on(&self.database)?.len();
        Ok(Effect::said(format!(
            "bt_index_check on {n} B-tree index(es) of {}",
            self.database
        )))
    }

    fn apply(&self, env: &mut Env, _rec: &mut Recorder) -> Result<Effect, StepError> {
        let database = self.database.clone();
        let db = env.db(&database)?;
        let Some(schema) = Amcheck::schema(db).on(&database)? else {
            return Ok(Effect::said(format!(
                "skipped: amcheck is not installed on {database}"
            )));
        };
        let indexes = Amcheck::indexes(db).on(&database)?;
        let mut bad = Vec::new();
        for ix in &indexes {
            let r = db.query(
                "bt_index_check",
                &format!("SELECT {schema}.bt_index_check($1::text::regclass)"),
                &[ix],
            );
            match r {
                Ok(_) => {}
                // XX001 data_corrupted, XX002 index_corrupted: what amcheck
                // reports. Anything else is this step failing, not damage.
                Err(e)
                    if matches!(
                        e.code(),
                        Some(c) if *c == SqlState::DATA_CORRUPTED || *c == SqlState::INDEX_CORRUPTED
                    ) =>
                {
                    bad.push(format!("{ix}: {e}"))
                }
                Err(e) => return Err(e).on(&database),
            }
        }
        if bad.is_empty() {
            return Ok(Effect::said(format!(
                "bt_index_check passed on {} index(es) of {database}",
                indexes.len()
            )));
        }
        Err(StepError::Check {
            message: format!(
                "amcheck found {} damaged index(es) on databases.{database}: {}",
                bad.len(),
                listed(&bad)
            ),
            findings: bad,
        })
    }
}

/// Invariants, then the survivor's indexes, the extension
/// inventory and amcheck, as `[validation]` asks.
fn plan(p: &Playbook, ctx: &PlanCtx) -> Vec<PlannedStep> {
    let mut out = Vec::new();
    let survivor = ctx.survivor;
    let v = &p.validation;
    for inv in &v.invariant {
        out.push(step(
            format!("invariant:{}", inv.name),
            Phase::Validate,
            format!("invariant `{}` on {}", inv.name, inv.database),
            super::Action::Check(Query {
                role: Role::Invariant,
                name: inv.name.clone(),
                database: inv.database.clone(),
                sql: inv.sql.clone(),
            }),
        ));
    }
    if v.invalid_indexes.unwrap_or(true) {
        out.push(step(
            format!("indexes@{survivor}"),
            Phase::Validate,
            format!("no invalid indexes on {survivor}"),
            super::Action::InvalidIndexes(InvalidIndexes {
                database: survivor.into(),
            }),
        ));
    }
    if v.extensions.unwrap_or(true) {
        out.push(step(
            "extensions".into(),
            Phase::Validate,
            "extension inventory: current against restored".into(),
            super::Action::Extensions(Extensions {
                current: "current".into(),
                restored: "restored".into(),
            }),
        ));
    }
    if v.amcheck.unwrap_or(false) {
        out.push(step(
            format!("amcheck@{survivor}"),
            Phase::Validate,
            format!("amcheck bt_index_check on {survivor}"),
            super::Action::Amcheck(Amcheck {
                database: survivor.into(),
            }),
        ));
    }

    out
}

fn no_time(_: &Playbook) -> bool {
    false
}

/// Every invariant, prepared by the online checks.
fn queries(p: &Playbook) -> Vec<Prepared<'_>> {
    p.validation
        .invariant
        .iter()
        .enumerate()
        .map(|(i, q)| Prepared {
            path: vec![
                Seg::Key("validation"),
                Seg::Key("invariant"),
                Seg::Index(i),
                Seg::Key("sql"),
            ],
            database: &q.database,
            sql: q.sql.as_str().into(),
        })
        .collect()
}

/// Every invariant runs on a declared database.
fn meaning(m: &mut Meaning) {
    for (i, inv) in m.p.validation.invariant.iter().enumerate() {
        m.database(
            &[
                Seg::Key("validation"),
                Seg::Key("invariant"),
                Seg::Index(i),
                Seg::Key("database"),
            ],
            &inv.database,
        );
    }
}

pub const KIND: StepKind = StepKind {
    online: super::no_online,
    meaning,
    steps: plan,
    needs_time: no_time,
    notes: super::no_notes,
    needs: super::no_needs,
    queries,
    keys: &[],
};
