//! The row diff: one table on two servers, compared inside a scope, each
//! differing row classed.
//!
//! The work happens in PostgreSQL. Without a scope, each server sums a
//! hash of every row per key segment (both servers at once, one scan
//! each), and only the rows of segments whose count or sum differ are
//! fetched, as a key and two hashes. With a scope (`where`, `ids`), the
//! source's rows in scope are streamed and the target's rows with the
//! same keys fetched by key. Either way only read-only queries run: the
//! source may be a hot standby paused at its target.
//!
//! Values are compared by their text under fixed session settings (UTC,
//! ISO dates, hex bytea, shortest exact floats): NULL is not '', 1.0 is
//! not 1.00, jsonb and arrays as PostgreSQL prints them, text byte for
//! byte whatever the collation. Keys are matched by their text too, so
//! no ordering of either server is relied on.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::pg::conn::{Db, PgError};
use crate::reentry::check::quote_qualified;

/// Set on every connection the diff uses: a value prints the same on
/// either server, string literals mean the same whatever the server,
/// database or role says, and nothing can be written. A table it cannot
/// lock within 10 s (an `ALTER TABLE` holds it, or waits for it) fails the
/// step, to be resumed, rather than queue the diff, and whoever queues
/// behind it, for as long as the other holds on. The segments' sums are a
/// hash aggregate: sorting the table's rows by segment first (which the
/// planner picks for a parallel plan) spills them to disk and costs more
/// than the hashing itself.
pub const SESSION: &str = "SET application_name = 'reentry rows'; \
     SET standard_conforming_strings = on; SET TIME ZONE 'UTC'; SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres'; SET extra_float_digits = 1; \
     SET bytea_output = 'hex'; SET enable_sort = off; SET work_mem = '128MB'; SET lock_timeout = '10s'; \
     SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY;";

/// Opens a connection for the diff.
pub fn connect(conninfo: &str) -> Result<Db, PgError> {
    let mut db = Db::connect(Some(conninfo))?;
    db.batch("set up the session", SESSION)?;
    db.pin_search_path()?;
    Ok(db)
}

/// A column and its type as the catalog spells it (`numeric(12,2)`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Column {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: String,
}

impl Column {
    pub fn quoted(&self) -> String {
        quote_ident(&self.name)
    }
}

pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A string as an SQL literal, for where no parameter can go (`COPY`).
/// An escape string with `\` and `'` both doubled reads back as `s`
/// whatever `standard_conforming_strings` is: a plain literal would let a
/// value ending in `\` end it early under `off`.
pub fn literal(s: &str) -> String {
    format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

/// A table as one server's catalog has it.
#[derive(Debug, Clone)]
pub struct Described {
    pub columns: Vec<Column>,
    pub primary_key: Vec<String>,
    /// The table as SQL, qualified as this server's search path finds it.
    pub sql: String,
}

/// The table's columns and primary key; `None` when there is no such table.
pub fn describe(db: &mut Db, table: &str) -> Result<Option<Described>, PgError> {
    let q = db.table(table)?;
    let exists = db.query_one(
        "look up the table",
        "SELECT to_regclass($1::text) IS NOT NULL",
        &[&q],
    )?;
    if !exists.get::<_, bool>(0) {
        return Ok(None);
    }
    let columns = db
        .query(
            "read the table's columns",
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
               FROM pg_attribute a
              WHERE a.attrelid = to_regclass($1::text) AND a.attnum > 0 AND NOT a.attisdropped
              ORDER BY a.attnum",
            &[&q],
        )?
        .iter()
        .map(|r| Column {
            name: r.get(0),
            ty: r.get(1),
        })
        .collect();
    let primary_key = db
        .query(
            "read the table's primary key",
            "SELECT a.attname::text
               FROM pg_index i
               CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
              WHERE i.indrelid = to_regclass($1::text) AND i.indisprimary
              ORDER BY k.ord",
            &[&q],
        )?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(Some(Described {
        columns,
        primary_key,
        sql: q,
    }))
}

/// What to compare, resolved against both catalogs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Spec {
    /// As the playbook names it.
    pub table: String,
    pub key: Vec<Column>,
    /// Compared: on both sides, neither key nor `updated-at`.
    pub columns: Vec<Column>,
    /// Only on the source (a bad migration dropped them): staged, and
    /// applied once they exist on the target again.
    pub source_only: Vec<String>,
    /// Every source column, as staged.
    pub source_columns: Vec<Column>,
    pub updated_at: Option<String>,
    /// The scope on the source side.
    pub filter: Option<String>,
    /// SQL returning keys, and the database it runs on.
    pub ids: Option<(String, String)>,
    /// For a table without `updated-at`: SQL on the target returning the
    /// keys of rows changed after T.
    pub changed_after_t: Option<String>,
    /// T, ms since the epoch: a target row changed after it is a conflict.
    pub t_ms: Option<i64>,
    /// The table as SQL on the source and on the target, each qualified
    /// as its server's search path finds it (empty: as the playbook
    /// names it).
    #[serde(default)]
    pub source_sql: String,
    #[serde(default)]
    pub target_sql: String,
}

