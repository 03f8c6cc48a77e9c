//! Staging and applying a table's repair.
//!
//! The stage is one transaction on the target: the schema
//! `reentry_repair` (reentry's own, see `owned`), a table per repaired
//! table holding the source's columns and its own bookkeeping,
//! `reentry$run_id`, `reentry$class`, `reentry$would`,
//! `reentry$target_hash`, `reentry$status`, `reentry$note` (a `$` no
//! application column name starts that way with, and one a source
//! column may not take), then the rows, streamed with binary `COPY` from
//! the source. The source's columns are recorded in
//! `reentry_repair.stage`: the apply writes exactly those. A killed stage
//! rolls back and is made again on resume.
//!
//! The apply walks the staged rows in key order, a batch per transaction:
//! it writes a row only where the target row still has the hash the diff
//! saw, marks each staged row `applied` or `conflict` in the same
//! transaction, and appends the batch's counts to
//! `reentry_repair.repair_audit_log`. A killed apply resumes at the next
//! batch: what committed is marked, what did not rolled back.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::diff::{self, quote_ident, Class, Column, Spec};
use super::{direction, repairs, Repair, TableDiff};
use crate::pg::conn::{CopyFailed, Db, PgError};
use crate::reentry::playbook::{Playbook, Seg, WayBack};
use crate::reentry::steps::{
    pause_point, Effect, Env, Evidence, Nature, OnDatabase, Recorder, Step, StepError,
};

pub const SCHEMA: &str = "reentry_repair";

/// How the staging table's own columns start.
pub const BOOKKEEPING: &str = "reentry$";

/// The staging table of `table` on the target: a readable prefix of the
/// name as the playbook writes it, and a hash of all of it, within the 63
/// bytes PostgreSQL keeps of a name. (It cuts a longer one short, and two
/// long names alike in their first 63 bytes would share a table.)
pub fn staging(table: &str) -> String {
    format!("{SCHEMA}.{}", quote_ident(&staging_name(table)))
}

fn staging_name(table: &str) -> String {
    let hash = crate::reentry::plan::sha256_hex(table.as_bytes());
    let mut prefix = String::new();
    for c in table.chars() {
        if prefix.len() + c.len_utf8() > 50 {
            break;
        }
        prefix.push(c);
    }
    format!("{prefix}_{}", &hash[..12])
}

const AUDIT: &str = "reentry_repair.repair_audit_log";
/// Each stage's table and the source columns it staged, by run.
const STAGES: &str = "reentry_repair.stage";

/// Settings under which the target prints values as the diff did, for the
/// guard hash.
const CANONICAL_LOCAL: &str = "SET LOCAL TIME ZONE 'UTC'; SET LOCAL DateStyle = 'ISO, YMD'; \
     SET LOCAL IntervalStyle = 'postgres'; SET LOCAL extra_float_digits = 1; SET LOCAL bytea_output = 'hex';";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Stage {
    pub repair: Repair,
    pub source: String,
    pub target: String,
    pub t_ms: Option<i64>,
    /// A cutover: the default scope is the rows changed after T.
    pub carry_forward: bool,
}

fn conninfo<'a>(env: &'a Env, name: &str) -> Result<&'a str, StepError> {
    env.playbook
        .databases
        .get(name)
        .map(|d| d.conninfo.expose())
        .ok_or_else(|| StepError::Config(format!("no database named `{name}` in the playbook")))
}

/// The repair's columns and scope, against both catalogs.
pub fn resolve(
    r: &Repair,
    src: &mut Db,
    tgt: &mut Db,
    names: (&str, &str),
    t_ms: Option<i64>,
    carry_forward: bool,
) -> Result<Spec, StepError> {
    let (sname, tname) = names;
    let s = diff::describe(src, &r.table).on(sname)?.ok_or_else(|| {
        StepError::Config(format!(
            "[[repair]] `{}`: no such table on databases.{sname}",
            r.table
        ))
    })?;
    let t = diff::describe(tgt, &r.table).on(tname)?.ok_or_else(|| {
        StepError::Config(format!(
            "[[repair]] `{}`: no such table on databases.{tname}",
            r.table
        ))
    })?;
    // The staging table's own columns are named `reentry$…`: a source
    // column of that name would be one of them.
    if let Some(c) = s.columns.iter().find(|c| c.name.starts_with(BOOKKEEPING)) {
        return Err(StepError::Config(format!(
            "[[repair]] `{}`: column `{}` on databases.{sname} starts with `{BOOKKEEPING}`, which reentry keeps for its staging table's own columns: rename it to repair this table",
            r.table, c.name
        )));
    }
    let key_names: Vec<String> = match &r.key {
        Some(k) => k.clone(),
        None if !t.primary_key.is_empty() => t.primary_key.clone(),
        None if !s.primary_key.is_empty() => s.primary_key.clone(),
        None => {
            return Err(StepError::Config(format!(
                "[[repair]] `{}` has no primary key: name its key with `key`",
                r.table
            )))
        }
    };
    let find = |cols: &[Column], n: &str| cols.iter().find(|c| c.name == n).cloned();
    let mut key = Vec::new();
    for k in &key_names {
        let (Some(sc), Some(_)) = (find(&s.columns, k), find(&t.columns, k)) else {
            return Err(StepError::Config(format!(
                "[[repair]] `{}`: key column `{k}` is not on both databases",
                r.table
            )));
        };
        key.push(sc);
    }
    if let Some(u) = &r.updated_at {
        if find(&t.columns, u).is_none() {
            return Err(StepError::Config(format!(
                "[[repair]] `{}`: `updated-at` column `{u}` is not on databases.{tname}",
                r.table
            )));
        }
    }
    let skip = |n: &str| key_names.iter().any(|k| k == n) || r.updated_at.as_deref() == Some(n);
    let columns: Vec<Column> = match &r.columns {
        Some(named) => {
            let mut out = Vec::new();
            for n in named {
                match (find(&s.columns, n), find(&t.columns, n)) {
                    (Some(c), Some(_)) => out.push(c),
                    _ => {
                        return Err(StepError::Config(format!(
                            "[[repair]] `{}`: column `{n}` is not on both databases",
                            r.table
                        )))
                    }
                }
            }
            out.retain(|c| !skip(&c.name));
            out
        }
        None => s
            .columns
            .iter()
            .filter(|c| !skip(&c.name) && find(&t.columns, &c.name).is_some())
            .cloned()
            .collect(),
    };
    let source_only: Vec<String> = s
        .columns
        .iter()
        .filter(|c| find(&t.columns, &c.name).is_none())
        .map(|c| c.name.clone())
        .collect();
    // A cutover carries forward the rows changed after T (less
    // `STRADDLE_MS`: a row stamped just before T may have committed after
    // it; one both sides hold alike is no change), among those `where`
    // selects.
    let mut filter = r.filter.clone();
    if carry_forward && r.ids.is_none() {
        if let (Some(u), Some(t)) = (&r.updated_at, t_ms) {
            let since = format!(
                "t.{} > to_timestamp({}::float8 / 1000)",
                quote_ident(u),
                t - crate::reentry::steps::STRADDLE_MS
            );
            filter = Some(match filter {
                Some(w) => format!("{since} AND ({w})"),
                None => since,
            });
        }
    }
    Ok(Spec {
        table: r.table.clone(),
        key,
        columns,
        source_only,
        source_columns: s.columns,
        updated_at: r.updated_at.clone(),
        filter,
        ids: r.ids.clone().map(|sql| {
            (
                r.ids_database.clone().unwrap_or_else(|| "current".into()),
                sql,
            )
        }),
        changed_after_t: r.changed_after_t.clone(),
        t_ms,
        source_sql: s.sql,
        target_sql: t.sql,
    })
}

