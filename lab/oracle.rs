//! The oracle: whether the application's whole world agrees again, read
//! from each peer's own record: the topic through kcat, Redis and the
//! search index directly, the provider's CSV, the jobs' run logs, the
//! client's request log, and both databases. One line per property.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};

use crate::common::*;

struct Property {
    id: &'static str,
    name: &'static str,
    pass: bool,
    detail: String,
}

fn prop(id: &'static str, name: &'static str, problems: Vec<String>, fine: String) -> Property {
    let pass = problems.is_empty();
    let detail = if pass {
        fine
    } else {
        let shown: Vec<&str> = problems.iter().take(3).map(String::as_str).collect();
        let more = if problems.len() > 3 {
            format!(" (+{} more)", problems.len() - 3)
        } else {
            String::new()
        };
        format!("{}{more}", shown.join("; "))
    };
    Property {
        id,
        name,
        pass,
        detail,
    }
}

/// An event as kcat read it.
struct Event {
    partition: i32,
    offset: i64,
    id: String,
    payload: Value,
}

fn read_topic(lab: &Lab) -> Result<Vec<Event>, String> {
    let kcat = std::env::var("REENTRY_KCAT").unwrap_or_else(|_| "kcat".into());
    let out = std::process::Command::new(&kcat)
        .args([
            "-b",
            &lab.kafka,
            "-C",
            "-t",
            TOPIC,
            "-o",
            "beginning",
            "-e",
            "-q",
            "-J",
        ])
        .output()
        .map_err(|e| format!("{kcat}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "kcat: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let mut events = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: Value = serde_json::from_str(line).map_err(|e| format!("kcat -J: {e}: {line}"))?;
        let headers: Vec<&str> = v["headers"]
            .as_array()
            .map(|h| h.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let id = event_id(
            headers
                .chunks(2)
                .filter(|kv| kv.len() == 2)
                .map(|kv| (kv[0], kv[1].as_bytes())),
        )
        .unwrap_or_default();
        events.push(Event {
            partition: v["partition"].as_i64().unwrap_or(0) as i32,
            offset: v["offset"].as_i64().unwrap_or(0),
            id,
            payload: v["payload"]
                .as_str()
                .and_then(|p| serde_json::from_str(p).ok())
                .unwrap_or(Value::Null),
        });
    }
    Ok(events)
}

/// The group's committed offsets, per partition of the topic.
fn committed(lab: &Lab) -> Result<BTreeMap<i32, i64>, String> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &lab.kafka)
        .set("group.id", GROUP)
        .set("log_level", "3")
        .create()
        .map_err(|e| e.to_string())?;
    let md = c
        .fetch_metadata(Some(TOPIC), std::time::Duration::from_secs(10))
        .map_err(|e| format!("metadata of {TOPIC}: {e}"))?;
    let mut tpl = TopicPartitionList::new();
    for t in md.topics().iter().filter(|t| t.name() == TOPIC) {
        for p in t.partitions() {
            tpl.add_partition(TOPIC, p.id());
        }
    }
    let got = c
        .committed_offsets(tpl, std::time::Duration::from_secs(10))
        .map_err(|e| format!("committed offsets of {GROUP}: {e}"))?;
    Ok(got
        .elements()
        .iter()
        .map(|e| {
            let o = match e.offset() {
                Offset::Offset(o) => o,
                _ => 0,
            };
            (e.partition(), o)
        })
        .collect())
}

/// The cases of a database: id → (JSON fields, updated_by).
fn cases(db: &mut postgres::Transaction<'_>) -> Result<BTreeMap<i64, (Value, String)>, String> {
    Ok(db
        .query(
            &format!("SELECT id, {CASE_JSON}, updated_by FROM cases"),
            &[],
        )
        .map_err(|e| e.to_string())?
        .iter()
        .map(|r| {
            let v: Value = serde_json::from_str(&r.get::<_, String>(1)).unwrap_or(Value::Null);
            (r.get(0), (v, r.get(2)))
        })
        .collect())
}

/// The fields a reader sees, without the version.
fn fields(v: &Value) -> Value {
    json!([v["title"], v["status"], v["owner_id"], v["priority"]])
}

