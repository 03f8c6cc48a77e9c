//! Search indexes (Elasticsearch 7/8, OpenSearch 1/2): documents written
//! from state after T, put right before traffic comes back. One step per
//! `[[search]]` entry, by its strategy:
//!
//! - `search-delete-by-query:<name>`: documents whose `timestamp-field` is
//!   after T, deleted by a `_delete_by_query` task (`conflicts=proceed`,
//!   `slices=auto`, `wait_for_completion=false`, and `requests_per_second`
//!   when the playbook throttles it). The count before is journaled
//!   first, then the task is started with a tag (`X-Opaque-Id`) and its id
//!   journaled: a resumed run polls that task, or finds it by its tag when
//!   the run died before journaling the id, instead of starting a second.
//! - `search-targeted:<name>`: the entities changed around T (see
//!   `rows::Entities`). Without `documents`, their documents are deleted
//!   (bulk). With it, each is indexed again from the surviving database:
//!   `documents` is SQL returning `id`, `version` (ms, from `updated-at`)
//!   and `doc` (JSON). External versioning keeps a late writer from
//!   bringing back an older document. The stale document from after T has
//!   a higher version than the restored row, so the row is written at the
//!   stored version with `external_gte`: every replay of an event from
//!   after T (a version up to the stale one) is then refused, and a
//!   newer write (a higher version) still wins. An entity whose row is
//!   gone has its document deleted, guarded by `if_seq_no`.
//! - `search-rebuild:<name>`: a new index from `documents` (bulk), then
//!   the alias moved to it in one `_aliases` request. The old index is
//!   kept, and named in the report, for the operator to drop.
//! - `search-hook:<name>`: a command that rebuilds the index the team's
//!   own way; its exit code and output are journaled.
//!
//! After acting, each refreshes the index and counts again: a search right
//! after the step sees what it did, whatever the index's refresh interval.
//!
//! A plan checks that each index (or alias) exists and is open, and that
//! a delete-by-query's field is mapped as a date: a missing or closed
//! index, or a field the index does not map, is a configuration error
//! naming the index (exit 78), before anything changes.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::rows::Entities;
use super::{
    hook, pause_point, Effect, Env, Evidence, Nature, OnDatabase, Phase, PlanCtx, Recorder, Step,
    StepError, StepKind,
};
use crate::reentry::check::{Need, Prepared};
use crate::reentry::plan::{step, PlannedStep};
use crate::reentry::playbook::{section, Interpolated, Meaning, Playbook, Seg};
use crate::reentry::schema::{opt, req, Field, Kind};
use crate::search::{Auth, Search};
use crate::tls_files::TlsFiles;

pub const STRATEGIES: &[&str] = &["delete-by-query", "targeted", "rebuild", "rebuild-hook"];
/// Documents per bulk request.
const BATCH: usize = 500;
/// Rounds of a targeted step whose rows one query reads.
const PAGE_ROUNDS: usize = 10;
/// Documents per batch of a delete-by-query task (a scroll page and one
/// bulk of deletes). The server's default, 1000, spends its time on the
/// round trips and the per-bulk translog sync: on OpenSearch 2.19 with two
/// slices, 10,000 deleted a million documents in about half the time.
/// 10,000 is also the most a page may hold (`index.max_result_window`).
const DBQ_BATCH: u64 = 10_000;
/// Bulk requests a targeted step keeps in flight: two keep a node busy
/// while the other's answer travels back, without queueing behind each
/// other in its write pool (two threads on a 2-core node).
const IN_FLIGHT: usize = 2;
/// How often a targeted step journals its progress: each record is an
/// fsync, and a round is a few milliseconds of the index's time.
const JOURNAL_EVERY: Duration = Duration::from_secs(1);
/// Hook output kept in the journal.
const HOOK_OUTPUT: usize = 4096;
/// How long a rebuild hook may run unless `hook-timeout` says otherwise.
const HOOK_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a delete-by-query step waits for its task unless
/// `task-timeout` says otherwise.
const TASK_TIMEOUT: Duration = Duration::from_secs(6 * 3600);
/// What a hook inherits from reentry's environment besides `hook-env`:
/// nothing that holds a credential.
const HOOK_ENV: &[&str] = &["PATH", "HOME", "LANG", "LC_ALL", "TZ"];

section! {
    /// One `[[search]]` table.
    pub struct SearchIndex {
        pub name: String => req("name", Kind::Str),
        pub url: Interpolated => req("url", Kind::Interp),
        pub index: String => req("index", Kind::Str),
        pub strategy: String => req("strategy", Kind::OneOf(STRATEGIES)),
        pub username: Option<String> => opt("username", Kind::Str),
        pub password: Option<Interpolated> => opt("password", Kind::Interp),
        pub api_key: Option<Interpolated> => opt("api-key", Kind::Interp),
        pub tls_ca: Option<std::path::PathBuf> => opt("tls-ca", Kind::Str),
        pub tls_certificate: Option<std::path::PathBuf> => opt("tls-certificate", Kind::Str),
        pub tls_key: Option<std::path::PathBuf> => opt("tls-key", Kind::Str),
        pub table: Option<String> => opt("table", Kind::Str),
        pub key: Option<Vec<String>> => opt("key", Kind::Strs),
        pub updated_at: Option<String> => opt("updated-at", Kind::Str),
        pub outboxes: Option<Vec<String>> => opt("outboxes", Kind::Strs),
        pub timestamp_field: Option<String> => opt("timestamp-field", Kind::Str),
        pub documents: Option<String> => opt("documents", Kind::Str),
        pub database: Option<String> => opt("database", Kind::Str),
        pub rebuild_hook: Option<String> => opt("rebuild-hook", Kind::Str),
        pub hook_timeout: Option<String> => opt("hook-timeout", Kind::Duration),
        pub hook_env: Option<Vec<String>> => opt("hook-env", Kind::Strs),
        pub batch_size: Option<i64> => opt("batch-size", Kind::Int),
        pub requests_per_second: Option<i64> => opt("requests-per-second", Kind::Int),
        pub task_timeout: Option<String> => opt("task-timeout", Kind::Duration),
        pub pause_refresh: Option<bool> => opt("pause-refresh", Kind::Bool),
    }
}

section! {
    /// Its top-level key.
    #[derive(Default)]
    pub struct Keys {
        #[serde(default)]
        pub search: Vec<SearchIndex> => opt("search", Kind::Tables(SearchIndex::FIELDS)),
    }
}

pub fn indexes(p: &Playbook) -> Vec<SearchIndex> {
    p.part::<Keys>(None).search
}

/// The playbook's shell commands: each `[[search]]` rebuild hook, as
/// `search[i].rebuild-hook` (its place in the playbook) and the command,
/// followed by the variables of reentry's environment `hook-env` hands it.
pub fn hooks(p: &Playbook) -> Vec<(String, String)> {
    indexes(p)
        .iter()
        .enumerate()
        .filter(|(_, s)| s.strategy == "rebuild-hook")
        .filter_map(|(i, s)| {
            let mut command = s.rebuild_hook.clone()?;
            // What it is handed of reentry's environment is part of what it does.
            if let Some(names) = s.hook_env.as_ref().filter(|n| !n.is_empty()) {
                command.push_str(&format!(" (with {})", names.join(", ")));
            }
            Some((
                format!("search[{}].rebuild-hook ({})", i + 1, s.name),
                command,
            ))
        })
        .collect()
}

