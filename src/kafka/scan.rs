//! The topic scan: every partition read in parallel from a time to its end
//! (to partition EOF, not to a high watermark some brokers report late),
//! each message reduced to its event id, timestamp and position, and the
//! result sorted by event id so it can be merged with a database stream
//! ordered the same way. Sorting spills runs of `chunk` events to disk, so
//! memory stays bounded however long the topic is.

use std::collections::{BTreeMap, BinaryHeap};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use super::{Kafka, KafkaError};
use crate::fsutil::ScratchDir;

/// Where a message's event id is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdFrom {
    Header(String),
    Key,
    JsonPointer(String),
}

impl IdFrom {
    pub fn extract(&self, m: &BorrowedMessage) -> Option<Id> {
        match self {
            IdFrom::Key => Id::from_bytes(m.key()?),
            IdFrom::Header(name) => {
                let h = m.headers()?;
                Id::from_bytes(h.iter().find(|x| x.key == name)?.value?)
            }
            IdFrom::JsonPointer(p) => {
                let v: serde_json::Value = serde_json::from_slice(m.payload()?).ok()?;
                match v.pointer(p)? {
                    serde_json::Value::String(s) => Some(Id::from(s.as_str())),
                    serde_json::Value::Null => None,
                    other => Some(Id::from(other.to_string())),
                }
            }
        }
    }
}

/// An event id as a scan keeps it. A uuid in canonical text (lowercase,
/// dashed: how PostgreSQL and most producers print one) is kept as its 128
/// bits and printed back the same; any other id as its text. A million
/// events then take no allocation each and a third of the memory, and
/// still sort as their text does (by bytes, as COLLATE "C").
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Id(Repr);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Repr {
    /// High and low halves: a u128 is 16-byte aligned, and would make
    /// every `Seen` 64 bytes instead of 48.
    Uuid([u64; 2]),
    /// Never a canonical uuid: equal ids have one representation.
    Text(Box<str>),
}

impl Id {
    /// An id from a message's bytes; None when they are not UTF-8.
    pub fn from_bytes(b: &[u8]) -> Option<Id> {
        match canonical_uuid(b) {
            Some(u) => Some(Id::from_uuid(u)),
            None => std::str::from_utf8(b)
                .ok()
                .map(|s| Id(Repr::Text(s.into()))),
        }
    }

    pub fn from_uuid(u: u128) -> Id {
        Id(Repr::Uuid([(u >> 64) as u64, u as u64]))
    }

    /// The 128 bits, when the id is a uuid in canonical text.
    pub fn uuid(&self) -> Option<u128> {
        match &self.0 {
            Repr::Uuid([hi, lo]) => Some((u128::from(*hi) << 64) | u128::from(*lo)),
            Repr::Text(_) => None,
        }
    }

    /// The id's text, when it is kept as text.
    pub fn text(&self) -> Option<&str> {
        match &self.0 {
            Repr::Uuid(_) => None,
            Repr::Text(t) => Some(t),
        }
    }

    /// Calls `f` with the id's text, printed on the stack for a uuid.
    pub fn with_str<R>(&self, f: impl FnOnce(&str) -> R) -> R {
        match (&self.0, self.uuid()) {
            (Repr::Text(t), _) => f(t),
            (Repr::Uuid(_), Some(u)) => {
                let b = uuid_text(u);
                f(std::str::from_utf8(&b).expect("hex digits and dashes"))
            }
            (Repr::Uuid(_), None) => unreachable!("a uuid has its bits"),
        }
    }
}

impl From<String> for Id {
    fn from(s: String) -> Id {
        match canonical_uuid(s.as_bytes()) {
            Some(u) => Id::from_uuid(u),
            None => Id(Repr::Text(s.into_boxed_str())),
        }
    }
}

impl From<&str> for Id {
    fn from(s: &str) -> Id {
        Id::from(s.to_owned())
    }
}

