//! The crash-point harness. One playbook uses every step kind there is
//! (gates of each type, the cache wait, verify, probe, health checks,
//! validation, outbox, inbox, consumer-group rewind, idempotency keys, row
//! stage, apply and delete, cache keys, patterns and generation, each
//! search strategy against a real OpenSearch node). Its
//! plan is enumerated, and for every step at every pause point it reaches
//! (`started`, `prior`, `applied`, `done`, and `batch` for a step that
//! journals its progress) a run is killed there with
//! SIGKILL and resumed with `--resume`. Each resumed world must equal the
//! world of a run that was never killed: both databases row for row, the
//! topic message for message, the consumer group's offsets, and the number
//! of row changes per table and operation (a side effect done twice, a
//! second compensation or tombstone, shows there), the Redis keys, and
//! each index's documents with their versions as the node's `_search`
//! returns them. Steps added later are
//! covered without editing this test: the cases come from the plan.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use reentry::kafka::Kafka;

use crate::common::redis::{cli as redis_cli, keys as redis_keys};
use crate::common::search::{Indexes, Node};
use crate::common::services::{kafka_bootstrap, redis_addr};
use crate::common::{assert_exit, reentry_bin, stderr, stdout};
use crate::reconcile::{kcat_read, ts, World};

/// Row changes of these tables are counted: a change made twice shows.
const AUDITED: &[&str] = &[
    "system_gate",
    "shedlock",
    "qrtz_triggers",
    "qrtz_paused_trigger_grps",
    "outbox_event",
    "inbox_message",
    "idempotency_key",
    "cases",
];

/// Columns whose values are the time or the run id of whoever wrote
/// them: they differ between any two runs, killed or not.
const VOLATILE: &[&str] = &[
    "run_id",
    "staged_at",
    "compensated_at",
    "inserted_at",
    "processed_at",
    "locked_at",
    "locked_by",
    "updated_at",
    "reentry$run_id",
    "reentry$staged_at",
    "repair_id",
    "executed_at",
];

const POINTS: &[&str] = &["started", "prior", "applied", "done"];

/// T, shared by every world of this test so that they are alike.
fn t() -> i64 {
    static T: OnceLock<i64> = OnceLock::new();
    *T.get_or_init(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        (now - 20 * 60_000) / 60_000 * 60_000
    })
}

