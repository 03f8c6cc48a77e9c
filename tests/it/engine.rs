//! The re-entry engine against real PostgreSQL 18: a plan and a dry run
//! change nothing; apply closes system_gate, ShedLock and Quartz gates on
//! both databases and re-opens the survivor's to exactly what they were; a
//! run killed with SIGKILL at several points resumes and applies each side
//! effect once; Ctrl-C stops between steps; identifiers are quoted and
//! values bound; the password never reaches any output.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::pg::{Cluster, Version};
use crate::common::{assert_exit, reentry_bin, stderr, stdout};

const SECRET: &str = "engine-sekrit-9931";
const PW_VAR: &str = "ENGINE_DB_PASSWORD";

/// A trigger that records every row change to the gate tables (Quartz's
/// own, from its jar, and ours), and a little of the case-management
/// application. The function sets its own search path: reentry's writes
/// run under `pg_catalog, pg_temp`.
const SCHEMA: &str = r#"
CREATE TABLE gate_audit (id bigserial PRIMARY KEY, tbl text, op text, old jsonb, new jsonb);
CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql SET search_path = public AS $$
BEGIN
  INSERT INTO gate_audit (tbl, op, old, new)
  VALUES (TG_TABLE_NAME, TG_OP,
          CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END,
          CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END);
  RETURN NULL;
END $$;
CREATE EXTENSION amcheck;
"#;

const AUDITED: &[&str] = &[
    "system_gate",
    "shedlock",
    "qrtz_triggers",
    "qrtz_paused_trigger_grps",
];