/// Every plan names the shell commands its playbook runs: they run as the
/// operator, and `apply --apply` runs none without `--allow-hooks`.
fn notes(p: &Playbook, _: &PlanCtx) -> Vec<String> {
    hooks(p)
        .into_iter()
        .map(|(at, command)| {
            format!(
                "runs a shell command from the playbook, as you, with --apply --allow-hooks only: \
                 {at}: `{command}`"
            )
        })
        .collect()
}

fn at(i: usize, key: &'static str) -> Vec<Seg<'static>> {
    vec![Seg::Key("search"), Seg::Index(i), Seg::Key(key)]
}

/// Which server and index, and how to log in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Target {
    pub search: String,
    pub url: Interpolated,
    pub index: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<Interpolated>,
    #[serde(default)]
    pub api_key: Option<Interpolated>,
    #[serde(default, skip_serializing_if = "TlsFiles::is_empty")]
    pub tls: TlsFiles,
}

impl Target {
    fn connect(&self) -> Result<Search, StepError> {
        let auth = match (&self.api_key, &self.username) {
            (Some(k), _) => Auth::ApiKey(k.expose().to_owned()),
            (None, Some(u)) => Auth::Basic {
                user: u.clone(),
                password: self
                    .password
                    .as_ref()
                    .map(|p| p.expose().to_owned())
                    .unwrap_or_default(),
            },
            (None, None) => Auth::None,
        };
        Ok(Search::new(
            self.url.expose(),
            &self.url.template,
            auth,
            &self.tls,
        )?)
    }
}

/// What a step does, by strategy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "strategy")]
pub enum Strategy {
    DeleteByQuery {
        timestamp_field: String,
        t_ms: Option<i64>,
        /// The task's throttle; none: as fast as the cluster goes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        requests_per_second: Option<u64>,
        /// Documents per batch (`batch-size`); none: DBQ_BATCH.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        scroll_size: Option<u64>,
        /// How long to wait for the task (ms, `task-timeout`); none:
        /// TASK_TIMEOUT.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        task_timeout_ms: Option<u64>,
        /// Whether the index's periodic refresh is off while the task runs
        /// (`pause-refresh`, on unless the playbook says otherwise); a plan
        /// from before the key leaves it on.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        pause_refresh: bool,
    },
    Targeted {
        entities: Entities,
        /// SQL returning `id`, `version`, `doc`; none: delete.
        documents: Option<String>,
        database: String,
        batch_size: usize,
    },
    Rebuild {
        documents: String,
        database: String,
        batch_size: usize,
    },
    Hook {
        command: String,
        t_ms: Option<i64>,
        /// Milliseconds; a plan from before the key runs with the default.
        #[serde(default)]
        timeout_ms: Option<u64>,
        /// Variables of reentry's environment the hook also gets.
        #[serde(default)]
        env: Vec<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct SearchStep {
    #[serde(flatten)]
    pub target: Target,
    #[serde(flatten)]
    pub strategy: Strategy,
}

/// What a search step did, for the report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct SearchDetail {
    pub search: String,
    pub index: String,
    pub strategy: String,
    pub before: u64,
    pub acted: u64,
    pub after: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// Version conflicts: newer documents left alone.
    #[serde(default)]
    pub newer_kept: u64,
    /// A rebuild's old index, kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_index: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_index: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

fn t_iso(t_ms: Option<i64>) -> Result<String, StepError> {
    let t = t_ms.ok_or_else(|| {
        StepError::Config("delete-by-query compares with T: give the recovery target a time".into())
    })?;
    Ok(crate::reentry::plan::rfc3339_ms(t))
}

/// T as epoch milliseconds with `format: epoch_millis`: a date field
/// parses the bound with its own format otherwise, so an ISO string is
/// refused by a field mapped `yyyy-MM-dd HH:mm:ss`, and by a `long` field
/// holding milliseconds. The number with this format suits all three.
fn after_t(field: &str, t_ms: Option<i64>) -> Result<Value, StepError> {
    t_iso(t_ms)?;
    Ok(json!({ "range": { field: { "gt": t_ms, "format": "epoch_millis" } } }))
}

/// Field types that hold a time `after_t` compares: dates, and a `long`
/// read as epoch milliseconds.
const TIME_TYPES: &[&str] = &["date", "date_nanos", "long"];

/// A missing or closed index is the playbook pointing at the wrong thing
/// (exit 78 while planning, as a missing table is), not a runtime fault.
fn usable(e: crate::search::SearchError) -> StepError {
    if e.is_unusable_index() {
        StepError::Config(e.to_string())
    } else {
        StepError::Search(e)
    }
}

/// Document ids for entities: the key's values, joined by `:` when the
/// key has more than one column.
fn doc_ids(entities: &[Vec<String>]) -> Vec<String> {
    entities.iter().map(|e| e.join(":")).collect()
}

/// Documents as `documents` gives them: id, version, document.
type Docs = Vec<(String, i64, Value)>;

/// The rows `documents` gives for `ids`: id, version, document.
fn documents(env: &mut Env, database: &str, sql: &str, ids: &[String]) -> Result<Docs, StepError> {
    let db = env.db(database)?;
    // The playbook's SQL, under the application's search path. `= ANY($1)`,
    // which PostgreSQL hashes, and not a join with unnest($1): the hash
    // join built its table from `documents` and made every row's document
    // (174 ms against 34 ms for 1000 ids of 200,000 rows on PostgreSQL 18).
    let rows = db
        .as_application(|db| {
            db.query(
                "read the documents",
                &format!(
                    "SELECT d.id::text, d.version::int8, d.doc::text FROM ({sql}) d WHERE d.id::text = ANY($1::text[])"
                ),
                &[&ids],
            )
        })
    .on(database)?;
    rows.iter().map(document).collect()
}

/// One row of `documents`: its id, version and document, each of which the
/// playbook's SQL may leave NULL, which is reported, not read as a value.
fn document(r: &tokio_postgres::Row) -> Result<(String, i64, Value), StepError> {
    let id: Option<String> = r.get(0);
    let Some(id) = id else {
        return Err(StepError::Input {
            message: "`documents` gave a row whose id is NULL; select only rows with an id".into(),
        });
    };
    let (version, doc): (Option<i64>, Option<String>) = (r.get(1), r.get(2));
    let Some(version) = version else {
        return Err(StepError::Input {
            message: format!("`documents` gave document {id} with a NULL version: its updated-at is NULL? external versioning needs one (coalesce it)"),
        });
    };
    let Some(doc) = doc else {
        return Err(StepError::Input {
            message: format!(
                "`documents` gave document {id} as NULL; select only rows with a document"
            ),
        });
    };
    let doc = serde_json::from_str(&doc).map_err(|e| StepError::Input {
        message: format!("`documents` gave document {id} that is not JSON: {e}"),
    })?;
    Ok((id, version, doc))
}

/// How many of `ids` have a row in `documents`.
fn count_documents(
    env: &mut Env,
    database: &str,
    sql: &str,
    ids: &[String],
) -> Result<u64, StepError> {
    let n: i64 = env
        .db(database)?
        .as_application(|db| {
            db.query_one(
                "count the documents",
                &format!("SELECT count(*) FROM ({sql}) d WHERE d.id::text = ANY($1::text[])"),
                &[&ids],
            )
        })
        .on(database)?
        .get(0);
    Ok(n as u64)
}

fn ids_query(ids: &[String]) -> Value {
    json!({ "ids": { "values": ids } })
}

/// Journaled by a targeted step after each batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Progress {
    done: u64,
    acted: u64,
    newer_kept: u64,
}

/// Journaled first by a targeted step: its ids, by number and digest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct TargetedPrior {
    ids: u64,
    sha256: String,
    before: u64,
}