/// A world with every kind's tables and data, and the playbook over it;
/// its indexes go when the last part drops.
fn world() -> (World, PathBuf, Indexes) {
    let w = World::at(t());
    for db in ["cur", "res"] {
        let mut c = w.client(db);
        c.batch_execute(&crate::common::quartz::schema()).unwrap();
        c.batch_execute(
            "CREATE EXTENSION IF NOT EXISTS amcheck;
             INSERT INTO system_gate VALUES ('api-writes', true, now());
             INSERT INTO shedlock VALUES ('escalate-overdue-cases', '2026-11-25 11:58:30+00', '2026-11-25 11:58:00+00', 'case-app-7f9c');
             INSERT INTO qrtz_job_details (sched_name, job_name, job_group, job_class_name, is_durable,
                                           is_nonconcurrent, is_update_data, requests_recovery)
             VALUES ('CaseScheduler', 'escalate', 'DEFAULT', 'CaseJob', false, false, false, false),
                    ('CaseScheduler', 'archive', 'DEFAULT', 'CaseJob', false, false, false, false);
             INSERT INTO qrtz_triggers (sched_name, trigger_name, trigger_group, job_name, job_group,
                                        trigger_state, trigger_type, start_time, next_fire_time, misfire_instr)
             VALUES ('CaseScheduler', 'escalate', 'DEFAULT', 'escalate', 'DEFAULT', 'WAITING', 'SIMPLE', 0, 4102444800000, 0),
                    ('CaseScheduler', 'archive', 'DEFAULT', 'archive', 'DEFAULT', 'PAUSED', 'SIMPLE', 0, 4102444800000, 0);
             CREATE TABLE gate_audit (tbl text, op text);
             -- Its own search path: reentry's writes run under pg_catalog, pg_temp.
             CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql SET search_path = public AS $$
             BEGIN INSERT INTO gate_audit VALUES (TG_TABLE_NAME, TG_OP); RETURN NULL; END $$;",
        )
        .unwrap();
        // The restored copy's sequence is behind its column: a setval to plan.
        if db == "res" {
            c.batch_execute("SELECT setval('cases_id_seq', 2)").unwrap();
        }
        for table in AUDITED {
            c.batch_execute(&format!(
                "CREATE TRIGGER audit AFTER INSERT OR UPDATE OR DELETE ON {table} FOR EACH ROW EXECUTE FUNCTION audit()"
            ))
            .unwrap();
        }
    }
    let text = format!(
        r#"[playbook]
name = "every-kind"
way-back = "cutover"

[databases.current]
conninfo = "{cur}"

[databases.restored]
conninfo = "{res}"

[recovery-target]
time = "{t}"

[gates]
cache-ttl = "300ms"
reopen-order = ["api-writes", "case-jobs", "quartz-jobs", "outbox-relay"]

[gates.probe]
database = "current"
sql = "SELECT job_name FROM job_run WHERE started_at > now() - interval '1 minute'"

[[gates.system-gate]]
name = "api-writes"
databases = ["current", "restored"]
health-check = {{ database = "restored", sql = "SELECT id FROM cases WHERE title = 'broken'" }}

[[gates.system-gate]]
name = "outbox-relay"
databases = ["current", "restored"]

[[gates.shedlock]]
name = "case-jobs"
databases = ["current", "restored"]
locks = ["escalate-overdue-cases", "close-stale-cases"]

[[gates.quartz]]
name = "quartz-jobs"
databases = ["current", "restored"]
scheduler = "CaseScheduler"

[validation]
amcheck = true

[[validation.invariant]]
name = "every case has an owner"
database = "restored"
sql = "SELECT id FROM cases WHERE owner_id IS NULL"

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
watch = "300ms"

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
# Longer than the harness runs: keys expiring (relative to now) between the
# unkilled run and a late case's resume would differ for no fault of either.
retention = "1h"
action = "tombstone"
from-current = true
from-csv = {{ path = "provider.csv", key-column = "request_id", time-column = "sent_at" }}

[[repair]]
table = "cases"
updated-at = "updated_at"
on-conflict = "source-wins"
allow-delete = true
batch-size = 2

# Triggers off, and so foreign-key checks: then they are counted after.
[[repair]]
table = "payments"
updated-at = "created_at"
triggers = "disable"

[[caches]]
name = "case-cache"
url = "redis://{redis}"
table = "cases"
updated-at = "updated_at"
keys = ["{topic}:case:{{id}}", "{topic}:case:{{id}}:summary"]
patterns = ["{topic}:q:*"]
generation = "{topic}:ns"
scan-count = 2
batch-size = 1

[[search]]
name = "events"
url = "{search}"
index = "{topic}-events"
strategy = "delete-by-query"
timestamp-field = "at"

[[search]]
name = "cases-targeted"
url = "{search}"
index = "{topic}-cases"
strategy = "targeted"
table = "cases"
updated-at = "updated_at"
documents = "{documents}"
batch-size = 1

[[search]]
name = "cases-rebuilt"
url = "{search}"
index = "{topic}-rebuilt"
strategy = "rebuild"
documents = "{documents}"
batch-size = 2

[[search]]
name = "hook"
url = "{search}"
index = "{topic}-hooked"
strategy = "rebuild-hook"
rebuild-hook = "echo rebuilt"
"#,
        redis = redis_addr(),
        search = Node::shared().url,
        documents = DOCUMENTS,
        cur = w.conninfo("cur"),
        res = w.conninfo("res"),
        t = ts(w.t),
        topic = w.topic,
        group = w.group,
        bootstrap = kafka_bootstrap(),
    );
    let pb = w.dir.join("every-kind.toml");
    std::fs::write(&pb, text).unwrap();
    // The world's indexes are `TOPIC-…`.
    let indexes = Indexes {
        node: Node::shared(),
        prefix: w.topic.clone(),
    };
    seed_caches_and_indexes(&w, &indexes.node);
    (w, pb, indexes)
}

/// A case's search document, from either database.
const DOCUMENTS: &str = "SELECT id::text AS id, (extract(epoch FROM updated_at) * 1000)::int8 AS version, jsonb_build_object('title', title, 'status', status) AS doc FROM cases";

