//! Sequences behind their columns: after a restore, or a repair that
//! copied rows with their ids, a serial or identity sequence can hand out a
//! value its column already holds, and the first insert after re-entry
//! fails on the key. The step finds every such sequence on the survivor and
//! advances it with `setval` to its column's maximum. `[validation]
//! sequences = false` turns it off.

use serde::{Deserialize, Serialize};

use super::{Effect, Env, Nature, OnDatabase, PlanCtx, Recorder, Step, StepError, StepKind};
use crate::pg::conn::Db;
use crate::reentry::plan::{step, PlannedStep};
use crate::reentry::playbook::{section, Playbook};
use crate::reentry::schema::{opt, Field, Kind};
use crate::reentry::steps::Phase;

section! {
    /// Its key in the shared `[validation]` table.
    #[derive(Default)]
    pub struct Keys {
        pub sequences: Option<bool> => opt("sequences", Kind::Bool),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sequences {
    pub database: String,
}

/// A sequence whose next value is already used by its column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Drift {
    pub sequence: String,
    pub column: String,
    pub last_value: i64,
    pub is_called: bool,
    pub max: i64,
}

/// Every ascending sequence owned by an integer column (serial, identity)
/// whose next value is at or below the column's maximum. Names come quoted
/// from the server (`format('%I')`).
fn drifts(db: &mut Db) -> Result<Vec<Drift>, crate::pg::conn::PgError> {
    let owned = db.query(
        "list owned sequences",
        "SELECT format('%I.%I', sn.nspname, s.relname), format('%I.%I', tn.nspname, t.relname), quote_ident(a.attname)
           FROM pg_depend d
           JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
           JOIN pg_namespace sn ON sn.oid = s.relnamespace
           JOIN pg_sequence ps ON ps.seqrelid = s.oid
           JOIN pg_class t ON t.oid = d.refobjid AND t.relkind IN ('r', 'p')
           JOIN pg_namespace tn ON tn.oid = t.relnamespace
           JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = d.refobjsubid
          WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
            AND d.deptype IN ('a', 'i') AND ps.seqincrement > 0
            AND a.atttypid IN ('int2'::regtype, 'int4'::regtype, 'int8'::regtype)
            AND tn.nspname NOT IN ('pg_catalog', 'information_schema')
          ORDER BY 1",
        &[],
    )?;
    let mut out = Vec::new();
    for r in owned {
        let (seq, table, column): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        let row = db.query_one(
            "compare a sequence with its column",
            &format!(
                "SELECT (SELECT max({column})::bigint FROM {table}), last_value, is_called,
                        (SELECT seqincrement FROM pg_sequence WHERE seqrelid = '{}'::regclass)
                   FROM {seq}",
                seq.replace('\'', "''")
            ),
            &[],
        )?;
        let Some(max) = row.get::<_, Option<i64>>(0) else {
            continue;
        };
        let (last_value, is_called, inc): (i64, bool, i64) = (row.get(1), row.get(2), row.get(3));
        let next = if is_called {
            last_value.saturating_add(inc)
        } else {
            last_value
        };
        if next <= max {
            out.push(Drift {
                sequence: seq,
                column: format!("{table}.{column}"),
                last_value,
                is_called,
                max,
            });
        }
    }
    Ok(out)
}

impl Step for Sequences {
    fn nature(&self) -> Nature {
        Nature::Changes
    }

    fn writes(&self) -> Vec<&str> {
        vec![self.database.as_str()]
    }

    fn preview(&self, env: &mut Env) -> Result<Effect, StepError> {
        let found = drifts(env.db(&self.database)?).on(&self.database)?;
        Ok(Effect {
            summary: if found.is_empty() {
                format!("no sequence behind its column on {}", self.database)
            } else {
                format!(
                    "setval {} sequence(s) behind their column on {}",
                    found.len(),
                    self.database
                )
            },
            count: found.len() as u64,
            items: found
                .iter()
                .map(|d| {
                    format!(
                        "{}: {} → {} (max of {})",
                        d.sequence, d.last_value, d.max, d.column
                    )
                })
                .collect(),
            detail: serde_json::to_value(&found).expect("drifts serialize"),
        })
    }

    fn apply(&self, env: &mut Env, rec: &mut Recorder) -> Result<Effect, StepError> {
        let database = self.database.clone();
        let db = env.db(&database)?;
        let planned: Vec<Drift> = rec.prior(|| drifts(db).on(&database))?;
        let mut items = Vec::new();
        for d in &planned {
            // setval is not transactional; the condition makes it idempotent.
            let moved = db
                .query(
                    "advance a sequence",
                    &format!(
                        "SELECT setval($1::text::regclass, $2::bigint, true) FROM {} AS s, pg_sequence AS ps
                          WHERE ps.seqrelid = $1::text::regclass
                            AND CASE WHEN s.is_called THEN s.last_value + ps.seqincrement ELSE s.last_value END <= $2::bigint",
                        d.sequence
                    ),
                    &[&d.sequence, &d.max],
                )
                .on(&database)?;
            if !moved.is_empty() {
                items.push(format!("{}: {} → {}", d.sequence, d.last_value, d.max));
            }
        }
        Ok(Effect {
            summary: if planned.is_empty() {
                format!("no sequence behind its column on {database}")
            } else {
                format!(
                    "advanced {} of {} drifting sequence(s) on {database}",
                    items.len(),
                    planned.len()
                )
            },
            count: items.len() as u64,
            items,
            detail: serde_json::to_value(&planned).expect("drifts serialize"),
        })
    }
}

/// One step on the survivor, unless `[validation] sequences = false`.
fn plan(p: &Playbook, ctx: &PlanCtx) -> Vec<PlannedStep> {
    let keys: Keys = p.part(Some("validation"));
    if !keys.sequences.unwrap_or(true) {
        return Vec::new();
    }
    let survivor = ctx.survivor;
    vec![step(
        format!("sequences@{survivor}"),
        Phase::Validate,
        format!("sequences ahead of their columns on {survivor}"),
        super::Action::Sequences(Sequences {
            database: survivor.into(),
        }),
    )]
}

fn no_time(_: &Playbook) -> bool {
    false
}

pub const KIND: StepKind = StepKind {
    online: super::no_online,
    meaning: |_| {},
    steps: plan,
    needs_time: no_time,
    notes: super::no_notes,
    needs: super::no_needs,
    queries: super::no_queries,
    keys: &[(Some("validation"), Keys::FIELDS)],
};

#[cfg(test)]
mod tests {
    use super::*;

    const PLAYBOOK: &str = r#"[playbook]
name = "t"
way-back = "cutover"

[databases.current]
conninfo = "host=a"

[databases.restored]
conninfo = "host=b"

[recovery-target]
lsn = "0/5000120"

[gates]
reopen-order = ["api"]

[[gates.system-gate]]
name = "api"
databases = ["current", "restored"]

[validation]
amcheck = true
"#;

    fn planned(extra: &str) -> Result<Vec<String>, crate::diag::Diagnostics> {
        let text = format!("{PLAYBOOK}{extra}");
        let p = Playbook::parse(std::path::Path::new("t.toml"), &text)?;
        Ok(crate::reentry::plan::steps(&p, None)
            .into_iter()
            .map(|s| s.id)
            .collect())
    }

    #[test]
    fn its_key_in_validation_turns_it_on_and_off() {
        let ids = planned("").unwrap();
        assert!(ids.contains(&"sequences@restored".to_owned()), "{ids:?}");
        assert!(ids.contains(&"amcheck@restored".to_owned()), "{ids:?}");
        let ids = planned("sequences = false\n").unwrap();
        assert!(!ids.iter().any(|i| i.starts_with("sequences")), "{ids:?}");
        assert!(ids.contains(&"amcheck@restored".to_owned()), "{ids:?}");
    }

    #[test]
    fn its_key_is_checked_where_it_is_written() {
        let d = planned("sequences = \"no\"\n").unwrap_err();
        let item = &d.items[0];
        let (line, _) = d.line_col(item.span.clone().unwrap().start);
        assert_eq!(line, PLAYBOOK.lines().count() + 1, "{}", item.message);
        assert!(item.message.contains("sequences"), "{}", item.message);
        assert!(item.message.contains("true or false"), "{}", item.message);
    }
}
