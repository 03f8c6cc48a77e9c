//! Outbox ↔ topic. After a restore to T the topic is ahead of the outbox.
//! Every event around T falls in one class:
//!
//! - in the topic, unpublished in the restored outbox: **mark published**
//!   (from the message's timestamp), else the relay sends a duplicate;
//! - in the topic, not in the restored database: an **orphan** (consumers
//!   saw a change the database lost), staged in `reentry.orphan_event`, and
//!   optionally answered with a compensating event from a template;
//! - published in the restored outbox, absent from the topic: **mark
//!   unpublished**, so the relay sends it again;
//! - unpublished and absent: **pending**, sent once the relay's gate opens;
//! - published, absent, and timed before the first message retention left
//!   in the topic: **gone from the topic**. Its message was most likely
//!   delivered and then deleted, so it is reported and left published:
//!   sending it again would hand consumers an old event twice.
//!
//! The topic is scanned from `T - lookback` into an external sort by event
//! id and merged with the outbox streamed in the same order, so neither side
//! has to fit in memory. Rows created before `T - lookback + skew` count as
//! settled: their messages may predate the scan.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, BuildHasherDefault};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{
    duration_ms, Effect, Env, Nature, OnDatabase, PinErrors, Pinned, PlanCtx, Recorder, Step,
    StepError, StepKind,
};
use crate::kafka::scan::{self, Id, IdFrom, ScanOptions, ScanStats, Seen};
use crate::pg::conn::Db;
use crate::reentry::check::Need;
use crate::reentry::check::{quote_qualified, Column};
use crate::reentry::plan::{step, PlannedStep};
use crate::reentry::playbook::section;
use crate::reentry::playbook::Playbook;
use crate::reentry::playbook::{Meaning, Seg};
use crate::reentry::schema::{opt, req, Field, Kind};
use crate::reentry::steps::Phase;

// ---- Its playbook section: one typed model; its keys and checks come from it.

pub const OUTBOX_FLAVOURS: &[&str] = &["generic", "spring-modulith", "gruelbox", "debezium"];

section! {
    pub struct OutboxColumns {
        pub id: Option<String> => opt("id", Kind::Str),
        pub topic: Option<String> => opt("topic", Kind::Str),
        pub key: Option<String> => opt("key", Kind::Str),
        pub payload: Option<String> => opt("payload", Kind::Str),
        pub created_at: Option<String> => opt("created-at", Kind::Str),
        pub published_at: Option<String> => opt("published-at", Kind::Str),
    }
}

section! {
    pub struct EventId {
        pub header: Option<String> => opt("header", Kind::Str),
        pub key: Option<bool> => opt("key", Kind::Bool),
        pub json_pointer: Option<String> => opt("json-pointer", Kind::Str),
    }
}

section! {
    pub struct Outbox {
        pub name: String => req("name", Kind::Str),
        pub database: String => req("database", Kind::Str),
        pub flavour: String => req("flavour", Kind::OneOf(OUTBOX_FLAVOURS)),
        pub table: Option<String> => opt("table", Kind::Str),
        pub topic: String => req("topic", Kind::Str),
        pub columns: Option<OutboxColumns> => opt("columns", Kind::Table(OutboxColumns::FIELDS)),
        pub event_id: Option<EventId> => opt("event-id", Kind::Table(EventId::FIELDS)),
        pub gate: Option<String> => opt("gate", Kind::Str),
        pub compensation_template: Option<String> => opt("compensation-template", Kind::Str),
    }
}

/// Clock skew allowed between the database and the broker.
pub const SKEW_MS: i64 = 60_000;

/// How an outbox records that a row was published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Published {
    /// A timestamp column, NULL until published (generic, Spring Modulith).
    At(String),
    /// A boolean column (gruelbox `processed`).
    Flag(String),
    /// Nowhere but the topic (Debezium's outbox router reads the WAL).
    InTopicOnly,
}

/// The outbox's table and columns, from its flavour and the playbook.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Layout {
    pub table: String,
    pub id: String,
    pub created_at: Option<String>,
    pub published: Published,
}

impl Layout {
    /// The flavour's defaults, with the playbook's `table` and `columns` over them.
    pub fn of(o: &crate::reentry::playbook::Outbox) -> Layout {
        let c = o.columns.as_ref();
        let col = |pick: fn(&crate::reentry::playbook::OutboxColumns) -> &Option<String>,
                   default: &str| {
            c.and_then(|c| pick(c).clone())
                .unwrap_or_else(|| default.to_owned())
        };
        let (table, id, created, published) = match o.flavour.as_str() {
            "spring-modulith" => (
                "event_publication",
                col(|c| &c.id, "id"),
                Some(col(|c| &c.created_at, "publication_date")),
                Published::At(col(|c| &c.published_at, "completion_date")),
            ),
            // gruelbox's TXNO_OUTBOX, folded to lower case by PostgreSQL.
            "gruelbox" => (
                "txno_outbox",
                col(|c| &c.id, "id"),
                c.and_then(|c| c.created_at.clone()),
                Published::Flag(col(|c| &c.published_at, "processed")),
            ),
            "debezium" => (
                "outbox",
                col(|c| &c.id, "id"),
                c.and_then(|c| c.created_at.clone()),
                Published::InTopicOnly,
            ),
            _ => (
                "outbox",
                col(|c| &c.id, "id"),
                Some(col(|c| &c.created_at, "created_at")),
                Published::At(col(|c| &c.published_at, "published_at")),
            ),
        };
        Layout {
            table: o.table.clone().unwrap_or_else(|| table.to_owned()),
            id,
            created_at: created,
            published,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Reconcile {
    pub outbox: String,
    pub database: String,
    pub topic: String,
    pub layout: Layout,
    pub id_from: IdFrom,
    /// T, and where the scan starts (T - lookback), in ms since the epoch.
    pub t_ms: i64,
    pub from_ms: i64,
    pub watch_seconds: f64,
    /// The compensating event's template, pinned (content and sha256)
    /// when the plan is made. A plan an older build wrote names only its
    /// path (`compensation-template`): read then, unpinned, as it was.
    #[serde(
        default,
        alias = "compensation-template",
        deserialize_with = "super::pinned_or_path"
    )]
    pub compensation: Option<Pinned>,
}

/// What the outbox step is about to change, journaled before it does:
/// rows to mark published (id, message time), orphans (id, partition,
/// offset), rows to mark unpublished.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Prior {
    mark_published: Vec<(String, i64)>,
    orphans: Vec<(String, i32, i64)>,
    mark_unpublished: Vec<String>,
}

/// The placeholders a compensation template may use.
const PLACEHOLDERS: &[&str] = &[
    "event_id",
    "key",
    "topic",
    "partition",
    "offset",
    "timestamp",
];

