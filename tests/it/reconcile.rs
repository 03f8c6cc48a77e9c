//! Kafka, outbox, inbox, consumer groups and idempotency keys after a
//! restore, against Apache Kafka and PostgreSQL 18. A workload
//! writes outbox rows, a relay publishes them; the restored database is the
//! same history cut at T. Every class exists with a known count; the plan
//! finds exactly those, apply settles them, a second apply changes nothing.
//! kcat, an independent client, confirms what reentry read from the topic.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reentry::kafka::{Kafka, Outgoing};

use crate::common::pg::{Cluster, Version};
use crate::common::services::{create_topic, create_topic_with, kafka_bootstrap, kcat, topic};
use crate::common::{assert_exit, reentry_bin, run_reentry as run, stderr, stdout};

const MIN: i64 = 60_000;

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn uuid(n: u32) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

/// An outbox row's history: created, published (if ever), produced (if ever).
struct Event {
    id: String,
    created: i64,
    published: Option<i64>,
    produced: Option<i64>,
}

pub(crate) struct World {
    pub(crate) cluster: Cluster,
    pub(crate) dir: PathBuf,
    pub(crate) topic: String,
    /// The projector's consumer group: groups live on the shared broker, so
    /// each test has its own.
    pub(crate) group: String,
    pub(crate) t: i64,
    events: Vec<Event>,
}

/// How the world's outbox relay publishes.
#[derive(Clone, Copy)]
enum Relay {
    /// One message at a time, as most relays do.
    Plain,
    /// With a `transactional.id`: committed batches, and one aborted.
    Transactional,
    /// Into a topic that keeps 29 minutes (`retention.ms`) and rolls a
    /// segment for every later message (`segment.ms=1`), one message per
    /// request, to partition n % 3; plus one message without an event id
    /// in each partition at T - 6 min. The 20 events in sync, published
    /// half an hour ago, are past retention; the rest is not.
    Retained,
}

const RETENTION: i64 = 29 * MIN;

pub(crate) fn ts(ms: i64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms as u64)).to_string()
}

impl World {
    /// The history: 20 events in sync before T; 5 created before T and
    /// published after it; 3 marked published before T whose messages were
    /// lost; 4 never published; 7 created and published after T.
    pub(crate) fn new() -> World {
        World::at(now_ms() - 20 * MIN)
    }

    /// The same history around a given T: worlds built at the same T are
    /// alike row for row and message for message.
    pub(crate) fn at(t: i64) -> World {
        World::published(t, Relay::Plain)
    }

    fn published(t: i64, relay: Relay) -> World {
        let mut cluster = Cluster::init(Version::V18);
        cluster.start();
        let dir = cluster.dir("work");
        let topic = topic("outbox");
        match relay {
            Relay::Retained => create_topic_with(
                &topic,
                3,
                &[
                    ("segment.ms", "1".into()),
                    ("retention.ms", RETENTION.to_string()),
                ],
            ),
            _ => create_topic(&topic, 3),
        }
        let b = t - 10 * MIN;
        let mut events = Vec::new();
        let mut n = 0;
        let mut add = |created: i64, published: Option<i64>, produced: Option<i64>| {
            n += 1;
            events.push(Event {
                id: uuid(n),
                created,
                published,
                produced,
            });
        };
        for i in 0..20 {
            let c = b + i * 1000;
            add(c, Some(c + 500), Some(c + 500));
        }
        for i in 0..5 {
            let p = t + MIN + i * 1000;
            add(b + 5 * MIN + i, Some(p), Some(p));
        }
        for i in 0..3 {
            let c = b + 6 * MIN + i * 1000;
            add(c, Some(c + 500), None);
        }
        for i in 0..4 {
            add(b + 7 * MIN + i * 1000, None, None);
        }
        for i in 0..7 {
            let c = t + 2 * MIN + i * 1000;
            add(c, Some(c + 500), Some(c + 500));
        }
        let w = World {
            cluster,
            dir,
            group: format!("projector-{topic}"),
            topic,
            t,
            events,
        };
        match relay {
            Relay::Plain => w.relay(),
            Relay::Transactional => w.relay_in_transactions(),
            Relay::Retained => w.relay_one_by_one(),
        }
        let mut admin = w.cluster.client();
        for db in ["cur", "res"] {
            admin
                .batch_execute(&format!("CREATE DATABASE {db}"))
                .unwrap();
            let mut c = w.client(db);
            c.batch_execute(include_str!("../../sql/system_gate.sql"))
                .unwrap();
            c.batch_execute(include_str!("../../sql/case-management.sql"))
                .unwrap();
            c.batch_execute("INSERT INTO system_gate VALUES ('outbox-relay', true, now())")
                .unwrap();
        }
        // Current holds the whole history; restored holds it as of T.
        for (db, cut) in [("cur", i64::MAX), ("res", t)] {
            let mut c = w.client(db);
            for e in w.events.iter().filter(|e| e.created <= cut) {
                let published = e.published.filter(|p| *p <= cut).map(ts);
                // The domain change and its event, in one transaction.
                let mut tx = c.transaction().unwrap();
                let case: i64 = tx
                    .query_one(
                        "INSERT INTO cases (title, owner_id, updated_at) VALUES ($1, 1, $2::text::timestamptz) RETURNING id",
                        &[&format!("case for {}", e.id), &ts(e.created)],
                    )
                    .unwrap()
                    .get(0);
                tx.execute(
                    "INSERT INTO outbox_event (id, topic, aggregate_id, payload, created_at, published_at)
                     VALUES ($1::text::uuid, $2, $3, $4::text::jsonb, $5::text::timestamptz, $6::text::timestamptz)",
                    &[&e.id, &w.topic, &format!("case-{case}"), &format!("{{\"eventId\":\"{}\"}}", e.id), &ts(e.created), &published],
                )
                .unwrap();
                tx.commit().unwrap();
            }
            // The projector's inbox: every message it consumed before the cut.
            for e in w
                .events
                .iter()
                .filter(|e| e.produced.is_some_and(|p| p <= cut))
            {
                c.execute(
                    "INSERT INTO inbox_message (message_id) VALUES ($1)",
                    &[&e.id],
                )
                .unwrap();
            }
        }
        // Idempotency keys: k1-k3 before T; k4-k5 just after T (older than
        // the 15 min retention by now); k6-k9 recent. Only current has those.
        for db in ["cur", "res"] {
            let mut c = w.client(db);
            for k in 1..=3 {
                c.execute(
                    "INSERT INTO idempotency_key (idem_key, created_at) VALUES ($1, $2::text::timestamptz)",
                    &[&format!("k{k}"), &ts(t - 5 * MIN)],
                )
                .unwrap();
            }
        }
        let mut c = w.client("cur");
        for (k, at) in [
            (4, t + MIN),
            (5, t + MIN),
            (6, t + 15 * MIN),
            (7, t + 15 * MIN),
            (8, t + 15 * MIN),
            (9, t + 15 * MIN),
        ] {
            c.execute(
                "INSERT INTO idempotency_key (idem_key, created_at) VALUES ($1, $2::text::timestamptz)",
                &[&format!("k{k}"), &ts(at)],
            )
            .unwrap();
        }
        std::fs::write(
            w.dir.join("compensation.json"),
            r#"{"type":"CaseChangeLost","compensates":"{{event_id}}","case":"{{key}}"}"#,
        )
        .unwrap();
        // The payment provider's export: k8, k9 again, k10, k11 only here,
        // and one from before T.
        std::fs::write(
            w.dir.join("provider.csv"),
            format!(
                "request_id,sent_at,amount\nk8,{a},10\nk9,{a},10\nk10,{a},10\nk11,{a},12\nk0,{b},5\n",
                a = ts(t + 16 * MIN),
                b = ts(t - 30 * MIN)
            ),
        )
        .unwrap();
        // The projector consumed everything: its offsets are at the end.
        let k = Kafka::new(&kafka_bootstrap());
        let ends = k.offsets_for_time(&w.topic, i64::MAX).unwrap();
        k.commit(&w.group, &w.topic, &ends).unwrap();
        w
    }

