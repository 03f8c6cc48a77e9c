//! Steps: what a plan is made of. Each kind is a serializable `Action` (the
//! plan on disk holds them, so a resumed run walks exactly the plan it
//! started with) and implements `Step`: a read-only preview for the plan,
//! and an idempotent apply that journals the state it is about to change.
//!
//! Later kinds (Kafka, outbox, caches, search, repair) are new `Action`
//! variants with their own `Step` impl; the engine does not change.

pub mod caches;
pub mod consumers;
pub mod gates;
pub mod hook;
pub mod idempotency;
pub mod outbox;
pub mod rows;
pub mod search;
pub mod sequences;
pub mod validate;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::pg::conn::{Db, PgError};
use crate::reentry::journal::{Entry, Journal, State};
use crate::reentry::playbook::Playbook;

/// Where a step sits; the plan is ordered by phase, and gates close before
/// anything else touches a database.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
#[value(rename_all = "kebab-case")]
pub enum Phase {
    CloseGates,
    Settle,
    /// Rows: stage and apply a repair, or carry later writes forward;
    /// idempotency keys used after T come back as tombstones.
    Repair,
    Validate,
    Reconcile,
    Reopen,
}

impl Phase {
    pub fn label(self) -> &'static str {
        match self {
            Phase::CloseGates => "close gates",
            Phase::Settle => "settle",
            Phase::Repair => "repair rows",
            Phase::Validate => "validate",
            Phase::Reconcile => "reconcile",
            Phase::Reopen => "re-open",
        }
    }
}

/// What a step does to the world, which decides what a dry run does with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nature {
    /// Changes something: a dry run shows the plan's preview instead.
    Changes,
    /// Only reads: a dry run runs it.
    Reads,
    /// Only meaningful once the gates are closed (waits, probes): a dry run
    /// skips it.
    AfterClose,
}

/// What a step changed, or would change: a count and the ids, for plans,
/// journals and reports. `detail` is kind-specific (a gate's before and
/// after, a check's findings).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Effect {
    pub summary: String,
    pub count: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<String>,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub detail: Value,
}

/// A kind's typed detail, as an effect holds it.
pub fn detail<T: Serialize>(d: &T) -> Value {
    serde_json::to_value(d).expect("step details serialize")
}

impl Effect {
    pub fn said(summary: impl Into<String>) -> Effect {
        Effect {
            summary: summary.into(),
            ..Effect::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("databases.{database}")]
    Db {
        database: String,
        #[source]
        source: PgError,
    },
    /// From a transaction's BEGIN or COMMIT; the error names the server.
    #[error(transparent)]
    Pg(#[from] PgError),
    /// A broker's error, naming the brokers by the playbook's template.
    #[error(transparent)]
    Kafka(#[from] crate::kafka::KafkaError),
    /// A check found problems; `findings` lists them.
    #[error("{message}")]
    Check {
        message: String,
        findings: Vec<String>,
    },
    /// What the playbook lacks for this step (a section, a database): exit
    /// 78 when found while planning.
    #[error("{0}")]
    Config(String),
    /// The journal lacks what this step relies on (a prior state).
    #[error("{0}")]
    State(String),
    /// Local I/O other than the journal's (a scan spilled to disk).
    #[error("cannot {what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// An object on a database that reentry will not use (a schema of its
    /// name that another role made): nothing was written to it.
    #[error("{0}")]
    Refused(String),
    /// Bad input the step reads (a CSV export): exit 78, nothing changed.
    #[error("{message}")]
    Input { message: String },
    /// A Redis server's error, naming the server (or the cluster's node).
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
    /// A search server's error, naming the server and the index.
    #[error(transparent)]
    Search(#[from] crate::search::SearchError),
    #[error("cannot write the journal")]
    Journal(#[from] std::io::Error),
    #[error("interrupted")]
    Interrupted,
    /// A defect in reentry: the step stopped where it should not have.
    /// It is journaled as the step's failure, and `--resume` retries it.
    #[error("reentry stopped in this step on a defect ({message}); nothing after it ran. Report it; `--resume` runs the step again")]
    Panicked { message: String },
}

/// Runs a step's code with a panic turned into that step's failure: a
/// defect (a value the code did not expect) is reported and journaled as
/// any other failure, and `--resume` retries it, instead of a crash that
/// leaves the gates closed unexplained.
pub fn guarded<T>(f: impl FnOnce() -> Result<T, StepError>) -> Result<T, StepError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_owned());
        Err(StepError::Panicked { message })
    })
}

impl StepError {
    /// Connection refused or lost: worth one more try on a new connection,
    /// because every step is idempotent.
    pub fn is_transient(&self) -> bool {
        match self {
            StepError::Db {
                source: PgError::Connect { .. },
                ..
            }
            | StepError::Pg(PgError::Connect { .. }) => true,
            StepError::Kafka(k) => k.is_transient(),
            StepError::Cache(c) => c.is_transient(),
            StepError::Search(s) => s.is_transient(),
            _ => false,
        }
    }
}

impl From<rows::diff::SpillError> for StepError {
    fn from(e: rows::diff::SpillError) -> StepError {
        StepError::Io {
            what: "spill the keys in scope to a scratch file",
            source: e.0,
        }
    }
}

/// Attaches the database's name to errors from its connection.
pub trait OnDatabase<T> {
    fn on(self, database: &str) -> Result<T, StepError>;
}

impl<T> OnDatabase<T> for Result<T, PgError> {
    fn on(self, database: &str) -> Result<T, StepError> {
        self.map_err(|source| StepError::Db {
            database: database.to_owned(),
            source,
        })
    }
}

/// The connections a run uses, opened on first use and re-opened after a
/// loss. A read-only environment (plans, dry runs) makes every session
/// read-only on the server too: a bug cannot turn a plan into a change.
pub struct Env<'a> {
    pub playbook: &'a Playbook,
    pub run_id: String,
    /// Where the run keeps its files (`changed-entities.jsonl`); none for
    /// a plan.
    pub run_dir: Option<std::path::PathBuf>,
    read_only: bool,
    dbs: BTreeMap<String, Db>,
}

