//! `reentry playbook check`, its online stage: connect to each database the
//! playbook names and confirm that every table and column it names exists
//! there, each missing one reported at the playbook line that named it.

use std::collections::{BTreeMap, BTreeSet};

use crate::diag::Diagnostic;
use crate::pg::conn::{Db, PgError, SqlState};
use crate::reentry::playbook::{Playbook, Seg};
use crate::reentry::steps::KINDS;

/// `quote_ident` for each part of a possibly schema-qualified name: a
/// playbook's identifiers are always quoted, never spliced in raw.
pub fn quote_qualified(name: &str) -> String {
    name.split('.')
        .map(|p| format!("\"{}\"", p.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(".")
}

/// A column named by a playbook, with its type: lookups compare values of
/// that type, so the column's index serves them.
pub struct Column {
    table: String,
    column: String,
    pub ty: String,
    /// Whether the column admits NULL (or is not found).
    pub nullable: bool,
}

impl Column {
    pub fn of(db: &mut Db, table: &str, column: &str) -> Result<Column, PgError> {
        let table = db.table(table)?;
        let row = db.query_one(
            "read a column's type",
            "SELECT coalesce(a.ty, 'text'), coalesce(a.nullable, true)
               FROM (SELECT) AS one
               LEFT JOIN (SELECT format_type(atttypid, atttypmod) AS ty, NOT attnotnull AS nullable
                            FROM pg_attribute
                           WHERE attrelid = to_regclass($1) AND attname = $2 AND NOT attisdropped) AS a ON true",
            &[&table, &column],
        )?;
        Ok(Column {
            table,
            column: quote_qualified(column),
            ty: row.get(0),
            nullable: row.get(1),
        })
    }

    /// Which of `values` (as text) the column holds. A value that is not
    /// of the column's type cannot be in it; such a batch is compared as
    /// text instead.
    pub fn present(&self, db: &mut Db, values: &[&str]) -> Result<BTreeSet<String>, PgError> {
        let (t, c, ty) = (&self.table, &self.column, &self.ty);
        let typed = format!("SELECT {c}::text FROM {t} WHERE {c} = ANY($1::text[]::{ty}[])");
        let rows = match db.query("look values up", &typed, &[&values]) {
            Err(e) if e.code() == Some(&SqlState::INVALID_TEXT_REPRESENTATION) => db.query(
                "look values up",
                &format!("SELECT {c}::text FROM {t} WHERE {c}::text = ANY($1)"),
                &[&values],
            )?,
            r => r?,
        };
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }
}

/// One thing to look for: a table, and columns of it, and where the
/// playbook names it.
pub struct Need<'a> {
    pub database: &'a str,
    pub table: String,
    pub columns: Vec<String>,
    pub path: Vec<Seg<'a>>,
    pub what: String,
}

/// A query the playbook holds, prepared (never run) on its database.
pub struct Prepared<'a> {
    pub path: Vec<Seg<'a>>,
    pub database: &'a str,
    pub sql: std::borrow::Cow<'a, str>,
}

/// Tables and columns the playbook names: each kind's.
fn needs(p: &Playbook) -> Vec<Need<'_>> {
    KINDS.iter().flat_map(|k| (k.needs)(p)).collect()
}

/// Connects to every database and looks for every table and column, and
/// prepares (without running) every query the playbook holds.
pub fn check_online(p: &Playbook) -> Vec<Diagnostic> {
    let mut errors = Vec::new();
    let mut dbs: BTreeMap<&str, Db> = BTreeMap::new();
    for (name, d) in &p.databases {
        match Db::connect(Some(d.conninfo.expose())).and_then(|mut db| {
            db.pin_search_path()?;
            Ok(db)
        }) {
            Ok(db) => {
                dbs.insert(name, db);
            }
            Err(e) => errors.push(p.at(
                &[Seg::Key("databases"), Seg::Key(name), Seg::Key("conninfo")],
                format!("databases.{name}: {e}"),
            )),
        }
    }
    // (what, database) of each need that failed: later checks of the same
    // thing would only repeat the error.
    let mut broken: BTreeSet<(String, String)> = BTreeSet::new();
    for need in needs(p) {
        let Some(db) = dbs.get_mut(need.database) else {
            continue;
        };
        let before = errors.len();
        let rows = db.table(&need.table).and_then(|t| {
            db.query(
                "look up a table",
                "SELECT a.attname::text FROM pg_attribute a
                  WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
                &[&t],
            )
        });
        match rows {
            Err(e) => errors.push(p.at(&need.path, format!("{}: {e}", need.what))),
            Ok(rows) if rows.is_empty() => errors.push(p.at(
                &need.path,
                format!(
                    "{}: table {} does not exist in databases.{}",
                    need.what, need.table, need.database
                ),
            )),
            Ok(rows) => {
                let present: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
                let missing: Vec<&String> = need
                    .columns
                    .iter()
                    .filter(|c| !present.contains(c))
                    .collect();
                if !missing.is_empty() {
                    errors.push(p.at(
                        &need.path,
                        format!(
                            "{}: table {} in databases.{} has no column {}",
                            need.what,
                            need.table,
                            need.database,
                            missing.iter().map(|c| c.as_str()).collect::<Vec<_>>().join(", ")
                        ),
                    ));
                }
            }
        }
        if errors.len() > before {
            broken.insert((need.what.clone(), need.database.to_owned()));
        }
    }
    // What only a kind knows to look for once its tables are there.
    for k in KINDS {
        errors.extend((k.online)(p, &mut dbs, &broken));
    }
    let queries: Vec<Prepared> = KINDS.iter().flat_map(|k| (k.queries)(p)).collect();
    for Prepared {
        path,
        database,
        sql,
    } in queries
    {
        if let Some(db) = dbs.get_mut(database) {
            // As the application's statements: under its search path.
            if let Err(e) = db.as_application(|db| db.prepare_query("prepare the query", &sql)) {
                errors.push(p.at(
                    &path,
                    format!("this query does not run on databases.{database}: {e}"),
                ));
            }
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted_part_by_part() {
        assert_eq!(quote_qualified("app.outbox"), "\"app\".\"outbox\"");
        assert_eq!(quote_qualified("Case Table"), "\"Case Table\"");
        assert_eq!(
            quote_qualified("x\"; DROP TABLE t; --"),
            "\"x\"\"; DROP TABLE t; --\""
        );
    }
}
