//! Caches: Redis keys that hold state from after T, invalidated before
//! traffic comes back. Targeted by default: flushing a namespace right
//! after a restore sends every reader to the database at once.
//!
//! Each `[[caches]]` entry gives one step per strategy it names:
//! - `cache-keys:<name>`: key templates (`case:{id}`) filled with the
//!   entities changed around T (see `rows::Entities`), unlinked in
//!   pipelined batches grouped by hash slot. Progress is journaled per
//!   batch: a resumed run goes on after the last batch done, so a key the
//!   application filled again since is not deleted a second time.
//! - `cache-patterns:<name>`: `SCAN MATCH … COUNT n` and `UNLINK` on every
//!   primary, `n` tuned so that no call stalls the server (capped by
//!   `scan-count`); the cursor of each primary is journaled as it goes.
//! - `cache-generation:<name>`: the namespace's version key, bumped once.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::rows::Entities;
use super::{
    pause_point, Effect, Env, Evidence, Nature, Phase, PlanCtx, Recorder, Step, StepError, StepKind,
};
use crate::cache::Redis;
use crate::reentry::check::Need;
use crate::reentry::plan::{step, PlannedStep};
use crate::reentry::playbook::{section, Interpolated, Meaning, Playbook, Seg};
use crate::reentry::schema::{opt, req, Field, Kind};
use crate::tls_files::TlsFiles;

/// Keys unlinked per pipeline (`batch-size`).
const BATCH: usize = 1000;
/// The largest `COUNT` a scan asks for unless `scan-count` says.
const SCAN_CAP: usize = 1000;
/// What one SCAN may cost the server before `COUNT` shrinks: the server
/// answers nobody else meanwhile, so a reader queued behind it waits this
/// long at most; a small fraction of a reader's usual p99.
const SCAN_TARGET: Duration = Duration::from_micros(50);
/// How often a scan's cursor is journaled (and at its end).
const JOURNAL_EVERY: Duration = Duration::from_millis(250);

section! {
    /// One `[[caches]]` table.
    pub struct Cache {
        pub name: String => req("name", Kind::Str),
        pub url: Interpolated => req("url", Kind::Interp),
        pub cluster: Option<bool> => opt("cluster", Kind::Bool),
        pub tls_ca: Option<std::path::PathBuf> => opt("tls-ca", Kind::Str),
        pub tls_certificate: Option<std::path::PathBuf> => opt("tls-certificate", Kind::Str),
        pub tls_key: Option<std::path::PathBuf> => opt("tls-key", Kind::Str),
        pub table: Option<String> => opt("table", Kind::Str),
        pub key: Option<Vec<String>> => opt("key", Kind::Strs),
        pub updated_at: Option<String> => opt("updated-at", Kind::Str),
        pub outboxes: Option<Vec<String>> => opt("outboxes", Kind::Strs),
        pub keys: Option<Vec<String>> => opt("keys", Kind::Strs),
        pub patterns: Option<Vec<String>> => opt("patterns", Kind::Strs),
        pub generation: Option<String> => opt("generation", Kind::Str),
        pub scan_count: Option<i64> => opt("scan-count", Kind::Int),
        pub batch_size: Option<i64> => opt("batch-size", Kind::Int),
    }
}

section! {
    /// Its top-level key.
    #[derive(Default)]
    pub struct Keys {
        #[serde(default)]
        pub caches: Vec<Cache> => opt("caches", Kind::Tables(Cache::FIELDS)),
    }
}

pub fn caches(p: &Playbook) -> Vec<Cache> {
    p.part::<Keys>(None).caches
}

fn at(i: usize, key: &'static str) -> Vec<Seg<'static>> {
    vec![Seg::Key("caches"), Seg::Index(i), Seg::Key(key)]
}

/// A key template's parts: text, and the key columns between braces
/// (`{{` and `}}` are braces themselves, for a Redis hash tag).
#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Column(String),
}