/// What is wrong with a template: placeholders it does not know, and, for a
/// `.json` template, JSON that a filled-in copy would not be.
fn check_template(path: &str, text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("{{") {
        let after = &rest[i + 2..];
        let Some(end) = after.find("}}") else {
            out.push(format!("{path}: a `{{{{` is never closed"));
            break;
        };
        let name = after[..end].trim();
        if !PLACEHOLDERS.contains(&name) {
            out.push(format!(
                "{path}: unknown placeholder {{{{{name}}}}}; known: {}",
                PLACEHOLDERS
                    .iter()
                    .map(|p| format!("{{{{{p}}}}}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
        }
        rest = &after[end + 2..];
    }
    if out.is_empty() && is_json(path) {
        let sample = Seen {
            id: Id::from("00000000-0000-0000-0000-000000000000"),
            partition: 0,
            offset: 0,
            ts: 0,
        };
        if let Err(e) =
            serde_json::from_str::<serde_json::Value>(&fill(text, true, &sample, "key", "topic"))
        {
            out.push(format!("{path}: not JSON once filled in: {e}"));
        }
    }
    out
}

/// The classes, with what the actions need.
#[derive(Debug, Default)]
pub struct Classes {
    pub mark_published: Vec<(String, i64)>,
    pub orphans: Vec<Seen>,
    /// Orphans already staged by an earlier run.
    pub staged_before: u64,
    pub mark_unpublished: Vec<String>,
    /// Published rows whose message is absent, timed where retention
    /// removed messages before the scan: reported, not changed.
    pub gone: Vec<String>,
    pub pending: u64,
    pub in_sync: u64,
    /// Messages whose event id the topic holds more than once.
    pub duplicates: u64,
    pub scan: ScanStats,
    /// Reading the outbox and joining it with the scan.
    pub database_seconds: f64,
    /// Rows in the window whose id is NULL: not reconciled.
    pub without_id: u64,
}

/// What an outbox step journals as its effect's detail: the classes'
/// sizes, and what apply did with them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Detail {
    pub mark_published: usize,
    pub orphans: usize,
    pub orphans_staged_before: u64,
    pub mark_unpublished: usize,
    /// Published rows whose message retention may have removed.
    #[serde(default)]
    pub gone_from_topic: usize,
    pub pending: u64,
    pub in_sync: u64,
    pub duplicates_in_topic: u64,
    pub scan: ScanStats,
    pub database_seconds: f64,
    /// Rows whose id is NULL, which no event can match.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub without_id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied: Option<Applied>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Applied {
    pub marked_published: u64,
    pub staged_orphans: u64,
    pub compensated: u64,
    pub marked_unpublished: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Classes {
    pub fn changes(&self) -> u64 {
        (self.mark_published.len() + self.orphans.len() + self.mark_unpublished.len()) as u64
    }

    pub fn detail(&self) -> Detail {
        Detail {
            mark_published: self.mark_published.len(),
            orphans: self.orphans.len(),
            orphans_staged_before: self.staged_before,
            mark_unpublished: self.mark_unpublished.len(),
            gone_from_topic: self.gone.len(),
            pending: self.pending,
            in_sync: self.in_sync,
            duplicates_in_topic: self.duplicates,
            scan: self.scan.clone(),
            database_seconds: self.database_seconds,
            without_id: self.without_id,
            applied: None,
        }
    }

    fn items(&self) -> Vec<String> {
        let mut out = Vec::new();
        out.extend(
            self.mark_published
                .iter()
                .take(10)
                .map(|(id, _)| format!("publish {id}")),
        );
        out.extend(
            self.orphans
                .iter()
                .take(10)
                .map(|s| format!("orphan {} ({}/{})", s.id, s.partition, s.offset)),
        );
        out.extend(
            self.mark_unpublished
                .iter()
                .take(10)
                .map(|id| format!("unpublish {id}")),
        );
        out.extend(
            self.gone
                .iter()
                .take(10)
                .map(|id| format!("gone from the topic {id}")),
        );
        out
    }

    pub fn summary(&self, r: &Reconcile) -> String {
        let gone = match (self.gone.len(), self.scan.gone_before_ms) {
            (0, _) | (_, None) => String::new(),
            (n, Some(h)) => format!(
                ", {n} gone from the topic (published before {}, where retention removed messages; left published)",
                jiff::Timestamp::from_millisecond(h).map_or_else(|_| h.to_string(), crate::time::utc_millis)
            ),
        };
        let without_id = match self.without_id {
            0 => String::new(),
            n => format!(", {n} row(s) without an id (not reconciled)"),
        };
        format!(
            "outbox `{}` ↔ {}: {} to mark published, {} orphan(s), {} to mark unpublished, {} pending, {} in sync{gone}{without_id} ({} events scanned)",
            r.outbox,
            r.topic,
            self.mark_published.len(),
            self.orphans.len(),
            self.mark_unpublished.len(),
            self.pending,
            self.in_sync,
            self.scan.messages
        )
    }
}

struct Row {
    /// Binary when the column is a uuid (no text conversion on the
    /// server, no string on the client), text otherwise.
    id: Id,
    published: Mark,
}

/// The outbox as buffered while the topic is scanned: a uuid row in 24
/// bytes (its bits and its mark), where a `Row` takes 32.
enum Rows {
    Uuid(Vec<([u64; 2], Mark)>),
    Text(Vec<Row>),
}

impl Rows {
    fn len(&self) -> usize {
        match self {
            Rows::Uuid(v) => v.len(),
            Rows::Text(v) => v.len(),
        }
    }

    fn push(&mut self, row: Row) {
        match (self, row.id.uuid()) {
            (Rows::Uuid(v), Some(u)) => v.push(([(u >> 64) as u64, u as u64], row.published)),
            (Rows::Text(v), _) => v.push(row),
            (Rows::Uuid(_), None) => unreachable!("a uuid column reads as uuids"),
        }
    }

    /// Row `i`'s join key.
    fn key(&self, i: usize, uuid: bool) -> Key<'_> {
        match self {
            Rows::Uuid(v) => {
                let [hi, lo] = v[i].0;
                Key::U((u128::from(hi) << 64) | u128::from(lo))
            }
            Rows::Text(v) => key_of(&v[i].id, uuid),
        }
    }

    fn mark(&self, i: usize) -> Mark {
        match self {
            Rows::Uuid(v) => v[i].1,
            Rows::Text(v) => v[i].published,
        }
    }

    fn for_each(self, mut f: impl FnMut(Row)) {
        match self {
            // Read in place: consuming the vector (`into_iter().for_each`)
            // made the join's probe 2.5 times slower in bench/outbox.
            Rows::Uuid(v) => {
                for &([hi, lo], published) in &v {
                    f(Row {
                        id: Id::from_uuid((u128::from(hi) << 64) | u128::from(lo)),
                        published,
                    })
                }
            }
            Rows::Text(v) => v.into_iter().for_each(f),
        }
    }
}

/// Whether a row is published, and when if the outbox says: 8 bytes, where
/// a bool and an `Option<i64>` take 24 (the outbox is buffered whole
/// while the topic is scanned).
#[derive(Clone, Copy)]
struct Mark(i64);

impl Mark {
    const UNPUBLISHED: i64 = i64::MIN;
    const NO_TIME: i64 = i64::MIN + 1;

    fn new(published: bool, ms: Option<i64>) -> Mark {
        match (published, ms) {
            (false, _) => Mark(Mark::UNPUBLISHED),
            (true, None) => Mark(Mark::NO_TIME),
            // Milliseconds that far back are no timestamp PostgreSQL keeps.
            (true, Some(ms)) => Mark(ms.max(Mark::NO_TIME + 1)),
        }
    }

    fn published(self) -> bool {
        self.0 != Mark::UNPUBLISHED
    }

    fn ms(self) -> Option<i64> {
        (self.0 > Mark::NO_TIME).then_some(self.0)
    }
}

/// The join key: a uuid as its 128 bits when the outbox id column is a
/// uuid, the id's text otherwise.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Key<'a> {
    U(u128),
    S(&'a str),
}

fn key_of(id: &Id, uuid: bool) -> Key<'_> {
    if let Some(u) = id.uuid() {
        return Key::U(u);
    }
    let t = id.text().expect("an id is a uuid or text");
    match uuid.then(|| parse_uuid(t)).flatten() {
        Some(u) => Key::U(u),
        None => Key::S(t),
    }
}

/// `8-4-4-4-12` hex digits, either case, or 32 hex digits.
fn parse_uuid(s: &str) -> Option<u128> {
    let b = s.as_bytes();
    let dashed = match b.len() {
        36 => {
            if b[8] != b'-' || b[13] != b'-' || b[18] != b'-' || b[23] != b'-' {
                return None;
            }
            true
        }
        32 => false,
        _ => return None,
    };
    let mut v: u128 = 0;
    for (i, &c) in b.iter().enumerate() {
        if dashed && (i == 8 || i == 13 || i == 18 || i == 23) {
            continue;
        }
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => return None,
        };
        v = (v << 4) | u128::from(d);
    }
    Some(v)
}

/// A uuid column, in binary.
struct UuidBits(u128);

impl<'a> tokio_postgres::types::FromSql<'a> for UuidBits {
    fn from_sql(
        _: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(UuidBits(u128::from_be_bytes(raw.try_into()?)))
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        *ty == tokio_postgres::types::Type::UUID
    }
}

/// A timestamp or timestamptz column, in binary, as ms since the epoch.
struct Millis(i64);

impl<'a> tokio_postgres::types::FromSql<'a> for Millis {
    fn from_sql(
        _: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        // Microseconds since 2000-01-01.
        let us = i64::from_be_bytes(raw.try_into()?);
        Ok(Millis(us.div_euclid(1000).saturating_add(946_684_800_000)))
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        use tokio_postgres::types::Type;
        *ty == Type::TIMESTAMPTZ || *ty == Type::TIMESTAMP
    }
}

/// The Fx hash (as in rustc): event ids are not chosen by an attacker, and
/// a million lookups in SipHash cost a third of the join.
#[derive(Default)]
struct Fx(u64);

impl std::hash::Hasher for Fx {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let v = u64::from_le_bytes(c.try_into().expect("8 bytes"));
            self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x517c_c1b7_2722_0a95);
        }
        for b in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ u64::from(*b)).wrapping_mul(0x517c_c1b7_2722_0a95);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// The outbox, read whole while the topic is scanned and indexed by key:
/// each event is probed as it arrives, so that once the scan ends only the
/// rows no event matched are left to classify.
struct Probe {
    rows: Rows,
    /// Row indices, hashed by key: 4 bytes a slot. A key several rows
    /// share (an id column without a unique constraint) indexes its first.
    index: hashbrown::HashTable<u32>,
    /// The later rows of a shared key, each with the row that holds it.
    shared: std::collections::HashMap<u32, u32>,
    /// The rows that hold a shared key.
    holders: std::collections::HashSet<u32>,
    uuid: bool,
    compare_ms: i64,
    hit: Vec<bool>,
    /// The earliest event of each matched key that an unpublished row (or
    /// a shared key) needs: the time `mark-published` reports.
    earliest: std::collections::HashMap<u32, i64>,
    /// Events no row matched, one per key (the earliest), in arrival
    /// order: orphan candidates.
    unmatched: Vec<Seen>,
    unmatched_index: hashbrown::HashTable<u32>,
    duplicates: u64,
}

/// Whether `a` is an earlier message than `b`: by time, then position.
fn earlier(a: &Seen, b: &Seen) -> bool {
    (a.ts, a.partition, a.offset) < (b.ts, b.partition, b.offset)
}

impl Probe {
    fn new(rows: Rows, uuid: bool, compare_ms: i64) -> Probe {
        let hasher = BuildHasherDefault::<Fx>::default();
        let mut index = hashbrown::HashTable::<u32>::with_capacity(rows.len());
        let mut shared = std::collections::HashMap::new();
        for i in 0..rows.len() as u32 {
            let k = rows.key(i as usize, uuid);
            let h = hasher.hash_one(k);
            match index.find(h, |j| rows.key(*j as usize, uuid) == k) {
                Some(&first) => {
                    shared.insert(i, first);
                }
                None => {
                    index.insert_unique(h, i, |j| hasher.hash_one(rows.key(*j as usize, uuid)));
                }
            }
        }
        let n = rows.len();
        let holders = shared.values().copied().collect();
        Probe {
            rows,
            index,
            shared,
            holders,
            uuid,
            compare_ms,
            hit: vec![false; n],
            earliest: std::collections::HashMap::new(),
            unmatched: Vec::new(),
            unmatched_index: hashbrown::HashTable::new(),
            duplicates: 0,
        }
    }

    fn probe(&mut self, e: Seen) {
        if e.ts < self.compare_ms {
            return;
        }
        let hasher = BuildHasherDefault::<Fx>::default();
        let (rows, uuid) = (&self.rows, self.uuid);
        let k = key_of(&e.id, uuid);
        let h = hasher.hash_one(k);
        match self.index.find(h, |j| rows.key(*j as usize, uuid) == k) {
            Some(&i) => {
                if std::mem::replace(&mut self.hit[i as usize], true) {
                    self.duplicates += 1;
                }
                // A shared key's later rows may be unpublished though its
                // first is not: they need the time too.
                let shared = self.holders.contains(&i);
                if !rows.mark(i as usize).published() || shared {
                    let t = self.earliest.entry(i).or_insert(e.ts);
                    *t = (*t).min(e.ts);
                }
            }
            None => {
                let seen = &mut self.unmatched;
                let at = self
                    .unmatched_index
                    .find(h, |j| key_of(&seen[*j as usize].id, uuid) == k)
                    .copied();
                match at {
                    Some(j) => {
                        self.duplicates += 1;
                        if earlier(&e, &seen[j as usize]) {
                            seen[j as usize] = e;
                        }
                    }
                    None => {
                        seen.push(e);
                        let j = (seen.len() - 1) as u32;
                        self.unmatched_index.insert_unique(h, j, |j| {
                            hasher.hash_one(key_of(&seen[*j as usize].id, uuid))
                        });
                    }
                }
            }
        }
    }

    /// Classifies every row, and returns the events no row matched, one per
    /// key (the earliest), in id order.
    fn finish(self, l: &Layout, c: &mut Classes) -> Vec<Seen> {
        let Probe {
            rows,
            shared,
            hit,
            earliest,
            unmatched: mut candidates,
            duplicates,
            compare_ms,
            ..
        } = self;
        let mut i = 0u32;
        rows.for_each(|row| {
            let holder = shared.get(&i).copied().unwrap_or(i);
            if hit[holder as usize] {
                let ts = earliest.get(&holder).copied().unwrap_or(compare_ms);
                matched(row, ts, l, c);
            } else {
                unmatched(row, l, compare_ms, c);
            }
            i += 1;
        });
        c.duplicates += duplicates;
        candidates.sort_unstable();
        candidates
    }
}

/// The scan's sink for the outbox join: events wait in a sorter until the
/// outbox reader hands over its index, and are probed from then on. When
/// the outbox is too large to hold, they stay in the sorter for the merge.
struct Streaming<'s> {
    reader: Option<Reader<'s>>,
    probe: Option<Probe>,
    /// The reader's outcome when it was not an index: too large, or an error.
    outcome: Option<Result<(), StepError>>,
    sorter: scan::Sorter,
    chunk: usize,
}

/// The outbox reader: its rows indexed, `None` when they did not fit.
type Reader<'s> = std::thread::ScopedJoinHandle<'s, Result<Option<Probe>, StepError>>;

impl<'s> Streaming<'s> {
    fn new(reader: Reader<'s>, chunk: usize) -> Self {
        Streaming {
            reader: Some(reader),
            probe: None,
            outcome: None,
            sorter: scan::Sorter::new(chunk),
            chunk,
        }
    }

    /// Takes the reader's result once it has one (`wait`: block for it).
    fn collect(&mut self, wait: bool) -> std::io::Result<()> {
        if !self
            .reader
            .as_ref()
            .is_some_and(|r| wait || r.is_finished())
        {
            return Ok(());
        }
        let r = self.reader.take().expect("checked above");
        match r.join().expect("the outbox reader does not panic") {
            Ok(Some(mut probe)) => {
                // The events that came first, probed now.
                let waiting = std::mem::replace(&mut self.sorter, scan::Sorter::new(self.chunk));
                match waiting.finish()?.into_memory() {
                    Ok(events) => events.into_iter().for_each(|e| probe.probe(e)),
                    Err(spilled) => {
                        for e in *spilled {
                            probe.probe(e?);
                        }
                    }
                }
                self.probe = Some(probe);
            }
            Ok(None) => self.outcome = Some(Ok(())),
            Err(e) => self.outcome = Some(Err(e)),
        }
        Ok(())
    }
}

impl scan::Sink for Streaming<'_> {
    /// Room for every event at once, as the sorter alone would make: a
    /// vector that doubles as it fills copies itself, and held both copies
    /// at once (12 MiB more at the peak in bench/outbox). Pages never
    /// written, once the outbox is indexed, cost no memory.
    fn expect(&mut self, n: usize) {
        self.sorter.reserve(n);
    }

    fn take(&mut self, events: Vec<Seen>) -> std::io::Result<()> {
        self.collect(false)?;
        match &mut self.probe {
            Some(p) => events.into_iter().for_each(|e| p.probe(e)),
            None => self.sorter.extend(events)?,
        }
        Ok(())
    }
}

/// How the outbox is read again when it was too large to hold.
struct Streamed<'a> {
    select: &'a str,
    /// The id column, quoted.
    id: &'a str,
    compare_ms: i64,
    uuid: bool,
    row_of: &'a dyn Fn(&tokio_postgres::Row) -> Row,
}