    /// The relay: publishes every produced event, in time order.
    fn relay(&self) {
        let mut produced: Vec<&Event> = self
            .events
            .iter()
            .filter(|e| e.produced.is_some())
            .collect();
        produced.sort_by_key(|e| e.produced);
        let messages: Vec<Outgoing> = produced
            .iter()
            .map(|e| Outgoing {
                key: Some(format!("case-{}", &e.id[30..]).into_bytes()),
                payload: format!("{{\"eventId\":\"{}\",\"type\":\"CaseUpdated\"}}", e.id)
                    .into_bytes(),
                headers: vec![("event_id".into(), e.id.clone().into_bytes())],
                timestamp: e.produced,
            })
            .collect();
        Kafka::new(&kafka_bootstrap())
            .produce(&self.topic, &messages)
            .unwrap();
    }

    /// The relay as a transactional producer publishes: every produced
    /// event in a committed transaction of up to five, in time order, and
    /// the four events never published in a transaction it aborted (the
    /// relay died before committing). Kafka keeps the aborted records and
    /// a marker per transaction and partition, each taking an offset.
    fn relay_in_transactions(&self) {
        use rdkafka::message::{Header, OwnedHeaders};
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
        let p: BaseProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", kafka_bootstrap())
            .set("transactional.id", crate::common::unique("relay"))
            .create()
            .unwrap();
        let wait = Duration::from_secs(30);
        p.init_transactions(wait).unwrap();
        // (timestamp, event, committed)
        let mut sends: Vec<(i64, &Event, bool)> = self
            .events
            .iter()
            .filter_map(|e| match (e.published, e.produced) {
                (_, Some(at)) => Some((at, e, true)),
                (None, None) => Some((e.created + 500, e, false)),
                _ => None,
            })
            .collect();
        sends.sort_by_key(|s| s.0);
        for batch in sends.chunk_by(|a, b| a.2 == b.2) {
            for txn in batch.chunks(5) {
                p.begin_transaction().unwrap();
                for (at, e, _) in txn {
                    let key = format!("case-{}", &e.id[30..]);
                    let payload = format!("{{\"eventId\":\"{}\",\"type\":\"CaseUpdated\"}}", e.id);
                    let headers = OwnedHeaders::new().insert(Header {
                        key: "event_id",
                        value: Some(e.id.as_bytes()),
                    });
                    p.send(
                        BaseRecord::to(&self.topic)
                            .key(&key)
                            .payload(&payload)
                            .headers(headers)
                            .timestamp(*at),
                    )
                    .map_err(|(e, _)| e)
                    .unwrap();
                }
                if txn[0].2 {
                    p.commit_transaction(wait).unwrap();
                } else {
                    p.flush(wait).unwrap();
                    p.abort_transaction(wait).unwrap();
                }
            }
        }
    }

    /// The relay, one acknowledged message per request, each event to
    /// partition n % 3, with a message without an event id in every
    /// partition at T - 6 min: each later message starts a segment of its
    /// own, so retention removes the old ones and keeps the rest.
    fn relay_one_by_one(&self) {
        use rdkafka::message::{Header, OwnedHeaders};
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
        let p: BaseProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", kafka_bootstrap())
            .set("linger.ms", "0")
            .create()
            .unwrap();
        let mut sends: Vec<(i64, i32, Option<&Event>)> = self
            .events
            .iter()
            .enumerate()
            .filter_map(|(n, e)| Some((e.produced?, n as i32 % 3, Some(e))))
            .collect();
        sends.extend((0..3).map(|partition| (self.t - 6 * MIN, partition, None)));
        sends.sort_by_key(|s| s.0);
        for (at, partition, e) in sends {
            let (key, payload, headers) = match e {
                Some(e) => (
                    format!("case-{}", &e.id[30..]),
                    format!("{{\"eventId\":\"{}\",\"type\":\"CaseUpdated\"}}", e.id),
                    OwnedHeaders::new().insert(Header {
                        key: "event_id",
                        value: Some(e.id.as_bytes()),
                    }),
                ),
                None => ("heartbeat".into(), "{}".into(), OwnedHeaders::new()),
            };
            p.send(
                BaseRecord::to(&self.topic)
                    .partition(partition)
                    .key(&key)
                    .payload(&payload)
                    .headers(headers)
                    .timestamp(at),
            )
            .map_err(|(e, _)| e)
            .unwrap();
            p.flush(Duration::from_secs(30)).unwrap();
        }
    }

    pub(crate) fn conninfo(&self, db: &str) -> String {
        self.cluster.db_conninfo(db)
    }

    pub(crate) fn client(&self, db: &str) -> postgres::Client {
        self.cluster.db_client(db)
    }

    pub(crate) fn playbook(&self, name: &str, csv: &str) -> PathBuf {
        let text = format!(
            r#"[playbook]
name = "reconcile-test"
way-back = "cutover"

[databases.current]
conninfo = "{cur}"

[databases.restored]
conninfo = "{res}"

[recovery-target]
time = "{t}"

[gates]
reopen-order = ["outbox-relay"]

[[gates.system-gate]]
name = "outbox-relay"
databases = ["current", "restored"]

[[outbox]]
name = "case-events"
database = "restored"
flavour = "generic"
table = "outbox_event"
topic = "{topic}"
columns = {{ id = "id", created-at = "created_at", published-at = "published_at" }}
event-id = {{ header = "event_id" }}
gate = "outbox-relay"
compensation-template = "compensation.json"

[kafka]
bootstrap = "{bootstrap}"
lookback = "1h"
watch = "1s"

[[kafka.consumer-group]]
name = "{group}"
topics = ["{topic}"]
idempotent = true

[[inbox]]
name = "projector-inbox"
database = "restored"
table = "inbox_message"
message-id-column = "message_id"
topic = "{topic}"
consumer-group = "{group}"

[[idempotency]]
name = "notifications"
database = "restored"
table = "idempotency_key"
key-column = "idem_key"
created-at-column = "created_at"
retention = "15m"
action = "tombstone"
from-current = true
from-csv = {{ path = "{csv}", key-column = "request_id", time-column = "sent_at" }}
"#,
            cur = self.conninfo("cur"),
            res = self.conninfo("res"),
            t = ts(self.t),
            topic = self.topic,
            group = self.group,
            bootstrap = kafka_bootstrap(),
        );
        let path = self.dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn count(&self, db: &str, sql: &str) -> i64 {
        self.client(db).query_one(sql, &[]).unwrap().get(0)
    }
}

fn step<'a>(plan: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("no step {id}"))
}

fn plan(pb: &Path) -> serde_json::Value {
    let out = run(&[&"plan", &pb, &"--json"]);
    assert!(matches!(out.status.code(), Some(0 | 1)), "{}", stderr(&out));
    serde_json::from_str(&stdout(&out)).unwrap()
}