fn parse_template(t: &str) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut text = String::new();
    let mut chars = t.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                text.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                text.push('}');
            }
            '{' => {
                let mut name = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(c) => name.push(c),
                        None => {
                            return Err(format!(
                                "`{t}`: a `{{` is not closed (write `{{{{` for a brace)"
                            ))
                        }
                    }
                }
                if name.is_empty() {
                    return Err(format!("`{t}`: `{{}}` names no column"));
                }
                if !text.is_empty() {
                    parts.push(Part::Text(std::mem::take(&mut text)));
                }
                parts.push(Part::Column(name));
            }
            '}' => {
                return Err(format!(
                    "`{t}`: a `}}` closes nothing (write `}}}}` for a brace)"
                ))
            }
            c => text.push(c),
        }
    }
    if !text.is_empty() {
        parts.push(Part::Text(text));
    }
    if !parts.iter().any(|p| matches!(p, Part::Column(_))) {
        return Err(format!(
            "`{t}` names no key column: a template without one is a single key (use `patterns` or `generation`)"
        ));
    }
    Ok(parts)
}

/// Every template filled with every entity's key, once each, in hash-slot
/// order: a batch then holds whole slots, so that a cluster gets one
/// `UNLINK` of several keys per slot rather than one per key (a batch of
/// 1,000 keys spread over 16,384 slots would be 1,000 commands).
pub fn fill(
    templates: &[String],
    key: &[String],
    entities: &[Vec<String>],
) -> Result<Vec<String>, StepError> {
    let mut out = Vec::with_capacity(templates.len() * entities.len());
    for t in templates {
        let parts = parse_template(t).map_err(StepError::Config)?;
        let mut idx = Vec::new();
        for p in &parts {
            if let Part::Column(c) = p {
                let i = key.iter().position(|k| k == c).ok_or_else(|| {
                    StepError::Config(format!(
                        "key template `{t}` names `{{{c}}}`, which is not a column of the key ({})",
                        key.join(", ")
                    ))
                })?;
                idx.push(i);
            }
        }
        for e in entities {
            let mut s = String::new();
            let mut cols = idx.iter();
            for p in &parts {
                match p {
                    Part::Text(x) => s.push_str(x),
                    Part::Column(_) => {
                        let i = *cols.next().expect("one index per column");
                        s.push_str(e.get(i).map_or("", String::as_str));
                    }
                }
            }
            out.push(s);
        }
    }
    out.sort_by_cached_key(|k| (crate::cache::slot(k.as_bytes()), k.clone()));
    out.dedup();
    Ok(out)
}

/// Which Redis, as a step names it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Target {
    pub cache: String,
    pub url: Interpolated,
    #[serde(default)]
    pub cluster: bool,
    #[serde(default, skip_serializing_if = "TlsFiles::is_empty")]
    pub tls: TlsFiles,
}

impl Target {
    fn connect(&self) -> Result<Redis, StepError> {
        Ok(Redis::connect(
            self.url.expose(),
            &self.url.template,
            self.cluster,
            &self.tls,
        )?)
    }
}

/// `cache-keys:<name>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct KeysStep {
    #[serde(flatten)]
    pub target: Target,
    pub templates: Vec<String>,
    pub entities: Entities,
    pub batch_size: usize,
}

/// `cache-patterns:<name>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct PatternsStep {
    #[serde(flatten)]
    pub target: Target,
    pub patterns: Vec<String>,
    pub scan_count: usize,
}

/// `cache-generation:<name>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GenerationStep {
    #[serde(flatten)]
    pub target: Target,
    pub key: String,
}

/// What a keys step journals first: the keys it will unlink, by number
/// and digest, so that a resume knows it works on the same list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct KeysPrior {
    keys: u64,
    entities: u64,
    sha256: String,
}