/// The diff's own read-only connections: the source, the target, and
/// the database `ids` runs on when it is neither.
pub struct Conns {
    src: Db,
    tgt: Db,
    ids: Option<Db>,
}

/// Resolves `r` against both catalogs, on the diff's own connections.
fn open(
    env: &Env,
    r: &Repair,
    (source, target): (&str, &str),
    t_ms: Option<i64>,
    carry_forward: bool,
) -> Result<(Spec, Conns), StepError> {
    let mut src = diff::connect(conninfo(env, source)?).on(source)?;
    let mut tgt = diff::connect(conninfo(env, target)?).on(target)?;
    let spec = resolve(r, &mut src, &mut tgt, (source, target), t_ms, carry_forward)?;
    let ids = match &spec.ids {
        Some((db, _)) if db != target => Some(diff::connect(conninfo(env, db)?).on(db)?),
        _ => None,
    };
    Ok((spec, Conns { src, tgt, ids }))
}

/// Resolves and diffs `r`, counting: what `rows diff` and a plan show.
pub fn run_diff(
    env: &Env,
    r: &Repair,
    (source, target): (&str, &str),
    t_ms: Option<i64>,
    carry_forward: bool,
    progress: &crate::progress::Reporter,
) -> Result<(Spec, TableDiff), StepError> {
    let (spec, mut c) = open(env, r, (source, target), t_ms, carry_forward)?;
    let mut td = TableDiff::new(&spec, source, target);
    let stats = diff::diff(
        &spec,
        &mut c.src,
        &mut c.tgt,
        c.ids.as_mut(),
        progress,
        &mut |rows: Vec<diff::Found>| {
            td.add(&rows);
            Ok::<(), StepError>(())
        },
    )?;
    td.stats = stats;
    Ok((spec, td))
}

/// What a stage journals as its effect's detail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct StageDetail {
    pub diff: TableDiff,
    pub staged: u64,
    pub staging_table: String,
}

fn effect_of(d: &TableDiff, verb: &str) -> Effect {
    let items = d
        .sample
        .iter()
        .flat_map(|(c, keys)| {
            keys.iter()
                .map(move |k| format!("{} {}", c.as_str(), k.join(",")))
        })
        .collect();
    Effect {
        summary: format!("{verb} {}", d.summary()),
        count: d.differences(),
        items,
        detail: serde_json::Value::Null,
    }
}