impl<'a> Env<'a> {
    pub fn new(playbook: &'a Playbook, run_id: String, read_only: bool) -> Env<'a> {
        Env {
            playbook,
            run_id,
            run_dir: None,
            read_only,
            dbs: BTreeMap::new(),
        }
    }

    pub fn db(&mut self, name: &str) -> Result<&mut Db, StepError> {
        if self.dbs.get(name).is_some_and(Db::is_closed) {
            self.dbs.remove(name);
        }
        if !self.dbs.contains_key(name) {
            let d = self.playbook.databases.get(name).ok_or_else(|| {
                StepError::Config(format!("no database named `{name}` in the playbook"))
            })?;
            let mut db = Db::connect(Some(d.conninfo.expose())).on(name)?;
            // String literals mean the same whatever the server, database
            // or role sets (`standard_conforming_strings = off` makes a
            // backslash an escape).
            let mut setup = String::from(
                "SET application_name = 'reentry'; SET standard_conforming_strings = on; \
                 SET lock_timeout = '10s'; SET TIME ZONE 'UTC';",
            );
            if self.read_only {
                setup.push_str(" SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY;");
            }
            db.batch("set up the session", &setup).on(name)?;
            // Names reentry writes are qualified, and nothing another
            // role put on the search path stands in for what it calls.
            db.pin_search_path().on(name)?;
            self.dbs.insert(name.to_owned(), db);
        }
        Ok(self.dbs.get_mut(name).expect("just inserted"))
    }

    /// Drops every connection; the next use opens a new one.
    pub fn reset(&mut self) {
        self.dbs.clear();
    }

    /// The playbook's Kafka cluster.
    pub fn kafka(&self) -> Result<crate::kafka::Kafka, StepError> {
        let k = self
            .playbook
            .kafka
            .as_ref()
            .ok_or_else(|| {
                StepError::Config(
                    "the playbook has no [kafka], which this step needs: add it (see playbooks/reference.toml)"
                        .into(),
                )
            })?;
        crate::kafka::Kafka::from_playbook(k).map_err(StepError::Config)
    }

    /// The value a ShedLock row gets while a run holds it frozen.
    pub fn marker(&self) -> String {
        format!("reentry run {}", self.run_id)
    }
}

/// A step's view of the journal while it applies.
pub struct Recorder<'a> {
    pub step: &'a str,
    pub journal: &'a mut Journal,
    pub state: &'a mut State,
    pub interrupted: &'a AtomicBool,
}