/// Journaled after each batch: keys done (in sorted order) and unlinked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct KeysProgress {
    done: u64,
    unlinked: u64,
}

/// What a cache step did, or would do, for the report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CacheDetail {
    pub cache: String,
    pub strategy: String,
    /// Keys looked at: templates filled, or keys matched.
    pub candidates: u64,
    pub invalidated: u64,
    #[serde(default)]
    pub entities: u64,
    #[serde(default)]
    pub per_node: Vec<(String, u64)>,
}

/// A cache step's row in the report, from its effect's detail.
fn evidence(effect: &Effect) -> Option<Evidence> {
    let d: CacheDetail = serde_json::from_value(effect.detail.clone()).ok()?;
    Some(Evidence {
        section: "Caches".into(),
        columns: [
            "cache",
            "strategy",
            "changed entities",
            "candidates",
            "invalidated",
        ]
        .map(String::from)
        .to_vec(),
        row: vec![
            d.cache.clone(),
            d.strategy.clone(),
            d.entities.to_string(),
            d.candidates.to_string(),
            d.invalidated.to_string(),
        ],
        lines: d
            .per_node
            .iter()
            .map(|(n, k)| format!("{} {}: {k} key(s) on {n}", d.cache, d.strategy))
            .collect(),
    })
}

fn sha256_lines(keys: &[String]) -> String {
    crate::reentry::plan::sha256_hex(keys.join("\n").as_bytes())
}

impl KeysStep {
    fn keys(&self, env: &mut Env) -> Result<(u64, Vec<String>), StepError> {
        let found = self.entities.find(env, "current")?;
        let keys = fill(&self.templates, &found.key, &found.entities)?;
        Ok((found.entities.len() as u64, keys))
    }

    fn detail(&self, entities: u64, candidates: u64, invalidated: u64) -> CacheDetail {
        CacheDetail {
            cache: self.target.cache.clone(),
            strategy: "keys".into(),
            candidates,
            invalidated,
            entities,
            per_node: Vec::new(),
        }
    }
}

impl Step for KeysStep {
    fn nature(&self) -> Nature {
        Nature::Changes
    }

    fn evidence(&self, effect: &Effect) -> Option<Evidence> {
        evidence(effect)
    }

    fn preview(&self, env: &mut Env) -> Result<Effect, StepError> {
        let (entities, keys) = self.keys(env)?;
        let mut r = self.target.connect()?;
        let mut exist = 0;
        for chunk in keys.chunks(self.batch_size) {
            exist += r.exists(chunk)?;
        }
        Ok(Effect {
            summary: format!(
                "{exist} of {} key(s) exist in {} ({entities} changed entit{}): would unlink them",
                keys.len(),
                r.shown(),
                if entities == 1 { "y" } else { "ies" }
            ),
            count: exist,
            items: keys.iter().take(5).cloned().collect(),
            detail: super::detail(&self.detail(entities, keys.len() as u64, exist)),
        })
    }

    fn apply(&self, env: &mut Env, rec: &mut Recorder) -> Result<Effect, StepError> {
        let (entities, keys) = self.keys(env)?;
        let sha = sha256_lines(&keys);
        let prior: KeysPrior = rec.prior(|| {
            Ok(KeysPrior {
                keys: keys.len() as u64,
                entities,
                sha256: sha.clone(),
            })
        })?;
        let under = format!("{}#batch-", rec.step);
        let last = rec
            .priors_under::<KeysProgress>(&under)?
            .into_values()
            .max_by_key(|p| p.done);
        let (mut done, mut unlinked) = match last {
            Some(p) if prior.sha256 == sha => (p.done as usize, p.unlinked),
            Some(_) => {
                tracing::warn!(
                    step = rec.step,
                    "the keys to unlink changed since the run started; unlinking them all again"
                );
                (0, 0)
            }
            None => (0, 0),
        };
        let mut r = self.target.connect()?;
        let step_id = rec.step.to_owned();
        let mut first = true;
        while done < keys.len() {
            let end = (done + self.batch_size).min(keys.len());
            unlinked += r.unlink(&keys[done..end])?;
            done = end;
            rec.prior_keyed(
                &format!("{under}{done:012}"),
                &KeysProgress {
                    done: done as u64,
                    unlinked,
                },
            )?;
            if first {
                pause_point(&step_id, "batch");
                first = false;
            }
        }
        Ok(Effect {
            summary: format!(
                "unlinked {unlinked} of {} key(s) in {} ({entities} changed entit{})",
                keys.len(),
                r.shown(),
                if entities == 1 { "y" } else { "ies" }
            ),
            count: unlinked,
            items: keys.iter().take(5).cloned().collect(),
            detail: super::detail(&self.detail(entities, keys.len() as u64, unlinked)),
        })
    }
}