pub fn run(
    lab: &Lab,
    label: &str,
    survivor: &str,
    retired: &str,
    run_dir: Option<&str>,
) -> Result<bool, String> {
    let e = |e: postgres::Error| reentry::pg::conn::describe(&e);
    // Before the snapshot: the projector commits an offset only after its
    // inbox row, so every event below these is in the snapshot.
    let done = committed(lab)?;
    let mut sdb = connect(survivor)?;
    let mut rdb = connect(retired)?;
    let mut tx = sdb
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .map_err(e)?;
    let rows = cases(&mut tx)?;
    // A column of text, as a set, in the snapshot.
    let mut set = |sql: &str| -> Result<BTreeSet<String>, String> {
        Ok(tx
            .query(sql, &[])
            .map_err(e)?
            .iter()
            .map(|r| r.get(0))
            .collect())
    };
    let payments = set("SELECT idem_key FROM payments")?;
    let outbox = set("SELECT id::text FROM outbox_event")?;
    let inbox = set("SELECT message_id FROM inbox_message")?;
    let applied: BTreeMap<i64, i32> = tx
        .query("SELECT case_id, events_applied FROM case_projection", &[])
        .map_err(e)?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut props = Vec::new();
    // Read after the snapshot: the topic holds every event the inbox has.
    let events = read_topic(lab)?;

    // 1. Every event has its row, or a compensation.
    let compensated: BTreeSet<&str> = events
        .iter()
        .filter_map(|ev| ev.payload["compensates"].as_str())
        .collect();
    let mut problems = Vec::new();
    for ev in &events {
        // Its outbox row (the event id is the row's id), or a compensation
        // for it; a compensation itself is reentry's, with no row.
        let ok = outbox.contains(&ev.id)
            || compensated.contains(ev.id.as_str())
            || !ev.payload["compensates"].is_null();
        if !ok {
            problems.push(format!(
                "event {} ({}) at {}:{} has no outbox row",
                ev.id, ev.payload["type"], ev.partition, ev.offset
            ));
        }
    }
    props.push(prop(
        "kafka",
        "every event in Kafka has its row, or a compensation",
        problems,
        format!("{} events, {} compensated", events.len(), compensated.len()),
    ));

    // 2. Redis.
    let mut redis = redis::Client::open(lab.redis.as_str())
        .and_then(|c| c.get_connection())
        .map_err(|e| format!("Redis: {e}"))?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("case:*")
        .query(&mut redis)
        .map_err(|e| format!("Redis: {e}"))?;
    let mut problems = Vec::new();
    for k in &keys {
        let v: Option<String> = redis::cmd("GET")
            .arg(k)
            .query(&mut redis)
            .map_err(|e| e.to_string())?;
        let Some(v) = v.and_then(|v| serde_json::from_str::<Value>(&v).ok()) else {
            continue;
        };
        match v["id"].as_i64().and_then(|id| rows.get(&id)) {
            None => problems.push(format!("{k} caches a case that does not exist")),
            Some((row, _)) if row != &v => problems.push(format!(
                "{k} holds {} {}, the row is {} {}",
                v["status"], v["version"], row["status"], row["version"]
            )),
            Some(_) => {}
        }
    }
    props.push(prop(
        "redis",
        "no Redis key holds a value that disagrees with its row",
        problems,
        format!("{} keys agree", keys.len()),
    ));

    // 3. Search.
    let http = reqwest::blocking::Client::new();
    http.post(format!("{}/{INDEX}/_refresh", lab.search))
        .send()
        .map_err(|e| format!("search: {e}"))?;
    let hits: Value = http
        .post(format!("{}/{INDEX}/_search", lab.search))
        .json(&json!({ "size": 10_000, "query": { "match_all": {} } }))
        .send()
        .and_then(|r| r.json())
        .map_err(|e| format!("search: {e}"))?;
    let total = hits["hits"]["total"]["value"].as_u64().unwrap_or(0);
    let hits = hits["hits"]["hits"].as_array().cloned().unwrap_or_default();
    let mut problems = Vec::new();
    if total > hits.len() as u64 {
        problems.push(format!(
            "{total} documents, more than one search returns ({})",
            hits.len()
        ));
    }
    for h in &hits {
        let id: i64 = h["_id"].as_str().and_then(|s| s.parse().ok()).unwrap_or(-1);
        match rows.get(&id) {
            None => problems.push(format!("document {id} has no row")),
            Some((row, _)) if fields(row) != fields(&h["_source"]) => problems.push(format!(
                "document {id} says {}, the row {}",
                h["_source"]["status"], row["status"]
            )),
            Some(_) => {}
        }
    }
    props.push(prop(
        "search",
        "every search document agrees with its row, and has one",
        problems,
        format!("{} documents agree", hits.len()),
    ));

    // 4. The provider's memory.
    let csv = std::fs::read_to_string(lab.path("provider.csv")).unwrap_or_default();
    let mut seen: BTreeMap<&str, u32> = BTreeMap::new();
    for l in csv.lines().filter(|l| *l != PROVIDER_CSV_HEADER) {
        *seen.entry(l.split(',').next().unwrap_or("")).or_default() += 1;
    }
    let twice: Vec<String> = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(k, n)| format!("{k} executed {n} times"))
        .collect();
    let log = read_lines(&lab.path("requests.log"));
    let replays = log.iter().filter(|l| l.contains(" replayed pay ")).count();
    let tombstoned = log
        .iter()
        .filter(|l| l.contains(" tombstoned pay "))
        .count();
    props.push(prop(
        "provider",
        "no provider request was executed twice",
        twice,
        format!(
            "{} requests, each once; of the client retries, {replays} replayed a stored answer, {tombstoned} hit a tombstone",
            seen.len()
        ),
    ));

    // 5. The bad job's damage is gone; the legitimate writes are there.
    let damaged: Vec<i64> = read_lines(&lab.path("bad-job.ids"))
        .iter()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    let mut problems: Vec<String> = rows
        .iter()
        .filter(|(_, (_, by))| by == BAD_JOB)
        .map(|(id, _)| format!("case {id} is still closed by the bad job"))
        .collect();
    let mut writes = 0;
    for l in read_lines(&lab.path("requests.log")) {
        let w: Vec<&str> = l.split_whitespace().collect();
        // ts client done op id ... v=VERSION
        if w.len() < 5 || w[2] != "done" {
            continue;
        }
        writes += 1;
        if w[3] == "pay" {
            if w.len() > 5 && !payments.contains(w[5]) {
                problems.push(format!("payment {} is missing", w[5]));
            }
            continue;
        }
        let Some(v) = w
            .iter()
            .find_map(|x| x.strip_prefix("v="))
            .and_then(|v| v.parse::<i64>().ok())
        else {
            continue;
        };
        let id: i64 = if w[3] == "create" {
            w.iter()
                .find_map(|x| x.strip_prefix("id="))
                .and_then(|x| x.parse().ok())
                .unwrap_or(-1)
        } else {
            w[4].parse().unwrap_or(-1)
        };
        match rows.get(&id) {
            None => problems.push(format!("case {id} ({}) is missing", w[3])),
            Some((row, _))
                if row["version"].as_i64().unwrap_or(0) < v && !damaged.contains(&id) =>
            {
                problems.push(format!("case {id}: the write at {v} ({}) was lost", w[3]))
            }
            Some(_) => {}
        }
    }
    props.push(prop(
        "writes",
        "the bad job's damage is gone, and every legitimate write is there",
        problems,
        format!(
            "{} cases the bad job closed are repaired; {writes} writes present",
            damaged.len()
        ),
    ));

    // 6. The inbox against the topic and the group's offsets.
    let mut problems = Vec::new();
    let mut per_case: BTreeMap<i64, i32> = BTreeMap::new();
    for ev in &events {
        let case = event_case(&ev.payload);
        if inbox.contains(&ev.id) {
            *per_case.entry(case).or_default() += 1;
        } else if ev.offset < done.get(&ev.partition).copied().unwrap_or(0) {
            problems.push(format!(
                "event {} at {}:{} was committed but is not in the inbox",
                ev.id, ev.partition, ev.offset
            ));
        }
    }
    for (case, n) in &applied {
        let want = per_case.get(case).copied().unwrap_or(0);
        if *n != want {
            problems.push(format!(
                "case {case}: {n} effects for {want} events in the inbox"
            ));
        }
    }
    props.push(prop(
        "inbox",
        "consumers re-consumed what the restore took back: no gaps, no double effects",
        problems,
        format!("{} inbox rows, one effect each", inbox.len()),
    ));

    // 7. Invariants.
    let mut problems = Vec::new();
    for (what, sql) in [
        ("an open case without an owner", "SELECT id::text FROM cases WHERE status = 'open' AND owner_id IS NULL"),
        ("a payment without its idempotency key", "SELECT p.idem_key FROM payments p LEFT JOIN idempotency_key k USING (idem_key) WHERE k.idem_key IS NULL"),
        ("cases_id_seq behind max(id)", "SELECT 'seq' WHERE (SELECT last_value FROM cases_id_seq) < (SELECT coalesce(max(id), 0) FROM cases)"),
    ] {
        for r in tx.query(sql, &[]).map_err(e)?.iter().take(3) {
            problems.push(format!("{what}: {}", r.get::<_, String>(0)));
        }
    }
    tx.commit().map_err(e)?;
    props.push(prop(
        "invariants",
        "the invariants hold",
        problems,
        "3 invariants".into(),
    ));

    // 8. Gates.
    let mut problems = Vec::new();
    gates(&mut sdb, true, "survivor", &mut problems)?;
    gates(&mut rdb, false, "retired", &mut problems)?;
    props.push(prop(
        "gates",
        "the gates are open on the survivor and closed on the retired database",
        problems,
        "3 system gates, the ShedLock lock and the Quartz group, on both".into(),
    ));

    // 9. No job ran while its gate was closed.
    let (problems, fine) = match run_dir {
        None => (Vec::new(), "no gate has closed yet".to_owned()),
        Some(dir) => jobs_gated(lab, Path::new(dir))?,
    };
    props.push(prop(
        "jobs",
        "no scheduled job ran while its gate was closed (their run logs)",
        problems,
        fine,
    ));

    let mut ok = true;
    for p in &props {
        ok &= p.pass;
        println!(
            "  {:<4} {:<72} {}",
            if p.pass { "ok" } else { "FAIL" },
            p.name,
            p.detail
        );
    }
    let out = json!({
        "label": label,
        "at": now_ms(),
        "properties": props.iter().map(|p| json!({ "id": p.id, "name": p.name, "pass": p.pass, "detail": p.detail })).collect::<Vec<_>>(),
    });
    std::fs::write(lab.path(&format!("oracle-{label}.json")), out.to_string())
        .map_err(|e| e.to_string())?;
    Ok(ok)
}

fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The gates as the application's own checks would read them.
fn gates(
    db: &mut postgres::Client,
    open: bool,
    side: &str,
    problems: &mut Vec<String>,
) -> Result<(), String> {
    let e = |e: postgres::Error| reentry::pg::conn::describe(&e);
    for g in [GATE_API, GATE_RELAY, GATE_PROJECTOR] {
        if gate_open(db, g).map_err(e)? != open {
            problems.push(format!(
                "{g} is {} on the {side}",
                if open { "closed" } else { "open" }
            ));
        }
    }
    let frozen: bool = db
        .query_one(
            "SELECT lock_until > now() + interval '1 day' FROM shedlock WHERE name = $1",
            &[&SHEDLOCK_JOB],
        )
        .map_err(e)?
        .get(0);
    if frozen == open {
        problems.push(format!(
            "ShedLock {SHEDLOCK_JOB} is {} on the {side}",
            if open { "frozen" } else { "free" }
        ));
    }
    let paused: i64 = db
        .query_one(
            "SELECT count(*) FROM qrtz_triggers WHERE sched_name = $1 AND trigger_group = $2 \
             AND trigger_state IN ('PAUSED', 'PAUSED_BLOCKED')",
            &[&QUARTZ_SCHEDULER, &QUARTZ_GROUP],
        )
        .map_err(e)?
        .get(0);
    let total: i64 = db
        .query_one(
            "SELECT count(*) FROM qrtz_triggers WHERE sched_name = $1 AND trigger_group = $2",
            &[&QUARTZ_SCHEDULER, &QUARTZ_GROUP],
        )
        .map_err(e)?
        .get(0);
    if open && paused > 0 || !open && paused < total {
        problems.push(format!(
            "Quartz group {QUARTZ_GROUP}: {paused} of {total} trigger(s) paused on the {side}"
        ));
    }
    Ok(())
}