/// Redis keys for every case, query keys, a version key; documents
/// before and after T; two indexes projected from current, behind aliases.
fn seed_caches_and_indexes(w: &World, node: &Node) {
    let p = &w.topic;
    let mut c = w.client("cur");
    let ids: Vec<i64> = c
        .query("SELECT id FROM cases ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut cmds = String::new();
    for id in &ids {
        cmds.push_str(&format!(
            "SET {p}:case:{id} v\nSET {p}:case:{id}:summary v\n"
        ));
    }
    for n in 0..7 {
        cmds.push_str(&format!("SET {p}:q:{n} v\n"));
    }
    cmds.push_str(&format!("SET {p}:ns 3\nSET {p}:other v\n"));
    redis_cli(&redis_addr(), false, &cmds);

    // Events timed in epoch milliseconds, in a long.
    let events = format!("{p}-events");
    node.create(
        &events,
        None,
        serde_json::json!({ "at": { "type": "long" } }),
    );
    let mut docs = Vec::new();
    for i in 0..4 {
        docs.push((
            format!("b{i}"),
            1,
            serde_json::json!({ "at": w.t - 60_000 - i }),
        ));
        docs.push((
            format!("a{i}"),
            1,
            serde_json::json!({ "at": w.t + 60_000 + i }),
        ));
    }
    node.put_all(&events, &docs);
    let sql = format!("SELECT id, version, doc::text FROM ({DOCUMENTS}) d");
    let docs: Vec<(String, i64, serde_json::Value)> = c
        .query(&sql, &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), serde_json::from_str(r.get(2)).unwrap()))
        .collect();
    for alias in [format!("{p}-cases"), format!("{p}-rebuilt")] {
        let index = format!("{alias}-v1");
        node.create(
            &index,
            Some(&alias),
            serde_json::json!({ "title": { "type": "text" }, "status": { "type": "keyword" } }),
        );
        node.put_all(&index, &docs);
    }
}

/// Everything the run may have changed, with the run's own times and ids
/// masked. The topic's name and the group's are the world's own, so they
/// are left out.
#[derive(Debug, PartialEq)]
struct Snapshot {
    tables: BTreeMap<String, Vec<String>>,
    changes: Vec<(String, String, String, i64)>,
    topic: Vec<String>,
    offsets: BTreeMap<i32, Option<i64>>,
    /// The world's Redis keys and their values.
    redis: Vec<String>,
    /// Each index or alias of the world: its documents, how many indexes
    /// the world has (a rebuild made twice shows), and how many
    /// delete-by-query tasks ran.
    search: Vec<String>,
}

fn snapshot(w: &World, indexes: &Indexes) -> Snapshot {
    // Each world has a topic and a group of its own: named alike here.
    let own = |s: String| s.replace(&w.topic, "TOPIC").replace(&w.group, "GROUP");
    let mut tables = BTreeMap::new();
    let mut changes = Vec::new();
    for db in ["cur", "res"] {
        let mut c = w.client(db);
        let names: Vec<String> = c
            .query(
                "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables
                  WHERE schemaname IN ('public', 'reentry', 'reentry_repair') AND tablename <> 'gate_audit' ORDER BY 1",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        for name in names {
            let rows: Vec<String> = c
                .query(
                    &format!("SELECT (to_jsonb(t) - $1::text[])::text FROM {name} t ORDER BY 1"),
                    &[&VOLATILE],
                )
                .unwrap()
                .iter()
                .map(|r| own(r.get(0)))
                .collect();
            tables.insert(format!("{db}.{name}"), rows);
        }
        let seq: i64 = c
            .query_one("SELECT last_value FROM cases_id_seq", &[])
            .unwrap()
            .get(0);
        tables.insert(format!("{db}.cases_id_seq"), vec![seq.to_string()]);
        for r in c
            .query(
                "SELECT tbl, op, count(*) FROM gate_audit GROUP BY 1, 2 ORDER BY 1, 2",
                &[],
            )
            .unwrap()
        {
            changes.push((db.to_owned(), r.get(0), r.get(1), r.get(2)));
        }
    }
    // Compensations carry the time they were sent: the rest must agree.
    let mut topic: Vec<String> = kcat_read(&w.topic, "%p|%k|%s|%h\n")
        .lines()
        .map(|l| own(l.to_owned()))
        .collect();
    topic.sort();
    let k = Kafka::new(&kafka_bootstrap());
    let offsets = k.committed(&w.group, &w.topic, &[0, 1, 2]).unwrap();
    let keys = redis_keys(
        std::slice::from_ref(&redis_addr()),
        &format!("{}:", w.topic),
    );
    let mut cmds = String::new();
    for k in &keys {
        cmds.push_str(&format!("GET {k}\n"));
    }
    let values = redis_cli(&redis_addr(), false, &cmds);
    let redis = keys
        .iter()
        .zip(values.lines())
        .map(|(k, v)| own(format!("{k}={v}")))
        .collect();
    // As a search sees them now: the steps refresh what they changed.
    let mut search = Vec::new();
    for name in ["events", "cases", "rebuilt"] {
        for (id, (version, doc)) in indexes.node.docs(&indexes.name(name)) {
            search.push(format!("{name}/{id} v{version} {doc}"));
        }
    }
    search.push(format!("{} indexes", indexes.all().len()));
    // Tasks the node ran, from its own `.tasks`: a task started twice shows.
    search.push(format!(
        "{} delete-by-query task(s) on events",
        indexes
            .node
            .finished_delete_by_query(&indexes.name("events"))
            .len()
    ));
    Snapshot {
        tables,
        changes,
        topic,
        offsets,
        redis,
        search,
    }
}