struct TaskPrior {
    task: String,
    before: u64,
}

/// Journaled by a delete-by-query step before it starts its task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct DbqPrior {
    before: u64,
    /// The task's `X-Opaque-Id`.
    #[serde(default)]
    tag: String,
    /// When `before` was counted (epoch ms): the task started later.
    #[serde(default)]
    at_ms: i64,
    /// Journaled here by earlier builds, which started the task first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    task: Option<String>,
    /// Each index's refresh interval before the step paused it (none:
    /// unset); absent when the step leaves refresh alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh: Option<std::collections::BTreeMap<String, Option<String>>>,
}

/// The indexes of a delete-by-query whose refresh it pauses and puts back:
/// not those whose refresh was off already.
fn paused_here(
    paused: &std::collections::BTreeMap<String, Option<String>>,
) -> impl Iterator<Item = &String> {
    paused
        .iter()
        .filter(|(_, was)| was.as_deref() != Some("-1"))
        .map(|(name, _)| name)
}

/// Journaled under `STEP#task` once the task has started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct TaskStarted {
    task: String,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RebuildPrior {
    old: Vec<String>,
    new: String,
}

impl SearchStep {
    fn name(&self) -> &'static str {
        match self.strategy {
            Strategy::DeleteByQuery { .. } => "delete-by-query",
            Strategy::Targeted { .. } => "targeted",
            Strategy::Rebuild { .. } => "rebuild",
            Strategy::Hook { .. } => "rebuild-hook",
        }
    }

    fn detail(&self) -> SearchDetail {
        SearchDetail {
            search: self.target.search.clone(),
            index: self.target.index.clone(),
            strategy: self.name().into(),
            ..SearchDetail::default()
        }
    }

    fn effect(&self, summary: String, d: SearchDetail) -> Effect {
        Effect {
            summary,
            count: d.acted,
            items: d.old_index.iter().cloned().collect(),
            detail: super::detail(&d),
        }
    }

    fn err(&self, what: String) -> StepError {
        StepError::Check {
            message: format!(
                "index {} ({}): {what}",
                self.target.index, self.target.search
            ),
            findings: Vec::new(),
        }
    }

    /// The index exists and is open: its document count.
    fn open(&self, s: &Search) -> Result<u64, StepError> {
        s.count(&self.target.index, &json!({ "match_all": {} }))
            .map_err(usable)
    }

    /// Every index behind the name maps `field` as a time: a field it
    /// does not map would match nothing, and the step would delete
    /// nothing and say it succeeded.
    fn check_field(&self, s: &Search, field: &str) -> Result<(), StepError> {
        let types = s.field_types(&self.target.index, field).map_err(usable)?;
        if types.is_empty() {
            return Err(StepError::Config(format!(
                "index {} ({}): no index maps `{field}` (timestamp-field): a delete-by-query on it would match nothing",
                self.target.index, self.target.search
            )));
        }
        for (index, t) in &types {
            match t.as_deref() {
                Some(t) if TIME_TYPES.contains(&t) => {}
                Some(t) => {
                    return Err(StepError::Config(format!(
                        "index {index} ({}): `{field}` (timestamp-field) is mapped as {t}, not as a date: map it as date (or epoch milliseconds as long)",
                        self.target.search
                    )))
                }
                None => {
                    return Err(StepError::Config(format!(
                        "index {index} ({}): does not map `{field}` (timestamp-field): a delete-by-query on it would match nothing",
                        self.target.search
                    )))
                }
            }
        }
        Ok(())
    }

    fn targets(&self, env: &mut Env, entities: &Entities) -> Result<(u64, Vec<String>), StepError> {
        let found = entities.find(env, "current")?;
        Ok((found.entities.len() as u64, doc_ids(&found.entities)))
    }

    #[allow(clippy::too_many_arguments)]
    fn apply_dbq(
        &self,
        s: &Search,
        rec: &mut Recorder,
        run_id: &str,
        field: &str,
        t_ms: Option<i64>,
        scroll_size: Option<u64>,
        requests_per_second: Option<u64>,
        timeout: Duration,
        pause_refresh: bool,
    ) -> Result<Effect, StepError> {
        let index = &self.target.index;
        let q = after_t(field, t_ms)?;
        // The count before, then the task, then its id, each journaled
        // before the next: a resumed run counts nothing again after a
        // partial deletion, and a run that died between starting the task
        // and journaling its id finds the task by its tag rather than
        // starting a second one.
        let rec_step = rec.step;
        let prior: DbqPrior = rec.prior(|| {
            // The task deletes what a search sees: documents not refreshed
            // yet would escape it.
            s.refresh(index)?;
            Ok(DbqPrior {
                before: s.count(index, &q)?,
                // ASCII, whatever the step's name: it goes in a header.
                tag: format!(
                    "reentry-{}",
                    &crate::reentry::plan::sha256_hex(format!("{run_id}\n{rec_step}").as_bytes())
                        [..32]
                ),
                at_ms: now_ms(),
                task: None,
                refresh: pause_refresh
                    .then(|| s.refresh_intervals(index))
                    .transpose()?,
            })
        })?;
        // The intervals as they were are journaled above, before the first
        // change: a resumed run puts those back, not the -1 it finds.
        let paused = prior.refresh.clone().unwrap_or_default();
        // An index whose refresh was already off is left as it is, and
        // said so: it may be the user's choice, or what an abandoned run
        // left, and only the user knows which.
        let already_off: Vec<&str> = paused
            .iter()
            .filter(|(_, was)| was.as_deref() == Some("-1"))
            .map(|(name, _)| name.as_str())
            .collect();
        self.pause_refresh(s, &paused);
        let result = self.run_dbq(s, rec, prior, &q, scroll_size, requests_per_second, timeout);
        let restored = self.restore_refresh(s, &paused);
        let response = match (result, restored) {
            (Ok(r), Ok(())) => r,
            (Err(e), Ok(())) | (Ok(_), Err(e)) => return Err(e),
            // Interrupted: --resume puts it back; the log says it now.
            (Err(StepError::Interrupted), Err(r)) => {
                tracing::error!(error = %r, "could not put the refresh interval back");
                return Err(StepError::Interrupted);
            }
            (Err(e), Err(r)) => return Err(self.err(format!("{e}; and {r}"))),
        };
        let (task, before, response) = response;
        s.refresh(index)?;
        let after = s.count(index, &q)?;
        let mut d = self.detail();
        d.before = before;
        d.acted = response["deleted"].as_u64().unwrap_or(0);
        d.newer_kept = response["version_conflicts"].as_u64().unwrap_or(0);
        d.after = after;
        d.task = Some(task.clone());
        // With conflicts=proceed a document written during the task is
        // kept and counted, not deleted: something wrote to the index while
        // the gates were closed, and deleting its write blindly is not ours
        // to decide.
        if after > 0 {
            return Err(self.err(format!(
                "{after} document(s) with {field} after T remain after task {task} ({} version conflict(s): written during the task); find what writes to the index while the gates are closed, then start a new run",
                d.newer_kept
            )));
        }
        let left_off = if already_off.is_empty() {
            String::new()
        } else {
            format!(
                "; refresh_interval was already -1 on {} before the step, and is left so: set it back if an earlier run left it",
                already_off.join(", ")
            )
        };
        Ok(self.effect(
            format!(
                "deleted {} document(s) with {field} after T from {index} (task {task}){left_off}",
                d.acted
            ),
            d,
        ))
    }

    /// Periodic refresh off on each index of `paused`, for the task's
    /// length: a refresh a second during a million deletes makes segments
    /// to merge and searchers to warm, and the task's own scroll reads a
    /// snapshot anyway. On OpenSearch 2.19 (2 cores, `bench/search`) the
    /// node's CPU for a million deletes went from 0.88x to 0.80x of what
    /// the script's run cost it, and searches meanwhile were faster at p99. Searches see the index as it was until the step
    /// refreshes it at the end. The pause only saves work: an index that
    /// refuses it (a settings block, a role without
    /// `indices:admin/settings/update`, gone since) keeps its refresh,
    /// with a warning, and the task runs all the same.
    fn pause_refresh(
        &self,
        s: &Search,
        paused: &std::collections::BTreeMap<String, Option<String>>,
    ) {
        for name in paused_here(paused) {
            match s.set_refresh_interval(name, Some("-1")) {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(index = %name, "gone from the cluster: its refresh is not paused")
                }
                Err(e) => {
                    tracing::warn!(index = %name, error = %e, "could not pause refresh: the task runs with it on")
                }
            }
        }
    }

    /// Each index of `paused` back to the interval it had before. One gone
    /// since has nothing to put back; one that refuses fails the step,
    /// naming the request that puts it back by hand (`--resume` tries
    /// again).
    fn restore_refresh(
        &self,
        s: &Search,
        paused: &std::collections::BTreeMap<String, Option<String>>,
    ) -> Result<(), StepError> {
        let mut failed = Vec::new();
        for name in paused_here(paused) {
            let was = paused[name].as_deref();
            match s.set_refresh_interval(name, was) {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(index = %name, "gone from the cluster: no refresh interval to put back")
                }
                Err(e) => failed.push(format!(
                    "{e}; its refresh is still off: put it back with PUT /{name}/_settings {}",
                    json!({ "index": { "refresh_interval": was } })
                )),
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(self.err(format!(
                "could not put the refresh interval back: {}",
                failed.join("; ")
            )))
        }
    }

    /// Starts the task (or finds the one this step started) and waits for
    /// it: its id, the count before, and its answer.
    #[allow(clippy::too_many_arguments)]
    fn run_dbq(
        &self,
        s: &Search,
        rec: &mut Recorder,
        prior: DbqPrior,
        q: &Value,
        scroll_size: Option<u64>,
        requests_per_second: Option<u64>,
        timeout: Duration,
    ) -> Result<(String, u64, Value), StepError> {
        let index = &self.target.index;
        let task_key = format!("{}#task", rec.step);
        let started = rec.prior_of::<TaskStarted>(&task_key)?;
        let task = match (started, prior.task) {
            (Some(t), _) => t.task,
            // Journaled by a build that started the task inside the prior.
            (None, Some(t)) => t,
            (None, None) => {
                // Ten minutes of leeway for a clock that differs from the
                // node's.
                let since = prior.at_ms - 600_000;
                let task = match s.find_delete_by_query(index, &prior.tag, since)? {
                    Some(t) => {
                        tracing::info!(task = %t, "found the task this step started before it stopped");
                        t
                    }
                    None => s.delete_by_query(
                        index,
                        q,
                        scroll_size.unwrap_or(DBQ_BATCH),
                        requests_per_second,
                        &prior.tag,
                    )?,
                };
                pause_point(rec.step, "task-started");
                rec.prior_keyed(&task_key, &TaskStarted { task: task.clone() })?;
                task
            }
        };
        let prior = TaskPrior {
            task,
            before: prior.before,
        };
        let step_id = rec.step.to_owned();
        pause_point(&step_id, "task");
        // Counted from this run's start of waiting: a resumed run waits
        // again for the same task.
        let deadline = Instant::now() + timeout;
        let response = loop {
            match s.task(index, &prior.task)? {
                None => {
                    return Err(self.err(format!(
                        "task {} is gone from the cluster's task list: check the index by hand, or start a new run",
                        prior.task
                    )))
                }
                Some((true, r)) => break r,
                Some((false, _)) if Instant::now() >= deadline => {
                    return Err(self.err(format!(
                        "delete-by-query task {task} still runs after {} (task-timeout): it goes on in the cluster. Wait for it with --resume (which polls the same task), or stop it with POST /_tasks/{task}/_cancel and start a new run",
                        humantime::format_duration(timeout),
                        task = prior.task
                    )))
                }
                Some((false, _)) => rec.sleep_until(std::time::SystemTime::now() + Duration::from_millis(200))?,
            }
        };
        if let Some(f) = response["failures"].as_array().filter(|f| !f.is_empty()) {
            return Err(self.err(format!(
                "delete-by-query task {} failed: {}",
                prior.task, f[0]
            )));
        }
        Ok((prior.task, prior.before, response))
    }

    fn apply_targeted(
        &self,
        env: &mut Env,
        s: &Search,
        rec: &mut Recorder,
    ) -> Result<Effect, StepError> {
        let Strategy::Targeted {
            entities,
            documents: sql,
            database,
            batch_size: batch,
        } = &self.strategy
        else {
            unreachable!("a targeted step");
        };
        let (sql, batch) = (sql.as_deref(), *batch);
        let index = &self.target.index;
        let (n_entities, ids) = self.targets(env, entities)?;
        let sha = crate::reentry::plan::sha256_hex(ids.join("\n").as_bytes());
        let prior: TargetedPrior = rec.prior(|| {
            s.refresh(index)?;
            Ok(TargetedPrior {
                ids: ids.len() as u64,
                sha256: sha.clone(),
                before: count_ids(s, index, &ids)?,
            })
        })?;
        let under = format!("{}#batch-", rec.step);
        let last = rec
            .priors_under::<Progress>(&under)?
            .into_values()
            .max_by_key(|p| p.done)
            .filter(|_| prior.sha256 == sha);
        let mut p = last.unwrap_or(Progress {
            done: 0,
            acted: 0,
            newer_kept: 0,
        });
        let step_id = rec.step.to_owned();
        let mut first = true;
        let mut present = 0u64;
        // Rows are read a page of PAGE_ROUNDS rounds at a time (each query
        // scans `documents` once, whatever the number of ids), the next
        // page while the last round of this one is in the index's hands. A
        // round is IN_FLIGHT batches sent at once. Progress is journaled
        // after the first round, then at most once every JOURNAL_EVERY and
        // after the last: a batch sent again after a crash changes nothing
        // (the same versions), so a finer record buys nothing but fsyncs.
        let page = batch * IN_FLIGHT * PAGE_ROUNDS;
        let mut rows = std::collections::HashMap::new();
        let mut page_end = p.done as usize;
        let mut next: Option<(usize, Docs)> = None;
        let mut journaled = Instant::now();
        while (p.done as usize) < ids.len() {
            let start = p.done as usize;
            if let Some(sql) = sql.filter(|_| start >= page_end) {
                let docs = match next.take() {
                    Some((end, docs)) => {
                        page_end = end;
                        docs
                    }
                    None => {
                        page_end = (start + page).min(ids.len());
                        documents(env, database, sql, &ids[start..page_end])?
                    }
                };
                rows = docs
                    .into_iter()
                    .map(|(id, v, doc)| (id, (v, doc)))
                    .collect();
            }
            let end = (start + batch * IN_FLIGHT).min(ids.len());
            let end = if sql.is_some() {
                end.min(page_end)
            } else {
                end
            };
            let round = &ids[start..end];
            let work: Vec<(&[String], Option<Docs>)> = round
                .chunks(batch)
                .map(|chunk| {
                    let docs = sql.map(|_| {
                        chunk
                            .iter()
                            .filter_map(|id| rows.remove(id).map(|(v, d)| (id.clone(), v, d)))
                            .collect()
                    });
                    (chunk, docs)
                })
                .collect();
            let prefetch = sql
                .filter(|_| end == page_end && end < ids.len())
                .map(|sql| (sql, (end + page).min(ids.len())));
            let (answers, fetched) = std::thread::scope(|scope| {
                let handles: Vec<_> = work
                    .into_iter()
                    .map(|(chunk, docs)| {
                        scope.spawn(move || match docs {
                            None => self.delete_ids(s, chunk),
                            Some(docs) => self.reindex(s, chunk, docs),
                        })
                    })
                    .collect();
                let fetched = prefetch.map(|(sql, next_end)| {
                    documents(env, database, sql, &ids[end..next_end]).map(|docs| (next_end, docs))
                });
                let answers: Vec<Result<(u64, u64), StepError>> = handles
                    .into_iter()
                    .map(|h| h.join().expect("a bulk thread panicked"))
                    .collect();
                (answers, fetched)
            });
            for a in answers {
                let (acted, kept) = a?;
                p.acted += acted;
                p.newer_kept += kept;
            }
            p.done = end as u64;
            if first || end == ids.len() || journaled.elapsed() >= JOURNAL_EVERY {
                rec.prior_keyed(&format!("{under}{end:012}"), &p)?;
                journaled = Instant::now();
            }
            if first {
                pause_point(&step_id, "batch");
                first = false;
            }
            next = fetched.transpose()?;
        }
        if let Some(sql) = sql {
            present = count_documents(env, database, sql, &ids)?;
        }
        s.refresh(index)?;
        let after = count_ids(s, index, &ids)?;
        let mut d = self.detail();
        d.before = prior.before;
        d.acted = p.acted;
        d.newer_kept = p.newer_kept;
        d.after = after;
        // Deleted: none may be left. Indexed again: one per surviving row.
        if after != present {
            return Err(self.err(format!(
                "{after} of the {} changed entities' documents are in the index after the step; expected {present}",
                ids.len()
            )));
        }
        let verb = if sql.is_some() {
            "indexed again"
        } else {
            "deleted"
        };
        Ok(self.effect(
            format!(
                "{verb} {} document(s) of {n_entities} changed entit{} in {index}{}",
                p.acted,
                if n_entities == 1 { "y" } else { "ies" },
                if p.newer_kept > 0 {
                    format!("; {} newer document(s) kept", p.newer_kept)
                } else {
                    String::new()
                }
            ),
            d,
        ))
    }

    /// Bulk deletes of `ids`: how many were there.
    fn delete_ids(&self, s: &Search, ids: &[String]) -> Result<(u64, u64), StepError> {
        let index = &self.target.index;
        let actions: Vec<(Value, Option<Value>)> = ids
            .iter()
            .map(|id| (json!({ "delete": { "_index": index, "_id": id } }), None))
            .collect();
        let mut deleted = 0;
        for item in s.bulk(index, &actions)? {
            match item.status {
                200 => deleted += 1,
                404 => {}
                _ => return Err(self.item_err(&item)),
            }
        }
        Ok((deleted, 0))
    }

    fn item_err(&self, item: &crate::search::Item) -> StepError {
        self.err(format!(
            "document {}: HTTP {} {}: {}",
            item.id,
            item.status,
            item.result,
            item.reason.as_deref().unwrap_or("")
        ))
    }

    /// Each id indexed again from its row, or deleted when its row is gone.
    /// A row goes first at its own version with `external_gte`, which most
    /// stored documents (older) accept without being read. One the index
    /// refuses (409: the stored document is newer, written after T) is read
    /// with `_mget` and written again at the stored version, which
    /// `external_gte` accepts and which then refuses every replay up to it.
    /// A document whose row is gone is read for its `_seq_no` and deleted,
    /// guarded by it. A refusal on that second write is a write newer still,
    /// kept.
    fn reindex(&self, s: &Search, ids: &[String], docs: Docs) -> Result<(u64, u64), StepError> {
        let index = &self.target.index;
        let rows: std::collections::BTreeMap<&str, (i64, &Value)> = docs
            .iter()
            .map(|(id, v, d)| (id.as_str(), (*v, d)))
            .collect();
        let put = |id: &str, version: i64, doc: &Value| {
            (
                json!({ "index": { "_index": index, "_id": id, "version": version, "version_type": "external_gte" } }),
                Some(doc.clone()),
            )
        };
        let (with_row, mut look): (Vec<&String>, Vec<&String>) =
            ids.iter().partition(|id| rows.contains_key(id.as_str()));
        let first: Vec<(Value, Option<Value>)> = with_row
            .iter()
            .map(|id| {
                let (v, doc) = rows[id.as_str()];
                put(id, v, doc)
            })
            .collect();
        let (mut acted, mut kept) = (0, 0);
        for (id, item) in with_row.iter().zip(s.bulk(index, &first)?) {
            match item.status {
                200 | 201 => acted += 1,
                409 => look.push(id),
                _ => return Err(self.item_err(&item)),
            }
        }
        if look.is_empty() {
            return Ok((acted, kept));
        }
        let look: Vec<String> = look.into_iter().cloned().collect();
        let stored = s.mget(index, &look)?;
        let mut actions = Vec::new();
        for (id, st) in look.iter().zip(&stored) {
            match (rows.get(id.as_str()), st) {
                (Some((v, doc)), st) => {
                    actions.push(put(id, st.map_or(*v, |s| s.version.max(*v)), doc))
                }
                (None, Some(st)) => actions.push((
                    json!({ "delete": { "_index": index, "_id": id, "if_seq_no": st.seq_no, "if_primary_term": st.primary_term } }),
                    None,
                )),
                (None, None) => {}
            }
        }
        for item in s.bulk(index, &actions)? {
            match item.status {
                200 | 201 => acted += 1,
                404 => {}
                409 => kept += 1,
                _ => return Err(self.item_err(&item)),
            }
        }
        Ok((acted, kept))
    }

    fn apply_rebuild(
        &self,
        env: &mut Env,
        s: &Search,
        rec: &mut Recorder,
        sql: &str,
        database: &str,
        batch: usize,
    ) -> Result<Effect, StepError> {
        let alias = &self.target.index;
        let run = env.run_id.clone();
        let prior: RebuildPrior = rec.prior(|| {
            let old = s.alias(alias)?;
            if old.is_empty() {
                return Err(self.err(format!(
                    "`{alias}` is not an alias: a rebuild builds a new index and moves the alias to it"
                )));
            }
            Ok(RebuildPrior {
                new: format!("{alias}-reentry-{}", run.to_lowercase()),
                old,
            })
        })?;
        let now = s.alias(alias)?;
        let mut d = self.detail();
        d.old_index = Some(prior.old.join(", "));
        d.new_index = Some(prior.new.clone());
        if now != [prior.new.clone()] {
            if s.mappings(&prior.new)?.is_none() {
                // The old index's shards, replicas and analysis too: with
                // the server's defaults (one replica) the new index would
                // differ from the one it replaces, and on a cluster of one
                // node stay yellow.
                let mappings = s.mappings(&prior.old[0])?.unwrap_or(json!({}));
                let settings = s.copied_settings(&prior.old[0])?;
                s.create_index(&prior.new, &settings, &mappings)?;
            }
            // Streamed: a page of `batch` rows at a time from a cursor,
            // handed to a thread that sends each as one bulk request while
            // the next is read (reqwest's blocking client must not run
            // inside the database client's runtime). At most a few pages
            // are in memory, whatever the number of documents.
            let started = Instant::now();
            let step_id = rec.step.to_owned();
            let new = prior.new.clone();
            let select = format!("SELECT d.id::text, d.version::int8, d.doc::text FROM ({sql}) d");
            let db = env.db(database)?;
            let (read, indexed) = std::thread::scope(|scope| {
                let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<(Value, Option<Value>)>>(2);
                let writer = scope.spawn(move || -> Result<u64, StepError> {
                    let mut n = 0u64;
                    let mut last_said = Instant::now();
                    for actions in rx {
                        for item in s.bulk(&new, &actions)? {
                            if !matches!(item.status, 200 | 201 | 409) {
                                return Err(self.item_err(&item));
                            }
                        }
                        if n == 0 {
                            pause_point(&step_id, "batch");
                        }
                        n += actions.len() as u64;
                        if last_said.elapsed() > Duration::from_secs(5) {
                            tracing::info!(index = %new, "{n} documents indexed");
                            last_said = Instant::now();
                        }
                    }
                    Ok(n)
                });
                // The playbook's SQL, under the application's search path.
                let read = db.as_application(|db| db.stream_rows(
                    "read the documents",
                    &select,
                    &[],
                    batch as i32,
                    |rows| -> Result<(), StepError> {
                        let mut actions = Vec::with_capacity(rows.len());
                        for r in rows {
                            let (id, version, doc) = document(r)?;
                            actions.push((
                                json!({ "index": { "_index": prior.new, "_id": id, "version": version, "version_type": "external_gte" } }),
                                Some(doc),
                            ));
                        }
                        // A closed channel: the writer stopped, and says why.
                        tx.send(actions).map_err(|_| StepError::Input {
                            message: "the bulk writer stopped".into(),
                        })
                    },
                ));
                drop(tx);
                (read, writer.join().expect("the bulk thread panicked"))
            });
            let total = match (read, indexed) {
                (_, Err(e)) | (Err(e), Ok(_)) => return Err(e),
                (Ok(()), Ok(n)) => n,
            };
            s.refresh(&prior.new)?;
            let built = s.count(&prior.new, &json!({ "match_all": {} }))?;
            if built != total {
                return Err(self.err(format!(
                    "the new index {} holds {built} documents, not the {total} the query gave: the alias was not moved",
                    prior.new,
                )));
            }
            s.swap_alias(alias, &prior.old, &prior.new)?;
            tracing::info!(index = %prior.new, "built in {:.1}s", started.elapsed().as_secs_f64());
        }
        s.refresh(alias)?;
        d.after = s.count(alias, &json!({ "match_all": {} }))?;
        d.acted = d.after;
        Ok(self.effect(
            format!(
                "rebuilt {alias} as {} ({} documents); the old index {} is kept: drop it once the run is accepted",
                prior.new,
                d.after,
                prior.old.join(", ")
            ),
            d,
        ))
    }

    /// Runs the hook with a cleared environment (`HOOK_ENV`, `hook-env`
    /// and the `REENTRY_*` it is given), in its own process group, killed
    /// whole at `timeout`; its output is journaled with every secret the
    /// playbook uses replaced by `<redacted>`.
    fn apply_hook(
        &self,
        env: &mut Env,
        rec: &mut Recorder,
        command: &str,
        t_ms: Option<i64>,
        timeout: Duration,
        names: &[String],
    ) -> Result<Effect, StepError> {
        let dir = env
            .playbook
            .file
            .parent()
            .map(std::path::Path::to_path_buf)
            .unwrap_or_default();
        rec.prior(|| Ok(command.to_owned()))?;
        let mut vars: Vec<(String, std::ffi::OsString)> = HOOK_ENV
            .iter()
            .copied()
            .chain(names.iter().map(String::as_str))
            .filter_map(|name| std::env::var_os(name).map(|v| (name.to_owned(), v)))
            .collect();
        vars.push((
            "REENTRY_SEARCH_INDEX".into(),
            self.target.index.clone().into(),
        ));
        vars.push(("REENTRY_RUN_ID".into(), env.run_id.clone().into()));
        if let Some(t) = t_ms {
            vars.push((
                "REENTRY_T".into(),
                crate::reentry::plan::rfc3339_ms(t).into(),
            ));
        }
        let dir = if dir.as_os_str().is_empty() {
            ".".into()
        } else {
            dir
        };
        // A hook a run that died left running (it is in a process group
        // of its own, so nothing killed it) goes before another starts.
        let key = format!("{}#hook/", rec.step);
        let mut stopped = Vec::new();
        for (_, left) in rec.priors_under::<hook::Group>(&key)? {
            if hook::stop_left(&left) {
                stopped.push(left.pgid.to_string());
            }
        }
        let interrupted = rec.interrupted;
        let ran = hook::run(command, &dir, &vars, timeout, interrupted, |g| {
            rec.prior_keyed(&format!("{key}{}-{}", g.pgid, g.leader_start), g)
                .map_err(std::io::Error::other)
        })
        .map_err(|source| StepError::Io {
            what: "run the rebuild hook",
            source,
        })?;
        let mut text = String::new();
        if !stopped.is_empty() {
            text.push_str(&format!(
                "[stopped what an earlier attempt's hook left running: process group {}]\n",
                stopped.join(", ")
            ));
        }
        text.push_str(&ran.output);
        if ran.left_running {
            text.push_str(
                "\n[the hook exited; a process it started in the background still holds its \
                 output, which was not waited for]",
            );
        }
        let mut text = redact(&text, &secrets(env.playbook));
        if text.len() > HOOK_OUTPUT {
            let cut = (0..=HOOK_OUTPUT)
                .rev()
                .find(|&i| text.is_char_boundary(i))
                .unwrap_or(0);
            text.truncate(cut);
            text.push_str("\n[output cut]");
        }
        let mut d = self.detail();
        d.output = Some(text.clone());
        let status = match ran.end {
            hook::End::Exited(status) => status,
            hook::End::Interrupted => return Err(StepError::Interrupted),
            hook::End::TimedOut => return Err(StepError::Check {
                message: format!(
                    "the rebuild hook of {} ran longer than {} and was killed with its child processes; \
                     raise hook-timeout in [[search]] if it needs longer",
                    self.target.search,
                    humantime::format_duration(timeout)
                ),
                findings: text.lines().map(str::to_owned).collect(),
            }),
        };
        d.exit_code = status.code();
        if !status.success() {
            return Err(StepError::Check {
                message: format!(
                    "the rebuild hook of {} exited {}: {}",
                    self.target.search,
                    status
                        .code()
                        .map_or("on a signal".into(), |c| c.to_string()),
                    text.lines().last().unwrap_or("")
                ),
                findings: text.lines().map(str::to_owned).collect(),
            });
        }
        d.acted = 1;
        Ok(self.effect(
            format!("ran the rebuild hook of {}: exit 0", self.target.search),
            d,
        ))
    }
}

