//! No panic on what the application's schema allows: every step kind that
//! reads the application's tables meets NULL in each column whose DDL
//! admits it, in a whole cutover against real PostgreSQL 18 and Apache
//! Kafka. Quartz's tables are its own DDL (from its jar); gruelbox's
//! `txno_outbox` flag is nullable as gruelbox creates it; the generic
//! outbox, the inbox, the idempotency table, the repaired table and a sequence's
//! column are as loose as PostgreSQL lets an application make them.
//!
//! Each step must either do its work or fail with a located message; a
//! step that panics is journaled as failed "on a defect", and this test
//! finds none.

use std::path::{Path, PathBuf};

use crate::common::pg::{Cluster, Version};
use crate::common::services::{create_topic, kafka_bootstrap, topic};
use crate::common::{assert_exit, run_reentry, stderr, stdout};
use crate::reconcile::{now_ms, ts};

const MIN: i64 = 60_000;

/// Tables with every column nullable that the application may leave NULL.
const LOOSE: &str = r#"
CREATE TABLE loose_outbox (id text, created_at timestamptz, published_at timestamptz, payload jsonb);
CREATE TABLE txno_outbox (id varchar(36) PRIMARY KEY, invocation text, lastattempttime timestamp(6),
                          nextattempttime timestamp(6), attempts int, blocked boolean, version int,
                          uniquerequestid varchar(250), processed boolean, topic varchar(250), seq bigint);
CREATE TABLE loose_idem (k text, created_at timestamptz, response jsonb);
CREATE TABLE loose_inbox (message_id text, processed_at timestamptz);
CREATE TABLE loose_case (id bigint PRIMARY KEY, title text, owner_id bigint, updated_at timestamptz, note jsonb);
CREATE SEQUENCE loose_n_seq;
CREATE TABLE loose_counter (n bigint DEFAULT nextval('loose_n_seq'), label text);
ALTER SEQUENCE loose_n_seq OWNED BY loose_counter.n;
"#;

struct World {
    cluster: Cluster,
    dir: PathBuf,
    topic: String,
    t: i64,
}

impl World {
    fn new() -> World {
        let mut cluster = Cluster::init(Version::V18);
        cluster.start();
        let dir = cluster.dir("work");
        let topic = topic("nulls");
        create_topic(&topic, 3);
        let t = now_ms() - 20 * MIN;
        let before = ts(t - 5 * MIN);
        let after = ts(t + 5 * MIN);
        let mut admin = cluster.client();
        for db in ["cur", "res"] {
            admin
                .batch_execute(&format!("CREATE DATABASE {db}"))
                .unwrap();
        }
        for db in ["cur", "res"] {
            let mut c = cluster.db_client(db);
            c.batch_execute(include_str!("../../sql/system_gate.sql"))
                .unwrap();
            c.batch_execute(&crate::common::quartz::schema()).unwrap();
            c.batch_execute(LOOSE).unwrap();
            // Quartz: every nullable column of a job, its triggers and a
            // fired trigger left NULL (a row only acquired, not executing).
            c.batch_execute(
                "INSERT INTO system_gate (gate_name, enabled) VALUES ('api-writes', true), ('outbox-relay', true);
                 INSERT INTO qrtz_job_details (sched_name, job_name, job_group, description, job_class_name,
                                               is_durable, is_nonconcurrent, is_update_data, requests_recovery, job_data)
                 VALUES ('CaseScheduler', 'escalate', 'DEFAULT', NULL, 'CaseJob', false, false, false, false, NULL);
                 INSERT INTO qrtz_triggers (sched_name, trigger_name, trigger_group, job_name, job_group, description,
                                            next_fire_time, prev_fire_time, priority, trigger_state, trigger_type,
                                            start_time, end_time, calendar_name, misfire_instr, job_data)
                 VALUES ('CaseScheduler', 'escalate', 'DEFAULT', 'escalate', 'DEFAULT', NULL,
                         NULL, NULL, NULL, 'WAITING', 'SIMPLE', 0, NULL, NULL, NULL, NULL),
                        ('CaseScheduler', 'escalate-paused', 'DEFAULT', 'escalate', 'DEFAULT', NULL,
                         NULL, NULL, NULL, 'PAUSED', 'SIMPLE', 0, NULL, NULL, NULL, NULL),
                        ('CaseScheduler', 'escalate-due', 'DEFAULT', 'escalate', 'DEFAULT', NULL,
                         1, NULL, NULL, 'WAITING', 'CRON', 0, NULL, NULL, NULL, NULL);
                 INSERT INTO qrtz_fired_triggers (sched_name, entry_id, trigger_name, trigger_group, instance_name,
                                                  fired_time, sched_time, priority, state, job_name, job_group,
                                                  is_nonconcurrent, requests_recovery)
                 VALUES ('CaseScheduler', 'e1', 'escalate', 'DEFAULT', 'case-app-1', 0, 0, 5, 'ACQUIRED',
                         NULL, NULL, NULL, NULL);",
            )
            .unwrap();
            c.batch_execute(&format!(
                "INSERT INTO loose_outbox VALUES
                   (NULL, NULL, NULL, NULL), (NULL, '{before}', '{before}', NULL),
                   ('o-1', NULL, NULL, NULL), ('o-2', '{before}', NULL, NULL), ('o-3', NULL, '{before}', '{{}}');
                 INSERT INTO txno_outbox (id, processed) VALUES ('g-1', NULL), ('g-2', false), ('g-3', true);
                 INSERT INTO loose_idem VALUES (NULL, NULL, NULL), (NULL, '{before}', NULL), ('k-1', NULL, NULL);
                 INSERT INTO loose_case VALUES (1, NULL, NULL, NULL, NULL), (2, 'two', NULL, '{before}', NULL);
                 INSERT INTO loose_inbox VALUES (NULL, NULL), ('o-1', NULL);
                 INSERT INTO loose_counter (n, label) VALUES (NULL, NULL), (NULL, 'x');"
            ))
            .unwrap();
        }
        // After T, on current only: keys, rows and outbox rows with NULLs.
        cluster
            .db_client("cur")
            .batch_execute(&format!(
                "INSERT INTO loose_outbox VALUES (NULL, '{after}', NULL, NULL), ('o-4', '{after}', NULL, NULL);
                 INSERT INTO loose_idem VALUES (NULL, '{after}', NULL), ('k-2', '{after}', NULL);
                 INSERT INTO loose_case VALUES (3, NULL, NULL, '{after}', NULL);
                 UPDATE loose_case SET title = NULL, owner_id = NULL, updated_at = '{after}' WHERE id = 2;"
            ))
            .unwrap();
        World {
            cluster,
            dir,
            topic,
            t,
        }
    }