impl Recorder<'_> {
    /// The state the side effect is about to change, on disk before the
    /// change is made. On a resumed step it is the state recorded the first
    /// time: what the run found, not what a crash left.
    pub fn prior<T: Serialize + serde::de::DeserializeOwned>(
        &mut self,
        read: impl FnOnce() -> Result<T, StepError>,
    ) -> Result<T, StepError> {
        if let Some(v) = self.state.prior.get(self.step) {
            return typed(self.step, v);
        }
        let v = read()?;
        let value = serde_json::to_value(&v).expect("prior states serialize");
        let r = self.journal.append(Some(self.step), Entry::Prior(value))?;
        self.state.record(&r);
        pause_point(self.step, "prior");
        Ok(v)
    }

    /// Journals `value` as the prior state under `key` (a step that finds
    /// more to change while it runs: one key each); the first one stays.
    pub fn prior_keyed<T: Serialize>(&mut self, key: &str, value: &T) -> Result<(), StepError> {
        if self.state.prior.contains_key(key) {
            return Ok(());
        }
        let value = serde_json::to_value(value).expect("prior states serialize");
        let r = self.journal.append(Some(key), Entry::Prior(value))?;
        self.state.record(&r);
        Ok(())
    }

    /// Every prior state journaled under a key that starts with `prefix`,
    /// by the rest of its key.
    pub fn priors_under<T: serde::de::DeserializeOwned>(
        &self,
        prefix: &str,
    ) -> Result<BTreeMap<String, T>, StepError> {
        self.state
            .prior
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| Ok((k[prefix.len()..].to_owned(), typed(k, v)?)))
            .collect()
    }

    /// The prior state another step recorded (a re-open reads its close's).
    pub fn prior_of<T: serde::de::DeserializeOwned>(
        &self,
        step: &str,
    ) -> Result<Option<T>, StepError> {
        self.state
            .prior
            .get(step)
            .map(|v| typed(step, v))
            .transpose()
    }

    pub fn done_at(&self, step: &str) -> Option<SystemTime> {
        self.state.done.get(step).and_then(|r| r.time())
    }

    /// Sleeps until `deadline`, returning early with `Interrupted` on Ctrl-C.
    pub fn sleep_until(&self, deadline: SystemTime) -> Result<(), StepError> {
        loop {
            if self.interrupted.load(Ordering::SeqCst) {
                return Err(StepError::Interrupted);
            }
            let Ok(left) = deadline.duration_since(SystemTime::now()) else {
                return Ok(());
            };
            std::thread::sleep(left.min(Duration::from_millis(100)));
        }
    }
}

/// A journaled prior state, read as its kind's type.
fn typed<T: serde::de::DeserializeOwned>(key: &str, v: &Value) -> Result<T, StepError> {
    serde_json::from_value(v.clone()).map_err(|e| {
        StepError::State(format!(
            "the prior state {key} journaled does not read as this build's ({e}): finish the run with the build that started it"
        ))
    })
}

/// A gate's row in the evidence report: before, closed, and after.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GateEvidence {
    pub gate: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub database: String,
    pub before: String,
    pub closed: String,
    pub after: String,
}

/// A row of a kind's own table in the evidence report: the section's
/// heading and columns, this step's cells, and lines to list under the
/// table (audit rows).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Evidence {
    pub section: String,
    pub columns: Vec<String>,
    pub row: Vec<String>,
    pub lines: Vec<String>,
}

/// What a finished step says about a gate, for the report.
#[derive(Debug, Clone, PartialEq)]
pub enum GateRow {
    /// A close: a new row, "stays closed" until a re-open says otherwise.
    Closed(GateEvidence),
    Reopened {
        gate: String,
        database: String,
        after: String,
    },
}

/// A file a step reads from outside the databases (a template, a
/// provider's export), pinned when the plan is made: read and checked
/// then, its sha256 (and, for a small file used whole, its content) kept in
/// the plan, and checked again before apply uses it. A missing or malformed
/// file stops the plan, located in the playbook, before any gate closes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Pinned {
    /// As the playbook names it, relative to the playbook.
    pub path: String,
    /// Where the playbook names it: keys, and indexes as numbers.
    #[serde(default)]
    pub at: Vec<String>,
    /// Empty in a plan an older build made: then nothing was pinned.
    #[serde(default)]
    pub sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

impl Pinned {
    pub fn named(path: &str, at: &[&str]) -> Pinned {
        Pinned {
            path: path.to_owned(),
            at: at.iter().map(|s| (*s).to_owned()).collect(),
            sha256: String::new(),
            content: None,
        }
    }