/// `COUNT` for the next scan: doubled while a call costs well under the
/// target, halved when one goes over it, within 10 and `cap`.
pub fn tune(count: usize, took: Duration, cap: usize) -> usize {
    if took < SCAN_TARGET / 2 {
        (count * 2).min(cap)
    } else if took > SCAN_TARGET * 2 {
        (count / 2).max(10)
    } else {
        count
    }
    .min(cap)
    .max(1)
}

/// One pattern scanned and unlinked on one primary, from `from`; `save`
/// is called with the progress to journal (now and then, and at the end).
pub fn scan_unlink(
    r: &mut Redis,
    node: usize,
    pattern: &str,
    cap: usize,
    from: ScanState,
    save: &mut dyn FnMut(&ScanState) -> Result<(), StepError>,
) -> Result<ScanState, StepError> {
    let mut s = from;
    let mut tuner = Tuner::new(r, node, cap)?;
    let mut saved = Instant::now();
    if !r.is_cluster() && !s.finished {
        // A single server: each round trip unlinks what the last scan
        // found and scans on. The journaled cursor is the one whose scan
        // found the keys not unlinked yet: a resume finds them again.
        let (mut next, mut pending) = r.scan(node, s.cursor, pattern, tuner.count)?;
        tuner.after_scan(r, node)?;
        while next != 0 {
            let (n, after, found) = r.unlink_then_scan(&pending, next, pattern, tuner.count)?;
            tuner.after_scan(r, node)?;
            s.unlinked += n;
            s.cursor = next;
            (next, pending) = (after, found);
            if saved.elapsed() >= JOURNAL_EVERY {
                save(&s)?;
                saved = Instant::now();
            }
        }
        s.unlinked += r.unlink_on(node, &pending)?;
        s.cursor = 0;
        s.finished = true;
        save(&s)?;
        return Ok(s);
    }
    while !s.finished {
        let (next, keys) = r.scan(node, s.cursor, pattern, tuner.count)?;
        s.unlinked += r.unlink_on(node, &keys)?;
        tuner.after_scan(r, node)?;
        s.cursor = next;
        s.finished = next == 0;
        if s.finished || saved.elapsed() >= JOURNAL_EVERY {
            save(&s)?;
            saved = Instant::now();
        }
    }
    Ok(s)
}

/// Tunes a scan's `COUNT` by what its calls cost the server: its own
/// count of microseconds in `SCAN` (`INFO commandstats`), read every
/// `TUNE_EVERY` calls, not the round trip, which also holds the time spent
/// queued behind readers: that would shrink `COUNT` exactly when the
/// server is busy serving others and the scan costs it least. Without
/// `INFO`, the round trip is what it has.
struct Tuner {
    count: usize,
    cap: usize,
    last: Option<(u64, u64)>,
    calls: u32,
    started: Instant,
}

const TUNE_EVERY: u32 = 32;

