//! Gates: the kill switches Java services check. `system_gate` rows,
//! ShedLock rows and Quartz trigger groups are closed on each database
//! before anything else happens, and re-opened at the end to the state the
//! run found, which the close journaled before changing it.
//!
//! Every statement is conditional on the state it changes, so running it
//! again after a crash changes nothing: a row already closed is not touched.
//!
//! Quartz is written to the way Quartz itself writes to its tables: inside
//! its `TRIGGER_ACCESS` row lock (`SELECT … FROM qrtz_locks … FOR UPDATE`),
//! which a clustered scheduler takes before it reads or rewrites a trigger's
//! state. Without it, a trigger Quartz has `ACQUIRED` is written back to
//! `WAITING` by the fire in flight, and escapes the closed gate. The re-open
//! does what Quartz's `resumeTriggerGroup` does, except for what the
//! application had paused itself before the run.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::validate::{Query, Role};
use super::{
    duration_ms, Effect, Env, GateEvidence, GateRow, Nature, OnDatabase, PlanCtx, Recorder, Step,
    StepError, StepKind,
};
use crate::diag::Diagnostic;
use crate::pg::conn::{Db, PgError};
use crate::reentry::check::quote_qualified;
use crate::reentry::check::{Need, Prepared};
use crate::reentry::plan::{step, PlannedStep};
use crate::reentry::playbook::Playbook;
use crate::reentry::playbook::{section, Check};
use crate::reentry::playbook::{Meaning, Seg};
use crate::reentry::schema::{opt, req, Field, Kind};
use crate::reentry::steps::Phase;

// ---- Its playbook section: one typed model; its keys and checks come from it.

section! {
    pub struct SystemGate {
        pub name: String => req("name", Kind::Str),
        pub databases: Vec<String> => req("databases", Kind::Strs),
        pub table: Option<String> => opt("table", Kind::Str),
        pub health_check: Option<Check> => opt("health-check", Kind::Table(Check::FIELDS)),
    }
}

section! {
    pub struct ShedLock {
        pub name: String => req("name", Kind::Str),
        pub databases: Vec<String> => req("databases", Kind::Strs),
        pub table: Option<String> => opt("table", Kind::Str),
        pub locks: Option<Vec<String>> => opt("locks", Kind::Strs),
        pub health_check: Option<Check> => opt("health-check", Kind::Table(Check::FIELDS)),
    }
}

section! {
    pub struct Quartz {
        pub name: String => req("name", Kind::Str),
        pub databases: Vec<String> => req("databases", Kind::Strs),
        pub table_prefix: Option<String> => opt("table-prefix", Kind::Str),
        pub scheduler: String => req("scheduler", Kind::Str),
        pub groups: Option<Vec<String>> => opt("groups", Kind::Strs),
        pub misfire_threshold: Option<String> => opt("misfire-threshold", Kind::Duration),
        pub health_check: Option<Check> => opt("health-check", Kind::Table(Check::FIELDS)),
    }
}

section! {
    pub struct Gates {
        pub cache_ttl: Option<String> => opt("cache-ttl", Kind::Duration),
        pub drain_timeout: Option<String> => opt("drain-timeout", Kind::Duration),
        pub probe: Option<Check> => opt("probe", Kind::Table(Check::FIELDS)),
        pub reopen_order: Vec<String> => req("reopen-order", Kind::Strs),
        #[serde(default)]
        pub system_gate: Vec<SystemGate> => opt("system-gate", Kind::Tables(SystemGate::FIELDS)),
        #[serde(default)]
        pub shedlock: Vec<ShedLock> => opt("shedlock", Kind::Tables(ShedLock::FIELDS)),
        #[serde(default)]
        pub quartz: Vec<Quartz> => opt("quartz", Kind::Tables(Quartz::FIELDS)),
    }
}

/// `lock_until` of a frozen ShedLock row: far enough that no job takes it.
pub const FROZEN_UNTIL: &str = "2999-01-01 00:00:00+00";

/// Quartz's marker row in `PAUSED_TRIGGER_GRPS` after `pauseAll`: a trigger
/// stored in a new group while it is there is stored paused.
pub const QUARTZ_ALL_GROUPS: &str = "_$_ALL_GROUPS_PAUSED_$_";

/// Quartz's own default `org.quartz.jobStore.misfireThreshold`.
pub const QUARTZ_MISFIRE_MS: u64 = 60_000;

/// `Scheduler.DEFAULT_RECOVERY_GROUP`: the one group in which Quartz files
/// the trigger that re-runs a `requests_recovery` job of a failed
/// instance, whatever the job's own group.
pub const QUARTZ_RECOVERY_GROUP: &str = "RECOVERING_JOBS";

/// The grace `JobStoreSupport.calcFailedIfAfter` adds to an instance's
/// check-in interval before it counts the instance failed.
pub const QUARTZ_FAILED_GRACE_MS: i64 = 7_500;

fn default_misfire_ms() -> u64 {
    QUARTZ_MISFIRE_MS
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Gate {
    SystemGate {
        name: String,
        table: String,
    },
    Shedlock {
        name: String,
        table: String,
        locks: Option<Vec<String>>,
    },
    #[serde(rename_all = "kebab-case")]
    Quartz {
        name: String,
        /// As PostgreSQL sees it: Quartz splices the prefix unquoted into
        /// its SQL, so `QRTZ_` names the tables `qrtz_…`.
        table_prefix: String,
        scheduler: String,
        groups: Option<Vec<String>>,
        /// The scheduler's `org.quartz.jobStore.misfireThreshold`.
        #[serde(default = "default_misfire_ms")]
        misfire_threshold_ms: u64,
    },
}

impl Gate {
    pub fn name(&self) -> &str {
        match self {
            Gate::SystemGate { name, .. }
            | Gate::Shedlock { name, .. }
            | Gate::Quartz { name, .. } => name,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Gate::SystemGate { .. } => "system-gate",
            Gate::Shedlock { .. } => "shedlock",
            Gate::Quartz { .. } => "quartz",
        }
    }
}

/// What PostgreSQL makes of an unquoted identifier: ASCII letters folded to
/// lower case. Quartz's DDL and its SQL use its table prefix unquoted.
pub fn fold_unquoted(name: &str) -> String {
    name.to_ascii_lowercase()
}

/// A gate on one database.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateAt {
    pub gate: Gate,
    pub database: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Reopen {
    pub gate: Gate,
    pub database: String,
    /// The close step whose journaled prior state this restores.
    pub close_step: String,
    /// The other Quartz gates of this plan on the same scheduler (database,
    /// table prefix and scheduler name): what they hold while closed, this
    /// re-open leaves paused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shares_scheduler: Vec<Sharer>,
}

/// Another Quartz gate on the scheduler a re-open resumes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Sharer {
    pub gate: Gate,
    pub close_step: String,
    /// `None`: the plan never re-opens it on this database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reopen_step: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct WaitCache {
    pub ttl_seconds: f64,
    /// The close steps the wait counts from.
    pub after: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Closed {
    pub step: String,
    pub at: GateAt,
}

fn default_drain_seconds() -> f64 {
    60.0
}

/// Re-asserts every close after the cache TTL, and waits for what was
/// already running at the close: a ShedLock holder releases its lock when
/// its job finishes (and that release is closed again), a Quartz job fired
/// before the close is still executing. Anything a job or a person
/// re-opened is closed again and named.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Verify {
    pub closed: Vec<Closed>,
    /// How long to wait for running jobs before failing the step.
    #[serde(default = "default_drain_seconds")]
    pub drain_seconds: f64,
    /// T in ms: a Quartz run on the restored copy fired by then is T's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub t_ms: Option<i64>,
    /// The database the way back retires: its gates stay closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired: Option<String>,
}

// ---- What a gate's rows held: the close's prior state, journaled.

/// A row as `to_jsonb` gives it, from a table the application owns: put
/// back column by column with `jsonb_populate_record`.
pub type Row = Map<String, Value>;

/// A ShedLock row: the columns ShedLock's schema has, and any other the
/// table has, kept to be put back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LockRow {
    #[serde(default)]
    pub lock_until: Option<String>,
    #[serde(default)]
    pub locked_at: Option<String>,
    #[serde(default)]
    pub locked_by: Option<String>,
    #[serde(flatten)]
    pub other: Row,
}

impl LockRow {
    fn by(&self) -> &str {
        self.locked_by.as_deref().unwrap_or("nobody")
    }
}

/// A Quartz trigger's row, as the close found it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trigger {
    pub name: String,
    pub group: String,
    pub state: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct QuartzState {
    /// The groups the gate covers, as they were.
    pub groups: Vec<String>,
    /// A gate over every group (Quartz's `pauseAll` marker).
    pub all_groups: bool,
    /// Groups the application had paused itself: they stay paused.
    pub paused_groups: Vec<String>,
    pub triggers: Vec<Trigger>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShedlockState {
    /// By lock name; `None` where the table had no row.
    pub locks: BTreeMap<String, Option<LockRow>>,
}

/// What a gate's rows held. Journaled untagged, as builds before the type
/// wrote it; `fits` says whether it is the state of a given gate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum GateState {
    Quartz(QuartzState),
    Shedlock(ShedlockState),
    /// The system_gate row; `None` when the table has none.
    SystemGate(Option<Row>),
}

impl GateState {
    fn fits(&self, gate: &Gate) -> bool {
        matches!(
            (self, gate),
            (GateState::Quartz(_), Gate::Quartz { .. })
                | (GateState::Shedlock(_), Gate::Shedlock { .. })
                | (GateState::SystemGate(_), Gate::SystemGate { .. })
        )
    }

    /// The ShedLock rows; none for another gate.
    fn locks(&self) -> BTreeMap<String, Option<LockRow>> {
        match self {
            GateState::Shedlock(s) => s.locks.clone(),
            _ => BTreeMap::new(),
        }
    }

    /// `enabled` of a system_gate row; `None` when there is no row.
    fn enabled(&self) -> Option<&Value> {
        match self {
            GateState::SystemGate(Some(row)) => row.get("enabled"),
            _ => None,
        }
    }
}

/// A journaled state of `gate`, refused when it is another gate's.
fn state_of(gate: &Gate, state: GateState, step: &str) -> Result<GateState, StepError> {
    if state.fits(gate) {
        Ok(state)
    } else {
        Err(StepError::State(format!(
            "the prior state {step} journaled is not a {}'s: the journal does not belong to this plan",
            gate.kind()
        )))
    }
}

/// A resumed Quartz trigger past its misfire threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Misfire {
    pub trigger: String,
    pub next_fire_time: String,
    pub missed_by_seconds: f64,
    pub instruction: String,
    /// When Quartz's misfire handler applies the instruction, at the latest.
    pub handled_by: String,
}

/// The verify step's id: the re-open also restores the rows it found.
pub const VERIFY_STEP: &str = "verify:gates";

/// Where the verify step journals a ShedLock row it found taken while the
/// gate closed by `close_step` was closed.
fn found_key(close_step: &str, lock: &str) -> String {
    format!("{VERIFY_STEP}#{close_step}#{lock}")
}

/// The rows the verify step journaled for `close_step`, by lock name.
fn found_by_verify(
    rec: &Recorder,
    close_step: &str,
) -> Result<BTreeMap<String, LockRow>, StepError> {
    rec.priors_under(&found_key(close_step, ""))
}

/// A row as JSON text, for `jsonb_populate_record`.
fn json_text<T: Serialize>(row: &T) -> String {
    serde_json::to_string(row).expect("rows serialize")
}

/// A row from `to_jsonb(row)::text`: always a JSON object, which both
/// `Row` and `LockRow` read.
fn parse_row<T: serde::de::DeserializeOwned>(text: &str) -> T {
    serde_json::from_str(text).expect("to_jsonb of a row is a JSON object")
}

fn has_column(db: &mut Db, table: &str, column: &str) -> Result<bool, PgError> {
    let table = db.table(table)?;
    let row = db.query_one(
        "look up a column",
        "SELECT EXISTS (SELECT FROM pg_attribute WHERE attrelid = to_regclass($1)
                          AND attname = $2 AND attnum > 0 AND NOT attisdropped)",
        &[&table, &column],
    )?;
    Ok(row.get(0))
}