/// Each job's runs against the windows its gate was closed on the
/// database it runs on, from reentry's journal: after the close step was
/// done, before the re-open step started.
fn jobs_gated(lab: &Lab, run_dir: &Path) -> Result<(Vec<String>, String), String> {
    let journal = read_lines(&run_dir.join("journal.jsonl"));
    let ms = |at: &str| -> i64 {
        at.parse::<jiff::Timestamp>()
            .map(|t| t.as_millisecond())
            .unwrap_or(0)
    };
    let mut problems = Vec::new();
    let mut counted = Vec::new();
    for (gate, log) in [
        (GATE_SHEDLOCK, "shedlock-runs.log"),
        (GATE_QUARTZ, "quartz-runs.log"),
    ] {
        let mut closed: Option<i64> = None;
        let mut reopened: Option<i64> = None;
        for l in &journal {
            let Ok(v) = serde_json::from_str::<Value>(l) else {
                continue;
            };
            let step = v["step"].as_str().unwrap_or("");
            let at = ms(v["at"].as_str().unwrap_or(""));
            // The database the application uses is the one re-opened.
            if step.starts_with(&format!("close:{gate}@")) && v["event"] == "done" {
                closed = Some(closed.map_or(at, |c: i64| c.min(at)));
            }
            if step.starts_with(&format!("reopen:{gate}@")) && v["event"] == "started" {
                reopened = Some(reopened.map_or(at, |r: i64| r.max(at)));
            }
        }
        let Some(from) = closed else {
            problems.push(format!("gate {gate} was never closed"));
            continue;
        };
        let to = reopened.unwrap_or(i64::MAX);
        let runs: Vec<i64> = read_lines(&lab.path(log))
            .iter()
            .filter_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                // ShedLock: start end …; Quartz: fire scheduled start …
                let start = if log.starts_with("quartz") {
                    w.get(2)
                } else {
                    w.first()
                };
                start.and_then(|s| s.parse().ok())
            })
            .collect();
        let inside = runs.iter().filter(|t| **t > from && **t < to).count();
        let after = runs.iter().filter(|t| **t >= to).count();
        if inside > 0 {
            problems.push(format!(
                "{inside} run(s) under gate {gate} while it was closed"
            ));
        }
        counted.push(format!(
            "{gate}: closed {:.1} s, 0 runs then, {after} after",
            (to.min(now_ms()) - from) as f64 / 1000.0
        ));
    }
    Ok((problems, counted.join("; ")))
}