    /// Where it is: under the playbook's directory, and not a symbolic
    /// link. A template's content goes into the plan and out to Kafka, so
    /// a path that reaches outside (absolute, `..`, or through a link) could
    /// publish any file the run can read, a key file for one.
    fn resolve(&self, playbook: &std::path::Path) -> Result<std::path::PathBuf, String> {
        let dir = playbook
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        let dir = std::fs::canonicalize(dir).map_err(|e| {
            format!(
                "cannot resolve the playbook's directory {}: {e}",
                dir.display()
            )
        })?;
        let path = dir.join(&self.path);
        let outside = || {
            format!(
                "`{}` is outside the playbook's directory {}: a file the playbook reads must be in it or below, named by a relative path without `..`",
                self.path,
                dir.display()
            )
        };
        if std::path::Path::new(&self.path).is_absolute()
            || std::path::Path::new(&self.path)
                .components()
                .any(|c| c == std::path::Component::ParentDir)
        {
            return Err(outside());
        }
        let meta = std::fs::symlink_metadata(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if meta.file_type().is_symlink() {
            return Err(format!(
                "{} is a symbolic link: name the file itself, in the playbook's directory",
                path.display()
            ));
        }
        let real = std::fs::canonicalize(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if !real.starts_with(&dir) {
            return Err(outside());
        }
        Ok(path)
    }

    /// Reads it for the plan, pins its sha256 (and its content when
    /// `keep`), and returns its bytes to be checked.
    pub fn pin(&mut self, playbook: &std::path::Path, keep: bool) -> Result<Vec<u8>, String> {
        let path = self.resolve(playbook)?;
        let bytes =
            std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        self.sha256 = crate::reentry::plan::sha256_hex(&bytes);
        if keep {
            self.content = Some(
                String::from_utf8(bytes.clone())
                    .map_err(|_| format!("{} is not UTF-8 text", path.display()))?,
            );
        }
        Ok(bytes)
    }

    /// Its bytes at apply: refused when the file is gone or changed since
    /// the plan pinned it (make a new plan to use the new one).
    pub fn read_checked(&self, playbook: &std::path::Path) -> Result<Vec<u8>, StepError> {
        let path = self
            .resolve(playbook)
            .map_err(|message| StepError::Input { message })?;
        let bytes = std::fs::read(&path).map_err(|e| StepError::Input {
            message: format!("cannot read {}: {e}", path.display()),
        })?;
        let now = crate::reentry::plan::sha256_hex(&bytes);
        if !self.sha256.is_empty() && now != self.sha256 {
            return Err(StepError::Input {
                message: format!(
                    "{} changed since the plan read it (sha256 {:.12} → {:.12}): put it back, or start a new run to use the new file",
                    path.display(),
                    self.sha256,
                    now
                ),
            });
        }
        Ok(bytes)
    }
}

/// A `Pinned`, or the bare path a plan from an older build holds where it
/// now has one (that build read the file at apply, and so does this one).
pub fn pinned_or_path<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Pinned>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Pinned(Pinned),
        Path(String),
    }
    Ok(Option::<Either>::deserialize(d)?.map(|e| match e {
        Either::Pinned(p) => p,
        Either::Path(path) => Pinned::named(&path, &[]),
    }))
}

/// What a step's `pin` found wrong: where in the playbook, and what.
pub type PinErrors = Vec<(Vec<String>, String)>;

/// The interface every step kind implements.
pub trait Step {
    fn nature(&self) -> Nature;
    /// The playbook's databases this step writes to: a plan refuses up
    /// front to write to one still in recovery.
    fn writes(&self) -> Vec<&str> {
        Vec::new()
    }

    /// What this step's effect (as it journaled it) says about a gate, for
    /// the report's gate table: its own detail, read by its own type.
    fn gate_evidence(&self, _effect: &Effect) -> Option<GateRow> {
        None
    }

    /// A row (and lines) its effect adds to a section of the report of
    /// its own, such as the rows a repair wrote.
    fn evidence(&self, _effect: &Effect) -> Option<Evidence> {
        None
    }

    /// Reads and checks, when the plan is made, every file the step will
    /// read from outside (see `Pinned`). `playbook` is the playbook's path.
    fn pin(&mut self, _playbook: &std::path::Path) -> PinErrors {
        Vec::new()
    }
    /// Read-only: what applying would change, with counts from the
    /// databases as they are now.
    fn preview(&self, env: &mut Env) -> Result<Effect, StepError>;
    /// Does it. Idempotent: applied to a state where it already happened,
    /// it changes nothing. Reads what it changes through `rec.prior` first.
    fn apply(&self, env: &mut Env, rec: &mut Recorder) -> Result<Effect, StepError>;
}

