//! The schemas reentry keeps on an application's database: `reentry`
//! (orphan events, idempotency keys to review, tombstones recorded) and
//! `reentry_repair` (staging tables, the repair audit log).
//!
//! reentry usually connects as a role with more rights than the
//! application's. A schema or table of these names that another role made
//! could carry a trigger, a rule or a default that runs with those rights
//! on reentry's first insert. So reentry uses a schema only when the role
//! it connects as owns it and every relation in it; no relation in it has
//! a trigger, a rule, row security, or a default, constraint or index
//! calling a function outside pg_catalog; and no other role holds a
//! privilege that lets it add code there or change what reentry reads
//! back: TRIGGER, INSERT, UPDATE, DELETE or TRUNCATE on a relation, CREATE
//! on the schema, membership of the owning role (which brings the owner's
//! rights). Superusers can do all of it anyway. Else it refuses,
//! naming what it found, and changes nothing. What it creates, it creates
//! itself, without `IF NOT EXISTS` adopting someone else's, and takes
//! back at once every privilege that default privileges
//! (`ALTER DEFAULT PRIVILEGES ... GRANT ALL ON TABLES TO app`) handed out
//! in the same transaction, before anyone else can see the new object.
//!
//! The check is made again in each transaction that writes to the schema,
//! after locking the tables written (`guard`): CREATE TRIGGER takes a
//! SHARE ROW EXCLUSIVE lock, which conflicts with the ROW EXCLUSIVE lock
//! taken here, so no trigger can be added between the check and the
//! commit, and one committed before the lock was granted is seen.

use crate::pg::conn::{Db, PgError};
use crate::reentry::steps::{OnDatabase, StepError};

/// The schema of orphan events and idempotency keys.
pub const SCHEMA: &str = "reentry";

/// A grantee as `aclexplode` gives it (0 is PUBLIC), as SQL text.
const GRANTEE: &str =
    "CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee)::text END";

