//! The sample application: a Java case-management service, as a small
//! program. It behaves as the Java side does, and keeps its own
//! records of what it did, outside the database, where a PITR cannot take
//! them back:
//!
//! - API writes check the `api-writes` gate in their transaction, write the
//!   case and an outbox row together, then write the case through to Redis.
//! - The outbox relay, paused by `outbox-relay`, publishes outbox rows to
//!   Kafka with the row id in header `event_id`, then marks them published.
//! - The projector (group `case-search-projector`, paused by
//!   `case-projector`: it leaves the group while closed) records each event
//!   in `inbox_message` with its effect (`case_projection`) in one
//!   transaction, and indexes the case in the search index with external
//!   versioning.
//! - A cache-aside reader fills `case:{id}`; cache writes carry the row's
//!   version, and an older one never replaces a newer one.
//! - Payments carry idempotency keys and call the provider, whose memory is
//!   `provider.csv`: one line per executed request. Clients retry every
//!   payment once a few seconds later, as clients that timed out do.
//! - `escalate-overdue-cases` runs under ShedLock (its JDBC provider's own
//!   statements) and logs each run in `shedlock-runs.log`; `remind-owners`
//!   runs under a real Quartz 2.3 scheduler (lab/quartz) and logs in
//!   `quartz-runs.log`.
//! - Clients log every request and its outcome in `requests.log`, refusals
//!   included, and retry refused requests until they go through.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::common::*;

/// One API request.
#[derive(Clone, Debug)]
pub enum Req {
    Create(String),
    Rename(i64, String),
    Assign(i64, i64),
    Close(i64),
    Pay(i64, String, i64),
}

impl Req {
    fn name(&self) -> String {
        match self {
            Req::Create(_) => "create".into(),
            Req::Rename(id, _) => format!("rename {id}"),
            Req::Assign(id, o) => format!("assign {id} {o}"),
            Req::Close(id) => format!("close {id}"),
            Req::Pay(id, k, _) => format!("pay {id} {k}"),
        }
    }
}

#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// Done: the case's JSON (or the payment's answer).
    Done(String),
    /// The `api-writes` gate is closed: try again later.
    Refused,
    /// Not allowed (the case is closed or missing).
    Rejected,
    /// The key was seen: the stored answer, and nothing executed.
    Replayed,
    /// The key is known without an answer (a tombstone): nothing executed.
    Tombstoned,
}

impl Outcome {
    fn word(&self) -> &'static str {
        match self {
            Outcome::Done(_) => "done",
            Outcome::Refused => "refused",
            Outcome::Rejected => "rejected",
            Outcome::Replayed => "replayed",
            Outcome::Tombstoned => "tombstoned",
        }
    }
}

