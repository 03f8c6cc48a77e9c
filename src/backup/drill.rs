//! `reentry drill`: a restore into a scratch directory, validated, measured
//! and torn down, leaving evidence in a file and in
//! the repository. A drill is the proof that a backup is a recovery
//! capability and not only files.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::backup::basebackup::now_rfc3339;
use crate::backup::repo::{io_err, Repo, RepoError};
use crate::backup::restore::{self, Action, RestoreError, RestoreManifest, RestoreOptions, Target};
use crate::backup::walchain::ChainIndex;
use crate::fsutil;
use crate::pg::conn::{Db, PgError};
use crate::pg::tools::PgBin;

pub const DRILLS_DIR: &str = "drills";

#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error(transparent)]
    Archive(#[from] crate::backup::archive::ArchiveError),
    #[error("{}:{line}: {message}", path.display())]
    Checks {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// One user check: its SQL must return no rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: String,
    pub database: String,
    pub sql: String,
    pub line: usize,
}

/// Reads a checks file: blocks that start with `-- name: NAME`, optionally
/// `-- database: DB` (default postgres), then one query.
pub fn parse_checks(path: &Path) -> Result<Vec<Check>, DrillError> {
    let text = fs::read_to_string(path).map_err(|e| DrillError::Checks {
        path: path.into(),
        line: 0,
        message: e.to_string(),
    })?;
    let err = |line: usize, message: String| DrillError::Checks {
        path: path.into(),
        line,
        message,
    };
    let mut checks: Vec<Check> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let t = raw.trim();
        if let Some(name) = t.strip_prefix("-- name:") {
            let name = name.trim();
            if name.is_empty() {
                return Err(err(line, "a check needs a name after `-- name:`".into()));
            }
            if let Some(prev) = checks.iter().find(|c| c.name == name) {
                return Err(err(
                    line,
                    format!("check {name:?} is also defined at line {}", prev.line),
                ));
            }
            checks.push(Check {
                name: name.into(),
                database: "postgres".into(),
                sql: String::new(),
                line,
            });
        } else if let Some(db) = t.strip_prefix("-- database:") {
            let c = checks
                .last_mut()
                .ok_or_else(|| err(line, "`-- database:` before any `-- name:`".into()))?;
            c.database = db.trim().into();
        } else if t.is_empty() || t.starts_with("--") {
            continue;
        } else {
            let c = checks.last_mut().ok_or_else(|| {
                err(
                    line,
                    "SQL before the first `-- name:` line; start each check with `-- name: NAME`"
                        .into(),
                )
            })?;
            c.sql.push_str(raw);
            c.sql.push('\n');
        }
    }
    for c in &mut checks {
        c.sql = c.sql.trim().trim_end_matches(';').trim().to_owned();
        if c.sql.is_empty() {
            return Err(err(c.line, format!("check {:?} has no SQL", c.name)));
        }
    }
    if checks.is_empty() {
        return Err(err(1, "no checks; start each with `-- name: NAME`".into()));
    }
    Ok(checks)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Passed,
    Failed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckResult {
    pub name: String,
    pub database: String,
    pub status: Outcome,
    /// Rows the query returned (a passing check returns none).
    pub rows: usize,
    /// The first rows, as text, to show what is wrong.
    pub sample: Vec<String>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Extension {
    pub database: String,
    pub name: String,
    pub version: String,
}

/// The evidence of one drill.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Evidence {
    pub dr_drill_id: String,
    pub backup_id: String,
    pub target_time: Option<String>,
    pub restore_started_at: String,
    pub restore_finished_at: String,
    pub rto_observed_seconds: f64,
    pub rpo_observed_seconds: Option<f64>,
    pub wal_segments_replayed: usize,
    pub validation_status: Outcome,
    pub server_version: String,
    pub databases: Vec<String>,
    pub extensions: Vec<Extension>,
    pub checks: Vec<CheckResult>,
    pub restore: RestoreManifest,
}

#[derive(Debug, Clone)]
pub enum DrillTarget {
    /// Everything archived: the RPO if the primary died now.
    Latest,
    Time(SystemTime),
    /// A random time inside the newest backup's PITR window.
    Random,
}

#[derive(Debug, Clone)]
pub struct DrillOptions {
    pub target: DrillTarget,
    pub checks: Vec<Check>,
    pub evidence: PathBuf,
    pub pg_bin: PgBin,
    pub work_dir: Option<PathBuf>,
    pub keep: bool,
    pub timeout: Duration,
    pub progress: crate::progress::Reporter,
    /// From object storage: how many objects to download at once.
    pub jobs: usize,
    /// Preloaded libraries the operator lets run on the copy (see
    /// `RestoreOptions::allow_preload`).
    pub allow_preload: Vec<String>,
}

fn parse_time(s: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339(s).ok()
}

/// A time uniformly inside the newest backup's PITR window: after its stop,
/// before the last transaction the archive holds.
fn random_time(repo: &Repo, pg_bin: &PgBin) -> Result<SystemTime, DrillError> {
    let labels = repo.backups()?;
    let newest = labels.iter().rev().find(|b| b.is_usable());
    let no_window = |why: &str| RestoreError::NoBackup {
        target: "a random time".into(),
        why: why.into(),
    };
    let backup = newest.ok_or_else(|| no_window("the repository has no complete backup"))?;
    let from = backup
        .stop_time
        .as_deref()
        .and_then(parse_time)
        .ok_or_else(|| no_window("the newest backup has no stop time"))?;
    let archive = repo.archive();
    let quiet = crate::progress::Reporter::silent();
    let index = ChainIndex::build(&archive, &archive.list()?, false, &*quiet)?;
    let (tli, stop) = (
        backup.timeline.unwrap_or(1),
        backup.stop_lsn.unwrap_or_default(),
    );
    let reach = index.reach(tli, stop.segno(index.seg_size));
    let until = restore::last_commit_time(repo, &index, &reach, pg_bin)?
        .filter(|u| *u > from)
        .ok_or_else(|| no_window("no transaction committed after the newest backup"))?;
    let span = until.duration_since(from).unwrap_or(Duration::ZERO);
    // No need for a crate: the clock's nanoseconds are random enough to pick a time.
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    let fraction = f64::from(nanos.wrapping_mul(2_654_435_761) % 1_000_000) / 1_000_000.0;
    // Strictly after the backup's stop and strictly before the last commit,
    // so recovery sees a commit after the target and stops there.
    let offset = span
        .mul_f64(fraction)
        .max(Duration::from_millis(1))
        .min(span.saturating_sub(Duration::from_millis(1)));
    Ok(from + offset)
}

pub fn drill(repo: &Repo, opts: &DrillOptions) -> Result<Evidence, DrillError> {
    let started = Instant::now();
    let started_at = now_rfc3339();
    let started_wall = SystemTime::now();
    let digits: String = started_at.chars().filter(char::is_ascii_digit).collect();
    let id = format!(
        "drill-{}-{}-{}",
        &digits[..8],
        &digits[8..14],
        std::process::id()
    );
    let target = match &opts.target {
        DrillTarget::Latest => Target::Latest,
        DrillTarget::Time(t) => Target::Time(*t),
        DrillTarget::Random => Target::Time(random_time(repo, &opts.pg_bin)?),
    };
    let scratch;
    let dir = match &opts.work_dir {
        Some(w) => w.join(&id),
        None => {
            scratch = fsutil::ScratchDir::new("reentry-drill").map_err(io_err(
                "create a scratch directory in",
                &std::env::temp_dir(),
            ))?;
            scratch.path().join("data")
        }
    };
    let restore_opts = RestoreOptions {
        to: dir.clone(),
        target: target.clone(),
        backup: None,
        port: None,
        // A drill's copy is never opened: its checks use the socket.
        listen: None,
        action: Action::Promote,
        pg_bin: opts.pg_bin.clone(),
        timeout: opts.timeout,
        progress: opts.progress.clone(),
        jobs: opts.jobs,
        allow_preload: opts.allow_preload.clone(),
    };
    // restore stops the server itself when it fails; once it succeeded,
    // the guard stops it however validation ends, and before the scratch
    // directory (dropped after it) is deleted.
    let manifest = restore::restore(repo, &restore_opts)?;
    let server = restore::Postmaster::guard(&opts.pg_bin, &dir);
    let validated = validate(&manifest, &opts.checks);
    drop(server);
    if opts.keep {
        tracing::info!(dir = %dir.display(), "restored cluster kept (stopped)");
    } else {
        if opts.work_dir.is_some() {
            let _ = fs::remove_dir_all(&dir);
        }
        // A socket directory of the copy's own, in the temporary directory,
        // goes with it.
        let socket = Path::new(&manifest.socket_dir);
        if socket != Path::new(&manifest.data_dir)
            && socket
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(restore::SOCKET_DIR_PREFIX))
        {
            let _ = fs::remove_dir_all(socket);
        }
    }
    let (server_version, databases, extensions, checks) = validated?;
    let finished_at = now_rfc3339();
    let target_time = match target {
        Target::Time(t) => Some(t),
        _ => None,
    };
    let reached = manifest.reached_time.as_deref().and_then(parse_time);
    let rpo = reached.map(|r| {
        target_time
            .unwrap_or(started_wall)
            .duration_since(r)
            .unwrap_or(Duration::ZERO)
            .as_secs_f64()
    });
    let evidence = Evidence {
        dr_drill_id: id.clone(),
        backup_id: manifest.backup_id.clone(),
        target_time: target_time.map(|t| humantime::format_rfc3339_millis(t).to_string()),
        restore_started_at: started_at,
        restore_finished_at: finished_at,
        rto_observed_seconds: started.elapsed().as_secs_f64(),
        rpo_observed_seconds: rpo,
        wal_segments_replayed: manifest.wal_segments_replayed,
        validation_status: if checks.iter().all(|c| c.status == Outcome::Passed) {
            Outcome::Passed
        } else {
            Outcome::Failed
        },
        server_version,
        databases,
        extensions,
        checks,
        restore: manifest,
    };
    let mut text = serde_json::to_string_pretty(&evidence).expect("evidence serializes");
    text.push('\n');
    fsutil::write_atomic(&opts.evidence, text.as_bytes())
        .map_err(io_err("write", &opts.evidence))?;
    // Each drill is an object of its own, written once.
    repo.store()
        .put_if_absent(&format!("{DRILLS_DIR}/{id}.json"), text.as_bytes())
        .map_err(RepoError::from)?;
    Ok(evidence)
}