impl From<Id> for String {
    fn from(id: Id) -> String {
        match id.0 {
            Repr::Text(t) => t.into(),
            Repr::Uuid(_) => id.to_string(),
        }
    }
}

impl std::fmt::Display for Id {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.with_str(|s| f.write_str(s))
    }
}

impl PartialEq<str> for Id {
    fn eq(&self, other: &str) -> bool {
        match (&self.0, canonical_uuid(other.as_bytes())) {
            (Repr::Text(t), None) => **t == *other,
            (Repr::Uuid(_), Some(u)) => self.uuid() == Some(u),
            _ => false,
        }
    }
}

impl Ord for Id {
    fn cmp(&self, other: &Id) -> std::cmp::Ordering {
        match (&self.0, &other.0) {
            // Canonical text orders as the bits do: digits before a-f,
            // dashes at the same places in both.
            (Repr::Uuid(a), Repr::Uuid(b)) => a.cmp(b),
            (Repr::Text(a), Repr::Text(b)) => a.as_bytes().cmp(b.as_bytes()),
            _ => self.with_str(|a| other.with_str(|b| a.as_bytes().cmp(b.as_bytes()))),
        }
    }
}

impl PartialOrd for Id {
    fn partial_cmp(&self, other: &Id) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// The bits of `8-4-4-4-12` lowercase hex digits; None for anything else.
fn canonical_uuid(b: &[u8]) -> Option<u128> {
    if b.len() != 36 {
        return None;
    }
    let mut v: u128 = 0;
    for (i, &c) in b.iter().enumerate() {
        let d = match c {
            b'-' if matches!(i, 8 | 13 | 18 | 23) => continue,
            b'0'..=b'9' if !matches!(i, 8 | 13 | 18 | 23) => c - b'0',
            b'a'..=b'f' if !matches!(i, 8 | 13 | 18 | 23) => c - b'a' + 10,
            _ => return None,
        };
        v = (v << 4) | u128::from(d);
    }
    Some(v)
}

fn uuid_text(u: u128) -> [u8; 36] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [b'-'; 36];
    let mut shift = 128;
    for (i, o) in out.iter_mut().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            continue;
        }
        shift -= 4;
        *o = HEX[((u >> shift) & 0xf) as usize];
    }
    out
}

/// A message, reduced to what the comparisons need.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Seen {
    pub id: Id,
    pub ts: i64,
    pub partition: i32,
    pub offset: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct PartitionScan {
    /// Where reading started (the broker's offset for the scan's start time).
    pub from: i64,
    /// One past the last message read: the partition's end when the scan ran.
    pub end: i64,
    pub messages: u64,
    /// The earliest offset whose timestamp is at or after T: where a
    /// consumer group rewinds to. `end` when no message is that new.
    pub at_t: i64,
    /// The partition's first offset still held when the scan ran (its log
    /// start): retention, or a delete-records, removed every offset before.
    #[serde(default)]
    pub log_start: i64,
    /// Set when the scan started at the log start of a partition that had
    /// records removed: messages of this partition with timestamps before
    /// this (the first message left, ms) may have been in the topic and be
    /// gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gone_before_ms: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ScanStats {
    pub topic: String,
    pub from_ms: i64,
    /// Messages at or after the scan's start time.
    pub messages: u64,
    /// Of those, messages without an event id where the playbook says it is.
    pub without_id: u64,
    pub partitions: BTreeMap<i32, PartitionScan>,
    /// The latest of the partitions' `gone_before_ms`: a message timed
    /// before this may have been removed by retention before the scan. The
    /// event's partition is not known from the row, so the topic's horizon
    /// is the latest of its partitions'.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gone_before_ms: Option<i64>,
    pub seconds: f64,
}