impl Spec {
    /// The table as SQL on one side.
    pub fn table_sql(&self, source: bool) -> String {
        let s = if source {
            &self.source_sql
        } else {
            &self.target_sql
        };
        if s.is_empty() {
            quote_qualified(&self.table)
        } else {
            s.clone()
        }
    }

    /// `t.k1::text, t.k2::text`.
    fn key_text(&self) -> String {
        self.key
            .iter()
            .map(|c| format!("t.{}::text", c.quoted()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The hash compared: the compared columns' text as a row. On the
    /// source it also covers the columns the target lacks, so that every
    /// row in scope differs and is staged: their values exist nowhere else.
    fn row_hash(&self, source: bool) -> String {
        let mut cols: Vec<String> = self
            .columns
            .iter()
            .map(|c| format!("t.{}", c.quoted()))
            .collect();
        if source {
            cols.extend(
                self.source_only
                    .iter()
                    .map(|c| format!("t.{}", quote_ident(c))),
            );
        }
        if cols.is_empty() {
            return "md5('')".into();
        }
        format!("md5(ROW({})::text)", cols.join(", "))
    }

    /// Whether the target row changed after T, by `updated-at`.
    fn changed(&self) -> String {
        match (&self.updated_at, self.t_ms) {
            (Some(u), Some(t)) => format!(
                "coalesce(t.{} > to_timestamp({t}::float8 / 1000), false)",
                quote_ident(u)
            ),
            _ => "false".into(),
        }
    }

    /// The rows to compare, as `COPY` text: the key's text and the
    /// compared hash. (The whole row's hash, the guard a repair checks, is
    /// read afterwards for the rows that differ.)
    fn rows_sql(&self, source: bool, cond: &str) -> String {
        let mut wh = vec![cond.to_owned()];
        if source {
            if let Some(f) = &self.filter {
                wh.push(format!("({f})"));
            }
        }
        // The target's rows say whether they changed after T (a conflict).
        let changed = if source {
            String::new()
        } else {
            format!(", {}", self.changed())
        };
        format!(
            "COPY (SELECT {keys}, {h}{changed} FROM {table} AS t WHERE {wh}) TO STDOUT",
            keys = self.key_text(),
            h = self.row_hash(source),
            table = self.table_sql(source),
            wh = wh.join(" AND ")
        )
    }

    /// `(t.k1, t.k2) IN (SELECT v1::ty1, v2::ty2 FROM (VALUES …))`, with
    /// the keys' text as literals: for `COPY`, which takes no parameters
    /// (and whose source may be a hot standby, where no temporary table
    /// could hold them).
    pub fn keys_in(&self, keys: &[Vec<String>]) -> String {
        if keys.is_empty() {
            return "false".into();
        }
        let cols: Vec<String> = self
            .key
            .iter()
            .map(|c| format!("t.{}", c.quoted()))
            .collect();
        let casts: Vec<String> = self
            .key
            .iter()
            .enumerate()
            .map(|(i, c)| format!("v.v{i}::{}", c.ty))
            .collect();
        let names: Vec<String> = (0..self.key.len()).map(|i| format!("v{i}")).collect();
        let values: Vec<String> = keys
            .iter()
            .map(|k| {
                format!(
                    "({})",
                    k.iter().map(|s| literal(s)).collect::<Vec<_>>().join(", ")
                )
            })
            .collect();
        format!(
            "({}) IN (SELECT {} FROM (VALUES {}) AS v({}))",
            cols.join(", "),
            casts.join(", "),
            values.join(", "),
            names.join(", ")
        )
    }

    /// `(t.k1, t.k2) IN (SELECT v0::ty1, v1::ty2 FROM unnest($n::text[], …))`:
    /// the keys as bound parameters, one text array per key column from
    /// `$first`, as `key_params` makes them.
    pub fn keys_bound(&self, first: usize) -> String {
        let cols: Vec<String> = self
            .key
            .iter()
            .map(|c| format!("t.{}", c.quoted()))
            .collect();
        let casts: Vec<String> = self
            .key
            .iter()
            .enumerate()
            .map(|(i, c)| format!("v.v{i}::{}", c.ty))
            .collect();
        let arrays: Vec<String> = (0..self.key.len())
            .map(|i| format!("${}::text[]", first + i))
            .collect();
        let names: Vec<String> = (0..self.key.len()).map(|i| format!("v{i}")).collect();
        format!(
            "({}) IN (SELECT {} FROM unnest({}) AS v({}))",
            cols.join(", "),
            casts.join(", "),
            arrays.join(", "),
            names.join(", ")
        )
    }

    /// The parameters of `keys_bound`: each key column's texts.
    pub fn key_params<'k>(&self, keys: &'k [Vec<String>]) -> Vec<Vec<&'k str>> {
        (0..self.key.len())
            .map(|i| keys.iter().map(|k| k[i].as_str()).collect())
            .collect()
    }

    /// A single integer key: segments are key ranges.
    fn int_key(&self) -> bool {
        self.key.len() == 1 && matches!(self.key[0].ty.as_str(), "smallint" | "integer" | "bigint")
    }
}

/// What a row is to the repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Class {
    /// Only in the source.
    Insert,
    /// In both, different.
    Update,
    /// Only in the target: applied only with `allow-delete`.
    Delete,
    /// The target row also changed after T: `on-conflict` decides.
    Conflict,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Insert => "insert",
            Class::Update => "update",
            Class::Delete => "delete",
            Class::Conflict => "conflict",
        }
    }
}