/// A group member (kcat) that is stopped if the test fails while it runs.
struct Member(std::process::Child);

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The whole topic as kcat prints it with `format`.
pub(crate) fn kcat_read(topic: &str, format: &str) -> String {
    let out = kcat()
        .args([
            "-C",
            "-t",
            topic,
            "-o",
            "beginning",
            "-e",
            "-q",
            "-f",
            format,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Event ids in the topic, read by kcat from the `event_id` header.
fn kcat_ids(topic: &str) -> Vec<(String, i64)> {
    kcat_read(topic, "%T %h\n")
        .lines()
        .filter_map(|l| {
            let (t, h) = l.split_once(' ')?;
            let id = h.split(',').find_map(|kv| kv.strip_prefix("event_id="))?;
            Some((id.to_owned(), t.parse().ok()?))
        })
        .collect()
}

#[test]
fn the_plan_finds_every_class_apply_settles_them_and_a_second_apply_is_a_no_op() {
    let w = World::new();
    let pb = w.playbook("pb.toml", "provider.csv");

    let p = plan(&pb);
    let outbox = &step(&p, "outbox:case-events")["preview"];
    let d = &outbox["detail"];
    assert_eq!(d["mark-published"], 5, "{d:#}");
    assert_eq!(d["orphans"], 7, "{d:#}");
    assert_eq!(d["mark-unpublished"], 3, "{d:#}");
    assert_eq!(d["pending"], 4, "{d:#}");
    assert_eq!(d["in-sync"], 20, "{d:#}");
    assert_eq!(outbox["count"], 15);

    // What reentry read agrees with an independent client.
    let seen = kcat_ids(&w.topic);
    assert_eq!(seen.len(), 32);
    assert_eq!(d["scan"]["messages"], seen.len());
    let after_t = seen.iter().filter(|(_, t)| *t >= w.t).count();
    assert_eq!(after_t, 12);
    let inbox = &step(&p, "inbox:projector-inbox")["preview"];
    assert_eq!(inbox["detail"]["re-consumed"], after_t, "{inbox:#}");
    let rewind = &step(&p, &format!("rewind:{}", w.group))["preview"];
    assert!(
        rewind["summary"]
            .as_str()
            .unwrap()
            .contains("12 message(s) to consume again"),
        "{rewind:#}"
    );
    let keys = &step(&p, "idempotency:notifications")["preview"];
    assert_eq!(keys["count"], 6, "{keys:#}");
    assert_eq!(keys["detail"]["expired"], 2, "{keys:#}");
    assert!(
        keys["summary"]
            .as_str()
            .unwrap()
            .contains("longer than the key retention"),
        "{keys:#}"
    );

    // The stand-alone commands see the same.
    let out = run(&[&"outbox", &"diff", &pb, &"--json"]);
    assert_exit(&out, 1);
    let diff: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(diff[0]["classes"]["orphans"], 7);
    assert_eq!(diff[0]["classes"]["mark-published"], 5);
    // Sorting in runs of four events spills to disk and merges with the
    // outbox streamed in order, one consumer reading every partition: the
    // same classes.
    let tuned = pb.with_file_name("tuned.toml");
    let text = std::fs::read_to_string(&pb).unwrap();
    assert!(text.contains("\n[kafka]\n"));
    std::fs::write(
        &tuned,
        // and one consumer reads all three partitions
        text.replace(
            "\n[kafka]\n",
            "\n[kafka]\nsort-chunk = 4\nscan-consumers = 1\n",
        ),
    )
    .unwrap();
    let spilled = Command::new(reentry_bin())
        .args(["outbox", "diff", "--json"])
        .arg(&tuned)
        .output()
        .unwrap();
    assert_exit(&spilled, 1);
    let spilled: serde_json::Value = serde_json::from_str(&stdout(&spilled)).unwrap();
    for class in [
        "mark-published",
        "orphans",
        "mark-unpublished",
        "pending",
        "in-sync",
        "duplicates-in-topic",
    ] {
        assert_eq!(
            spilled[0]["classes"][class], diff[0]["classes"][class],
            "{class}"
        );
    }
    let bootstrap = kafka_bootstrap();
    let at = ts(w.t);
    let out = run(&[
        &"kafka",
        &"offsets-at",
        &w.topic,
        &at,
        &"--bootstrap",
        &bootstrap,
        &"--json",
    ]);
    assert_exit(&out, 0);
    let offsets: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let after: i64 = offsets["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["end"].as_i64().unwrap() - p["offset"].as_i64().unwrap())
        .sum();
    assert_eq!(after, 12);
    let out = run(&[
        &"kafka",
        &"rewind",
        &w.group,
        &"--topic",
        &w.topic,
        &"--to",
        &at,
        &"--bootstrap",
        &bootstrap,
        &"--json",
    ]);
    assert_exit(&out, 1); // a dry run with moves to make
    let dry: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(dry["messages-again"], 12);
    assert_eq!(dry["applied"], false);

    // Apply is refused while the projector has a live member.
    let mut member = Member(
        kcat()
            .args(["-G", &w.group, &w.topic, "-q"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let k = Kafka::new(&kafka_bootstrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while k.members(&w.group).unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "kcat never joined the group"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = run(&[
        &"kafka",
        &"group",
        &w.group,
        &"--topic",
        &w.topic,
        &"--bootstrap",
        &bootstrap,
    ]);
    assert_exit(&out, 0);
    assert!(
        stdout(&out).contains("1 live member(s)"),
        "{}",
        stdout(&out)
    );
    // A dry run says that an apply would be refused, and names the member
    // by what the broker gives, leaving out what it leaves empty.
    let rewind = |extra: &[&dyn AsRef<std::ffi::OsStr>]| {
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
            &"kafka",
            &"rewind",
            &w.group,
            &"--topic",
            &w.topic,
            &"--to",
            &at,
            &"--bootstrap",
            &bootstrap,
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    let out = rewind(&[]);
    assert_exit(&out, 1);
    let text = stdout(&out);
    assert!(
        text.contains("an apply would be refused now: the group has 1 live member(s): "),
        "{text}"
    );
    assert!(
        !text.contains("( on )") && !text.contains("(on )"),
        "{text}"
    );
    let out = rewind(&[&"--apply"]);
    assert_exit(&out, 3);
    let member_id = k.members(&w.group).unwrap()[0].describe();
    assert!(
        stderr(&out).contains(&member_id),
        "{}: {member_id}",
        stderr(&out)
    );
    let run_dir = w.dir.join("run1");
    let out = run(&[&"apply", &pb, &"--run-dir", &run_dir, &"--apply"]);
    assert_exit(&out, 2);
    assert!(
        stdout(&out).contains(&format!("group `{}` has 1 live member(s)", w.group)),
        "{}",
        stdout(&out)
    );
    Command::new("kill")
        .args(["-INT", &member.0.id().to_string()])
        .status()
        .unwrap();
    member.0.wait().unwrap();
    while !k.members(&w.group).unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "kcat never left the group"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let committed_before = k.committed(&w.group, &w.topic, &[0, 1, 2]).unwrap();

    let out = run(&[
        &"apply",
        &pb,
        &"--run-dir",
        &run_dir,
        &"--apply",
        &"--resume",
    ]);
    assert_exit(&out, 0);

    // Mark published: the five late events carry their message's time.
    let late_published = w.count(
        "res",
        &format!(
            "SELECT count(*) FROM outbox_event WHERE published_at >= '{}'::timestamptz",
            ts(w.t)
        ),
    );
    assert_eq!(late_published, 5);
    assert_eq!(
        w.count(
            "res",
            "SELECT count(*) FROM outbox_event WHERE published_at IS NULL"
        ),
        7,
        "3 unpublished + 4 pending"
    );
    assert_eq!(
        w.count("res", "SELECT count(*) FROM reentry.orphan_event"),
        7
    );
    assert_eq!(
        w.count(
            "res",
            "SELECT count(*) FROM reentry.orphan_event WHERE payload IS NULL OR key IS NULL"
        ),
        0
    );
    // Each orphan answered once by a compensating event, seen by kcat too.
    assert_eq!(
        w.count(
            "res",
            "SELECT count(*) FROM reentry.orphan_event WHERE compensated_at IS NOT NULL"
        ),
        7
    );
    let compensations = |topic: &str| {
        kcat_read(topic, "%h %s\n")
            .lines()
            .filter(|l| l.contains("reentry-compensates=") && l.contains("CaseChangeLost"))
            .count()
    };
    assert_eq!(compensations(&w.topic), 7);
    // The rewind: every partition at its first offset at or after T.
    let committed = k.committed(&w.group, &w.topic, &[0, 1, 2]).unwrap();
    let target = k.offsets_for_time(&w.topic, w.t).unwrap();
    for p in 0..3 {
        assert_eq!(committed[&p], Some(target[&p]), "partition {p}");
    }
    let moved: i64 = (0..3)
        .map(|p| committed_before[&p].unwrap() - committed[&p].unwrap())
        .sum();
    // 12 messages after T, and the 7 compensations the live projector read
    // while the first attempt was refused.
    assert_eq!(moved, 12 + 7);
    // The old offsets are in the journal, to undo the rewind.
    let journal = std::fs::read_to_string(run_dir.join("journal.jsonl")).unwrap();
    assert!(journal
        .lines()
        .any(|l| l.contains("\"prior\"") && l.contains(&format!("rewind:{}", w.group))));
    // The orphans' aggregates are recorded as changed around T, once
    // each, for the cache and search steps.
    let changed: Vec<reentry::reentry::steps::rows::Changed> =
        std::fs::read_to_string(run_dir.join(reentry::reentry::steps::rows::CHANGED_FILE))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    let orphans: Vec<_> = changed.iter().filter(|c| c.by == "outbox").collect();
    assert_eq!(orphans.len(), 7, "{changed:?}");
    assert!(orphans
        .iter()
        .all(|c| c.table == "case-events" && c.class == "orphan" && c.key.len() == 1));
    // Tombstones: the six live keys, none of the expired ones.
    let mut keys: Vec<String> = w
        .client("res")
        .query(
            "SELECT key FROM reentry.idempotency_tombstone ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    keys.sort_by_key(|k| k[1..].parse::<u32>().unwrap());
    assert_eq!(keys, ["k6", "k7", "k8", "k9", "k10", "k11"]);
    assert_eq!(w.count("res", "SELECT count(*) FROM idempotency_key"), 9);

    // A second run finds nothing left to change.
    let out = run(&[
        &"apply",
        &pb,
        &"--run-dir",
        &w.dir.join("run2"),
        &"--apply",
        &"--json",
    ]);
    assert_exit(&out, 0);
    let r: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    for id in [
        "outbox:case-events",
        format!("rewind:{}", w.group).as_str(),
        "idempotency:notifications",
    ] {
        let s = r["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id)
            .unwrap();
        assert_eq!(s["count"], 0, "{id} changed something again: {s:#}");
    }
    assert_eq!(
        w.count("res", "SELECT count(*) FROM reentry.orphan_event"),
        7
    );
    assert_eq!(compensations(&w.topic), 7, "a compensation was sent twice");
}

#[test]
fn a_malformed_provider_export_is_reported_by_line_and_changes_nothing() {
    let w = World::new();
    std::fs::write(
        w.dir.join("bad.csv"),
        "request_id,sent_at,amount\nk8,2026-11-25T12:00:00Z,1\n,2026-11-25T12:00:00Z,1\nk9,not-a-time,1\nk10,2026-11-25T12:00:00Z\n",
    )
    .unwrap();
    let pb = w.playbook("bad.toml", "bad.csv");
    let run_dir = w.dir.join("run");
    let out = run(&[&"apply", &pb, &"--run-dir", &run_dir, &"--apply"]);
    assert_exit(&out, 78);
    let err = stderr(&out);
    for want in [
        "bad.csv:3: empty `request_id`",
        "bad.csv:4: `not-a-time`",
        "bad.csv:5:",
    ] {
        assert!(err.contains(want), "missing {want:?} in {err}");
    }
    assert!(!run_dir.join("journal.jsonl").exists());
    assert_eq!(w.count("res", "SELECT count(*) FROM idempotency_key"), 3);
    assert_eq!(
        w.count(
            "res",
            "SELECT count(*) FROM outbox_event WHERE published_at IS NULL"
        ),
        9,
        "the outbox was touched"
    );
}

#[test]
fn an_unreachable_broker_is_named_by_the_playbooks_template_not_its_value() {
    let w = World::new();
    let text = std::fs::read_to_string(w.playbook("pb.toml", "provider.csv"))
        .unwrap()
        .replace(
            &format!("bootstrap = \"{}\"", kafka_bootstrap()),
            "bootstrap = \"${RECON_KAFKA}\"",
        );
    let pb = w.dir.join("unreachable.toml");
    std::fs::write(&pb, text).unwrap();
    let out = Command::new(reentry_bin())
        .arg("plan")
        .arg(&pb)
        .env("RECON_KAFKA", "kafka-sekrit-host.invalid:9092")
        .output()
        .unwrap();
    assert_exit(&out, 2);
    let err = stderr(&out);
    assert!(err.contains("Kafka at ${RECON_KAFKA}"), "{err}");
    assert!(
        !err.contains("sekrit") && !stdout(&out).contains("sekrit"),
        "{err}"
    );
}

/// Templates and exports are read when the plan is made: a missing or
/// A file the playbook reads is in its directory or below: an absolute
/// path, `..` or a symbolic link out of it is refused, located, and its
/// content reaches neither the plan nor the output.
#[test]
fn a_pinned_file_outside_the_playbooks_directory_or_behind_a_link_is_refused() {
    let w = World::new();
    let pb = w.playbook("pb.toml", "provider.csv");
    let text = std::fs::read_to_string(&pb).unwrap();
    let line = text
        .lines()
        .position(|l| l.contains("compensation-template"))
        .unwrap()
        + 1;
    // A valid template, with a marker, outside the playbook's directory.
    let good = std::fs::read_to_string(w.dir.join("compensation.json")).unwrap();
    let marker = "OUTSIDE-MARKER-7f3a";
    let outside = w
        .dir
        .parent()
        .unwrap()
        .join(crate::common::unique("outside.json"));
    std::fs::write(&outside, good.replace("CaseChangeLost", marker)).unwrap();
    let _cleanup = scopeguard_file(outside.clone());
    std::os::unix::fs::symlink(&outside, w.dir.join("link.json")).unwrap();
    let rel = format!("../{}", outside.file_name().unwrap().to_string_lossy());
    for (named, says) in [
        (
            outside.display().to_string(),
            "is outside the playbook's directory",
        ),
        (rel, "is outside the playbook's directory"),
        ("link.json".to_owned(), "is a symbolic link"),
    ] {
        let edited = text.replace(
            "compensation-template = \"compensation.json\"",
            &format!("compensation-template = \"{named}\""),
        );
        assert_ne!(edited, text);
        std::fs::write(&pb, edited).unwrap();
        let out = run(&[&"plan", &pb]);
        assert_exit(&out, 78);
        let err = stderr(&out);
        assert!(
            err.contains(&format!("pb.toml:{line}:")) && err.contains(says),
            "{named}: {err}"
        );
        assert!(
            !stdout(&out).contains(marker) && !err.contains(marker),
            "{named}"
        );
    }
}

/// Removes a file when dropped.
fn scopeguard_file(path: std::path::PathBuf) -> impl Drop {
    struct Rm(std::path::PathBuf);
    impl Drop for Rm {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    Rm(path)
}

/// malformed one stops the run before any gate closes, located in the
/// playbook; one changed after the plan read it is refused at apply.
#[test]
fn files_from_outside_are_read_and_pinned_by_the_plan() {
    let w = World::new();
    let pb = w.playbook("pb.toml", "provider.csv");
    let line = |needle: &str| {
        std::fs::read_to_string(&pb)
            .unwrap()
            .lines()
            .position(|l| l.contains(needle))
            .unwrap()
            + 1
    };
    let gates = |db: &str| w.count(db, "SELECT count(*) FROM system_gate WHERE enabled = false");
    let closed = (gates("cur"), gates("res"));
    let template = w.dir.join("compensation.json");
    let good = std::fs::read_to_string(&template).unwrap();

    std::fs::remove_file(&template).unwrap();
    let run_dir = w.dir.join("missing");
    let out = run(&[&"apply", &pb, &"--run-dir", &run_dir, &"--apply"]);
    assert_exit(&out, 78);
    let err = stderr(&out);
    assert!(
        err.contains(&format!("pb.toml:{}:", line("compensation-template")))
            && err.contains("compensation.json: No such file"),
        "{err}"
    );
    assert!(!run_dir.join("journal.jsonl").exists());

    std::fs::write(&template, good.replace("{{key}}", "{{aggregate}}")).unwrap();
    let out = run(&[&"plan", &pb]);
    assert_exit(&out, 78);
    assert!(
        stderr(&out).contains("unknown placeholder {{aggregate}}"),
        "{}",
        stderr(&out)
    );
    std::fs::write(&template, good.replace("\"case\"", "case")).unwrap();
    let out = run(&[&"plan", &pb]);
    assert_exit(&out, 78);
    assert!(
        stderr(&out).contains("not JSON once filled in"),
        "{}",
        stderr(&out)
    );
    assert_eq!((gates("cur"), gates("res")), closed, "a gate moved");

    // Pinned: the plan keeps the template's content and sha256.
    std::fs::write(&template, &good).unwrap();
    let out = run(&[&"plan", &pb, &"--json"]);
    assert_exit(&out, 1);
    let plan: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let pinned = &step(&plan, "outbox:case-events")["action"]["compensation"];
    assert_eq!(pinned["content"], good.as_str());
    assert_eq!(pinned["sha256"].as_str().unwrap().len(), 64);

    // Changed between the plan and its use: refused, the gates stay closed.
    let run_dir = w.dir.join("changed");
    let out = run(&[
        &"apply",
        &pb,
        &"--run-dir",
        &run_dir,
        &"--apply",
        &"--until",
        &"validate",
    ]);
    assert_exit(&out, 0);
    std::fs::write(&template, good.replace("CaseChangeLost", "Other")).unwrap();
    let out = run(&[
        &"apply",
        &pb,
        &"--run-dir",
        &run_dir,
        &"--apply",
        &"--resume",
    ]);
    assert_exit(&out, 2);
    assert!(
        stdout(&out).contains("compensation.json changed since the plan read it"),
        "{}",
        stdout(&out)
    );
    assert_eq!(gates("res"), 1, "the restored gate stays closed");
}

/// A relay that publishes in transactions: the records of the transaction
/// it aborted were never published (the scan reads read_committed), and the
/// offsets the commit and abort markers take are neither messages nor
/// gaps. Counted with kcat and Kafka's own GetOffsetShell.
#[test]
fn a_transactional_relays_aborted_records_are_never_published_and_its_markers_are_not_messages() {
    let w = World::published(now_ms() - 20 * MIN, Relay::Transactional);
    let pb = w.playbook("pb.toml", "provider.csv");

    // Kafka holds more offsets than committed messages: markers, and the
    // four aborted records.
    let seen = kcat()
        .args(["-X", "isolation.level=read_committed"])
        .args([
            "-C",
            "-t",
            &w.topic,
            "-o",
            "beginning",
            "-e",
            "-q",
            "-f",
            "%h\n",
        ])
        .output()
        .unwrap();
    assert!(seen.status.success());
    let committed = String::from_utf8_lossy(&seen.stdout).lines().count();
    assert_eq!(committed, 32);
    let offsets: i64 = crate::kafka::offset_shell(&w.topic, -1).values().sum();
    assert!(offsets > 32 + 4, "markers take offsets: {offsets}");

    let p = plan(&pb);
    let d = &step(&p, "outbox:case-events")["preview"]["detail"];
    assert_eq!(
        d["pending"], 4,
        "the aborted events were never published: {d:#}"
    );
    assert_eq!(d["mark-published"], 5, "{d:#}");
    assert_eq!(d["orphans"], 7, "{d:#}");
    assert_eq!(d["mark-unpublished"], 3, "{d:#}");
    assert_eq!(d["in-sync"], 20, "{d:#}");
    assert_eq!(d["scan"]["messages"], 32, "{d:#}");
    let rewind = &step(&p, &format!("rewind:{}", w.group))["preview"];
    assert!(
        rewind["summary"]
            .as_str()
            .unwrap()
            .contains("12 message(s) to consume again"),
        "markers are not messages: {rewind:#}"
    );

    let bootstrap = kafka_bootstrap();
    let out = run(&[
        &"kafka",
        &"offsets-at",
        &w.topic,
        &ts(w.t),
        &"--bootstrap",
        &bootstrap,
        &"--json",
    ]);
    assert_exit(&out, 0);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let parts = v["partitions"].as_array().unwrap();
    let messages: i64 = parts.iter().map(|p| p["messages"].as_i64().unwrap()).sum();
    let span: i64 = parts
        .iter()
        .map(|p| p["end"].as_i64().unwrap() - p["offset"].as_i64().unwrap())
        .sum();
    assert_eq!(messages, 12, "{v:#}");
    assert!(span > messages, "the span after T holds markers too: {v:#}");
}

#[test]
fn a_published_event_that_retention_deleted_is_reported_gone_from_the_topic_and_not_sent_again() {
    let w = World::published(now_ms() - 21 * MIN, Relay::Retained);
    let pb = w.playbook("pb.toml", "provider.csv");

    // Kafka's retention removes the old segments within a second or so
    // (the test broker checks every second): wait until Kafka's own tool
    // shows every partition's log start moved.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let starts = crate::kafka::offset_shell(&w.topic, -2);
        if starts.len() == 3 && starts.values().all(|o| *o > 0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "retention removed nothing: log starts {starts:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // What is left, read by kcat: the 12 events after T and the three
    // messages without an id; the 20 in sync are gone.
    let left = kcat_read(&w.topic, "%h|\n");
    assert_eq!(left.lines().count(), 15, "{left}");
    assert_eq!(kcat_ids(&w.topic).len(), 12);

    let out = run(&[&"outbox", &"diff", &pb, &"--json"]);
    assert_exit(&out, 1);
    let diff: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let c = &diff[0]["classes"];
    assert_eq!(c["gone-from-topic"], 20, "{c:#}");
    assert_eq!(
        c["mark-unpublished"], 3,
        "only the events lost after the first message retention left: {c:#}"
    );
    assert_eq!(c["in-sync"], 0, "{c:#}");
    assert_eq!(c["mark-published"], 5, "{c:#}");
    assert_eq!(c["orphans"], 7, "{c:#}");
    assert_eq!(c["pending"], 4, "{c:#}");
    assert_eq!(c["scan"]["without-id"], 3, "{c:#}");
    let horizon = c["scan"]["gone-before-ms"].as_i64().expect("a horizon");
    assert_eq!(horizon, w.t - 6 * MIN, "the first message retention left");
    let summary = diff[0]["summary"].as_str().unwrap();
    assert!(summary.contains("20 gone from the topic"), "{summary}");

    // The plan's step says the same, and its apply leaves them published:
    // the relay does not send them again.
    let p = plan(&pb);
    let d = &step(&p, "outbox:case-events")["preview"]["detail"];
    assert_eq!(d["gone-from-topic"], 20, "{d:#}");
    assert_eq!(d["mark-unpublished"], 3, "{d:#}");
}

/// One message after T in its own topic whose event the restored outbox
/// lacks: an orphan with `key`, and a compensation template.
struct Orphan {
    cluster: Cluster,
    dir: PathBuf,
    topic: String,
    t: i64,
}

impl Orphan {
    fn new(key: &str, template: &str) -> Orphan {
        let mut cluster = Cluster::init(Version::V18);
        cluster.start();
        let dir = cluster.dir("work");
        let topic = topic("orphan");
        create_topic(&topic, 1);
        let t = now_ms() - 10 * MIN;
        Kafka::new(&kafka_bootstrap())
            .produce(
                &topic,
                &[Outgoing {
                    key: Some(key.as_bytes().to_vec()),
                    payload: b"{}".to_vec(),
                    headers: vec![("event_id".into(), uuid(1).into_bytes())],
                    timestamp: Some(t + MIN),
                }],
            )
            .unwrap();
        let mut admin = cluster.client();
        for db in ["cur", "res"] {
            admin
                .batch_execute(&format!("CREATE DATABASE {db}"))
                .unwrap();
            let mut c = cluster.db_client(db);
            c.batch_execute(include_str!("../../sql/system_gate.sql"))
                .unwrap();
            c.batch_execute(include_str!("../../sql/case-management.sql"))
                .unwrap();
            c.batch_execute("INSERT INTO system_gate VALUES ('outbox-relay', true, now())")
                .unwrap();
        }
        std::fs::write(dir.join("compensation.json"), template).unwrap();
        Orphan {
            cluster,
            dir,
            topic,
            t,
        }
    }

    fn playbook(&self) -> PathBuf {
        let text = format!(
            r#"[playbook]
name = "orphan-test"
way-back = "cutover"

[databases.current]
conninfo = "{cur}"

[databases.restored]
conninfo = "{res}"

[recovery-target]
time = "{t}"

[gates]
reopen-order = ["outbox-relay"]

[[gates.system-gate]]
name = "outbox-relay"
databases = ["current", "restored"]

[[outbox]]
name = "case-events"
database = "restored"
flavour = "generic"
table = "outbox_event"
topic = "{topic}"
columns = {{ id = "id", created-at = "created_at", published-at = "published_at" }}
event-id = {{ header = "event_id" }}
gate = "outbox-relay"
compensation-template = "compensation.json"

[kafka]
bootstrap = "{bootstrap}"
lookback = "1h"
watch = "1s"
"#,
            cur = self.cluster.db_conninfo("cur"),
            res = self.cluster.db_conninfo("res"),
            t = ts(self.t),
            topic = self.topic,
            bootstrap = kafka_bootstrap(),
        );
        let path = self.dir.join("pb.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn apply(&self, run: &str) -> std::process::Output {
        Command::new(reentry_bin())
            .arg("apply")
            .arg(self.playbook())
            .arg("--run-dir")
            .arg(self.dir.join(run))
            .arg("--apply")
            .output()
            .unwrap()
    }

    /// (staged, compensated) orphans in the restored database.
    fn orphans(&self) -> (i64, i64) {
        let r = self
            .cluster
            .db_client("res")
            .query_one(
                "SELECT count(*), count(compensated_at) FROM reentry.orphan_event",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    }

    /// The compensations in the topic, as kcat reads them: their payloads.
    fn compensations(&self) -> Vec<String> {
        kcat_read(&self.topic, "%h\t%s\n")
            .lines()
            .filter(|l| l.contains("reentry-compensates="))
            .map(|l| l.split_once('\t').unwrap().1.to_owned())
            .collect()
    }
}

/// A key from the topic is data, not JSON: filled into a `.json` template
/// it stays one string, whatever quotes it holds, and a value holding a
/// placeholder is not expanded again.
#[test]
fn an_orphans_key_fills_a_json_template_as_one_string() {
    let key = r#"a","admin":true,"x":"{{topic}}"#;
    let o = Orphan::new(key, r#"{"entity":"{{key}}"}"#);
    let out = o.apply("run");
    assert_exit(&out, 0);
    let sent = o.compensations();
    assert_eq!(sent.len(), 1, "{sent:?}");
    let v: serde_json::Value =
        serde_json::from_str(&sent[0]).unwrap_or_else(|e| panic!("not JSON ({e}): {}", sent[0]));
    assert_eq!(v, serde_json::json!({ "entity": key }), "{}", sent[0]);
    assert_eq!(o.orphans(), (1, 1));
}

/// A compensation the broker refuses (larger than the topic's
/// `max.message.bytes`) is not recorded as sent: the step fails naming
/// the broker's error, and the orphan waits for a resume.
#[test]
fn a_compensation_the_broker_refuses_fails_the_step_and_stays_unsent() {
    let template = format!(
        r#"{{"entity":"{{{{key}}}}","padding":"{}"}}"#,
        "x".repeat(300)
    );
    let o = Orphan::new("case-1", &template);
    let out = crate::common::services::kafka_tool("org.apache.kafka.tools.ConfigCommand")
        .args(["--bootstrap-server", &kafka_bootstrap(), "--alter"])
        .args(["--entity-type", "topics", "--entity-name", &o.topic])
        .args(["--add-config", "max.message.bytes=100"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = o.apply("run");
    assert_exit(&out, 2);
    let said = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        said.contains("stopped: outbox:case-events") && said.contains("too large"),
        "{said}"
    );
    assert_eq!(o.orphans(), (1, 0), "staged, and not compensated");
    assert_eq!(o.compensations(), Vec::<String>::new());
    let journal = std::fs::read_to_string(o.dir.join("run").join("journal.jsonl")).unwrap();
    let records: Vec<serde_json::Value> = journal
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        records
            .iter()
            .any(|r| r["event"] == "failed" && r["step"] == "outbox:case-events"),
        "{journal}"
    );
    assert!(
        !records
            .iter()
            .any(|r| r["event"] == "done" && r["step"] == "outbox:case-events"),
        "nothing is counted as sent: {journal}"
    );
}

/// Review #11: what the application role may do to reentry's staging
/// table. `app` is no superuser; `appfn.record()` writes who ran it into
/// `appfn.fired`, a side table of the application's.
fn arm_the_app_role(o: &Orphan) {
    o.cluster
        .db_client("res")
        .batch_execute(
            "CREATE ROLE app LOGIN;
             CREATE SCHEMA appfn AUTHORIZATION app;
             ALTER DEFAULT PRIVILEGES FOR ROLE postgres GRANT ALL ON TABLES TO app;
             ALTER DEFAULT PRIVILEGES FOR ROLE postgres GRANT ALL ON SCHEMAS TO app;",
        )
        .unwrap();
    o.cluster
        .db_client_as("res", "app")
        .batch_execute(
            "CREATE TABLE appfn.fired (who text, superuser boolean);
             GRANT INSERT ON appfn.fired TO PUBLIC;
             CREATE FUNCTION appfn.record() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               INSERT INTO appfn.fired SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user;
               RETURN NEW;
             END $$;",
        )
        .unwrap();
}

/// Runs `apply` while a session holds SHARE on `table`, so that reentry
/// waits at its first lock there; `meanwhile` runs once it waits, in the
/// transaction that holds the lock; then that commits and the run ends.
fn apply_paused_at(
    o: &Orphan,
    run: &str,
    table: &str,
    meanwhile: impl FnOnce(&mut postgres::Transaction),
) -> std::process::Output {
    let mut holder = o.cluster.db_client("res");
    let mut tx = holder.transaction().unwrap();
    tx.batch_execute(&format!("LOCK TABLE {table} IN SHARE MODE"))
        .unwrap();
    let child = Command::new(reentry_bin())
        .arg("apply")
        .arg(o.playbook())
        .arg("--run-dir")
        .arg(o.dir.join(run))
        .arg("--apply")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut watch = o.cluster.db_client("res");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let waiting: i64 = watch
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = $1::text::regclass",
                &[&table],
            )
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "reentry never reached {table}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    meanwhile(&mut tx);
    tx.commit().unwrap();
    child.wait_with_output().unwrap()
}

/// What ran `appfn.record()`, and the triggers on reentry's table, as
/// PostgreSQL's catalog has them.
fn fired_and_triggers(o: &Orphan) -> (Vec<String>, Vec<String>) {
    let mut c = o.cluster.db_client("res");
    let fired = c
        .query(
            "SELECT who || ' superuser=' || superuser FROM appfn.fired",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let triggers = c
        .query(
            "SELECT tgname::text FROM pg_trigger WHERE tgrelid = to_regclass('reentry.orphan_event') AND NOT tgisinternal",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    (fired, triggers)
}

/// Review #11: `ALTER DEFAULT PRIVILEGES ... GRANT ALL ON TABLES TO app`
/// gave the application role TRIGGER on reentry.orphan_event as reentry
/// made it, before the insert that stages the orphan; a trigger the role
/// added then ran as reentry's superuser. reentry now takes back every
/// privilege on what it creates, in the transaction that creates it, and
/// a TRIGGER granted later is refused by the plan, naming the grant.
#[test]
fn default_privileges_give_the_application_role_no_trigger_on_reentrys_tables() {
    let o = Orphan::new("case-1", r#"{"entity":"{{key}}"}"#);
    arm_the_app_role(&o);
    assert_exit(&o.apply("run"), 0);
    assert_eq!(o.orphans(), (1, 1));
    // In PostgreSQL's catalog: no privilege of app's on reentry's schema
    // or tables, whatever the default privileges say.
    let mut c = o.cluster.db_client("res");
    let held: Vec<String> = c
        .query(
            "SELECT c.relname || ':' || a.privilege_type
               FROM pg_class c, aclexplode(c.relacl) a
              WHERE c.relnamespace = 'reentry'::regnamespace AND a.grantee <> c.relowner
             UNION ALL
             SELECT 'schema:' || a.privilege_type FROM pg_namespace n, aclexplode(n.nspacl) a
              WHERE n.nspname = 'reentry' AND a.grantee <> n.nspowner",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(held, Vec::<String>::new());
    // Even with USAGE on the schema (to read what is staged), app cannot
    // put a trigger there.
    c.batch_execute("GRANT USAGE ON SCHEMA reentry TO app")
        .unwrap();
    let err = o
        .cluster
        .db_client_as("res", "app")
        .batch_execute(
            "CREATE TRIGGER record BEFORE INSERT ON reentry.orphan_event
                 FOR EACH ROW EXECUTE FUNCTION appfn.record()",
        )
        .unwrap_err();
    let err = err.as_db_error().unwrap().message().to_owned();
    assert_eq!(err, "permission denied for table orphan_event");

    // What someone grants later (or an earlier build's table kept from
    // default privileges): the plan refuses, naming it. INSERT would let
    // app stage an orphan of its choosing, which reentry then compensates.
    c.batch_execute("GRANT INSERT, TRIGGER ON reentry.orphan_event TO app")
        .unwrap();
    let out = o.apply("run2");
    assert_exit(&out, 3);
    assert!(
        stderr(&out).contains(
            "databases.restored: reentry will not use schema reentry: reentry.orphan_event grants INSERT, TRIGGER to app"
        ),
        "{}",
        stderr(&out)
    );
    // A member of the role that owns reentry's schema has its owner's
    // rights, a trigger among them: refused too, naming the member.
    c.batch_execute(
        "REVOKE INSERT, TRIGGER ON reentry.orphan_event FROM app; GRANT postgres TO app",
    )
    .unwrap();
    let out = o.apply("run3");
    assert_exit(&out, 3);
    assert!(
        stderr(&out).contains(
            "databases.restored: reentry will not use schema reentry: role(s) app are members of postgres, which owns it"
        ),
        "{}",
        stderr(&out)
    );
    let err = o.cluster.db_client_as("res", "app").batch_execute(
        "CREATE TRIGGER record BEFORE INSERT ON reentry.orphan_event
                 FOR EACH ROW EXECUTE FUNCTION appfn.record()",
    );
    assert!(
        err.is_ok(),
        "membership did not give the owner's rights: {err:?}"
    );
}

/// Review #11: the check ran in a transaction of its own, before the
/// writes. A trigger the application role put on reentry's table after
/// it (with a TRIGGER granted meanwhile) ran on the insert that staged
/// the orphan, with reentry's rights. The check is made again in the
/// transaction that writes, with the table locked against CREATE TRIGGER.
#[test]
fn a_trigger_added_between_reentrys_check_and_its_write_is_refused_and_never_runs() {
    let o = Orphan::new("case-1", r#"{"entity":"{{key}}"}"#);
    arm_the_app_role(&o);
    // reentry's own schema and table, from an earlier run: clean.
    let mut c = o.cluster.db_client("res");
    c.batch_execute(&format!(
        "ALTER DEFAULT PRIVILEGES FOR ROLE postgres REVOKE ALL ON TABLES FROM app;
         ALTER DEFAULT PRIVILEGES FOR ROLE postgres REVOKE ALL ON SCHEMAS FROM app;
         CREATE SCHEMA reentry; {}",
        include_str!("../../sql/reentry_staging.sql")
    ))
    .unwrap();
    // reentry has checked the schema (before the outbox, and again before
    // it locks its table) and waits for its lock; the trigger is added and
    // committed meanwhile, before the lock is granted. Checked only before
    // the lock, the insert that staged the orphan would run it.
    let out = apply_paused_at(&o, "run", "reentry.orphan_event", |tx| {
        tx.batch_execute(
            "CREATE TRIGGER record BEFORE INSERT ON reentry.orphan_event
                 FOR EACH ROW EXECUTE FUNCTION appfn.record()",
        )
        .unwrap();
    });
    let (fired, triggers) = fired_and_triggers(&o);
    assert_eq!(
        fired,
        Vec::<String>::new(),
        "the trigger ran with reentry's rights"
    );
    assert_eq!(triggers, ["record"]);
    // Refused by the step, under the lock, in the transaction that writes:
    // the run stops there, refusing (exit 3), and resumes once the trigger
    // is gone.
    assert_exit(&out, 3);
    let said = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        said.contains("stopped: outbox:case-events: databases.restored: reentry will not use schema reentry: reentry.orphan_event has trigger(s) record"),
        "{said}"
    );
    assert_eq!(o.orphans(), (0, 0), "nothing staged");
    assert_eq!(o.compensations(), Vec::<String>::new(), "nothing sent");
    c.batch_execute("DROP TRIGGER record ON reentry.orphan_event")
        .unwrap();
    let out = run(&[
        &"apply",
        &o.playbook(),
        &"--run-dir",
        &o.dir.join("run"),
        &"--apply",
        &"--resume",
    ]);
    assert_exit(&out, 0);
    assert_eq!(o.orphans(), (1, 1));
    assert_eq!(fired_and_triggers(&o).0, Vec::<String>::new());
}

/// Code that a role could plant on reentry's own table while it was a
/// member of the owning role, and that would run on reentry's insert: a
/// rule, row security, a default calling the application's function. Each
/// is refused at plan, naming it; each gone, the plan passes.
#[test]
fn a_rule_a_policy_or_a_default_of_anothers_on_reentrys_table_is_refused() {
    let o = Orphan::new("case-1", r#"{"entity":"{{key}}"}"#);
    arm_the_app_role(&o);
    let mut c = o.cluster.db_client("res");
    c.batch_execute(&format!(
        "ALTER DEFAULT PRIVILEGES FOR ROLE postgres REVOKE ALL ON TABLES FROM app;
         ALTER DEFAULT PRIVILEGES FOR ROLE postgres REVOKE ALL ON SCHEMAS FROM app;
         CREATE SCHEMA reentry; {}
         CREATE FUNCTION appfn.stamp() RETURNS timestamptz LANGUAGE plpgsql AS $$
         BEGIN
           INSERT INTO appfn.fired SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user;
           RETURN now();
         END $$;",
        include_str!("../../sql/reentry_staging.sql")
    ))
    .unwrap();
    let said = |out: &std::process::Output| format!("{}{}", stdout(out), stderr(out));
    for (plant, want, undo) in [
        (
            "CREATE RULE copy AS ON INSERT TO reentry.orphan_event DO ALSO INSERT INTO appfn.fired VALUES (current_user, false)",
            "reentry.orphan_event has rule(s) copy",
            "DROP RULE copy ON reentry.orphan_event",
        ),
        (
            "ALTER TABLE reentry.orphan_event ENABLE ROW LEVEL SECURITY",
            "reentry.orphan_event has row security or policies",
            "ALTER TABLE reentry.orphan_event DISABLE ROW LEVEL SECURITY",
        ),
        (
            "ALTER TABLE reentry.orphan_event ALTER COLUMN staged_at SET DEFAULT appfn.stamp()",
            "reentry.orphan_event's defaults, constraints or indexes call function appfn.stamp(), outside pg_catalog",
            "ALTER TABLE reentry.orphan_event ALTER COLUMN staged_at SET DEFAULT now()",
        ),
    ] {
        c.batch_execute(plant).unwrap();
        let out = run(&[&"plan", &o.playbook()]);
        assert_exit(&out, 3);
        assert!(
            said(&out).contains(&format!(
                "databases.restored: reentry will not use schema reentry: {want}"
            )),
            "{}",
            said(&out)
        );
        c.batch_execute(undo).unwrap();
    }
    assert_exit(&o.apply("run"), 0);
    assert_eq!(o.orphans(), (1, 1));
    assert_eq!(fired_and_triggers(&o).0, Vec::<String>::new());
}

/// The lock fact `owned::guard` relies on: CREATE TRIGGER takes SHARE ROW
/// EXCLUSIVE (PostgreSQL 15 and 18), which conflicts with the ROW
/// EXCLUSIVE reentry holds on its tables while it writes them.
#[test]
fn create_trigger_waits_for_a_row_exclusive_lock_on_15_and_18() {
    for v in [Version::V15, Version::V18] {
        let mut cluster = Cluster::init(v);
        cluster.start();
        let mut a = cluster.client();
        a.batch_execute(
            "CREATE TABLE t (x int);
             CREATE FUNCTION f() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;",
        )
        .unwrap();
        let mut tx = a.transaction().unwrap();
        tx.batch_execute("CREATE TRIGGER g BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION f()")
            .unwrap();
        let mut b = cluster.client();
        let mode: String = b
            .query_one(
                "SELECT mode FROM pg_locks WHERE relation = 't'::regclass AND granted",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(mode, "ShareRowExclusiveLock", "{v:?}");
        tx.rollback().unwrap();
        let mut tx = a.transaction().unwrap();
        tx.batch_execute("LOCK TABLE t IN ROW EXCLUSIVE MODE")
            .unwrap();
        b.batch_execute("SET lock_timeout = '200ms'").unwrap();
        let err = b
            .batch_execute("CREATE TRIGGER g BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION f()")
            .unwrap_err();
        let err = err.as_db_error().unwrap().message().to_owned();
        assert!(err.contains("lock timeout"), "{v:?}: {err}");
        tx.rollback().unwrap();
    }
}

/// Review #5: an earlier release staged orphans in an unqualified
/// `reentry_orphan_event` (public), and may have sent some of their
/// compensating events before it died. This build cannot resume that
/// journal; a new run staged the orphans again, with compensated_at NULL,
/// and sent their compensations again. While such a table holds rows,
/// plan and apply refuse, naming it and what to do, and write nothing.
#[test]
fn an_earlier_releases_staging_table_with_rows_makes_plan_and_apply_refuse() {
    let o = Orphan::new("case-1", r#"{"entity":"{{key}}"}"#);
    let mut c = o.cluster.db_client("res");
    c.batch_execute(&format!(
        "CREATE TABLE public.reentry_orphan_event (
             run_id text NOT NULL, outbox text NOT NULL, event_id text NOT NULL, topic text NOT NULL,
             partition integer NOT NULL, \"offset\" bigint NOT NULL, event_time timestamptz,
             key bytea, payload bytea, headers jsonb, staged_at timestamptz NOT NULL DEFAULT now(),
             compensated_at timestamptz, PRIMARY KEY (topic, partition, \"offset\"));
         INSERT INTO public.reentry_orphan_event (run_id, outbox, event_id, topic, partition, \"offset\", compensated_at)
              VALUES ('old-run', 'case-events', '{}', '{}', 0, 0, now());",
        uuid(1),
        o.topic
    ))
    .unwrap();
    let said = |out: &std::process::Output| format!("{}{}", stdout(out), stderr(out));
    let want = "databases.restored: public.reentry_orphan_event holds orphan events staged by an earlier reentry";
    let out = run(&[&"plan", &o.playbook()]);
    assert_exit(&out, 3);
    assert!(said(&out).contains(want), "{}", said(&out));
    assert!(
        said(&out).contains("Finish that run with the reentry build that started it"),
        "{}",
        said(&out)
    );
    let out = o.apply("run");
    assert_exit(&out, 3);
    assert!(said(&out).contains(want), "{}", said(&out));
    // Nothing written: no schema of reentry's, no gate closed, nothing sent.
    let gone: bool = c
        .query_one("SELECT to_regnamespace('reentry') IS NULL", &[])
        .unwrap()
        .get(0);
    assert!(gone, "reentry's schema was made");
    for db in ["cur", "res"] {
        let open: bool = o
            .cluster
            .db_client(db)
            .query_one(
                "SELECT enabled FROM system_gate WHERE gate_name = 'outbox-relay'",
                &[],
            )
            .unwrap()
            .get(0);
        assert!(open, "a gate closed on {db}");
    }
    assert_eq!(o.compensations(), Vec::<String>::new());
    // Emptied, it is no longer in the way; renamed once checked, neither.
    c.batch_execute("DELETE FROM public.reentry_orphan_event")
        .unwrap();
    let out = run(&[&"plan", &o.playbook()]);
    assert!(matches!(out.status.code(), Some(0 | 1)), "{}", said(&out));
    // The earlier release's other staging tables, each with a row: the
    // idempotency tombstones (by name) and a repair's staging table (by
    // its bookkeeping columns, in reentry_repair).
    for (plant, want, clear) in [
        (
            "CREATE TABLE public.reentry_idempotency_tombstone (run_id text, key text, source text, recorded_at timestamptz);
             INSERT INTO public.reentry_idempotency_tombstone VALUES ('old-run', 'k1', 'src', now());",
            "public.reentry_idempotency_tombstone holds the tombstones an earlier reentry recorded",
            "DROP TABLE public.reentry_idempotency_tombstone",
        ),
        (
            "CREATE SCHEMA reentry_repair;
             CREATE TABLE reentry_repair.orders_1 (id int, _run_id text, _status text, _class text);
             INSERT INTO reentry_repair.orders_1 VALUES (1, 'old-run', 'staged', 'missing');",
            "reentry_repair.orders_1 holds rows an earlier reentry staged for a repair",
            "DROP SCHEMA reentry_repair CASCADE",
        ),
    ] {
        c.batch_execute(plant).unwrap();
        let out = run(&[&"plan", &o.playbook()]);
        assert_exit(&out, 3);
        assert!(said(&out).contains(want), "{}", said(&out));
        c.batch_execute(clear).unwrap();
    }
    c.batch_execute(
        "INSERT INTO public.reentry_orphan_event (run_id, outbox, event_id, topic, partition, \"offset\")
              VALUES ('old-run', 'case-events', 'x', 'y', 0, 0);
         ALTER TABLE public.reentry_orphan_event RENAME TO orphan_event_checked",
    )
    .unwrap();
    assert_exit(&o.apply("run2"), 0);
    assert_eq!(o.orphans(), (1, 1));
}