pub struct ScanOptions<'a> {
    pub topic: &'a str,
    /// Read messages with timestamps at or after this (ms since the epoch).
    pub from_ms: i64,
    /// T, for each partition's rewind offset.
    pub t_ms: i64,
    pub id: &'a IdFrom,
    pub progress: crate::progress::Reporter,
    /// Start at these offsets instead of at `from_ms`.
    pub start: Option<BTreeMap<i32, i64>>,
}

/// One consumer's share of the scan: its partitions, each read to its end,
/// events sent in batches. Per partition: what was read, and how many
/// messages carried no event id.
fn scan_partitions(
    k: &Kafka,
    o: &ScanOptions,
    share: &[(i32, i64)],
    tx: &mpsc::SyncSender<Vec<Seen>>,
    counter: &AtomicU64,
) -> Result<BTreeMap<i32, (PartitionScan, u64)>, KafkaError> {
    let c = k.consumer("reentry-scan")?;
    let mut tpl = TopicPartitionList::new();
    let mut stats = BTreeMap::new();
    for (p, start) in share {
        tpl.add_partition_offset(o.topic, *p, Offset::Offset(*start))
            .map_err(k.err("build a partition list"))?;
        let ps = PartitionScan {
            from: *start,
            end: *start,
            messages: 0,
            at_t: i64::MAX,
            ..PartitionScan::default()
        };
        stats.insert(*p, (ps, 0u64));
    }
    c.assign(&tpl).map_err(k.err("assign partitions"))?;
    let mut ended = std::collections::BTreeSet::new();
    let mut batch = Vec::with_capacity(4096);
    let mut last_message = Instant::now();
    while ended.len() < share.len() {
        match c.poll(Duration::from_secs(30)) {
            Some(Ok(m)) => {
                last_message = Instant::now();
                let partition = m.partition();
                let Some((ps, without)) = stats.get_mut(&partition) else {
                    continue;
                };
                ps.end = m.offset() + 1;
                let ts = m.timestamp().to_millis().unwrap_or(i64::MIN);
                // The first message read; scan() keeps it only where
                // retention removed what came before it.
                ps.gone_before_ms.get_or_insert(ts);
                if ts >= o.t_ms && m.offset() < ps.at_t {
                    ps.at_t = m.offset();
                }
                if ts < o.from_ms {
                    continue;
                }
                ps.messages += 1;
                match o.id.extract(&m) {
                    Some(id) => batch.push(Seen {
                        id,
                        ts,
                        partition,
                        offset: m.offset(),
                    }),
                    None => *without += 1,
                }
                if batch.len() == batch.capacity() {
                    counter.fetch_add(batch.len() as u64, Ordering::Relaxed);
                    if tx
                        .send(std::mem::replace(&mut batch, Vec::with_capacity(4096)))
                        .is_err()
                    {
                        break;
                    }
                }
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                ended.insert(p);
            }
            // librdkafka reports a dropped connection and reconnects by
            // itself: informational, as its docs say. A broker that stays
            // away is caught by the 30 s without a message below.
            Some(Err(e))
                if matches!(
                    e.rdkafka_error_code(),
                    Some(
                        rdkafka::types::RDKafkaErrorCode::AllBrokersDown
                            | rdkafka::types::RDKafkaErrorCode::BrokerTransportFailure
                    )
                ) =>
            {
                if last_message.elapsed() > Duration::from_secs(30) {
                    return Err(k.err(format!("read {} (no message for 30 s)", o.topic))(e));
                }
                tracing::debug!(error = %e, "a broker connection dropped; librdkafka reconnects");
            }
            Some(Err(e)) => return Err(k.err(format!("read {}", o.topic))(e)),
            None => {
                return Err(KafkaError::Other {
                    bootstrap: k.shown.clone(),
                    what: format!(
                        "no message and no end of partition from {} for 30 s",
                        o.topic
                    ),
                })
            }
        }
    }
    counter.fetch_add(batch.len() as u64, Ordering::Relaxed);
    let _ = tx.send(batch);
    for (ps, _) in stats.values_mut() {
        if ps.at_t == i64::MAX {
            ps.at_t = ps.end;
        }
    }
    Ok(stats)
}

