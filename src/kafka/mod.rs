//! Kafka, through librdkafka (the `rdkafka` crate): partitions, offsets at a
//! time, committed offsets and members of a consumer group, commits,
//! single-message fetches and produces. The topic scan is in `scan`.

pub mod groups;
pub mod scan;
pub mod security;

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

const TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    /// rdkafka's error is shown in the message, not chained: its own
    /// Display already names its code, which it also gives as its source.
    #[error("Kafka at {bootstrap}: {what}: {error}")]
    Client {
        bootstrap: String,
        what: String,
        error: Box<rdkafka::error::KafkaError>,
    },
    #[error("Kafka at {bootstrap}: topic {topic} does not exist (or has no partitions)")]
    NoTopic { bootstrap: String, topic: String },
    #[error("Kafka at {bootstrap}: {what}")]
    Other { bootstrap: String, what: String },
}

/// A message, whole: what an orphan is staged with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    pub partition: i32,
    pub offset: i64,
    pub timestamp: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

/// A member of a consumer group, as the coordinator describes it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Member {
    pub id: String,
    pub client_id: String,
    pub host: String,
}

impl KafkaError {
    /// A broker down, a timeout, a coordinator or leader moving: worth
    /// another try, as a lost database connection is.
    pub fn is_transient(&self) -> bool {
        use rdkafka::types::RDKafkaErrorCode as C;
        let KafkaError::Client { error, .. } = self else {
            return false;
        };
        matches!(
            error.rdkafka_error_code(),
            Some(
                C::BrokerTransportFailure
                    | C::AllBrokersDown
                    | C::OperationTimedOut
                    | C::RequestTimedOut
                    | C::NetworkException
                    | C::LeaderNotAvailable
                    | C::NotLeaderForPartition
                    | C::BrokerNotAvailable
                    | C::CoordinatorLoadInProgress
                    | C::CoordinatorNotAvailable
                    | C::NotCoordinator
            )
        )
    }
}

impl Member {
    /// `ID (CLIENT on HOST)`, leaving out what the broker left empty.
    pub fn describe(&self) -> String {
        match (
            self.client_id.is_empty(),
            self.host.trim_start_matches('/').is_empty(),
        ) {
            (true, true) => self.id.clone(),
            (false, true) => format!("{} ({})", self.id, self.client_id),
            (true, false) => format!("{} (on {})", self.id, self.host),
            (false, false) => format!("{} ({} on {})", self.id, self.client_id, self.host),
        }
    }
}

/// Reads a partition from an offset. A broker that serves nothing from an
/// offset inside a record batch (some Kafka-protocol brokers do) gets a
/// second chance: reading from the partition's start, skipping forward.
struct Reader<'a> {
    k: &'a Kafka,
    c: &'a BaseConsumer,
    topic: &'a str,
    partition: i32,
    start: i64,
    restarted: bool,
    first: bool,
}

impl<'a> Reader<'a> {
    fn new(
        k: &'a Kafka,
        c: &'a BaseConsumer,
        topic: &'a str,
        partition: i32,
        start: i64,
    ) -> Result<Reader<'a>, KafkaError> {
        let r = Reader {
            k,
            c,
            topic,
            partition,
            start,
            restarted: false,
            first: true,
        };
        r.assign(Offset::Offset(start))?;
        Ok(r)
    }

    fn assign(&self, o: Offset) -> Result<(), KafkaError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(self.topic, self.partition, o)
            .map_err(self.k.err("build a partition list"))?;
        self.c
            .assign(&tpl)
            .map_err(self.k.err("assign a partition"))
    }

    #[allow(clippy::type_complexity)]
    fn poll(
        &mut self,
    ) -> Result<
        Option<Result<rdkafka::message::BorrowedMessage<'a>, rdkafka::error::KafkaError>>,
        KafkaError,
    > {
        if self.first && self.start > 0 && !self.restarted {
            let got = self.c.poll(Duration::from_secs(1));
            if got.is_some() {
                self.first = false;
                return Ok(got);
            }
            tracing::debug!(
                topic = self.topic,
                partition = self.partition,
                offset = self.start,
                "nothing served from this offset; reading from the partition's start"
            );
            self.restarted = true;
            self.assign(Offset::Beginning)?;
        }
        self.first = false;
        Ok(self.c.poll(TIMEOUT))
    }

    /// The next message, or None at the partition's end.
    fn next(&mut self) -> Result<Option<rdkafka::message::BorrowedMessage<'a>>, KafkaError> {
        match self.poll()? {
            Some(Ok(m)) => Ok(Some(m)),
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => Ok(None),
            Some(Err(e)) => Err(self
                .k
                .err(format!("read {}/{}", self.topic, self.partition))(
                e
            )),
            None => Err(KafkaError::Other {
                bootstrap: self.k.shown.clone(),
                what: format!("no answer reading {}/{}", self.topic, self.partition),
            }),
        }
    }
}