impl Tuner {
    fn new(r: &mut Redis, node: usize, cap: usize) -> Result<Tuner, StepError> {
        Ok(Tuner {
            count: cap.min(100),
            cap,
            last: r.scan_stats(node)?,
            calls: 0,
            started: Instant::now(),
        })
    }

    fn after_scan(&mut self, r: &mut Redis, node: usize) -> Result<(), StepError> {
        self.calls += 1;
        if self.calls < TUNE_EVERY {
            return Ok(());
        }
        let per_call = match self.last {
            Some((calls, usec)) => match r.scan_stats(node)? {
                Some((c, u)) if c > calls => {
                    self.last = Some((c, u));
                    Duration::from_micros((u - usec) / (c - calls))
                }
                now => {
                    self.last = now;
                    self.started.elapsed() / self.calls
                }
            },
            // No line yet (a server that had never run SCAN): look again.
            None => {
                self.last = r.scan_stats(node)?;
                self.started.elapsed() / self.calls
            }
        };
        self.count = tune(self.count, per_call, self.cap);
        self.calls = 0;
        self.started = Instant::now();
        Ok(())
    }
}

/// Where a scan of one primary is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ScanState {
    pub cursor: u64,
    pub unlinked: u64,
    pub finished: bool,
}

/// Counts the keys matching `pattern` on one primary, changing nothing.
pub fn scan_count(r: &mut Redis, node: usize, pattern: &str, cap: usize) -> Result<u64, StepError> {
    let (mut cursor, mut n) = (0u64, 0u64);
    let mut tuner = Tuner::new(r, node, cap)?;
    loop {
        let (next, keys) = r.scan(node, cursor, pattern, tuner.count)?;
        n += keys.len() as u64;
        tuner.after_scan(r, node)?;
        if next == 0 {
            return Ok(n);
        }
        cursor = next;
    }
}

impl Step for PatternsStep {
    fn nature(&self) -> Nature {
        Nature::Changes
    }

    fn evidence(&self, effect: &Effect) -> Option<Evidence> {
        evidence(effect)
    }

    fn preview(&self, _env: &mut Env) -> Result<Effect, StepError> {
        let mut r = self.target.connect()?;
        let nodes = r.primaries();
        let mut per_node = Vec::new();
        for (i, n) in nodes.iter().enumerate() {
            let mut k = 0;
            for p in &self.patterns {
                k += scan_count(&mut r, i, p, self.scan_count)?;
            }
            per_node.push((n.clone(), k));
        }
        let total: u64 = per_node.iter().map(|(_, k)| k).sum();
        Ok(Effect {
            summary: format!(
                "{total} key(s) match {} on {} primar{}: would unlink them",
                self.patterns.join(", "),
                nodes.len(),
                if nodes.len() == 1 { "y" } else { "ies" }
            ),
            count: total,
            items: Vec::new(),
            detail: super::detail(&CacheDetail {
                cache: self.target.cache.clone(),
                strategy: "patterns".into(),
                candidates: total,
                invalidated: total,
                entities: 0,
                per_node,
            }),
        })
    }

    fn apply(&self, _env: &mut Env, rec: &mut Recorder) -> Result<Effect, StepError> {
        let mut r = self.target.connect()?;
        let nodes = r.primaries();
        let step_id = rec.step.to_owned();
        let mut per_node: Vec<(String, u64)> = nodes.iter().map(|n| (n.clone(), 0)).collect();
        let mut paused = false;
        for (pi, pattern) in self.patterns.iter().enumerate() {
            for (ni, node) in nodes.iter().enumerate() {
                let under = format!("{step_id}#batch-{pi}@{node}#");
                // Journaled in order, numbered: the last is where it was.
                let journaled = rec.priors_under::<ScanState>(&under)?;
                let mut seq = journaled.len();
                let from = journaled.into_values().last().unwrap_or_default();
                let mut save = |s: &ScanState| -> Result<(), StepError> {
                    seq += 1;
                    rec.prior_keyed(&format!("{under}{seq:09}"), s)?;
                    if !paused {
                        pause_point(&step_id, "batch");
                        paused = true;
                    }
                    Ok(())
                };
                let s = scan_unlink(&mut r, ni, pattern, self.scan_count, from, &mut save)?;
                per_node[ni].1 += s.unlinked;
            }
        }
        let total: u64 = per_node.iter().map(|(_, k)| k).sum();
        Ok(Effect {
            summary: format!(
                "unlinked {total} key(s) matching {} on {} primar{}",
                self.patterns.join(", "),
                nodes.len(),
                if nodes.len() == 1 { "y" } else { "ies" }
            ),
            count: total,
            items: Vec::new(),
            detail: super::detail(&CacheDetail {
                cache: self.target.cache.clone(),
                strategy: "patterns".into(),
                candidates: total,
                invalidated: total,
                entities: 0,
                per_node,
            }),
        })
    }
}