/// Quartz's tables under a (folded) prefix, quoted.
pub struct QuartzTables {
    pub triggers: String,
    pub paused: String,
    pub locks: String,
    pub fired: String,
    pub simple: String,
    pub state: String,
}

impl QuartzTables {
    /// The tables as SQL, each resolved as the application's search path
    /// finds it.
    pub fn new(db: &mut Db, prefix: &str) -> Result<QuartzTables, PgError> {
        let mut t = |name: &str| db.table(&format!("{}{name}", fold_unquoted(prefix)));
        Ok(QuartzTables {
            triggers: t("triggers")?,
            paused: t("paused_trigger_grps")?,
            locks: t("locks")?,
            fired: t("fired_triggers")?,
            simple: t("simple_triggers")?,
            state: t("scheduler_state")?,
        })
    }

    /// The tables a Quartz gate reads and writes, unquoted, with the
    /// columns it uses: for the online checks.
    pub fn needed(prefix: &str) -> Vec<(String, Vec<&'static str>)> {
        let p = fold_unquoted(prefix);
        vec![
            (
                format!("{p}triggers"),
                vec![
                    "sched_name",
                    "trigger_name",
                    "trigger_group",
                    "trigger_state",
                    "job_name",
                    "job_group",
                    "next_fire_time",
                    "misfire_instr",
                    "trigger_type",
                ],
            ),
            (
                format!("{p}paused_trigger_grps"),
                vec!["sched_name", "trigger_group"],
            ),
            (format!("{p}locks"), vec!["sched_name", "lock_name"]),
            (
                format!("{p}fired_triggers"),
                vec![
                    "sched_name",
                    "trigger_name",
                    "trigger_group",
                    "job_name",
                    "job_group",
                    "state",
                    "is_nonconcurrent",
                    "requests_recovery",
                    "instance_name",
                    "fired_time",
                ],
            ),
            (
                format!("{p}scheduler_state"),
                vec![
                    "sched_name",
                    "instance_name",
                    "last_checkin_time",
                    "checkin_interval",
                ],
            ),
        ]
    }
}

/// Takes Quartz's `TRIGGER_ACCESS` row lock for `scheduler`, as Quartz's
/// `StdRowLockSemaphore` does (inserting the row the first time), and holds
/// it to the end of the transaction.
fn lock_quartz(db: &mut Db, t: &QuartzTables, scheduler: &str) -> Result<(), PgError> {
    let select = format!(
        "SELECT lock_name FROM {} WHERE sched_name = $1 AND lock_name = 'TRIGGER_ACCESS' FOR UPDATE",
        t.locks
    );
    let ctx = "take Quartz's TRIGGER_ACCESS lock";
    if db.query(ctx, &select, &[&scheduler])?.is_empty() {
        db.execute(
            "insert Quartz's TRIGGER_ACCESS lock row",
            &format!(
                "INSERT INTO {} (sched_name, lock_name) VALUES ($1, 'TRIGGER_ACCESS') ON CONFLICT DO NOTHING",
                t.locks
            ),
            &[&scheduler],
        )?;
        db.query(ctx, &select, &[&scheduler])?;
    }
    Ok(())
}

/// The trigger groups a Quartz gate covers now: the ones it names, or every
/// group of the scheduler (triggers and paused groups, without Quartz's
/// all-groups marker).
///
/// A gate that names groups covers `RECOVERING_JOBS` too: Quartz re-runs a
/// failed instance's `requests_recovery` job through a new trigger in that
/// group, whatever the job's group, and stores it paused only when the
/// group is paused (a gate over every group has the all-groups marker,
/// which does the same).
fn quartz_groups(
    db: &mut Db,
    t: &QuartzTables,
    scheduler: &str,
    named: &Option<Vec<String>>,
) -> Result<Vec<String>, PgError> {
    if let Some(g) = named {
        let mut g = g.clone();
        if !g.iter().any(|x| x == QUARTZ_RECOVERY_GROUP) {
            g.push(QUARTZ_RECOVERY_GROUP.to_owned());
        }
        return Ok(g);
    }
    Ok(db
        .query(
            "list Quartz trigger groups",
            &format!(
                "SELECT trigger_group::text FROM {tr} WHERE sched_name = $1
                 UNION SELECT trigger_group::text FROM {pg} WHERE sched_name = $1 AND trigger_group <> $2
                 ORDER BY 1",
                tr = t.triggers,
                pg = t.paused
            ),
            &[&scheduler, &QUARTZ_ALL_GROUPS],
        )?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// The state of the rows a gate controls. `lock` takes row locks (and
/// Quartz's own lock): the close that follows in the same transaction
/// changes exactly what was read.
pub fn read_state(db: &mut Db, gate: &Gate, lock: bool) -> Result<GateState, PgError> {
    let for_update = if lock { " FOR UPDATE" } else { "" };
    match gate {
        Gate::SystemGate { name, table } => {
            let t = db.table(table)?;
            let rows = db.query(
                "read a system_gate row",
                &format!(
                    "SELECT to_jsonb(g)::text FROM {t} AS g WHERE g.gate_name = $1{for_update}"
                ),
                &[name],
            )?;
            Ok(GateState::SystemGate(
                rows.first().map(|r| parse_row(&r.get::<_, String>(0))),
            ))
        }
        Gate::Shedlock { table, locks, .. } => Ok(GateState::Shedlock(ShedlockState {
            locks: shedlock_rows(db, table, locks, for_update)?,
        })),
        Gate::Quartz {
            table_prefix,
            scheduler,
            groups,
            ..
        } => {
            let t = QuartzTables::new(db, table_prefix)?;
            if lock {
                lock_quartz(db, &t, scheduler)?;
            }
            let all = groups.is_none();
            let groups = quartz_groups(db, &t, scheduler, groups)?;
            let paused: Vec<String> = db
                .query(
                    "read paused Quartz groups",
                    &format!(
                        "SELECT trigger_group::text FROM {}
                          WHERE sched_name = $1 AND (trigger_group = ANY($2) OR trigger_group = $3) ORDER BY 1",
                        t.paused
                    ),
                    &[scheduler, &groups, &QUARTZ_ALL_GROUPS],
                )?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let triggers: Vec<Trigger> = db
                .query(
                    "read Quartz triggers",
                    &format!(
                        "SELECT trigger_name::text, trigger_group::text, trigger_state::text FROM {}
                          WHERE sched_name = $1 AND trigger_group = ANY($2) ORDER BY 2, 1{for_update}",
                        t.triggers
                    ),
                    &[scheduler, &groups],
                )?
                .iter()
                .map(|r| Trigger {
                    name: r.get(0),
                    group: r.get(1),
                    state: r.get(2),
                })
                .collect();
            Ok(GateState::Quartz(QuartzState {
                groups,
                all_groups: all,
                paused_groups: paused,
                triggers,
            }))
        }
    }
}

/// ShedLock rows by name: the named ones (`null` where missing), or all.
fn shedlock_rows(
    db: &mut Db,
    table: &str,
    locks: &Option<Vec<String>>,
    for_update: &str,
) -> Result<BTreeMap<String, Option<LockRow>>, PgError> {
    let t = db.table(table)?;
    let rows = match locks {
        Some(names) => db.query(
            "read ShedLock rows",
            &format!(
                "SELECT s.name::text, to_jsonb(s)::text FROM {t} AS s
                  WHERE s.name = ANY($1) ORDER BY 1{for_update}"
            ),
            &[names],
        )?,
        None => db.query(
            "read ShedLock rows",
            &format!("SELECT s.name::text, to_jsonb(s)::text FROM {t} AS s ORDER BY 1{for_update}"),
            &[],
        )?,
    };
    let mut found: BTreeMap<String, Option<LockRow>> = rows
        .iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                Some(parse_row(&r.get::<_, String>(1))),
            )
        })
        .collect();
    for n in locks.iter().flatten() {
        found.entry(n.clone()).or_insert(None);
    }
    Ok(found)
}

/// Quartz states a pause moves (as Quartz's own `pauseTriggerGroup`).
fn pausable(state: &str) -> bool {
    matches!(state, "WAITING" | "ACQUIRED" | "BLOCKED")
}

/// Freezes ShedLock rows `names` of `table`; the ones that changed.
fn freeze(
    db: &mut Db,
    table: &str,
    names: &[String],
    marker: &str,
) -> Result<Vec<String>, PgError> {
    let t = db.table(table)?;
    let mut changed = Vec::new();
    for name in names {
        let c = db.execute(
            "freeze a ShedLock row",
            &format!(
                "UPDATE {t} SET lock_until = $2::text::timestamptz, locked_at = now(), locked_by = $3
                  WHERE name = $1 AND NOT (locked_by = $3 AND lock_until = $2::text::timestamptz)"
            ),
            &[name, &FROZEN_UNTIL, &marker],
        )? + db.execute(
            "insert a frozen ShedLock row",
            &format!(
                "INSERT INTO {t} (name, lock_until, locked_at, locked_by)
                 SELECT $1::text, $2::text::timestamptz, now(), $3::text
                  WHERE NOT EXISTS (SELECT FROM {t} WHERE name = $1::text)"
            ),
            &[name, &FROZEN_UNTIL, &marker],
        )?;
        if c > 0 {
            changed.push(name.clone());
        }
    }
    Ok(changed)
}

