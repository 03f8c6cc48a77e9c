//! The plan: a pure function from the playbook (the ordered steps) plus
//! read-only probes (what each would change, by counts and ids). Every
//! precondition is checked here, before any side effect: tables and columns
//! exist, the databases that steps write to accept writes, the restored
//! database is the cluster the restore manifest describes.
//!
//! The way back decides what the plan does at the end: after a cutover the
//! current database is retired, so its gates stay closed; after a selective
//! repair the restored copy is the one left closed.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::backup::restore::RestoreManifest;
use crate::diag::Diagnostics;
use crate::pg::lsn::Lsn;
use crate::reentry::check;
use crate::reentry::playbook::{Playbook, Seg, WayBack};
use crate::reentry::steps::{
    Action, Effect, Env, Nature, OnDatabase, Phase, PlanCtx, StepError, KINDS, KIND_NAMES,
};

pub const PLAN_FILE: &str = "plan.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedStep {
    pub id: String,
    pub phase: Phase,
    pub title: String,
    pub action: Action,
    pub preview: Effect,
}

impl PlannedStep {
    pub fn nature(&self) -> Nature {
        self.action.step().nature()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct PlaybookRef {
    pub name: String,
    pub way_back: WayBack,
    pub file: String,
    /// Of the file's bytes: a resumed run refuses a playbook that changed.
    pub sha256: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct TargetInfo {
    /// `manifest` (from `reentry restore`) or `playbook` (time or LSN given).
    pub source: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
    #[serde(rename = "type")]
    pub kind: String,
    pub value: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reached_lsn: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reached_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeline: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_identifier: Option<String>,
    /// Where the restore left the restored cluster: its port and data
    /// directory, to tell it from the current one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<String>,
}

impl TargetInfo {
    /// T in ms since the epoch: the last commit the restore replayed, else
    /// the target time.
    pub fn time_ms(&self) -> Option<i64> {
        let text = self.reached_time.as_deref().or(if self.kind == "time" {
            self.value.as_deref()
        } else {
            None
        })?;
        crate::time::parse(text).ok().map(crate::time::millis)
    }

    pub fn describe(&self) -> String {
        let mut s = format!(
            "{} {}",
            self.kind,
            self.value.as_deref().unwrap_or("(end of WAL)")
        );
        if let Some(l) = &self.reached_lsn {
            s.push_str(&format!(", reached {l}"));
        }
        if let Some(t) = &self.reached_time {
            s.push_str(&format!(" (last commit {t})"));
        }
        if let Some(m) = &self.manifest {
            s.push_str(&format!(", from {m}"));
        }
        s
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Plan {
    pub format: u32,
    pub playbook: PlaybookRef,
    pub target: TargetInfo,
    pub created_at: String,
    pub steps: Vec<PlannedStep>,
    /// What this plan does not do that the playbook asks for.
    pub notes: Vec<String>,
}

impl Plan {
    /// Steps that would change something.
    pub fn changes(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| {
                s.nature() == Nature::Changes && (s.preview.count > 0 || s.phase == Phase::Reopen)
            })
            .count()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{0}")]
    Playbook(Box<Diagnostics>),
    #[error("the restore manifest {path}: {why}")]
    Manifest { path: String, why: String },
    #[error("databases.{database} is in recovery (read-only), but the plan changes it: promote it first, or take it out of the gates' databases")]
    InRecovery { database: String },
    /// A schema of reentry's name that reentry does not own.
    #[error("{0}")]
    Foreign(String),
    #[error("databases.{database}: {tables}")]
    Legacy { database: String, tables: String },
    #[error("databases.restored is the cluster with system identifier {found}, but the manifest {manifest} describes {expected}: the playbook points at the wrong server")]
    WrongCluster {
        manifest: String,
        expected: String,
        found: String,
    },
    #[error("databases.current and databases.restored are the same database ({what}): re-entry compares two databases and retires one; point `restored` at the restored copy")]
    SameDatabase { what: String },
    #[error(
        "databases.restored is not the cluster the restore manifest {manifest} describes: {why}"
    )]
    NotRestored { manifest: String, why: String },
    #[error("the {kinds} steps compare with T as a time, and the recovery target gives none: name the restore manifest, or give `time`")]
    NoTime { kinds: String },
    #[error("planning {step}")]
    Step {
        step: String,
        #[source]
        source: Box<StepError>,
    },
}

impl PlanError {
    pub fn exit(&self) -> crate::exit::Exit {
        use crate::exit::Exit;
        match self {
            PlanError::Playbook(_) => Exit::Config,
            PlanError::Manifest { .. } => Exit::Config,
            PlanError::InRecovery { .. }
            | PlanError::Foreign(_)
            | PlanError::Legacy { .. }
            | PlanError::WrongCluster { .. }
            | PlanError::SameDatabase { .. }
            | PlanError::NotRestored { .. } => Exit::Refused,
            PlanError::Step { source, .. }
                if matches!(**source, StepError::Input { .. } | StepError::Config(_)) =>
            {
                Exit::Config
            }
            PlanError::NoTime { .. } => Exit::Config,
            PlanError::Step { .. } => Exit::Failure,
        }
    }
}

/// The database that takes writes after re-entry, and the one retired.
pub fn survivor(way: WayBack) -> (&'static str, &'static str) {
    match way {
        WayBack::Cutover => ("restored", "current"),
        WayBack::SelectiveRepair => ("current", "restored"),
    }
}

/// A step with its preview still to come.
pub fn step(id: String, phase: Phase, title: String, action: Action) -> PlannedStep {
    PlannedStep {
        id,
        phase,
        title,
        action,
        preview: Effect::default(),
    }
}

/// The ordered steps, from the playbook alone: each kind's, in the
/// registry's order within a phase, phases in order.
pub fn steps(p: &Playbook, t_ms: Option<i64>) -> Vec<PlannedStep> {
    let (survivor, retired) = survivor(p.playbook.way_back);
    let ctx = PlanCtx {
        t_ms,
        survivor,
        retired,
    };
    let mut out: Vec<PlannedStep> = KINDS.iter().flat_map(|k| (k.steps)(p, &ctx)).collect();
    out.sort_by_key(|s| s.phase);
    out
}

/// The kinds (by module) whose steps compare with T as a time.
fn needs_time(p: &Playbook) -> Vec<&'static str> {
    KINDS
        .iter()
        .zip(KIND_NAMES)
        .filter(|(k, _)| (k.needs_time)(p))
        .map(|(_, n)| *n)
        .collect()
}

/// What each kind says every plan should say about it (what it leaves
/// undone).
pub fn notes(p: &Playbook) -> Vec<String> {
    let (survivor, retired) = survivor(p.playbook.way_back);
    let ctx = PlanCtx {
        t_ms: None,
        survivor,
        retired,
    };
    KINDS.iter().flat_map(|k| (k.notes)(p, &ctx)).collect()
}

/// `ms` since the epoch as RFC 3339 with milliseconds, UTC.
pub fn rfc3339_ms(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn target(p: &Playbook) -> Result<TargetInfo, PlanError> {
    let t = &p.recovery_target;
    if let Some(m) = &t.manifest {
        let path = p.file.parent().unwrap_or(Path::new(".")).join(m);
        let shown = path.display().to_string();
        let bad = |why: String| PlanError::Manifest {
            path: shown.clone(),
            why,
        };
        let text =
            std::fs::read_to_string(&path).map_err(|e| bad(format!("cannot read it: {e}")))?;
        let man: RestoreManifest = serde_json::from_str(&text)
            .map_err(|e| bad(format!("not a reentry restore manifest: {e}")))?;
        return Ok(TargetInfo {
            source: "manifest".into(),
            manifest: Some(shown),
            kind: man.target.kind,
            value: man.target.value,
            reached_lsn: Some(man.reached_lsn.to_string()),
            reached_time: man.reached_time,
            timeline: Some(man.timeline),
            backup_id: Some(man.backup_id),
            system_identifier: Some(man.system_identifier),
            port: Some(man.port),
            data_dir: Some(man.data_dir),
        });
    }
    let (kind, value) = match (&t.time, &t.lsn) {
        (Some(tm), _) => ("time", tm.clone()),
        (_, Some(l)) => ("lsn", l.clone()),
        _ => ("latest", String::new()),
    };
    Ok(TargetInfo {
        source: "playbook".into(),
        kind: kind.into(),
        value: Some(value).filter(|v| !v.is_empty()),
        ..TargetInfo::default()
    })
}

/// Preconditions that need the databases: every table and column, writable
/// databases where the plan writes, the right cluster behind `restored`.
fn preconditions(
    p: &Playbook,
    target: &TargetInfo,
    steps: &[PlannedStep],
    env: &mut Env,
) -> Result<(), PlanError> {
    let errors = check::check_online(p);
    if !errors.is_empty() {
        return Err(PlanError::Playbook(Box::new(Diagnostics::new(
            &p.file, &p.text, errors,
        ))));
    }
    // Every database a step writes to, as each kind says: none may be in
    // recovery (a paused hot standby takes no writes).
    let mut written: Vec<&str> = steps
        .iter()
        .filter(|s| s.nature() != Nature::Reads)
        .flat_map(|s| s.action.step().writes())
        .collect();
    written.sort_unstable();
    written.dedup();
    let step_err = |database: &str, source: StepError| PlanError::Step {
        step: format!("preconditions on {database}"),
        source: Box::new(source),
    };
    for d in written {
        let db = env.db(d).map_err(|e| step_err(d, e))?;
        let row = db
            .query_one(
                "ask whether it is in recovery",
                "SELECT pg_is_in_recovery()",
                &[],
            )
            .on(d)
            .map_err(|e| step_err(d, e))?;
        if row.get::<_, bool>(0) {
            return Err(PlanError::InRecovery {
                database: d.to_owned(),
            });
        }
        // reentry's own schemas, where its steps will write: refused now,
        // before any gate closes, when another role made them.
        for schema in [
            crate::reentry::owned::SCHEMA,
            crate::reentry::steps::rows::SCHEMA,
        ] {
            if let Some(why) = crate::reentry::owned::foreign(db, schema)
                .on(d)
                .map_err(|e| step_err(d, e))?
            {
                return Err(PlanError::Foreign(crate::reentry::owned::refusal(
                    d, schema, &why,
                )));
            }
        }
        // What an earlier release staged under names this build no longer
        // reads: a new run would stage (and compensate) it all again.
        let legacy = crate::reentry::owned::legacy(db)
            .on(d)
            .map_err(|e| step_err(d, e))?;
        if !legacy.is_empty() {
            return Err(PlanError::Legacy {
                database: d.to_owned(),
                tables: legacy.join("; "),
            });
        }
    }
    let cur = Identity::read(env, "current").map_err(|e| step_err("current", e))?;
    let res = Identity::read(env, "restored").map_err(|e| step_err("restored", e))?;
    if cur.same_database(&res) {
        return Err(PlanError::SameDatabase {
            what: res.describe(),
        });
    }
    if let (Some(expected), Some(manifest)) = (&target.system_identifier, &target.manifest) {
        // pg_control_system() may be denied to the playbook's role; then the
        // check cannot be made, and the plan says nothing false.
        if let Some(found) = &res.system_identifier {
            if found != expected {
                return Err(PlanError::WrongCluster {
                    manifest: manifest.clone(),
                    expected: expected.clone(),
                    found: found.clone(),
                });
            }
        }
        if let Some(why) = not_the_restored(target, &cur, &res) {
            return Err(PlanError::NotRestored {
                manifest: manifest.clone(),
                why,
            });
        }
    }
    Ok(())
}

/// What tells two PostgreSQL databases apart, as far as the playbook's
/// role may read it.
#[derive(Debug)]
struct Identity {
    system_identifier: Option<String>,
    started: String,
    database: String,
    port: Option<i32>,
    data_dir: Option<String>,
    in_recovery: bool,
    /// The timeline it writes on (None in recovery).
    timeline: Option<u32>,
    /// Where it writes, or where replay stands in recovery.
    lsn: Option<Lsn>,
}

impl Identity {
    fn read(env: &mut Env, name: &str) -> Result<Identity, StepError> {
        let db = env.db(name)?;
        let row = db
            .query_one(
                "read what identifies the server",
                // inet_server_port() is NULL on a Unix socket, where a
                // fenced restored copy is reached.
                "SELECT pg_postmaster_start_time()::text, current_database()::text,
                        coalesce(inet_server_port(), current_setting('port')::int),
                        (SELECT setting FROM pg_settings WHERE name = 'data_directory'), pg_is_in_recovery()",
                &[],
            )
            .on(name)?;
        let in_recovery: bool = row.get(4);
        let system_identifier = db
            .query_one(
                "read the system identifier",
                "SELECT system_identifier::text FROM pg_control_system()",
                &[],
            )
            .ok()
            .map(|r| r.get(0));
        let wal = db
            .query_one(
                "read the timeline and LSN",
                "SELECT CASE WHEN pg_is_in_recovery() THEN NULL
                             ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END,
                        (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text",
                &[],
            )
            .ok();
        Ok(Identity {
            system_identifier,
            started: row.get(0),
            database: row.get(1),
            port: row.get(2),
            data_dir: row.get(3),
            in_recovery,
            timeline: wal
                .as_ref()
                .and_then(|r| r.get::<_, Option<i32>>(0))
                .map(|t| t as u32),
            lsn: wal
                .as_ref()
                .and_then(|r| r.get::<_, Option<String>>(1))
                .and_then(|l| l.parse().ok()),
        })
    }

    /// The same database of the same running server: the start time of a
    /// postmaster does not repeat.
    fn same_database(&self, other: &Identity) -> bool {
        self.started == other.started
            && self.database == other.database
            && self.port == other.port
            && (self.system_identifier.is_none()
                || other.system_identifier.is_none()
                || self.system_identifier == other.system_identifier)
    }

    fn describe(&self) -> String {
        let mut s = format!("database {}", self.database);
        if let Some(p) = self.port {
            s.push_str(&format!(" on port {p}"));
        }
        if let Some(d) = &self.data_dir {
            s.push_str(&format!(" ({d})"));
        }
        if let Some(id) = &self.system_identifier {
            s.push_str(&format!(", system identifier {id}"));
        }
        s.push_str(&format!(", up since {}", self.started));
        s
    }

    fn position(&self) -> String {
        let lsn = self.lsn.map_or("?".to_owned(), |l| l.to_string());
        match (self.in_recovery, self.timeline) {
            (true, _) => format!("in recovery, replayed to {lsn}"),
            (false, Some(t)) => format!("on timeline {t} at {lsn}"),
            (false, None) => format!("at {lsn}"),
        }
    }
}

/// Why `res` is not the cluster the restore manifest describes, if it is
/// not: a PITR copy shares the system identifier of the cluster it came
/// from, so the timeline the restore opened and the LSN it reached tell
/// them apart, and `current` must not sit where the restore put the copy.
fn not_the_restored(target: &TargetInfo, cur: &Identity, res: &Identity) -> Option<String> {
    let tli = target.timeline?;
    let reached: Lsn = target.reached_lsn.as_deref()?.parse().ok()?;
    let mut why = Vec::new();
    if let Some(t) = res.timeline.filter(|t| *t < tli) {
        why.push(format!(
            "it is on timeline {t}, older than timeline {tli} that the restore opened"
        ));
    }
    if let Some(l) = res.lsn.filter(|l| *l < reached) {
        why.push(format!(
            "it stands at {l}, before {reached} where the restore stopped"
        ));
    }
    let on_its_port = target.port.is_some() && cur.port == target.port.map(i32::from);
    let in_its_dir = match (&cur.data_dir, &target.data_dir) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    };
    let cur_past = cur.timeline.is_none_or(|t| t >= tli) && cur.lsn.is_none_or(|l| l >= reached);
    let current_is_it = on_its_port && in_its_dir && cur_past;
    if why.is_empty() && !current_is_it {
        return None;
    }
    let mut s = format!(
        "databases.restored is {} ({})",
        res.position(),
        res.describe()
    );
    if !why.is_empty() {
        s.push_str(&format!(": {}", why.join("; ")));
    }
    if current_is_it || (cur_past && !why.is_empty()) {
        s.push_str(&format!(
            "; databases.current is {} ({}), {}: current and restored look swapped in the playbook",
            cur.position(),
            cur.describe(),
            if current_is_it {
                format!(
                    "where the manifest put the restored cluster (port {})",
                    target.port.unwrap_or(0)
                )
            } else {
                "as the restored cluster should be".to_owned()
            }
        ));
    }
    Some(s)
}

/// Reads and checks every file the steps read from outside, pinning each
/// in the plan: every problem at once, located in the playbook (exit 78),
/// before anything touches a database.
fn pin(p: &Playbook, steps: &mut [PlannedStep]) -> Result<(), PlanError> {
    let mut errors = Vec::new();
    for s in steps.iter_mut() {
        for (at, message) in s.action.step_mut().pin(&p.file) {
            let path: Vec<Seg> = at
                .iter()
                .map(|k| match k.parse::<usize>() {
                    Ok(i) => Seg::Index(i),
                    Err(_) => Seg::Key(k),
                })
                .collect();
            errors.push(p.at(&path, format!("{}: {message}", s.id)));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(PlanError::Playbook(Box::new(Diagnostics::new(
            &p.file, &p.text, errors,
        ))))
    }
}

/// Builds the plan: the steps, then a read-only preview of each.
pub fn build(p: &Playbook, env: &mut Env) -> Result<Plan, PlanError> {
    let target = target(p)?;
    let t_ms = target.time_ms();
    let timed = needs_time(p);
    if t_ms.is_none() && !timed.is_empty() {
        return Err(PlanError::NoTime {
            kinds: timed.join(", "),
        });
    }
    let mut steps = steps(p, t_ms);
    pin(p, &mut steps)?;
    preconditions(p, &target, &steps, env)?;
    let mut notes = notes(p);
    notes.extend(superusers(p, env)?);
    for s in &mut steps {
        s.preview =
            crate::reentry::steps::guarded(|| s.action.step().preview(env)).map_err(|source| {
                PlanError::Step {
                    step: s.id.clone(),
                    source: Box::new(source),
                }
            })?;
    }
    Ok(Plan {
        format: 1,
        playbook: PlaybookRef {
            name: p.playbook.name.clone(),
            way_back: p.playbook.way_back,
            file: p.file.display().to_string(),
            sha256: sha256_hex(p.text.as_bytes()),
        },
        target,
        created_at: crate::reentry::journal::now(),
        steps,
        notes,
    })
}

/// A note for each database reentry reaches as a superuser: every
/// trigger, rule and default on the tables it writes then runs with a
/// superuser's rights, whoever wrote it.
fn superusers(p: &Playbook, env: &mut Env) -> Result<Vec<String>, PlanError> {
    let mut out = Vec::new();
    for name in p.databases.keys() {
        let db = env.db(name).map_err(|source| PlanError::Step {
            step: format!("preconditions on {name}"),
            source: Box::new(source),
        })?;
        let row = db
            .query_one(
                "ask whether the role is a superuser",
                "SELECT current_user::text, rolsuper FROM pg_roles WHERE rolname = current_user",
                &[],
            )
            .on(name)
            .map_err(|source| PlanError::Step {
                step: format!("preconditions on {name}"),
                source: Box::new(source),
            })?;
        if row.get::<_, bool>(1) {
            out.push(format!(
                "databases.{name}: reentry connects as `{}`, a superuser: the application's triggers, rules and defaults on the tables it writes run with a superuser's rights. Connect as a role that owns reentry's schemas and may change only what the playbook changes",
                row.get::<_, String>(0)
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(name: &str) -> Playbook {
        // The same value the playbook tests set: tests share the process.
        crate::reentry::playbook::set_example_secrets();
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("playbooks")
            .join(name);
        Playbook::load(&path).unwrap()
    }

    #[test]
    fn gates_close_first_and_reopen_last_in_the_declared_order() {
        let p = example("reference.toml");
        let s = steps(&p, Some(0));
        let phases: Vec<Phase> = s.iter().map(|x| x.phase).collect();
        let mut sorted = phases.clone();
        sorted.sort();
        assert_eq!(phases, sorted, "phases out of order");
        assert!(s[0].id.starts_with("close:"));
        let reopened: Vec<&str> = s
            .iter()
            .filter_map(|x| x.id.strip_prefix("reopen:"))
            .collect();
        assert_eq!(
            reopened,
            [
                "api-writes@restored",
                "schedulers@restored",
                "quartz-jobs@restored",
                "outbox-relay@restored"
            ]
        );
        let ids: Vec<&str> = s.iter().map(|x| x.id.as_str()).collect();
        let mut unique = ids.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ids.len(), "step ids repeat: {ids:?}");
    }

    #[test]
    fn the_way_back_decides_which_database_stays_closed() {
        let p = example("payment-ledger.toml");
        assert_eq!(p.playbook.way_back, WayBack::SelectiveRepair);
        let s = steps(&p, Some(0));
        assert!(s
            .iter()
            .filter(|x| x.phase == Phase::Reopen && x.id.starts_with("reopen:"))
            .all(|x| x.id.ends_with("@current")));
        assert!(s.iter().any(|x| x.id == "sequences@current"));
        // Repairs run before validation: sequences see the inserted keys.
        let at = |id: &str| s.iter().position(|x| x.id == id).unwrap();
        assert!(at("rows-apply:account") < at("rows-apply:ledger_entry"));
        assert!(at("rows-apply:ledger_entry") < at("sequences@current"));
        assert!(!notes(&p).iter().any(|n| n.starts_with("[[repair]]")));
    }

    #[test]
    fn the_worked_example_serves_both_ways_back() {
        crate::reentry::playbook::set_example_secrets();
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("playbooks/case-management.toml");
        for (way, survivor, repaired) in [
            (None, "current", vec!["cases"]),
            (
                Some(WayBack::Cutover),
                "restored",
                vec!["cases", "payments", "outbox_event"],
            ),
        ] {
            let p = Playbook::load_as(&path, way).unwrap();
            let s = steps(&p, Some(0));
            let staged: Vec<&str> = s
                .iter()
                .filter_map(|x| x.id.strip_prefix("rows-stage:"))
                .collect();
            assert_eq!(staged, repaired, "{way:?}");
            // The sections that name `survivor` act on it.
            for id in [
                "outbox:case-events",
                "inbox:projector-inbox",
                "idempotency:provider-payments",
                "invariant:every payment has its idempotency key",
            ] {
                let x = s.iter().find(|x| x.id == id).unwrap();
                let action = serde_json::to_string(&x.action).unwrap();
                assert!(
                    action.contains(&format!("\"database\":\"{survivor}\"")),
                    "{way:?} {id}: {action}"
                );
            }
            assert!(s
                .iter()
                .filter(|x| x.id.starts_with("reopen:"))
                .all(|x| x.id.ends_with(&format!("@{survivor}"))));
            // Tombstones are in before the invariants read the keys.
            let at = |id: &str| s.iter().position(|x| x.id == id).unwrap();
            assert!(
                at("idempotency:provider-payments")
                    < at("invariant:every payment has its idempotency key")
            );
        }
    }

    #[test]
    fn a_plan_survives_its_own_file() {
        let p = example("case-management.toml");
        let plan = Plan {
            format: 1,
            playbook: PlaybookRef {
                name: "x".into(),
                way_back: WayBack::Cutover,
                file: "f".into(),
                sha256: sha256_hex(b""),
            },
            target: TargetInfo::default(),
            created_at: "now".into(),
            steps: steps(&p, Some(0)),
            notes: notes(&p),
        };
        let text = serde_json::to_string(&plan).unwrap();
        assert_eq!(serde_json::from_str::<Plan>(&text).unwrap(), plan);
    }
}
