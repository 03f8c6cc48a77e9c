//! Idempotency keys recorded after T are gone from the restored copy: a
//! client's retry would repeat an external side effect (a payment, an
//! e-mail). The evidence that a key was used comes from the current
//! database, from the topic (message keys) and from a provider's CSV
//! export. Missing keys are re-inserted into the restored table as
//! tombstones (recorded with the run id in `reentry.idempotency_tombstone`)
//! or staged for a person in `reentry.idempotency_review`. Keys older than
//! the declared retention would have expired anyway: counted, not inserted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{
    duration_ms, Effect, Env, Nature, OnDatabase, PinErrors, Pinned, PlanCtx, Recorder, Step,
    StepError, StepKind,
};
use crate::kafka::scan::{self, IdFrom, ScanOptions};
use crate::reentry::check::Need;
use crate::reentry::check::{quote_qualified, Column};
use crate::reentry::plan::{step, PlannedStep};
use crate::reentry::playbook::section;
use crate::reentry::playbook::Playbook;
use crate::reentry::playbook::{Meaning, Seg};
use crate::reentry::schema::{opt, req, Field, Kind};
use crate::reentry::steps::Phase;

// ---- Its playbook section: one typed model; its keys and checks come from it.

pub const IDEMPOTENCY_ACTIONS: &[&str] = &["tombstone", "review"];

section! {
    pub struct CsvSource {
        pub path: PathBuf => req("path", Kind::Str),
        pub key_column: String => req("key-column", Kind::Str),
        pub time_column: Option<String> => opt("time-column", Kind::Str),
    }
}