/// Pauses Quartz `groups` the way `pauseTriggerGroup` does (and, for a gate
/// over every group, `pauseAll`'s marker); the triggers that moved.
fn pause_quartz(
    db: &mut Db,
    t: &QuartzTables,
    scheduler: &str,
    groups: &[String],
    all: bool,
) -> Result<Vec<String>, PgError> {
    let mut marked: Vec<String> = groups.to_vec();
    if all {
        marked.push(QUARTZ_ALL_GROUPS.to_owned());
    }
    db.execute(
        "pause Quartz groups",
        &format!(
            "INSERT INTO {pg} (sched_name, trigger_group) SELECT $1::text, g FROM unnest($2::text[]) AS g
              WHERE NOT EXISTS (SELECT FROM {pg} p WHERE p.sched_name = $1::text AND p.trigger_group = g)",
            pg = t.paused
        ),
        &[&scheduler, &marked],
    )?;
    let rows = db.query(
        "pause Quartz triggers",
        &format!(
            "UPDATE {} SET trigger_state = CASE trigger_state WHEN 'BLOCKED' THEN 'PAUSED_BLOCKED' ELSE 'PAUSED' END
              WHERE sched_name = $1 AND trigger_group = ANY($2) AND trigger_state IN ('WAITING', 'ACQUIRED', 'BLOCKED')
              RETURNING trigger_group::text || '.' || trigger_name::text",
            t.triggers
        ),
        &[&scheduler, &groups],
    )?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Closes the gate. Conditional on every row's state: the count is what
/// actually changed, zero when it was already closed.
fn close(
    db: &mut Db,
    gate: &Gate,
    prior: &GateState,
    marker: &str,
) -> Result<(u64, Vec<String>), PgError> {
    match gate {
        Gate::SystemGate { name, table } => {
            let t = db.table(table)?;
            let stamp = if has_column(db, table, "updated_at")? {
                ", updated_at = now()"
            } else {
                ""
            };
            let n = db.execute(
                "close a system_gate row",
                &format!("UPDATE {t} SET enabled = false{stamp} WHERE gate_name = $1 AND enabled IS DISTINCT FROM false"),
                &[name],
            )? + db.execute(
                "insert a closed system_gate row",
                &format!("INSERT INTO {t} (gate_name, enabled) SELECT $1::text, false
                           WHERE NOT EXISTS (SELECT FROM {t} WHERE gate_name = $1::text)"),
                &[name],
            )?;
            Ok((n, if n > 0 { vec![name.clone()] } else { vec![] }))
        }
        Gate::Shedlock { table, .. } => {
            let names: Vec<String> = prior.locks().into_keys().collect();
            let ids = freeze(db, table, &names, marker)?;
            Ok((ids.len() as u64, ids))
        }
        Gate::Quartz {
            table_prefix,
            scheduler,
            ..
        } => {
            let t = QuartzTables::new(db, table_prefix)?;
            // On a resumed close the prior state comes from the journal, so
            // the lock is taken here, not only by the read.
            lock_quartz(db, &t, scheduler)?;
            let GateState::Quartz(q) = prior else {
                return Ok((0, Vec::new()));
            };
            let ids = pause_quartz(db, &t, scheduler, &q.groups, q.all_groups)?;
            Ok((ids.len() as u64, ids))
        }
    }
}

/// Quartz's misfire instruction, by trigger type, as its documentation
/// names it (`smart policy` resolved as Quartz resolves it).
fn misfire_instruction(kind: &str, instr: i32, repeat_count: Option<i64>) -> String {
    let simple = kind == "SIMPLE";
    let name = match (instr, simple) {
        (-1, _) => "ignore misfire policy",
        (0, true) => match repeat_count {
            Some(0) => "smart policy: fire now",
            Some(-1) => "smart policy: reschedule next with remaining count",
            _ => "smart policy: reschedule now with existing repeat count",
        },
        (0, false) => "smart policy: fire once now",
        (1, true) => "fire now",
        (2, true) => "reschedule now with existing repeat count",
        (3, true) => "reschedule now with remaining repeat count",
        (4, true) => "reschedule next with remaining count",
        (5, true) => "reschedule next with existing count",
        (1, false) => "fire once now",
        (2, false) => "do nothing",
        _ => "an instruction of its own",
    };
    name.to_owned()
}

fn millis_utc(ms: i64) -> String {
    let t = SystemTime::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// What the plan's other Quartz gates on the same scheduler hold when one
/// re-opens.
#[derive(Debug, Default)]
struct Sharers {
    /// Their closes' prior states.
    priors: Vec<QuartzState>,
    /// The groups (as their playbook names them; `None`: every group) of
    /// those still closed.
    closed: Vec<Option<Vec<String>>>,
}

fn paused_state(state: &str) -> bool {
    matches!(state, "PAUSED" | "PAUSED_BLOCKED")
}

/// Resumes a Quartz gate the way Quartz's `resumeTriggerGroup` (and, for a
/// gate over every group, `resumeAll`) does, except for the groups and
/// triggers the application had paused itself before the run (the close's
/// prior state says which): each paused trigger with a next fire time goes
/// back to `WAITING`, or `BLOCKED` while a non-concurrent run of its job is
/// executing. Quartz's own resume also applies the misfire instruction of a
/// trigger whose next fire time is older than the misfire threshold; here
/// those triggers are reported instead, with the time by which Quartz's
/// misfire handler, which looks at least once per threshold, applies it.
///
/// Gates on one scheduler share groups: every gate that names groups holds
/// `RECOVERING_JOBS`, and groups may overlap. Quartz keeps one paused row
/// per group, and `storeTrigger` files a recovery trigger paused only while
/// that row is there; nothing in a recovery trigger's columns says which
/// gate's group its job was fired from (the original trigger is only in its
/// job data, and may be gone). So a group another gate of the run still
/// holds stays paused, and is resumed by the last of them to re-open. What
/// one close found paused because an earlier close of the run had paused it
/// is not the application's: the application's is what every close found.
fn resume_quartz(
    db: &mut Db,
    t: &QuartzTables,
    scheduler: &str,
    named: &Option<Vec<String>>,
    prior: &QuartzState,
    sharers: &Sharers,
    misfire_ms: u64,
) -> Result<(Vec<String>, Vec<Misfire>), PgError> {
    let covers = |q: &QuartzState, g: &str| {
        q.groups.iter().any(|x| x == g) || (g == QUARTZ_ALL_GROUPS && q.all_groups)
    };
    let app_groups: BTreeSet<String> = prior
        .paused_groups
        .iter()
        .filter(|g| {
            sharers
                .priors
                .iter()
                .all(|q| !covers(q, g) || q.paused_groups.contains(g))
        })
        .cloned()
        .collect();
    let (mut app_g, mut app_n) = (Vec::new(), Vec::new());
    for tr in &prior.triggers {
        // Paused as every other close on the scheduler found it; one that
        // covers its group and did not see it at all saw it made since
        // (a recovery trigger filed paused because a group was held):
        // not the application's.
        let everywhere = sharers.priors.iter().all(|q| {
            match q
                .triggers
                .iter()
                .find(|x| x.group == tr.group && x.name == tr.name)
            {
                Some(x) => paused_state(&x.state),
                None => !covers(q, &tr.group),
            }
        });
        if paused_state(&tr.state) && everywhere {
            app_g.push(tr.group.clone());
            app_n.push(tr.name.clone());
        }
    }
    let mut held: BTreeSet<String> = BTreeSet::new();
    for g in &sharers.closed {
        held.extend(quartz_groups(db, t, scheduler, g)?);
    }
    let held_all = sharers.closed.iter().any(Option::is_none);
    let all = prior.all_groups;
    let groups: Vec<String> = quartz_groups(db, t, scheduler, named)?
        .into_iter()
        .filter(|g| !app_groups.contains(g) && !held.contains(g))
        .collect();
    let mut unmark = groups.clone();
    if all && !held_all && !app_groups.contains(QUARTZ_ALL_GROUPS) {
        unmark.push(QUARTZ_ALL_GROUPS.to_owned());
    }
    db.execute(
        "resume Quartz groups",
        &format!(
            "DELETE FROM {} WHERE sched_name = $1 AND trigger_group = ANY($2)",
            t.paused
        ),
        &[&scheduler, &unmark],
    )?;
    let rows = db.query(
        "resume Quartz triggers",
        &format!(
            "UPDATE {tr} AS t
                SET trigger_state = CASE WHEN EXISTS (
                        SELECT FROM {ft} f WHERE f.sched_name = t.sched_name AND f.job_name = t.job_name
                           AND f.job_group = t.job_group AND f.is_nonconcurrent)
                    THEN 'BLOCKED' ELSE 'WAITING' END
              WHERE t.sched_name = $1 AND t.trigger_group = ANY($2)
                AND t.trigger_state IN ('PAUSED', 'PAUSED_BLOCKED') AND t.next_fire_time IS NOT NULL
                AND NOT EXISTS (SELECT FROM unnest($3::text[], $4::text[]) AS a(g, n)
                                 WHERE a.g = t.trigger_group AND a.n = t.trigger_name)
              RETURNING t.trigger_group::text || '.' || t.trigger_name::text",
            tr = t.triggers,
            ft = t.fired
        ),
        &[&scheduler, &groups, &app_g, &app_n],
    )?;
    let resumed: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let misfired = db
        .query(
            "find resumed Quartz triggers past their misfire threshold",
            &format!(
                "SELECT t.trigger_group::text || '.' || t.trigger_name::text, t.next_fire_time,
                        coalesce(t.misfire_instr, 0)::int, t.trigger_type::text,
                        (SELECT s.repeat_count FROM {st} s WHERE s.sched_name = t.sched_name
                            AND s.trigger_name = t.trigger_name AND s.trigger_group = t.trigger_group),
                        (extract(epoch FROM clock_timestamp()) * 1000)::bigint
                   FROM {tr} t
                  WHERE t.sched_name = $1 AND t.trigger_group || '.' || t.trigger_name = ANY($2)
                    AND t.trigger_state = 'WAITING' AND coalesce(t.misfire_instr, 0) <> -1
                    AND t.next_fire_time < (extract(epoch FROM clock_timestamp()) * 1000)::bigint - $3
                  ORDER BY 1",
                st = t.simple,
                tr = t.triggers
            ),
            &[&scheduler, &resumed, &(misfire_ms as i64)],
        )?
        .iter()
        .map(|r| {
            let (next, now): (i64, i64) = (r.get(1), r.get(5));
            Misfire {
                trigger: r.get(0),
                next_fire_time: millis_utc(next),
                missed_by_seconds: (now - next) as f64 / 1000.0,
                instruction: misfire_instruction(&r.get::<_, String>(3), r.get(2), r.get(4)),
                handled_by: millis_utc(now + misfire_ms as i64),
            }
        })
        .collect();
    Ok((resumed, misfired))
}

/// Puts back what the close found, only where the close's state is still
/// there: running it twice restores once. `found` adds ShedLock rows the
/// verify step found taken while the gate was closed.
fn reopen(
    db: &mut Db,
    gate: &Gate,
    prior: &GateState,
    found: &BTreeMap<String, LockRow>,
    sharers: &Sharers,
    marker: &str,
) -> Result<(u64, Vec<String>, Vec<Misfire>), PgError> {
    match gate {
        Gate::SystemGate { name, table } => {
            let t = db.table(table)?;
            let n = if let GateState::SystemGate(Some(row)) = prior {
                let stamp = if has_column(db, table, "updated_at")? {
                    ", updated_at = now()"
                } else {
                    ""
                };
                db.execute(
                    "re-open a system_gate row",
                    &format!(
                        "UPDATE {t} AS g SET enabled = r.enabled{stamp}
                           FROM jsonb_populate_record(NULL::{t}, $2::text::jsonb) AS r
                          WHERE g.gate_name = $1 AND g.enabled = false AND r.enabled IS DISTINCT FROM false"
                    ),
                    &[name, &Value::Object(row.clone()).to_string()],
                )?
            } else {
                db.execute(
                    "remove the system_gate row the close inserted",
                    &format!("DELETE FROM {t} WHERE gate_name = $1 AND enabled = false"),
                    &[name],
                )?
            };
            Ok((
                n,
                if n > 0 { vec![name.clone()] } else { vec![] },
                Vec::new(),
            ))
        }
        Gate::Shedlock { table, .. } => {
            let t = db.table(table)?;
            let (mut n, mut ids) = (0, Vec::new());
            let mut rows = prior.locks();
            for (k, v) in found {
                rows.entry(k.clone()).or_insert_with(|| Some(v.clone()));
            }
            for (name, row) in rows {
                let c = if let Some(row) = row {
                    db.execute(
                        "restore a ShedLock row",
                        &format!(
                            "UPDATE {t} AS s SET lock_until = r.lock_until, locked_at = r.locked_at, locked_by = r.locked_by
                               FROM jsonb_populate_record(NULL::{t}, $2::text::jsonb) AS r
                              WHERE s.name = $1 AND s.locked_by = $3"
                        ),
                        &[&name, &json_text(&row), &marker],
                    )?
                } else {
                    db.execute(
                        "remove the ShedLock row the close inserted",
                        &format!("DELETE FROM {t} WHERE name = $1 AND locked_by = $2"),
                        &[&name, &marker],
                    )?
                };
                if c > 0 {
                    ids.push(name);
                }
                n += c;
            }
            Ok((n, ids, Vec::new()))
        }
        Gate::Quartz {
            table_prefix,
            scheduler,
            groups,
            misfire_threshold_ms,
            ..
        } => {
            let t = QuartzTables::new(db, table_prefix)?;
            lock_quartz(db, &t, scheduler)?;
            let GateState::Quartz(q) = prior else {
                return Ok((0, Vec::new(), Vec::new()));
            };
            let (ids, misfired) =
                resume_quartz(db, &t, scheduler, groups, q, sharers, *misfire_threshold_ms)?;
            Ok((ids.len() as u64, ids, misfired))
        }
    }
}

/// What a close or a re-open journals as its effect's detail: one type,
/// written and read here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GateDetail {
    pub gate: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub database: String,
    pub before: GateState,
    pub after: GateState,
    /// A re-open: the state the close found, which it restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_to: Option<GateState>,
    /// A re-open: what it does not put back as it was, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_restored: Vec<String>,
    /// A Quartz re-open: triggers past the misfire threshold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub misfired: Vec<Misfire>,
}

impl GateDetail {
    fn of(effect: &Effect) -> Option<GateDetail> {
        serde_json::from_value(effect.detail.clone()).ok()
    }
}

/// A gate's rows, said briefly.
fn describe_state(state: &GateState) -> String {
    match state {
        GateState::SystemGate(_) => match state.enabled() {
            None => "no row".into(),
            Some(v) => format!("enabled = {v}"),
        },
        GateState::Shedlock(s) => {
            if s.locks.is_empty() {
                return "no locks".into();
            }
            s.locks
                .iter()
                .map(|(name, row)| match row {
                    None => format!("{name}: no row"),
                    Some(row) => format!(
                        "{name}: until {} by {}",
                        row.lock_until.as_deref().unwrap_or("(none)"),
                        row.by()
                    ),
                })
                .collect::<Vec<_>>()
                .join("; ")
        }
        GateState::Quartz(q) => {
            let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
            for t in &q.triggers {
                *counts.entry(t.state.as_str()).or_default() += 1;
            }
            format!(
                "{} paused group(s); triggers {}",
                q.paused_groups.len(),
                counts
                    .iter()
                    .map(|(s, n)| format!("{n} {s}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    }
}

/// A close's preview: the rows as they are.
#[derive(Serialize)]
struct Preview<'a> {
    before: &'a GateState,
}

/// What a close would change, from the state as it is.
fn would_close(gate: &Gate, state: &GateState, database: &str) -> Effect {
    let (count, items, what) = match gate {
        Gate::SystemGate { name, table } => match state.enabled() {
            None => (
                1,
                vec![name.clone()],
                format!("{table} has no row `{name}`: insert it closed"),
            ),
            Some(Value::Bool(false)) => (0, vec![], format!("{table} `{name}` is already closed")),
            Some(v) => (
                1,
                vec![name.clone()],
                format!("{table} `{name}`: enabled {v} → false"),
            ),
        },
        Gate::Shedlock { table, .. } => {
            let locks = state.locks();
            let names: Vec<String> = locks.keys().cloned().collect();
            let missing = locks.values().filter(|v| v.is_none()).count();
            let mut what = format!(
                "{table}: freeze {} lock(s) until {FROZEN_UNTIL}",
                names.len()
            );
            if missing > 0 {
                what.push_str(&format!(" ({missing} not there yet: inserted frozen)"));
            }
            (names.len() as u64, names, what)
        }
        Gate::Quartz { scheduler, .. } => {
            let (moving, groups): (Vec<String>, &[String]) = match state {
                GateState::Quartz(q) => (
                    q.triggers
                        .iter()
                        .filter(|t| pausable(&t.state))
                        .map(|t| format!("{}.{}", t.group, t.name))
                        .collect(),
                    &q.groups,
                ),
                _ => (Vec::new(), &[]),
            };
            (
                moving.len() as u64,
                moving.clone(),
                format!(
                    "Quartz {scheduler}: pause group(s) {} under its TRIGGER_ACCESS lock; {} trigger(s) to PAUSED",
                    groups.join(", "),
                    moving.len()
                ),
            )
        }
    };
    Effect {
        summary: format!("{what} on {database}"),
        count,
        items,
        detail: serde_json::to_value(Preview { before: state }).expect("gate states serialize"),
    }
}

impl Step for GateAt {
    fn nature(&self) -> Nature {
        Nature::Changes
    }

    fn writes(&self) -> Vec<&str> {
        vec![self.database.as_str()]
    }

    fn preview(&self, env: &mut Env) -> Result<Effect, StepError> {
        let db = env.db(&self.database)?;
        let state = read_state(db, &self.gate, false).on(&self.database)?;
        Ok(would_close(&self.gate, &state, &self.database))
    }

    fn apply(&self, env: &mut Env, rec: &mut Recorder) -> Result<Effect, StepError> {
        let marker = env.marker();
        let database = self.database.clone();
        let gate = &self.gate;
        env.db(&database)?.transaction("BEGIN", |db| {
            let prior = rec.prior(|| read_state(db, gate, true).on(&database))?;
            let prior = state_of(gate, prior, rec.step)?;
            let (count, items) = close(db, gate, &prior, &marker).on(&database)?;
            let after = read_state(db, gate, false).on(&database)?;
            let detail = GateDetail {
                gate: gate.name().to_owned(),
                kind: gate.kind().to_owned(),
                database: database.clone(),
                before: prior,
                after,
                restored_to: None,
                not_restored: Vec::new(),
                misfired: Vec::new(),
            };
            Ok(Effect {
                summary: format!(
                    "closed {} `{}` on {database}: {count} row(s) changed",
                    gate.kind(),
                    gate.name()
                ),
                count,
                items,
                detail: serde_json::to_value(detail).expect("gate details serialize"),
            })
        })
    }

    fn gate_evidence(&self, effect: &Effect) -> Option<GateRow> {
        let d = GateDetail::of(effect)?;
        Some(GateRow::Closed(GateEvidence {
            before: describe_state(&d.before),
            closed: describe_state(&d.after),
            after: "stays closed".into(),
            gate: d.gate,
            kind: d.kind,
            database: d.database,
        }))
    }
}

/// What a re-open does not put back as it was: a `system_gate` row's
/// `updated_at` takes the re-open time, as every gate flip stamps it.
fn not_restored(gate: &Gate) -> Vec<&'static str> {
    match gate {
        Gate::SystemGate { .. } => vec!["updated_at: the re-open time, as every gate flip stamps it"],
        Gate::Shedlock { .. } => vec![],
        Gate::Quartz { .. } => vec![
            "trigger states: resumed as Quartz's resumeTriggerGroup does (WAITING, or BLOCKED while a non-concurrent run of the job executes); what the application had paused stays paused",
        ],
    }
}

impl Reopen {
    /// The other gates on this scheduler, from the journal: a gate whose
    /// close journaled its prior state holds its groups until its re-open
    /// is done. A re-open run again after a crash finds the same.
    fn sharers(&self, rec: &Recorder) -> Result<Sharers, StepError> {
        let mut out = Sharers::default();
        for s in &self.shares_scheduler {
            let Some(prior) = rec.prior_of::<GateState>(&s.close_step)? else {
                continue;
            };
            if let (GateState::Quartz(q), Gate::Quartz { groups, .. }) =
                (state_of(&s.gate, prior, &s.close_step)?, &s.gate)
            {
                out.priors.push(q);
                let reopened = s
                    .reopen_step
                    .as_deref()
                    .is_some_and(|r| rec.done_at(r).is_some());
                if !reopened {
                    out.closed.push(groups.clone());
                }
            }
        }
        Ok(out)
    }
}

impl Step for Reopen {
    fn nature(&self) -> Nature {
        Nature::Changes
    }

    fn writes(&self) -> Vec<&str> {
        vec![self.database.as_str()]
    }

    fn preview(&self, _env: &mut Env) -> Result<Effect, StepError> {
        let how = match &self.gate {
            Gate::Quartz { .. } => "resume it as Quartz's resumeTriggerGroup does, keeping paused what the application had paused before",
            _ => "restore it to the state journaled by",
        };
        Ok(Effect::said(format!(
            "{} `{}` on {}: {how} {}",
            self.gate.kind(),
            self.gate.name(),
            self.database,
            self.close_step
        )))
    }

    fn apply(&self, env: &mut Env, rec: &mut Recorder) -> Result<Effect, StepError> {
        let Some(prior) = rec.prior_of::<GateState>(&self.close_step)? else {
            return Err(StepError::State(format!(
                "the journal holds no prior state from {}: this run did not close the gate, so it will not re-open it",
                self.close_step
            )));
        };
        let prior = state_of(&self.gate, prior, &self.close_step)?;
        let found = found_by_verify(rec, &self.close_step)?;
        let sharers = self.sharers(rec)?;
        let marker = env.marker();
        let database = self.database.clone();
        let gate = &self.gate;
        env.db(&database)?.transaction("BEGIN", |db| {
            let before = rec.prior(|| read_state(db, gate, true).on(&database))?;
            let (count, items, misfired) =
                reopen(db, gate, &prior, &found, &sharers, &marker).on(&database)?;
            let after = read_state(db, gate, false).on(&database)?;
            let mut summary = format!(
                "re-opened {} `{}` on {database}: {count} row(s) restored",
                gate.kind(),
                gate.name()
            );
            if let (m, Gate::Quartz { misfire_threshold_ms, .. }) = (&misfired, gate) {
                if !m.is_empty() {
                    summary.push_str(&format!(
                        "; {} trigger(s) missed their fire time by more than the misfire threshold ({}): Quartz's misfire handler applies their misfire instruction by {}",
                        m.len(),
                        humantime::format_duration(Duration::from_millis(*misfire_threshold_ms)),
                        m.iter().map(|x| x.handled_by.as_str()).max().unwrap_or_default()
                    ));
                }
            }
            let detail = GateDetail {
                gate: gate.name().to_owned(),
                kind: gate.kind().to_owned(),
                database: database.clone(),
                before,
                after,
                restored_to: Some(prior),
                not_restored: not_restored(gate).into_iter().map(str::to_owned).collect(),
                misfired,
            };
            Ok(Effect {
                summary,
                count,
                items,
                detail: serde_json::to_value(detail).expect("gate details serialize"),
            })
        })
    }

    fn gate_evidence(&self, effect: &Effect) -> Option<GateRow> {
        let d = GateDetail::of(effect)?;
        let mut after = describe_state(&d.after);
        if !d.misfired.is_empty() {
            after.push_str(&format!(
                "; {} trigger(s) past their misfire threshold, for Quartz's misfire handler",
                d.misfired.len()
            ));
        }
        Some(GateRow::Reopened {
            gate: d.gate,
            database: d.database,
            after,
        })
    }
}

impl Step for WaitCache {
    fn nature(&self) -> Nature {
        Nature::AfterClose
    }

    fn preview(&self, _env: &mut Env) -> Result<Effect, StepError> {
        Ok(Effect::said(format!(
            "wait {} after the last close: the applications' gate cache TTL",
            humantime::format_duration(Duration::from_secs_f64(self.ttl_seconds))
        )))
    }

    fn apply(&self, _env: &mut Env, rec: &mut Recorder) -> Result<Effect, StepError> {
        // From the last close, not from now: a resumed run does not wait twice.
        let closed = self
            .after
            .iter()
            .filter_map(|s| rec.done_at(s))
            .max()
            .unwrap_or_else(SystemTime::now);
        let deadline = closed + Duration::from_secs_f64(self.ttl_seconds);
        rec.sleep_until(deadline)?;
        Ok(Effect::said(format!(
            "waited until {} (gate cache TTL {}s)",
            humantime::format_rfc3339_millis(deadline),
            self.ttl_seconds
        )))
    }
}

/// What one pass of the verify step found on one gate.
#[derive(Default)]
struct Pass {
    /// Closed again: released or re-opened since the close.
    reclosed: Vec<String>,
    /// Taken while the gate was closed: a job the gate did not stop ran.
    ran: Vec<String>,
    /// Still running, from before the close.
    running: Vec<String>,
    /// Quartz runs listed as executing that no live scheduler runs.
    ghosts: Vec<Ghost>,
    /// Entry ids of the Quartz runs waited for.
    waited_entries: Vec<String>,
}

/// Each Quartz instance's check-in as the verify step last read it (by
/// database, fired-triggers table, scheduler and instance), with when it
/// first read that value, by its own monotonic clock.
type Checkins = BTreeMap<(String, String, String, String), (i64, Instant)>;

/// How long `checkin` has been seen unchanged, as of `looked`.
fn unchanged_for(
    seen: &mut Checkins,
    key: (String, String, String, String),
    checkin: i64,
    looked: Instant,
) -> i64 {
    let e = seen.entry(key).or_insert((checkin, looked));
    if e.0 != checkin {
        *e = (checkin, looked);
    }
    looked.saturating_duration_since(e.1).as_millis() as i64
}

/// The playbook's name for the restored copy (see `plan::survivor`).
const RESTORED: &str = "restored";

/// Why a run Quartz lists as `EXECUTING` is not running.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum GhostWhy {
    /// On the restored copy, fired by T: the old primary's run, restored
    /// as data.
    #[serde(rename_all = "kebab-case")]
    FiredBeforeT { t: String },
    /// On the restored copy, its instance last checked in there by T: no
    /// scheduler of that instance has run on the copy since.
    #[serde(rename_all = "kebab-case")]
    CheckinBeforeT { checkin: String, t: String },
    /// A clustered store, and the instance has no check-in row, which a
    /// clustered scheduler writes before it fires anything.
    NoCheckin,
    /// Quartz counts the instance failed: its check-in did not advance
    /// while reentry watched it, for its interval plus 7.5 s, or for its
    /// interval once the database's clock is past check-in + interval +
    /// 7.5 s. The check-in is the instance's JVM clock: compared with the
    /// database's alone, a database clock running ahead would make every
    /// live instance look failed.
    #[serde(rename_all = "kebab-case")]
    Failed {
        checkin: String,
        interval_ms: i64,
        failed_after: String,
        now: String,
        /// How long reentry saw the check-in unchanged, by its own
        /// monotonic clock.
        #[serde(default)]
        unchanged_ms: i64,
    },
}

impl GhostWhy {
    fn short(&self) -> &'static str {
        match self {
            GhostWhy::FiredBeforeT { .. } | GhostWhy::CheckinBeforeT { .. } => "a ghost of T",
            GhostWhy::NoCheckin => "its instance never checked in",
            GhostWhy::Failed { .. } => "Quartz counts its instance failed",
        }
    }

    fn of_t(&self) -> bool {
        matches!(
            self,
            GhostWhy::FiredBeforeT { .. } | GhostWhy::CheckinBeforeT { .. }
        )
    }

    fn describe(&self) -> String {
        match self {
            GhostWhy::FiredBeforeT { t } => format!(
                "a ghost of T: fired before T ({t}), it is the old primary's run restored as data, and nobody runs it on the restored copy"
            ),
            GhostWhy::CheckinBeforeT { checkin, t } => format!(
                "a ghost of T: its instance last checked in on the restored copy at {checkin}, before T ({t}), so no scheduler of it has run there since"
            ),
            GhostWhy::NoCheckin => "its instance has no check-in row in SCHEDULER_STATE, which a clustered scheduler writes before it fires anything: Quartz counts it failed (orphaned fired triggers)".into(),
            GhostWhy::Failed { checkin, interval_ms, failed_after, now, unchanged_ms } => format!(
                "Quartz counts its instance failed: last check-in {checkin}, interval {interval_ms} ms, and the check-in did not advance in {:.1} s reentry watched it (Quartz's ClusterManager counts an instance failed after check-in + interval + 7.5 s, {failed_after}; the database's clock says {now})",
                *unchanged_ms as f64 / 1000.0
            ),
        }
    }
}

/// A run Quartz lists as `EXECUTING` that no live scheduler runs: not
/// waited for, and named.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Ghost {
    pub gate: String,
    pub database: String,
    pub entry_id: String,
    pub instance: String,
    pub trigger: String,
    pub job: String,
    pub fired: String,
    pub why: GhostWhy,
    pub requests_recovery: bool,
    pub nonconcurrent: bool,
    /// What Quartz does with the row, and when.
    pub then: String,
}

impl Ghost {
    pub fn describe(&self) -> String {
        format!(
            "{}@{}: {} (job {} on {}, fired {}) is not running: {}. {}",
            self.gate,
            self.database,
            self.trigger,
            self.job,
            self.instance,
            self.fired,
            self.why.describe(),
            self.then
        )
    }
}

/// An `EXECUTING` row of `FIRED_TRIGGERS`, with its instance's check-in
/// (`last_checkin_time`, `checkin_interval`) where it has one.
#[derive(Debug, Clone, PartialEq)]
struct FiredRow {
    entry_id: String,
    trigger: String,
    job: String,
    instance: String,
    fired_ms: i64,
    requests_recovery: bool,
    nonconcurrent: bool,
    checkin: Option<(i64, i64)>,
}

/// Whether an `EXECUTING` row is a ghost, and why; `None` for a run a live
/// scheduler may be executing, which is waited for.
///
/// On the restored copy, a run fired by T, or of an instance whose last
/// check-in there is from T, is T's: nobody runs it there. Elsewhere (and
/// on the copy, for a scheduler started there since the restore) Quartz's
/// own rule decides: `findFailedInstances` counts an instance failed once
/// `calcFailedIfAfter` = check-in + max(interval, the checker's own time
/// since its last check-in) + 7.5 s is past, on the checker's JVM clock,
/// the clock the check-in was written with. reentry has no such clock: it
/// watches the check-in instead (`unchanged_ms`, by its own monotonic
/// clock). A live instance advances it every interval; one that has not for
/// interval + 7.5 s is failed, as Quartz reckons. The database's clock
/// plays no part: it would count every live instance failed when it runs
/// ahead of the application's hosts, and even shortening the watch where it
/// agrees drops Quartz's grace for a check-in written a little late. An
/// instance with fired rows and no check-in row is
/// failed (`findOrphanedFailedInstances`). A store with no check-in row at
/// all is not clustered: nothing there says whether its one scheduler still
/// runs the job, so it is waited for.
fn judge(
    row: &FiredRow,
    restored_copy: bool,
    t_ms: Option<i64>,
    clustered: bool,
    now_ms: i64,
    unchanged_ms: i64,
) -> Option<GhostWhy> {
    let t = t_ms.filter(|_| restored_copy);
    if let Some(t) = t.filter(|t| row.fired_ms <= *t) {
        return Some(GhostWhy::FiredBeforeT { t: millis_utc(t) });
    }
    if !clustered {
        return None;
    }
    let Some((checkin, interval)) = row.checkin else {
        return Some(GhostWhy::NoCheckin);
    };
    if let Some(t) = t.filter(|t| checkin <= *t) {
        return Some(GhostWhy::CheckinBeforeT {
            checkin: millis_utc(checkin),
            t: millis_utc(t),
        });
    }
    let interval_ms = interval.max(0);
    let failed_after = checkin + interval_ms + QUARTZ_FAILED_GRACE_MS;
    // Quartz's own rule, timed by reentry's clock: the database's clock
    // plays no part (a check-in written once an interval, a little late,
    // must not look failed to a clock that runs ahead).
    let stale = unchanged_ms >= interval_ms + QUARTZ_FAILED_GRACE_MS;
    stale.then(|| GhostWhy::Failed {
        checkin: millis_utc(checkin),
        interval_ms: interval,
        failed_after: millis_utc(failed_after),
        now: millis_utc(now_ms),
        unchanged_ms,
    })
}

/// What Quartz does with a ghost's row, and when, on `database`.
fn then(row: &FiredRow, database: &str, retired: bool, clustered: bool) -> String {
    let when = if !clustered {
        "when its scheduler restarts (a non-clustered store recovers at start)".to_owned()
    } else if row.checkin.is_none() {
        format!("when a scheduler starts on {database} (Quartz recovers an instance without a check-in row only at a scheduler's first check-in)")
    } else {
        format!(
            "at the next check-in of a scheduler on {database} once it counts the instance failed"
        )
    };
    let mut out = match (row.requests_recovery, retired) {
        (true, false) => format!(
            "Job {} requests recovery: Quartz re-runs it once, through a new trigger in {QUARTZ_RECOVERY_GROUP}, {when}; the gate holds {QUARTZ_RECOVERY_GROUP}, so that run comes after the re-open (at once, if Quartz recovered it while the gate was closed)",
            row.job
        ),
        (true, true) => format!(
            "Job {} requests recovery: Quartz would re-run it through a new trigger in {QUARTZ_RECOVERY_GROUP} {when}; the gates stay closed on {database}, so that trigger stays paused",
            row.job
        ),
        (false, _) => format!(
            "Quartz deletes the row {when}, and does not run job {} again",
            row.job
        ),
    };
    if row.nonconcurrent {
        out.push_str("; until then the job's triggers stay BLOCKED (it disallows concurrent execution), as Quartz's own resume leaves them");
    }
    out
}

/// ShedLock rows held at the close by a job that had not released them yet.
fn held_at_close(
    db: &mut Db,
    table: &str,
    prior: &GateState,
    marker: &str,
) -> Result<Vec<(String, String)>, PgError> {
    let t = db.table(table)?;
    let mut held = Vec::new();
    for (name, row) in prior.locks() {
        let Some(row) = row else { continue };
        let r = db.query_one(
            "ask whether a ShedLock holder may still run",
            &format!(
                "SELECT r.lock_until > now() AND r.locked_by IS DISTINCT FROM $2
                   FROM jsonb_populate_record(NULL::{t}, $1::text::jsonb) AS r"
            ),
            &[&json_text(&row), &marker],
        )?;
        if r.get::<_, Option<bool>>(0) == Some(true) {
            let what = format!(
                "{name} (held by {} until {})",
                row.by(),
                row.lock_until.as_deref().unwrap_or("(none)")
            );
            held.push((name, what));
        }
    }
    Ok(held)
}

impl Verify {
    fn pass(
        &self,
        c: &Closed,
        db: &mut Db,
        prior: &GateState,
        found: &mut BTreeMap<String, LockRow>,
        (released, seen): (&mut BTreeSet<String>, &mut Checkins),
        marker: &str,
    ) -> Result<Pass, PgError> {
        let mut p = Pass::default();
        match &c.at.gate {
            Gate::SystemGate { .. } => {
                let (_, ids) = close(db, &c.at.gate, prior, marker)?;
                p.reclosed = ids
                    .into_iter()
                    .map(|i| format!("{i}: re-opened since the close"))
                    .collect();
            }
            Gate::Shedlock { table, locks, .. } => {
                let now = shedlock_rows(db, table, locks, " FOR UPDATE")?;
                let known = prior.locks();
                // Rows that appeared while the gate was closed: a new job
                // took its lock (ShedLock's INSERT … ON CONFLICT DO NOTHING).
                for (name, row) in &now {
                    let Some(row) = row else { continue };
                    if !known.contains_key(name) && !found.contains_key(name) {
                        p.ran.push(format!(
                            "{name}: taken by {} at {} while the gate was closed",
                            row.by(),
                            row.locked_at.as_deref().unwrap_or("(none)")
                        ));
                        found.insert(name.clone(), row.clone());
                    }
                }
                let names: Vec<String> = now
                    .keys()
                    .cloned()
                    .chain(known.keys().cloned())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                for name in freeze(db, table, &names, marker)? {
                    if known.contains_key(&name) {
                        released.insert(name.clone());
                        p.reclosed.push(format!(
                            "{name}: released since the close (its holder finished, or a person)"
                        ));
                    }
                }
                p.running = held_at_close(db, table, prior, marker)?
                    .into_iter()
                    .filter(|(name, _)| !released.contains(name))
                    .map(|(_, what)| what)
                    .collect();
            }
            Gate::Quartz {
                table_prefix,
                scheduler,
                groups,
                ..
            } => {
                let t = QuartzTables::new(db, table_prefix)?;
                lock_quartz(db, &t, scheduler)?;
                let all = groups.is_none();
                let now = quartz_groups(db, &t, scheduler, groups)?;
                p.reclosed = pause_quartz(db, &t, scheduler, &now, all)?
                    .into_iter()
                    .map(|i| format!("{i}: not paused (resumed since the close)"))
                    .collect();
                let rows = db.query(
                    "list Quartz jobs still executing",
                    &format!(
                        // job_name, job_group and the two flags may be
                        // NULL in Quartz's own DDL (a trigger fired for a
                        // job since deleted); Quartz reads a NULL flag as
                        // false. The database's clock is for the
                        // restored copy's T, and as a hint (see `judge`).
                        "SELECT f.entry_id::text, f.trigger_group::text || '.' || f.trigger_name::text,
                                coalesce(f.job_group::text, '?') || '.' || coalesce(f.job_name::text, '?'),
                                f.instance_name::text, f.fired_time,
                                coalesce(f.requests_recovery, false), coalesce(f.is_nonconcurrent, false),
                                s.last_checkin_time, s.checkin_interval,
                                EXISTS (SELECT FROM {st} WHERE sched_name = $1),
                                (extract(epoch FROM clock_timestamp()) * 1000)::bigint
                           FROM {ft} f LEFT JOIN {st} s
                             ON s.sched_name = f.sched_name AND s.instance_name = f.instance_name
                          WHERE f.sched_name = $1 AND f.trigger_group = ANY($2) AND f.state = 'EXECUTING'
                          ORDER BY f.fired_time, f.entry_id",
                        ft = t.fired,
                        st = t.state
                    ),
                    &[scheduler, &now],
                )?;
                let looked = Instant::now();
                let restored_copy = c.at.database == RESTORED;
                let retired = self.retired.as_deref() == Some(c.at.database.as_str());
                for r in &rows {
                    let row = FiredRow {
                        entry_id: r.get(0),
                        trigger: r.get(1),
                        job: r.get(2),
                        instance: r.get(3),
                        fired_ms: r.get(4),
                        requests_recovery: r.get(5),
                        nonconcurrent: r.get(6),
                        checkin: r.get::<_, Option<i64>>(7).zip(r.get::<_, Option<i64>>(8)),
                    };
                    let (clustered, now_ms): (bool, i64) = (r.get(9), r.get(10));
                    let unchanged_ms = row.checkin.map_or(0, |(checkin, _)| {
                        let key = (
                            c.at.database.clone(),
                            t.fired.clone(),
                            scheduler.clone(),
                            row.instance.clone(),
                        );
                        unchanged_for(seen, key, checkin, looked)
                    });
                    match judge(
                        &row,
                        restored_copy,
                        self.t_ms,
                        clustered,
                        now_ms,
                        unchanged_ms,
                    ) {
                        None => {
                            p.running.push(format!(
                                "{} (job {} on {}, fired {})",
                                row.trigger,
                                row.job,
                                row.instance,
                                millis_utc(row.fired_ms)
                            ));
                            p.waited_entries.push(row.entry_id);
                        }
                        Some(why) => p.ghosts.push(Ghost {
                            gate: c.at.gate.name().to_owned(),
                            database: c.at.database.clone(),
                            then: then(&row, &c.at.database, retired, clustered),
                            fired: millis_utc(row.fired_ms),
                            entry_id: row.entry_id,
                            instance: row.instance,
                            trigger: row.trigger,
                            job: row.job,
                            why,
                            requests_recovery: row.requests_recovery,
                            nonconcurrent: row.nonconcurrent,
                        }),
                    }
                }
            }
        }
        Ok(p)
    }
}

/// What the verify step journals as its effect's detail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct VerifyDetail {
    /// Rows re-opened since the close, closed again.
    pub reclosed: Vec<String>,
    /// Locks taken while the gates were closed.
    pub ran_while_closed: Vec<String>,
    /// Jobs from before the close it waited for.
    pub waited_for: Vec<String>,
    /// Quartz runs listed as executing that no live scheduler runs: not
    /// waited for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ghosts: Vec<Ghost>,
}

impl VerifyDetail {
    fn of(effect: &Effect) -> Option<VerifyDetail> {
        serde_json::from_value(effect.detail.clone()).ok()
    }
}

impl Step for Verify {
    fn nature(&self) -> Nature {
        Nature::AfterClose
    }

    fn writes(&self) -> Vec<&str> {
        self.closed.iter().map(|c| c.at.database.as_str()).collect()
    }

    fn preview(&self, _env: &mut Env) -> Result<Effect, StepError> {
        let quartz = self
            .closed
            .iter()
            .any(|c| matches!(c.at.gate, Gate::Quartz { .. }));
        Ok(Effect::said(format!(
            "check that all {} close(s) still hold and close again what was re-opened; wait up to {} for jobs running since before the close{}",
            self.closed.len(),
            humantime::format_duration(Duration::from_secs(self.drain_seconds as u64)),
            if quartz {
                " (not for Quartz runs no live scheduler runs: on the restored copy those from T, anywhere those of an instance Quartz counts failed; each is named)"
            } else {
                ""
            }
        )))
    }

    fn evidence(&self, effect: &Effect) -> Option<super::Evidence> {
        let d = VerifyDetail::of(effect)?;
        if d.ghosts.is_empty() {
            return None;
        }
        let count =
            |f: &dyn Fn(&Ghost) -> bool| d.ghosts.iter().filter(|g| f(g)).count().to_string();
        Some(super::Evidence {
            section: "Quartz runs not waited for".into(),
            columns: [
                "not running",
                "ghosts of T (restored copy)",
                "of instances Quartz counts failed",
                "requesting recovery (Quartz re-runs them)",
            ]
            .map(String::from)
            .to_vec(),
            row: vec![
                d.ghosts.len().to_string(),
                count(&|g| g.why.of_t()),
                count(&|g| !g.why.of_t()),
                count(&|g| g.requests_recovery),
            ],
            lines: d.ghosts.iter().map(Ghost::describe).collect(),
        })
    }

    fn apply(&self, env: &mut Env, rec: &mut Recorder) -> Result<Effect, StepError> {
        let marker = env.marker();
        let started = Instant::now();
        let deadline = started + Duration::from_secs_f64(self.drain_seconds);
        let (mut reclosed, mut ran) = (Vec::new(), Vec::new());
        let mut released: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut waited_for: BTreeSet<String> = BTreeSet::new();
        // By gate, database and entry: a run waited for may turn out a
        // ghost once Quartz counts its instance failed.
        let mut ghosts: BTreeMap<(String, String, String), Ghost> = BTreeMap::new();
        let mut seen = Checkins::new();
        loop {
            let mut running = Vec::new();
            for c in &self.closed {
                let prior = rec.prior_of::<GateState>(&c.step)?.ok_or_else(|| {
                    StepError::State(format!("the journal holds no prior state from {}", c.step))
                })?;
                let prior = state_of(&c.at.gate, prior, &c.step)?;
                let database = c.at.database.clone();
                let mut found = found_by_verify(rec, &c.step)?;
                let known: BTreeSet<String> = found.keys().cloned().collect();
                let rel = released.entry(c.step.clone()).or_default();
                let p = env.db(&database)?.transaction("BEGIN", |db| {
                    let p = self
                        .pass(c, db, &prior, &mut found, (rel, &mut seen), &marker)
                        .on(&database)?;
                    // Journaled before the commit that freezes them: the
                    // re-open restores what the job had written.
                    for (name, row) in found.iter().filter(|(n, _)| !known.contains(*n)) {
                        rec.prior_keyed(&found_key(&c.step, name), row)?;
                    }
                    Ok::<_, StepError>(p)
                })?;
                let at = |s: String| format!("{}@{database}: {s}", c.at.gate.name());
                reclosed.extend(p.reclosed.into_iter().map(at));
                ran.extend(p.ran.into_iter().map(at));
                running.extend(p.running.into_iter().map(at));
                for g in p.ghosts {
                    let key = (g.gate.clone(), g.database.clone(), g.entry_id.clone());
                    ghosts.insert(key, g);
                }
                // Its check-in advanced again: live after all.
                for e in p.waited_entries {
                    ghosts.remove(&(c.at.gate.name().to_owned(), database.clone(), e));
                }
            }
            waited_for.extend(running.iter().cloned());
            if running.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                let mut findings = running.clone();
                findings.extend(
                    ghosts
                        .values()
                        .map(|g| format!("not waited for: {}", g.describe())),
                );
                return Err(StepError::Check {
                    message: format!(
                        "{} job(s) that started before the gates closed are still running after {}: the gates stay closed; wait for them (or stop them), then resume",
                        running.len(),
                        humantime::format_duration(Duration::from_secs(self.drain_seconds as u64))
                    ),
                    findings,
                });
            }
            rec.sleep_until(SystemTime::now() + Duration::from_millis(200))?;
        }
        let mut parts = Vec::new();
        if reclosed.is_empty() && ran.is_empty() {
            parts.push(format!("all {} close(s) still hold", self.closed.len()));
        }
        if !reclosed.is_empty() {
            parts.push(format!(
                "closed again {} row(s) re-opened since the close",
                reclosed.len()
            ));
        }
        if !ran.is_empty() {
            parts.push(format!(
                "{} lock(s) taken while the gates were closed: a job the gate does not cover ran; now frozen, and restored at re-open",
                ran.len()
            ));
        }
        if !waited_for.is_empty() {
            parts.push(format!(
                "waited {:.1}s for {} job(s) running since before the close",
                started.elapsed().as_secs_f64(),
                waited_for.len()
            ));
        }
        let ghosts: Vec<Ghost> = ghosts.into_values().collect();
        if !ghosts.is_empty() {
            let named: Vec<String> = ghosts
                .iter()
                .take(3)
                .map(|g| {
                    format!(
                        "{} on {}@{} ({})",
                        g.trigger,
                        g.instance,
                        g.database,
                        g.why.short()
                    )
                })
                .collect();
            let more = ghosts.len().saturating_sub(named.len());
            parts.push(format!(
                "did not wait for {} Quartz run(s) no live scheduler runs: {}{}",
                ghosts.len(),
                named.join(", "),
                if more > 0 {
                    format!(", +{more} (see the report)")
                } else {
                    String::new()
                }
            ));
            let rerun = ghosts.iter().filter(|g| g.requests_recovery).count();
            if rerun > 0 {
                parts.push(format!(
                    "{rerun} of them request recovery: Quartz re-runs such a job through a trigger in {QUARTZ_RECOVERY_GROUP}, which the gate holds paused until it re-opens"
                ));
            }
        }
        let items: Vec<String> = ran.iter().chain(reclosed.iter()).cloned().collect();
        Ok(Effect {
            summary: parts.join("; "),
            count: items.len() as u64,
            items,
            detail: serde_json::to_value(VerifyDetail {
                reclosed,
                ran_while_closed: ran,
                waited_for: waited_for.into_iter().collect(),
                ghosts,
            })
            .expect("verify details serialize"),
        })
    }
}