/// What is wrong with `schema` on this database for reentry to use it;
/// `None` when it is missing (reentry creates it) or reentry's own.
pub fn foreign(db: &mut Db, schema: &str) -> Result<Option<String>, PgError> {
    let Some(row) = db
        .query(
            "look up reentry's schema",
            &format!(
                "SELECT pg_get_userbyid(n.nspowner)::text, current_user::text, n.oid,
                        coalesce((SELECT string_agg(DISTINCT {GRANTEE}, ', ')
                                    FROM aclexplode(n.nspacl) a
                                   WHERE a.grantee <> n.nspowner AND a.privilege_type = 'CREATE'), ''),
                        coalesce((SELECT string_agg(r.rolname::text, ', ' ORDER BY r.rolname)
                                    FROM pg_roles r
                                   WHERE r.oid <> n.nspowner AND NOT r.rolsuper
                                     AND pg_has_role(r.oid, n.nspowner, 'MEMBER')), '')
                   FROM pg_namespace n WHERE n.nspname = $1"
            ),
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
    let creators: String = row.get(3);
    let members: String = row.get(4);
    let mut problems = Vec::new();
    // A member of the owning role may do what its owner may: add a trigger.
    // (Superusers may anyway: they are not counted.)
    if !members.is_empty() {
        problems.push(format!(
            "role(s) {members} are members of {me}, which owns it, and may do what {me} may (REVOKE {me} FROM ...)"
        ));
    }
    if !creators.is_empty() {
        problems.push(format!(
            "CREATE on schema {schema} is granted to {creators} (REVOKE CREATE ON SCHEMA {schema} FROM ...)"
        ));
    }
    // Per relation: its owner; its triggers; who else may change it or add
    // code to it; rules and row security (their expressions run on reentry's
    // reads and writes); functions and operators outside pg_catalog in its
    // defaults, constraints and indexes (they run on reentry's inserts); in
    // `reentry`, whose columns reentry typed itself, types outside
    // pg_catalog (a domain's CHECK runs a function). A repair's staging
    // table takes the application's column types as they are.
    for r in db.query(
        "look over reentry's schema",
        &format!(
            "SELECT c.relname::text, pg_get_userbyid(c.relowner)::text,
                    coalesce((SELECT string_agg(g.tgname::text, ', ' ORDER BY g.tgname)
                                FROM pg_trigger g WHERE g.tgrelid = c.oid AND NOT g.tgisinternal), ''),
                    coalesce((SELECT string_agg(x, ', ' ORDER BY x)
                                FROM (SELECT string_agg(a.privilege_type, ', ' ORDER BY a.privilege_type) || ' to ' || {GRANTEE} AS x
                                        FROM aclexplode(c.relacl) a
                                       WHERE a.grantee <> c.relowner
                                         AND a.privilege_type IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'TRIGGER')
                                       GROUP BY a.grantee) g), ''),
                    coalesce((SELECT string_agg(w.rulename::text, ', ' ORDER BY w.rulename)
                                FROM pg_rewrite w WHERE w.ev_class = c.oid AND c.relkind IN ('r', 'p')), ''),
                    c.relrowsecurity OR EXISTS (SELECT FROM pg_policy p WHERE p.polrelid = c.oid),
                    coalesce((SELECT string_agg(DISTINCT pg_describe_object(d.refclassid, d.refobjid, 0), ', ')
                                FROM pg_depend d
                               WHERE ((d.classid = 'pg_attrdef'::regclass
                                       AND d.objid IN (SELECT f.oid FROM pg_attrdef f WHERE f.adrelid = c.oid))
                                   OR (d.classid = 'pg_constraint'::regclass
                                       AND d.objid IN (SELECT k.oid FROM pg_constraint k WHERE k.conrelid = c.oid))
                                   OR (d.classid = 'pg_class'::regclass
                                       AND d.objid IN (SELECT i.indexrelid FROM pg_index i WHERE i.indrelid = c.oid)))
                                 AND ((d.refclassid = 'pg_proc'::regclass
                                       AND NOT EXISTS (SELECT FROM pg_proc f WHERE f.oid = d.refobjid
                                                          AND f.pronamespace = 'pg_catalog'::regnamespace))
                                   OR (d.refclassid = 'pg_operator'::regclass
                                       AND NOT EXISTS (SELECT FROM pg_operator o WHERE o.oid = d.refobjid
                                                          AND o.oprnamespace = 'pg_catalog'::regnamespace)))), ''),
                    coalesce((SELECT string_agg(DISTINCT format_type(t.oid, NULL), ', ')
                                FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
                               WHERE $2 AND a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                                 AND t.typnamespace <> 'pg_catalog'::regnamespace), '')
               FROM pg_class c
              WHERE c.relnamespace = $1 AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
              ORDER BY 1"
        ),
        &[&oid, &(schema == SCHEMA)],
    )? {
        let (name, owner, triggers, grants): (String, String, String, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        let (rules, secured, code, types): (String, bool, String, String) =
            (r.get(4), r.get(5), r.get(6), r.get(7));
        let rel = format!("{schema}.{name}");
        if owner != me {
            problems.push(format!("{rel} is owned by role {owner}"));
        }
        if !triggers.is_empty() {
            problems.push(format!("{rel} has trigger(s) {triggers}"));
        }
        if !grants.is_empty() {
            problems.push(format!(
                "{rel} grants {grants} (REVOKE INSERT, UPDATE, DELETE, TRUNCATE, TRIGGER ON {rel} FROM ...)"
            ));
        }
        if !rules.is_empty() {
            problems.push(format!("{rel} has rule(s) {rules}"));
        }
        if secured {
            problems.push(format!("{rel} has row security or policies"));
        }
        if !code.is_empty() {
            problems.push(format!(
                "{rel}'s defaults, constraints or indexes call {code}, outside pg_catalog"
            ));
        }
        if !types.is_empty() {
            problems.push(format!("{rel} has columns of type(s) {types}, outside pg_catalog"));
        }
    }
    Ok((!problems.is_empty()).then(|| problems.join("; ")))
}

/// The refusal, said once for the plan and the step alike.
pub fn refusal(database: &str, schema: &str, why: &str) -> String {
    format!(
        "databases.{database}: reentry will not use schema {schema}: {why}. What another role made or may add there would run with reentry's rights: look at it, then drop it (reentry makes its own) or give it to the role reentry connects as, without triggers, rules, policies or code of another's, and with no other role holding more than SELECT on it or CREATE on the schema, or membership of the owning role"
    )
}

pub fn refuse_foreign(db: &mut Db, database: &str, schema: &str) -> Result<(), StepError> {
    match foreign(db, schema).on(database)? {
        None => Ok(()),
        Some(why) => Err(StepError::Refused(refusal(database, schema, &why))),
    }
}

/// Makes `schema` when missing, with no privilege for any other role;
/// refuses one reentry does not own (see the module's comment). Run it in
/// the transaction that then creates and writes the schema's tables.
pub fn ensure(db: &mut Db, database: &str, schema: &str) -> Result<(), StepError> {
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
        // Default privileges for schemas may have granted some.
        take_back(
            db,
            database,
            "SELECT DISTINCT format('REVOKE ALL ON SCHEMA %I FROM %s CASCADE', n.nspname, {REVOKEE})
               FROM pg_namespace n, aclexplode(n.nspacl) a
              WHERE n.nspname = $1 AND a.grantee <> n.nspowner",
            &[&schema],
        )?;
        return Ok(());
    }
    refuse_foreign(db, database, schema)
}