/// The join when the outbox did not fit in memory: the outbox streamed
/// again, against the scan's events hashed when they fit, else merged with
/// them in id order. Returns the events no row matched, in id order.
fn join_streamed(
    db: &mut Db,
    sorted: scan::Sorted,
    q: &Streamed,
    l: &Layout,
    c: &mut Classes,
) -> Result<Vec<Seen>, StepError> {
    let (uuid, compare_ms, row_of) = (q.uuid, q.compare_ms, q.row_of);
    match sorted.into_memory() {
        // The scan fits in memory: a hash join, in whatever order the
        // database sends the rows.
        Ok(events) => {
            // Indices into the events, hashed by key: 4 bytes a slot,
            // where a HashMap<Key, usize> takes 48.
            let hasher = BuildHasherDefault::<Fx>::default();
            let key = |i: u32| key_of(&events[i as usize].id, uuid);
            let mut index = hashbrown::HashTable::<u32>::with_capacity(events.len());
            for (i, e) in events
                .iter()
                .enumerate()
                .filter(|(_, e)| e.ts >= compare_ms)
            {
                let k = key_of(&e.id, uuid);
                let entry = index.entry(
                    hasher.hash_one(k),
                    |j| key(*j) == k,
                    |j| hasher.hash_one(key(*j)),
                );
                match entry {
                    hashbrown::hash_table::Entry::Occupied(mut o) => {
                        c.duplicates += 1;
                        if e.ts < events[*o.get() as usize].ts {
                            *o.get_mut() = i as u32;
                        }
                    }
                    hashbrown::hash_table::Entry::Vacant(v) => {
                        v.insert(i as u32);
                    }
                }
            }
            let mut hit = vec![false; events.len()];
            db.stream_rows(
                "read the outbox",
                q.select,
                &[&compare_ms],
                10_000,
                |rows| -> Result<(), StepError> {
                    for r in rows {
                        let row = row_of(r);
                        let k = key_of(&row.id, uuid);
                        match index.find(hasher.hash_one(k), |j| key(*j) == k) {
                            Some(&i) => {
                                let i = i as usize;
                                hit[i] = true;
                                matched(row, events[i].ts, l, c);
                            }
                            None => unmatched(row, l, compare_ms, c),
                        }
                    }
                    Ok(())
                },
            )?;
            let mut left: Vec<Seen> = index
                .iter()
                .filter(|i| !hit[**i as usize])
                .map(|i| events[*i as usize].clone())
                .collect();
            left.sort_unstable();
            Ok(left)
        }
        // It spilled: merge it with the outbox streamed in the same order.
        Err(sorted) => {
            let io = |source: std::io::Error| StepError::Io {
                what: "read the sorted scan back",
                source,
            };
            let mut ks = sorted
                .filter(|e| e.as_ref().map_or(true, |s| s.ts >= compare_ms))
                .peekable();
            let mut candidates = Vec::new();
            // Takes every message with this id; the first is the one that counts.
            fn take_same(
                it: &mut std::iter::Peekable<impl Iterator<Item = std::io::Result<Seen>>>,
                first: Seen,
                dups: &mut u64,
            ) -> Seen {
                while let Some(Ok(next)) = it.peek() {
                    if next.id != first.id {
                        break;
                    }
                    *dups += 1;
                    it.next();
                }
                first
            }
            let ordered = format!("{} ORDER BY {}::text COLLATE \"C\"", q.select, q.id);
            db.stream_rows(
                "read the outbox",
                &ordered,
                &[&compare_ms],
                10_000,
                |rows| -> Result<(), StepError> {
                    'rows: for r in rows {
                        let row = row_of(r);
                        loop {
                            match ks.peek() {
                                Some(Err(_)) => {
                                    return Err(io(ks
                                        .next()
                                        .expect("peeked")
                                        .expect_err("an error")))
                                }
                                Some(Ok(s)) if s.id < row.id => {
                                    let s = ks.next().expect("peeked").map_err(io)?;
                                    candidates.push(take_same(&mut ks, s, &mut c.duplicates));
                                }
                                Some(Ok(s)) if s.id == row.id => {
                                    let s = ks.next().expect("peeked").map_err(io)?;
                                    let s = take_same(&mut ks, s, &mut c.duplicates);
                                    matched(row, s.ts, l, c);
                                    continue 'rows;
                                }
                                _ => break,
                            }
                        }
                        unmatched(row, l, compare_ms, c);
                    }
                    Ok(())
                },
            )?;
            while let Some(s) = ks.next() {
                let s = s.map_err(io)?;
                candidates.push(take_same(&mut ks, s, &mut c.duplicates));
            }
            Ok(candidates)
        }
    }
}

/// Why the concurrent outbox read stopped.
enum ReadStop {
    Full,
    Db(crate::pg::conn::PgError),
    /// The COPY stream was not what was asked for.
    Bad(std::io::Error),
}

/// A row of the outbox's binary COPY: (uuid, timestamp) when the id is a
/// uuid, else (text, boolean, int8), as `classify` selects them.
fn row_from_copy(f: &[Option<&[u8]>], uuid: bool) -> Result<Row, String> {
    let want = if uuid { 2 } else { 3 };
    if f.len() != want {
        return Err(format!("{} fields in a row, not {want}", f.len()));
    }
    let fixed = |b: Option<&[u8]>, n: usize, what: &str| -> Result<Option<[u8; 8]>, String> {
        match b {
            None => Ok(None),
            Some(b) if b.len() == n => {
                let mut a = [0u8; 8];
                a[8 - n..].copy_from_slice(b);
                Ok(Some(a))
            }
            Some(b) => Err(format!("a {what} of {} bytes", b.len())),
        }
    };
    if uuid {
        let id = match f[0] {
            Some(b) if b.len() == 16 => u128::from_be_bytes(b.try_into().expect("16 bytes")),
            _ => return Err("an id that is not a uuid".into()),
        };
        // Microseconds since 2000-01-01, as `Millis` reads them.
        let at = fixed(f[1], 8, "timestamp")?.map(|a| {
            i64::from_be_bytes(a)
                .div_euclid(1000)
                .saturating_add(946_684_800_000)
        });
        Ok(Row {
            id: Id::from_uuid(id),
            published: Mark::new(at.is_some(), at),
        })
    } else {
        let id = f[0].ok_or("an id that is NULL")?;
        let id = String::from_utf8(id.to_vec()).map_err(|_| "an id that is not UTF-8")?;
        let published = fixed(f[1], 1, "boolean")?.ok_or("a NULL published flag")?[7] != 0;
        let at = fixed(f[2], 8, "int8")?.map(i64::from_be_bytes);
        Ok(Row {
            id: Id::from(id),
            published: Mark::new(published, at),
        })
    }
}

impl From<crate::pg::conn::PgError> for ReadStop {
    fn from(e: crate::pg::conn::PgError) -> ReadStop {
        ReadStop::Db(e)
    }
}

/// A row whose event is in the topic.
fn matched(row: Row, ts: i64, l: &Layout, c: &mut Classes) {
    if row.published.published() || l.published == Published::InTopicOnly {
        c.in_sync += 1;
    } else {
        c.mark_published.push((row.id.to_string(), ts));
    }
}

/// A row whose event is not in the topic.
fn unmatched(row: Row, l: &Layout, compare_ms: i64, c: &mut Classes) {
    // A message is timed at or before its row's published-at (the relay
    // marks the row once the broker has it), and at or after its
    // created-at; SKEW_MS covers the clocks' difference.
    let gone = |at: Option<i64>| match (at, c.scan.gone_before_ms) {
        (Some(at), Some(h)) => at < h.saturating_add(SKEW_MS),
        _ => false,
    };
    let at_ms = row.published.ms();
    let compared = match (&l.published, row.published.published()) {
        (Published::InTopicOnly, _) | (_, false) => {
            c.pending += 1;
            return;
        }
        (Published::At(_), true) => at_ms.is_some_and(|p| p >= compare_ms),
        (Published::Flag(_), true) => l.created_at.is_some(),
    };
    if !compared {
        // Published before the compared window: its message predates the scan.
        c.in_sync += 1;
    } else if gone(at_ms) {
        c.gone.push(row.id.to_string());
    } else {
        c.mark_unpublished.push(row.id.to_string());
    }
}

/// Where orphans are staged (see `owned`).
const ORPHANS: &str = "reentry.orphan_event";

fn exists(db: &mut Db, table: &str) -> Result<bool, crate::pg::conn::PgError> {
    let t = db.table(table)?;
    Ok(db
        .query_one(
            "look up a table",
            "SELECT to_regclass($1) IS NOT NULL",
            &[&t],
        )?
        .get(0))
}