impl Stage {
    /// The schema, the staging table, and none of this run's rows yet (a
    /// stage killed before its commit left nothing; rows of this run are
    /// made afresh).
    fn prepare(&self, db: &mut Db, spec: &Spec, run_id: &str) -> Result<(), StepError> {
        let target = self.target.as_str();
        let st = staging(&spec.table);
        db.batch("set a lock timeout", "SET LOCAL lock_timeout = '10s'")
            .on(target)?;
        crate::reentry::owned::ensure(db, target, SCHEMA)?;
        let mut ddl = format!(
            "{}
             CREATE TABLE IF NOT EXISTS {st} (\"reentry$run_id\" text, \"reentry$class\" text, \"reentry$would\" text, \"reentry$target_hash\" text,
                 \"reentry$status\" text, \"reentry$note\" text, \"reentry$staged_at\" timestamptz DEFAULT now());",
            include_str!("../../../../sql/reentry_repair.sql")
        );
        for c in &spec.source_columns {
            ddl.push_str(&format!(
                " ALTER TABLE {st} ADD COLUMN IF NOT EXISTS {} {};",
                c.quoted(),
                c.ty
            ));
        }
        crate::reentry::owned::create(db, target, SCHEMA, &ddl)?;
        crate::reentry::owned::guard(db, target, SCHEMA, &[&st, STAGES])?;
        db.batch("set up the session", CANONICAL_LOCAL).on(target)?;
        // A stage killed before its commit left nothing; one that
        // committed is not run again. Rows of this run are made afresh.
        db.execute(
            "clear this run's staged rows",
            &format!(
                "DELETE FROM {st} WHERE \"reentry$run_id\" = $1 OR \"reentry$run_id\" IS NULL"
            ),
            &[&run_id],
        )
        .on(target)?;
        // What the apply writes: the source's columns, as staged now.
        let columns: Vec<&str> = spec
            .source_columns
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        db.execute(
            "record the staged columns",
            &format!(
                "INSERT INTO {STAGES} (run_id, table_name, staging_table, columns) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (run_id, table_name) DO UPDATE
                   SET staging_table = EXCLUDED.staging_table, columns = EXCLUDED.columns, staged_at = now()"
            ),
            &[&run_id, &spec.table, &st, &columns],
        )
        .on(target)?;
        Ok(())
    }

    /// Stages a group of differing rows: those with a source side copied
    /// whole with binary COPY, delete candidates by key; then tagged.
    fn stage_chunk(
        &self,
        db: &mut Db,
        src: &mut Db,
        spec: &Spec,
        rows: &[diff::Found],
        run_id: &str,
    ) -> Result<u64, StepError> {
        let target = self.target.as_str();
        let st = staging(&spec.table);
        let cols: Vec<String> = spec.source_columns.iter().map(Column::quoted).collect();
        let n = spec.key.len();
        let key_match = spec
            .key
            .iter()
            .enumerate()
            .map(|(i, c)| format!("s.{}::text = v.k{i}", c.quoted()))
            .collect::<Vec<_>>()
            .join(" AND ");
        let key_arrays: String = (0..n).map(|i| format!(", ${}::text[]", i + 5)).collect();
        let key_names: String = (0..n).map(|i| format!(", k{i}")).collect();
        let mut staged = 0;
        // Rows with a source side: copied whole, then tagged.
        let with_source: Vec<&diff::Found> =
            rows.iter().filter(|f| f.would != Class::Delete).collect();
        for chunk in with_source.chunks(2000) {
            let keys: Vec<Vec<String>> = chunk.iter().map(|f| f.key.clone()).collect();
            // Streamed, a row at a time: rows of megabytes each stay out
            // of memory.
            src.copy_into(
                "copy the source's rows",
                &format!(
                    "COPY (SELECT {} FROM {} AS t WHERE {}) TO STDOUT (FORMAT binary)",
                    cols.iter()
                        .map(|c| format!("t.{c}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    spec.table_sql(true),
                    spec.keys_in(&keys)
                ),
                db,
                "stage the source's rows",
                &format!("COPY {st} ({}) FROM STDIN (FORMAT binary)", cols.join(", ")),
            )
            .map_err(|e| match e {
                CopyFailed::Read(e) => StepError::Db {
                    database: self.source.clone(),
                    source: e,
                },
                CopyFailed::Write(e) => StepError::Db {
                    database: target.to_owned(),
                    source: e,
                },
            })?;
            staged += tag(
                db,
                &st,
                chunk,
                run_id,
                &key_match,
                &key_arrays,
                &key_names,
                n,
            )
            .on(target)?;
        }
        // Delete candidates: the key alone.
        let deletes: Vec<&diff::Found> = rows.iter().filter(|f| f.would == Class::Delete).collect();
        for chunk in deletes.chunks(2000) {
            let insert_keys = format!(
                "INSERT INTO {st} ({}) SELECT {} FROM unnest({}) AS v({})",
                spec.key
                    .iter()
                    .map(Column::quoted)
                    .collect::<Vec<_>>()
                    .join(", "),
                spec.key
                    .iter()
                    .enumerate()
                    .map(|(i, c)| format!("v.k{i}::{}", c.ty))
                    .collect::<Vec<_>>()
                    .join(", "),
                (0..n)
                    .map(|i| format!("${}::text[]", i + 1))
                    .collect::<Vec<_>>()
                    .join(", "),
                (0..n)
                    .map(|i| format!("k{i}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let arrays: Vec<Vec<String>> = (0..n)
                .map(|i| chunk.iter().map(|f| f.key[i].clone()).collect())
                .collect();
            let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                arrays.iter().map(|a| a as _).collect();
            db.execute("stage delete candidates", &insert_keys, &params)
                .on(target)?;
            staged += tag(
                db,
                &st,
                chunk,
                run_id,
                &key_match,
                &key_arrays,
                &key_names,
                n,
            )
            .on(target)?;
        }
        Ok(staged)
    }
}

/// Tags the untagged staged rows of `chunk` with this run, their class,
/// and the target's hash.
#[allow(clippy::too_many_arguments)]
fn tag(
    db: &mut Db,
    st: &str,
    chunk: &[&diff::Found],
    run_id: &str,
    key_match: &str,
    key_arrays: &str,
    key_names: &str,
    n: usize,
) -> Result<u64, PgError> {
    let classes: Vec<&str> = chunk.iter().map(|f| f.class.as_str()).collect();
    let woulds: Vec<&str> = chunk.iter().map(|f| f.would.as_str()).collect();
    let hashes: Vec<Option<String>> = chunk.iter().map(|f| f.target_hash.clone()).collect();
    let arrays: Vec<Vec<String>> = (0..n)
        .map(|i| chunk.iter().map(|f| f.key[i].clone()).collect())
        .collect();
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
        vec![&run_id, &classes, &woulds, &hashes];
    for a in &arrays {
        params.push(a);
    }
    db.execute(
        "tag the staged rows",
        &format!(
            "UPDATE {st} AS s SET \"reentry$run_id\" = $1, \"reentry$class\" = v.c, \"reentry$would\" = v.w, \"reentry$target_hash\" = v.h, \"reentry$status\" = 'staged'
               FROM unnest($2::text[], $3::text[], $4::text[]{key_arrays}) AS v(c, w, h{key_names})
              WHERE s.\"reentry$run_id\" IS NULL AND {key_match}"
        ),
        &params,
    )
}

impl Step for Stage {
    fn nature(&self) -> Nature {
        Nature::Changes
    }

    fn evidence(&self, effect: &Effect) -> Option<Evidence> {
        let d: StageDetail = serde_json::from_value(effect.detail.clone()).ok()?;
        let n = |c: Class| d.diff.counts.get(&c).copied().unwrap_or(0).to_string();
        Some(Evidence {
            section: "Rows staged".into(),
            columns: [
                "table",
                "from → to",
                "compared",
                "insert",
                "update",
                "delete",
                "conflict",
                "missing on target",
                "staged in",
            ]
            .map(String::from)
            .to_vec(),
            row: vec![
                d.diff.table.clone(),
                format!("{} → {}", d.diff.source, d.diff.target),
                d.diff.stats.source_rows.to_string(),
                n(Class::Insert),
                n(Class::Update),
                n(Class::Delete),
                n(Class::Conflict),
                d.diff.source_only.join(", "),
                d.staging_table,
            ],
            lines: Vec::new(),
        })
    }

    fn writes(&self) -> Vec<&str> {
        vec![self.target.as_str()]
    }

    fn preview(&self, env: &mut Env) -> Result<Effect, StepError> {
        let (_, td) = run_diff(
            env,
            &self.repair,
            (&self.source, &self.target),
            self.t_ms,
            self.carry_forward,
            &crate::progress::Reporter::silent(),
        )?;
        let mut e = effect_of(&td, "stage");
        e.detail = crate::reentry::steps::detail(&td);
        Ok(e)
    }

    fn apply(&self, env: &mut Env, _rec: &mut Recorder) -> Result<Effect, StepError> {
        let (spec, mut c) = open(
            env,
            &self.repair,
            (&self.source, &self.target),
            self.t_ms,
            self.carry_forward,
        )?;
        let run_id = env.run_id.clone();
        // COPY from the source runs beside the diff's own reads.
        let mut copy_src = diff::connect(conninfo(env, &self.source)?).on(&self.source)?;
        let mut changed = match env.run_dir.clone() {
            Some(dir) => Some(ChangedFile::start(&dir, &spec.table, "rows")?),
            None => None,
        };
        let mut td = TableDiff::new(&spec, &self.source, &self.target);
        let target = self.target.clone();
        // One transaction: the diff streams its groups of differing rows
        // into the staging table, each with the target's hash read here.
        let (staged, stats) = env.db(&target)?.transaction("BEGIN", |db| {
            self.prepare(db, &spec, &run_id)?;
            let mut staged = 0u64;
            let stats = diff::diff(
                &spec,
                &mut c.src,
                &mut c.tgt,
                c.ids.as_mut(),
                &crate::progress::Reporter::silent(),
                &mut |mut rows: Vec<diff::Found>| {
                    diff::settle(&spec, db, &mut rows).on(&target)?;
                    staged += self.stage_chunk(db, &mut copy_src, &spec, &rows, &run_id)?;
                    if let Some(w) = changed.as_mut() {
                        w.add(&rows)?;
                    }
                    td.add(&rows);
                    Ok::<(), StepError>(())
                },
            )?;
            Ok::<_, StepError>((staged, stats))
        })?;
        if let Some(w) = changed {
            w.finish()?;
        }
        td.stats = stats;
        let mut e = effect_of(&td, "staged");
        e.count = staged;
        e.detail = crate::reentry::steps::detail(&StageDetail {
            diff: td,
            staged,
            staging_table: staging(&spec.table),
        });
        Ok(e)
    }
}

/// The file in the run directory where steps record the entities that
/// changed around T, one JSON object per line:
/// `{"table": "cases", "key": ["42"], "class": "update", "by": "rows"}`.
/// The cache and search steps read it.
pub const CHANGED_FILE: &str = "changed-entities.jsonl";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Changed {
    pub table: String,
    pub key: Vec<String>,
    pub class: String,
    pub by: String,
}

/// The changed entities as a step writes its own: the lines other steps
/// (or other tables) recorded are kept, this step's are replaced, and
/// the file is published whole when the step is done with it.
struct ChangedFile {
    path: std::path::PathBuf,
    tmp: std::path::PathBuf,
    out: std::io::BufWriter<std::fs::File>,
    table: String,
    by: String,
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> StepError {
    move |source| StepError::Io { what, source }
}

impl ChangedFile {
    fn start(dir: &std::path::Path, table: &str, by: &str) -> Result<ChangedFile, StepError> {
        use std::io::Write;
        let path = dir.join(CHANGED_FILE);
        let tmp = crate::fsutil::temp_path_beside(&path);
        let mut out = std::io::BufWriter::new(
            crate::fsutil::private_options()
                .create(true)
                .truncate(true)
                .open(&tmp)
                .map_err(io_err("write the changed entities"))?,
        );
        match std::fs::read_to_string(&path) {
            Ok(t) => {
                for l in t.lines().filter(|l| {
                    serde_json::from_str::<Changed>(l)
                        .map(|c| !(c.table == table && c.by == by))
                        .unwrap_or(false)
                }) {
                    writeln!(out, "{l}").map_err(io_err("write the changed entities"))?;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(StepError::Io {
                    what: "read the changed entities",
                    source,
                })
            }
        }
        Ok(ChangedFile {
            path,
            tmp,
            out,
            table: table.into(),
            by: by.into(),
        })
    }

    fn add(&mut self, rows: &[diff::Found]) -> Result<(), StepError> {
        self.add_keys(
            rows.iter()
                .map(|f| (f.key.clone(), f.would.as_str().to_owned())),
        )
    }

    fn add_keys(
        &mut self,
        entries: impl IntoIterator<Item = (Vec<String>, String)>,
    ) -> Result<(), StepError> {
        use std::io::Write;
        for (key, class) in entries {
            let line = serde_json::to_string(&Changed {
                table: self.table.clone(),
                key,
                class,
                by: self.by.clone(),
            })
            .expect("changed entities serialize");
            writeln!(self.out, "{line}").map_err(io_err("write the changed entities"))?;
        }
        Ok(())
    }

    fn finish(self) -> Result<(), StepError> {
        let file = self.out.into_inner().map_err(|e| StepError::Io {
            what: "write the changed entities",
            source: e.into_error(),
        })?;
        file.sync_all()
            .map_err(io_err("write the changed entities"))?;
        std::fs::rename(&self.tmp, &self.path).map_err(io_err("write the changed entities"))?;
        if let Some(dir) = self.path.parent() {
            crate::fsutil::sync_dir(dir).map_err(io_err("write the changed entities"))?;
        }
        Ok(())
    }
}

/// Replaces what `by` recorded for `table` in the run's changed entities
/// with `entries` (key, class): a resumed step records once.
pub fn record_changed(
    dir: &std::path::Path,
    table: &str,
    by: &str,
    entries: Vec<(Vec<String>, String)>,
) -> Result<(), StepError> {
    let mut w = ChangedFile::start(dir, table, by)?;
    w.add_keys(entries)?;
    w.finish()
}

/// Applies a table's staged rows (or, for `rows-delete`, its delete
/// candidates) to the target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Apply {
    pub table: String,
    pub target: String,
    pub key: Option<Vec<String>>,
    pub updated_at: Option<String>,
    /// `review`, `source-wins` or `target-wins`.
    pub on_conflict: String,
    pub allow_delete: bool,
    /// `session_replication_role = replica` in each batch.
    pub disable_triggers: bool,
    pub batch_size: i64,
    /// This step deletes candidates; else it inserts and updates.
    pub deletes: bool,
    /// Selective repair stamps `updated-at` with the repair's time, as a hand
    /// repair would; a carried-forward row keeps its own.
    pub stamp_updated_at: bool,
}

impl Apply {
    pub fn new(r: &Repair, target: &str, deletes: bool, way: WayBack) -> Apply {
        Apply {
            table: r.table.clone(),
            target: target.into(),
            key: r.key.clone(),
            updated_at: r.updated_at.clone(),
            on_conflict: r.on_conflict.clone().unwrap_or_else(|| "review".into()),
            allow_delete: r.allow_delete.unwrap_or(false),
            disable_triggers: r.triggers.as_deref() == Some("disable"),
            batch_size: r.batch_size.unwrap_or(1000),
            deletes,
            stamp_updated_at: way == WayBack::SelectiveRepair,
        }
    }

    fn source_wins(&self) -> bool {
        self.on_conflict == "source-wins"
    }

    /// The staged rows this step writes: by class, and for a conflict by
    /// what the source would do, when the source wins.
    fn mine(&self) -> String {
        let want = if self.deletes {
            "delete"
        } else {
            "insert', 'update"
        };
        let mut c = format!("(s.\"reentry$class\" IN ('{want}')");
        if self.source_wins() {
            c.push_str(&format!(
                " OR (s.\"reentry$class\" = 'conflict' AND s.\"reentry$would\" IN ('{want}'))"
            ));
        }
        c.push(')');
        c
    }
}

/// What an apply journals as its effect's detail.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ApplyDetail {
    /// Staged rows of this run by status (`applied`, `conflict`, `review`,
    /// `kept`, `not-applied`), for this step's classes.
    pub status: BTreeMap<String, u64>,
    pub batches: u64,
    /// Columns staged but missing on the target: not applied.
    pub not_applied_columns: Vec<String>,
    pub audit_table: String,
    /// This run's audit rows for the table, as the database holds them.
    #[serde(default)]
    pub audit: Vec<AuditRow>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct AuditRow {
    pub class: String,
    pub row_count: i64,
    pub executed_at: String,
}

/// How many audit rows the report lists before "and N more".
const AUDIT_SHOWN: usize = 20;

impl Step for Apply {
    fn nature(&self) -> Nature {
        Nature::Changes
    }

    fn evidence(&self, effect: &Effect) -> Option<Evidence> {
        let d: ApplyDetail = serde_json::from_value(effect.detail.clone()).ok()?;
        let n = |s: &str| d.status.get(s).copied().unwrap_or(0).to_string();
        let mut lines: Vec<String> = d
            .audit
            .iter()
            .take(AUDIT_SHOWN)
            .map(|a| {
                format!(
                    "{}: {} {} row(s) at {}",
                    self.table, a.class, a.row_count, a.executed_at
                )
            })
            .collect();
        if d.audit.len() > AUDIT_SHOWN {
            lines.push(format!(
                "{}: and {} more audit row(s) in {}",
                self.table,
                d.audit.len() - AUDIT_SHOWN,
                d.audit_table
            ));
        }
        Some(Evidence {
            section: "Rows".into(),
            columns: [
                "table",
                "on",
                "applied",
                "changed since the diff",
                "for review",
                "target kept",
                "not applied",
                "batches",
            ]
            .map(String::from)
            .to_vec(),
            row: vec![
                format!(
                    "{}{}",
                    self.table,
                    if self.deletes { " (deletes)" } else { "" }
                ),
                self.target.clone(),
                n("applied"),
                n("conflict"),
                n("review"),
                n("kept"),
                if d.not_applied_columns.is_empty() {
                    n("not-applied")
                } else {
                    format!(
                        "{} (missing: {})",
                        n("not-applied"),
                        d.not_applied_columns.join(", ")
                    )
                },
                d.batches.to_string(),
            ],
            lines,
        })
    }

    fn writes(&self) -> Vec<&str> {
        vec![self.target.as_str()]
    }

    fn preview(&self, env: &mut Env) -> Result<Effect, StepError> {
        let what = if self.deletes {
            "delete the candidates staged for"
        } else {
            "insert and update the rows staged for"
        };
        let mut s = format!(
            "{what} `{}` on {}, in batches of {}, each only where the row still has the hash the diff saw",
            self.table, self.target, self.batch_size
        );
        if self.disable_triggers {
            s.push_str("; triggers disabled (session_replication_role = replica)");
        } else {
            let unpinned = unpinned_triggers(env, &self.target, &self.table)?;
            if !unpinned.is_empty() {
                s.push_str(&format!(
                    "; its triggers run under reentry's search path ({}), and {} ha{} no path of its own: \
                     one that names a table or function without its schema stops the step \
                     (ALTER FUNCTION … SET search_path = …)",
                    crate::pg::conn::PINNED_SEARCH_PATH,
                    unpinned.join(", "),
                    if unpinned.len() == 1 { "s" } else { "ve" }
                ));
            }
        }
        s.push_str(&format!("; conflicts: {}", self.on_conflict));
        Ok(Effect::said(s))
    }

    fn apply(&self, env: &mut Env, rec: &mut Recorder) -> Result<Effect, StepError> {
        let run_id = env.run_id.clone();
        let target = self.target.clone();
        let st = staging(&self.table);
        let db = env.db(&target)?;
        let described = diff::describe(db, &self.table)
            .on(&target)?
            .ok_or_else(|| {
                StepError::Config(format!(
                    "[[repair]] `{}`: no such table on databases.{target}",
                    self.table
                ))
            })?;
        let table = described.sql.clone();
        // The batches write to the staging table and the audit log: only
        // while they are still reentry's own.
        if let Some(why) = crate::reentry::owned::foreign(db, SCHEMA).on(&target)? {
            return Err(StepError::Refused(crate::reentry::owned::refusal(
                &target, SCHEMA, &why,
            )));
        }
        // The source's columns as the stage recorded them, whatever else
        // the staging table holds (columns of an earlier run's source).
        let recorded = db
            .query_one(
                "look for the stages",
                "SELECT to_regclass($1::text) IS NOT NULL",
                &[&STAGES],
            )
            .on(&target)?
            .get::<_, bool>(0);
        let staged_cols: Vec<String> = match recorded {
            true => db
                .query(
                    "read the staged columns",
                    &format!("SELECT columns FROM {STAGES} WHERE run_id = $1 AND table_name = $2"),
                    &[&run_id, &self.table],
                )
                .on(&target)?
                .first()
                .map(|r| r.get(0))
                .unwrap_or_default(),
            false => Vec::new(),
        };
        if staged_cols.is_empty() {
            return Err(StepError::State(format!(
                "nothing is staged for `{}` on {target}: its rows-stage step has not run",
                self.table
            )));
        }
        let key: Vec<Column> = match &self.key {
            Some(k) => k
                .iter()
                .map(|n| {
                    described
                        .columns
                        .iter()
                        .find(|c| &c.name == n)
                        .cloned()
                        .ok_or_else(|| {
                            StepError::Config(format!("key column `{n}` is not on {target}"))
                        })
                })
                .collect::<Result<_, _>>()?,
            None => described
                .primary_key
                .iter()
                .filter_map(|n| described.columns.iter().find(|c| &c.name == n).cloned())
                .collect(),
        };
        let on_target: BTreeSet<&str> = described.columns.iter().map(|c| c.name.as_str()).collect();
        let not_applied: Vec<String> = staged_cols
            .iter()
            .filter(|c| !on_target.contains(c.as_str()))
            .cloned()
            .collect();
        let is_key = |n: &str| key.iter().any(|k| k.name == n);
        let stamp = self.updated_at.as_deref().filter(|_| self.stamp_updated_at);
        let writable: Vec<&String> = staged_cols
            .iter()
            .filter(|c| on_target.contains(c.as_str()))
            .collect();
        let set: Vec<String> = writable
            .iter()
            .filter(|c| !is_key(c))
            .map(|c| {
                if Some(c.as_str()) == stamp {
                    format!("{} = clock_timestamp()", quote_ident(c))
                } else {
                    format!("{0} = s.{0}", quote_ident(c))
                }
            })
            .collect();
        let ins_cols: Vec<String> = writable.iter().map(|c| quote_ident(c)).collect();
        // What an update compares: the writable columns but the stamp.
        let cmp: Vec<&&String> = writable
            .iter()
            .filter(|c| !is_key(c) && Some(c.as_str()) != stamp)
            .collect();
        let listed = |alias: &str| {
            if cmp.is_empty() {
                "NULL".to_owned()
            } else {
                cmp.iter()
                    .map(|c| format!("{alias}.{}", quote_ident(c)))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        let (t_cmp, s_cmp) = (listed("t"), listed("s"));
        let not_applied_note = if not_applied.is_empty() {
            "equal on the target already".to_owned()
        } else {
            format!(
                "staged, not applied: column missing on target: {}",
                not_applied.join(", ")
            )
        };
        let ins_vals: Vec<String> = writable
            .iter()
            .map(|c| {
                if Some(c.as_str()) == stamp {
                    "clock_timestamp()".to_owned()
                } else {
                    format!("s.{}", quote_ident(c))
                }
            })
            .collect();
        let t_key_eq = key
            .iter()
            .map(|c| format!("t.{0} = s.{0}", c.quoted()))
            .collect::<Vec<_>>()
            .join(" AND ");
        let s_key_text = key
            .iter()
            .map(|c| format!("s.{}::text", c.quoted()))
            .collect::<Vec<_>>()
            .join(", ");
        let order = key
            .iter()
            .map(|c| format!("s.{}", c.quoted()))
            .collect::<Vec<_>>()
            .join(", ");
        let n = key.len();
        let in_batch = format!(
            "({s_key_text}) IN (SELECT * FROM unnest({}))",
            (0..n)
                .map(|i| format!("${}::text[]", i + 2))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mine = self.mine();
        // What this step will not write is marked once, up front.
        let want = if self.deletes {
            "delete"
        } else {
            "insert', 'update"
        };
        let conflict_status = match self.on_conflict.as_str() {
            "target-wins" => "kept",
            "source-wins" => "staged",
            _ => "review",
        };
        db.transaction("BEGIN", |db| -> Result<u64, StepError> {
            crate::reentry::owned::guard(db, &target, SCHEMA, &[&st])?;
            db.execute(
                "mark the conflicts the playbook leaves alone",
                &format!(
                    "UPDATE {st} AS s SET \"reentry$status\" = $2 WHERE s.\"reentry$run_id\" = $1 AND s.\"reentry$status\" = 'staged'
                       AND s.\"reentry$class\" = 'conflict' AND s.\"reentry$would\" IN ('{want}') AND $2 <> 'staged'"
                ),
                &[&run_id, &conflict_status],
            )
            .on(&target)
        })?;
        if self.deletes && !self.allow_delete {
            return Err(StepError::Config(
                "rows-delete without allow-delete: the plan is not this build's".into(),
            ));
        }
        let mut batches = 0u64;
        loop {
            if rec.interrupted.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(StepError::Interrupted);
            }
            let db = env.db(&target)?;
            let keys: Vec<Vec<String>> = db
                .query(
                    "read the next batch of staged rows",
                    &format!(
                        "SELECT {s_key_text} FROM {st} AS s WHERE s.\"reentry$run_id\" = $1 AND s.\"reentry$status\" = 'staged' AND {mine}
                          ORDER BY {order} LIMIT {}",
                        self.batch_size
                    ),
                    &[&run_id],
                )
                .on(&target)?
                .iter()
                .map(|r| (0..n).map(|i| r.get::<_, String>(i)).collect())
                .collect();
            if keys.is_empty() {
                break;
            }
            let arrays: Vec<Vec<String>> = (0..n)
                .map(|i| keys.iter().map(|k| k[i].clone()).collect())
                .collect();
            let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&run_id];
            for a in &arrays {
                params.push(a);
            }
            let step_id = rec.step.to_owned();
            let first = batches == 0;
            let counts = db.transaction("BEGIN", |db| -> Result<_, StepError> {
                // The staging table and the audit log, locked against new
                // triggers and checked again before this batch writes them.
                crate::reentry::owned::guard(db, &target, SCHEMA, &[&st, AUDIT])?;
                let batch = |db: &mut Db| {
                let mut setup = CANONICAL_LOCAL.to_owned();
                if self.disable_triggers {
                    setup.push_str(" SET LOCAL session_replication_role = replica;");
                }
                db.batch("set up the batch", &setup)?;
                let mut done: BTreeMap<&str, Vec<String>> = BTreeMap::new();
                let returning = key
                    .iter()
                    .map(|c| format!("t.{}::text", c.quoted()))
                    .collect::<Vec<_>>()
                    .join(" || chr(31) || ");
                let staged_rows = format!(
                    "s.\"reentry$run_id\" = $1 AND s.\"reentry$status\" = 'staged' AND {mine} AND {in_batch}"
                );
                if self.deletes {
                    let rows = db.query(
                        "delete candidates",
                        &format!(
                            "DELETE FROM {table} AS t USING {st} AS s
                              WHERE {staged_rows} AND {t_key_eq} AND md5(ROW(t.*)::text) = s.\"reentry$target_hash\"
                             RETURNING {returning}"
                        ),
                        &params,
                    )?;
                    done.insert("delete", rows.iter().map(|r| r.get(0)).collect());
                } else {
                    if !set.is_empty() {
                        // Only rows that differ in what can be written (as
                        // text: 1.0 and 1.00 are equal numbers, not equal
                        // values): a row staged for a column the target
                        // lacks is left as it is.
                        let rows = db.query(
                            "update rows",
                            &format!(
                                "UPDATE {table} AS t SET {} FROM {st} AS s
                                  WHERE {staged_rows} AND s.\"reentry$would\" = 'update' AND {t_key_eq}
                                    AND md5(ROW(t.*)::text) = s.\"reentry$target_hash\"
                                    AND ROW({t_cmp})::text IS DISTINCT FROM ROW({s_cmp})::text
                                 RETURNING {returning}",
                                set.join(", ")
                            ),
                            &params,
                        )?;
                        done.insert("update", rows.iter().map(|r| r.get(0)).collect());
                    }
                    let rows = db.query(
                        "insert rows",
                        &format!(
                            "INSERT INTO {table} AS t ({}) SELECT {} FROM {st} AS s
                              WHERE {staged_rows} AND s.\"reentry$would\" = 'insert'
                                AND NOT EXISTS (SELECT FROM {table} AS t WHERE {t_key_eq})
                             RETURNING {returning}",
                            ins_cols.join(", "),
                            ins_vals.join(", ")
                        ),
                        &params,
                    )?;
                    done.insert("insert", rows.iter().map(|r| r.get(0)).collect());
                }
                let applied: Vec<String> = done.values().flatten().cloned().collect();
                let s_joined = key
                    .iter()
                    .map(|c| format!("s.{}::text", c.quoted()))
                    .collect::<Vec<_>>()
                    .join(" || chr(31) || ");
                let mut with_applied = params.clone();
                with_applied.push(&applied);
                db.execute(
                    "mark applied rows",
                    &format!(
                        "UPDATE {st} AS s SET \"reentry$status\" = 'applied'
                          WHERE {staged_rows} AND ({s_joined}) = ANY(${}::text[])",
                        n + 2
                    ),
                    &with_applied,
                )?;
                // A row the write skipped changed on the target since the
                // diff (or, for an insert, appeared there); else it was
                // equal in every column the target has.
                let conflicts = db.execute(
                    "mark rows changed since the diff",
                    &format!(
                        "UPDATE {st} AS s SET \"reentry$status\" = 'conflict', \"reentry$note\" = 'changed on the target since the diff'
                          WHERE {staged_rows} AND CASE WHEN s.\"reentry$would\" = 'insert'
                                THEN EXISTS (SELECT FROM {table} AS t WHERE {t_key_eq})
                                ELSE NOT EXISTS (SELECT FROM {table} AS t WHERE {t_key_eq} AND md5(ROW(t.*)::text) = s.\"reentry$target_hash\") END"
                    ),
                    &params,
                )?;
                let mut with_note = params.clone();
                with_note.push(&not_applied_note);
                db.execute(
                    "mark rows with nothing to write",
                    &format!(
                        "UPDATE {st} AS s SET \"reentry$status\" = 'not-applied', \"reentry$note\" = ${}
                          WHERE {staged_rows}",
                        n + 2
                    ),
                    &with_note,
                )?;
                for (class, rows) in &done {
                    if rows.is_empty() {
                        continue;
                    }
                    db.execute(
                        "write the repair audit log",
                        &format!(
                            "INSERT INTO {AUDIT} (repair_id, table_name, class, row_count, executed_at)
                             VALUES ($1, $2, $3, $4, clock_timestamp())"
                        ),
                        &[&run_id, &self.table, class, &(rows.len() as i64)],
                    )?;
                }
                if first {
                    pause_point(&step_id, "batch");
                }
                let mut c: BTreeMap<String, u64> = done
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.len() as u64))
                    .collect();
                c.insert("conflict".into(), conflicts);
                Ok::<_, PgError>(c)
                };
                batch(db).on(&target)
            });
            let counts = counts?;
            batches += 1;
            rec.prior_keyed(&format!("{}#batch-{batches}", rec.step), &counts)?;
        }
        // The outcome, from the staging table: right after a resume too.
        let db = env.db(&target)?;
        let status: BTreeMap<String, u64> = db
            .query(
                "count the staged rows by status",
                &format!(
                    "SELECT s.\"reentry$status\", count(*) FROM {st} AS s WHERE s.\"reentry$run_id\" = $1
                       AND (s.\"reentry$class\" IN ('{want}') OR (s.\"reentry$class\" = 'conflict' AND s.\"reentry$would\" IN ('{want}')))
                     GROUP BY 1 ORDER BY 1"
                ),
                &[&run_id],
            )
            .on(&target)?
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u64))
            .collect();
        let audit: Vec<AuditRow> = db
            .query(
                "read the repair audit log",
                &format!(
                    "SELECT class, row_count, to_char(executed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')
                       FROM {AUDIT} WHERE repair_id = $1 AND table_name = $2
                        AND class IN ('{}') ORDER BY executed_at",
                    if self.deletes { "delete" } else { "insert', 'update" }
                ),
                &[&run_id, &self.table],
            )
            .on(&target)?
            .iter()
            .map(|r| AuditRow {
                class: r.get(0),
                row_count: r.get(1),
                executed_at: r.get(2),
            })
            .collect();
        let applied = status.get("applied").copied().unwrap_or(0);
        let mut summary = format!(
            "{} `{}` on {target}: {applied} row(s) applied",
            if self.deletes {
                "deleted from"
            } else {
                "repaired"
            },
            self.table
        );
        for (s, what) in [
            (
                "conflict",
                "changed on the target since the diff, not overwritten",
            ),
            ("review", "conflicts left for review"),
            ("kept", "conflicts where the target's row was kept"),
            ("not-applied", "equal in every column the target has"),
        ] {
            if let Some(n) = status.get(s) {
                summary.push_str(&format!("; {n} {what}"));
            }
        }
        if !not_applied.is_empty() {
            summary.push_str(&format!(
                "; staged, not applied: column missing on target: {}",
                not_applied.join(", ")
            ));
        }
        Ok(Effect {
            summary,
            count: applied,
            items: Vec::new(),
            detail: crate::reentry::steps::detail(&ApplyDetail {
                status,
                batches,
                not_applied_columns: not_applied,
                audit_table: AUDIT.into(),
                audit,
            }),
        })
    }
}

/// The declared order must put parents first: a table listed before a
/// table it references would get rows whose parent is not there yet.
pub fn online(
    p: &Playbook,
    dbs: &mut BTreeMap<&str, Db>,
    broken: &BTreeSet<(String, String)>,
) -> Vec<crate::diag::Diagnostic> {
    let rs = repairs(p);
    if rs.len() < 2 {
        return Vec::new();
    }
    let (_, target) = direction(p.playbook.way_back);
    if broken.iter().any(|(_, d)| d == target) {
        return Vec::new();
    }
    let Some(db) = dbs.get_mut(target) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, child) in rs.iter().enumerate() {
        for parent in rs.iter().skip(i + 1) {
            let refs = db.table(&child.table).and_then(|c| {
                let p = db.table(&parent.table)?;
                db.query_one(
                    "look up foreign keys",
                    "SELECT EXISTS (SELECT FROM pg_constraint WHERE contype = 'f'
                        AND conrelid = to_regclass($1::text) AND confrelid = to_regclass($2::text))",
                    &[&c, &p],
                )
            });
            if let Ok(r) = refs {
                if r.get::<_, bool>(0) {
                    out.push(p.at(
                        &[Seg::Key("repair"), Seg::Index(i), Seg::Key("table")],
                        format!(
                            "`{}` references `{}`, which is listed after it: list [[repair]] tables parents first",
                            child.table, parent.table
                        ),
                    ));
                }
            }
        }
    }
    out
}

/// The functions of `table`'s enabled triggers on `target` that set no
/// `search_path` of their own (C functions aside: they name nothing by
/// path), as `name(args)`. A repair's writes fire them under reentry's
/// pinned path; the plan names them before anything fails.
fn unpinned_triggers(env: &mut Env, target: &str, table: &str) -> Result<Vec<String>, StepError> {
    let db = env.db(target)?;
    let Some(described) = diff::describe(db, table).on(target)? else {
        return Ok(Vec::new());
    };
    let rows = db
        .query(
            "find trigger functions without a search_path",
            "SELECT DISTINCT p.oid::regprocedure::text
               FROM pg_catalog.pg_trigger t
               JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid
               JOIN pg_catalog.pg_language l ON l.oid = p.prolang
              WHERE t.tgrelid = $1::text::pg_catalog.regclass
                AND NOT t.tgisinternal AND t.tgenabled <> 'D'
                AND l.lanname NOT IN ('c', 'internal')
                AND NOT EXISTS (SELECT 1 FROM pg_catalog.unnest(p.proconfig) c
                                 WHERE c LIKE 'search\\_path=%')
              ORDER BY 1",
            &[&described.sql],
        )
        .on(target)?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The identifier as PostgreSQL keeps it: at most 63 bytes.
    fn kept(qualified: &str) -> String {
        let ident = qualified
            .strip_prefix(&format!("{SCHEMA}."))
            .unwrap()
            .trim_matches('"')
            .replace("\"\"", "\"");
        assert!(ident.len() <= 63, "{ident} is {} bytes", ident.len());
        ident
    }

    #[test]
    fn long_table_names_alike_for_60_bytes_get_staging_tables_of_their_own() {
        let common = "a".repeat(60);
        let (a, b) = (format!("{common}_orders"), format!("{common}_refunds"));
        let (sa, sb) = (kept(&staging(&a)), kept(&staging(&b)));
        assert_ne!(sa, sb);
        // Readable: the name's start is there.
        assert!(sa.starts_with(&"a".repeat(50)), "{sa}");
        // Multi-byte names are cut on a character boundary.
        let accents = "é".repeat(40);
        assert!(kept(&staging(&accents)).starts_with(&"é".repeat(25)));
        assert_eq!(staging("cases"), staging("cases"));
        assert_ne!(staging("cases"), staging("public.cases"));
    }
}