// ---- Planning: the gates' steps.

fn declared(p: &Playbook) -> Vec<(Gate, Vec<String>, Option<crate::reentry::playbook::Check>)> {
    let g = &p.gates;
    let mut out = Vec::new();
    for x in &g.system_gate {
        out.push((
            Gate::SystemGate {
                name: x.name.clone(),
                table: x.table.clone().unwrap_or_else(|| "system_gate".into()),
            },
            x.databases.clone(),
            x.health_check.clone(),
        ));
    }
    for x in &g.shedlock {
        out.push((
            Gate::Shedlock {
                name: x.name.clone(),
                table: x.table.clone().unwrap_or_else(|| "shedlock".into()),
                locks: x.locks.clone(),
            },
            x.databases.clone(),
            x.health_check.clone(),
        ));
    }
    for x in &g.quartz {
        out.push((
            Gate::Quartz {
                name: x.name.clone(),
                table_prefix: fold_unquoted(x.table_prefix.as_deref().unwrap_or("qrtz_")),
                scheduler: x.scheduler.clone(),
                groups: x.groups.clone(),
                misfire_threshold_ms: duration_ms(x.misfire_threshold.as_deref(), "60s") as u64,
            },
            x.databases.clone(),
            x.health_check.clone(),
        ));
    }
    out
}

