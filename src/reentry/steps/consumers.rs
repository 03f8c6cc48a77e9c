//! Consumers after a restore to T: their committed offsets are past
//! messages whose effects the restored database no longer has.
//!
//! - A consumer group named in the playbook is rewound to T (the earliest
//!   offset at or after T, per partition), only while it has no live
//!   member, with its old offsets journaled so the rewind can be undone.
//!   A partition is never moved forward. An idempotent group goes back
//!   `STRADDLE_MS` more: a message sent just before T may have had its
//!   effect committed after T, which the restored database lacks.
//! - An inbox table (processed message ids) is compared with the topic: the
//!   ids after T that the restored inbox lacks are what will be consumed
//!   again, and their consumer must be declared idempotent.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Effect, Env, Nature, OnDatabase, PlanCtx, Recorder, Step, StepError, StepKind};
use crate::kafka::scan::{self, IdFrom, ScanOptions};
use crate::kafka::Kafka;
use crate::reentry::check::Column;
use crate::reentry::check::Need;
use crate::reentry::plan::{step, PlannedStep};
use crate::reentry::playbook::Playbook;
use crate::reentry::playbook::{section, Interpolated};
use crate::reentry::playbook::{Meaning, Seg};
use crate::reentry::schema::{opt, req, Field, Kind};
use crate::reentry::steps::Phase;

// ---- Its playbook section: one typed model; its keys and checks come from it.

section! {
    pub struct ConsumerGroup {
        pub name: String => req("name", Kind::Str),
        pub topics: Vec<String> => req("topics", Kind::Strs),
        pub idempotent: Option<bool> => opt("idempotent", Kind::Bool),
    }
}

section! {
    pub struct KafkaSection {
        pub bootstrap: Interpolated => req("bootstrap", Kind::Interp),
        pub lookback: Option<String> => opt("lookback", Kind::Duration),
        pub watch: Option<String> => opt("watch", Kind::Duration),
        pub scan_consumers: Option<u32> => opt("scan-consumers", Kind::Int),
        pub sort_chunk: Option<u64> => opt("sort-chunk", Kind::Int),
        pub security_protocol: Option<String> => opt("security-protocol", Kind::OneOf(crate::kafka::security::PROTOCOLS)),
        pub sasl_mechanism: Option<String> => opt("sasl-mechanism", Kind::OneOf(crate::kafka::security::MECHANISMS)),
        pub sasl_username: Option<Interpolated> => opt("sasl-username", Kind::Interp),
        pub sasl_password: Option<Interpolated> => opt("sasl-password", Kind::Interp),
        pub ssl_ca: Option<String> => opt("ssl-ca", Kind::Str),
        pub ssl_certificate: Option<String> => opt("ssl-certificate", Kind::Str),
        pub ssl_key: Option<String> => opt("ssl-key", Kind::Str),
        pub ssl_key_password: Option<Interpolated> => opt("ssl-key-password", Kind::Interp),
        #[serde(default)]
        pub properties: BTreeMap<String, Interpolated> => opt("properties", Kind::Props),
        #[serde(default)]
        pub consumer_group: Vec<ConsumerGroup> => opt("consumer-group", Kind::Tables(ConsumerGroup::FIELDS)),
    }
}

section! {
    pub struct InboxSection {
        pub name: String => req("name", Kind::Str),
        pub database: String => req("database", Kind::Str),
        pub table: String => req("table", Kind::Str),
        pub message_id_column: String => req("message-id-column", Kind::Str),
        pub topic: String => req("topic", Kind::Str),
        pub consumer_group: Option<String> => opt("consumer-group", Kind::Str),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Rewind {
    pub group: String,
    pub topics: Vec<String>,
    pub t_ms: i64,
    pub idempotent: bool,
}

/// Per topic and partition: committed offset, and where the rewind puts it.
pub type Moves = BTreeMap<String, BTreeMap<i32, (Option<i64>, i64)>>;

impl Rewind {
    pub fn moves(&self, k: &Kafka) -> Result<Moves, StepError> {
        let mut out = Moves::new();
        // An idempotent consumer goes back a little further: a message
        // sent just before T may have had its effect committed after it.
        let at = if self.idempotent {
            self.t_ms - super::STRADDLE_MS
        } else {
            self.t_ms
        };
        for topic in &self.topics {
            let target = k.offsets_for_time(topic, at)?;
            let parts: Vec<i32> = target.keys().copied().collect();
            let committed = k.committed(&self.group, topic, &parts)?;
            let mut m = BTreeMap::new();
            for (p, t) in target {
                let old = committed.get(&p).copied().flatten();
                // Never forward: a group behind T keeps its place.
                let new = old.map_or(t, |o| o.min(t));
                m.insert(p, (old, new));
            }
            out.insert(topic.clone(), m);
        }
        Ok(out)
    }

    /// Partitions that move, the messages consumed again, and one line per
    /// move. The messages are counted by reading them, as the group will:
    /// on a transactional topic the offsets between old and new also hold
    /// commit markers and aborted records, which no consumer is given.
    pub fn describe(&self, k: &Kafka, moves: &Moves) -> Result<(u64, u64, Vec<String>), StepError> {
        let (mut parts, mut again, mut items) = (0, 0, Vec::new());
        for (topic, m) in moves {
            for (p, (old, new)) in m {
                if *old != Some(*new) {
                    parts += 1;
                    if let Some(old) = old {
                        again += k.count(topic, *p, *new, *old)?;
                    }
                    items.push(format!(
                        "{topic}/{p}: {} → {new}",
                        old.map_or("none".to_owned(), |o| o.to_string())
                    ));
                }
            }
        }
        Ok((parts, again, items))
    }
}

/// What a rewind journals as its effect's detail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RewindDetail {
    pub moves: Moves,
    /// Live members a preview found (apply refuses while there are any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<String>,
}

/// What an inbox step journals as its effect's detail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct InboxDetail {
    /// Messages after T the restored inbox lacks: consumed again.
    pub re_consumed: u64,
    pub scanned: u64,
}