/// Writes a case change and its event in the caller's transaction, as
/// `who`; the case's JSON.
fn write_case(
    tx: &mut postgres::Transaction<'_>,
    sql: &str,
    params: &[&(dyn postgres::types::ToSql + Sync)],
    event: &str,
) -> Result<Option<String>, postgres::Error> {
    let Some(row) = tx.query_opt(
        &format!("{sql} RETURNING id, {CASE_JSON}, updated_by"),
        params,
    )?
    else {
        return Ok(None);
    };
    let (id, json, by): (i64, String, String) = (row.get(0), row.get(1), row.get(2));
    outbox(
        tx,
        id,
        &format!(r#"{{"type":"{event}","by":"{by}","case":{json}}}"#),
    )?;
    Ok(Some(json))
}

/// An event about case `case`, in the outbox, in the caller's transaction.
pub fn outbox(
    tx: &mut postgres::Transaction<'_>,
    case: i64,
    payload: &str,
) -> Result<(), postgres::Error> {
    tx.execute(
        "INSERT INTO outbox_event (id, topic, aggregate_id, payload) \
         VALUES (gen_random_uuid(), $1, $2, $3::text::jsonb)",
        &[&TOPIC, &case.to_string(), &payload],
    )?;
    Ok(())
}

/// The provider: executes a request, and remembers it in its CSV export.
fn provider_execute(lab: &Lab, key: &str, case: i64, amount: i64) {
    append(
        &lab.path("provider.csv"),
        &format!("{key},{case},{amount},{}", jiff::Timestamp::now()),
    );
}

/// One API request, in one transaction that checks the gate first.
pub fn api(lab: &Lab, db: &mut postgres::Client, r: &Req) -> Result<Outcome, postgres::Error> {
    let mut tx = db.transaction()?;
    if !gate_open(&mut tx, GATE_API)? {
        return Ok(Outcome::Refused);
    }
    let written = match r {
        Req::Create(title) => write_case(
            &mut tx,
            "INSERT INTO cases (title, status, owner_id, updated_by, updated_at) \
             VALUES ($1, 'open', 1 + (random() * 9)::int, 'api', clock_timestamp())",
            &[title],
            "case-created",
        )?,
        Req::Rename(id, title) => write_case(
            &mut tx,
            "UPDATE cases SET title = $2, updated_by = 'api', updated_at = clock_timestamp() \
             WHERE id = $1 AND status = 'open'",
            &[id, title],
            "case-renamed",
        )?,
        Req::Assign(id, owner) => write_case(
            &mut tx,
            "UPDATE cases SET owner_id = $2, updated_by = 'api', updated_at = clock_timestamp() \
             WHERE id = $1 AND status = 'open'",
            &[id, owner],
            "case-assigned",
        )?,
        Req::Close(id) => write_case(
            &mut tx,
            "UPDATE cases SET status = 'closed', updated_by = 'api', updated_at = clock_timestamp() \
             WHERE id = $1 AND status = 'open'",
            &[id],
            "case-closed",
        )?,
        Req::Pay(case, key, amount) => {
            let claimed = tx.execute(
                "INSERT INTO idempotency_key (idem_key, created_at) VALUES ($1, clock_timestamp()) \
                 ON CONFLICT DO NOTHING",
                &[key],
            )?;
            if claimed == 0 {
                let answer: Option<String> = tx
                    .query_one(
                        "SELECT response::text FROM idempotency_key WHERE idem_key = $1",
                        &[key],
                    )?
                    .get(0);
                tx.commit()?;
                return Ok(if answer.is_some() {
                    Outcome::Replayed
                } else {
                    Outcome::Tombstoned
                });
            }
            provider_execute(lab, key, *case, *amount);
            let answer = format!(r#"{{"paid":{amount},"case":{case}}}"#);
            tx.execute(
                "UPDATE idempotency_key SET response = $2::text::jsonb WHERE idem_key = $1",
                &[key, &answer],
            )?;
            tx.execute(
                "INSERT INTO payments (idem_key, case_id, amount) VALUES ($1, $2, $3)",
                &[key, case, amount],
            )?;
            let payload = format!(
                r#"{{"type":"payment-recorded","payment":{{"key":"{key}","case":{case},"amount":{amount}}}}}"#
            );
            outbox(&mut tx, *case, &payload)?;
            tx.commit()?;
            return Ok(Outcome::Done(answer));
        }
    };
    tx.commit()?;
    Ok(match written {
        Some(json) => Outcome::Done(json),
        None => Outcome::Rejected,
    })
}

/// Redis: a case's JSON written only over an older version.
pub struct Cache {
    conn: redis::Connection,
    script: redis::Script,
}

impl Cache {
    pub fn connect(url: &str) -> Result<Cache, String> {
        let conn = redis::Client::open(url)
            .and_then(|c| c.get_connection())
            .map_err(|e| format!("Redis {url}: {e}"))?;
        let script = redis::Script::new(
            r"local cur = redis.call('GET', KEYS[1])
              if cur then
                local v = cjson.decode(cur)['version']
                if v and v >= tonumber(ARGV[2]) then return 0 end
              end
              redis.call('SET', KEYS[1], ARGV[1])
              return 1",
        );
        Ok(Cache { conn, script })
    }

    pub fn put(&mut self, json: &str) -> redis::RedisResult<()> {
        let v: serde_json::Value = serde_json::from_str(json).expect("case JSON");
        let key = format!("case:{}", v["id"]);
        let _: i64 = self
            .script
            .key(key)
            .arg(json)
            .arg(v["version"].as_i64().unwrap_or(0))
            .invoke(&mut self.conn)?;
        Ok(())
    }

    pub fn get(&mut self, id: i64) -> redis::RedisResult<Option<String>> {
        redis::cmd("GET")
            .arg(format!("case:{id}"))
            .query(&mut self.conn)
    }
}

/// Indexes cases with their version as an external version: a late,
/// older write is refused (409), which is not an error.
pub fn index_cases(
    http: &reqwest::blocking::Client,
    search: &str,
    cases: &[String],
) -> Result<(), String> {
    if cases.is_empty() {
        return Ok(());
    }
    let mut body = String::new();
    for json in cases {
        let v: serde_json::Value = serde_json::from_str(json).expect("case JSON");
        body.push_str(
            &serde_json::json!({ "index": { "_index": INDEX, "_id": v["id"].to_string(),
                "version": v["version"], "version_type": "external" } })
            .to_string(),
        );
        body.push('\n');
        body.push_str(json);
        body.push('\n');
    }
    let r = http
        .post(format!("{search}/_bulk"))
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .map_err(|e| format!("search: {e}"))?;
    let status = r.status();
    let v: serde_json::Value = r.json().map_err(|e| format!("search: {e}"))?;
    if !status.is_success() {
        return Err(format!("search: HTTP {status}: {v}"));
    }
    for item in v["items"].as_array().into_iter().flatten() {
        let s = item["index"]["status"].as_u64().unwrap_or(0);
        if s >= 300 && s != 409 {
            return Err(format!("search: bulk item {item}"));
        }
    }
    Ok(())
}

/// Runs every part of the application until `stop` exists.
pub fn run(lab: &Lab, clients: usize) -> Result<(), String> {
    let mut on = lab.conninfo()?;
    let mut quartz = start_quartz(lab)?;
    let mut threads = Vec::new();
    for c in 0..clients {
        let l = lab.clone();
        threads.push(thread::spawn(move || client(&l, c)));
    }
    let parts: [fn(&Lab); 4] = [relay, projector, reader, shedlock_job];
    for f in parts {
        let l = lab.clone();
        threads.push(thread::spawn(move || f(&l)));
    }
    // Quartz's job store is the database: on a switch, the scheduler
    // stops and starts again on the new one, as a redeploy does.
    while !lab.stopping() {
        pause(200);
        match lab.conninfo() {
            Ok(now) if now != on => {
                stop_quartz(quartz);
                quartz = start_quartz(lab)?;
                append(
                    &lab.path("app.log"),
                    &format!("{} quartz: started on {now}", now_ms()),
                );
                on = now;
            }
            _ => {}
        }
    }
    for t in threads {
        t.join()
            .map_err(|_| "an application thread panicked".to_owned())?;
    }
    stop_quartz(quartz);
    Ok(())
}

/// Something failed: note it, wait, and let the caller reconnect.
fn trouble(lab: &Lab, part: &str, e: impl std::fmt::Display) {
    append(&lab.path("app.log"), &format!("{} {part}: {e}", now_ms()));
    thread::sleep(Duration::from_millis(300));
}

fn pause(ms: u64) {
    thread::sleep(Duration::from_millis(ms));
}

/// One part of the application: `round` again and again until `stop`, on
/// what `connect` makes, made again after any error (noted in `app.log`).
/// While `quiet` exists, a part that `holds` waits.
fn keep_running<C>(
    lab: &Lab,
    part: &str,
    holds: bool,
    connect: impl Fn(&Lab) -> Result<C, String>,
    mut round: impl FnMut(&mut C) -> Result<(), String>,
) {
    while !lab.stopping() {
        // The database it connects to: when `db` names another (a
        // cutover), it connects again, as a service that follows service
        // discovery does.
        let on = lab.conninfo().ok();
        let mut c = match connect(lab) {
            Ok(c) => c,
            Err(e) => {
                trouble(lab, part, e);
                continue;
            }
        };
        while !lab.stopping() {
            if lab.conninfo().ok() != on {
                append(
                    &lab.path("app.log"),
                    &format!(
                        "{} {part}: follows db to {}",
                        now_ms(),
                        lab.conninfo().unwrap_or_default()
                    ),
                );
                break;
            }
            if holds && lab.quiet() {
                pause(100);
                continue;
            }
            if let Err(e) = round(&mut c) {
                trouble(lab, part, e);
                break;
            }
        }
    }
}

/// A small pseudo-random sequence, enough for a workload.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// A client: requests with retries, each logged with its outcome. Every
/// payment is sent again a few seconds after it went through.
fn client(lab: &Lab, n: usize) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((n as u64 + 1) * 0x2545_f491_4f6c_dd1d));
    let mut again: VecDeque<(Instant, Req)> = VecDeque::new();
    let mut seq = 0u64;
    let log = lab.path("requests.log");
    let connect = |lab: &Lab| Ok((lab.db()?, Cache::connect(&lab.redis).ok()));
    keep_running(lab, "client", true, connect, |(db, cache)| {
        let max: i64 = db
            .query_one("SELECT coalesce(max(id), 0) FROM cases", &[])
            .map_err(|e| e.to_string())?
            .get(0);
        let req = match again.front() {
            Some((at, _)) if *at <= Instant::now() => again.pop_front().unwrap().1,
            _ => {
                seq += 1;
                let id = 1 + rng.below(max as u64) as i64;
                match rng.below(20) {
                    0..=2 => Req::Create(format!("case from client {n} #{seq}")),
                    3..=9 => Req::Rename(id, format!("renamed by client {n} #{seq}")),
                    10..=13 => Req::Assign(id, 1 + rng.below(9) as i64),
                    14 => Req::Close(id),
                    _ => Req::Pay(id, format!("pay-{n}-{seq}"), 100 + rng.below(900) as i64),
                }
            }
        };
        // A refused request is retried (the gate is closed during re-entry).
        {
            let o = match api(lab, db, &req) {
                Ok(o) => o,
                Err(e) => {
                    again.push_front((Instant::now(), req));
                    return Err(e.to_string());
                }
            };
            // A case write's id and version, for the oracle.
            let written = match (&o, &req) {
                (Outcome::Done(json), r) if !matches!(r, Req::Pay(..)) => {
                    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
                    format!(" id={} v={}", v["id"], v["version"])
                }
                _ => String::new(),
            };
            append(
                &log,
                &format!("{} {n} {} {}{written}", now_ms(), o.word(), req.name()),
            );
            match (&o, &req) {
                // Tried again in the next round: by then the service may
                // have been pointed at another database.
                (Outcome::Refused, _) if !lab.stopping() => {
                    pause(250);
                    again.push_front((Instant::now(), req));
                    return Ok(());
                }
                (Outcome::Done(_), Req::Pay(..)) => {
                    again.push_back((Instant::now() + Duration::from_secs(3), req.clone()));
                }
                (Outcome::Done(json), _)
                    if cache.as_mut().is_some_and(|c| c.put(json).is_err()) =>
                {
                    *cache = None;
                }
                _ => {}
            }
        }
        pause(15);
        Ok(())
    });
}