/// Values a hook's output must not carry into the journal: every
/// `${VAR}` the playbook uses, and any variable of reentry's environment
/// whose name says it is a credential.
fn secrets(p: &Playbook) -> Vec<String> {
    let shown = serde_json::to_string(p).unwrap_or_default();
    let mut names: Vec<String> = shown
        .split("${")
        .skip(1)
        .filter_map(|s| s.split_once('}').map(|(n, _)| n.to_owned()))
        .collect();
    for name in std::env::vars_os().filter_map(|(n, _)| n.into_string().ok()) {
        let upper = name.to_ascii_uppercase();
        if [
            "PASSWORD",
            "SECRET",
            "TOKEN",
            "KEY",
            "CREDENTIAL",
            "_URL",
            "CONNINFO",
        ]
        .iter()
        .any(|w| upper.contains(w))
        {
            names.push(name);
        }
    }
    let mut values: Vec<String> = names
        .iter()
        .filter_map(|n| std::env::var(n).ok())
        .filter(|v| v.len() >= 4)
        .collect();
    // Longest first, so that a secret containing another goes whole.
    values.sort_by_key(|v| std::cmp::Reverse(v.len()));
    values.dedup();
    values
}

fn redact(text: &str, secrets: &[String]) -> String {
    secrets
        .iter()
        .fold(text.to_owned(), |t, s| t.replace(s.as_str(), "<redacted>"))
}