struct Fixture {
    cluster: Cluster,
    dir: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let mut cluster = Cluster::init(Version::V18);
        cluster.start();
        let mut admin = cluster.client();
        for db in ["cur", "res"] {
            admin
                .batch_execute(&format!("CREATE DATABASE {db}"))
                .unwrap();
        }
        let dir = cluster.dir("work");
        let f = Fixture { cluster, dir };
        for db in ["cur", "res"] {
            let mut c = f.client(db);
            c.batch_execute(include_str!("../../sql/system_gate.sql"))
                .unwrap();
            c.batch_execute(include_str!("../../sql/case-management.sql"))
                .unwrap();
            c.batch_execute(&crate::common::quartz::schema()).unwrap();
            c.batch_execute(SCHEMA).unwrap();
            c.batch_execute(
                "INSERT INTO system_gate (gate_name, enabled, updated_at) VALUES ('api-writes', true, '2026-11-20 08:00:00+00');
                 INSERT INTO shedlock VALUES ('escalate-overdue-cases', '2026-11-25 11:58:30.123456+00', '2026-11-25 11:58:00.654321+00', 'case-app-7f9c');
                 INSERT INTO qrtz_job_details (sched_name, job_name, job_group, job_class_name, is_durable,
                                               is_nonconcurrent, is_update_data, requests_recovery)
                 SELECT s, j, g, 'CaseJob', false, false, false, false FROM (VALUES
                   ('CaseScheduler', 'escalate', 'DEFAULT'), ('CaseScheduler', 'close-stale', 'DEFAULT'),
                   ('CaseScheduler', 'archive', 'DEFAULT'), ('CaseScheduler', 'report', 'REPORTS'),
                   ('OtherScheduler', 'other', 'DEFAULT')) AS v(s, j, g);
                 INSERT INTO qrtz_triggers (sched_name, trigger_name, trigger_group, job_name, job_group,
                                            trigger_state, trigger_type, start_time, next_fire_time, misfire_instr)
                 SELECT s, n, g, n, g, st, 'SIMPLE', 0, 4102444800000, 0 FROM (VALUES
                   ('CaseScheduler', 'escalate', 'DEFAULT', 'WAITING'),
                   ('CaseScheduler', 'close-stale', 'DEFAULT', 'BLOCKED'),
                   ('CaseScheduler', 'archive', 'DEFAULT', 'PAUSED'),
                   ('CaseScheduler', 'report', 'REPORTS', 'ACQUIRED'),
                   ('OtherScheduler', 'other', 'DEFAULT', 'WAITING')) AS v(s, n, g, st);
                 INSERT INTO cases (title, owner_id) SELECT 'case ' || g, g FROM generate_series(1, 5) g;",
            )
            .unwrap();
        }
        // The restored copy lacks a gate row and a lock row (they came after
        // T), and its case sequence is behind its column.
        f.client("cur")
            .batch_execute(
                "INSERT INTO system_gate (gate_name, enabled) VALUES ('outbox-relay', true);
                 INSERT INTO shedlock VALUES ('close-stale-cases', '2026-11-25 11:00:00+00', '2026-11-25 10:59:59.5+00', 'case-app-2b1d');",
            )
            .unwrap();
        f.client("res")
            .batch_execute("SELECT setval('cases_id_seq', 2)")
            .unwrap();
        for db in ["cur", "res"] {
            let mut c = f.client(db);
            for t in AUDITED {
                c.batch_execute(&format!(
                    "CREATE TRIGGER audit AFTER INSERT OR UPDATE OR DELETE ON {t} FOR EACH ROW EXECUTE FUNCTION audit()"
                ))
                .unwrap();
            }
        }
        f
    }

    fn conninfo(&self, db: &str) -> String {
        self.cluster.db_conninfo(db)
    }

    fn client(&self, db: &str) -> postgres::Client {
        self.cluster.db_client(db)
    }

    fn playbook(&self, name: &str, ttl: &str) -> PathBuf {
        let conn = |db: &str| format!("{} password=${{{PW_VAR}}}", self.conninfo(db));
        let text = format!(
            r#"[playbook]
name = "engine-test"
way-back = "cutover"

[databases.current]
conninfo = "{cur}"

[databases.restored]
conninfo = "{res}"

[recovery-target]
time = "2026-11-25T12:00:00Z"

[gates]
cache-ttl = "{ttl}"
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
name = "every open case has an owner"
database = "restored"
sql = "SELECT id FROM cases WHERE status = 'open' AND owner_id IS NULL"

# Only on the other way back (`--way-back selective-repair`).
[[repair]]
way-back = "selective-repair"
table = "cases"
ids = "SELECT id FROM cases WHERE title = 'broken'"
"#,
            cur = conn("cur"),
            res = conn("res"),
        );
        let path = self.dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Every gate row, as text, in order.
    fn gates(&self, db: &str) -> Vec<String> {
        self.client(db)
            .query(
                "SELECT 'gate ' || gate_name || ' enabled=' || enabled FROM system_gate
                 UNION ALL SELECT 'lock ' || name || ' ' || to_jsonb(s)::text FROM shedlock s
                 UNION ALL SELECT 'trigger ' || sched_name || '.' || trigger_group || '.' || trigger_name || ' ' || trigger_state FROM qrtz_triggers
                 UNION ALL SELECT 'paused ' || sched_name || '.' || trigger_group FROM qrtz_paused_trigger_grps
                 ORDER BY 1",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// Row changes to the gate tables: (table, operation, count).
    fn audit(&self, db: &str) -> Vec<(String, String, i64)> {
        self.client(db)
            .query(
                "SELECT tbl, op, count(*) FROM gate_audit GROUP BY 1, 2 ORDER BY 1, 2",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    }

    fn dump(&self, db: &str) -> String {
        let out = self.cluster.run_ok(self.cluster.cmd("pg_dump").args([
            "--data-only",
            "--no-comments",
            "-d",
            db,
        ]));
        // pg_dump 18 brackets its output with a random \restrict key.
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn reentry(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut cmd = Command::new(reentry_bin());
    for a in args {
        cmd.arg(a);
    }
    cmd.env(PW_VAR, SECRET).output().unwrap()
}

/// `reentry apply PB --run-dir RUN EXTRA…`, with the playbook's password set.
fn apply_cmd(pb: &Path, run: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(reentry_bin());
    cmd.arg("apply")
        .arg(pb)
        .arg("--run-dir")
        .arg(run)
        .args(extra)
        .env(PW_VAR, SECRET);
    cmd
}

fn apply(pb: &Path, run: &Path, extra: &[&str]) -> Output {
    apply_cmd(pb, run, extra).output().unwrap()
}

/// Starts `apply --apply` and returns once its last gate closed: the run
/// then waits the cache TTL. Its remaining stdout lines come with it.
fn apply_until_gates_closed(
    pb: &Path,
    run: &Path,
) -> (
    std::process::Child,
    std::io::Lines<BufReader<std::process::ChildStdout>>,
) {
    let mut child = apply_cmd(pb, run, &["--apply"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        if line.unwrap().contains("close:quartz-jobs@restored") {
            break;
        }
    }
    (child, lines)
}

/// Runs apply until it reaches `point`, then kills it with SIGKILL there.
fn apply_and_kill_at(pb: &Path, run: &Path, extra: &[&str], point: &str) {
    crate::common::kill_at_pause(apply_cmd(pb, run, extra), point);
}

fn journal(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("journal.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// What the survivor's gates must be after the run: as they were, except
/// that Quartz triggers come back as Quartz's own resume leaves them: an
/// ACQUIRED one WAITING, a BLOCKED one WAITING once no run of its job is
/// executing. The trigger the application had paused stays paused.
fn expected_after(before: &[String]) -> Vec<String> {
    before
        .iter()
        .map(|l| {
            l.replace("REPORTS.report ACQUIRED", "REPORTS.report WAITING")
                .replace("DEFAULT.close-stale BLOCKED", "DEFAULT.close-stale WAITING")
        })
        .collect()
}

fn restored_audit() -> Vec<(String, String, i64)> {
    [
        ("qrtz_paused_trigger_grps", "DELETE", 3),
        ("qrtz_paused_trigger_grps", "INSERT", 3),
        ("qrtz_triggers", "UPDATE", 6),
        ("shedlock", "DELETE", 1),
        ("shedlock", "INSERT", 1),
        ("shedlock", "UPDATE", 2),
        ("system_gate", "DELETE", 1),
        ("system_gate", "INSERT", 1),
        ("system_gate", "UPDATE", 2),
    ]
    .iter()
    .map(|(t, o, n)| (t.to_string(), o.to_string(), *n))
    .collect()
}

fn current_audit() -> Vec<(String, String, i64)> {
    [
        ("qrtz_paused_trigger_grps", "INSERT", 3),
        ("qrtz_triggers", "UPDATE", 3),
        ("shedlock", "UPDATE", 2),
        ("system_gate", "UPDATE", 2),
    ]
    .iter()
    .map(|(t, o, n)| (t.to_string(), o.to_string(), *n))
    .collect()
}

/// Current is retired by the cutover: its gates stay closed, frozen by this run.
fn assert_current_closed(f: &Fixture) {
    let g = f.gates("cur");
    assert!(
        g.contains(&"gate api-writes enabled=false".to_owned()),
        "{g:#?}"
    );
    assert!(
        g.contains(&"gate outbox-relay enabled=false".to_owned()),
        "{g:#?}"
    );
    let frozen = g
        .iter()
        .filter(|l| {
            l.starts_with("lock ")
                && l.contains("\"locked_by\": \"reentry run ")
                && l.contains("2999-01-01")
        })
        .count();
    assert_eq!(frozen, 2, "{g:#?}");
    for t in [
        "trigger CaseScheduler.DEFAULT.escalate PAUSED",
        "trigger CaseScheduler.DEFAULT.close-stale PAUSED_BLOCKED",
        "trigger CaseScheduler.DEFAULT.archive PAUSED",
        "trigger CaseScheduler.REPORTS.report PAUSED",
        "trigger OtherScheduler.DEFAULT.other WAITING",
        "paused CaseScheduler.DEFAULT",
        "paused CaseScheduler.REPORTS",
    ] {
        assert!(g.contains(&t.to_owned()), "missing {t}: {g:#?}");
    }
}

fn assert_no_secret(run: &Path, outputs: &[&Output]) {
    for o in outputs {
        assert!(
            !stdout(o).contains(SECRET) && !stderr(o).contains(SECRET),
            "the password reached the output"
        );
    }
    for e in std::fs::read_dir(run).unwrap() {
        let p = e.unwrap().path();
        let text = String::from_utf8_lossy(&std::fs::read(&p).unwrap()).into_owned();
        assert!(!text.contains(SECRET), "the password is in {}", p.display());
    }
}

fn seq_next(f: &Fixture) -> (i64, bool) {
    let r = f
        .client("res")
        .query_one("SELECT last_value, is_called FROM cases_id_seq", &[])
        .unwrap();
    (r.get(0), r.get(1))
}

#[test]
fn plan_and_dry_run_change_nothing_and_count_what_apply_would_change() {
    let f = Fixture::new();
    let pb = f.playbook("pb.toml", "0s");
    let before = (f.dump("cur"), f.dump("res"));

    let out = reentry(&[&"plan", &pb, &"--json"]);
    assert_exit(&out, 1); // the plan has changes
    let plan: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let step = |id: &str| {
        plan["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id)
            .unwrap_or_else(|| panic!("no step {id} in {plan:#}"))
            .clone()
    };
    assert_eq!(step("close:api-writes@current")["preview"]["count"], 1);
    assert_eq!(step("close:case-jobs@restored")["preview"]["count"], 2);
    assert!(step("close:case-jobs@restored")["preview"]["summary"]
        .as_str()
        .unwrap()
        .contains("1 not there yet"));
    assert_eq!(step("close:quartz-jobs@current")["preview"]["count"], 3);
    assert_eq!(step("sequences@restored")["preview"]["count"], 1);
    assert!(step("amcheck@restored")["preview"]["summary"]
        .as_str()
        .unwrap()
        .contains("bt_index_check on"));
    // Gates close before anything else and re-open last; the cutover leaves current closed.
    let ids: Vec<&str> = plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert!(ids[..8].iter().all(|i| i.starts_with("close:")), "{ids:?}");
    assert!(!ids
        .iter()
        .any(|i| i.starts_with("reopen:") && i.ends_with("@current")));
    assert_eq!(ids.last(), Some(&"reopen:outbox-relay@restored"));

    let human = reentry(&[&"plan", &pb]);
    assert_exit(&human, 1);
    assert!(
        stdout(&human).contains("gates stay closed on current"),
        "{}",
        stdout(&human)
    );

    let run = f.dir.join("dry");
    let dry = apply(&pb, &run, &[]);
    assert_exit(&dry, 0);
    assert!(
        stdout(&dry).contains("nothing was changed"),
        "{}",
        stdout(&dry)
    );
    assert_eq!(
        (f.dump("cur"), f.dump("res")),
        before,
        "plan or dry run changed data"
    );
    assert!(f.audit("cur").is_empty() && f.audit("res").is_empty());
    let records = journal(&run);
    assert_eq!(records[0]["data"]["mode"], "dry-run");
    assert_eq!(records.last().unwrap()["event"], "run-finished");
    // A dry run cannot be resumed into a real one.
    assert_exit(&apply(&pb, &run, &["--apply", "--resume"]), 64);
    assert_no_secret(&run, &[&out, &human, &dry]);

    // A dry run reports every check that would fail, not just the first.
    f.client("cur")
        .batch_execute("DROP EXTENSION amcheck")
        .unwrap();
    let mut res = f.client("res");
    res.batch_execute("INSERT INTO cases (id, title, owner_id) VALUES (100, 'case 1', 1)")
        .unwrap();
    assert!(res
        .batch_execute("CREATE UNIQUE INDEX CONCURRENTLY cases_title ON cases (title)")
        .is_err());
    let failing = apply(&pb, &f.dir.join("dry2"), &[]);
    assert_exit(&failing, 1);
    let text = stdout(&failing);
    assert!(
        text.contains("WOULD FAIL indexes@restored")
            && text.contains("public.cases_title on public.cases"),
        "{text}"
    );
    assert!(
        text.contains("WOULD FAIL extensions") && text.contains("is only on restored"),
        "{text}"
    );
    assert!(text.contains("2 check(s) would fail"), "{text}");

    // Bad input changes nothing: a missing table is found before any step.
    f.client("res")
        .batch_execute("ALTER TABLE shedlock RENAME TO shedlock_gone")
        .unwrap();
    let run = f.dir.join("bad");
    let bad = apply(&pb, &run, &["--apply"]);
    assert_exit(&bad, 78);
    assert!(
        stderr(&bad).contains("table shedlock does not exist in databases.restored"),
        "{}",
        stderr(&bad)
    );
    assert!(!run.join("journal.jsonl").exists());
}

#[test]
fn apply_closes_every_gate_and_reopens_the_survivors_to_exactly_what_they_were() {
    let f = Fixture::new();
    let pb = f.playbook("pb.toml", "1s");
    let before = f.gates("res");
    let run = f.dir.join("run");
    let out = apply(&pb, &run, &["--apply"]);
    assert_exit(&out, 0);
    let text = stdout(&out);
    assert!(text.contains("finished"), "{text}");

    assert_eq!(f.gates("res"), expected_after(&before));
    assert_eq!(f.audit("res"), restored_audit());
    assert_current_closed(&f);
    assert_eq!(f.audit("cur"), current_audit());
    assert_eq!(
        seq_next(&f),
        (5, true),
        "the sequence was not moved past max(id)"
    );

    // The evidence, in three formats.
    let md = reentry(&[&"report", &run]);
    assert_exit(&md, 0);
    let md_text = stdout(&md);
    for want in ["# Re-entry report: engine-test", "**finished**", "`close:api-writes@current`", "| api-writes | system-gate | restored | enabled = true | enabled = false | enabled = true |", "stays closed", "time 2026-11-25T12:00:00Z"] {
        assert!(md_text.contains(want), "missing {want:?} in\n{md_text}");
    }
    let html_path = run.join("report.html");
    let html = reentry(&[
        &"report",
        &run,
        &"--format",
        &"html",
        &"--output",
        &html_path,
    ]);
    assert_exit(&html, 0);
    let page = std::fs::read_to_string(&html_path).unwrap();
    assert!(
        page.starts_with("<!doctype html>")
            && page.contains("<svg")
            && page.contains("gates closed (")
    );
    for outside in ["<script", "src=", "<link", "url("] {
        assert!(!page.contains(outside), "not self-contained: {outside}");
    }
    let json = reentry(&[&"report", &run, &"--format", &"json"]);
    let r: serde_json::Value = serde_json::from_str(&stdout(&json)).unwrap();
    assert_eq!(r["status"], "finished");
    assert_eq!(r["attempts"], 1);
    let gates = r["gates"].as_array().unwrap();
    assert_eq!(gates.len(), 8);
    assert!(r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["status"] == "done"));
    assert_no_secret(&run, &[&out, &md, &html, &json]);

    // A finished run resumed does nothing again.
    let again = apply(&pb, &run, &["--apply", "--resume"]);
    assert_exit(&again, 0);
    assert_eq!(f.audit("res"), restored_audit());
}

/// The HTML report as people see it: Debian's Chromium renders it
/// headless, and its screenshot holds the timeline's bars, the row of what
/// the application saw meanwhile, and the verdict cells of the team's own
/// checks (`checks.json`), one failing and one passing.
#[test]
fn the_html_report_renders_its_timeline_and_checks_in_chromium() {
    let f = Fixture::new();
    let pb = f.playbook("pb.toml", "1s");
    let run = f.dir.join("run");
    assert_exit(&apply(&pb, &run, &["--apply"]), 0);
    let j = journal(&run);
    let (start, end) = (
        j[0]["at"].as_str().unwrap(),
        j[j.len() - 1]["at"].as_str().unwrap(),
    );
    std::fs::write(
        run.join("checks.json"),
        r#"{"source": "a test oracle", "columns": ["after the restore", "after re-entry"],
            "rows": [{"property": "the gates are closed on the retired copy",
                      "results": [{"pass": false, "detail": "open"}, {"pass": true, "detail": "closed"}]}]}"#,
    )
    .unwrap();
    std::fs::write(
        run.join("observations.jsonl"),
        format!("{{\"at\": \"{start}\", \"until\": \"{end}\", \"source\": \"clients\", \"what\": \"12 requests refused\"}}\n"),
    )
    .unwrap();
    let html = run.join("report.html");
    assert_exit(
        &reentry(&[&"report", &run, &"--format", &"html", &"--output", &html]),
        0,
    );
    let md = stdout(&reentry(&[&"report", &run]));
    for want in [
        "## Checks by a test oracle",
        "| the gates are closed on the retired copy | FAIL: open | ok: closed |",
        "| clients | 12 requests refused |",
    ] {
        assert!(md.contains(want), "missing {want:?} in\n{md}");
    }

    let shot = f.dir.join("report.png");
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
        ])
        .arg(format!(
            "--user-data-dir={}",
            f.dir.join("chromium").display()
        ))
        .args(["--window-size=1200,2600", "--force-device-scale-factor=1"])
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("file://{}", html.display()))
        .output()
        .expect("run chromium (Debian's, installed by scripts/setup)");
    assert!(
        shot.exists(),
        "no screenshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&shot).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let step = match info.color_type {
        png::ColorType::Rgba => 4,
        png::ColorType::Rgb => 3,
        other => panic!("a screenshot in {other:?}"),
    };
    let pixels = |hex: &str| {
        let rgb: Vec<u8> = (0..3)
            .map(|i| u8::from_str_radix(&hex[1 + 2 * i..3 + 2 * i], 16).unwrap())
            .collect();
        buf[..info.buffer_size()]
            .chunks(step)
            .filter(|p| p[..3] == rgb[..])
            .count()
    };
    for (what, colour, least) in [
        ("the close-gates bars", "#c2410c", 200),
        ("the validate bars", "#1d4ed8", 100),
        ("the re-open bars", "#15803d", 200),
        ("the row of what the application saw", "#0891b2", 1000),
        ("the passing check's cell", "#dcfce7", 1000),
        ("the failing check's cell", "#fee2e2", 1000),
    ] {
        let n = pixels(colour);
        assert!(
            n >= least,
            "{what} ({colour}): {n} pixels in the screenshot, want {least} at least"
        );
    }

    // A malformed outside file is an error naming its line.
    std::fs::write(
        run.join("observations.jsonl"),
        "{\"at\": \"yesterday\", \"source\": \"x\", \"what\": \"y\"}\n",
    )
    .unwrap();
    let out = reentry(&[&"report", &run]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr(&out).contains("observations.jsonl: line 1: `yesterday` is not an RFC 3339 time"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_run_killed_at_any_point_resumes_and_applies_each_change_once() {
    let f = Fixture::new();
    let pb = f.playbook("pb.toml", "1s");
    let before = f.gates("res");
    let run = f.dir.join("run");

    // 1. A close committed, its `done` not yet written: resuming must not
    //    take the closed state for the state to restore.
    apply_and_kill_at(&pb, &run, &["--apply"], "close:api-writes@restored:applied");
    // 2. Prior state journaled, the close's transaction still open.
    apply_and_kill_at(
        &pb,
        &run,
        &["--apply", "--resume"],
        "close:case-jobs@restored:prior",
    );
    // 3. setval made, its `done` not yet written.
    apply_and_kill_at(
        &pb,
        &run,
        &["--apply", "--resume"],
        "sequences@restored:applied",
    );
    // 4. A re-open committed, its `done` not yet written.
    apply_and_kill_at(
        &pb,
        &run,
        &["--apply", "--resume"],
        "reopen:case-jobs@restored:applied",
    );
    // 5. Between two steps.
    apply_and_kill_at(
        &pb,
        &run,
        &["--apply", "--resume"],
        "reopen:quartz-jobs@restored:done",
    );

    // The playbook may not change under a run.
    let edited = f.dir.join("edited.toml");
    std::fs::write(
        &edited,
        std::fs::read_to_string(&pb).unwrap() + "\n# edited\n",
    )
    .unwrap();
    assert_exit(&apply(&edited, &run, &["--apply", "--resume"]), 3);

    let out = apply(&pb, &run, &["--apply", "--resume"]);
    assert_exit(&out, 0);
    assert_eq!(f.gates("res"), expected_after(&before));
    assert_eq!(
        f.audit("res"),
        restored_audit(),
        "a change was applied twice"
    );
    assert_current_closed(&f);
    assert_eq!(
        f.audit("cur"),
        current_audit(),
        "a change was applied twice"
    );
    assert_eq!(seq_next(&f), (5, true));

    let records = journal(&run);
    let done = |id: &str| {
        records
            .iter()
            .filter(|r| r["event"] == "done" && r["step"] == id)
            .cloned()
            .collect::<Vec<_>>()
    };
    // Each step finished once; the ones killed after their change found nothing left to do.
    assert_eq!(done("sequences@restored").len(), 1);
    assert_eq!(done("sequences@restored")[0]["data"]["effect"]["count"], 0);
    assert_eq!(
        done("reopen:case-jobs@restored")[0]["data"]["effect"]["count"],
        0
    );
    assert_eq!(
        done("close:case-jobs@restored")[0]["data"]["effect"]["count"],
        2
    );
    assert_eq!(
        done("close:api-writes@restored")[0]["data"]["effect"]["count"],
        0
    );
    let resumes = records.iter().filter(|r| r["event"] == "resumed").count();
    assert_eq!(resumes, 5);

    let json = reentry(&[&"report", &run, &"--json"]);
    let r: serde_json::Value = serde_json::from_str(&stdout(&json)).unwrap();
    assert_eq!(r["attempts"], 6);
    let step = r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "close:case-jobs@restored")
        .unwrap()
        .clone();
    assert_eq!(step["attempts"], 2);
    assert_no_secret(&run, &[&out, &json]);
}

#[test]
fn ctrl_c_stops_between_steps_and_the_run_resumes() {
    let f = Fixture::new();
    let pb = f.playbook("pb.toml", "6s");
    let run = f.dir.join("run");
    let (mut child, lines) = apply_until_gates_closed(&pb, &run);
    let t0 = Instant::now();
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = child.wait().unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "Ctrl-C did not stop the wait"
    );
    assert_eq!(status.code(), Some(2));
    assert!(
        rest.join("\n")
            .contains("interrupted during wait:gate-cache"),
        "{rest:?}"
    );
    let records = journal(&run);
    assert_eq!(records.last().unwrap()["event"], "interrupted");
    assert!(f
        .gates("res")
        .contains(&"gate api-writes enabled=false".to_owned()));

    let out = apply(&pb, &run, &["--apply", "--resume"]);
    assert_exit(&out, 0);
    assert!(f
        .gates("res")
        .contains(&"gate api-writes enabled=true".to_owned()));
    assert_eq!(f.audit("res"), restored_audit());
}

#[test]
fn identifiers_with_quotes_spaces_and_capitals_are_quoted_and_values_bound() {
    let f = Fixture::new();
    for db in ["cur", "res"] {
        f.client(db)
            .batch_execute(
                r#"CREATE SCHEMA "Ops Schema";
                   CREATE TABLE "Ops Schema"."Gate ""T""" (gate_name text PRIMARY KEY, enabled boolean NOT NULL);
                   INSERT INTO "Ops Schema"."Gate ""T""" VALUES ('api''; DROP TABLE cases; --', true);
                   CREATE TABLE "Ops Schema"."Shed Lock" (name varchar(64) PRIMARY KEY, lock_until timestamp(3) NOT NULL,
                                                          locked_at timestamp(3) NOT NULL, locked_by varchar(255) NOT NULL);
                   INSERT INTO "Ops Schema"."Shed Lock" VALUES ('x''); DELETE FROM shedlock; --', '2026-11-25 10:00:00.123', '2026-11-25 09:59:00.5', 'Host "A"');
                   CREATE TABLE "Case Table" ("Case Id" bigserial PRIMARY KEY, v text);
                   INSERT INTO "Case Table" (v) SELECT 'v' FROM generate_series(1, 7);
                   SELECT setval(pg_get_serial_sequence('"Case Table"', 'Case Id'), 3);"#,
            )
            .unwrap();
    }
    let text = format!(
        r#"[playbook]
name = "quoting"
way-back = "selective-repair"
[databases.current]
conninfo = "{cur}"
[databases.restored]
conninfo = "{res}"
[recovery-target]
lsn = "0/5000120"
[gates]
reopen-order = ["api'; DROP TABLE cases; --", "Jobs"]
[[gates.system-gate]]
name = "api'; DROP TABLE cases; --"
databases = ["current", "restored"]
table = 'Ops Schema.Gate "T"'
[[gates.shedlock]]
name = "Jobs"
databases = ["current"]
table = "Ops Schema.Shed Lock"
locks = ["x'); DELETE FROM shedlock; --"]
[validation]
extensions = true
[[repair]]
table = "Case Table"
key = ["Case Id"]
"#,
        cur = f.conninfo("cur"),
        res = f.conninfo("res"),
    );
    let pb = f.dir.join("quoting.toml");
    std::fs::write(&pb, text).unwrap();
    let lock_before: String = f
        .client("cur")
        .query_one(
            r#"SELECT to_jsonb(s)::text FROM "Ops Schema"."Shed Lock" s"#,
            &[],
        )
        .unwrap()
        .get(0);
    let run = f.dir.join("run");
    let out = apply(&pb, &run, &["--apply"]);
    assert_exit(&out, 0);

    for db in ["cur", "res"] {
        let mut c = f.client(db);
        let cases: i64 = c
            .query_one("SELECT count(*) FROM cases", &[])
            .unwrap()
            .get(0);
        assert_eq!(cases, 5, "cases were touched on {db}");
        let locks: i64 = c
            .query_one("SELECT count(*) FROM shedlock", &[])
            .unwrap()
            .get(0);
        assert!(locks >= 1, "shedlock was emptied on {db}");
    }
    // Selective repair: current is the survivor and re-opens; restored stays closed.
    let enabled = |db: &str| -> bool {
        f.client(db)
            .query_one(r#"SELECT enabled FROM "Ops Schema"."Gate ""T""""#, &[])
            .unwrap()
            .get(0)
    };
    assert!(enabled("cur"));
    assert!(!enabled("res"));
    let lock_after: String = f
        .client("cur")
        .query_one(
            r#"SELECT to_jsonb(s)::text FROM "Ops Schema"."Shed Lock" s"#,
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        lock_after, lock_before,
        "timestamp(3) values did not come back exactly"
    );
    // The sequence of a quoted table and column was found and advanced.
    let next: i64 = f
        .client("cur")
        .query_one(
            r#"SELECT nextval(pg_get_serial_sequence('"Case Table"', 'Case Id'))"#,
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(next, 8);
}

#[test]
fn a_failed_check_stops_the_run_with_the_gates_still_closed_until_it_is_fixed() {
    let f = Fixture::new();
    let pb = f.playbook("pb.toml", "0s");
    f.client("res")
        .batch_execute("INSERT INTO cases (id, title) VALUES (100, 'no owner')")
        .unwrap();
    let run = f.dir.join("run");
    let out = apply(&pb, &run, &["--apply"]);
    assert_exit(&out, 2);
    let text = stdout(&out);
    assert!(
        text.contains("stopped: invariant:every open case has an owner: invariant violated"),
        "{text}"
    );
    assert!(text.contains("--apply --resume"), "{text}");
    // Nothing after the failed step ran: the copy's gates are still closed.
    assert!(f
        .gates("res")
        .contains(&"gate api-writes enabled=false".to_owned()));
    let r: serde_json::Value =
        serde_json::from_str(&stdout(&reentry(&[&"report", &run, &"--json"]))).unwrap();
    assert_eq!(r["status"], "failed");
    let inv = r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "invariant:every open case has an owner")
        .unwrap()
        .clone();
    assert_eq!(inv["status"], "failed");
    assert_eq!(inv["findings"].as_array().unwrap().len(), 1);

    f.client("res")
        .batch_execute("UPDATE cases SET owner_id = 1 WHERE owner_id IS NULL")
        .unwrap();
    let out = apply(&pb, &run, &["--apply", "--resume"]);
    assert_exit(&out, 0);
    assert!(f
        .gates("res")
        .contains(&"gate api-writes enabled=true".to_owned()));
    assert_eq!(f.audit("res"), restored_audit());
}

#[test]
fn a_restore_manifest_must_exist_and_describe_the_restored_cluster() {
    let f = Fixture::new();
    let pb = f.playbook("pb.toml", "0s");
    let text = std::fs::read_to_string(&pb).unwrap().replace(
        "time = \"2026-11-25T12:00:00Z\"",
        "manifest = \"restore/reentry-restore.json\"",
    );
    let pb = f.dir.join("with-manifest.toml");
    std::fs::write(&pb, text).unwrap();

    let out = reentry(&[&"plan", &pb]);
    assert_exit(&out, 78);
    assert!(
        stderr(&out).contains("reentry-restore.json: cannot read it"),
        "{}",
        stderr(&out)
    );

    let sysid: String = f
        .client("res")
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .unwrap()
        .get(0);
    let manifest = |sysid: &str, timeline: u32| {
        serde_json::json!({
            "format": 1, "backup_id": "20261125-120000F", "backup_chain": ["20261125-120000F"],
            "target": {"type": "time", "value": "2026-11-25T12:00:00.000Z"}, "action": "promote",
            "data_dir": "/restore", "port": 6543, "repo": "/repo", "pg_version": "18",
            "system_identifier": sysid, "timeline": timeline, "reached_lsn": "0/1000028",
            "reached_time": "2026-11-25T11:59:59.123Z", "wal_segments_replayed": 3,
            "started_at": "2026-11-25T12:10:00Z", "finished_at": "2026-11-25T12:11:00Z",
            "durations": {"copy_seconds": 1.0, "combine_seconds": 0.0, "replay_seconds": 2.0, "total_seconds": 3.0}
        })
        .to_string()
    };
    std::fs::create_dir_all(f.dir.join("restore")).unwrap();
    let path = f.dir.join("restore/reentry-restore.json");
    std::fs::write(&path, manifest("1234567890", 1)).unwrap();
    let out = reentry(&[&"plan", &pb]);
    assert_exit(&out, 3);
    assert!(
        stderr(&out).contains("the playbook points at the wrong server"),
        "{}",
        stderr(&out)
    );

    // The right cluster, but not the copy the restore opened on timeline 2:
    // a PITR copy shares its system identifier with the cluster it came from.
    std::fs::write(&path, manifest(&sysid, 2)).unwrap();
    let out = reentry(&[&"plan", &pb]);
    assert_exit(&out, 3);
    assert!(
        stderr(&out).contains("older than timeline 2 that the restore opened"),
        "{}",
        stderr(&out)
    );

    std::fs::write(&path, manifest(&sysid, 1)).unwrap();
    let out = reentry(&[&"plan", &pb, &"--json"]);
    assert_exit(&out, 1);
    let plan: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(plan["target"]["reached-lsn"], "0/1000028");
    assert_eq!(plan["target"]["backup-id"], "20261125-120000F");
    assert_eq!(plan["target"]["system-identifier"], sysid.as_str());
}

#[test]
fn a_lock_released_by_its_holder_during_the_wait_is_closed_again() {
    let f = Fixture::new();
    let pb = f.playbook("pb.toml", "3s");
    let before = f.gates("res");
    let run = f.dir.join("run");
    let (mut child, lines) = apply_until_gates_closed(&pb, &run);
    // What ShedLock's unlock does when a job that held the lock finishes.
    f.client("res")
        .batch_execute(
            "UPDATE shedlock SET lock_until = now() WHERE name = 'escalate-overdue-cases'",
        )
        .unwrap();
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    assert!(child.wait().unwrap().success(), "{rest:?}");
    let verify = rest.iter().find(|l| l.contains("verify:gates")).unwrap();
    assert!(verify.contains("closed again 1 row(s)"), "{verify}");
    // The re-open still restores the row the run found.
    assert_eq!(f.gates("res"), expected_after(&before));
}

/// ShedLock cannot be installed here; its JDBC provider's statements on
/// PostgreSQL are short and documented, and these are they (from
/// `SqlStatementsSource` / `PostgresSqlStatementsSource`).
const SHEDLOCK_INSERT: &str = "INSERT INTO shedlock(name, lock_until, locked_at, locked_by) VALUES($1, $2, $3, $4) ON CONFLICT (name) DO NOTHING";
const SHEDLOCK_UPDATE: &str = "UPDATE shedlock SET lock_until = $1, locked_at = $2, locked_by = $3 WHERE name = $4 AND lock_until <= $2";
const SHEDLOCK_UNLOCK: &str = "UPDATE shedlock SET lock_until = $1 WHERE name = $2";

/// ShedLock's acquisition, as its JDBC provider runs it: insert, else the
/// conditional update. The number of rows it took.
fn shedlock_lock(c: &mut postgres::Client, name: &str, by: &str) -> u64 {
    let now = std::time::SystemTime::now();
    let until = now + Duration::from_secs(300);
    let inserted = c
        .execute(SHEDLOCK_INSERT, &[&name, &until, &now, &by])
        .unwrap();
    if inserted > 0 {
        return inserted;
    }
    c.execute(SHEDLOCK_UPDATE, &[&until, &now, &by, &name])
        .unwrap()
}

#[test]
fn a_shedlock_freeze_holds_against_shedlocks_own_statements() {
    let f = Fixture::new();
    // A job holds its lock at the close: it is running, and will unlock.
    f.client("res")
        .batch_execute("UPDATE shedlock SET lock_until = now() + interval '60 seconds', locked_by = 'case-app-7f9c' WHERE name = 'escalate-overdue-cases'")
        .unwrap();
    let held = f.gates("res");
    let text = format!(
        r#"[playbook]
name = "shedlock"
way-back = "cutover"
[databases.current]
conninfo = "{cur}"
[databases.restored]
conninfo = "{res}"
[recovery-target]
time = "2026-11-25T12:00:00Z"
[gates]
cache-ttl = "1s"
drain-timeout = "30s"
reopen-order = ["jobs"]
[[gates.shedlock]]
name = "jobs"
databases = ["restored"]
[validation]
sequences = false
extensions = false
invalid-indexes = false
"#,
        cur = f.conninfo("cur"),
        res = f.conninfo("res"),
    );
    let pb = f.dir.join("shedlock.toml");
    std::fs::write(&pb, text).unwrap();
    let run = f.dir.join("run");
    let mut child = apply_cmd(&pb, &run, &["--apply"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        if line.unwrap().contains("close:jobs@restored") {
            break;
        }
    }
    let mut app = f.client("res");
    // Another node's scheduler tries to take the frozen lock: refused.
    assert_eq!(
        shedlock_lock(&mut app, "escalate-overdue-cases", "node-2"),
        0
    );
    // A job the gate does not name starts: its new lock row goes in.
    assert_eq!(shedlock_lock(&mut app, "nightly-report", "node-3"), 1);
    let nightly: String = app
        .query_one(
            "SELECT to_jsonb(s)::text FROM shedlock s WHERE name = 'nightly-report'",
            &[],
        )
        .unwrap()
        .get(0);
    // The job that held its lock at the close finishes after the cache
    // TTL, while verify waits for it, and unlocks.
    std::thread::sleep(Duration::from_secs(3));
    app.execute(
        SHEDLOCK_UNLOCK,
        &[&std::time::SystemTime::now(), &"escalate-overdue-cases"],
    )
    .unwrap();
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    assert!(child.wait().unwrap().success(), "{rest:#?}");
    let verify = rest.iter().find(|l| l.contains("verify:gates")).unwrap();
    assert!(verify.contains("closed again 1 row(s)"), "{verify}");
    assert!(
        verify.contains("1 lock(s) taken while the gates were closed"),
        "{verify}"
    );
    assert!(
        verify.contains("for 1 job(s) running since before the close"),
        "{verify}"
    );
    let report = reentry(&[&"report", &run, &"--format", &"json"]);
    let report: serde_json::Value = serde_json::from_str(&stdout(&report)).unwrap();
    let items = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "verify:gates")
        .unwrap()["items"]
        .to_string();
    assert!(items.contains("nightly-report: taken by node-3"), "{items}");
    assert!(
        items.contains("escalate-overdue-cases: released since the close"),
        "{items}"
    );

    // After the re-open: the lock the run found is back as it was, and so
    // is the row the new job wrote; nothing is left frozen.
    let mut expected = held.clone();
    expected.push(format!("lock nightly-report {nightly}"));
    expected.sort();
    assert_eq!(f.gates("res"), expected);
}

#[test]
fn the_same_database_as_current_and_restored_is_refused() {
    let f = Fixture::new();
    let pb = f.playbook("pb.toml", "0s");
    let text = std::fs::read_to_string(&pb)
        .unwrap()
        .replace(&f.conninfo("cur"), &f.conninfo("res"));
    let pb = f.dir.join("same.toml");
    std::fs::write(&pb, text).unwrap();
    let before = f.dump("res");
    let out = reentry(&[&"plan", &pb]);
    assert_exit(&out, 3);
    assert!(
        stderr(&out).contains(
            "databases.current and databases.restored are the same database (database res on port"
        ),
        "{}",
        stderr(&out)
    );
    let run = f.dir.join("run");
    assert_exit(&apply(&pb, &run, &["--apply"]), 3);
    assert_eq!(f.dump("res"), before);
    assert!(f.audit("res").is_empty());
}

#[test]
fn apply_until_holds_the_gates_closed_and_resume_goes_on() {
    let f = Fixture::new();
    let pb = f.playbook("pb.toml", "0s");
    let before = f.gates("res");
    let run = f.dir.join("run");
    let out = apply(&pb, &run, &["--apply", "--until", "settle"]);
    assert_exit(&out, 0);
    assert!(
        stdout(&out).contains("paused after the settle phase, before invariant:every open case has an owner, as asked (--until); continue: reentry apply"),
        "{}",
        stdout(&out)
    );
    assert!(
        stdout(&out).contains("--apply --resume"),
        "{}",
        stdout(&out)
    );
    // Held closed: nothing re-opened yet.
    assert!(f
        .gates("res")
        .contains(&"gate api-writes enabled=false".to_owned()));
    let report = reentry(&[&"report", &run]);
    assert!(stdout(&report).contains("**paused"), "{}", stdout(&report));

    // The run is a cutover: resuming it as the other way back is refused,
    // and changes nothing.
    let held = f.gates("res");
    let out = apply(
        &pb,
        &run,
        &["--apply", "--resume", "--way-back", "selective-repair"],
    );
    assert_exit(&out, 3);
    assert!(
        stderr(&out).contains("this run is a cutover, and it was resumed as a selective-repair"),
        "{}",
        stderr(&out)
    );
    assert_eq!(f.gates("res"), held);

    // Without the flag, a resumed run takes the way back it started with.
    let out = apply(&pb, &run, &["--apply", "--resume"]);
    assert_exit(&out, 0);
    assert_eq!(f.gates("res"), expected_after(&before));
    let report = reentry(&[&"report", &run, &"--format", &"json"]);
    let report: serde_json::Value = serde_json::from_str(&stdout(&report)).unwrap();
    assert_eq!(report["status"], "finished");
    assert_eq!(report["attempts"], 1, "a pause is not a second attempt");
    assert_eq!(report["pauses"][0]["after"], "settle");
    assert!(report["pauses"][0]["seconds"].as_f64().is_some());
    let md = stdout(&reentry(&[&"report", &run]));
    assert!(
        md.contains("- Paused: held after the settle phase from"),
        "{md}"
    );
    assert!(md.contains("1 attempt(s)"), "{md}");
}

#[test]
fn a_stray_pause_hook_does_not_hang_a_run() {
    let f = Fixture::new();
    let pb = f.playbook("pb.toml", "0s");
    let run = f.dir.join("run");
    let out = apply_cmd(&pb, &run, &["--apply"])
        .env("REENTRY_PAUSE_AT", "close:api-writes@current:started")
        .output()
        .unwrap();
    assert_exit(&out, 0);
    assert!(
        stderr(&out).contains("REENTRY_PAUSE_AT is set but ignored"),
        "{}",
        stderr(&out)
    );
}

/// Playbook SQL is one statement. Through the simple-query protocol an
/// invariant or health check could end the read-only transaction it runs
/// in and write: `plan` and a dry run would close a gate. Each such query
/// is refused with its place in the playbook, and nothing changes.
#[test]
fn playbook_sql_that_would_leave_its_read_only_transaction_is_refused_where_it_is_written() {
    let f = Fixture::new();
    let pb = f.playbook("pb.toml", "0s");
    let text = std::fs::read_to_string(&pb).unwrap();
    let line_of = |text: &str, needle: &str| {
        text.lines()
            .position(|l| l.contains(needle))
            .map(|i| i + 1)
            .unwrap()
    };
    let before = (f.gates("cur"), f.gates("res"));

    // The review's reproduction: an invariant, with `reentry plan`.
    let escape = "SELECT 1 WHERE false; COMMIT; BEGIN; UPDATE system_gate SET enabled=false";
    let invariant = text.replace(
        "SELECT id FROM cases WHERE status = 'open' AND owner_id IS NULL",
        escape,
    );
    std::fs::write(&pb, &invariant).unwrap();
    let out = reentry(&[&"plan", &pb]);
    assert_exit(&out, 78);
    let err = stderr(&out);
    assert!(
        err.contains(&format!("pb.toml:{}:", line_of(&invariant, escape)))
            && err.contains("cannot insert multiple commands"),
        "{err}"
    );

    // One statement that a read-only transaction allows and that still
    // acts: COPY … TO PROGRAM runs a program as the server's user. Refused
    // as no query, unrun, in `plan` and in a dry run.
    let marker = f.dir.join("copy-to-program-ran");
    let program = format!("COPY (SELECT 1) TO PROGRAM 'touch {}'", marker.display());
    let copy = text.replace(
        "SELECT id FROM cases WHERE status = 'open' AND owner_id IS NULL",
        &program,
    );
    std::fs::write(&pb, &copy).unwrap();
    for args in [vec!["plan"], vec!["apply", "--run-dir"]] {
        let mut cmd = Command::new(reentry_bin());
        cmd.arg(args[0]).arg(&pb).env(PW_VAR, SECRET);
        if args.len() > 1 {
            cmd.arg(args[1]).arg(f.dir.join("dry-run-copy"));
        }
        let out = cmd.output().unwrap();
        assert_exit(&out, 78);
        let err = stderr(&out);
        assert!(
            err.contains(&format!("pb.toml:{}:", line_of(&copy, &program)))
                && err.contains("not a query"),
            "{err}"
        );
    }
    assert!(!marker.exists(), "the program ran");

    // A health check, which no plan prepared, with a read-write transaction
    // of its own: in `plan` and in a dry run.
    let escape =
        "SELECT 1 WHERE false; COMMIT; BEGIN READ WRITE; UPDATE system_gate SET enabled = false";
    let health = text.replace("SELECT id FROM cases WHERE title = 'broken'", escape);
    std::fs::write(&pb, &health).unwrap();
    let dry_run = f.dir.join("dry-run");
    let outs: Vec<Output> = [
        vec!["plan"],
        vec!["apply", "--run-dir", dry_run.to_str().unwrap()],
    ]
    .iter()
    .map(|args| {
        Command::new(reentry_bin())
            .args(&args[..1])
            .arg(&pb)
            .args(&args[1..])
            .env(PW_VAR, SECRET)
            .output()
            .unwrap()
    })
    .collect();
    // First what the databases say, then what reentry said.
    assert_eq!((f.gates("cur"), f.gates("res")), before, "a gate changed");
    assert_eq!(f.audit("cur"), vec![]);
    assert_eq!(f.audit("res"), vec![]);
    for out in &outs {
        let err = stderr(out);
        assert_exit(out, 78);
        assert!(
            err.contains(&format!("pb.toml:{}:", line_of(&health, escape)))
                && err.contains("cannot insert multiple commands"),
            "{err}"
        );
    }
}

/// Every file in `dir` and below 0600 (or stricter), every directory 0700.
fn assert_private(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "{} is {mode:o}", dir.display());
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            assert_private(&p);
        } else {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode & 0o077, 0, "{} is {mode:o}", p.display());
        }
    }
}

/// `cmd` under umask 022, the usual operator's, through `sh`.
fn umask_022(cmd: &Command) -> Command {
    let mut sh = Command::new("sh");
    sh.args(["-c", "umask 022 && exec \"$0\" \"$@\""])
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            sh.env(k, v);
        }
    }
    sh
}