/// Every gate closes first (on each of its databases), then the cache
/// wait, the verify step and the probe; at the end, in `reopen-order`,
/// each gate's health check and re-open on the databases the way back
/// keeps.
fn plan(p: &Playbook, ctx: &PlanCtx) -> Vec<PlannedStep> {
    let retired = ctx.retired;
    let mut out = Vec::new();
    let all = declared(p);
    let mut closed = Vec::new();
    for (gate, dbs, _) in &all {
        for d in dbs {
            let id = format!("close:{}@{d}", gate.name());
            let at = GateAt {
                gate: gate.clone(),
                database: d.clone(),
            };
            closed.push(Closed {
                step: id.clone(),
                at: at.clone(),
            });
            out.push(step(
                id,
                Phase::CloseGates,
                format!("close {} `{}` on {d}", gate.kind(), gate.name()),
                super::Action::CloseGate(at),
            ));
        }
    }
    let ttl = p
        .gates
        .cache_ttl
        .as_deref()
        .and_then(|t| humantime::parse_duration(t).ok())
        .unwrap_or_default();
    if !ttl.is_zero() && !closed.is_empty() {
        out.push(step(
            "wait:gate-cache".into(),
            Phase::Settle,
            format!(
                "wait the gate cache TTL ({})",
                humantime::format_duration(ttl)
            ),
            super::Action::WaitGateCache(WaitCache {
                ttl_seconds: ttl.as_secs_f64(),
                after: closed.iter().map(|c| c.step.clone()).collect(),
            }),
        ));
    }
    if !closed.is_empty() {
        out.push(step(
            VERIFY_STEP.into(),
            Phase::Settle,
            "confirm every gate is still closed".into(),
            super::Action::VerifyGates(Verify {
                closed: closed.clone(),
                drain_seconds: duration_ms(p.gates.drain_timeout.as_deref(), "60s") as f64 / 1000.0,
                t_ms: ctx.t_ms,
                retired: Some(retired.to_owned()),
            }),
        ));
    }
    if let Some(probe) = &p.gates.probe {
        out.push(step(
            "probe:gates".into(),
            Phase::Settle,
            format!("gate probe on {}", probe.database),
            super::Action::Check(Query {
                role: Role::Probe,
                name: "gate probe".into(),
                database: probe.database.clone(),
                sql: probe.sql.clone(),
            }),
        ));
    }

    for name in &p.gates.reopen_order {
        let Some((gate, dbs, health)) = all.iter().find(|(g, _, _)| g.name() == name) else {
            continue;
        };
        let reopening: Vec<&String> = dbs.iter().filter(|d| *d != retired).collect();
        if reopening.is_empty() {
            continue;
        }
        if let Some(h) = health {
            out.push(step(
                format!("health:{name}"),
                Phase::Reopen,
                format!("health check before `{name}` re-opens"),
                super::Action::Check(Query {
                    role: Role::HealthCheck,
                    name: format!("health check of `{name}`"),
                    database: h.database.clone(),
                    sql: h.sql.clone(),
                }),
            ));
        }
        for d in reopening {
            out.push(step(
                format!("reopen:{name}@{d}"),
                Phase::Reopen,
                format!("re-open {} `{name}` on {d}", gate.kind()),
                super::Action::ReopenGate(Reopen {
                    gate: gate.clone(),
                    database: d.clone(),
                    close_step: format!("close:{name}@{d}"),
                    shares_scheduler: sharers(&all, gate, d, &p.gates.reopen_order),
                }),
            ));
        }
    }
    out
}