/// What a kind's planner needs to know besides the playbook.
pub struct PlanCtx {
    /// T in ms since the epoch, when the recovery target gives a time.
    pub t_ms: Option<i64>,
    /// The database that takes writes after re-entry, and the one retired.
    pub survivor: &'static str,
    pub retired: &'static str,
}

/// A step kind, as the engine reaches it: what it needs to find online,
/// and the steps it adds to a plan. The engine (plan, check, run, journal,
/// report) names no kind; each module registers here with one line.
pub struct StepKind {
    /// Its steps, from the playbook alone; the plan orders them by phase,
    /// keeping `KINDS`' order within one.
    pub steps: fn(&Playbook, &PlanCtx) -> Vec<crate::reentry::plan::PlannedStep>,
    /// Whether its steps compare with T as a time (an LSN is not enough).
    pub needs_time: fn(&Playbook) -> bool,
    /// What every plan should say about it (what it leaves undone).
    pub notes: fn(&Playbook, &PlanCtx) -> Vec<String>,
    /// The tables and columns it needs, checked online before any plan.
    pub needs: fn(&Playbook) -> Vec<crate::reentry::check::Need<'_>>,
    /// Its meaning checks on the parsed playbook (references, names),
    /// each error located.
    pub meaning: fn(&mut crate::reentry::playbook::Meaning),
    /// What only it knows to look for online, once its tables are found
    /// (`broken` holds the (what, database) whose tables are missing).
    pub online: OnlineCheck,
    /// The queries from the playbook it runs, prepared online.
    pub queries: fn(&Playbook) -> Vec<crate::reentry::check::Prepared<'_>>,
    /// The playbook keys it owns beyond the playbook's own sections: at the
    /// top level (`None`), or in a shared table (`Some("validation")`).
    /// It reads them with `Playbook::part`, typed by the same `section!`.
    pub keys: &'static [(
        Option<&'static str>,
        &'static [crate::reentry::schema::Field],
    )],
}

/// A kind's own online check: the playbook, a connection to each of its
/// databases, and the (what, database) pairs whose tables are missing.
pub type OnlineCheck = fn(
    &Playbook,
    &mut BTreeMap<&str, Db>,
    &std::collections::BTreeSet<(String, String)>,
) -> Vec<crate::diag::Diagnostic>;

/// A kind's `online` when it has nothing more to look for.
pub fn no_online(
    _: &Playbook,
    _: &mut BTreeMap<&str, Db>,
    _: &std::collections::BTreeSet<(String, String)>,
) -> Vec<crate::diag::Diagnostic> {
    Vec::new()
}

/// A kind's `needs` when it needs no table.
pub fn no_needs(_: &Playbook) -> Vec<crate::reentry::check::Need<'_>> {
    Vec::new()
}

/// A kind's `queries` when it holds no query.
pub fn no_queries(_: &Playbook) -> Vec<crate::reentry::check::Prepared<'_>> {
    Vec::new()
}

/// A planner's `notes` when it has none.
pub fn no_notes(_: &Playbook, _: &PlanCtx) -> Vec<String> {
    Vec::new()
}

/// A playbook duration in milliseconds (`default` when absent; checked
/// when the playbook was parsed).
/// A row's timestamp is taken inside its transaction, before it commits,
/// and a message's before it is consumed: what is stamped just before T
/// may have committed after it, and then the restored copy lacks it too.
/// Where looking further back is harmless (a key the restored table has is
/// skipped; an idempotent consumer takes what it has seen as a no-op),
/// re-entry looks this far before T.
pub const STRADDLE_MS: i64 = 60_000;