/// Scans the topic and merges it with the restored outbox.
pub fn classify(
    env: &mut Env,
    r: &Reconcile,
    progress: crate::progress::Reporter,
) -> Result<Classes, StepError> {
    let kafka = env.kafka()?;
    let compare_ms = r.from_ms + SKEW_MS.min((r.t_ms - r.from_ms) / 2);
    let l = &r.layout;
    let id = quote_qualified(&l.id);
    // The columns, and the compared window with its start as `at`: a bound
    // parameter, except in the COPY, which takes none.
    let clauses = |at: &str| -> (String, String, String) {
        match &l.published {
            Published::At(c) => {
                let c = quote_qualified(c);
                let created = l.created_at.as_deref().map(quote_qualified);
                let w = match created {
                    Some(cr) => format!("{cr} >= to_timestamp({at} / 1000.0) OR {c} >= to_timestamp({at} / 1000.0) OR {c} IS NULL"),
                    None => format!("{at} IS NOT NULL"),
                };
                (
                    format!("{c} IS NOT NULL"),
                    format!("(extract(epoch FROM {c}) * 1000)::int8"),
                    w,
                )
            }
            Published::Flag(c) => {
                // A NULL flag (gruelbox's column admits it) is not published.
                let c = format!("coalesce({}, false)", quote_qualified(c));
                let created = l.created_at.as_deref().map(quote_qualified);
                let (w, published_at) = match &created {
                    Some(cr) => (
                        format!("{cr} >= to_timestamp({at} / 1000.0) OR NOT {c}"),
                        format!("(extract(epoch FROM {cr}) * 1000)::int8"),
                    ),
                    None => (format!("{at} IS NOT NULL"), "NULL::int8".into()),
                };
                (c, published_at, w)
            }
            Published::InTopicOnly => {
                let w = match l.created_at.as_deref().map(quote_qualified) {
                    Some(cr) => format!("{cr} >= to_timestamp({at} / 1000.0)"),
                    None => format!("{at} IS NOT NULL"),
                };
                ("true".into(), "NULL::int8".into(), w)
            }
        }
    };
    let (published, published_at, window) = clauses("$1::int8");
    // Rows are indexed by u32, and the COPY asks for one more than this.
    let limit = kafka.tuning.sort_chunk.min(u32::MAX as usize - 1);
    let db = env.db(&r.database)?;
    let t = db.table(&l.table).on(&r.database)?;
    let id_col = Column::of(db, &l.table, &l.id).on(&r.database)?;
    // A uuid id and a timestamp marker (the common outbox) travel in binary.
    let binary = match &l.published {
        Published::At(c) if id_col.ty == "uuid" => Some(quote_qualified(c)),
        _ => None,
    };
    // A row without an id (where the column admits NULL) cannot be matched
    // with an event: it is counted and named, not reconciled.
    let without_id = if id_col.nullable {
        let n: i64 = db
            .query_one(
                "count outbox rows without an id",
                &format!("SELECT count(*) FROM {t} WHERE {id} IS NULL AND ({window})"),
                &[&compare_ms],
            )
            .on(&r.database)?
            .get(0);
        n as u64
    } else {
        0
    };
    let select = |window: &str| {
        match &binary {
        Some(c) => format!("SELECT {id}, {c} FROM {t} WHERE ({window}) AND {id} IS NOT NULL"),
        None => format!(
            "SELECT {id}::text, {published}, {published_at} FROM {t} WHERE ({window}) AND {id} IS NOT NULL"
        ),
    }
    };
    // COPY takes no parameters: its window's start is written into it, an
    // integer reentry computed, where every other statement binds it.
    let copy_select = select(&clauses(&format!("({compare_ms})::int8")).2);
    let select = select(&window);
    let uuid = binary.is_some();
    let row_of = |r: &tokio_postgres::Row| {
        if uuid {
            let at: Option<Millis> = r.get(1);
            Row {
                id: Id::from_uuid(r.get::<_, UuidBits>(0).0),
                published: Mark::new(at.is_some(), at.map(|m| m.0)),
            }
        } else {
            Row {
                id: Id::from(r.get::<_, String>(0)),
                published: Mark::new(r.get(1), r.get(2)),
            }
        }
    };
    // The outbox is read while the topic is scanned, up to as many rows as
    // the scan keeps in memory, and indexed; the scan's events are probed
    // against it as they arrive. Past that, the merge below reads it in order.
    let (scanned, joined) = std::thread::scope(|s| {
        let reader = s.spawn(|| -> Result<Option<Probe>, StepError> {
            let mut rows = if uuid {
                Rows::Uuid(Vec::new())
            } else {
                Rows::Text(Vec::new())
            };
            // One COPY, in binary: a million rows come in a quarter of the
            // time a cursor's fetches take, with no allocation a row. At
            // most one row past the limit is asked for, so that an outbox
            // too large to hold stops at once.
            let copy = format!(
                "COPY ({copy_select} LIMIT {}) TO STDOUT (FORMAT binary)",
                limit.saturating_add(1)
            );
            let mut tuples = crate::pg::conn::BinaryCopy::default();
            let bad = |what: String| {
                ReadStop::Bad(std::io::Error::new(std::io::ErrorKind::InvalidData, what))
            };
            let read =
                db.copy_out_each("read the outbox", &copy, |bytes| -> Result<(), ReadStop> {
                    tuples
                        .feed(bytes, |f| {
                            let row = row_from_copy(f, uuid)?;
                            if rows.len() >= limit {
                                return Err(String::new());
                            }
                            rows.push(row);
                            Ok(())
                        })
                        .map_err(|e| if e.is_empty() { ReadStop::Full } else { bad(e) })
                });
            let read = read.and_then(|()| {
                if tuples.ended() {
                    Ok(())
                } else {
                    Err(bad("the COPY stream ended without its trailer".into()))
                }
            });
            match read {
                Ok(()) => Ok(Some(Probe::new(rows, uuid, compare_ms))),
                Err(ReadStop::Full) => Ok(None),
                Err(ReadStop::Db(e)) => Err(e).on(&r.database),
                Err(ReadStop::Bad(source)) => Err(StepError::Io {
                    what: "read the outbox",
                    source,
                }),
            }
        });
        let mut streaming = Streaming::new(reader, limit);
        let scanned = scan::scan_into(
            &kafka,
            &ScanOptions {
                topic: &r.topic,
                from_ms: r.from_ms,
                t_ms: r.t_ms,
                id: &r.id_from,
                progress,
                start: None,
            },
            &mut streaming,
        );
        let joined = streaming
            .collect(true)
            .map(|()| (streaming.probe, streaming.outcome, streaming.sorter));
        (scanned, joined)
    });
    let stats = scanned?;
    let io = |what: &'static str| move |source: std::io::Error| StepError::Io { what, source };
    let (probe, outcome, sorter) = joined.map_err(io("hold the scan's events"))?;
    if let Some(Err(e)) = outcome {
        return Err(e);
    }
    let mut c = Classes {
        scan: stats,
        without_id,
        ..Classes::default()
    };
    let t_db = Instant::now();
    let db = env.db(&r.database)?;
    let candidates: Vec<Seen> = match probe {
        Some(p) => p.finish(l, &mut c),
        None => join_streamed(
            db,
            sorter.finish().map_err(io("hold the scan's events"))?,
            &Streamed {
                select: &select,
                id: &id,
                compare_ms,
                uuid,
                row_of: &row_of,
            },
            l,
            &mut c,
        )?,
    };
    // An orphan is confirmed by a lookup: its row may sit outside the window.
    for chunk in candidates.chunks(1000) {
        let ids: Vec<String> = chunk.iter().map(|s| s.id.to_string()).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let found = id_col.present(db, &ids).on(&r.database)?;
        for (s, id) in chunk.iter().zip(ids) {
            if found.contains(id) {
                c.in_sync += 1;
            } else {
                c.orphans.push(s.clone());
            }
        }
    }
    c.database_seconds = t_db.elapsed().as_secs_f64();
    if !c.orphans.is_empty() && exists(db, ORPHANS).on(&r.database)? {
        // Not even read from a schema another role made: a view there
        // runs its functions with reentry's rights.
        if let Some(why) =
            crate::reentry::owned::foreign(db, crate::reentry::owned::SCHEMA).on(&r.database)?
        {
            return Err(StepError::Refused(crate::reentry::owned::refusal(
                &r.database,
                crate::reentry::owned::SCHEMA,
                &why,
            )));
        }
        let ids: Vec<String> = c.orphans.iter().map(|s| s.id.to_string()).collect();
        let staged: Vec<String> = db
            .query(
                "look up staged orphans",
                "SELECT event_id FROM reentry.orphan_event WHERE topic = $1 AND event_id = ANY($2)",
                &[&r.topic, &ids],
            )
            .on(&r.database)?
            .iter()
            .map(|row| row.get(0))
            .collect();
        c.orphans.retain(|s| !staged.contains(&s.id.to_string()));
        c.staged_before = staged.len() as u64;
    }
    drop(kafka);
    Ok(c)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Whether a template is JSON, as its file's name says.
fn is_json(path: &str) -> bool {
    path.ends_with(".json")
}

/// Fills the template's placeholders in one pass: a value that holds
/// `{{…}}` is not filled again. The values come from the topic (the
/// message key, its event id), so in a JSON template each is written as
/// the inside of a JSON string would be: a key holding `"` stays one string.
fn fill(template: &str, json: bool, s: &Seen, key: &str, topic: &str) -> String {
    let mut out = String::with_capacity(template.len() + key.len());
    let mut rest = template;
    while let Some(i) = rest.find("{{") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let Some(end) = after.find("}}") else {
            out.push_str(&rest[i..]);
            return out;
        };
        let value = match after[..end].trim() {
            "event_id" => Some(s.id.to_string()),
            "key" => Some(key.to_owned()),
            "topic" => Some(topic.to_owned()),
            "partition" => Some(s.partition.to_string()),
            "offset" => Some(s.offset.to_string()),
            "timestamp" => Some(s.ts.to_string()),
            _ => None,
        };
        match value {
            Some(v) if json => {
                let quoted = serde_json::Value::String(v).to_string();
                out.push_str(&quoted[1..quoted.len() - 1]);
            }
            Some(v) => out.push_str(&v),
            None => out.push_str(&rest[i..i + 2 + end + 2]),
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    out
}

impl Step for Reconcile {
    fn nature(&self) -> Nature {
        Nature::Changes
    }

    fn writes(&self) -> Vec<&str> {
        vec![self.database.as_str()]
    }

    fn pin(&mut self, playbook: &std::path::Path) -> PinErrors {
        let Some(p) = &mut self.compensation else {
            return Vec::new();
        };
        match p.pin(playbook, true) {
            Err(e) => vec![(p.at.clone(), e)],
            Ok(bytes) => check_template(&p.path, &String::from_utf8_lossy(&bytes))
                .into_iter()
                .map(|e| (p.at.clone(), e))
                .collect(),
        }
    }

    fn preview(&self, env: &mut Env) -> Result<Effect, StepError> {
        let c = classify(env, self, crate::progress::Reporter::silent())?;
        Ok(Effect {
            summary: c.summary(self),
            count: c.changes(),
            items: c.items(),
            detail: super::detail(&c.detail()),
        })
    }

    fn apply(&self, env: &mut Env, rec: &mut Recorder) -> Result<Effect, StepError> {
        let started_ms = now_ms();
        let c = classify(env, self, crate::progress::Reporter::silent())?;
        let kafka = env.kafka()?;
        let template = match &self.compensation {
            Some(pinned) => {
                let bytes = pinned.read_checked(&env.playbook.file)?;
                // The plan's copy: what was checked is what is sent.
                Some((
                    match &pinned.content {
                        Some(text) => text.clone(),
                        None => String::from_utf8_lossy(&bytes).into_owned(),
                    },
                    pinned.path.as_str(),
                ))
            }
            None => None,
        };
        rec.prior(|| {
            Ok(Prior {
                mark_published: c.mark_published.clone(),
                orphans: c
                    .orphans
                    .iter()
                    .map(|s| (s.id.to_string(), s.partition, s.offset))
                    .collect(),
                mark_unpublished: c.mark_unpublished.clone(),
            })
        })?;
        // Orphans: fetched whole from the topic before anything is written.
        let wanted: Vec<(i32, i64)> = c.orphans.iter().map(|s| (s.partition, s.offset)).collect();
        let mut whole = kafka.fetch_many(&self.topic, &wanted)?;
        let fetched: Vec<_> = c
            .orphans
            .iter()
            .map(|s| (s.clone(), whole.remove(&(s.partition, s.offset))))
            .collect();
        // The orphans' aggregates changed around T: their keys (the
        // message key, else the event id) join the run's changed entities
        // under the outbox's name, for the cache and search steps.
        if let Some(dir) = env.run_dir.clone() {
            let entries = fetched
                .iter()
                .map(|(s, m)| {
                    let key = m
                        .as_ref()
                        .and_then(|m| m.key.as_deref())
                        .map(|k| String::from_utf8_lossy(k).into_owned())
                        .unwrap_or_else(|| s.id.to_string());
                    (vec![key], "orphan".to_owned())
                })
                .collect();
            super::rows::record_changed(&dir, &self.outbox, "outbox", entries)?;
        }
        let l = &self.layout;
        let id = quote_qualified(&l.id);
        let run_id = env.run_id.clone();
        let database = self.database.clone();
        let db = env.db(&database)?;
        // Checked before the outbox is marked too, so that a refusal comes
        // before this step's first change (and again, under a lock, where
        // reentry's table is written).
        crate::reentry::owned::refuse_foreign(db, &database, crate::reentry::owned::SCHEMA)?;
        let t = db.table(&l.table).on(&database)?;
        let ty = Column::of(db, &l.table, &l.id).on(&database)?.ty;
        let (published_n, unpublished_n) = db.transaction("BEGIN", |db| -> Result<(u64, u64), StepError> {
            let ids: Vec<&str> = c.mark_published.iter().map(|(i, _)| i.as_str()).collect();
            let ts: Vec<i64> = c.mark_published.iter().map(|(_, t)| *t).collect();
            let un: Vec<&str> = c.mark_unpublished.iter().map(String::as_str).collect();
            let (p, u) = match &l.published {
                Published::At(col) => {
                    let col = quote_qualified(col);
                    let p = db.execute(
                        "mark outbox rows published",
                        &format!(
                            "UPDATE {t} AS o SET {col} = to_timestamp(v.ts / 1000.0)
                               FROM unnest($1::text[], $2::int8[]) AS v(id, ts)
                              WHERE o.{id} = v.id::{ty} AND o.{col} IS NULL"
                        ),
                        &[&ids, &ts],
                    ).on(&database)?;
                    let u = db.execute(
                        "mark outbox rows unpublished",
                        &format!("UPDATE {t} SET {col} = NULL WHERE {id} = ANY($1::text[]::{ty}[]) AND {col} IS NOT NULL"),
                        &[&un],
                    ).on(&database)?;
                    (p, u)
                }
                Published::Flag(col) => {
                    let col = quote_qualified(col);
                    let p = db.execute(
                        "mark outbox rows processed",
                        &format!("UPDATE {t} SET {col} = true WHERE {id} = ANY($1::text[]::{ty}[]) AND NOT {col}"),
                        &[&ids],
                    ).on(&database)?;
                    let u = db.execute(
                        "mark outbox rows unprocessed",
                        &format!("UPDATE {t} SET {col} = false WHERE {id} = ANY($1::text[]::{ty}[]) AND {col}"),
                        &[&un],
                    ).on(&database)?;
                    (p, u)
                }
                Published::InTopicOnly => (0, 0),
            };
            Ok((p, u))
        })?;
        // Staged in one transaction that first makes sure reentry's table
        // is its own and locks it against new triggers (owned::guard).
        let staged = db.transaction("BEGIN", |db| -> Result<u64, StepError> {
        crate::reentry::owned::staging_tables(db, &database, &[ORPHANS])?;
        let mut staged = 0;
        for (s, m) in &fetched {
            let (key, payload, headers) = match m {
                Some(m) => (
                    m.key.clone(),
                    m.payload.clone(),
                    json!(m
                        .headers
                        .iter()
                        .map(|(k, v)| json!([k, v.as_deref().map(String::from_utf8_lossy)]))
                        .collect::<Vec<_>>()),
                ),
                None => (None, None, json!([])),
            };
            staged += db
                .execute(
                    "stage an orphan event",
                    "INSERT INTO reentry.orphan_event (run_id, outbox, event_id, topic, partition, \"offset\", event_time, key, payload, headers)
                     VALUES ($1, $2, $3, $4, $5, $6, to_timestamp($7::int8 / 1000.0), $8, $9, $10::text::jsonb)
                     ON CONFLICT (topic, partition, \"offset\") DO NOTHING",
                    &[&run_id, &self.outbox, &s.id.to_string(), &self.topic, &s.partition, &s.offset, &s.ts, &key, &payload, &headers.to_string()],
                )
                .on(&database)?;
        }
        Ok(staged)
        })?;
        // Compensations: at least once; each carries the orphan's id in a
        // header, so a consumer can drop a repeat.
        let mut compensated = 0;
        if let Some((template, path)) = &template {
            let json = is_json(path);
            let rows = db
                .query(
                    "find orphans to compensate",
                    "SELECT event_id, partition, \"offset\", (extract(epoch FROM event_time) * 1000)::int8, key
                       FROM reentry.orphan_event WHERE topic = $1 AND outbox = $2 AND compensated_at IS NULL",
                    &[&self.topic, &self.outbox],
                )
                .on(&database)?;
            let mut messages = Vec::new();
            let mut done = Vec::new();
            for row in rows {
                let s = Seen {
                    id: Id::from(row.get::<_, String>(0)),
                    partition: row.get(1),
                    offset: row.get(2),
                    ts: row.get::<_, Option<i64>>(3).unwrap_or(0),
                };
                let key: Option<Vec<u8>> = row.get(4);
                let key_text = key
                    .as_deref()
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default()
                    .into_owned();
                let payload = fill(template, json, &s, &key_text, &self.topic);
                // Checked before anything is sent: no half of a batch goes out.
                if json {
                    if let Err(e) = serde_json::from_str::<serde_json::Value>(&payload) {
                        return Err(StepError::Input {
                            message: format!(
                                "{path} filled in for orphan {} ({}/{}@{}) is not JSON: {e}; nothing was sent: fix the template, then resume",
                                s.id, self.topic, s.partition, s.offset
                            ),
                        });
                    }
                }
                messages.push(crate::kafka::Outgoing {
                    key: key.clone(),
                    payload: payload.into_bytes(),
                    headers: vec![(
                        "reentry-compensates".to_owned(),
                        s.id.to_string().into_bytes(),
                    )],
                    timestamp: None,
                });
                done.push((s.partition, s.offset));
            }
            // Sent inside the transaction that records them, with reentry's
            // table locked against new triggers and checked first
            // (owned::guard): a refusal comes before anything is sent, never
            // after the broker took it. Only what the broker acknowledged is
            // recorded as sent; the rest stay uncompensated, and a resume
            // sends them again.
            let undelivered;
            (compensated, undelivered) =
                db.transaction("BEGIN", |db| -> Result<(u64, Vec<_>), StepError> {
                    crate::reentry::owned::guard(
                        db,
                        &database,
                        crate::reentry::owned::SCHEMA,
                        &[ORPHANS],
                    )?;
                    let delivered = kafka.produce_each(&self.topic, &messages)?;
                    let mut undelivered = Vec::new();
                    let (mut ps, mut os) = (Vec::new(), Vec::new());
                    for ((p, o), d) in done.iter().zip(delivered) {
                        match d {
                            Ok(()) => {
                                ps.push(*p);
                                os.push(*o);
                            }
                            Err(e) => undelivered.push(e),
                        }
                    }
                    let n = db
                        .execute(
                            "record the compensations",
                            "UPDATE reentry.orphan_event AS e SET compensated_at = now()
                               FROM unnest($2::int4[], $3::int8[]) AS v(p, o)
                              WHERE e.topic = $1 AND e.partition = v.p AND e.\"offset\" = v.o",
                            &[&self.topic, &ps, &os],
                        )
                        .on(&database)?;
                    Ok((n, undelivered))
                })?;
            // The first failure names the broker's error; a resume sends
            // every undelivered one again.
            if let Some(first) = undelivered.into_iter().next() {
                return Err(StepError::Kafka(first));
            }
        }
        // The watch: the relay must stay quiet while its gate is closed.
        rec.sleep_until(SystemTime::now() + Duration::from_secs_f64(self.watch_seconds))?;
        let mut alarms = Vec::new();
        if let Published::At(col) = &l.published {
            let col = quote_qualified(col);
            let n: i64 = env
                .db(&database)?
                .query_one(
                    "watch the outbox",
                    &format!(
                        "SELECT count(*) FROM {t} WHERE {col} >= to_timestamp($1::int8 / 1000.0)"
                    ),
                    &[&started_ms],
                )
                .on(&database)?
                .get(0);
            if n > 0 {
                alarms.push(format!("{n} outbox row(s) were published during the step"));
            }
        }
        // Every message past where the scan ended is new: ours (compensations) or the relay's.
        let ends: BTreeMap<i32, i64> = c.scan.partitions.iter().map(|(p, s)| (*p, s.end)).collect();
        let (_, watch_stats) = scan::scan(
            &kafka,
            &ScanOptions {
                topic: &self.topic,
                from_ms: i64::MIN,
                t_ms: i64::MIN,
                id: &IdFrom::Key,
                progress: crate::progress::Reporter::silent(),
                start: Some(ends),
            },
        )?;
        let foreign = watch_stats.messages.saturating_sub(compensated);
        if foreign > 0 {
            alarms.push(format!(
                "{foreign} new message(s) reached {} during the step",
                self.topic
            ));
        }
        if !alarms.is_empty() {
            return Err(StepError::Check {
                message: format!(
                    "the relay of outbox `{}` is not paused: {}; close its gate properly, then resume",
                    self.outbox,
                    alarms.join("; ")
                ),
                findings: alarms,
            });
        }
        let mut detail = c.detail();
        detail.applied = Some(Applied {
            marked_published: published_n,
            staged_orphans: staged,
            compensated,
            marked_unpublished: unpublished_n,
        });
        Ok(Effect {
            summary: format!(
                "outbox `{}`: {published_n} marked published, {staged} orphan(s) staged{}, {unpublished_n} marked unpublished; {} pending; the relay stayed quiet for {}s",
                self.outbox,
                if template.is_some() { format!(" ({compensated} compensated)") } else { String::new() },
                c.pending,
                self.watch_seconds
            ),
            count: published_n + staged + unpublished_n,
            items: c.items(),
            detail: super::detail(&detail),
        })
    }
}

/// The event id of an outbox's messages, as its playbook section says.
pub fn id_from(e: Option<&crate::reentry::playbook::EventId>) -> IdFrom {
    match e {
        Some(e) if e.header.is_some() => IdFrom::Header(e.header.clone().unwrap_or_default()),
        Some(e) if e.json_pointer.is_some() => {
            IdFrom::JsonPointer(e.json_pointer.clone().unwrap_or_default())
        }
        _ => IdFrom::Key,
    }
}

/// Each outbox against its topic, from T minus `[kafka] lookback`.
fn plan(p: &Playbook, ctx: &PlanCtx) -> Vec<PlannedStep> {
    let Some(t_ms) = ctx.t_ms else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let kafka = p.kafka.as_ref();
    let lookback = duration_ms(kafka.and_then(|k| k.lookback.as_deref()), "1h");
    let watch = duration_ms(kafka.and_then(|k| k.watch.as_deref()), "5s") as f64 / 1000.0;
    for (n, o) in p.outbox.iter().enumerate() {
        out.push(step(
            format!("outbox:{}", o.name),
            Phase::Reconcile,
            format!("outbox `{}` against topic {}", o.name, o.topic),
            super::Action::Outbox(Reconcile {
                outbox: o.name.clone(),
                database: o.database.clone(),
                topic: o.topic.clone(),
                layout: Layout::of(o),
                id_from: id_from(o.event_id.as_ref()),
                t_ms,
                from_ms: t_ms - lookback,
                watch_seconds: watch,
                compensation: o.compensation_template.as_deref().map(|path| {
                    Pinned::named(path, &["outbox", &n.to_string(), "compensation-template"])
                }),
            }),
        ));
    }
    out
}

fn needs_time(p: &Playbook) -> bool {
    !p.outbox.is_empty()
}

/// A generic outbox's table and the columns it names.
fn needs(p: &Playbook) -> Vec<Need<'_>> {
    let mut out = Vec::new();
    for (i, o) in p.outbox.iter().enumerate() {
        if let (Some(table), Some(c)) = (&o.table, &o.columns) {
            let columns = [
                &c.id,
                &c.topic,
                &c.key,
                &c.payload,
                &c.created_at,
                &c.published_at,
            ]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
            out.push(Need {
                database: &o.database,
                table: table.clone(),
                columns,
                path: vec![Seg::Key("outbox"), Seg::Index(i), Seg::Key("table")],
                what: format!("outbox `{}`", o.name),
            });
        }
    }
    out
}

/// An outbox: a declared database, a real gate, a table when generic, and [kafka].
fn meaning(m: &mut Meaning) {
    let gates: Vec<&str> = m.p.gate_names().into_iter().map(|(_, n)| n).collect();
    for (i, o) in m.p.outbox.iter().enumerate() {
        m.database(
            &[Seg::Key("outbox"), Seg::Index(i), Seg::Key("database")],
            &o.database,
        );
        if let Some(g) = &o.gate {
            if !gates.contains(&g.as_str()) {
                m.error(
                    &[Seg::Key("outbox"), Seg::Index(i), Seg::Key("gate")],
                    format!("no gate named `{g}` pauses this outbox's relay"),
                );
            }
        }
        if o.flavour == "generic" && o.table.is_none() {
            m.error(
                &[Seg::Key("outbox"), Seg::Index(i)],
                format!(
                    "outbox `{}` is generic: it needs `table` and `columns`",
                    o.name
                ),
            );
        }
        if !m.p.outbox.is_empty() && m.p.kafka.is_none() {
            m.error(
                &[Seg::Key("outbox"), Seg::Index(i)],
                "an outbox is compared with its topic: declare [kafka]".into(),
            );
        }
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
    use crate::reentry::playbook::{Outbox, OutboxColumns};

    fn outbox(flavour: &str, table: Option<&str>, columns: Option<OutboxColumns>) -> Outbox {
        Outbox {
            name: "o".into(),
            database: "restored".into(),
            flavour: flavour.into(),
            table: table.map(Into::into),
            topic: "t".into(),
            columns,
            event_id: None,
            gate: None,
            compensation_template: None,
        }
    }

    fn seen(id: &str, ts: i64, offset: i64) -> Seen {
        Seen {
            id: Id::from(id),
            ts,
            partition: 0,
            offset,
        }
    }

    #[test]
    fn the_streaming_probe_matches_every_row_of_a_shared_id_and_keeps_one_candidate_a_key() {
        let row = |id: &str, published: bool| Row {
            id: Id::from(id),
            published: Mark::new(published, published.then_some(1)),
        };
        // Two rows share id a (no unique constraint): the first published,
        // the second not. b has no event; c has two and no row.
        let rows = Rows::Text(vec![row("a", true), row("a", false), row("b", false)]);
        let mut p = Probe::new(rows, false, 0);
        for e in [
            seen("a", 10, 1),
            seen("c", 7, 2),
            seen("a", 5, 3),
            seen("c", 6, 4),
            seen("old", -1, 5),
        ] {
            p.probe(e);
        }
        let l = Layout::of(&outbox("generic", Some("outbox_event"), None));
        let mut c = Classes::default();
        let candidates = p.finish(&l, &mut c);
        assert_eq!(c.in_sync, 1, "the published row of a");
        assert_eq!(
            c.mark_published,
            vec![("a".to_owned(), 5)],
            "the other, at a's earliest event"
        );
        assert_eq!(c.pending, 1, "b");
        assert_eq!(c.duplicates, 2, "a's second message and c's");
        assert_eq!(
            candidates,
            vec![seen("c", 6, 4)],
            "c once, its earliest; nothing before the window"
        );
    }

    #[test]
    fn candidates_are_one_a_uuid_however_its_text_is_written() {
        let mut p = Probe::new(Rows::Uuid(Vec::new()), true, 0);
        p.probe(seen("0a1b2c3d-0000-4000-8000-000000000001", 3, 1));
        p.probe(seen("0A1B2C3D-0000-4000-8000-000000000001", 2, 2));
        let l = Layout::of(&outbox("generic", Some("outbox_event"), None));
        let mut c = Classes::default();
        let candidates = p.finish(&l, &mut c);
        assert_eq!(candidates.len(), 1);
        assert_eq!(candidates[0].ts, 2);
        assert_eq!(c.duplicates, 1);
    }

    #[test]
    fn each_flavour_knows_where_its_outbox_records_publication() {
        let m = Layout::of(&outbox("spring-modulith", None, None));
        assert_eq!(m.table, "event_publication");
        assert_eq!(m.created_at.as_deref(), Some("publication_date"));
        assert_eq!(m.published, Published::At("completion_date".into()));

        let g = Layout::of(&outbox("gruelbox", None, None));
        assert_eq!(g.table, "txno_outbox");
        assert_eq!(g.published, Published::Flag("processed".into()));
        assert_eq!(g.created_at, None);

        let d = Layout::of(&outbox("debezium", Some("app.outbox"), None));
        assert_eq!(d.table, "app.outbox");
        assert_eq!(d.published, Published::InTopicOnly);

        let cols = OutboxColumns {
            id: Some("event_id".into()),
            topic: None,
            key: None,
            payload: None,
            created_at: Some("occurred_at".into()),
            published_at: Some("sent_at".into()),
        };
        let generic = Layout::of(&outbox("generic", Some("outbox_event"), Some(cols)));
        assert_eq!(generic.id, "event_id");
        assert_eq!(generic.created_at.as_deref(), Some("occurred_at"));
        assert_eq!(generic.published, Published::At("sent_at".into()));
    }

    #[test]
    fn uuids_parse_in_either_case_and_print_canonically() {
        let u = parse_uuid("0A1B2C3D-0000-4000-8000-00000000002A").unwrap();
        assert_eq!(
            Id::from_uuid(u).to_string(),
            "0a1b2c3d-0000-4000-8000-00000000002a"
        );
        assert_eq!(parse_uuid("0a1b2c3d00004000800000000000002a"), Some(u));
        for bad in [
            "",
            "case-1",
            "0a1b2c3d-0000-4000-8000-00000000002g",
            "0a1b2c3d+0000-4000-8000-00000000002a",
        ] {
            assert_eq!(parse_uuid(bad), None, "{bad}");
        }
        // A text column matches ids as text; a uuid column, as uuids.
        let (lower, upper) = (
            Id::from("0a1b2c3d-0000-4000-8000-00000000002a"),
            Id::from("0A1B2C3D-0000-4000-8000-00000000002A"),
        );
        assert!(key_of(&lower, false) != key_of(&upper, false));
        assert!(key_of(&lower, true) == key_of(&upper, true));
        assert!(key_of(&upper, false) == Key::S("0A1B2C3D-0000-4000-8000-00000000002A"));
    }

    #[test]
    fn a_template_is_filled_from_the_orphan() {
        let s = Seen {
            id: "e1".into(),
            ts: 5,
            partition: 2,
            offset: 9,
        };
        assert_eq!(
            fill(
                r#"{"undo":"{{event_id}}","at":"{{topic}}/{{partition}}@{{offset}}","k":"{{key}}"}"#,
                true,
                &s,
                "case-1",
                "t"
            ),
            r#"{"undo":"e1","at":"t/2@9","k":"case-1"}"#
        );
    }

    #[test]
    fn a_filled_value_is_one_json_string_and_is_not_filled_again() {
        let s = Seen {
            id: "e1".into(),
            ts: 5,
            partition: 2,
            offset: 9,
        };
        let key = "a\",\"admin\":true,\"x\":\"{{topic}}\\\n";
        let filled = fill(r#"{"entity":"{{key}}"}"#, true, &s, key, "t");
        let v: serde_json::Value = serde_json::from_str(&filled).unwrap();
        assert_eq!(v, serde_json::json!({ "entity": key }));
        assert_eq!(
            fill(
                "{{key}} {{ topic }} {{nope}} {{",
                false,
                &s,
                "{{topic}}",
                "t"
            ),
            "{{topic}} t {{nope}} {{"
        );
    }
}