/// The same Quartz scheduler: one database, table prefix and scheduler name.
fn same_scheduler(a: &Gate, b: &Gate) -> bool {
    match (a, b) {
        (
            Gate::Quartz {
                table_prefix: pa,
                scheduler: sa,
                ..
            },
            Gate::Quartz {
                table_prefix: pb,
                scheduler: sb,
                ..
            },
        ) => pa == pb && sa == sb,
        _ => false,
    }
}

/// The other Quartz gates on `gate`'s scheduler on `database`, with the
/// steps that close and re-open them.
fn sharers(
    all: &[(Gate, Vec<String>, Option<Check>)],
    gate: &Gate,
    database: &str,
    order: &[String],
) -> Vec<Sharer> {
    all.iter()
        .filter(|(g, dbs, _)| {
            g.name() != gate.name() && same_scheduler(g, gate) && dbs.iter().any(|d| d == database)
        })
        .map(|(g, _, _)| Sharer {
            gate: g.clone(),
            close_step: format!("close:{}@{database}", g.name()),
            reopen_step: order
                .iter()
                .any(|n| n == g.name())
                .then(|| format!("reopen:{}@{database}", g.name())),
        })
        .collect()
}

fn no_time(_: &Playbook) -> bool {
    false
}

/// The gates that stay closed on the retired database, said in every plan.
fn notes(p: &Playbook, ctx: &PlanCtx) -> Vec<String> {
    let way = match p.playbook.way_back {
        crate::reentry::playbook::WayBack::Cutover => "the cutover retires it",
        crate::reentry::playbook::WayBack::SelectiveRepair => "it is only the source of the repair",
    };
    let retired = ctx.retired;
    let all = declared(p);
    let stay: Vec<String> = all
        .iter()
        .filter(|(_, dbs, _)| dbs.iter().any(|d| d == retired))
        .map(|(g, _, _)| g.name().to_owned())
        .collect();
    let mut out = Vec::new();
    if !stay.is_empty() {
        out.push(format!(
            "gates stay closed on {retired} ({way}): {}",
            stay.join(", ")
        ));
    }
    let mut told = BTreeSet::new();
    for (g, dbs, _) in &all {
        for d in dbs {
            let mut names: Vec<&str> = all
                .iter()
                .filter(|(o, odbs, _)| same_scheduler(o, g) && odbs.contains(d))
                .map(|(o, _, _)| o.name())
                .collect();
            names.sort_unstable();
            if names.len() > 1 && told.insert((d.clone(), names.clone())) {
                out.push(format!(
                    "Quartz gates {} share a scheduler on {d}: a group more than one of them holds ({QUARTZ_RECOVERY_GROUP} for every gate that names groups) stays paused until the last of them re-opens",
                    names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
                ));
            }
        }
    }
    for (g, _, _) in &all {
        if let Gate::Quartz {
            name,
            groups: Some(groups),
            ..
        } = g
        {
            if !groups.iter().any(|x| x == QUARTZ_RECOVERY_GROUP) {
                out.push(format!(
                    "Quartz gate `{name}` also holds {QUARTZ_RECOVERY_GROUP}: Quartz re-runs a failed instance's requests-recovery job through a trigger in that group, whatever the job's group, so re-runs of jobs outside {} wait for the re-open too",
                    groups.join(", ")
                ));
            }
        }
    }
    out
}