/// Runs `ddl` (reentry's `CREATE TABLE IF NOT EXISTS ...` in `schema`,
/// checked with `ensure` first), then takes back from every other role and
/// PUBLIC what default privileges granted on each relation it created. In
/// the transaction that made them: no other session has seen them yet.
pub fn create(db: &mut Db, database: &str, schema: &str, ddl: &str) -> Result<(), StepError> {
    let relations = |db: &mut Db| -> Result<Vec<tokio_postgres::types::Oid>, StepError> {
        Ok(db
            .query(
                "list reentry's tables",
                "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1",
                &[&schema],
            )
            .on(database)?
            .iter()
            .map(|r| r.get(0))
            .collect())
    };
    let before = relations(db)?;
    db.batch("create reentry's tables", ddl).on(database)?;
    take_back(
        db,
        database,
        "SELECT DISTINCT format('REVOKE ALL ON TABLE %s FROM %s CASCADE', c.oid::regclass, {REVOKEE})
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, aclexplode(c.relacl) a
          WHERE n.nspname = $1 AND c.oid <> ALL($2) AND a.grantee <> c.relowner
            AND c.relkind IN ('r', 'p', 'v', 'm', 'f')",
        &[&schema, &before],
    )?;
    Ok(())
}

/// Runs `revokes`, a query giving one `REVOKE` statement a row (`{REVOKEE}`
/// in it stands for the grantee, quoted, or PUBLIC), then those statements.
fn take_back(
    db: &mut Db,
    database: &str,
    revokes: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<(), StepError> {
    const REVOKEE: &str =
        "CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END";
    let statements: Vec<String> = db
        .query(
            "look up the grants on reentry's new objects",
            &revokes.replace("{REVOKEE}", REVOKEE),
            params,
        )
        .on(database)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !statements.is_empty() {
        db.batch(
            "take back the grants on reentry's new objects",
            &statements.join("; "),
        )
        .on(database)?;
    }
    Ok(())
}

/// First in every transaction that writes to reentry's `tables` (names
/// qualified with `schema`): locks them in ROW EXCLUSIVE mode, which
/// conflicts with the SHARE ROW EXCLUSIVE lock CREATE TRIGGER takes, so
/// none can be added until this transaction ends, and checks the schema
/// again under the lock. The lock is the one the writes take anyway.
pub fn guard(db: &mut Db, database: &str, schema: &str, tables: &[&str]) -> Result<(), StepError> {
    // Bounded: a session holding a conflicting lock on reentry's own table
    // stops the step with PostgreSQL's error instead of hanging it. The
    // transaction's own lock_timeout is put back for what follows.
    let before: String = db
        .query_one(
            "read lock_timeout",
            "SELECT current_setting('lock_timeout')",
            &[],
        )
        .on(database)?
        .get(0);
    db.batch(
        "lock reentry's tables against new triggers",
        &format!(
            "SET LOCAL lock_timeout = '10s'; LOCK TABLE {} IN ROW EXCLUSIVE MODE",
            tables.join(", ")
        ),
    )
    .on(database)?;
    db.execute(
        "put lock_timeout back",
        "SELECT set_config('lock_timeout', $1, true)",
        &[&before],
    )
    .on(database)?;
    refuse_foreign(db, database, schema)
}

/// The `reentry` schema and its tables (`sql/reentry_staging.sql`):
/// checked, created where missing, and `tables` of them locked and checked
/// again (`guard`). Run it first in the transaction that writes them.
pub fn staging_tables(db: &mut Db, database: &str, tables: &[&str]) -> Result<(), StepError> {
    ensure(db, database, SCHEMA)?;
    create(
        db,
        database,
        SCHEMA,
        include_str!("../../sql/reentry_staging.sql"),
    )?;
    guard(db, database, SCHEMA, tables)
}

/// The names an earlier release of reentry staged under, before its
/// tables moved into schemas of their own (`git log -S reentry_orphan_event`):
/// unqualified tables, made in the first schema on the role's path
/// (usually public), and repair staging tables in `reentry_repair` with the
/// bookkeeping columns `_run_id`, `_status`, ... (now `reentry$...`).
const LEGACY: [(&str, &str); 3] = [
    (
        "reentry_orphan_event",
        "orphan events staged by an earlier reentry, whose compensating events it may have sent in part: this build stages in reentry.orphan_event, so it would stage them again and send their compensations again",
    ),
    (
        "reentry_idempotency_review",
        "idempotency keys an earlier reentry staged for review: this build keeps them in reentry.idempotency_review and would not see these",
    ),
    (
        "reentry_idempotency_tombstone",
        "the tombstones an earlier reentry recorded: this build records them in reentry.idempotency_tombstone and would not see these",
    ),
];

/// Tables with rows that an earlier release of reentry staged under names
/// this build no longer reads, each with what it holds and what to do;
/// empty when there are none. A table under row security that reentry
/// does not own is not read (its policies would run with reentry's
/// rights), and counts as holding rows.
pub fn legacy(db: &mut Db) -> Result<Vec<String>, PgError> {
    let names: Vec<&str> = LEGACY.iter().map(|(n, _)| *n).collect();
    let found = db.query(
        "look for the staging tables of an earlier reentry",
        "SELECT c.oid::regclass::text, c.relname::text,
                c.relrowsecurity AND pg_get_userbyid(c.relowner) <> current_user
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE c.relkind IN ('r', 'p')
            AND n.nspname NOT IN ('pg_catalog', 'information_schema')
            AND (c.relname = ANY($1)
                 OR (n.nspname = 'reentry_repair'
                     AND EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = '_run_id' AND NOT a.attisdropped)
                     AND NOT EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'reentry$run_id' AND NOT a.attisdropped)))
          ORDER BY 1",
        &[&names],
    )?;
    let mut out = Vec::new();
    for r in found {
        let (table, name, unread): (String, String, bool) = (r.get(0), r.get(1), r.get(2));
        let rows = unread
            || db
                .query_one(
                    "look for rows in an earlier reentry's staging table",
                    &format!("SELECT EXISTS (SELECT FROM {table})"),
                    &[],
                )?
                .get::<_, bool>(0);
        if !rows {
            continue;
        }
        let what = LEGACY
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, what)| *what)
            .unwrap_or(
                "rows an earlier reentry staged for a repair (bookkeeping columns _run_id, _status, ...; those with _status 'staged' were never applied): this build stages under other names and would not see them",
            );
        out.push(format!(
            "{table} holds {what}. Finish that run with the reentry build that started it (apply --resume in its run directory), or, once what it did is checked (for orphan events: which compensations reached the topic, header reentry-compensates), rename it out of reentry's way (ALTER TABLE {table} RENAME TO <another name>) or drop it; then plan again"
        ));
    }
    Ok(out)
}