/// The before/after table: printed, and written as `OUT` (JSON) for
/// `reentry report`. False when a property fails after.
pub fn table(before: &str, after: &str, out: &str) -> Result<bool, String> {
    let read = |p: &str| -> Result<Value, String> {
        std::fs::read_to_string(p)
            .map_err(|e| format!("{p}: {e}"))
            .and_then(|s| serde_json::from_str(&s).map_err(|e| format!("{p}: {e}")))
    };
    let (b, a) = (read(before)?, read(after)?);
    let empty = Vec::new();
    let bp = b["properties"].as_array().unwrap_or(&empty);
    let ap = a["properties"].as_array().unwrap_or(&empty);
    let word = |p: Option<&Value>| match p.map(|p| p["pass"].as_bool()) {
        Some(Some(true)) => "ok",
        Some(Some(false)) => "FAIL",
        _ => "-",
    };
    println!("  {:<72} {:<8} re-entered", "property", "restored");
    let mut rows = Vec::new();
    let mut ok = true;
    for p in ap {
        let before = bp.iter().find(|x| x["id"] == p["id"]);
        ok &= p["pass"].as_bool() == Some(true);
        println!(
            "  {:<72} {:<8} {}",
            p["name"].as_str().unwrap_or(""),
            word(before),
            word(Some(p))
        );
        rows.push(json!({
            "property": p["name"],
            "results": [
                before.map_or(Value::Null, |x| json!({ "pass": x["pass"], "detail": x["detail"] })),
                { "pass": p["pass"], "detail": p["detail"] },
            ],
        }));
    }
    let doc = json!({
        "source": "lab oracle (lab/oracle.rs)",
        "columns": ["after the restore", "after re-entry"],
        "rows": rows,
    });
    std::fs::write(out, serde_json::to_string_pretty(&doc).unwrap())
        .map_err(|e| format!("{out}: {e}"))?;
    Ok(ok)
}