/// How many of `ids` a search finds, 10,000 ids a request: an `ids` query
/// is not held to `index.max_terms_count` as a `terms` query is (OpenSearch
/// 2.19 counted 70,000 in one), and each request is a search of its own.
fn count_ids(s: &Search, index: &str, ids: &[String]) -> Result<u64, StepError> {
    let mut n = 0;
    for chunk in ids.chunks(10_000) {
        n += s.count(index, &ids_query(chunk))?;
    }
    Ok(n)
}

impl Step for SearchStep {
    fn nature(&self) -> Nature {
        Nature::Changes
    }

    fn evidence(&self, effect: &Effect) -> Option<Evidence> {
        let d: SearchDetail = serde_json::from_value(effect.detail.clone()).ok()?;
        let mut lines = Vec::new();
        if let (Some(old), Some(new)) = (&d.old_index, &d.new_index) {
            lines.push(format!("{}: the alias now points to {new}; the old index {old} is kept (DELETE /{old} once the run is accepted)", d.index));
        }
        if let Some(t) = &d.task {
            lines.push(format!("{}: delete-by-query task {t}", d.index));
        }
        if let Some(c) = d.exit_code {
            lines.push(format!("{}: rebuild hook exited {c}", d.search));
        }
        Some(Evidence {
            section: "Search indexes".into(),
            columns: [
                "search",
                "index",
                "strategy",
                "before",
                "acted on",
                "newer kept",
                "after",
            ]
            .map(String::from)
            .to_vec(),
            row: vec![
                d.search.clone(),
                d.index.clone(),
                d.strategy.clone(),
                d.before.to_string(),
                d.acted.to_string(),
                d.newer_kept.to_string(),
                d.after.to_string(),
            ],
            lines,
        })
    }