/// The tables each gate needs on each of its databases.
fn needs(p: &Playbook) -> Vec<Need<'_>> {
    let mut out = Vec::new();
    let g = &p.gates;
    for (i, x) in g.system_gate.iter().enumerate() {
        for d in &x.databases {
            out.push(Need {
                database: d,
                table: x.table.clone().unwrap_or_else(|| "system_gate".into()),
                columns: vec!["gate_name".into(), "enabled".into()],
                path: vec![
                    Seg::Key("gates"),
                    Seg::Key("system-gate"),
                    Seg::Index(i),
                    Seg::Key("name"),
                ],
                what: format!("gate `{}`", x.name),
            });
        }
    }
    for (i, x) in g.shedlock.iter().enumerate() {
        for d in &x.databases {
            out.push(Need {
                database: d,
                table: x.table.clone().unwrap_or_else(|| "shedlock".into()),
                columns: vec![
                    "name".into(),
                    "lock_until".into(),
                    "locked_at".into(),
                    "locked_by".into(),
                ],
                path: vec![
                    Seg::Key("gates"),
                    Seg::Key("shedlock"),
                    Seg::Index(i),
                    Seg::Key("name"),
                ],
                what: format!("gate `{}`", x.name),
            });
        }
    }
    for (i, x) in g.quartz.iter().enumerate() {
        let prefix = x.table_prefix.as_deref().unwrap_or("qrtz_");
        // A missing table is most likely a wrong prefix: point at it.
        let key = if x.table_prefix.is_some() {
            "table-prefix"
        } else {
            "name"
        };
        for d in &x.databases {
            for (table, columns) in QuartzTables::needed(prefix) {
                out.push(Need {
                    database: d,
                    table,
                    columns: columns.into_iter().map(Into::into).collect(),
                    path: vec![
                        Seg::Key("gates"),
                        Seg::Key("quartz"),
                        Seg::Index(i),
                        Seg::Key(key),
                    ],
                    what: format!("gate `{}`", x.name),
                });
            }
        }
    }
    out
}

/// The gate probe, prepared by the online checks.
fn queries(p: &Playbook) -> Vec<Prepared<'_>> {
    let mut out: Vec<Prepared<'_>> = p
        .gates
        .probe
        .iter()
        .map(|probe| Prepared {
            path: vec![Seg::Key("gates"), Seg::Key("probe"), Seg::Key("sql")],
            database: &probe.database,
            sql: probe.sql.as_str().into(),
        })
        .collect();
    // Health checks too: a plan shows a broken one where it is written,
    // not when its gate is about to re-open.
    let checks = (p
        .gates
        .system_gate
        .iter()
        .map(|g| ("system-gate", g.health_check.as_ref())))
    .enumerate()
    .chain(
        p.gates
            .shedlock
            .iter()
            .map(|g| ("shedlock", g.health_check.as_ref()))
            .enumerate(),
    )
    .chain(
        p.gates
            .quartz
            .iter()
            .map(|g| ("quartz", g.health_check.as_ref()))
            .enumerate(),
    );
    for (i, (kind, check)) in checks {
        if let Some(h) = check {
            out.push(Prepared {
                path: vec![
                    Seg::Key("gates"),
                    Seg::Key(kind),
                    Seg::Index(i),
                    Seg::Key("health-check"),
                    Seg::Key("sql"),
                ],
                database: &h.database,
                sql: h.sql.as_str().into(),
            });
        }
    }
    out
}

/// Gates: unique names, declared databases, a re-open for each close.
fn meaning(m: &mut Meaning) {
    // Gates: unique names, real databases, and a re-open for each close.
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    let mut gate_dbs: Vec<(&'static str, usize, &Vec<String>, Option<&Check>)> = Vec::new();
    for (i, g) in m.p.gates.system_gate.iter().enumerate() {
        gate_dbs.push(("system-gate", i, &g.databases, g.health_check.as_ref()));
    }
    for (i, g) in m.p.gates.shedlock.iter().enumerate() {
        gate_dbs.push(("shedlock", i, &g.databases, g.health_check.as_ref()));
    }
    for (i, g) in m.p.gates.quartz.iter().enumerate() {
        gate_dbs.push(("quartz", i, &g.databases, g.health_check.as_ref()));
    }
    let mut index_in_kind: BTreeMap<&str, usize> = BTreeMap::new();
    for (kind, name) in m.p.gate_names() {
        let i = index_in_kind.entry(kind).or_default();
        if let Some(other) = seen.insert(name, kind) {
            m.error(
                &[
                    Seg::Key("gates"),
                    Seg::Key(kind),
                    Seg::Index(*i),
                    Seg::Key("name"),
                ],
                format!("gate `{name}` is declared twice ([[gates.{other}]] and [[gates.{kind}]])"),
            );
        }
        *i += 1;
    }

    for (kind, i, dbs, health) in gate_dbs {
        if dbs.is_empty() {
            m.error(
                &[
                    Seg::Key("gates"),
                    Seg::Key(kind),
                    Seg::Index(i),
                    Seg::Key("databases"),
                ],
                "a gate needs at least one database".into(),
            );
        }
        for (j, d) in dbs.iter().enumerate() {
            m.database(
                &[
                    Seg::Key("gates"),
                    Seg::Key(kind),
                    Seg::Index(i),
                    Seg::Key("databases"),
                    Seg::Index(j),
                ],
                d,
            );
        }
        if let Some(h) = health {
            m.database(
                &[
                    Seg::Key("gates"),
                    Seg::Key(kind),
                    Seg::Index(i),
                    Seg::Key("health-check"),
                    Seg::Key("database"),
                ],
                &h.database,
            );
        }
    }
    let order = &m.p.gates.reopen_order;
    for (i, name) in order.iter().enumerate() {
        if !seen.contains_key(name.as_str()) {
            m.error(
                &[Seg::Key("gates"), Seg::Key("reopen-order"), Seg::Index(i)],
                format!("`{name}` is re-opened but never closed: no gate of that name"),
            );
        } else if order[..i].contains(name) {
            m.error(
                &[Seg::Key("gates"), Seg::Key("reopen-order"), Seg::Index(i)],
                format!("`{name}` is re-opened twice"),
            );
        }
    }
    for name in seen.keys() {
        if !order.iter().any(|o| o == name) {
            m.error(
                &[Seg::Key("gates"), Seg::Key("reopen-order")],
                format!("gate `{name}` is closed but never re-opened; add it to reopen-order"),
            );
        }
    }
    if let Some(p) = &m.p.gates.probe {
        m.database(
            &[Seg::Key("gates"), Seg::Key("probe"), Seg::Key("database")],
            &p.database,
        );
    }
}

/// A Quartz gate must gate something: its scheduler has state in each of
/// its databases (where its tables were found), and each group it names
/// exists there.
fn online(
    p: &Playbook,
    dbs: &mut BTreeMap<&str, Db>,
    broken: &BTreeSet<(String, String)>,
) -> Vec<Diagnostic> {
    let mut errors = Vec::new();
    for (i, x) in p.gates.quartz.iter().enumerate() {
        for d in &x.databases {
            if broken.contains(&(format!("gate `{}`", x.name), d.clone())) {
                continue;
            }
            if let Some(db) = dbs.get_mut(d.as_str()) {
                errors.extend(quartz_gates_something(p, i, x, d, db));
            }
        }
    }
    errors
}

/// A Quartz gate must gate something: its scheduler has state in the
/// database, and each group it names exists there. Names are compared as
/// Quartz compares them, exactly; the message lists what does exist.
fn quartz_gates_something(
    p: &Playbook,
    i: usize,
    x: &crate::reentry::playbook::Quartz,
    database: &str,
    db: &mut Db,
) -> Vec<Diagnostic> {
    let prefix = fold_unquoted(x.table_prefix.as_deref().unwrap_or("qrtz_"));
    let mut t = |name: &str| {
        let n = format!("{prefix}{name}");
        db.table(&n).unwrap_or_else(|_| quote_qualified(&n))
    };
    let (triggers, locks, paused) = (t("triggers"), t("locks"), t("paused_trigger_grps"));
    let at = |key: &'static str, j: Option<usize>| {
        let mut path = vec![
            Seg::Key("gates"),
            Seg::Key("quartz"),
            Seg::Index(i),
            Seg::Key(key),
        ];
        if let Some(j) = j {
            path.push(Seg::Index(j));
        }
        path
    };
    let mut out = Vec::new();
    let schedulers = db.query(
        "list Quartz schedulers",
        &format!(
            "SELECT sched_name::text FROM {} UNION SELECT sched_name::text FROM {}
              UNION SELECT sched_name::text FROM {} ORDER BY 1",
            triggers, locks, paused
        ),
        &[],
    );
    let schedulers: Vec<String> = match schedulers {
        Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
        Err(e) => {
            out.push(p.at(&at("scheduler", None), format!("gate `{}`: {e}", x.name)));
            return out;
        }
    };
    if !schedulers.contains(&x.scheduler) {
        let there = if schedulers.is_empty() {
            "none has any trigger or lock there".to_owned()
        } else {
            format!("schedulers there: {}", schedulers.join(", "))
        };
        out.push(p.at(
            &at("scheduler", None),
            format!(
                "gate `{}`: Quartz scheduler `{}` has no triggers or locks in databases.{database} ({prefix}*), so the gate would pause nothing; {there}",
                x.name, x.scheduler
            ),
        ));
        return out;
    }
    let Some(groups) = &x.groups else {
        return out;
    };
    let existing: Vec<String> = match db.query(
        "list Quartz trigger groups",
        &format!(
            "SELECT trigger_group::text FROM {} WHERE sched_name = $1
              UNION SELECT trigger_group::text FROM {} WHERE sched_name = $1 AND trigger_group <> $2 ORDER BY 1",
            triggers, paused
        ),
        &[&x.scheduler, &QUARTZ_ALL_GROUPS],
    ) {
        Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
        Err(e) => {
            out.push(p.at(&at("groups", None), format!("gate `{}`: {e}", x.name)));
            return out;
        }
    };
    for (j, g) in groups.iter().enumerate() {
        if !existing.contains(g) {
            out.push(p.at(
                &at("groups", Some(j)),
                format!(
                    "gate `{}`: scheduler `{}` has no trigger group `{g}` in databases.{database}; groups there: {}",
                    x.name,
                    x.scheduler,
                    if existing.is_empty() { "none".to_owned() } else { existing.join(", ") }
                ),
            ));
        }
    }
    out
}