/// Each partition's offset in a broker's answer; None where it has none.
fn by_partition(list: &TopicPartitionList) -> BTreeMap<i32, Option<i64>> {
    list.elements()
        .iter()
        .map(|e| {
            let o = match e.offset() {
                Offset::Offset(o) => Some(o),
                Offset::Beginning => Some(0),
                _ => None,
            };
            (e.partition(), o)
        })
        .collect()
}

/// A message to produce.
#[derive(Debug, Clone, Default)]
pub struct Outgoing {
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// CreateTime in ms since the epoch; now when None.
    pub timestamp: Option<i64>,
}

#[derive(Clone)]
pub struct Kafka {
    bootstrap: String,
    /// How errors name the brokers: a playbook's `${VAR}` template, never
    /// the value it expands to.
    shown: String,
    pub tuning: Tuning,
    /// TLS, SASL and any other librdkafka property.
    pub security: security::Security,
    /// The first use's check of a secured cluster, shared by clones.
    probed: Arc<OnceLock<Result<(), String>>>,
    /// One client for metadata and offset lookups, made at first use and
    /// shared by clones: making a client costs a connection and its
    /// handshakes, and a scan asks three questions before it reads.
    meta: Arc<OnceLock<Closing>>,
}

/// A consumer that leaves its group at once when dropped.
///
/// rust-rdkafka closes a consumer with a `group.id` on drop by polling its
/// queue 100 ms at a time until librdkafka says it is closed; the close is
/// served in a millisecond, but no event wakes that poll, so every consumer
/// took 100 ms to drop: a tenth of a scan of a million events, spent after
/// the last message (bench/outbox). reentry's consumers hold no
/// subscription, and a commit (`commit_all`, synchronous) is done before
/// the drop. Past 10 s of polling here, rust-rdkafka's own drop takes over
/// as before (librdkafka answers its second close "in progress").
pub struct Closing(BaseConsumer);

impl std::ops::Deref for Closing {
    type Target = BaseConsumer;

    fn deref(&self) -> &BaseConsumer {
        &self.0
    }
}

impl Drop for Closing {
    fn drop(&mut self) {
        if self.0.close_queue().is_err() {
            // rust-rdkafka's own drop tries again, as it would have.
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.0.closed() && Instant::now() < deadline {
            self.0.poll(Duration::from_millis(1));
        }
    }
}

/// How topic scans use the machine: the playbook's `[kafka]` settings,
/// else the environment (`REENTRY_SCAN_CONSUMERS`, `REENTRY_SORT_CHUNK`),
/// else the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// Consumers reading a topic's partitions in parallel, at most.
    pub scan_consumers: usize,
    /// Events sorted in memory before a run is spilled to disk.
    pub sort_chunk: usize,
}