    fn preview(&self, env: &mut Env) -> Result<Effect, StepError> {
        let index = &self.target.index;
        let mut d = self.detail();
        let summary = match &self.strategy {
            Strategy::DeleteByQuery {
                timestamp_field,
                t_ms,
                pause_refresh,
                ..
            } => {
                let s = self.target.connect()?;
                self.open(&s)?;
                self.check_field(&s, timestamp_field)?;
                d.before = s.count(index, &after_t(timestamp_field, *t_ms)?)?;
                d.acted = d.before;
                format!(
                    "{} document(s) in {index} have {timestamp_field} after T: would delete them by query{}",
                    d.before,
                    if *pause_refresh {
                        ", with the index's periodic refresh off meanwhile"
                    } else {
                        ""
                    }
                )
            }
            Strategy::Targeted {
                entities,
                documents: sql,
                ..
            } => {
                let s = self.target.connect()?;
                self.open(&s)?;
                let (n, ids) = self.targets(env, entities)?;
                d.before = count_ids(&s, index, &ids)?;
                d.acted = d.before;
                let verb = if sql.is_some() {
                    "index them again"
                } else {
                    "delete them"
                };
                format!(
                    "{} of {n} changed entit{}' document(s) are in {index}: would {verb}",
                    d.before,
                    if n == 1 { "y" } else { "ies" }
                )
            }
            Strategy::Rebuild {
                documents: sql,
                database,
                ..
            } => {
                let s = self.target.connect()?;
                let rows: i64 = env
                    .db(database)?
                    .as_application(|db| {
                        db.query_one(
                            "count the documents",
                            &format!("SELECT count(*) FROM ({sql}) d"),
                            &[],
                        )
                    })
                    .on(database)?
                    .get(0);
                d.before = self.open(&s)?;
                d.acted = rows as u64;
                format!("would build a new index of {rows} document(s) from {database} and move alias {index} to it (now {} document(s))", d.before)
            }
            Strategy::Hook { command, .. } => format!("would run the rebuild hook `{command}`"),
        };
        Ok(self.effect(summary, d))
    }