type Validated = (String, Vec<String>, Vec<Extension>, Vec<CheckResult>);

fn validate(m: &RestoreManifest, user: &[Check]) -> Result<Validated, DrillError> {
    let connect = |db: &str| {
        Db::connect(Some(&format!(
            "host={} port={} dbname={} {}",
            crate::pg::conn::quote_value(&m.socket_dir),
            m.port,
            crate::pg::conn::quote_value(db),
            crate::backup::fence::SESSION_OPTIONS
        )))
    };
    let mut main = connect("postgres")?;
    let version: String = main
        .query_one(
            "read the version",
            "SELECT current_setting('server_version')",
            &[],
        )?
        .get(0);
    let mut checks = Vec::new();
    let in_recovery: bool = main
        .query_one("ask pg_is_in_recovery", "SELECT pg_is_in_recovery()", &[])?
        .get(0);
    checks.push(CheckResult {
        name: "promoted".into(),
        database: "postgres".into(),
        status: if in_recovery {
            Outcome::Failed
        } else {
            Outcome::Passed
        },
        rows: usize::from(in_recovery),
        sample: if in_recovery {
            vec!["pg_is_in_recovery() = true".into()]
        } else {
            vec![]
        },
        error: None,
    });
    let databases: Vec<String> = main
        .query(
            "list databases",
            "SELECT datname::text FROM pg_database WHERE datallowconn ORDER BY 1",
            &[],
        )?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut extensions = Vec::new();
    for db in &databases {
        let mut c = connect(db)?;
        for r in c.query(
            "list extensions",
            "SELECT extname::text, extversion FROM pg_extension ORDER BY 1",
            &[],
        )? {
            extensions.push(Extension {
                database: db.clone(),
                name: r.get(0),
                version: r.get(1),
            });
        }
        checks.push(run_check(
            &mut c,
            &format!("no invalid indexes in {db}"),
            db,
            "SELECT indexrelid::regclass::text FROM pg_index WHERE NOT indisvalid",
        ));
    }
    for check in user {
        let result = match connect(&check.database) {
            Ok(mut c) => run_check(&mut c, &check.name, &check.database, &check.sql),
            Err(e) => CheckResult {
                name: check.name.clone(),
                database: check.database.clone(),
                status: Outcome::Failed,
                rows: 0,
                sample: vec![],
                error: Some(e.to_string()),
            },
        };
        checks.push(result);
    }
    Ok((version, databases, extensions, checks))
}