pub const KIND: StepKind = StepKind {
    online,
    meaning,
    steps: plan,
    needs_time: no_time,
    notes,
    needs,
    queries,
    keys: &[],
};

#[cfg(test)]
mod tests {
    use super::*;

    /// Prior states as the build before typed states journaled them.
    const OLD: [&str; 4] = [
        r#"{"gate_name":"api-writes","enabled":true,"updated_at":"2026-11-28T18:40:00+00:00"}"#,
        r#"null"#,
        r#"{"locks":{"escalate":{"name":"escalate","lock_until":"2026-11-28T18:40:00+00:00","locked_at":"2026-11-28T18:39:00+00:00","locked_by":"app-1"},"report":null}}"#,
        r#"{"groups":["billing"],"all-groups":false,"paused-groups":[],"triggers":[{"name":"t1","group":"billing","state":"WAITING"}]}"#,
    ];

    #[test]
    fn an_older_builds_prior_states_read_typed_and_write_back_unchanged() {
        let states: Vec<GateState> = OLD
            .iter()
            .map(|s| serde_json::from_str(s).unwrap())
            .collect();
        assert!(matches!(&states[0], GateState::SystemGate(Some(_))));
        assert_eq!(states[0].enabled(), Some(&Value::Bool(true)));
        assert!(matches!(&states[1], GateState::SystemGate(None)));
        let GateState::Shedlock(s) = &states[2] else {
            panic!("not a ShedLock state: {:?}", states[2]);
        };
        assert_eq!(s.locks["escalate"].as_ref().unwrap().by(), "app-1");
        assert!(s.locks["report"].is_none());
        let GateState::Quartz(q) = &states[3] else {
            panic!("not a Quartz state: {:?}", states[3]);
        };
        assert_eq!(q.triggers[0].state, "WAITING");
        // What jsonb_populate_record gets back is the row as it was read.
        for (old, typed) in OLD.iter().zip(&states) {
            let again: Value = serde_json::to_value(typed).unwrap();
            assert_eq!(again, serde_json::from_str::<Value>(old).unwrap());
        }
    }

    fn fired(fired_ms: i64, checkin: Option<(i64, i64)>) -> FiredRow {
        FiredRow {
            entry_id: "lab-1_1".into(),
            trigger: "Billing.t".into(),
            job: "Billing.t".into(),
            instance: "lab-1".into(),
            fired_ms,
            requests_recovery: false,
            nonconcurrent: false,
            checkin,
        }
    }

    const T: i64 = 1_764_072_000_000;

    #[test]
    fn quartz_counts_an_instance_failed_past_checkin_plus_interval_plus_7500_ms() {
        let row = fired(T + 60_000, Some((T + 100_000, 20_000)));
        // check-in + interval + 7.5 s = T + 127 500: not before, as Quartz
        // compares (`calcFailedIfAfter(rec) < timeNow`).
        // By reentry's watch: unchanged for interval + 7.5 s.
        assert_eq!(judge(&row, false, Some(T), true, T + 127_501, 27_499), None);
        let why = judge(&row, false, Some(T), true, T + 127_501, 27_500).unwrap();
        assert!(
            matches!(
                why,
                GhostWhy::Failed {
                    interval_ms: 20_000,
                    ..
                }
            ),
            "{why:?}"
        );
        assert!(
            why.describe()
                .contains("check-in + interval + 7.5 s, 2025-11-25T12:02:07.500Z"),
            "{}",
            why.describe()
        );
        assert!(
            why.describe()
                .contains("the check-in did not advance in 27.5 s reentry watched it"),
            "{}",
            why.describe()
        );
        // No check-in row in a clustered store: an orphan, as Quartz says.
        assert_eq!(
            judge(&fired(T, None), false, None, true, T, 0),
            Some(GhostWhy::NoCheckin)
        );
        // No check-in row at all: not clustered, nothing says it stopped.
        assert_eq!(
            judge(&fired(T, None), false, None, false, T + 3_600_000, 0),
            None
        );
    }

    #[test]
    fn an_instance_is_failed_by_its_check_in_not_advancing_not_by_the_databases_clock_alone() {
        let row = fired(T + 60_000, Some((T + 100_000, 1_000)));
        // The database's clock an hour ahead of the JVM's: the check-in
        // looks 8.5 s stale at once, but a live instance advances it every
        // second, so it is never seen unchanged for its interval.
        let ahead = T + 100_000 + 3_600_000;
        assert_eq!(judge(&row, false, None, true, ahead, 0), None);
        assert_eq!(judge(&row, false, None, true, ahead, 999), None);
        // Not advanced for an interval, a check-in a little late: still
        // Quartz's grace, whatever the database's clock says.
        assert_eq!(judge(&row, false, None, true, ahead, 1_000), None);
        assert_eq!(judge(&row, false, None, true, ahead, 8_499), None);
        assert!(matches!(
            judge(&row, false, None, true, ahead, 8_500),
            Some(GhostWhy::Failed {
                unchanged_ms: 8_500,
                ..
            })
        ));
        // The database's clock behind: only interval + 7.5 s unchanged,
        // watched by reentry's own clock, counts.
        let behind = T;
        assert_eq!(judge(&row, false, None, true, behind, 8_499), None);
        assert!(matches!(
            judge(&row, false, None, true, behind, 8_500),
            Some(GhostWhy::Failed { .. })
        ));
    }

    #[test]
    fn a_check_in_is_unchanged_from_when_its_value_was_first_read() {
        let mut seen = Checkins::new();
        let key = || {
            (
                "d".to_owned(),
                "f".to_owned(),
                "s".to_owned(),
                "i".to_owned(),
            )
        };
        let t0 = Instant::now();
        assert_eq!(unchanged_for(&mut seen, key(), 5, t0), 0);
        assert_eq!(
            unchanged_for(&mut seen, key(), 5, t0 + Duration::from_millis(700)),
            700
        );
        // Advanced (any change: a check-in is the instance's, not ours).
        assert_eq!(
            unchanged_for(&mut seen, key(), 6, t0 + Duration::from_millis(900)),
            0
        );
        assert_eq!(
            unchanged_for(&mut seen, key(), 6, t0 + Duration::from_millis(1_000)),
            100
        );
    }

    #[test]
    fn on_the_restored_copy_a_run_from_t_is_a_ghost_and_a_run_since_is_quartzs_to_judge() {
        // Fired by T: the old primary's, whatever the check-ins say.
        let old = fired(T - 5_000, Some((T - 1_000, 7_500)));
        assert!(matches!(
            judge(&old, true, Some(T), true, T + 1_000, 0),
            Some(GhostWhy::FiredBeforeT { .. })
        ));
        assert!(matches!(
            judge(&fired(T - 5_000, None), true, Some(T), false, T + 1_000, 0),
            Some(GhostWhy::FiredBeforeT { .. })
        ));
        // The same row on current is a run to wait for while its instance
        // checks in.
        assert_eq!(judge(&old, false, Some(T), true, T + 1_000, 0), None);
        // A check-in from T on the copy: no scheduler of it runs there.
        assert!(matches!(
            judge(
                &fired(T + 10, Some((T, 600_000))),
                true,
                Some(T),
                true,
                T + 20,
                0
            ),
            Some(GhostWhy::CheckinBeforeT { .. })
        ));
        // A scheduler started on the copy since, checking in: waited for.
        let live = fired(T + 60_000, Some((T + 61_000, 1_000)));
        assert_eq!(judge(&live, true, Some(T), true, T + 62_000, 0), None);
        // Without T, only Quartz's rule.
        assert_eq!(judge(&old, true, None, true, T + 1_000, 0), None);
    }

    #[test]
    fn a_ghosts_recovery_is_said_as_quartz_will_do_it() {
        let mut row = fired(T, Some((T, 1_000)));
        row.requests_recovery = true;
        let s = then(&row, "restored", false, true);
        assert!(s.contains("requests recovery: Quartz re-runs it once, through a new trigger in RECOVERING_JOBS"), "{s}");
        assert!(s.contains("after the re-open"), "{s}");
        let s = then(&row, "current", true, true);
        assert!(
            s.contains("the gates stay closed on current, so that trigger stays paused"),
            "{s}"
        );
        row.requests_recovery = false;
        row.nonconcurrent = true;
        row.checkin = None;
        let s = then(&row, "current", false, true);
        assert!(
            s.contains("Quartz deletes the row when a scheduler starts on current"),
            "{s}"
        );
        assert!(s.contains("and does not run job Billing.t again"), "{s}");
        assert!(s.contains("stay BLOCKED"), "{s}");
    }

    #[test]
    fn a_prior_state_of_another_gate_kind_is_refused() {
        let quartz: GateState = serde_json::from_str(OLD[3]).unwrap();
        let gate = Gate::SystemGate {
            name: "api-writes".into(),
            table: "system_gate".into(),
        };
        let e = state_of(&gate, quartz, "close:api-writes@restored").unwrap_err();
        assert!(e.to_string().contains("not a system-gate's"), "{e}");
    }
}