fn apply(pb: &Path, run: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(reentry_bin());
    cmd.arg("apply")
        .arg(pb)
        .arg("--run-dir")
        .arg(run)
        .arg("--apply")
        .arg("--allow-hooks")
        .args(extra);
    cmd
}

/// Kills the run with SIGKILL at `step:point`. False when the run never
/// got there (it finished on its own): that step has no such point.
fn kill_at(pb: &Path, run: &Path, step: &str, point: &str) -> bool {
    let mut child = apply(pb, run, &[])
        .env("REENTRY_PAUSE_AT", format!("{step}:{point}"))
        .env("REENTRY_TEST_HOOKS", "hang-at-pause-points")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = String::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if line.contains("paused at") {
            child.kill().unwrap();
            child.wait().unwrap();
            return true;
        }
        seen.push_str(&line);
        seen.push('\n');
    }
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "{step}:{point}: the run failed ({status}): {seen}"
    );
    false
}

/// The cases: for the first step of each kind in the plan, each point it
/// passes in a clean run's journal (every step starts, is applied and is
/// done; some journal a prior state first).
fn cases(run: &Path) -> Vec<(String, String, &'static str)> {
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("plan.json")).unwrap()).unwrap();
    let text = std::fs::read_to_string(run.join("journal.jsonl")).unwrap();
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let with_prior: BTreeSet<&str> = records
        .iter()
        .filter(|r| r["event"] == "prior")
        .filter_map(|r| r["step"].as_str())
        .collect();
    // A step that journals its progress (`STEP#batch-…` priors) pauses at
    // `batch` after the first: killed there, it must go on, not start over.
    let with_batches: BTreeSet<&str> = with_prior
        .iter()
        .filter_map(|s| s.split_once("#batch-").map(|(id, _)| id))
        .collect();
    // A step that starts a task on a peer journals its id (`STEP#task`):
    // killed after the start and before that record (`task-started`), or
    // after it (`task`), it must go on with that task, not start another.
    let with_tasks: BTreeSet<&str> = with_prior
        .iter()
        .filter_map(|s| s.strip_suffix("#task"))
        .collect();
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for s in plan["steps"].as_array().unwrap() {
        let (id, kind) = (
            s["id"].as_str().unwrap(),
            s["action"]["kind"].as_str().unwrap(),
        );
        if !seen.insert(kind) {
            continue;
        }
        for p in POINTS {
            if *p != "prior" || with_prior.contains(id) {
                out.push((kind.to_owned(), id.to_owned(), *p));
            }
        }
        if with_batches.contains(id) {
            out.push((kind.to_owned(), id.to_owned(), "batch"));
        }
        if with_tasks.contains(id) {
            out.push((kind.to_owned(), id.to_owned(), "task-started"));
            out.push((kind.to_owned(), id.to_owned(), "task"));
        }
    }
    // A debugging aid: REENTRY_CRASH_CASES=SUBSTRING runs only those.
    if let Ok(only) = std::env::var("REENTRY_CRASH_CASES") {
        out.retain(|(k, id, p)| format!("{k} {id}:{p}").contains(&only));
    }
    out
}

/// `step` with every part (between `:` and `@`) that is `from` made `to`.
fn own_names(step: &str, from: &str, to: &str) -> String {
    let mut out = String::new();
    let mut part = String::new();
    for c in step.chars().chain(std::iter::once('\0')) {
        if c == ':' || c == '@' || c == '\0' {
            out.push_str(if part == from { to } else { &part });
            if c != '\0' {
                out.push(c);
            }
            part.clear();
        } else {
            part.push(c);
        }
    }
    out
}