impl Tuning {
    pub fn new(scan_consumers: Option<usize>, sort_chunk: Option<usize>) -> Tuning {
        let env = |var: &str| std::env::var(var).ok().and_then(|v| v.parse().ok());
        Tuning {
            scan_consumers: scan_consumers
                .or_else(|| env("REENTRY_SCAN_CONSUMERS"))
                .unwrap_or(8)
                .max(1),
            sort_chunk: sort_chunk
                .or_else(|| env("REENTRY_SORT_CHUNK"))
                .unwrap_or(2_000_000)
                .max(1),
        }
    }
}

impl Default for Tuning {
    fn default() -> Tuning {
        Tuning::new(None, None)
    }
}

impl Kafka {
    pub fn new(bootstrap: &str) -> Kafka {
        Kafka {
            bootstrap: bootstrap.to_owned(),
            shown: bootstrap.to_owned(),
            tuning: Tuning::default(),
            security: security::Security::default(),
            probed: Arc::default(),
            meta: Arc::default(),
        }
    }

    /// The same cluster, reached with `security`.
    pub fn with_security(mut self, security: security::Security) -> Kafka {
        self.security = security;
        self.probed = Arc::default();
        self.meta = Arc::default();
        self
    }

    /// The playbook's `[kafka]`; an error names the key that is wrong.
    pub fn from_playbook(k: &crate::reentry::playbook::Kafka) -> Result<Kafka, String> {
        let expose = |v: &Option<crate::reentry::playbook::Interpolated>| {
            v.as_ref().map(|v| v.expose().to_owned())
        };
        let settings = security::Settings {
            security_protocol: k.security_protocol.clone(),
            sasl_mechanism: k.sasl_mechanism.clone(),
            sasl_username: expose(&k.sasl_username),
            sasl_password: expose(&k.sasl_password),
            ssl_ca: k.ssl_ca.clone(),
            ssl_certificate: k.ssl_certificate.clone(),
            ssl_key: k.ssl_key.clone(),
            ssl_key_password: expose(&k.ssl_key_password),
            properties: k
                .properties
                .iter()
                .map(|(key, v)| (key.clone(), v.expose().to_owned()))
                .collect(),
        };
        let security =
            security::Security::from_settings(&settings).map_err(|e| format!("[kafka] {e}"))?;
        Ok(Kafka {
            bootstrap: k.bootstrap.expose().to_owned(),
            shown: k.bootstrap.template.clone(),
            tuning: Tuning::new(
                k.scan_consumers.map(|n| n as usize),
                k.sort_chunk.map(|n| n as usize),
            ),
            security,
            probed: Arc::default(),
            meta: Arc::default(),
        })
    }