    fn apply(&self, env: &mut Env, rec: &mut Recorder) -> Result<Effect, StepError> {
        match &self.strategy {
            Strategy::DeleteByQuery {
                timestamp_field,
                t_ms,
                requests_per_second,
                scroll_size,
                task_timeout_ms,
                pause_refresh,
            } => {
                let s = self.target.connect()?;
                self.apply_dbq(
                    &s,
                    rec,
                    &env.run_id,
                    timestamp_field,
                    *t_ms,
                    *scroll_size,
                    *requests_per_second,
                    task_timeout_ms.map_or(TASK_TIMEOUT, Duration::from_millis),
                    *pause_refresh,
                )
            }
            Strategy::Targeted { .. } => {
                let s = self.target.connect()?;
                self.apply_targeted(env, &s, rec)
            }
            Strategy::Rebuild {
                documents,
                database,
                batch_size,
            } => {
                let s = self.target.connect()?;
                self.apply_rebuild(env, &s, rec, documents, database, *batch_size)
            }
            Strategy::Hook {
                command,
                t_ms,
                timeout_ms,
                env: names,
            } => {
                let timeout = timeout_ms.map_or(HOOK_TIMEOUT, Duration::from_millis);
                self.apply_hook(env, rec, command, *t_ms, timeout, names)
            }
        }
    }
}

fn plan(p: &Playbook, ctx: &PlanCtx) -> Vec<PlannedStep> {
    let mut out = Vec::new();
    for s in indexes(p) {
        let target = Target {
            search: s.name.clone(),
            url: s.url.clone(),
            index: s.index.clone(),
            username: s.username.clone(),
            password: s.password.clone(),
            api_key: s.api_key.clone(),
            tls: TlsFiles {
                ca: s.tls_ca.clone(),
                certificate: s.tls_certificate.clone(),
                key: s.tls_key.clone(),
            },
        };
        let database = s
            .database
            .clone()
            .unwrap_or_else(|| ctx.survivor.to_owned());
        let batch_size = s.batch_size.map_or(BATCH, |b| b.max(1) as usize);
        let (kind, strategy, title): (fn(SearchStep) -> super::Action, Strategy, String) =
            match s.strategy.as_str() {
                "delete-by-query" => (
                    super::Action::SearchDeleteByQuery,
                    Strategy::DeleteByQuery {
                        timestamp_field: s.timestamp_field.clone().unwrap_or_default(),
                        t_ms: ctx.t_ms,
                        requests_per_second: s.requests_per_second.map(|r| r.max(1) as u64),
                        scroll_size: s.batch_size.map(|b| b.clamp(1, 10_000) as u64),
                        task_timeout_ms: s
                            .task_timeout
                            .as_deref()
                            .and_then(|t| humantime::parse_duration(t).ok())
                            .map(|d| d.as_millis() as u64),
                        pause_refresh: s.pause_refresh.unwrap_or(true),
                    },
                    format!("delete the documents of {} written after T", s.index),
                ),
                "targeted" => (
                    super::Action::SearchTargeted,
                    Strategy::Targeted {
                        entities: Entities {
                            table: s.table.clone().unwrap_or_default(),
                            key: s.key.clone().unwrap_or_default(),
                            updated_at: s.updated_at.clone(),
                            outboxes: s.outboxes.clone().unwrap_or_default(),
                            t_ms: ctx.t_ms,
                        },
                        documents: s.documents.clone(),
                        database,
                        batch_size,
                    },
                    format!(
                        "{} the documents of entities changed around T in {}",
                        if s.documents.is_some() {
                            "index again"
                        } else {
                            "delete"
                        },
                        s.index
                    ),
                ),
                "rebuild" => (
                    super::Action::SearchRebuild,
                    Strategy::Rebuild {
                        documents: s.documents.clone().unwrap_or_default(),
                        database,
                        batch_size,
                    },
                    format!(
                        "rebuild {} from the surviving database and move the alias",
                        s.index
                    ),
                ),
                _ => (
                    super::Action::SearchHook,
                    Strategy::Hook {
                        command: s.rebuild_hook.clone().unwrap_or_default(),
                        t_ms: ctx.t_ms,
                        timeout_ms: s
                            .hook_timeout
                            .as_deref()
                            .and_then(|t| humantime::parse_duration(t).ok())
                            .map(|d| d.as_millis() as u64),
                        env: s.hook_env.clone().unwrap_or_default(),
                    },
                    format!("run the rebuild hook of {}", s.index),
                ),
            };
        out.push(step(
            format!(
                "search-{}:{}",
                s.strategy.replace("rebuild-hook", "hook"),
                s.name
            ),
            Phase::Reconcile,
            title,
            kind(SearchStep { target, strategy }),
        ));
    }
    out
}