/// A differing row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Found {
    /// The key's columns as text.
    pub key: Vec<String>,
    pub class: Class,
    /// For a conflict, what the source side would do.
    pub would: Class,
    /// md5 of the target row's text as the diff saw it; none when absent.
    pub target_hash: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Stats {
    /// `segments` (checksums of key ranges or key-hash buckets) or `keys`.
    pub mode: String,
    pub source_rows: u64,
    pub target_rows: u64,
    pub segments: u64,
    pub segments_differing: u64,
    /// Rows fetched as (key, hash) from both servers together.
    pub rows_fetched: u64,
    /// Rows whose key is NULL: not compared.
    pub null_keys: u64,
    pub seconds: f64,
}

/// Rows as fetched: key text → the compared hash, and (on the target)
/// whether the row changed after T.
type Rows = HashMap<Vec<String>, (u128, bool)>;

/// Rows per range fetched at once, from each side.
const FETCH_BATCH: i32 = 5000;
/// Keys per lookup on the target in a scoped diff.
const KEY_BATCH: usize = 2000;

/// One field of `COPY` text: `\N` is NULL, backslash escapes undone.
fn copy_field(f: &[u8]) -> Option<String> {
    if f == b"\\N" {
        return None;
    }
    if !f.contains(&b'\\') {
        return Some(String::from_utf8_lossy(f).into_owned());
    }
    let mut out = Vec::with_capacity(f.len());
    let mut it = f.iter().copied();
    while let Some(c) = it.next() {
        if c != b'\\' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some(b'n') => out.push(b'\n'),
            Some(b'r') => out.push(b'\r'),
            Some(b't') => out.push(b'\t'),
            Some(b'b') => out.push(8),
            Some(b'f') => out.push(12),
            Some(b'v') => out.push(11),
            Some(o) => out.push(o),
            None => out.push(b'\\'),
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// Runs a `rows_sql` COPY and reads its lines: `nkeys` key fields, then
/// the md5 in hex.
fn fetch(
    db: &mut Db,
    sql: &str,
    nkeys: usize,
    out: &mut Rows,
    nulls: &mut u64,
) -> Result<(), PgError> {
    let data = db.copy_out("fetch rows to compare", sql)?;
    for line in data.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let mut fields = line.split(|b| *b == b'\t');
        let key: Option<Vec<String>> = (0..nkeys)
            .map(|_| fields.next().and_then(copy_field))
            .collect();
        let hash = fields
            .next()
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u128::from_str_radix(h, 16).ok())
            .unwrap_or_default();
        let changed = fields.next() == Some(b"t");
        match key {
            Some(key) => {
                out.insert(key, (hash, changed));
            }
            None => *nulls += 1,
        }
    }
    Ok(())
}

/// Classes the rows of one comparable set: every key of either side. A
/// row the target also changed after T is a conflict.
fn classify(src: &Rows, tgt: &Rows, changed_set: &HashSet<Vec<String>>) -> Vec<Found> {
    let mut out = Vec::new();
    let found = |k: &Vec<String>, would: Class, changed: bool| Found {
        key: k.clone(),
        class: if changed && would != Class::Insert {
            Class::Conflict
        } else {
            would
        },
        would,
        target_hash: None,
    };
    let changed = |k: &Vec<String>, t: &(u128, bool)| t.1 || changed_set.contains(k);
    for (k, s) in src {
        match tgt.get(k) {
            None => out.push(found(k, Class::Insert, false)),
            Some(t) if t.0 != s.0 => out.push(found(k, Class::Update, changed(k, t))),
            Some(_) => {}
        }
    }
    for (k, t) in tgt {
        if !src.contains_key(k) {
            out.push(found(k, Class::Delete, changed(k, t)));
        }
    }
    out.sort_by(|a, b| key_order(&a.key, &b.key));
    out
}

