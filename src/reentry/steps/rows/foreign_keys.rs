//! `rows-foreign-keys:<table>`: after a repair that ran with
//! `triggers = "disable"`. That sets `session_replication_role = replica`,
//! which also stops PostgreSQL's foreign-key checks (they are triggers):
//! a repaired row may point at a parent the target lacks, and a deleted
//! one may leave children behind, with no error. This step counts, for
//! every validated foreign key the table takes part in (as child or as
//! parent), the child rows whose parent is missing, with the key's own
//! equality operators; any such row fails the check, with the gates still
//! closed.

use serde::{Deserialize, Serialize};

use super::diff::quote_ident;
use crate::reentry::steps::{Effect, Env, Nature, OnDatabase, Recorder, Step, StepError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ForeignKeys {
    pub table: String,
    pub database: String,
}

/// A foreign key as the anti-join needs it.
struct Fk {
    name: String,
    child: String,
    parent: String,
    /// (child column, parent column, equality operator as SQL).
    pairs: Vec<(String, String, String)>,
}

fn foreign_keys(
    db: &mut crate::pg::conn::Db,
    table: &str,
) -> Result<Vec<Fk>, crate::pg::conn::PgError> {
    let rows = db.query(
        "read the table's foreign keys",
        "SELECT c.conname::text, c.conrelid::regclass::text, c.confrelid::regclass::text,
                k.i, ca.attname::text, pa.attname::text,
                quote_ident(n.nspname) || '.' || o.oprname
           FROM pg_constraint c
          CROSS JOIN LATERAL unnest(c.conkey, c.confkey, c.conpfeqop) WITH ORDINALITY AS k(ck, pk, op, i)
           JOIN pg_attribute ca ON ca.attrelid = c.conrelid AND ca.attnum = k.ck
           JOIN pg_attribute pa ON pa.attrelid = c.confrelid AND pa.attnum = k.pk
           JOIN pg_operator o ON o.oid = k.op
           JOIN pg_namespace n ON n.oid = o.oprnamespace
          WHERE c.contype = 'f' AND c.convalidated
            AND (c.conrelid = to_regclass($1::text) OR c.confrelid = to_regclass($1::text))
          ORDER BY c.oid, k.i",
        &[&table],
    )?;
    let mut out: Vec<Fk> = Vec::new();
    for r in rows {
        let name: String = r.get(0);
        let pair = (r.get(4), r.get(5), r.get(6));
        match out.last_mut() {
            Some(f) if f.name == name && r.get::<_, i64>(3) > 1 => f.pairs.push(pair),
            _ => out.push(Fk {
                name,
                child: r.get(1),
                parent: r.get(2),
                pairs: vec![pair],
            }),
        }
    }
    Ok(out)
}

impl Step for ForeignKeys {
    fn nature(&self) -> Nature {
        Nature::Reads
    }

    fn preview(&self, _env: &mut Env) -> Result<Effect, StepError> {
        Ok(Effect::said(format!(
            "after the repair, count the rows of `{}`'s foreign keys on {} whose parent is missing: its repair runs with triggers disabled, and so with foreign keys unchecked",
            self.table, self.database
        )))
    }

    fn apply(&self, env: &mut Env, _rec: &mut Recorder) -> Result<Effect, StepError> {
        let database = self.database.clone();
        let db = env.db(&database)?;
        let table = db.table(&self.table).on(&database)?;
        let fks = foreign_keys(db, &table).on(&database)?;
        let mut findings = Vec::new();
        for fk in &fks {
            let not_null = fk
                .pairs
                .iter()
                .map(|(c, _, _)| format!("c.{} IS NOT NULL", quote_ident(c)))
                .collect::<Vec<_>>()
                .join(" AND ");
            let matches = fk
                .pairs
                .iter()
                .map(|(c, p, op)| {
                    format!("p.{} OPERATOR({op}) c.{}", quote_ident(p), quote_ident(c))
                })
                .collect::<Vec<_>>()
                .join(" AND ");
            let n: i64 = db
                .query_one(
                    "count rows whose parent is missing",
                    &format!(
                        "SELECT count(*) FROM {} AS c WHERE {not_null}
                            AND NOT EXISTS (SELECT FROM {} AS p WHERE {matches})",
                        fk.child, fk.parent
                    ),
                    &[],
                )
                .on(&database)?
                .get(0);
            if n > 0 {
                findings.push(format!(
                    "{n} row(s) of {} break foreign key {} ({}) → {}: their parent is missing",
                    fk.child,
                    quote_ident(&fk.name),
                    fk.pairs
                        .iter()
                        .map(|(c, _, _)| c.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    fk.parent
                ));
            }
        }
        if findings.is_empty() {
            return Ok(Effect::said(format!(
                "`{}` on {database}: its {} foreign key(s) hold",
                self.table,
                fks.len()
            )));
        }
        Err(StepError::Check {
            message: format!(
                "foreign keys broken on databases.{database} after `{}` was repaired with triggers disabled (which disables foreign-key checks): {}. Repair the parents too (list them first), or delete the orphans, then resume",
                self.table,
                findings.join("; ")
            ),
            findings,
        })
    }
}