#[test]
fn run_files_are_private_under_umask_022_and_an_identity_others_can_read_is_refused() {
    let f = Fixture::new();
    let pb = f.playbook("pb.toml", "0s");
    let run = f.dir.join("runs").join("r1");
    let out = umask_022(&apply_cmd(&pb, &run, &["--apply"]))
        .output()
        .unwrap();
    assert_exit(&out, 0);
    let report = run.join("report.html");
    let out = umask_022(
        Command::new(reentry_bin())
            .arg("report")
            .arg(&run)
            .args(["--format", "html", "--output"])
            .arg(&report),
    )
    .output()
    .unwrap();
    assert_exit(&out, 0);
    assert!(run.join("journal.jsonl").exists() && run.join("plan.json").exists());
    assert_private(&run);

    // An age identity others can read is refused, as ssh refuses a key.
    use age::secrecy::ExposeSecret;
    let key = f.dir.join("identity.txt");
    let id = age::x25519::Identity::generate();
    std::fs::write(&key, format!("{}\n", id.to_string().expose_secret())).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(reentry_bin())
        .arg("--repo")
        .arg(f.dir.join("repo"))
        .arg("--identity")
        .arg(&key)
        .args(["backup", "list"])
        .output()
        .unwrap();
    assert_exit(&out, 78);
    assert!(
        stderr(&out).contains(&format!("run `chmod 600 {}`", key.display())),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_resume_refuses_a_plan_json_that_is_not_the_one_the_run_wrote() {
    let f = Fixture::new();
    let pb = f.playbook("pb.toml", "0s");
    let run = f.dir.join("run");
    assert_exit(&apply(&pb, &run, &["--apply", "--until", "settle"]), 0);
    let held = f.gates("res");
    let current = f.gates("cur");
    let plan_path = run.join("plan.json");
    let original = std::fs::read_to_string(&plan_path).unwrap();
    let journal_before = std::fs::read_to_string(run.join("journal.jsonl")).unwrap();

    // One step changed, then one step added: each refused, nothing done.
    let mut plan: serde_json::Value = serde_json::from_str(&original).unwrap();
    let steps = plan["steps"].as_array_mut().unwrap();
    let mut extra = steps[0].clone();
    extra["id"] = serde_json::Value::from("planted");
    steps.insert(1, extra);
    let added = serde_json::to_string_pretty(&plan).unwrap();
    let changed = original.replacen("api-writes", "api-reads", 1);
    assert_ne!(changed, original);
    for edited in [changed, added] {
        std::fs::write(&plan_path, &edited).unwrap();
        let out = apply(&pb, &run, &["--apply", "--resume"]);
        assert_exit(&out, 3);
        assert!(
            stderr(&out).contains("is not the plan this run wrote"),
            "{}",
            stderr(&out)
        );
        assert_eq!(f.gates("res"), held);
        assert_eq!(f.gates("cur"), current);
        assert_eq!(
            std::fs::read_to_string(run.join("journal.jsonl")).unwrap(),
            journal_before
        );
    }
    // A journal whose run-started names no plan hash (the reviewer's
    // bypass: drop the field) vouches for nothing: refused.
    let unvouched = journal_before.replacen("\"plan-sha256\":", "\"x-plan-sha256\":", 1);
    assert_ne!(
        unvouched, journal_before,
        "the journal records the plan's hash"
    );
    std::fs::write(run.join("journal.jsonl"), &unvouched).unwrap();
    std::fs::write(&plan_path, &original).unwrap();
    let out = apply(&pb, &run, &["--apply", "--resume"]);
    assert_exit(&out, 3);
    assert!(
        stderr(&out).contains("records no sha256 of its plan"),
        "{}",
        stderr(&out)
    );
    assert_eq!(f.gates("res"), held);
    std::fs::write(run.join("journal.jsonl"), &journal_before).unwrap();

    // A run directory others can write to: whoever can, can replace the
    // plan and the journal together. Refused, on start and on resume.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = apply(&pb, &run, &["--apply", "--resume"]);
    assert_exit(&out, 3);
    assert!(
        stderr(&out).contains("others can write to it (mode 777)"),
        "{}",
        stderr(&out)
    );
    assert_eq!(f.gates("res"), held);
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
    let shared = f.dir.join("shared-run");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let out = apply(&pb, &shared, &["--apply"]);
    assert_exit(&out, 3);
    assert_eq!(
        std::fs::read_dir(&shared).unwrap().count(),
        0,
        "it wrote there"
    );
    // One that another user made (as in a shared /tmp): refused too.
    // (Only root can give a directory to another user.)
    if let Some((uid, gid)) = crate::common::server_user() {
        let theirs = f.dir.join("their-run");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(uid), Some(gid)).unwrap();
        std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o700)).unwrap();
        let out = apply(&pb, &theirs, &["--apply"]);
        assert_exit(&out, 3);
        assert!(
            stderr(&out).contains(&format!("it belongs to uid {uid}")),
            "{}",
            stderr(&out)
        );
    }

    // Its own plan back: the run goes on.
    assert_exit(&apply(&pb, &run, &["--apply", "--resume"]), 0);
}