/// The version key's value before the bump.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct GenerationPrior {
    value: Option<i64>,
}

impl GenerationStep {
    fn effect(&self, summary: String, invalidated: u64) -> Effect {
        Effect {
            summary,
            count: invalidated,
            items: vec![self.key.clone()],
            detail: super::detail(&CacheDetail {
                cache: self.target.cache.clone(),
                strategy: "generation".into(),
                candidates: 1,
                invalidated,
                entities: 0,
                per_node: Vec::new(),
            }),
        }
    }
}

impl Step for GenerationStep {
    fn nature(&self) -> Nature {
        Nature::Changes
    }

    fn evidence(&self, effect: &Effect) -> Option<Evidence> {
        evidence(effect)
    }

    fn preview(&self, _env: &mut Env) -> Result<Effect, StepError> {
        let mut r = self.target.connect()?;
        let v = r.get_int(&self.key)?.unwrap_or(0);
        Ok(self.effect(
            format!(
                "would bump {} from {v} to {} in {}",
                self.key,
                v + 1,
                r.shown()
            ),
            1,
        ))
    }

    /// Bumped once: only while the key still holds the value journaled
    /// before the bump. A resumed run that finds another value takes it
    /// as its own bump, made before the crash.
    fn apply(&self, _env: &mut Env, rec: &mut Recorder) -> Result<Effect, StepError> {
        let mut r = self.target.connect()?;
        let prior: GenerationPrior = rec.prior(|| {
            Ok(GenerationPrior {
                value: r.get_int(&self.key)?,
            })
        })?;
        let was = prior.value.unwrap_or(0);
        match r.incr_if(&self.key, prior.value)? {
            Some(v) => Ok(self.effect(
                format!("bumped {} from {was} to {v} in {}", self.key, r.shown()),
                1,
            )),
            None => {
                let now = r.get_int(&self.key)?.unwrap_or(0);
                Ok(self.effect(
                    format!(
                        "{} already bumped from {was} (now {now}) in {}",
                        self.key,
                        r.shown()
                    ),
                    1,
                ))
            }
        }
    }
}