/// How many consumers a scan uses: one per partition up to a cap, so a
/// topic of many partitions does not start a consumer (and its threads and
/// connections) for each.
fn consumers(partitions: usize, cap: usize) -> usize {
    partitions.min(cap).max(1)
}

/// Where a scan's events go as they arrive.
pub trait Sink {
    /// The scan expects about `n` events (from the partitions' offsets).
    fn expect(&mut self, _n: usize) {}
    fn take(&mut self, events: Vec<Seen>) -> io::Result<()>;
}

impl Sink for Sorter {
    fn expect(&mut self, n: usize) {
        self.reserve(n);
    }

    fn take(&mut self, events: Vec<Seen>) -> io::Result<()> {
        self.extend(events)
    }
}

/// Scans the topic and returns its events sorted by id.
pub fn scan(k: &Kafka, o: &ScanOptions) -> Result<(Sorted, ScanStats), KafkaError> {
    let t0 = Instant::now();
    let mut sorter = Sorter::new(k.tuning.sort_chunk);
    let mut stats = scan_into(k, o, &mut sorter)?;
    let sorted = sorter.finish().map_err(|e| spill_error(k, e))?;
    stats.seconds = t0.elapsed().as_secs_f64();
    Ok((sorted, stats))
}

fn spill_error(k: &Kafka, e: io::Error) -> KafkaError {
    KafkaError::Other {
        bootstrap: k.shown.clone(),
        what: format!("cannot spill the sorted scan to disk: {e}"),
    }
}

/// Scans the topic, handing its events to `sink` in batches as they
/// arrive, in no order.
pub fn scan_into(k: &Kafka, o: &ScanOptions, sink: &mut dyn Sink) -> Result<ScanStats, KafkaError> {
    let t0 = Instant::now();
    let started_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let partitions = k.partitions(o.topic)?;
    let log_starts = k.log_starts(o.topic, &partitions)?;
    // The broker's answer may be coarse (some return the start): never late.
    let starts = match &o.start {
        Some(s) => partitions
            .iter()
            .map(|p| (*p, Some(s.get(p).copied().unwrap_or(0))))
            .collect(),
        None => k.offsets_at(o.topic, &partitions, o.from_ms.min(o.t_ms))?,
    };
    let counter = AtomicU64::new(0);
    let (tx, rx) = mpsc::sync_channel::<Vec<Seen>>(16);
    // Partitions with something to read, dealt round-robin to the consumers.
    let readable: Vec<(i32, i64)> = partitions
        .iter()
        .filter_map(|p| starts.get(p).copied().flatten().map(|s| (*p, s)))
        .collect();
    // Room for what the partitions hold past the start, once: a vector
    // that doubles as it fills ends up to twice the size it needs.
    let highs = k.list_offsets(o.topic, &partitions, Offset::End)?;
    let expected: i64 = readable
        .iter()
        .map(|(p, start)| {
            let high = highs.get(p).copied().flatten().unwrap_or(*start);
            (high - start).max(0)
        })
        .sum();
    sink.expect(usize::try_from(expected).unwrap_or(0));
    let n = consumers(readable.len(), k.tuning.scan_consumers);
    let shares: Vec<Vec<(i32, i64)>> = (0..n)
        .map(|i| readable.iter().skip(i).step_by(n).copied().collect())
        .collect();
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = shares
            .iter()
            .filter(|share| !share.is_empty())
            .map(|share| {
                let tx = tx.clone();
                let counter = &counter;
                s.spawn(move || scan_partitions(k, o, share, &tx, counter))
            })
            .collect();
        drop(tx);
        o.progress.stage(&format!("scanning {}", o.topic), None);
        let mut last = Instant::now();
        let mut sort_err = None;
        for batch in rx {
            if let Err(e) = sink.take(batch) {
                sort_err = Some(e);
                break;
            }
            if last.elapsed() > Duration::from_secs(1) {
                let n = counter.load(Ordering::Relaxed);
                o.progress.advance(n, &format!("{n} events"));
                last = Instant::now();
            }
        }
        o.progress.finish();
        let results: Vec<_> = handles
            .into_iter()
            .map(|h| h.join().expect("scan threads do not panic"))
            .collect();
        (results, sort_err)
    });
    let (results, sort_err) = results;
    if let Some(e) = sort_err {
        return Err(spill_error(k, e));
    }
    let mut stats = ScanStats {
        topic: o.topic.to_owned(),
        from_ms: o.from_ms,
        ..ScanStats::default()
    };
    let mut read = BTreeMap::new();
    for r in results {
        read.extend(r?);
    }
    for p in &partitions {
        let log_start = log_starts.get(p).copied().unwrap_or(0);
        let (mut ps, without) = match read.remove(p) {
            Some((mut ps, without)) => {
                // Started at the log start, past removed records: those may
                // have been as new as the first message left.
                if !(log_start > 0 && ps.from <= log_start) {
                    ps.gone_before_ms = None;
                }
                (ps, without)
            }
            None => {
                // Nothing at or after the start time: the end is where a rewind goes.
                let end = k.ends(o.topic, &[*p])?.get(p).copied().unwrap_or(0);
                let ps = PartitionScan {
                    from: end,
                    end,
                    messages: 0,
                    at_t: end,
                    log_start,
                    // Retention emptied the partition: anything it held
                    // before the scan may be gone.
                    gone_before_ms: (end > 0 && log_start >= end).then_some(started_ms),
                };
                (ps, 0)
            }
        };
        ps.log_start = log_start;
        stats.messages += ps.messages;
        stats.without_id += without;
        stats.gone_before_ms = stats.gone_before_ms.max(ps.gone_before_ms);
        stats.partitions.insert(*p, ps);
    }
    stats.seconds = t0.elapsed().as_secs_f64();
    Ok(stats)
}