fn needs_time(p: &Playbook) -> bool {
    indexes(p).iter().any(|s| {
        s.strategy == "delete-by-query" || (s.strategy == "targeted" && s.updated_at.is_some())
    })
}

fn meaning(m: &mut Meaning) {
    let mut seen = std::collections::BTreeSet::new();
    for (i, s) in indexes(m.p).iter().enumerate() {
        if !seen.insert(s.name.clone()) {
            m.error(
                &at(i, "name"),
                format!("a second [[search]] named `{}`", s.name),
            );
        }
        if let Some(problem) = crate::search::index_name_problem(&s.index) {
            m.error(&at(i, "index"), format!("`{}`: {problem}", s.index));
        }
        let need = |m: &mut Meaning, present: bool, key: &'static str, why: &str| {
            if !present {
                m.error(
                    &at(i, "strategy"),
                    format!("`{}` needs `{key}`: {why}", s.strategy),
                );
            }
        };
        match s.strategy.as_str() {
            "delete-by-query" => need(
                m,
                s.timestamp_field.is_some(),
                "timestamp-field",
                "the document field compared with T",
            ),
            "targeted" => need(
                m,
                s.table.is_some(),
                "table",
                "the entity table whose changed rows name the documents",
            ),
            "rebuild" => need(
                m,
                s.documents.is_some(),
                "documents",
                "SQL returning id, version and doc for every document",
            ),
            _ => need(
                m,
                s.rebuild_hook.is_some(),
                "rebuild-hook",
                "the command to run",
            ),
        }
        if s.password.is_some() && s.username.is_none() {
            m.error(&at(i, "password"), "`password` without `username`".into());
        }
        if s.api_key.is_some() && s.username.is_some() {
            m.error(
                &at(i, "api-key"),
                "give `api-key` or `username`, not both".into(),
            );
        }
        if let Some(key) = TlsFiles::unpaired(s.tls_certificate.is_some(), s.tls_key.is_some()) {
            m.error(&at(i, key), TlsFiles::UNPAIRED.into());
        }
        if let Some(d) = &s.database {
            m.database(&at(i, "database"), d);
        }
        Entities::check_outboxes(m, &at(i, "outboxes"), s.outboxes.as_ref());
        if s.batch_size.is_some_and(|b| b < 1) {
            m.error(
                &at(i, "batch-size"),
                "`batch-size` must be at least 1".into(),
            );
        }
        if s.strategy == "delete-by-query" && s.batch_size.is_some_and(|b| b > 10_000) {
            m.error(
                &at(i, "batch-size"),
                "a delete-by-query's `batch-size` is a scroll page: at most 10000 (index.max_result_window)".into(),
            );
        }
        if s.task_timeout.is_some() && s.strategy != "delete-by-query" {
            m.error(
                &at(i, "task-timeout"),
                format!("`task-timeout` bounds the wait for a delete-by-query task, and this entry's strategy is `{}`", s.strategy),
            );
        }
        if let Some(r) = s.requests_per_second {
            if s.strategy != "delete-by-query" {
                m.error(
                    &at(i, "requests-per-second"),
                    format!("`requests-per-second` throttles a delete-by-query task, and this entry's strategy is `{}`", s.strategy),
                );
            } else if r < 1 {
                m.error(
                    &at(i, "requests-per-second"),
                    "`requests-per-second` must be at least 1 (leave it out for no throttle)"
                        .into(),
                );
            }
        }
    }
}

fn needs(p: &Playbook) -> Vec<Need<'_>> {
    indexes(p)
        .into_iter()
        .enumerate()
        .filter(|(_, s)| s.strategy == "targeted")
        .filter_map(|(i, s)| {
            let table = s.table.clone()?;
            Some(Need {
                database: "current",
                columns: s
                    .key
                    .iter()
                    .flatten()
                    .cloned()
                    .chain(s.updated_at.clone())
                    .collect(),
                path: at(i, "table"),
                what: format!("search `{}` entity table `{table}`", s.name),
                table,
            })
        })
        .collect()
}

/// `documents`, prepared where it runs.
fn queries(p: &Playbook) -> Vec<Prepared<'_>> {
    let (survivor, _) = crate::reentry::plan::survivor(p.playbook.way_back);
    indexes(p)
        .into_iter()
        .enumerate()
        .filter_map(|(i, s)| {
            let sql = s.documents.clone()?;
            let database = match s.database.as_deref() {
                None => survivor,
                Some(d) => p
                    .databases
                    .keys()
                    .find(|k| k.as_str() == d)
                    .map_or(survivor, String::as_str),
            };
            Some(Prepared {
                path: at(i, "documents"),
                database,
                sql: format!("SELECT d.id::text, d.version::int8, d.doc::text FROM ({sql}) d")
                    .into(),
            })
        })
        .collect()
}

pub const KIND: StepKind = StepKind {
    online: super::no_online,
    meaning,
    steps: plan,
    needs_time,
    notes,
    needs,
    queries,
    keys: &[(None, Keys::FIELDS)],
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_playbook_throttles_its_delete_by_query() {
        crate::reentry::playbook::set_example_secrets();
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("playbooks/reference.toml");
        let p = Playbook::load(&path).unwrap_or_else(|d| panic!("{d}"));
        let dbq = indexes(&p)
            .into_iter()
            .find(|s| s.strategy == "delete-by-query")
            .expect("a delete-by-query entry in the reference");
        assert_eq!(dbq.requests_per_second, Some(5000));
    }

    #[test]
    fn t_is_sent_as_epoch_milliseconds_whatever_the_date_format() {
        assert_eq!(
            after_t("at", Some(1_700_000_000_000)).unwrap(),
            json!({ "range": { "at": { "gt": 1_700_000_000_000i64, "format": "epoch_millis" } } })
        );
    }

    #[test]
    fn hook_output_loses_every_secret_longest_first() {
        let secrets = vec!["pw-long-one".to_owned(), "pw-long".to_owned()];
        assert_eq!(
            super::redact("a pw-long-one b pw-long c", &secrets),
            "a <redacted> b <redacted> c"
        );
    }
}
