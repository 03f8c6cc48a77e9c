//! The schemas reentry keeps on an application's database: `reentry`
//! (orphan events, idempotency keys to review, tombstones recorded) and
//! `reentry_repair` (staging tables, the repair audit log).
//!
//! reentry usually connects as a role with more rights than the
//! application's. A schema or table of these names that another role made
//! could carry a trigger, a rule or a default that runs with those rights
//! on reentry's first insert. So reentry uses a schema only when the role
//! it connects as owns it and every relation in it, and no relation in it
//! has a trigger (the TRIGGER privilege lets another role add one); else
//! it refuses, naming what it found, and changes nothing. What it creates,
//! it creates itself, without `IF NOT EXISTS` adopting someone else's.

use crate::pg::conn::{Db, PgError};

/// The schema of orphan events and idempotency keys.
pub const SCHEMA: &str = "reentry";

/// What is wrong with `schema` on this database for reentry to use it;
/// `None` when it is missing (reentry creates it) or reentry's own.
pub fn foreign(db: &mut Db, schema: &str) -> Result<Option<String>, PgError> {
    let Some(row) = db
        .query(
            "look up reentry's schema",
            "SELECT pg_get_userbyid(n.nspowner)::text, current_user::text, n.oid
               FROM pg_namespace n WHERE n.nspname = $1",
            &[&schema],
        )?
        .into_iter()
        .next()
    else {
        return Ok(None);
    };
    let (owner, me): (String, String) = (row.get(0), row.get(1));
    if owner != me {
        return Ok(Some(format!(
            "schema {schema} is owned by role {owner}, not by {me} that reentry connects as"
        )));
    }
    let oid: tokio_postgres::types::Oid = row.get(2);
    let mut problems = Vec::new();
    for r in db.query(
        "look over reentry's schema",
        "SELECT c.relname::text, pg_get_userbyid(c.relowner)::text,
                coalesce((SELECT string_agg(g.tgname::text, ', ' ORDER BY g.tgname)
                            FROM pg_trigger g WHERE g.tgrelid = c.oid AND NOT g.tgisinternal), '')
           FROM pg_class c
          WHERE c.relnamespace = $1 AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
          ORDER BY 1",
        &[&oid],
    )? {
        let (name, owner, triggers): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        if owner != me {
            problems.push(format!("{schema}.{name} is owned by role {owner}"));
        }
        if !triggers.is_empty() {
            problems.push(format!("{schema}.{name} has trigger(s) {triggers}"));
        }
    }
    Ok((!problems.is_empty()).then(|| problems.join("; ")))
}

/// The refusal, said once for the plan and the step alike.
pub fn refusal(database: &str, schema: &str, why: &str) -> String {
    format!(
        "databases.{database}: reentry will not use schema {schema}: {why}. What another role made there would run with reentry's rights: look at it, then drop it (reentry makes its own) or give it to the role reentry connects as, without triggers"
    )
}

/// Makes `schema` when missing; refuses one reentry does not own (see
/// the module's comment). Run it in the transaction that then creates and
/// writes the schema's tables.
pub fn ensure(
    db: &mut Db,
    database: &str,
    schema: &str,
) -> Result<(), crate::reentry::steps::StepError> {
    use crate::reentry::steps::{OnDatabase, StepError};
    let exists = !db
        .query(
            "look up reentry's schema",
            "SELECT FROM pg_namespace WHERE nspname = $1",
            &[&schema],
        )
        .on(database)?
        .is_empty();
    if !exists {
        db.batch(
            "create reentry's schema",
            &format!(
                "CREATE SCHEMA {}",
                crate::reentry::steps::rows::diff::quote_ident(schema)
            ),
        )
        .on(database)?;
        return Ok(());
    }
    match foreign(db, schema).on(database)? {
        None => Ok(()),
        Some(why) => Err(StepError::Refused(refusal(database, schema, &why))),
    }
}

/// The `reentry` schema and its tables (`sql/reentry_staging.sql`), in a
/// transaction of their own: checked, and created where missing.
pub fn staging_tables(db: &mut Db, database: &str) -> Result<(), crate::reentry::steps::StepError> {
    use crate::reentry::steps::OnDatabase;
    db.transaction("BEGIN", |db| {
        ensure(db, database, SCHEMA)?;
        db.batch(
            "create the staging tables",
            include_str!("../../sql/reentry_staging.sql"),
        )
        .on(database)
    })
}