    fn playbook(&self) -> PathBuf {
        let text = format!(
            r#"[playbook]
name = "nulls"
way-back = "cutover"

[databases.current]
conninfo = "{cur}"

[databases.restored]
conninfo = "{res}"

[recovery-target]
time = "{t}"

[gates]
reopen-order = ["api-writes", "quartz-jobs", "outbox-relay"]

[[gates.system-gate]]
name = "api-writes"
databases = ["current", "restored"]

[[gates.system-gate]]
name = "outbox-relay"
databases = ["current", "restored"]

[[gates.quartz]]
name = "quartz-jobs"
databases = ["current", "restored"]
scheduler = "CaseScheduler"

[[outbox]]
name = "loose"
database = "restored"
flavour = "generic"
table = "loose_outbox"
topic = "{topic}"
columns = {{ id = "id", created-at = "created_at", published-at = "published_at" }}
event-id = {{ header = "event_id" }}
gate = "outbox-relay"

[[outbox]]
name = "gruelbox"
database = "restored"
flavour = "gruelbox"
topic = "{topic}"
event-id = {{ header = "event_id" }}
gate = "outbox-relay"

[kafka]
bootstrap = "{bootstrap}"
lookback = "1h"
watch = "1s"

[[inbox]]
name = "loose-inbox"
database = "restored"
table = "loose_inbox"
message-id-column = "message_id"
topic = "{topic}"

[[idempotency]]
name = "loose-keys"
database = "restored"
table = "loose_idem"
key-column = "k"
created-at-column = "created_at"
action = "tombstone"
from-current = true

[[repair]]
table = "loose_case"
updated-at = "updated_at"
"#,
            cur = self.cluster.db_conninfo("cur"),
            res = self.cluster.db_conninfo("res"),
            t = ts(self.t),
            topic = self.topic,
            bootstrap = kafka_bootstrap(),
        );
        let path = self.dir.join("nulls.toml");
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// The journal's records, one JSON value each.
fn journal(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("journal.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn every_step_kind_reads_the_nulls_its_tables_allow_without_a_defect() {
    let w = World::new();
    let pb = w.playbook();
    let plan = run_reentry(&[&"plan", &"--json", &pb]);
    assert_exit(&plan, 1); // the plan has changes
    let plan: serde_json::Value = serde_json::from_str(&stdout(&plan)).unwrap();
    let preview = |id: &str| -> serde_json::Value {
        plan["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id)
            .unwrap_or_else(|| panic!("no step {id}"))["preview"]
            .clone()
    };
    // Rows without an id are named, not matched; a NULL flag is unpublished.
    let loose = preview("outbox:loose");
    assert_eq!(loose["detail"]["without-id"], 2, "{loose:#}");
    assert_eq!(loose["detail"]["pending"], 2, "{loose:#}");
    let gruelbox = preview("outbox:gruelbox");
    assert_eq!(gruelbox["detail"]["pending"], 2, "{gruelbox:#}");
    assert_eq!(gruelbox["detail"]["in-sync"], 1, "{gruelbox:#}");
    // A NULL key is no key; the one after T is found.
    assert_eq!(
        preview("idempotency:loose-keys")["items"][0],
        "k-2 (current)"
    );

    let dry = run_reentry(&[&"apply", &pb, &"--run-dir", &w.dir.join("dry")]);
    assert!(
        !stdout(&dry).contains("defect") && !stderr(&dry).contains("defect"),
        "the dry run met a defect:\n{}\n{}",
        stdout(&dry),
        stderr(&dry)
    );
    assert_exit(&dry, 0);

    let run = w.dir.join("run");
    let out = run_reentry(&[&"apply", &pb, &"--apply", &"--run-dir", &run]);
    let failed: Vec<String> = journal(&run)
        .iter()
        .filter(|r| r["event"] == "failed")
        .map(|r| r.to_string())
        .collect();
    assert!(
        failed.is_empty(),
        "steps failed:\n{}\n{}",
        failed.join("\n"),
        stderr(&out)
    );
    assert_exit(&out, 0);

    // What the steps did, in PostgreSQL's own record: the gates are open on
    // the survivor, the key after T is tombstoned, the row after T is
    // repaired with its NULLs, and the sequence is past nothing.
    let mut res = w.cluster.db_client("res");
    let open: Vec<bool> = res
        .query("SELECT enabled FROM system_gate ORDER BY 1", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(open, [true, true]);
    let repaired: Vec<(i64, Option<String>, Option<i64>)> = res
        .query(
            "SELECT id, title, owner_id FROM loose_case ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        repaired,
        [(1, None, None), (2, None, None), (3, None, None)],
        "the rows after T, NULLs and all"
    );
}