/// External sort of events by id: sorted runs of `chunk` events spilled to
/// a scratch directory, merged on read.
pub struct Sorter {
    chunk: usize,
    buf: Vec<Seen>,
    runs: Vec<PathBuf>,
    dir: Option<ScratchDir>,
}

impl Sorter {
    pub fn new(chunk: usize) -> Sorter {
        Sorter {
            chunk: chunk.max(1),
            buf: Vec::new(),
            runs: Vec::new(),
            dir: None,
        }
    }

    /// Makes room for `n` events, at most a chunk's worth.
    pub fn reserve(&mut self, n: usize) {
        self.buf
            .reserve_exact(n.min(self.chunk).saturating_sub(self.buf.len()));
    }

    pub fn extend(&mut self, events: Vec<Seen>) -> io::Result<()> {
        for e in events {
            self.buf.push(e);
            if self.buf.len() >= self.chunk {
                self.spill()?;
            }
        }
        Ok(())
    }

    fn spill(&mut self) -> io::Result<()> {
        if self.dir.is_none() {
            self.dir = Some(ScratchDir::new("scan")?);
        }
        self.buf.sort_unstable();
        let path = self
            .dir
            .as_ref()
            .expect("created above")
            .path()
            .join(format!("run-{}", self.runs.len()));
        let mut w = BufWriter::new(
            crate::fsutil::private_options()
                .create(true)
                .truncate(true)
                .open(&path)?,
        );
        for e in self.buf.drain(..) {
            write_seen(&mut w, &e)?;
        }
        w.flush()?;
        self.runs.push(path);
        Ok(())
    }