impl Step for Rewind {
    fn nature(&self) -> Nature {
        Nature::Changes
    }

    fn preview(&self, env: &mut Env) -> Result<Effect, StepError> {
        let k = env.kafka()?;
        let moves = self.moves(&k)?;
        let (parts, again, items) = self.describe(&k, &moves)?;
        let members = k.members(&self.group)?;
        let mut summary = format!(
            "rewind group `{}` to T{}: {parts} partition(s), {again} message(s) to consume again",
            self.group,
            if self.idempotent { " less 1 min" } else { "" }
        );
        if !members.is_empty() {
            summary.push_str(&format!(
                "; {} live member(s) now: apply will refuse until they stop",
                members.len()
            ));
        }
        if !self.idempotent && again > 0 {
            summary.push_str("; the group is not declared idempotent");
        }
        Ok(Effect {
            summary,
            count: parts,
            items,
            detail: super::detail(&RewindDetail {
                moves,
                members: members.iter().map(|m| m.describe()).collect(),
            }),
        })
    }

    fn apply(&self, env: &mut Env, rec: &mut Recorder) -> Result<Effect, StepError> {
        let k = env.kafka()?;
        let members = k.members(&self.group)?;
        if !members.is_empty() {
            let list: Vec<String> = members.iter().map(|m| m.describe()).collect();
            return Err(StepError::Check {
                message: format!(
                    "group `{}` has {} live member(s), and a rewind needs it stopped: {}; stop its consumers (the gate should have), then resume",
                    self.group,
                    list.len(),
                    list.join(", ")
                ),
                findings: list,
            });
        }
        let moves = self.moves(&k)?;
        // The offsets before the first attempt: a resume must not record
        // its own rewind as the state to undo.
        let prior: Moves = rec.prior(|| Ok(moves))?;
        for (topic, m) in &prior {
            let offsets: BTreeMap<i32, i64> = m.iter().map(|(p, (_, new))| (*p, *new)).collect();
            k.commit(&self.group, topic, &offsets)?;
        }
        let (parts, again, items) = self.describe(&k, &prior)?;
        Ok(Effect {
            summary: format!(
                "rewound group `{}`: {parts} partition(s), {again} message(s) will be consumed again",
                self.group
            ),
            count: parts,
            items,
            detail: super::detail(&RewindDetail {
                moves: prior,
                members: Vec::new(),
            }),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Inbox {
    pub inbox: String,
    pub database: String,
    pub table: String,
    pub column: String,
    pub topic: String,
    pub id_from: IdFrom,
    pub group: Option<String>,
    pub idempotent: bool,
    pub t_ms: i64,
}

impl Inbox {
    /// The ids after T (less `STRADDLE_MS`) the restored inbox lacks: how
    /// many, and some.
    fn missing(&self, env: &mut Env) -> Result<(u64, u64, Vec<String>), StepError> {
        let k = env.kafka()?;
        let (sorted, stats) = scan::scan(
            &k,
            &ScanOptions {
                topic: &self.topic,
                from_ms: self.t_ms - super::STRADDLE_MS,
                t_ms: self.t_ms,
                id: &self.id_from,
                progress: crate::progress::Reporter::silent(),
                start: None,
            },
        )?;
        let db = env.db(&self.database)?;
        let col = Column::of(db, &self.table, &self.column).on(&self.database)?;
        let (mut missing, mut sample) = (0u64, Vec::new());
        let mut batch: Vec<String> = Vec::new();
        let mut last: Option<scan::Id> = None;
        let mut flush =
            |batch: &mut Vec<String>, db: &mut crate::pg::conn::Db| -> Result<(), StepError> {
                let ids: Vec<&str> = batch.iter().map(String::as_str).collect();
                let found = col.present(db, &ids).on(&self.database)?;
                for id in batch.drain(..) {
                    if !found.contains(&id) {
                        missing += 1;
                        if sample.len() < 10 {
                            sample.push(id);
                        }
                    }
                }
                Ok(())
            };
        for s in sorted {
            let s = s.map_err(|source| StepError::Io {
                what: "read the sorted scan back",
                source,
            })?;
            if last.as_ref() == Some(&s.id) {
                continue;
            }
            last = Some(s.id.clone());
            batch.push(s.id.into());
            if batch.len() == 1000 {
                flush(&mut batch, db)?;
            }
        }
        flush(&mut batch, db)?;
        Ok((stats.messages, missing, sample))
    }
}

impl Step for Inbox {
    fn nature(&self) -> Nature {
        Nature::Reads
    }

    fn preview(&self, env: &mut Env) -> Result<Effect, StepError> {
        let (scanned, missing, sample) = self.missing(env)?;
        Ok(Effect {
            summary: format!(
                "inbox `{}`: {missing} message(s) after T not in the restored inbox will be consumed again ({scanned} scanned)",
                self.inbox
            ),
            count: 0,
            items: sample,
            detail: super::detail(&InboxDetail {
                re_consumed: missing,
                scanned,
            }),
        })
    }

    fn apply(&self, env: &mut Env, _rec: &mut Recorder) -> Result<Effect, StepError> {
        let (scanned, missing, sample) = self.missing(env)?;
        if missing > 0 && !self.idempotent {
            return Err(StepError::Check {
                message: format!(
                    "inbox `{}`: {missing} message(s) after T will be consumed again by {}, which the playbook does not declare idempotent; make it idempotent (or declare it so, if it is), then resume",
                    self.inbox,
                    self.group.as_deref().map_or("its consumer".to_owned(), |g| format!("group `{g}`"))
                ),
                findings: sample,
            });
        }
        Ok(Effect {
            summary: format!(
                "inbox `{}`: {missing} message(s) after T will be consumed again, by an idempotent consumer ({scanned} scanned)",
                self.inbox
            ),
            count: 0,
            items: sample,
            detail: super::detail(&InboxDetail {
                re_consumed: missing,
                scanned,
            }),
        })
    }
}

/// Each inbox against its topic, then each consumer group's rewind: after
/// the outbox steps, which settle what the relay will send.
fn plan(p: &Playbook, ctx: &PlanCtx) -> Vec<PlannedStep> {
    let Some(t_ms) = ctx.t_ms else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let kafka = p.kafka.as_ref();
    let groups = kafka.map(|k| k.consumer_group.as_slice()).unwrap_or(&[]);
    for i in &p.inbox {
        let same_topic = p.outbox.iter().find(|o| o.topic == i.topic);
        out.push(step(
            format!("inbox:{}", i.name),
            Phase::Reconcile,
            format!("inbox `{}` against topic {}", i.name, i.topic),
            super::Action::Inbox(Inbox {
                inbox: i.name.clone(),
                database: i.database.clone(),
                table: i.table.clone(),
                column: i.message_id_column.clone(),
                topic: i.topic.clone(),
                id_from: super::outbox::id_from(same_topic.and_then(|o| o.event_id.as_ref())),
                group: i.consumer_group.clone(),
                idempotent: groups.iter().any(|g| {
                    Some(&g.name) == i.consumer_group.as_ref() && g.idempotent == Some(true)
                }),
                t_ms,
            }),
        ));
    }
    for g in groups {
        out.push(step(
            format!("rewind:{}", g.name),
            Phase::Reconcile,
            if g.idempotent == Some(true) {
                format!(
                    "rewind consumer group `{}` to T less 1 min (idempotent)",
                    g.name
                )
            } else {
                format!("rewind consumer group `{}` to T", g.name)
            },
            super::Action::RewindGroup(Rewind {
                group: g.name.clone(),
                topics: g.topics.clone(),
                t_ms,
                idempotent: g.idempotent == Some(true),
            }),
        ));
    }
    out
}

fn needs_time(p: &Playbook) -> bool {
    !p.inbox.is_empty()
        || p.kafka
            .as_ref()
            .is_some_and(|k| !k.consumer_group.is_empty())
}

/// Each inbox's table and message id column.
fn needs(p: &Playbook) -> Vec<Need<'_>> {
    let mut out = Vec::new();
    for (i, x) in p.inbox.iter().enumerate() {
        out.push(Need {
            database: &x.database,
            table: x.table.clone(),
            columns: vec![x.message_id_column.clone()],
            path: vec![Seg::Key("inbox"), Seg::Index(i), Seg::Key("table")],
            what: format!("inbox `{}`", x.name),
        });
    }
    out
}

/// Every inbox is on a declared database.
fn meaning(m: &mut Meaning) {
    for (i, x) in m.p.inbox.iter().enumerate() {
        m.database(
            &[Seg::Key("inbox"), Seg::Index(i), Seg::Key("database")],
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