pub fn duration_ms(d: Option<&str>, default: &str) -> i64 {
    humantime::parse_duration(d.unwrap_or(default))
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The registry of step kinds: one line per module, listing the actions
/// it adds to a plan. The plan on disk is a list of `Action`s (tagged by
/// `kind`), so a resumed run walks exactly the plan it started with; the
/// engine reaches each through the `Step` trait, and each module's `KIND`
/// through `KINDS`, in the order written here (the order of their steps
/// within a phase).
macro_rules! kinds {
    ($($module:ident: $($variant:ident($ty:ident)),+;)*) => {
        /// Every kind's module, in the order their steps run within a phase.
        pub const KINDS: &[StepKind] = &[$($module::KIND),*];

        /// Each kind's name (its module's), in `KINDS`' order.
        pub const KIND_NAMES: &[&str] = &[$(stringify!($module)),*];

        /// Every step kind; the plan on disk is a list of these.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "kind", rename_all = "kebab-case")]
        pub enum Action {
            $($($variant($module::$ty)),+),*
        }

        impl Action {
            /// Every kind, as the plan names it (`close-gate`, …).
            pub fn kinds() -> Vec<String> {
                [$($(stringify!($variant)),+),*].iter().map(|v| kebab(v)).collect()
            }

            pub fn step(&self) -> &dyn Step {
                match self {
                    $($(Action::$variant(s) => s),+),*
                }
            }

            pub fn step_mut(&mut self) -> &mut dyn Step {
                match self {
                    $($(Action::$variant(s) => s),+),*
                }
            }
        }
    };
}

/// `CloseGate` → `close-gate`, as serde's kebab-case names a variant.
fn kebab(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('-');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

// The outbox settles what the relay sends before the consumers rewind.
kinds! {
    gates: CloseGate(GateAt), WaitGateCache(WaitCache), VerifyGates(Verify), ReopenGate(Reopen);
    rows: RowsStage(Stage), RowsApply(Apply), RowsDelete(Apply), RowsForeignKeys(ForeignKeys);
    validate: Check(Query), InvalidIndexes(InvalidIndexes), Extensions(Extensions), Amcheck(Amcheck);
    sequences: Sequences(Sequences);
    outbox: Outbox(Reconcile);
    consumers: Inbox(Inbox), RewindGroup(Rewind);
    idempotency: IdempotencyKeys(Keys);
    caches: CacheKeys(KeysStep), CachePatterns(PatternsStep), CacheGeneration(GenerationStep);
    search: SearchDeleteByQuery(SearchStep), SearchTargeted(SearchStep), SearchRebuild(SearchStep), SearchHook(SearchStep);
}

/// A test hook: `REENTRY_PAUSE_AT=STEP:POINT` makes the run stop dead at
/// that point (announced on stderr) so a test can `kill -9` it there.
/// Points: `started`, `prior`, `applied`, `done`.
pub fn pause_point(step: &str, point: &str) {
    let Ok(want) = std::env::var("REENTRY_PAUSE_AT") else {
        return;
    };
    // A second variable, with a value no one types by accident: a stray
    // REENTRY_PAUSE_AT must not hang a production run.
    if std::env::var("REENTRY_TEST_HOOKS").as_deref() != Ok("hang-at-pause-points") {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            tracing::warn!("REENTRY_PAUSE_AT is set but ignored: it is a test hook, armed only with REENTRY_TEST_HOOKS=hang-at-pause-points");
        });
        return;
    }
    if want == format!("{step}:{point}") {
        tracing::warn!("paused at {want} (REENTRY_PAUSE_AT)");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outbox_step_from_an_older_builds_plan_keeps_its_template() {
        // The value the other playbook tests set: tests share the process.
        crate::reentry::playbook::set_example_secrets();
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("playbooks/reference.toml");
        let p = crate::reentry::playbook::Playbook::load(&path).unwrap();
        let step = crate::reentry::plan::steps(&p, Some(0))
            .into_iter()
            .find(|s| matches!(s.action, Action::Outbox(_)))
            .unwrap();
        // As the build before pinning wrote it: the path alone.
        let mut old = serde_json::to_value(&step.action).unwrap();
        let o = old.as_object_mut().unwrap();
        o.remove("compensation");
        o.insert("compensation-template".into(), "templates/c.json".into());
        let Action::Outbox(r) = serde_json::from_value::<Action>(old).unwrap() else {
            panic!("not an outbox step");
        };
        let p = r.compensation.expect("the template is kept");
        assert_eq!(p.path, "templates/c.json");
        assert!(
            p.sha256.is_empty(),
            "not pinned: read at apply, as that build did"
        );
    }

    #[test]
    fn the_registry_names_kinds_as_the_plan_does() {
        let kinds = Action::kinds();
        assert!(kinds.contains(&"close-gate".to_owned()), "{kinds:?}");
        assert!(kinds.contains(&"idempotency-keys".to_owned()), "{kinds:?}");
        let a = Action::WaitGateCache(gates::WaitCache {
            ttl_seconds: 1.0,
            after: vec![],
        });
        let json = serde_json::to_value(&a).unwrap();
        assert!(kinds.contains(&json["kind"].as_str().unwrap().to_owned()));
    }
}