/// bt_index_check reads every B-tree index of the survivor: a dry run
/// must not, however often an operator runs one during an incident.
/// Counted by the server (`pg_stat_user_functions`, track_functions = all).
#[test]
fn a_dry_run_calls_no_bt_index_check_and_apply_does() {
    let f = Fixture::new();
    f.cluster
        .client()
        .batch_execute("ALTER DATABASE res SET track_functions = 'all'")
        .unwrap();
    let pb = f.playbook("pb.toml", "0s");
    // What the server counted once reentry's sessions have ended (a
    // session reports its counts as it exits).
    let calls = || {
        let mut c = f.client("res");
        for _ in 0..100 {
            let open: i64 = c
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'reentry%'",
                    &[],
                )
                .unwrap()
                .get(0);
            if open == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut c = f.client("res");
        c.query_one(
            "SELECT coalesce(sum(calls), 0)::int8 FROM pg_stat_user_functions WHERE funcname = 'bt_index_check'",
            &[],
        )
        .unwrap()
        .get::<_, i64>(0)
    };
    let dry = apply(&pb, &f.dir.join("dry"), &[]);
    assert_exit(&dry, 0);
    assert_eq!(
        calls(),
        0,
        "a dry run called bt_index_check: {}",
        stdout(&dry)
    );
    let out = apply(&pb, &f.dir.join("real"), &["--apply"]);
    assert_exit(&out, 0);
    assert!(calls() > 0, "apply ran amcheck: {}", stdout(&out));
}