/// The outbox relay: unpublished rows in order, to Kafka, then marked.
fn relay(lab: &Lab) {
    let producer: ThreadedProducer<Delivery> = match ClientConfig::new()
        .set("bootstrap.servers", &lab.kafka)
        .set("enable.idempotence", "false")
        .set("linger.ms", "5")
        .set("log_level", "3")
        .create_with_context(Delivery::default())
    {
        Ok(p) => p,
        Err(e) => return trouble(lab, "relay", e),
    };
    keep_running(lab, "relay", false, Lab::db, |db| {
        if relay_once(db, &producer)? == 0 {
            pause(100);
        }
        Ok(())
    });
    let _ = producer.flush(Duration::from_secs(5));
}

#[derive(Default)]
struct Delivery {
    failed: AtomicU64,
}

impl ClientContext for Delivery {}

impl ProducerContext for Delivery {
    type DeliveryOpaque = ();
    fn delivery(&self, r: &DeliveryResult<'_>, _: ()) {
        if r.is_err() {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn relay_once(db: &mut postgres::Client, p: &ThreadedProducer<Delivery>) -> Result<usize, String> {
    let mut tx = db.transaction().map_err(|e| e.to_string())?;
    if !gate_open(&mut tx, GATE_RELAY).map_err(|e| e.to_string())? {
        return Ok(0);
    }
    let rows = tx
        .query(
            "SELECT id::text, aggregate_id, payload::text FROM outbox_event \
             WHERE published_at IS NULL ORDER BY created_at, id LIMIT 200 FOR UPDATE SKIP LOCKED",
            &[],
        )
        .map_err(|e| e.to_string())?;
    if rows.is_empty() {
        return Ok(0);
    }
    let failed = p.context().failed.load(Ordering::Relaxed);
    let mut ids = Vec::with_capacity(rows.len());
    for r in &rows {
        let (id, key, payload): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        let headers = OwnedHeaders::new().insert(Header {
            key: "event_id",
            value: Some(id.as_bytes()),
        });
        let mut rec = BaseRecord::to(TOPIC)
            .key(&key)
            .payload(&payload)
            .headers(headers);
        loop {
            match p.send(rec) {
                Ok(()) => break,
                Err((e, back)) => {
                    if !matches!(
                        e.rdkafka_error_code(),
                        Some(rdkafka::types::RDKafkaErrorCode::QueueFull)
                    ) {
                        return Err(format!("produce: {e}"));
                    }
                    rec = back;
                    pause(10);
                }
            }
        }
        ids.push(id);
    }
    p.flush(Duration::from_secs(10))
        .map_err(|e| format!("flush: {e}"))?;
    if p.context().failed.load(Ordering::Relaxed) != failed {
        return Err("a delivery failed: the rows stay unpublished".into());
    }
    tx.execute(
        "UPDATE outbox_event SET published_at = clock_timestamp() WHERE id::text = ANY($1)",
        &[&ids],
    )
    .map_err(|e| e.to_string())?;
    tx.commit().map_err(|e| e.to_string())?;
    Ok(ids.len())
}

/// The projector: a group member only while its gate is open.
fn projector(lab: &Lab) {
    let http = reqwest::blocking::Client::new();
    // The connection, the consumer (none while the gate is closed), and
    // when the gate was last read.
    let connect = |lab: &Lab| Ok((lab.db()?, None::<BaseConsumer>, None::<Instant>));
    keep_running(
        lab,
        "projector",
        false,
        connect,
        |(db, consumer, checked)| {
            if checked.is_none_or(|t| t.elapsed() >= Duration::from_millis(200)) {
                *checked = Some(Instant::now());
                let open = gate_open(db, GATE_PROJECTOR).map_err(|e| e.to_string())?;
                if !open {
                    // Dropping the consumer closes it: it leaves the group.
                    *consumer = None;
                } else if consumer.is_none() {
                    *consumer = Some(subscribe(lab)?);
                }
            }
            let Some(c) = consumer.as_ref() else {
                pause(100);
                return Ok(());
            };
            // A batch: what arrives within 50 ms, 500 events at most.
            let mut batch = Vec::new();
            let until = Instant::now() + Duration::from_millis(50);
            while batch.len() < 500 {
                match c.poll(until.saturating_duration_since(Instant::now())) {
                    Some(Ok(m)) => batch.push(m.detach()),
                    Some(Err(e)) => {
                        trouble(lab, "projector", e);
                        break;
                    }
                    None => break,
                }
            }
            if batch.is_empty() {
                return Ok(());
            }
            // On an error the batch is not committed: consumed again after a
            // rejoin.
            project(db, &http, &lab.search, &batch)?;
            let mut next: BTreeMap<i32, i64> = BTreeMap::new();
            for m in &batch {
                let o = next.entry(m.partition()).or_default();
                *o = (*o).max(m.offset() + 1);
            }
            let mut tpl = TopicPartitionList::new();
            for (p, o) in next {
                tpl.add_partition_offset(TOPIC, p, Offset::Offset(o))
                    .map_err(|e| e.to_string())?;
            }
            c.commit(&tpl, CommitMode::Sync).map_err(|e| e.to_string())
        },
    );
}

fn subscribe(lab: &Lab) -> Result<BaseConsumer, String> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &lab.kafka)
        .set("group.id", GROUP)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("log_level", "3")
        .create()
        .map_err(|e| e.to_string())?;
    c.subscribe(&[TOPIC]).map_err(|e| e.to_string())?;
    Ok(c)
}

/// A batch of events: the new ones (not in the inbox) get their inbox row
/// and their effect, and their cases go to the search index, before the
/// transaction commits: a failure anywhere leaves the batch to be consumed
/// again, and indexing again is idempotent (external versions).
fn project(
    db: &mut postgres::Client,
    http: &reqwest::blocking::Client,
    search: &str,
    batch: &[OwnedMessage],
) -> Result<(), String> {
    let mut tx = db.transaction().map_err(|e| e.to_string())?;
    let mut docs = Vec::new();
    for m in batch {
        let id = m
            .headers()
            .and_then(|h| event_id(h.iter().filter_map(|h| Some((h.key, h.value?)))))
            .ok_or("an event without event_id")?;
        let payload: serde_json::Value = m
            .payload()
            .and_then(|p| serde_json::from_slice(p).ok())
            .ok_or("an event whose payload is not JSON")?;
        let case = event_case(&payload);
        let new = tx
            .execute(
                "INSERT INTO inbox_message (message_id) VALUES ($1) ON CONFLICT DO NOTHING",
                &[&id],
            )
            .map_err(|e| e.to_string())?;
        if new == 0 {
            // Seen before: no effect, here or in the index.
            continue;
        }
        tx.execute(
            "INSERT INTO case_projection (case_id, events_applied) VALUES ($1, 1) \
             ON CONFLICT (case_id) DO UPDATE SET events_applied = case_projection.events_applied + 1",
            &[&case],
        )
        .map_err(|e| e.to_string())?;
        if payload["case"].is_object() {
            docs.push(payload["case"].to_string());
        }
    }
    index_cases(http, search, &docs)?;
    tx.commit().map_err(|e| e.to_string())
}

/// Cache-aside reads. While `api-writes` is closed (maintenance), reads go
/// to the database and nothing is cached.
fn reader(lab: &Lab) {
    let mut rng = Rng(0x5851_f42d_4c95_7f2d);
    let connect = |lab: &Lab| Ok((lab.db()?, Cache::connect(&lab.redis)?));
    keep_running(lab, "reader", true, connect, |(db, cache)| {
        let e = |e: postgres::Error| reentry::pg::conn::describe(&e);
        let max: i64 = db
            .query_one("SELECT coalesce(max(id), 0) FROM cases", &[])
            .map_err(e)?
            .get(0);
        for _ in 0..20 {
            let id = 1 + rng.below(max as u64) as i64;
            if cache.get(id).map_err(|e| e.to_string())?.is_some() {
                continue;
            }
            let mut tx = db.transaction().map_err(e)?;
            let open = gate_open(&mut tx, GATE_API).map_err(e)?;
            let row = tx
                .query_opt(
                    &format!("SELECT {CASE_JSON} FROM cases WHERE id = $1"),
                    &[&id],
                )
                .map_err(e)?;
            tx.commit().map_err(e)?;
            if let (true, Some(row)) = (open, row) {
                cache
                    .put(&row.get::<_, String>(0))
                    .map_err(|e| e.to_string())?;
            }
        }
        pause(20);
        Ok(())
    });
}

/// `escalate-overdue-cases` under ShedLock, with the statements of its
/// JDBC provider (`JdbcTemplateStorageAccessor`: update the row if its lock
/// expired; unlock by moving `lock_until` to now).
fn shedlock_job(lab: &Lab) {
    let me = format!("lab-{}", std::process::id());
    let connect = |lab: &Lab| Ok((lab.db()?, Cache::connect(&lab.redis)?));
    keep_running(lab, "shedlock", true, connect, |(db, cache)| {
        // Like the API, the job writes what it changed through to the cache.
        for json in escalate_once(lab, db, &me).map_err(|e| e.to_string())? {
            cache.put(&json).map_err(|e| e.to_string())?;
        }
        pause(500);
        Ok(())
    });
}

/// One try: the lock, then up to five overdue cases escalated, the run
/// logged, and the lock released. The escalated cases' JSON.
fn escalate_once(
    lab: &Lab,
    db: &mut postgres::Client,
    me: &str,
) -> Result<Vec<String>, postgres::Error> {
    let got = db.execute(
        "UPDATE shedlock SET lock_until = now() + interval '10 seconds', locked_at = now(), \
         locked_by = $1 WHERE name = $2 AND lock_until <= now()",
        &[&me, &SHEDLOCK_JOB],
    )?;
    if got == 0 {
        return Ok(Vec::new());
    }
    let start = now_ms();
    db.execute(
        "INSERT INTO job_run (job_name) VALUES ($1)",
        &[&SHEDLOCK_JOB],
    )?;
    let mut tx = db.transaction()?;
    let overdue: Vec<i64> = tx
        .query(
            "SELECT id FROM cases WHERE status = 'open' AND priority < 3 \
             AND updated_at < clock_timestamp() - interval '8 seconds' \
             ORDER BY updated_at LIMIT 5 FOR UPDATE SKIP LOCKED",
            &[],
        )?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut written = Vec::new();
    for id in &overdue {
        written.extend(write_case(
            &mut tx,
            "UPDATE cases SET priority = priority + 1, updated_by = 'escalate-overdue-cases', \
             updated_at = clock_timestamp() WHERE id = $1",
            &[id],
            "case-escalated",
        )?);
    }
    tx.commit()?;
    append(
        &lab.path("shedlock-runs.log"),
        &format!("{start} {} {SHEDLOCK_JOB} {me} {}", now_ms(), overdue.len()),
    );
    db.execute(
        "UPDATE shedlock SET lock_until = now() WHERE name = $1 AND locked_by = $2",
        &[&SHEDLOCK_JOB, &me],
    )?;
    Ok(written)
}

/// The Quartz lab (a real Quartz 2.3 with its JDBC job store) on the
/// application's database, firing `remind-owners` every second.
fn start_quartz(lab: &Lab) -> Result<Child, String> {
    let (classes, cp) = quartz_lab()?;
    let (url, user) = jdbc(&lab.conninfo()?);
    let mut child = Command::new("java")
        .args(["-cp", &format!("{classes}:{cp}"), "QuartzLab", "run"])
        .arg(format!("url={url}"))
        .arg(format!("user={user}"))
        .arg(format!("scheduler={QUARTZ_SCHEDULER}"))
        .arg(format!("instance=lab-{}", std::process::id()))
        .arg(format!("log={}", lab.path("quartz-runs.log").display()))
        .arg("misfire-threshold=1000")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("java: {e}"))?;
    let mut stdin = child.stdin.take().expect("piped");
    let mut out = std::io::BufReader::new(child.stdout.take().expect("piped"));
    let mut line = String::new();
    use std::io::BufRead;
    out.read_line(&mut line).map_err(|e| e.to_string())?;
    if !line.starts_with("ok started") {
        return Err(format!("Quartz did not start: {line}"));
    }
    // Scheduled once: the job store keeps it across restarts.
    writeln!(stdin, "simple {QUARTZ_GROUP} {QUARTZ_JOB} 1000").map_err(|e| e.to_string())?;
    line.clear();
    out.read_line(&mut line).map_err(|e| e.to_string())?;
    if !line.starts_with("ok") && !line.contains("already exists") {
        return Err(format!("Quartz: {line}"));
    }
    child.stdin = Some(stdin);
    thread::spawn(move || for _ in out.lines() {});
    Ok(child)
}

fn stop_quartz(mut child: Child) {
    if let Some(mut s) = child.stdin.take() {
        let _ = writeln!(s, "quit");
    }
    let _ = child.wait();
}

/// The JDBC URL and user of a libpq key=value conninfo.
pub fn jdbc(conninfo: &str) -> (String, String) {
    let mut kv = std::collections::BTreeMap::new();
    for w in conninfo.split_whitespace() {
        if let Some((k, v)) = w.split_once('=') {
            kv.insert(k, v);
        }
    }
    let get = |k: &str, d: &'static str| kv.get(k).copied().unwrap_or(d).to_owned();
    (
        format!(
            "jdbc:postgresql://{}:{}/{}",
            get("host", "127.0.0.1"),
            get("port", "5432"),
            get("dbname", "postgres")
        ),
        get("user", "postgres"),
    )
}