fn plan(p: &Playbook, ctx: &PlanCtx) -> Vec<PlannedStep> {
    let mut out = Vec::new();
    for c in caches(p) {
        let target = Target {
            cache: c.name.clone(),
            url: c.url.clone(),
            tls: TlsFiles {
                ca: c.tls_ca.clone(),
                certificate: c.tls_certificate.clone(),
                key: c.tls_key.clone(),
            },
            cluster: c.cluster.unwrap_or(false),
        };
        if let (Some(templates), Some(table)) = (&c.keys, &c.table) {
            out.push(step(
                format!("cache-keys:{}", c.name),
                Phase::Reconcile,
                format!(
                    "unlink the keys of `{table}` entities changed around T from cache `{}`",
                    c.name
                ),
                super::Action::CacheKeys(KeysStep {
                    target: target.clone(),
                    templates: templates.clone(),
                    entities: Entities {
                        table: table.clone(),
                        key: c.key.clone().unwrap_or_default(),
                        updated_at: c.updated_at.clone(),
                        outboxes: c.outboxes.clone().unwrap_or_default(),
                        t_ms: ctx.t_ms,
                    },
                    batch_size: c.batch_size.map_or(BATCH, |b| b.max(1) as usize),
                }),
            ));
        }
        if let Some(patterns) = &c.patterns {
            out.push(step(
                format!("cache-patterns:{}", c.name),
                Phase::Reconcile,
                format!(
                    "unlink the keys matching {} from cache `{}`",
                    patterns.join(", "),
                    c.name
                ),
                super::Action::CachePatterns(PatternsStep {
                    target: target.clone(),
                    patterns: patterns.clone(),
                    scan_count: c.scan_count.map_or(SCAN_CAP, |n| n.max(1) as usize),
                }),
            ));
        }
        if let Some(key) = &c.generation {
            out.push(step(
                format!("cache-generation:{}", c.name),
                Phase::Reconcile,
                format!("bump `{key}`, the namespace version of cache `{}`", c.name),
                super::Action::CacheGeneration(GenerationStep {
                    target,
                    key: key.clone(),
                }),
            ));
        }
    }
    out
}

/// `updated-at` compares with T.
fn needs_time(p: &Playbook) -> bool {
    caches(p)
        .iter()
        .any(|c| c.keys.is_some() && c.updated_at.is_some())
}