#[test]
fn every_step_killed_at_every_point_resumes_to_the_world_of_an_unkilled_run() {
    let started = Instant::now();
    let (w, pb, indexes) = world();
    let run = w.dir.join("clean");
    let out = apply(&pb, &run, &[]).output().unwrap();
    assert_exit(&out, 0);
    let reference = snapshot(&w, &indexes);
    let cases = cases(&run);
    // Step ids may name the world's own consumer group (rewind:GROUP);
    // the group's name holds the topic's, so the group is replaced whole.
    let ref_group = w.group.clone();
    let kinds: BTreeSet<String> = serde_json::from_str::<serde_json::Value>(
        &std::fs::read_to_string(run.join("plan.json")).unwrap(),
    )
    .unwrap()["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["action"]["kind"].as_str().unwrap().to_owned())
        .collect();
    drop((w, indexes));

    // Cases in parallel, each in a world of its own (cluster, topic, group).
    let queue = Mutex::new(cases.clone());
    let failures = Mutex::new(Vec::new());
    let killed = Mutex::new(0usize);
    let missed = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| loop {
                let Some((_, step, point)) = queue.lock().unwrap().pop() else {
                    return;
                };
                let (w, pb, indexes) = world();
                let run = w.dir.join("run");
                let step = own_names(&step, &ref_group, &w.group);
                let hit = kill_at(&pb, &run, &step, point);
                if !hit {
                    missed.lock().unwrap().push(format!("{step}:{point}"));
                }
                if hit {
                    *killed.lock().unwrap() += 1;
                    let out = apply(&pb, &run, &["--resume"]).output().unwrap();
                    if out.status.code() != Some(0) {
                        failures.lock().unwrap().push(format!(
                            "{step}:{point}: resume exited {:?}: {}{}",
                            out.status.code(),
                            stdout(&out),
                            stderr(&out)
                        ));
                        continue;
                    }
                }
                let got = snapshot(&w, &indexes);
                if got != reference {
                    let mut diff = Vec::new();
                    for (k, v) in &reference.tables {
                        let g = got.tables.get(k).cloned().unwrap_or_default();
                        if &g != v {
                            let only_got: Vec<&String> =
                                g.iter().filter(|r| !v.contains(r)).collect();
                            let only_ref: Vec<&String> =
                                v.iter().filter(|r| !g.contains(r)).collect();
                            diff.push(format!(
                                "{k}: resumed has {only_got:?}; unkilled has {only_ref:?}"
                            ));
                        }
                    }
                    if got.changes != reference.changes {
                        diff.push(format!(
                            "row changes {:?} != {:?}",
                            got.changes, reference.changes
                        ));
                    }
                    if got.topic != reference.topic {
                        diff.push(format!("topic {:?} != {:?}", got.topic, reference.topic));
                    }
                    if got.redis != reference.redis {
                        diff.push(format!("redis {:?} != {:?}", got.redis, reference.redis));
                    }
                    if got.search != reference.search {
                        diff.push(format!("search {:?} != {:?}", got.search, reference.search));
                    }
                    if got.offsets != reference.offsets {
                        diff.push(format!(
                            "offsets {:?} != {:?}",
                            got.offsets, reference.offsets
                        ));
                    }
                    failures.lock().unwrap().push(format!(
                        "{step}:{point} ({}): {}",
                        if hit { "killed" } else { "not reached" },
                        diff.join("\n  ")
                    ));
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    let killed = killed.into_inner().unwrap();
    eprintln!(
        "crash harness: {} step kinds, {} cases, {killed} killed and resumed, in {:.0} s",
        kinds.len(),
        cases.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} case(s) differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // Every pause point the journal showed was reached when asked for.
    let missed = missed.into_inner().unwrap();
    assert!(missed.is_empty(), "never reached: {missed:?}");
    assert_eq!(killed, cases.len());
    // The playbook uses every kind in the registry: a kind added later
    // fails this test until the playbook above uses it too.
    for kind in reentry::reentry::steps::Action::kinds() {
        assert!(
            kinds.contains(&kind),
            "the playbook has no `{kind}` step: add one; it has {kinds:?}"
        );
    }
}