/// The whole row's hash on the target (the guard a repair checks), for
/// the differing rows it has, read through `db` (the stage's own
/// transaction, under the same settings as the apply).
pub fn settle(spec: &Spec, db: &mut Db, rows: &mut [Found]) -> Result<(), PgError> {
    let on_target: Vec<usize> = (0..rows.len())
        .filter(|i| rows[*i].would != Class::Insert)
        .collect();
    let n = spec.key.len();
    for chunk in on_target.chunks(KEY_BATCH) {
        let keys: Vec<Vec<String>> = chunk.iter().map(|i| rows[*i].key.clone()).collect();
        // Bound, not spliced: this runs in the stage's read-write
        // transaction, and keys are application data.
        let sql = format!(
            "SELECT {}, md5(ROW(t.*)::text) FROM {} AS t WHERE {}",
            spec.key_text(),
            spec.table_sql(false),
            spec.keys_bound(1)
        );
        let arrays = spec.key_params(&keys);
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = arrays
            .iter()
            .map(|a| a as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        let mut seen: HashMap<Vec<String>, String> = HashMap::new();
        for r in db.query("read the differing rows' hashes", &sql, &params)? {
            let key: Option<Vec<String>> = (0..n).map(|i| r.get::<_, Option<String>>(i)).collect();
            if let Some(k) = key {
                seen.insert(k, r.get(n));
            }
        }
        for i in chunk {
            let f = &mut rows[*i];
            f.target_hash = seen.remove(&f.key);
        }
    }
    Ok(())
}

/// Runs `a` on the source and `b` on the target at once.
fn both<A: Send, B: Send>(
    src: &mut Db,
    tgt: &mut Db,
    a: impl FnOnce(&mut Db) -> Result<A, PgError> + Send,
    b: impl FnOnce(&mut Db) -> Result<B, PgError> + Send,
) -> Result<(A, B), PgError> {
    std::thread::scope(|s| {
        let ha = s.spawn(|| a(src));
        let rb = b(tgt);
        let ra = ha.join().expect("the source's half of the diff panicked");
        Ok((ra?, rb?))
    })
}

/// Per segment: row count and the sum of 60 bits of each row's hash.
type Sums = BTreeMap<i64, (i64, String)>;

fn sums(db: &mut Db, spec: &Spec, seg: &str, source: bool) -> Result<Sums, PgError> {
    let sql = format!(
        "SELECT {seg} AS seg, count(*), sum(('x' || substr({h}, 18))::bit(60)::bigint)::text
           FROM {table} AS t GROUP BY 1",
        h = spec.row_hash(source),
        table = spec.table_sql(source)
    );
    Ok(db
        .query("sum the hashes of key segments", &sql, &[])?
        .iter()
        .map(|r| {
            (
                r.get::<_, Option<i64>>(0).unwrap_or(-1),
                (r.get(1), r.get(2)),
            )
        })
        .collect())
}

/// Keys of target rows changed after T by the playbook's SQL, which runs
/// under the application's search path, as its author wrote it.
fn changed_after_t(db: &mut Db, spec: &Spec) -> Result<HashSet<Vec<String>>, PgError> {
    let Some(sql) = &spec.changed_after_t else {
        return Ok(HashSet::new());
    };
    let n = spec.key.len();
    let wrapped = format!(
        "SELECT {} FROM ({sql}) AS c",
        (1..=n)
            .map(|i| format!("c.{}::text", quote_ident(&spec.key[i - 1].name)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(db
        .as_application(|db| db.query("list rows changed after T", &wrapped, &[]))?
        .iter()
        .filter_map(|r| (0..n).map(|i| r.get::<_, Option<String>>(i)).collect())
        .collect())
}

/// The keys in scope could not be spilled to a scratch file.
#[derive(Debug, thiserror::Error)]
#[error("cannot spill the keys in scope to a scratch file")]
pub struct SpillError(#[source] pub std::io::Error);

/// What receives the differing rows, a group at a time (each group in key
/// order): memory holds one group, however many rows differ.
pub type Sink<'a, E> = &'a mut dyn FnMut(Vec<Found>) -> Result<(), E>;

/// Compares `spec`'s table on `src` (the good side) and `tgt`, handing
/// the differing rows to `sink`. `ids_db` runs the `ids` SQL when the spec
/// has one.
pub fn diff<E: From<PgError> + From<SpillError>>(
    spec: &Spec,
    src: &mut Db,
    tgt: &mut Db,
    ids_db: Option<&mut Db>,
    progress: &crate::progress::Reporter,
    sink: Sink<'_, E>,
) -> Result<Stats, E> {
    let started = Instant::now();
    let changed_set = changed_after_t(tgt, spec)?;
    let mut stats = if spec.filter.is_none() && spec.ids.is_none() {
        by_segments(spec, src, tgt, &changed_set, progress, sink)?
    } else {
        by_keys(spec, src, tgt, ids_db, &changed_set, progress, sink)?
    };
    stats.seconds = started.elapsed().as_secs_f64();
    Ok(stats)
}

/// Keys in order: numerically where both are integers, else byte-wise;
/// the same on any machine whatever the databases' collations.
pub fn key_order(a: &[String], b: &[String]) -> std::cmp::Ordering {
    for (x, y) in a.iter().zip(b) {
        let o = match (x.parse::<i128>(), y.parse::<i128>()) {
            (Ok(i), Ok(j)) => i.cmp(&j),
            _ => x.as_bytes().cmp(y.as_bytes()),
        };
        if o.is_ne() {
            return o;
        }
    }
    a.len().cmp(&b.len())
}

/// Rows per segment aimed at: small enough that one differing row costs
/// little to fetch, large enough that the segments' sums stay few.
const SEGMENT_ROWS: i64 = 100;
/// Segments fetched at once: a bounded number of rows in memory.
const GROUP_SEGMENTS: usize = 500;
/// Rows (the larger side's, as the segments' sums counted them) fetched
/// at once: what bounds memory when the estimate the segments were cut
/// by was wrong.
const GROUP_ROWS: i64 = 50_000;

/// The table's rows as the planner estimates them. `reltuples` is -1
/// until the table is first analysed or vacuumed (PostgreSQL 14+; 0
/// before), which would make the whole table one segment: then the
/// planner's own estimate, from the table's size on disk.
fn estimate_rows(db: &mut Db, table: &str) -> Result<i64, PgError> {
    let r = db.query_one(
        "estimate the table's rows",
        "SELECT reltuples::float8 FROM pg_class WHERE oid = to_regclass($1::text)",
        &[&table],
    )?;
    if let Some(n) = r.get::<_, Option<f64>>(0).filter(|n| *n > 0.0) {
        return Ok(n as i64);
    }
    let plan = db.own_text_rows(
        "estimate the table's rows",
        &format!("EXPLAIN (FORMAT JSON) SELECT FROM {table}"),
    )?;
    let rows = serde_json::from_str::<serde_json::Value>(&plan.concat())
        .ok()
        .and_then(|v| v[0]["Plan"]["Plan Rows"].as_f64())
        .unwrap_or(0.0);
    Ok(rows as i64)
}

/// What one fetch reads: neighbouring key ranges of an integer key
/// (`[a, b)` each), or buckets of the key's hash.
enum Fetch {
    Ranges(Vec<(i128, i128)>),
    Buckets(Vec<i64>),
}

/// The differing segments cut into fetches of at most `GROUP_SEGMENTS`
/// segments (four times as many hash buckets: each such fetch scans the
/// table) and about `GROUP_ROWS` rows, by the counts the sums gave. A key
/// range holding more rows than that on its own is split evenly.
fn fetches(differing: &[(i64, i64)], range: Option<(i64, i64)>) -> Vec<Fetch> {
    let mut out = Vec::new();
    match range {
        Some((lo, width)) => {
            let mut ranges: Vec<(i128, i128)> = Vec::new();
            let (mut segs, mut rows) = (0usize, 0i64);
            let flush = |ranges: &mut Vec<(i128, i128)>, out: &mut Vec<Fetch>| {
                if !ranges.is_empty() {
                    out.push(Fetch::Ranges(std::mem::take(ranges)));
                }
            };
            for &(s, count) in differing {
                let a = lo as i128 + s as i128 * width as i128;
                let b = a + width as i128;
                if count > GROUP_ROWS {
                    flush(&mut ranges, &mut out);
                    (segs, rows) = (0, 0);
                    let pieces = (count / GROUP_ROWS + 1) as i128;
                    let step = ((b - a) / pieces).max(1);
                    let mut x = a;
                    while x < b {
                        let y = (x + step).min(b);
                        out.push(Fetch::Ranges(vec![(x, y)]));
                        x = y;
                    }
                    continue;
                }
                if segs == GROUP_SEGMENTS || rows + count > GROUP_ROWS {
                    flush(&mut ranges, &mut out);
                    (segs, rows) = (0, 0);
                }
                match ranges.last_mut() {
                    Some(r) if r.1 == a => r.1 = b,
                    _ => ranges.push((a, b)),
                }
                segs += 1;
                rows += count;
            }
            flush(&mut ranges, &mut out);
        }
        None => {
            let mut group: Vec<i64> = Vec::new();
            let mut rows = 0i64;
            for &(s, count) in differing {
                if !group.is_empty()
                    && (group.len() == GROUP_SEGMENTS * 4 || rows + count > GROUP_ROWS)
                {
                    out.push(Fetch::Buckets(std::mem::take(&mut group)));
                    rows = 0;
                }
                group.push(s);
                rows += count;
            }
            if !group.is_empty() {
                out.push(Fetch::Buckets(group));
            }
        }
    }
    out
}

fn by_segments<E: From<PgError>>(
    spec: &Spec,
    src: &mut Db,
    tgt: &mut Db,
    changed_set: &HashSet<Vec<String>>,
    progress: &crate::progress::Reporter,
    sink: Sink<'_, E>,
) -> Result<Stats, E> {
    let (s_table, t_table) = (spec.table_sql(true), spec.table_sql(false));
    let (s_rows, t_rows) = both(
        src,
        tgt,
        |db| estimate_rows(db, &s_table),
        |db| estimate_rows(db, &t_table),
    )?;
    let rows = s_rows.max(t_rows).max(1);
    // Segments: key ranges of an integer key, else buckets of a hash of
    // the key; either is the same on both servers.
    let (seg, range): (String, Option<(i64, i64)>) = if spec.int_key() {
        let k = spec.key[0].quoted();
        let bounds = |table: &str| {
            format!("SELECT min(t.{k})::bigint, max(t.{k})::bigint FROM {table} AS t")
        };
        let (a, b) = both(
            src,
            tgt,
            |db| db.query_one("read the key's bounds", &bounds(&s_table), &[]),
            |db| db.query_one("read the key's bounds", &bounds(&t_table), &[]),
        )?;
        let lo = [a.get::<_, Option<i64>>(0), b.get::<_, Option<i64>>(0)]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(0);
        let hi = [a.get::<_, Option<i64>>(1), b.get::<_, Option<i64>>(1)]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(0);
        let span = (hi as i128 - lo as i128 + 1).max(1);
        let density = (rows as f64 / span as f64).clamp(1e-9, 1.0);
        let width = ((SEGMENT_ROWS as f64 / density).ceil() as i64).max(1);
        (
            format!("((t.{k}::bigint - ({lo})::bigint) / {width})"),
            Some((lo, width)),
        )
    } else {
        let keys = spec
            .key
            .iter()
            .map(|c| format!("t.{}", c.quoted()))
            .collect::<Vec<_>>()
            .join(", ");
        let buckets = ((rows / SEGMENT_ROWS).max(64) as u64)
            .next_power_of_two()
            .min(1 << 20);
        (
            format!(
                "(('x' || substr(md5(ROW({keys})::text), 1, 8))::bit(32)::bigint & {})",
                buckets - 1
            ),
            None,
        )
    };
    progress.stage("sum key segments on both servers", None);
    let (ss, ts) = both(
        src,
        tgt,
        |db| sums(db, spec, &seg, true),
        |db| sums(db, spec, &seg, false),
    )?;
    let mut stats = Stats {
        mode: if range.is_some() {
            "segments (key ranges)".into()
        } else {
            "segments (key hashes)".into()
        },
        source_rows: ss.values().map(|v| v.0 as u64).sum(),
        target_rows: ts.values().map(|v| v.0 as u64).sum(),
        ..Stats::default()
    };
    let all: std::collections::BTreeSet<i64> = ss.keys().chain(ts.keys()).copied().collect();
    stats.segments = all.len() as u64;
    // The differing segments, each with the larger side's row count.
    let differing: Vec<(i64, i64)> = all
        .into_iter()
        .filter(|s| ss.get(s) != ts.get(s))
        .map(|s| {
            let n = |m: &Sums| m.get(&s).map_or(0, |v| v.0);
            (s, n(&ss).max(n(&ts)))
        })
        .collect();
    stats.segments_differing = differing.len() as u64;
    // Fetch the differing segments' rows a group at a time, both sides
    // at once: one query per group, not one per segment (a round trip
    // each costs more than its rows).
    let groups = fetches(&differing, range);
    let total = groups.len() as u64;
    for (i, g) in groups.iter().enumerate() {
        if i == 0 {
            progress.stage("fetch the rows of differing segments", Some(total));
        }
        progress.advance(i as u64, "segments");
        let cond = match g {
            // Neighbouring segments make one key range; the ranges are
            // read by the key's index.
            Fetch::Ranges(ranges) => {
                let k = spec.key[0].quoted();
                let parts: Vec<String> = ranges
                    .iter()
                    .map(|(a, b)| format!("(t.{k} >= {a} AND t.{k} < {b})"))
                    .collect();
                format!("({})", parts.join(" OR "))
            }
            Fetch::Buckets(b) => format!(
                "{seg} IN ({})",
                b.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
            ),
        };
        let (found, _, _) = compare(spec, src, tgt, &cond, changed_set, &mut stats)?;
        sink(found)?;
    }
    Ok(stats)
}

/// Both sides' rows under `cond`, fetched at once and classed; the
/// fetch counted in `stats`. The differing rows, and each side's rows.
/// The source's statement holds the playbook's `where`, when there is
/// one: it runs under the application's search path.
fn compare(
    spec: &Spec,
    src: &mut Db,
    tgt: &mut Db,
    cond: &str,
    changed_set: &HashSet<Vec<String>>,
    stats: &mut Stats,
) -> Result<(Vec<Found>, u64, u64), PgError> {
    let n = spec.key.len();
    let (s_sql, t_sql) = (spec.rows_sql(true, cond), spec.rows_sql(false, cond));
    let side = |sql: &str, db: &mut Db| {
        let (mut r, mut nulls) = (Rows::new(), 0);
        fetch(db, sql, n, &mut r, &mut nulls)?;
        Ok((r, nulls))
    };
    let user = spec.filter.is_some();
    let ((sr, sn), (tr, tn)) = both(
        src,
        tgt,
        |db| match user {
            true => db.as_application(|db| side(&s_sql, db)),
            false => side(&s_sql, db),
        },
        |db| side(&t_sql, db),
    )?;
    stats.rows_fetched += (sr.len() + tr.len()) as u64;
    stats.null_keys += sn + tn;
    Ok((
        classify(&sr, &tr, changed_set),
        sr.len() as u64,
        tr.len() as u64,
    ))
}

/// Keys in scope, written to a private scratch file as they stream in
/// and read back a batch at a time: memory holds a batch, however many
/// keys the scope has.
struct Spill {
    _dir: crate::fsutil::ScratchDir,
    path: std::path::PathBuf,
    out: Option<std::io::BufWriter<std::fs::File>>,
    count: u64,
}

impl Spill {
    fn new() -> Result<Spill, SpillError> {
        let dir = crate::fsutil::ScratchDir::new("reentry-keys").map_err(SpillError)?;
        let path = dir.path().join("keys.jsonl");
        let file = crate::fsutil::private_options()
            .create_new(true)
            .open(&path)
            .map_err(SpillError)?;
        Ok(Spill {
            _dir: dir,
            path,
            out: Some(std::io::BufWriter::new(file)),
            count: 0,
        })
    }

    fn push(&mut self, key: &[String]) -> Result<(), SpillError> {
        use std::io::Write;
        let out = self.out.as_mut().expect("written before it is read");
        serde_json::to_writer(&mut *out, key).map_err(|e| SpillError(e.into()))?;
        out.write_all(b"\n").map_err(SpillError)?;
        self.count += 1;
        Ok(())
    }

    /// Hands the keys to `f`, `batch` at a time, in the order they came.
    fn each<E: From<SpillError>>(
        mut self,
        batch: usize,
        mut f: impl FnMut(&[Vec<String>]) -> Result<(), E>,
    ) -> Result<(), E> {
        use std::io::{BufRead, Write};
        if let Some(mut out) = self.out.take() {
            out.flush().map_err(SpillError)?;
        }
        let file = std::fs::File::open(&self.path).map_err(SpillError)?;
        let mut keys = Vec::with_capacity(batch);
        for line in std::io::BufReader::new(file).lines() {
            let line = line.map_err(SpillError)?;
            keys.push(serde_json::from_str(&line).map_err(|e| SpillError(e.into()))?);
            if keys.len() == batch {
                f(&keys)?;
                keys.clear();
            }
        }
        if !keys.is_empty() {
            f(&keys)?;
        }
        Ok(())
    }
}

/// Keys from the `ids` SQL, as text, spilled as they come; the SQL runs
/// under the application's search path, as its author wrote it.
fn ids<E: From<PgError> + From<SpillError>>(
    db: &mut Db,
    spec: &Spec,
    spill: &mut Spill,
) -> Result<(), E> {
    let Some((_, sql)) = &spec.ids else {
        return Ok(());
    };
    let wrapped = format!(
        "SELECT DISTINCT {} FROM ({sql}) AS c",
        spec.key
            .iter()
            .map(|c| format!("c.{}::text", c.quoted()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    keys_into(
        db,
        "run the repair's ids query",
        &wrapped,
        spec.key.len(),
        spill,
    )
}

/// Streams the keys `sql` returns (its `n` columns, as text) into
/// `spill`, under the application's search path (`sql` holds the
/// playbook's SQL); a key with a NULL is left out.
fn keys_into<E: From<PgError> + From<SpillError>>(
    db: &mut Db,
    context: &str,
    sql: &str,
    n: usize,
    spill: &mut Spill,
) -> Result<(), E> {
    db.as_application(|db| {
        db.stream_rows(context, sql, &[], FETCH_BATCH, |rows| {
            for r in rows {
                let key: Option<Vec<String>> =
                    (0..n).map(|i| r.get::<_, Option<String>>(i)).collect();
                if let Some(k) = key {
                    spill.push(&k)?;
                }
            }
            Ok::<_, E>(())
        })
    })
}

fn by_keys<E: From<PgError> + From<SpillError>>(
    spec: &Spec,
    src: &mut Db,
    tgt: &mut Db,
    ids_db: Option<&mut Db>,
    changed_set: &HashSet<Vec<String>>,
    progress: &crate::progress::Reporter,
    sink: Sink<'_, E>,
) -> Result<Stats, E> {
    let n = spec.key.len();
    let mut stats = Stats {
        mode: "keys".into(),
        ..Stats::default()
    };
    // The keys in scope first, spilled: from the `ids` SQL, or the
    // source's rows the `where` selects.
    let mut spill = Spill::new()?;
    if spec.ids.is_some() {
        match ids_db {
            Some(db) => ids::<E>(db, spec, &mut spill)?,
            None => ids::<E>(tgt, spec, &mut spill)?,
        }
    } else {
        let filter = spec.filter.clone().unwrap_or_else(|| "true".into());
        let sql = format!(
            "SELECT {} FROM {} AS t WHERE ({filter})",
            spec.key_text(),
            spec.table_sql(true)
        );
        keys_into::<E>(src, "list the source's rows in scope", &sql, n, &mut spill)?;
    }
    progress.stage("compare rows by key", Some(spill.count));
    let mut done = 0u64;
    spill.each(KEY_BATCH, |chunk| {
        progress.advance(done, "keys");
        done += chunk.len() as u64;
        let cond = spec.keys_in(chunk);
        let (found, s_rows, t_rows) = compare(spec, src, tgt, &cond, changed_set, &mut stats)?;
        stats.source_rows += s_rows;
        stats.target_rows += t_rows;
        sink(found)?;
        Ok::<_, E>(())
    })?;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differing_segments_are_fetched_a_bounded_number_of_rows_at_a_time() {
        // Key ranges: neighbours merge, a group stops at GROUP_ROWS, and a
        // segment holding more than that is split.
        let segs = [(0, 30_000), (1, 30_000), (3, 10), (5, 120_000)];
        let f = fetches(&segs, Some((1, 100)));
        let ranges: Vec<Vec<(i128, i128)>> = f
            .iter()
            .map(|f| match f {
                Fetch::Ranges(r) => r.clone(),
                Fetch::Buckets(_) => panic!("ranges expected"),
            })
            .collect();
        assert_eq!(ranges[0], [(1, 101)]);
        assert_eq!(ranges[1], [(101, 201), (301, 401)]);
        // 120,000 rows in [501, 601): three pieces.
        assert_eq!(
            &ranges[2..],
            [[(501, 534)], [(534, 567)], [(567, 600)], [(600, 601)]]
        );
        // Buckets: at most GROUP_ROWS rows, unless one bucket alone is more.
        let segs: Vec<(i64, i64)> = (0..10).map(|s| (s, 20_000)).collect();
        let f = fetches(&segs, None);
        assert_eq!(f.len(), 5);
    }

    #[test]
    fn keys_order_numerically_then_bytewise_whatever_the_collation() {
        let mut k = vec![
            vec!["10".to_owned()],
            vec!["9".to_owned()],
            vec!["-3".to_owned()],
        ];
        k.sort_by(|a, b| key_order(a, b));
        assert_eq!(k, [["-3"], ["9"], ["10"]]);
        let mut t = vec![
            vec!["b".to_owned()],
            vec!["B".to_owned()],
            vec!["a".to_owned()],
        ];
        t.sort_by(|a, b| key_order(a, b));
        assert_eq!(t, [["B"], ["a"], ["b"]]);
    }

    #[test]
    fn copy_text_fields_read_back_exactly() {
        // COPY's text format: \N is NULL, a backslash escapes itself and
        // control characters.
        assert_eq!(copy_field(br"\N"), None);
        assert_eq!(copy_field(br"\\N"), Some(r"\N".to_owned()));
        assert_eq!(copy_field(br"a\tb\\c\nd"), Some("a\tb\\c\nd".to_owned()));
        assert_eq!(copy_field("é".as_bytes()), Some("é".to_owned()));
    }

    #[test]
    fn literals_and_key_lists_are_quoted() {
        assert_eq!(literal("it's"), "E'it''s'");
        assert_eq!(literal(r"k\"), r"E'k\\'");
        let spec = Spec {
            table: "app.case".into(),
            key: vec![
                Column {
                    name: "tenant".into(),
                    ty: "text".into(),
                },
                Column {
                    name: "id".into(),
                    ty: "bigint".into(),
                },
            ],
            columns: vec![],
            source_only: vec![],
            source_columns: vec![],
            updated_at: None,
            filter: None,
            ids: None,
            changed_after_t: None,
            t_ms: None,
            source_sql: String::new(),
            target_sql: String::new(),
        };
        assert_eq!(
            spec.keys_in(&[vec!["a'b".into(), "7".into()]]),
            "(t.\"tenant\", t.\"id\") IN (SELECT v.v0::text, v.v1::bigint FROM (VALUES (E'a''b', E'7')) AS v(v0, v1))"
        );
        assert_eq!(spec.keys_in(&[]), "false");
        assert_eq!(
            spec.keys_bound(3),
            "(t.\"tenant\", t.\"id\") IN (SELECT v.v0::text, v.v1::bigint FROM unnest($3::text[], $4::text[]) AS v(v0, v1))"
        );
        let keys = [
            vec!["a".to_owned(), "1".to_owned()],
            vec!["b".into(), "2".into()],
        ];
        assert_eq!(spec.key_params(&keys), [vec!["a", "b"], vec!["1", "2"]]);
    }
}