section! {
    pub struct Idempotency {
        pub name: String => req("name", Kind::Str),
        pub database: String => req("database", Kind::Str),
        pub table: String => req("table", Kind::Str),
        pub key_column: String => req("key-column", Kind::Str),
        pub created_at_column: Option<String> => opt("created-at-column", Kind::Str),
        pub retention: Option<String> => opt("retention", Kind::Duration),
        pub action: String => req("action", Kind::OneOf(IDEMPOTENCY_ACTIONS)),
        pub from_current: Option<bool> => opt("from-current", Kind::Bool),
        pub from_topic: Option<String> => opt("from-topic", Kind::Str),
        pub from_csv: Option<CsvSource> => opt("from-csv", Kind::Table(CsvSource::FIELDS)),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CsvFrom {
    pub path: PathBuf,
    pub key_column: String,
    pub time_column: Option<String>,
    /// The export, pinned by sha256 when the plan is made.
    #[serde(default)]
    pub pinned: Option<Pinned>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Keys {
    pub idempotency: String,
    pub database: String,
    pub table: String,
    pub key_column: String,
    pub created_column: Option<String>,
    pub retention_ms: Option<i64>,
    /// `tombstone` or `review`.
    pub action: String,
    pub from_current: bool,
    pub from_topic: Option<String>,
    pub from_csv: Option<CsvFrom>,
    pub t_ms: i64,
}

/// A key seen after T, with the first time and place it was seen.
type Seen = BTreeMap<String, (Option<i64>, &'static str)>;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn parse_time(s: &str) -> Option<i64> {
    let s = s.trim();
    if let Ok(n) = s.parse::<i64>() {
        // Epoch seconds or milliseconds; none beyond what milliseconds hold.
        return if n < 100_000_000_000 {
            n.checked_mul(1000)
        } else {
            Some(n)
        };
    }
    // A provider's export often carries no offset: its times are UTC.
    match crate::time::parse(s) {
        Err(crate::time::TimeError::NoOffset(_)) => crate::time::parse_utc(s).ok(),
        r => r.ok(),
    }
    .map(crate::time::millis)
}

/// The export's keys at or after T (less `STRADDLE_MS`), or every malformed row as
/// `FILE:LINE: message`.
pub fn read_csv(
    path: &Path,
    c: &CsvFrom,
    t_ms: i64,
) -> Result<Vec<(String, Option<i64>)>, Vec<String>> {
    let shown = path.display().to_string();
    match std::fs::read(path) {
        Ok(bytes) => parse_csv(&shown, &bytes, c, t_ms),
        Err(e) => Err(vec![format!("{shown}: cannot read it: {e}")]),
    }
}

/// `read_csv` of bytes already read (and pinned).
pub fn parse_csv(
    shown: &str,
    bytes: &[u8],
    c: &CsvFrom,
    t_ms: i64,
) -> Result<Vec<(String, Option<i64>)>, Vec<String>> {
    let mut rdr = csv::ReaderBuilder::new().flexible(false).from_reader(bytes);
    let headers = match rdr.headers() {
        Ok(h) => h.clone(),
        Err(e) => return Err(vec![format!("{shown}:1: {e}")]),
    };
    let find = |name: &str| headers.iter().position(|h| h.trim() == name);
    let mut errors = Vec::new();
    let key_at = find(&c.key_column);
    if key_at.is_none() {
        errors.push(format!(
            "{shown}:1: no column `{}` (columns: {})",
            c.key_column,
            headers.iter().collect::<Vec<_>>().join(", ")
        ));
    }
    let time_at = match &c.time_column {
        Some(tc) => match find(tc) {
            Some(i) => Some(i),
            None => {
                errors.push(format!("{shown}:1: no column `{tc}`"));
                None
            }
        },
        None => None,
    };
    if !errors.is_empty() {
        return Err(errors);
    }
    let key_at = key_at.expect("checked");
    let mut out = Vec::new();
    for rec in rdr.records() {
        let rec = match rec {
            Ok(r) => r,
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                errors.push(format!("{shown}:{line}: {e}"));
                continue;
            }
        };
        let line = rec.position().map_or(0, |p| p.line());
        let key = rec.get(key_at).unwrap_or("").trim();
        if key.is_empty() {
            errors.push(format!("{shown}:{line}: empty `{}`", c.key_column));
            continue;
        }
        let ts = match time_at {
            Some(i) => {
                let raw = rec.get(i).unwrap_or("");
                match parse_time(raw) {
                    Some(t) => Some(t),
                    None => {
                        errors.push(format!(
                            "{shown}:{line}: `{raw}` in `{}` is not a time (like 2026-07-01 14:36:00+00, UTC when it has no offset, or epoch seconds)",
                            c.time_column.as_deref().unwrap_or("")
                        ));
                        continue;
                    }
                }
            }
            None => None,
        };
        if ts.is_none_or(|t| t >= t_ms - super::STRADDLE_MS) {
            out.push((key.to_owned(), ts));
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// What the step found: missing keys to act on, and the counts around them.
/// What an idempotency step journals as its effect's detail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Detail {
    /// Keys seen, by where they came from (the provider's exports, …).
    pub sources: BTreeMap<String, u64>,
    /// Keys the restore took back.
    pub missing: usize,
    /// Of those, keys past their retention.
    pub expired: u64,
    pub staged_before: u64,
    /// T to the end of the scan, said.
    pub gap: String,
    pub action: String,
}

struct Found {
    sources: BTreeMap<&'static str, u64>,
    missing: Vec<(String, Option<i64>, &'static str)>,
    expired: u64,
    staged_before: u64,
}

impl Keys {
    fn gather(&self, env: &mut Env) -> Result<Found, StepError> {
        let mut seen: Seen = BTreeMap::new();
        let mut sources: BTreeMap<&'static str, u64> = BTreeMap::new();
        let mut note = |seen: &mut Seen, key: String, ts: Option<i64>, source: &'static str| {
            *sources.entry(source).or_default() += 1;
            let e = seen.entry(key).or_insert((ts, source));
            if let (Some(t), Some(old)) = (ts, e.0) {
                if t < old {
                    *e = (Some(t), source);
                }
            }
        };
        if let Some(c) = &self.from_csv {
            let base = env.playbook.file.parent().unwrap_or(Path::new("."));
            let path = base.join(&c.path);
            let bytes = match &c.pinned {
                Some(p) => p.read_checked(&env.playbook.file)?,
                None => std::fs::read(&path).map_err(|e| StepError::Input {
                    message: format!("cannot read {}: {e}", path.display()),
                })?,
            };
            let rows =
                parse_csv(&path.display().to_string(), &bytes, c, self.t_ms).map_err(|errors| {
                    StepError::Input {
                        message: format!(
                            "idempotency `{}`: the CSV export has {} malformed row(s):\n  {}",
                            self.idempotency,
                            errors.len(),
                            errors.join("\n  ")
                        ),
                    }
                })?;
            for (k, t) in rows {
                note(&mut seen, k, t, "csv");
            }
        }
        if self.from_current {
            let key = quote_qualified(&self.key_column);
            let t = env.db("current")?.table(&self.table).on("current")?;
            // A NULL key is no key: no unique index holds it, and no
            // request can name it.
            let sql = match &self.created_column {
                Some(c) => {
                    let c = quote_qualified(c);
                    format!("SELECT {key}::text, (extract(epoch FROM {c}) * 1000)::int8 FROM {t} WHERE {c} >= to_timestamp($1::int8 / 1000.0) AND {key} IS NOT NULL")
                }
                None => {
                    format!("SELECT {key}::text, NULL::int8 FROM {t} WHERE $1::int8 IS NOT NULL AND {key} IS NOT NULL")
                }
            };
            let mut rows = Vec::new();
            env.db("current")?.stream_rows(
                "read current's keys",
                &sql,
                &[&(self.t_ms - super::STRADDLE_MS)],
                10_000,
                |batch| -> Result<(), StepError> {
                    rows.extend(
                        batch
                            .iter()
                            .map(|r| (r.get::<_, String>(0), r.get::<_, Option<i64>>(1))),
                    );
                    Ok(())
                },
            )?;
            for (k, t) in rows {
                note(&mut seen, k, t, "current");
            }
        }
        if let Some(topic) = &self.from_topic {
            let (sorted, _) = scan::scan(
                &env.kafka()?,
                &ScanOptions {
                    topic,
                    from_ms: self.t_ms - super::STRADDLE_MS,
                    t_ms: self.t_ms,
                    id: &IdFrom::Key,
                    progress: crate::progress::Reporter::silent(),
                    start: None,
                },
            )?;
            for s in sorted {
                let s = s.map_err(|source| StepError::Io {
                    what: "read the sorted scan back",
                    source,
                })?;
                note(&mut seen, s.id.into(), Some(s.ts), "topic");
            }
        }
        // Which of them the restored table has.
        let db = env.db(&self.database)?;
        let col = Column::of(db, &self.table, &self.key_column).on(&self.database)?;
        let keys: Vec<&str> = seen.keys().map(String::as_str).collect();
        let mut present = std::collections::BTreeSet::new();
        for chunk in keys.chunks(1000) {
            present.extend(col.present(db, chunk).on(&self.database)?);
        }
        let now = now_ms();
        let mut found = Found {
            sources,
            missing: Vec::new(),
            expired: 0,
            staged_before: 0,
        };
        for (k, (ts, source)) in seen {
            if present.contains(&k) {
                continue;
            }
            match (ts, self.retention_ms) {
                (Some(t), Some(r)) if t + r < now => found.expired += 1,
                _ => found.missing.push((k, ts, source)),
            }
        }
        let ledger = if self.action == "review" {
            "reentry.idempotency_review"
        } else {
            "reentry.idempotency_tombstone"
        };
        let exists: bool = db
            .query_one(
                "look up a table",
                "SELECT to_regclass($1) IS NOT NULL",
                &[&ledger],
            )
            .on(&self.database)?
            .get(0);
        // Not even read from a schema another role made: a view there
        // runs its functions with reentry's rights.
        if exists {
            if let Some(why) = crate::reentry::owned::foreign(db, crate::reentry::owned::SCHEMA)
                .on(&self.database)?
            {
                return Err(StepError::Refused(crate::reentry::owned::refusal(
                    &self.database,
                    crate::reentry::owned::SCHEMA,
                    &why,
                )));
            }
        }
        if exists && self.action == "review" {
            let ids: Vec<&str> = found.missing.iter().map(|m| m.0.as_str()).collect();
            let staged: std::collections::BTreeSet<String> = db
                .query(
                    "look up staged keys",
                    "SELECT key FROM reentry.idempotency_review WHERE idempotency = $1 AND key = ANY($2)",
                    &[&self.idempotency, &ids],
                )
                .on(&self.database)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            found.missing.retain(|m| !staged.contains(&m.0));
            found.staged_before = staged.len() as u64;
        }
        Ok(found)
    }

    fn gap(&self) -> String {
        let gap = (now_ms() - self.t_ms).max(0);
        let mut s = format!(
            "restore gap {}",
            humantime::format_duration(std::time::Duration::from_secs((gap / 1000) as u64))
        );
        if let Some(r) = self.retention_ms {
            if gap > r {
                s.push_str(&format!(
                    " is longer than the key retention ({}): keys from the start of the gap would have expired anyway",
                    humantime::format_duration(std::time::Duration::from_millis(r as u64))
                ));
            }
        }
        s
    }

    fn detail(&self, f: &Found) -> serde_json::Value {
        super::detail(&Detail {
            sources: f
                .sources
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect(),
            missing: f.missing.len(),
            expired: f.expired,
            staged_before: f.staged_before,
            gap: self.gap(),
            action: self.action.clone(),
        })
    }
}

impl Step for Keys {
    fn nature(&self) -> Nature {
        Nature::Changes
    }

    fn writes(&self) -> Vec<&str> {
        vec![self.database.as_str()]
    }

    fn pin(&mut self, playbook: &Path) -> PinErrors {
        let t_ms = self.t_ms;
        let Some(c) = &mut self.from_csv else {
            return Vec::new();
        };
        let mut pinned = c
            .pinned
            .take()
            .unwrap_or_else(|| Pinned::named(&c.path.display().to_string(), &[]));
        let errors = match pinned.pin(playbook, false) {
            Err(e) => vec![(pinned.at.clone(), e)],
            Ok(bytes) => parse_csv(&pinned.path, &bytes, c, t_ms)
                .err()
                .unwrap_or_default()
                .into_iter()
                .map(|e| (pinned.at.clone(), e))
                .collect(),
        };
        c.pinned = Some(pinned);
        errors
    }

    fn preview(&self, env: &mut Env) -> Result<Effect, StepError> {
        let f = self.gather(env)?;
        let verb = if self.action == "review" {
            "stage for review"
        } else {
            "re-insert as tombstones"
        };
        Ok(Effect {
            summary: format!(
                "idempotency `{}`: {} key(s) used after T are missing on {}: {verb}; {} expired anyway; {}",
                self.idempotency,
                f.missing.len(),
                self.database,
                f.expired,
                self.gap()
            ),
            count: f.missing.len() as u64,
            items: f.missing.iter().take(10).map(|m| format!("{} ({})", m.0, m.2)).collect(),
            detail: self.detail(&f),
        })
    }

    fn apply(&self, env: &mut Env, rec: &mut Recorder) -> Result<Effect, StepError> {
        let f = self.gather(env)?;
        // The keys to insert: (key, first seen, where).
        rec.prior(|| {
            Ok(f.missing
                .iter()
                .map(|m| (m.0.clone(), m.1, m.2.to_owned()))
                .collect::<Vec<(String, Option<i64>, String)>>())
        })?;
        let run_id = env.run_id.clone();
        let database = self.database.clone();
        let db = env.db(&database)?;
        let keys: Vec<&str> = f.missing.iter().map(|m| m.0.as_str()).collect();
        let times: Vec<Option<i64>> = f.missing.iter().map(|m| m.1).collect();
        let sources: Vec<&str> = f.missing.iter().map(|m| m.2).collect();
        let ledger = if self.action == "review" {
            "reentry.idempotency_review"
        } else {
            "reentry.idempotency_tombstone"
        };
        let n = db.transaction("BEGIN", |db| -> Result<u64, StepError> {
            // reentry's table, locked against new triggers, checked again.
            crate::reentry::owned::staging_tables(db, &database, &[ledger])?;
            if self.action == "review" {
                return db
                    .execute(
                        "stage keys for review",
                        "INSERT INTO reentry.idempotency_review (run_id, idempotency, key, source, seen_at)
                         SELECT $1, $2, v.k, v.s, to_timestamp(v.t / 1000.0)
                           FROM unnest($3::text[], $4::int8[], $5::text[]) AS v(k, t, s)
                         ON CONFLICT (idempotency, key) DO NOTHING",
                        &[&run_id, &self.idempotency, &keys, &times, &sources],
                    )
                    .on(&database);
            }
            let t = db.table(&self.table).on(&database)?;
            let key = quote_qualified(&self.key_column);
            let key_type = Column::of(db, &self.table, &self.key_column).on(&database)?.ty;
            let (cols, vals) = match &self.created_column {
                Some(c) => (
                    format!("{key}, {}", quote_qualified(c)),
                    format!("v.k::{key_type}, coalesce(to_timestamp(v.t / 1000.0), now())"),
                ),
                None => (key.clone(), format!("v.k::{key_type}")),
            };
            let n = db
                .execute(
                    "insert tombstone keys",
                    &format!(
                        "INSERT INTO {t} ({cols}) SELECT {vals} FROM unnest($1::text[], $2::int8[]) AS v(k, t)
                          WHERE NOT EXISTS (SELECT FROM {t} WHERE {key} = v.k::{key_type})"
                    ),
                    &[&keys, &times],
                )
                .on(&database)?;
            db.execute(
                "record tombstones",
                "INSERT INTO reentry.idempotency_tombstone (run_id, idempotency, key, source, seen_at)
                 SELECT $1, $2, v.k, v.s, to_timestamp(v.t / 1000.0)
                   FROM unnest($3::text[], $4::int8[], $5::text[]) AS v(k, t, s)
                 ON CONFLICT (idempotency, key) DO NOTHING",
                &[&run_id, &self.idempotency, &keys, &times, &sources],
            )
            .on(&database)?;
            Ok(n)
        })?;
        let verb = if self.action == "review" {
            "staged for review"
        } else {
            "re-inserted as tombstones"
        };
        Ok(Effect {
            summary: format!(
                "idempotency `{}`: {n} key(s) {verb} on {database}; {} expired anyway; {}",
                self.idempotency,
                f.expired,
                self.gap()
            ),
            count: n,
            items: f
                .missing
                .iter()
                .take(10)
                .map(|m| format!("{} ({})", m.0, m.2))
                .collect(),
            detail: self.detail(&f),
        })
    }
}

/// Each idempotency table's keys used after T that the restored copy lacks.
fn plan(p: &Playbook, ctx: &PlanCtx) -> Vec<PlannedStep> {
    let Some(t_ms) = ctx.t_ms else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (n, k) in p.idempotency.iter().enumerate() {
        out.push(step(
            format!("idempotency:{}", k.name),
            // Keys are rows of the database that stays: they come back
            // with the repair, before the invariants are checked.
            Phase::Repair,
            format!("idempotency keys `{}` on {}", k.name, k.database),
            super::Action::IdempotencyKeys(Keys {
                idempotency: k.name.clone(),
                database: k.database.clone(),
                table: k.table.clone(),
                key_column: k.key_column.clone(),
                created_column: k.created_at_column.clone(),
                retention_ms: k.retention.as_deref().map(|r| duration_ms(Some(r), "0s")),
                action: k.action.clone(),
                from_current: k.from_current == Some(true),
                from_topic: k.from_topic.clone(),
                from_csv: k.from_csv.as_ref().map(|c| CsvFrom {
                    path: c.path.clone(),
                    key_column: c.key_column.clone(),
                    time_column: c.time_column.clone(),
                    pinned: Some(Pinned::named(
                        &c.path.display().to_string(),
                        &["idempotency", &n.to_string(), "from-csv", "path"],
                    )),
                }),
                t_ms,
            }),
        ));
    }
    out
}

fn needs_time(p: &Playbook) -> bool {
    !p.idempotency.is_empty()
}

/// Each idempotency table and its key (and creation time) column.
fn needs(p: &Playbook) -> Vec<Need<'_>> {
    let mut out = Vec::new();
    for (i, x) in p.idempotency.iter().enumerate() {
        out.push(Need {
            database: &x.database,
            table: x.table.clone(),
            columns: std::iter::once(x.key_column.clone())
                .chain(x.created_at_column.clone())
                .collect(),
            path: vec![Seg::Key("idempotency"), Seg::Index(i), Seg::Key("table")],
            what: format!("idempotency `{}`", x.name),
        });
    }
    out
}

/// Every idempotency table is on a declared database.
fn meaning(m: &mut Meaning) {
    for (i, x) in m.p.idempotency.iter().enumerate() {
        m.database(
            &[Seg::Key("idempotency"), Seg::Index(i), Seg::Key("database")],
            &x.database,
        );
    }
}

pub const KIND: StepKind = StepKind {
    online: super::no_online,
    meaning,
    steps: plan,
    needs_time,
    notes: super::no_notes,
    needs,
    queries: super::no_queries,
    keys: &[],
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_times_beyond_what_milliseconds_hold_are_malformed_not_a_panic() {
        // Seen writing the fuzz target `provider_csv`: seconds were
        // multiplied by 1000 unchecked, so a large negative number overflowed.
        for raw in [
            "-9223372036854775808",
            "-9223372036854776",
            "-100000000000000000",
        ] {
            assert_eq!(parse_time(raw), None, "{raw}");
        }
        assert_eq!(parse_time("1795608000"), Some(1_795_608_000_000));
        assert_eq!(parse_time("1795608000000"), Some(1_795_608_000_000));
        assert_eq!(parse_time("-1"), Some(-1000));
        let c = CsvFrom {
            path: "export.csv".into(),
            key_column: "request_id".into(),
            time_column: Some("sent_at".into()),
            pinned: None,
        };
        let errors = parse_csv(
            "export.csv",
            b"request_id,sent_at\nr1,-9223372036854775808\n",
            &c,
            0,
        )
        .unwrap_err();
        assert!(
            errors[0].starts_with("export.csv:2: `-9223372036854775808`"),
            "{errors:?}"
        );
    }

    #[test]
    fn malformed_csv_rows_are_located_all_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("export.csv");
        std::fs::write(
            &path,
            "request_id,sent_at,amount\n\
             r1,2026-11-25T12:00:01Z,10\n\
             ,2026-11-25T12:00:02Z,10\n\
             r3,yesterday,10\n\
             r4,2026-11-25T12:00:04Z\n\
             r5,2026-11-25T11:00:00Z,10\n",
        )
        .unwrap();
        let c = CsvFrom {
            path: path.clone(),
            key_column: "request_id".into(),
            time_column: Some("sent_at".into()),
            pinned: None,
        };
        let t = parse_time("2026-11-25T12:00:00Z").unwrap();
        let errors = read_csv(&path, &c, t).unwrap_err();
        assert_eq!(errors.len(), 3, "{errors:#?}");
        assert!(
            errors[0].ends_with(":3: empty `request_id`"),
            "{}",
            errors[0]
        );
        assert!(errors[1].contains(":4: `yesterday`"), "{}", errors[1]);
        assert!(errors[2].contains(":5:"), "{}", errors[2]);

        std::fs::write(
            &path,
            "request_id,sent_at\nr1,2026-11-25T12:00:01Z\nr5,2026-11-25 11:00:00\n",
        )
        .unwrap();
        let rows = read_csv(&path, &c, t).unwrap();
        assert_eq!(rows.len(), 1, "r5 is before T");
        assert_eq!(rows[0].0, "r1");
        let wrong = CsvFrom {
            key_column: "id".into(),
            ..c
        };
        assert!(read_csv(&path, &wrong, t).unwrap_err()[0].contains(":1: no column `id`"));
    }
}