    pub fn finish(mut self) -> io::Result<Sorted> {
        if self.runs.is_empty() {
            // Sorted on first read: a caller that only looks ids up never pays for it.
            return Ok(Sorted {
                memory: Some(self.buf),
                iter: Vec::new().into_iter(),
                readers: Vec::new(),
                heap: BinaryHeap::new(),
                _dir: None,
            });
        }
        if !self.buf.is_empty() {
            self.spill()?;
        }
        let mut readers = Vec::new();
        let mut heap = BinaryHeap::new();
        for (i, p) in self.runs.iter().enumerate() {
            let mut r = BufReader::new(File::open(p)?);
            if let Some(e) = read_seen(&mut r)? {
                heap.push(std::cmp::Reverse((e, i)));
            }
            readers.push(r);
        }
        Ok(Sorted {
            memory: None,
            iter: Vec::new().into_iter(),
            readers,
            heap,
            _dir: self.dir,
        })
    }
}

fn write_seen(w: &mut impl Write, e: &Seen) -> io::Result<()> {
    match (e.id.uuid(), e.id.text()) {
        (Some(u), _) => {
            w.write_all(&[0])?;
            w.write_all(&u.to_le_bytes())?;
        }
        (None, t) => {
            let t = t.expect("an id is a uuid or text").as_bytes();
            w.write_all(&[1])?;
            w.write_all(&(t.len() as u32).to_le_bytes())?;
            w.write_all(t)?;
        }
    }
    w.write_all(&e.ts.to_le_bytes())?;
    w.write_all(&e.partition.to_le_bytes())?;
    w.write_all(&e.offset.to_le_bytes())
}

fn read_seen(r: &mut impl Read) -> io::Result<Option<Seen>> {
    let mut tag = [0u8; 1];
    match r.read_exact(&mut tag) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut b16 = [0u8; 16];
    let mut b8 = [0u8; 8];
    let mut b4 = [0u8; 4];
    let id = if tag[0] == 0 {
        r.read_exact(&mut b16)?;
        Id::from_uuid(u128::from_le_bytes(b16))
    } else {
        r.read_exact(&mut b4)?;
        let mut t = vec![0u8; u32::from_le_bytes(b4) as usize];
        r.read_exact(&mut t)?;
        Id::from(String::from_utf8(t).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?)
    };
    r.read_exact(&mut b8)?;
    let ts = i64::from_le_bytes(b8);
    r.read_exact(&mut b4)?;
    let partition = i32::from_le_bytes(b4);
    r.read_exact(&mut b8)?;
    let offset = i64::from_le_bytes(b8);
    Ok(Some(Seen {
        id,
        ts,
        partition,
        offset,
    }))
}

/// Events in id order (ties by time, then position).
pub struct Sorted {
    memory: Option<Vec<Seen>>,
    iter: std::vec::IntoIter<Seen>,
    readers: Vec<BufReader<File>>,
    heap: BinaryHeap<std::cmp::Reverse<(Seen, usize)>>,
    _dir: Option<ScratchDir>,
}

impl Sorted {
    /// The events, in no particular order, when they never left memory;
    /// the merging reader otherwise.
    pub fn into_memory(mut self) -> Result<Vec<Seen>, Box<Sorted>> {
        match self.memory.take() {
            Some(v) => Ok(v),
            None => Err(Box::new(self)),
        }
    }
}

impl Iterator for Sorted {
    type Item = io::Result<Seen>;