fn meaning(m: &mut Meaning) {
    let cs = caches(m.p);
    let mut seen = std::collections::BTreeSet::new();
    for (i, c) in cs.iter().enumerate() {
        if !seen.insert(c.name.clone()) {
            m.error(&at(i, "name"), format!("a second cache named `{}`", c.name));
        }
        if let Some(key) = TlsFiles::unpaired(c.tls_certificate.is_some(), c.tls_key.is_some()) {
            m.error(&at(i, key), TlsFiles::UNPAIRED.into());
        }
        if c.keys.is_none() && c.patterns.is_none() && c.generation.is_none() {
            m.error(
                &at(i, "name"),
                format!(
                    "cache `{}` has no strategy: give `keys` (templates), `patterns` or `generation`",
                    c.name
                ),
            );
        }
        if let Some(ts) = &c.keys {
            if c.table.is_none() {
                m.error(
                    &at(i, "keys"),
                    "key templates are filled with changed entities: name their `table`".into(),
                );
            }
            if ts.is_empty() {
                m.error(&at(i, "keys"), "`keys` names no template".into());
            }
            for t in ts {
                match parse_template(t) {
                    Err(e) => m.error(&at(i, "keys"), e),
                    Ok(parts) => {
                        if let Some(key) = &c.key {
                            for p in parts {
                                if let Part::Column(col) = p {
                                    if !key.contains(&col) {
                                        m.error(
                                            &at(i, "keys"),
                                            format!(
                                                "`{t}` names `{{{col}}}`, which is not in `key` ({})",
                                                key.join(", ")
                                            ),
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        if c.patterns.as_ref().is_some_and(Vec::is_empty) {
            m.error(&at(i, "patterns"), "`patterns` names no pattern".into());
        }
        Entities::check_outboxes(m, &at(i, "outboxes"), c.outboxes.as_ref());
        if c.scan_count.is_some_and(|n| n < 1) {
            m.error(
                &at(i, "scan-count"),
                "`scan-count` must be at least 1".into(),
            );
        }
        if c.batch_size.is_some_and(|n| n < 1) {
            m.error(
                &at(i, "batch-size"),
                "`batch-size` must be at least 1".into(),
            );
        }
        if c.table.is_some() && c.keys.is_none() {
            m.error(
                &at(i, "table"),
                "`table` is for key templates: add `keys`, or leave `table` out".into(),
            );
        }
    }
}

/// The entity table, on current, with its key and `updated-at`.
fn needs(p: &Playbook) -> Vec<Need<'_>> {
    caches(p)
        .into_iter()
        .enumerate()
        .filter_map(|(i, c)| {
            let table = c.table.clone()?;
            Some(Need {
                database: "current",
                columns: c
                    .key
                    .iter()
                    .flatten()
                    .cloned()
                    .chain(c.updated_at.clone())
                    .collect(),
                path: at(i, "table"),
                what: format!("cache `{}` entity table `{table}`", c.name),
                table,
            })
        })
        .collect()
}

pub const KIND: StepKind = StepKind {
    online: super::no_online,
    meaning,
    steps: plan,
    needs_time,
    notes: super::no_notes,
    needs,
    queries: super::no_queries,
    keys: &[(None, Keys::FIELDS)],
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_are_filled_with_each_key_column() {
        let key = vec!["tenant".to_owned(), "id".to_owned()];
        let ents = vec![
            vec!["a".to_owned(), "1".to_owned()],
            vec!["b".to_owned(), "2".to_owned()],
        ];
        let got = fill(
            &["case:{{{tenant}}}:{id}".to_owned(), "sum:{id}".to_owned()],
            &key,
            &ents,
        )
        .unwrap();
        let mut sorted = got.clone();
        sorted.sort();
        assert_eq!(sorted, ["case:{a}:1", "case:{b}:2", "sum:1", "sum:2"]);
        let e = fill(&["case:{nope}".to_owned()], &key, &ents).unwrap_err();
        assert!(e.to_string().contains("`{nope}`"), "{e}");
    }

    #[test]
    fn filled_keys_come_in_slot_order_so_a_batch_holds_whole_slots() {
        let key = vec!["tenant".to_owned(), "id".to_owned()];
        let ents: Vec<Vec<String>> = (0..40)
            .map(|i| vec![["a", "b", "c"][i % 3].to_owned(), i.to_string()])
            .collect();
        // Untagged keys hash whole: key order is not slot order for them.
        let got = fill(&["sum:{id}".to_owned()], &key, &ents).unwrap();
        let slots: Vec<u16> = got
            .iter()
            .map(|k| crate::cache::slot(k.as_bytes()))
            .collect();
        assert!(slots.windows(2).all(|w| w[0] <= w[1]), "{got:?}");
        let got = fill(&["case:{{{tenant}}}:{id}".to_owned()], &key, &ents).unwrap();
        assert_eq!(got.len(), 40);
        let slots: Vec<u16> = got
            .iter()
            .map(|k| crate::cache::slot(k.as_bytes()))
            .collect();
        assert!(slots.windows(2).all(|w| w[0] <= w[1]), "{got:?}");
        // One run per tenant's hash tag: three slots, each contiguous.
        let mut runs = slots.clone();
        runs.dedup();
        assert_eq!(runs.len(), 3, "{got:?}");
    }

    #[test]
    fn a_bad_template_is_refused_with_what_is_wrong() {
        assert!(parse_template("case:{id")
            .unwrap_err()
            .contains("not closed"));
        assert!(parse_template("case:id}")
            .unwrap_err()
            .contains("closes nothing"));
        assert!(parse_template("case:all")
            .unwrap_err()
            .contains("names no key column"));
        assert!(parse_template("case:{}")
            .unwrap_err()
            .contains("names no column"));
    }

    #[test]
    fn scan_count_grows_while_calls_are_quick_and_shrinks_when_slow() {
        assert_eq!(tune(100, Duration::from_micros(10), 1000), 200);
        assert_eq!(tune(800, Duration::from_micros(10), 1000), 1000);
        assert_eq!(tune(400, Duration::from_millis(5), 1000), 200);
        assert_eq!(tune(12, Duration::from_millis(5), 1000), 10);
        assert_eq!(tune(300, SCAN_TARGET, 1000), 300);
    }
}