    fn err(
        &self,
        what: impl Into<String>,
    ) -> impl FnOnce(rdkafka::error::KafkaError) -> KafkaError + '_ {
        let what = what.into();
        move |e| KafkaError::Client {
            bootstrap: self.shown.clone(),
            what,
            error: Box::new(e),
        }
    }

    fn config(&self, group: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap)
            .set("client.id", "reentry")
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest")
            // librdkafka's default too, said out loud: an aborted
            // transaction's records were never published, and no consumer
            // on read_committed (Kafka Streams, Spring with transactions)
            // ever saw them.
            .set("isolation.level", "read_committed")
            .set("fetch.wait.max.ms", "100")
            // librdkafka prefetches 100,000 messages a partition by default,
            // about 180 bytes each besides the payload, in fetches of up to
            // 1 MiB a partition: a scan of a million events held most of the
            // topic in its queues. 2,000 messages and fetches of 256 KiB keep
            // them full enough (a larger message still comes whole), and
            // refilling them at once, not after the default second's
            // back-off, keeps the scan as fast (bench/outbox: 100 MiB less,
            // the same time).
            .set("queued.min.messages", "2000")
            .set("fetch.message.max.bytes", "262144")
            .set("fetch.queue.backoff.ms", "1")
            .set("log_level", "3");
        self.security.apply(&mut c);
        c
    }

    /// A secured cluster is checked once, at first use: a wrong password or
    /// certificate stops reentry at once, where librdkafka would retry.
    fn probe(&self) -> Result<(), KafkaError> {
        if !self.security.secured() {
            return Ok(());
        }
        self.probed
            .get_or_init(|| security::probe(&self.config("reentry-probe"), &self.security, TIMEOUT))
            .clone()
            .map_err(|what| KafkaError::Other {
                bootstrap: self.shown.clone(),
                what,
            })
    }

    /// A consumer that never joins its group: it reads assigned partitions,
    /// and reads or writes the group's committed offsets.
    pub fn consumer(&self, group: &str) -> Result<Closing, KafkaError> {
        self.probe()?;
        self.config(group)
            .create()
            .map(Closing)
            .map_err(self.err("create a consumer"))
    }

    /// The shared client for metadata and offset lookups.
    fn meta(&self) -> Result<&Closing, KafkaError> {
        if let Some(c) = self.meta.get() {
            return Ok(c);
        }
        let c = self.consumer("reentry-metadata")?;
        Ok(self.meta.get_or_init(|| c))
    }

    pub fn partitions(&self, topic: &str) -> Result<Vec<i32>, KafkaError> {
        let c = self.meta()?;
        let md = c
            .fetch_metadata(Some(topic), TIMEOUT)
            .map_err(self.err(format!("read the metadata of {topic}")))?;
        let parts: Vec<i32> = md
            .topics()
            .iter()
            .filter(|t| t.name() == topic && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if parts.is_empty() {
            return Err(KafkaError::NoTopic {
                bootstrap: self.shown.clone(),
                topic: topic.to_owned(),
            });
        }
        let mut parts = parts;
        parts.sort_unstable();
        Ok(parts)
    }

    /// The broker's offsets-for-times: per partition, the earliest offset
    /// whose timestamp is at or after `ms`, or `None` when there is none.
    /// Some brokers answer coarsely (the partition's start); callers that
    /// need the exact offset scan from here.
    pub fn offsets_at(
        &self,
        topic: &str,
        partitions: &[i32],
        ms: i64,
    ) -> Result<BTreeMap<i32, Option<i64>>, KafkaError> {
        self.list_offsets(topic, partitions, Offset::Offset(ms))
    }

    /// Each partition's log start: the first offset retention (or a
    /// delete-records) has left.
    pub fn log_starts(
        &self,
        topic: &str,
        partitions: &[i32],
    ) -> Result<BTreeMap<i32, i64>, KafkaError> {
        Ok(self
            .list_offsets(topic, partitions, Offset::Beginning)?
            .into_iter()
            .map(|(p, o)| (p, o.unwrap_or(0)))
            .collect())
    }

    /// ListOffsets for each partition: at a time, at the start or at the end.
    fn list_offsets(
        &self,
        topic: &str,
        partitions: &[i32],
        at: Offset,
    ) -> Result<BTreeMap<i32, Option<i64>>, KafkaError> {
        let c = self.meta()?;
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            tpl.add_partition_offset(topic, *p, at)
                .map_err(self.err("build a partition list"))?;
        }
        let got = c
            .offsets_for_times(tpl, TIMEOUT)
            .map_err(self.err(format!("ask for offsets of {topic}")))?;
        Ok(by_partition(&got))
    }

    /// The earliest offset at or after `start` whose timestamp is at or
    /// after `ms`; the partition's end when there is none. `start` comes
    /// from `offsets_at`, which is exact on Kafka and coarse on some brokers.
    pub fn first_at_or_after(
        &self,
        topic: &str,
        partition: i32,
        start: i64,
        ms: i64,
    ) -> Result<i64, KafkaError> {
        let c = self.consumer("reentry-scan")?;
        let mut reader = Reader::new(self, &c, topic, partition, start)?;
        let mut end = start;
        while let Some(m) = reader.next()? {
            if m.timestamp().to_millis().unwrap_or(i64::MIN) >= ms {
                return Ok(m.offset());
            }
            end = m.offset() + 1;
        }
        Ok(end)
    }

    /// The committed messages in `[from, to)` of a partition: what a
    /// consumer on read_committed is given there. Offsets alone overcount
    /// on a transactional topic: each transaction's commit or abort marker
    /// takes an offset, and an aborted transaction's records are skipped.
    pub fn count(
        &self,
        topic: &str,
        partition: i32,
        from: i64,
        to: i64,
    ) -> Result<u64, KafkaError> {
        if to <= from {
            return Ok(0);
        }
        let c = self.consumer("reentry-scan")?;
        let mut reader = Reader::new(self, &c, topic, partition, from)?;
        let mut n = 0;
        while let Some(m) = reader.next()? {
            if m.offset() >= to {
                break;
            }
            if m.offset() >= from {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Each partition's end: one past its last message. The broker's answer
    /// is read forward to the end of the partition, because some brokers
    /// report it late.
    pub fn ends(&self, topic: &str, partitions: &[i32]) -> Result<BTreeMap<i32, i64>, KafkaError> {
        let mut out = BTreeMap::new();
        for (p, reported) in self.list_offsets(topic, partitions, Offset::End)? {
            let end = self.first_at_or_after(topic, p, reported.unwrap_or(0), i64::MAX)?;
            out.insert(p, end);
        }
        Ok(out)
    }

    /// Per partition, where a consumer must start to see every message at
    /// or after `ms`.
    pub fn offsets_for_time(&self, topic: &str, ms: i64) -> Result<BTreeMap<i32, i64>, KafkaError> {
        let parts = self.partitions(topic)?;
        if ms == i64::MAX {
            return self.ends(topic, &parts);
        }
        let coarse = self.offsets_at(topic, &parts, ms)?;
        let mut out = BTreeMap::new();
        for p in &parts {
            let o = match coarse.get(p).copied().flatten() {
                Some(start) => self.first_at_or_after(topic, *p, start, ms)?,
                None => self.ends(topic, &[*p])?.get(p).copied().unwrap_or(0),
            };
            out.insert(*p, o);
        }
        Ok(out)
    }

    /// The group's committed offsets for `topic` (None: nothing committed).
    pub fn committed(
        &self,
        group: &str,
        topic: &str,
        partitions: &[i32],
    ) -> Result<BTreeMap<i32, Option<i64>>, KafkaError> {
        let c = self.consumer(group)?;
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            tpl.add_partition(topic, *p);
        }
        let got = c
            .committed_offsets(tpl, TIMEOUT)
            .map_err(self.err(format!("read the committed offsets of group {group}")))?;
        Ok(by_partition(&got))
    }

    /// The group's live members: a rewind is refused while there are any.
    /// Groups on either protocol, classic or consumer (KIP-848), are seen.
    pub fn members(&self, group: &str) -> Result<Vec<Member>, KafkaError> {
        Ok(self.describe_group(group)?.members)
    }

    /// The group as its coordinator describes it: state, protocol, members.
    pub fn describe_group(&self, group: &str) -> Result<groups::Described, KafkaError> {
        let c = self.consumer("reentry-metadata")?;
        groups::describe(&c, group, TIMEOUT).map_err(|what| KafkaError::Other {
            bootstrap: self.shown.clone(),
            what: format!("describe group {group}: {what}"),
        })
    }

    /// Commits offsets for a group that has no live member.
    pub fn commit(
        &self,
        group: &str,
        topic: &str,
        offsets: &BTreeMap<i32, i64>,
    ) -> Result<(), KafkaError> {
        let mut all = BTreeMap::new();
        all.insert(topic.to_owned(), offsets.clone());
        self.commit_all(group, &all)
    }

    /// Offsets of several topics in one OffsetCommit request, so that a
    /// refusal moves none of them rather than the topics before it.
    pub fn commit_all(
        &self,
        group: &str,
        offsets: &BTreeMap<String, BTreeMap<i32, i64>>,
    ) -> Result<(), KafkaError> {
        let c = self.consumer(group)?;
        let mut tpl = TopicPartitionList::new();
        for (topic, parts) in offsets {
            for (p, o) in parts {
                tpl.add_partition_offset(topic, *p, Offset::Offset(*o))
                    .map_err(self.err("build a partition list"))?;
            }
        }
        c.commit(&tpl, CommitMode::Sync)
            .map_err(self.err(format!("commit offsets for group {group}")))
    }

    /// The bootstrap servers as shown in messages (no secrets).
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// Many messages by position, reading each partition once.
    pub fn fetch_many(
        &self,
        topic: &str,
        wanted: &[(i32, i64)],
    ) -> Result<BTreeMap<(i32, i64), Fetched>, KafkaError> {
        let mut by_partition: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
        for (p, o) in wanted {
            by_partition.entry(*p).or_default().push(*o);
        }
        let mut out = BTreeMap::new();
        for (p, mut offsets) in by_partition {
            offsets.sort_unstable();
            let (first, last) = (offsets[0], *offsets.last().expect("not empty"));
            let c = self.consumer("reentry-fetch")?;
            let mut reader = Reader::new(self, &c, topic, p, first)?;
            loop {
                match reader.poll()? {
                    Some(Ok(m)) => {
                        if offsets.binary_search(&m.offset()).is_ok() {
                            out.insert(
                                (p, m.offset()),
                                Fetched {
                                    partition: p,
                                    offset: m.offset(),
                                    timestamp: m.timestamp().to_millis(),
                                    key: m.key().map(<[u8]>::to_vec),
                                    payload: m.payload().map(<[u8]>::to_vec),
                                    headers: m
                                        .headers()
                                        .map(|h| {
                                            h.iter()
                                                .map(|x| {
                                                    (x.key.to_owned(), x.value.map(<[u8]>::to_vec))
                                                })
                                                .collect()
                                        })
                                        .unwrap_or_default(),
                                },
                            );
                        }
                        if m.offset() >= last {
                            break;
                        }
                    }
                    Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => break,
                    Some(Err(e)) => return Err(self.err(format!("read {topic}/{p}"))(e)),
                    None => {
                        return Err(KafkaError::Other {
                            bootstrap: self.shown.clone(),
                            what: format!("no answer reading {topic}/{p}"),
                        })
                    }
                }
            }
        }
        Ok(out)
    }

    /// Produces messages and waits until every one is acknowledged; an
    /// error names the first the broker did not take.
    pub fn produce(&self, topic: &str, messages: &[Outgoing]) -> Result<(), KafkaError> {
        match self
            .produce_each(topic, messages)?
            .into_iter()
            .find_map(Result::err)
        {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Produces messages and waits for the broker's word on each: in the
    /// messages' order, `Ok` for one it acknowledged, else why it was not
    /// delivered. A message the broker refuses (too large, not
    /// authorised) is dropped by the client with only a delivery report,
    /// so the reports are what says whether a message was sent.
    pub fn produce_each(
        &self,
        topic: &str,
        messages: &[Outgoing],
    ) -> Result<Vec<Result<(), KafkaError>>, KafkaError> {
        self.probe()?;
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap)
            .set("client.id", "reentry")
            .set("enable.idempotence", "false")
            .set("log_level", "3");
        self.security.apply(&mut config);
        let p: BaseProducer<Deliveries> = config
            .create_with_context(Deliveries::default())
            .map_err(self.err("create a producer"))?;
        for (i, m) in messages.iter().enumerate() {
            let mut h = OwnedHeaders::new();
            for (k, v) in &m.headers {
                h = h.insert(Header {
                    key: k,
                    value: Some(v),
                });
            }
            let mut r: BaseRecord<'_, [u8], [u8], usize> = BaseRecord::with_opaque_to(topic, i)
                .payload(m.payload.as_slice())
                .headers(h);
            if let Some(k) = &m.key {
                r = r.key(k.as_slice());
            }
            if let Some(t) = m.timestamp {
                r = r.timestamp(t);
            }
            loop {
                match p.send(r) {
                    Ok(()) => break,
                    Err((
                        rdkafka::error::KafkaError::MessageProduction(
                            rdkafka::types::RDKafkaErrorCode::QueueFull,
                        ),
                        back,
                    )) => {
                        p.poll(Duration::from_millis(50));
                        r = back;
                    }
                    Err((e, _)) => return Err(self.err(format!("produce to {topic}"))(e)),
                }
            }
        }
        // A flush that times out leaves messages without a report: not
        // delivered, as far as anyone can tell.
        let flushed = p.flush(TIMEOUT);
        let mut reports = std::mem::take(
            &mut *p
                .context()
                .reports
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        Ok((0..messages.len())
            .map(|i| match reports.remove(&i) {
                Some(Ok(())) => Ok(()),
                Some(Err(e)) => Err(self.err(format!(
                    "deliver message {} of {} to {topic}",
                    i + 1,
                    messages.len()
                ))(e)),
                None => Err(match &flushed {
                    Err(e) => self.err(format!(
                        "deliver message {} of {} to {topic} (no delivery report)",
                        i + 1,
                        messages.len()
                    ))(e.clone()),
                    Ok(()) => KafkaError::Other {
                        bootstrap: self.shown.clone(),
                        what: format!(
                            "deliver message {} of {} to {topic}: no delivery report",
                            i + 1,
                            messages.len()
                        ),
                    },
                }),
            })
            .collect())
    }
}

/// Each message's delivery report, by its index in the batch.
#[derive(Default)]
struct Deliveries {
    reports: std::sync::Mutex<BTreeMap<usize, Result<(), rdkafka::error::KafkaError>>>,
}

impl rdkafka::ClientContext for Deliveries {}

impl rdkafka::producer::ProducerContext for Deliveries {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &rdkafka::message::DeliveryResult<'_>, index: usize) {
        let outcome = match result {
            Ok(_) => Ok(()),
            Err((e, _)) => Err(e.clone()),
        };
        self.reports
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(index, outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::Member;

    #[test]
    fn broker_outages_and_timeouts_are_transient_and_bad_requests_are_not() {
        use rdkafka::types::RDKafkaErrorCode as C;
        let e = |code| super::KafkaError::Client {
            bootstrap: "${KAFKA}".into(),
            what: "list offsets".into(),
            error: Box::new(rdkafka::error::KafkaError::MetadataFetch(code)),
        };
        assert!(e(C::AllBrokersDown).is_transient());
        assert!(e(C::RequestTimedOut).is_transient());
        assert!(e(C::NotCoordinator).is_transient());
        assert!(!e(C::UnknownTopicOrPartition).is_transient());
        assert!(!e(C::GroupAuthorizationFailed).is_transient());
        // The chain names the brokers by template, and the cause once.
        let shown = crate::diag::chain(&e(C::AllBrokersDown));
        assert_eq!(
            shown.matches("brokers are down").count() + shown.matches("AllBrokersDown").count(),
            1,
            "{shown}"
        );
        assert!(
            shown.starts_with("Kafka at ${KAFKA}: list offsets: "),
            "{shown}"
        );
    }

    #[test]
    fn a_member_is_named_by_what_the_broker_gives() {
        let m = |client: &str, host: &str| Member {
            id: "rdkafka-1a2b".into(),
            client_id: client.into(),
            host: host.into(),
        };
        assert_eq!(
            m("rdkafka", "/127.0.0.1").describe(),
            "rdkafka-1a2b (rdkafka on /127.0.0.1)"
        );
        assert_eq!(m("", "").describe(), "rdkafka-1a2b");
        assert_eq!(m("", "/").describe(), "rdkafka-1a2b");
        assert_eq!(
            m("case-projector", "").describe(),
            "rdkafka-1a2b (case-projector)"
        );
        assert_eq!(m("", "/10.0.0.7").describe(), "rdkafka-1a2b (on /10.0.0.7)");
    }
}