fn run_check(db: &mut Db, name: &str, database: &str, sql: &str) -> CheckResult {
    let mut result = CheckResult {
        name: name.into(),
        database: database.into(),
        status: Outcome::Passed,
        rows: 0,
        sample: vec![],
        error: None,
    };
    // Rows come back as text whatever their types, so any query can be a check.
    match db.text_rows("run the check", sql) {
        Ok(rows) => {
            result.rows = rows.len();
            result.sample = rows.into_iter().take(5).collect();
            if result.rows > 0 {
                result.status = Outcome::Failed;
            }
        }
        Err(e) => {
            result.status = Outcome::Failed;
            result.error = Some(match e {
                PgError::Query { detail, .. } => detail,
                e => e.to_string(),
            });
        }
    }
    result
}

/// The newest drill recorded in the repository, and the newest that passed.
pub fn recorded(repo: &Repo) -> (Option<Evidence>, Option<Evidence>) {
    // Unreadable drills are not evidence; a repository that cannot be
    // listed has none to show.
    let store = repo.store();
    let mut all: Vec<Evidence> = store
        .list(&format!("{DRILLS_DIR}/"))
        .unwrap_or_default()
        .into_iter()
        .filter(|o| o.key.ends_with(".json"))
        .filter_map(|o| serde_json::from_slice(&store.get(&o.key).ok()??).ok())
        .collect();
    all.sort_by(|a, b| a.restore_finished_at.cmp(&b.restore_finished_at));
    let passed = all
        .iter()
        .rev()
        .find(|e| e.validation_status == Outcome::Passed)
        .cloned();
    (all.pop(), passed)
}