    fn next(&mut self) -> Option<io::Result<Seen>> {
        if let Some(mut v) = self.memory.take() {
            v.sort_unstable();
            self.iter = v.into_iter();
        }
        if self.readers.is_empty() {
            return self.iter.next().map(Ok);
        }
        let std::cmp::Reverse((e, i)) = self.heap.pop()?;
        match read_seen(&mut self.readers[i]) {
            Ok(Some(next)) => self.heap.push(std::cmp::Reverse((next, i))),
            Ok(None) => {}
            Err(err) => return Some(Err(err)),
        }
        Some(Ok(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(id: &str, offset: i64) -> Seen {
        Seen {
            id: id.into(),
            ts: 1,
            partition: 0,
            offset,
        }
    }

    #[test]
    fn room_is_made_for_at_most_a_chunk() {
        let mut s = Sorter::new(1000);
        s.reserve(50_000_000);
        assert!(s.buf.capacity() >= 1000 && s.buf.capacity() < 2000);
    }

    #[test]
    fn spilled_runs_merge_into_one_order() {
        let mut s = Sorter::new(3);
        let ids = ["m", "b", "z", "a", "q", "c", "b", "y"];
        s.extend(
            ids.iter()
                .enumerate()
                .map(|(i, id)| seen(id, i as i64))
                .collect(),
        )
        .unwrap();
        assert_eq!(s.runs.len(), 2, "two full runs spilled");
        let out: Vec<String> = s
            .finish()
            .unwrap()
            .map(|e| e.unwrap().id.to_string())
            .collect();
        let mut want: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(out, want);
    }

    #[test]
    fn a_canonical_uuid_is_kept_as_bits_and_printed_back_the_same() {
        let text = "0a1b2c3d-0000-4000-8000-00000000002a";
        let id = Id::from(text);
        assert_eq!(id.uuid(), Some(0x0a1b2c3d_0000_4000_8000_00000000002a));
        assert_eq!(id.to_string(), text);
        assert!(id == *text);
        assert_eq!(String::from(id), text);
        // Anything else stays text, so equal ids have one representation.
        for other in [
            "0A1B2C3D-0000-4000-8000-00000000002A",
            "0a1b2c3d00004000800000000000002a",
            "0a1b2c3d-0000-4000-8000-00000000002g",
            "0a1b2c3d+0000-4000-8000-00000000002a",
            "case-1",
        ] {
            let id = Id::from(other);
            assert_eq!((id.uuid(), id.text()), (None, Some(other)));
            assert_eq!(Id::from_bytes(other.as_bytes()), Some(id));
        }
        assert_eq!(Id::from_bytes(b"\xff"), None);
    }

    #[test]
    fn uuids_and_text_ids_sort_together_as_their_text() {
        let texts = [
            "0",
            "00000000-0000-4000-8000-000000000001",
            "00000000-0000-4000-8000-00000000000a",
            "00000000-0000-4000-8000-00000000000A",
            "00000000-0000-4000-8000-000000000010",
            "00000000-0000-4000-8000-0000000000100",
            "00000000-0000-4000-8000-00000000001",
            "ffffffff-ffff-ffff-ffff-ffffffffffff",
            "G",
            "g",
        ];
        let mut ids: Vec<Id> = texts.iter().map(|t| Id::from(*t)).collect();
        ids.reverse();
        ids.sort();
        let mut want = texts.to_vec();
        want.sort();
        assert_eq!(ids.iter().map(Id::to_string).collect::<Vec<_>>(), want);
    }

    #[test]
    fn spilled_uuids_and_text_ids_read_back_whole() {
        let mut s = Sorter::new(2);
        let ids = [
            "00000000-0000-4000-8000-000000000002",
            "b",
            "00000000-0000-4000-8000-000000000001",
            "é",
            "a",
        ];
        s.extend(
            ids.iter()
                .enumerate()
                .map(|(i, id)| seen(id, i as i64))
                .collect(),
        )
        .unwrap();
        let out: Vec<Seen> = s.finish().unwrap().map(Result::unwrap).collect();
        let mut want: Vec<Seen> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| seen(id, i as i64))
            .collect();
        want.sort();
        assert_eq!(out, want);
        assert!(out[0].id.uuid().is_some());
    }

    #[test]
    fn ids_sort_by_bytes_as_collate_c_does() {
        let mut s = Sorter::new(100);
        s.extend(vec![seen("b", 0), seen("B", 1), seen("a", 2), seen("é", 3)])
            .unwrap();
        let out: Vec<String> = s
            .finish()
            .unwrap()
            .map(|e| e.unwrap().id.to_string())
            .collect();
        assert_eq!(out, ["B", "a", "b", "é"]);
    }
}
