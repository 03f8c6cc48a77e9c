//! The Quartz gate against a real Quartz 2.3.2 scheduler (Debian's
//! libquartz2-java, JDBCJobStoreTX with PostgreSQLDelegate, clustered) on
//! PostgreSQL 18, under a load of 20 triggers firing every 200 ms. Every
//! claim is counted in the job's own run log: no trigger of a gated group
//! fires between the close and the re-open; what the application paused
//! stays paused; triggers the application adds while the gate is closed run
//! after the re-open; misfires are reported as Quartz will handle them.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::archiving::{archiving, switch_and_wait_archived};
use crate::common::pg::{Cluster, Version};
use crate::common::quartz::{self, Run, Scheduler};
use crate::common::restored::{self, ok_json};
use crate::common::{assert_exit, reentry_bin, run_reentry, stdout};

const LOAD: usize = 20;
const INTERVAL_MS: u64 = 200;

struct Lab {
    cluster: Cluster,
    dir: PathBuf,
}

impl Lab {
    /// Two databases with Quartz's own tables; the scheduler runs on `res`,
    /// the survivor of a cutover.
    fn new() -> Lab {
        let mut cluster = Cluster::init(Version::V18);
        cluster.append_conf(&[("max_connections", "60")]);
        cluster.start();
        let mut admin = cluster.client();
        for db in ["cur", "res"] {
            admin
                .batch_execute(&format!("CREATE DATABASE {db}"))
                .unwrap();
        }
        let ddl = quartz::schema();
        for db in ["cur", "res"] {
            cluster.db_client(db).batch_execute(&ddl).unwrap();
        }
        let dir = cluster.dir("work");
        Lab { cluster, dir }
    }

    fn scheduler(&self, misfire_ms: u64) -> Scheduler {
        self.scheduler_with(misfire_ms, 20)
    }

    /// A scheduler whose jobs each run `job_ms`.
    fn scheduler_with(&self, misfire_ms: u64, job_ms: u64) -> Scheduler {
        Scheduler::start_with(
            &jdbc_url(self.cluster.port, "res"),
            "CaseScheduler",
            misfire_ms,
            job_ms,
            &self.dir.join("runs.log"),
        )
    }

    fn playbook(&self, ttl: &str, extra: &str) -> PathBuf {
        let text = format!(
            r#"[playbook]
name = "quartz-lab"
way-back = "cutover"

[databases.current]
conninfo = "{cur}"

[databases.restored]
conninfo = "{res}"

[recovery-target]
time = "2026-11-25T12:00:00Z"

[gates]
cache-ttl = "{ttl}"
reopen-order = ["quartz-jobs"]

[[gates.quartz]]
name = "quartz-jobs"
databases = ["restored"]
scheduler = "CaseScheduler"
groups = ["Billing", "Archive"]
{extra}

[validation]
invalid-indexes = false
sequences = false
extensions = false
"#,
            cur = self.cluster.db_conninfo("cur"),
            res = self.cluster.db_conninfo("res"),
        );
        let path = self.dir.join("quartz.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn trigger_state(&self, group: &str, name: &str) -> String {
        self.cluster
            .db_client("res")
            .query_one(
                "SELECT trigger_state FROM qrtz_triggers WHERE trigger_group = $1 AND trigger_name = $2",
                &[&group, &name],
            )
            .unwrap()
            .get(0)
    }
}

fn jdbc_url(port: u16, db: &str) -> String {
    format!("jdbc:postgresql://127.0.0.1:{port}/{db}?user=postgres")
}

/// Waits (up to 30 s) until each of `triggers` has a run in `log`.
fn wait_for_runs(log: &Path, triggers: &[&str]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !triggers
        .iter()
        .all(|t| quartz::runs(log).iter().any(|r| r.trigger == *t))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{triggers:?} never all started: {:?}",
            quartz::runs(log)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The effect's detail a step journaled when it was done.
fn done_detail(run: &Path, step: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(run.join("journal.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|r| r["event"] == "done" && r["step"] == step)
        .unwrap_or_else(|| panic!("no done of {step} in {text}"))["data"]["effect"]["detail"]
        .clone()
}

fn ms(rfc3339: &str) -> i64 {
    humantime::parse_rfc3339(rfc3339)
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The journal's record `event` of `step`, as ms since the epoch.
fn at(run: &Path, event: &str, step: &str) -> i64 {
    let text = std::fs::read_to_string(run.join("journal.jsonl")).unwrap();
    let r: serde_json::Value = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|r| r["event"] == event && r["step"] == step)
        .unwrap_or_else(|| panic!("no {event} of {step} in {text}"));
    ms(r["at"].as_str().unwrap())
}

/// A closed window: from the close's commit to the start of the re-open.
struct Window {
    closed_ms: i64,
    reopened_ms: i64,
}

fn gated(r: &Run) -> bool {
    matches!(r.group(), "Billing" | "Archive")
}

/// Runs in gated groups that Quartz fired while the gate was closed.
fn escapes<'a>(runs: &'a [Run], w: &Window) -> Vec<&'a Run> {
    runs.iter()
        .filter(|r| gated(r) && r.fired_ms > w.closed_ms && r.fired_ms < w.reopened_ms)
        .collect()
}

const CLOSE: &str = "close:quartz-jobs@restored";
const REOPEN: &str = "reopen:quartz-jobs@restored";
const VERIFY: &str = "verify:gates";

#[test]
fn a_quartz_gate_holds_under_load_and_reopens_as_quartz_resumes() {
    let lab = Lab::new();
    let mut s = lab.scheduler(60_000);
    for i in 0..LOAD {
        let kind = if i % 4 == 0 { "serial" } else { "t" };
        s.cmd(&format!("simple Billing {kind}{i:02} {INTERVAL_MS}"));
    }
    // What the application itself paused before the incident. They start
    // a few seconds out, so that the pause lands before a first fire even
    // on a busy machine.
    s.cmd(&format!("simple Billing paused-by-app {INTERVAL_MS} 5000"));
    s.cmd("pause-trigger Billing paused-by-app");
    s.cmd(&format!("simple Archive archive {INTERVAL_MS} 5000"));
    s.cmd("pause-group Archive");
    // Not gated: keeps running, which shows the scheduler was alive.
    s.cmd(&format!("simple Ops heartbeat {INTERVAL_MS}"));
    std::thread::sleep(Duration::from_secs(1));

    let pb = lab.playbook("300ms", "");
    let mut windows = Vec::new();
    for cycle in 0..20 {
        let run = lab.dir.join(format!("run-{cycle}"));
        let mut child = Command::new(reentry_bin())
            .args(["apply", "--apply", "--run-dir"])
            .arg(&run)
            .arg(&pb)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = String::new();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        for line in lines.by_ref() {
            let line = line.unwrap();
            out.push_str(&line);
            out.push('\n');
            if line.contains(CLOSE) {
                break;
            }
        }
        // The application adds a trigger to a gated group while it is
        // closed: Quartz stores it PAUSED, since its group is paused.
        let state = s.cmd(&format!("simple Billing added{cycle:02} 1000"));
        assert_eq!(state, "PAUSED", "cycle {cycle}");
        for line in lines {
            out.push_str(&line.unwrap());
            out.push('\n');
        }
        let status = child.wait().unwrap();
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert!(status.success(), "cycle {cycle}: {status}\n{out}\n{err}");
        windows.push(Window {
            closed_ms: at(&run, "done", CLOSE),
            reopened_ms: at(&run, "started", REOPEN),
        });
        std::thread::sleep(Duration::from_millis(1000));
    }
    std::thread::sleep(Duration::from_millis(1500));
    // A trigger resumed from another process is seen at the scheduler's
    // next acquisition, which a busy machine delays: wait (up to 30 s) for
    // every trigger added while the gate was closed to have run since.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        let so_far = s.runs_so_far();
        let all_ran = windows.iter().enumerate().all(|(cycle, w)| {
            let name = format!("Billing.added{cycle:02}");
            so_far
                .iter()
                .any(|r| r.trigger == name && r.fired_ms > w.reopened_ms)
        });
        if all_ran {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let last = windows.last().unwrap().reopened_ms;
    let runs = s.stop();

    let escaped: Vec<(usize, &Run)> = windows
        .iter()
        .enumerate()
        .flat_map(|(i, w)| escapes(&runs, w).into_iter().map(move |r| (i, r)))
        .collect();
    let cycles: BTreeSet<usize> = escaped.iter().map(|(i, _)| *i).collect();
    eprintln!(
        "quartz gate: {} run(s) escaped the closed gate in {} of {} cycles ({} runs logged)",
        escaped.len(),
        cycles.len(),
        windows.len(),
        runs.len()
    );
    assert!(
        escaped.is_empty(),
        "{} run(s) fired while the gate was closed, in {} of 20 cycles; first: {:?}",
        escaped.len(),
        cycles.len(),
        &escaped[..escaped.len().min(5)]
    );

    // The load was real: the gated triggers ran between the cycles, and the
    // ungated one ran while the gate was closed.
    let open_runs = runs
        .iter()
        .filter(|r| r.group() == "Billing" && r.fired_ms > last)
        .count();
    assert!(
        open_runs >= LOAD,
        "only {open_runs} Billing run(s) after the last re-open"
    );
    let heartbeats_closed: usize = windows
        .iter()
        .map(|w| {
            runs.iter()
                .filter(|r| {
                    r.trigger == "Ops.heartbeat"
                        && r.fired_ms > w.closed_ms
                        && r.fired_ms < w.reopened_ms
                })
                .count()
        })
        .sum();
    assert!(
        heartbeats_closed >= 20,
        "the ungated trigger ran only {heartbeats_closed} times while the gate was closed"
    );

    // What the application paused stays paused.
    for t in ["Billing.paused-by-app", "Archive.archive"] {
        assert!(!runs.iter().any(|r| r.trigger == t), "{t} ran");
    }
    assert_eq!(lab.trigger_state("Billing", "paused-by-app"), "PAUSED");
    assert_eq!(lab.trigger_state("Archive", "archive"), "PAUSED");
    let paused_groups: Vec<String> = lab
        .cluster
        .db_client("res")
        .query(
            "SELECT trigger_group FROM qrtz_paused_trigger_grps ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(paused_groups, ["Archive"]);

    // Triggers added while the gate was closed run after its re-open.
    for (cycle, w) in windows.iter().enumerate() {
        let name = format!("Billing.added{cycle:02}");
        assert!(
            runs.iter().any(|r| r.trigger == name && r.fired_ms > w.reopened_ms),
            "{name}, added while the gate was closed, never ran after the re-open ({}); its runs: {:?}",
            lab.trigger_state("Billing", &name["Billing.".len()..]),
            runs.iter().filter(|r| r.trigger == name).map(|r| r.fired_ms - w.reopened_ms).collect::<Vec<_>>()
        );
    }
}

#[test]
fn misfires_after_a_long_closure_are_named_and_quartz_handles_them_by_the_time_reported() {
    let lab = Lab::new();
    // Quartz's misfire threshold, short so the closure can outlast it.
    let mut s = lab.scheduler(1500);
    for i in 0..LOAD {
        s.cmd(&format!("simple Billing t{i:02} {INTERVAL_MS}"));
    }
    s.cmd("cron Billing every-second 0/1 * * * * ?");
    // Its first fire is an hour away: nothing to miss.
    s.cmd("simple Billing hourly 3600000 3600000");
    s.cmd("simple Archive archive 3600000 3600000");
    std::thread::sleep(Duration::from_secs(1));

    let pb = lab.playbook("0s", "misfire-threshold = \"1500ms\"");
    let run = lab.dir.join("run");
    // Close, settle, and hold the gate closed on purpose.
    let out = run_reentry(&[
        &"apply",
        &pb,
        &"--run-dir",
        &run,
        &"--apply",
        &"--until",
        &"settle",
    ]);
    assert_exit(&out, 0);
    assert!(
        stdout(&out).contains("as asked (--until)"),
        "{}",
        stdout(&out)
    );
    let closed = at(&run, "done", CLOSE);
    std::thread::sleep(Duration::from_secs(4));
    let out = run_reentry(&[&"apply", &pb, &"--run-dir", &run, &"--apply", &"--resume"]);
    assert_exit(&out, 0);
    let reopened = at(&run, "started", REOPEN);

    let text = std::fs::read_to_string(run.join("journal.jsonl")).unwrap();
    let done: serde_json::Value = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|r| r["event"] == "done" && r["step"] == REOPEN)
        .unwrap();
    let misfired = done["data"]["effect"]["detail"]["misfired"]
        .as_array()
        .unwrap()
        .clone();
    let named: BTreeSet<String> = misfired
        .iter()
        .map(|m| m["trigger"].as_str().unwrap().to_owned())
        .collect();
    let mut expected: BTreeSet<String> = (0..LOAD).map(|i| format!("Billing.t{i:02}")).collect();
    expected.insert("Billing.every-second".into());
    assert_eq!(named, expected, "the triggers named as misfired");
    let cron = misfired
        .iter()
        .find(|m| m["trigger"] == "Billing.every-second")
        .unwrap();
    assert_eq!(cron["instruction"], "smart policy: fire once now");
    let simple = misfired
        .iter()
        .find(|m| m["trigger"] == "Billing.t00")
        .unwrap();
    assert_eq!(
        simple["instruction"],
        "smart policy: reschedule next with remaining count"
    );
    assert!(
        done["data"]["effect"]["summary"]
            .as_str()
            .unwrap()
            .contains("21 trigger(s) missed their fire time"),
        "{done}"
    );

    // Wait past the latest time reported, then read the run log.
    let by = misfired
        .iter()
        .map(|m| ms(m["handled-by"].as_str().unwrap()))
        .max()
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    std::thread::sleep(Duration::from_millis((by - now).max(0) as u64 + 1500));
    let runs = s.stop();
    let w = Window {
        closed_ms: closed,
        reopened_ms: reopened,
    };
    assert!(escapes(&runs, &w).is_empty(), "{:?}", escapes(&runs, &w));
    for m in &misfired {
        let t = m["trigger"].as_str().unwrap();
        let handled = ms(m["handled-by"].as_str().unwrap());
        let first = runs
            .iter()
            .filter(|r| r.trigger == t && r.fired_ms > reopened)
            .map(|r| r.fired_ms)
            .min()
            .unwrap_or_else(|| panic!("{t} never ran after the re-open"));
        // Quartz's misfire handler runs at least once per threshold; allow
        // it some slack past the time reported: the suite runs the crash
        // harness alongside on two cores.
        assert!(
            first <= handled + 2500,
            "{t} first ran {} ms after the time reported ({})",
            first - handled,
            m["handled-by"]
        );
    }
    assert!(!runs.iter().any(|r| r.trigger == "Billing.hourly"));

    let report = stdout(&run_reentry(&[&"report", &run]));
    assert!(
        report.contains("- Paused: held after the settle phase from"),
        "{report}"
    );
    assert!(report.contains("1 attempt(s)"), "{report}");
    assert!(report.contains("past their misfire threshold"), "{report}");
}

#[test]
fn a_quartz_gate_that_would_gate_nothing_is_refused_naming_what_exists() {
    let lab = Lab::new();
    let mut s = lab.scheduler(60_000);
    s.cmd("simple Billing t 60000 60000");
    s.cmd("simple Archive a 60000 60000");
    let check = |extra: &str, scheduler: &str| {
        let text = std::fs::read_to_string(lab.playbook("0s", extra))
            .unwrap()
            .replace(
                "scheduler = \"CaseScheduler\"",
                &format!("scheduler = \"{scheduler}\""),
            );
        let pb = lab.dir.join("check.toml");
        std::fs::write(&pb, &text).unwrap();
        let out = run_reentry(&[&"playbook", &"check", &pb]);
        (out, text)
    };
    let line_of =
        |text: &str, needle: &str| text.lines().position(|l| l.contains(needle)).unwrap() + 1;

    let (out, text) = check("", "caseScheduler");
    assert_exit(&out, 78);
    let err = crate::common::stderr(&out);
    assert!(
        err.contains(&format!("check.toml:{}:", line_of(&text, "scheduler ="))),
        "{err}"
    );
    assert!(
        err.contains(
            "Quartz scheduler `caseScheduler` has no triggers or locks in databases.restored"
        ),
        "{err}"
    );
    assert!(err.contains("schedulers there: CaseScheduler"), "{err}");

    let (out, text) = check("", "CaseScheduler");
    assert_exit(&out, 0);
    let _ = text;
    let text = std::fs::read_to_string(lab.playbook("0s", ""))
        .unwrap()
        .replace("[\"Billing\", \"Archive\"]", "[\"Billing\", \"archive\"]");
    let pb = lab.dir.join("groups.toml");
    std::fs::write(&pb, &text).unwrap();
    let out = run_reentry(&[&"playbook", &"check", &pb]);
    assert_exit(&out, 78);
    let err = crate::common::stderr(&out);
    assert!(
        err.contains(&format!("groups.toml:{}:", line_of(&text, "groups ="))),
        "{err}"
    );
    assert!(
        err.contains(
            "has no trigger group `archive` in databases.restored; groups there: Archive, Billing"
        ),
        "{err}"
    );

    // Quartz's own default property spelling, folded as PostgreSQL folds
    // the unquoted names in Quartz's DDL.
    let (out, _) = check("table-prefix = \"QRTZ_\"", "CaseScheduler");
    assert_exit(&out, 0);
    let (out, text) = check("table-prefix = \"QRTZ2_\"", "CaseScheduler");
    assert_exit(&out, 78);
    let err = crate::common::stderr(&out);
    assert!(
        err.contains(&format!("check.toml:{}:", line_of(&text, "table-prefix ="))),
        "{err}"
    );
    assert!(
        err.contains("table qrtz2_triggers does not exist in databases.restored"),
        "{err}"
    );
    drop(s);
}

#[test]
fn verify_waits_for_a_gated_job_still_executing_and_names_it_when_it_outlasts_the_drain() {
    let lab = Lab::new();
    let mut s = lab.scheduler_with(60_000, 6000);
    s.cmd("simple Archive archive 3600000 3600000");
    // Fires at once and runs for 6 s: still executing when the gate closes.
    s.cmd("simple Billing slow 3600000");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !quartz::runs(&s.log)
        .iter()
        .any(|r| r.trigger == "Billing.slow")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "Billing.slow never started"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = std::fs::read_to_string(lab.playbook("0s", ""))
        .unwrap()
        .replace(
            "cache-ttl = \"0s\"",
            "cache-ttl = \"0s\"\ndrain-timeout = \"1s\"",
        );
    let pb = lab.dir.join("drain.toml");
    std::fs::write(&pb, text).unwrap();
    let run = lab.dir.join("run");
    let out = run_reentry(&[&"apply", &pb, &"--run-dir", &run, &"--apply"]);
    assert_exit(&out, 2);
    assert!(
        stdout(&out)
            .contains("1 job(s) that started before the gates closed are still running after 1s"),
        "{}",
        stdout(&out)
    );
    let report = stdout(&run_reentry(&[&"report", &run]));
    assert!(
        report.contains("Billing.slow (job Billing.slow on lab-1, fired "),
        "{report}"
    );
    assert_eq!(
        lab.trigger_state("Billing", "slow"),
        "PAUSED",
        "the gate stays closed"
    );

    // Once the job is done, the run goes on.
    std::thread::sleep(Duration::from_secs(6));
    let out = run_reentry(&[&"apply", &pb, &"--run-dir", &run, &"--apply", &"--resume"]);
    assert_exit(&out, 0);
    assert_eq!(lab.trigger_state("Billing", "slow"), "WAITING");
    drop(s);
}

/// Quartz's DDL lets `qrtz_fired_triggers.job_name`, `job_group` and its
/// two flags be NULL. An EXECUTING row with them NULL is read, named, and
/// waited for like any other while its instance (a live scheduler) checks
/// in; a ghost's is read and named too: no panic, the gates stay closed,
/// the run says why.
#[test]
fn an_executing_row_without_its_job_name_is_read_as_quartz_allows() {
    let lab = Lab::new();
    let mut s = lab.scheduler(60_000);
    s.cmd("simple Billing t 3600000 3600000");
    s.cmd("simple Archive a 3600000 3600000");
    lab.cluster
        .db_client("res")
        .batch_execute(
            "INSERT INTO qrtz_fired_triggers (sched_name, entry_id, trigger_name, trigger_group, instance_name,
                                              fired_time, sched_time, priority, state, job_name, job_group,
                                              is_nonconcurrent, requests_recovery)
             VALUES ('CaseScheduler', 'e-null', 't', 'Billing', 'lab-1',
                     (extract(epoch FROM clock_timestamp()) * 1000)::bigint, 1764072000000, 5,
                     'EXECUTING', NULL, NULL, NULL, NULL),
                    ('CaseScheduler', 'e-ghost', 't', 'Billing', 'lab-9', 1764072000000, 1764072000000, 5,
                     'EXECUTING', NULL, NULL, NULL, NULL)",
        )
        .unwrap();
    let text = std::fs::read_to_string(lab.playbook("0s", ""))
        .unwrap()
        .replace(
            "cache-ttl = \"0s\"",
            "cache-ttl = \"0s\"\ndrain-timeout = \"1s\"",
        );
    let pb = lab.dir.join("null-job.toml");
    std::fs::write(&pb, text).unwrap();
    let run = lab.dir.join("run");
    let out = run_reentry(&[&"apply", &pb, &"--run-dir", &run, &"--apply"]);
    assert_exit(&out, 2);
    assert!(
        stdout(&out).contains("still running after 1s"),
        "{}\n{}",
        stdout(&out),
        crate::common::stderr(&out)
    );
    let report = stdout(&run_reentry(&[&"report", &run]));
    assert!(
        report.contains("- quartz-jobs@restored: Billing.t (job ?.? on lab-1, fired "),
        "{report}"
    );
    assert!(
        report.contains("- not waited for: quartz-jobs@restored: Billing.t (job ?.? on lab-9, fired 2025-11-25T12:00:00.000Z) is not running: a ghost of T"),
        "{report}"
    );
    assert_eq!(
        lab.trigger_state("Billing", "t"),
        "PAUSED",
        "the gate stays closed"
    );
    drop(s);
}

/// A scheduler killed mid-job (SIGKILL: its host died) leaves its runs
/// `EXECUTING` in `FIRED_TRIGGERS` and its check-in going stale. While the
/// check-in is fresh the runs are waited for; once Quartz's own rule counts
/// the instance failed (its check-in not advanced for interval + 7.5 s, as
/// reentry watches it: never sooner, whatever the database's clock says),
/// verify stops waiting, long before the drain timeout, and names each run
/// with what Quartz will do with it.
#[test]
fn runs_of_a_scheduler_killed_mid_job_are_waited_for_only_until_quartz_counts_it_failed() {
    let lab = Lab::new();
    let log = lab.dir.join("doomed.log");
    let mut s = Scheduler::start_as(
        &jdbc_url(lab.cluster.port, "cur"),
        "CaseScheduler",
        "doomed-1",
        60_000,
        600_000,
        &log,
    );
    s.cmd("simple Archive archive 3600000 3600000");
    s.cmd("simple Billing stuck 3600000");
    s.cmd("simple Billing recoverable-stuck 3600000");
    wait_for_runs(&log, &["Billing.stuck", "Billing.recoverable-stuck"]);
    let runs = s.kill();
    let mut cur = lab.cluster.db_client("cur");
    let state = cur
        .query_one(
            "SELECT last_checkin_time, checkin_interval FROM qrtz_scheduler_state WHERE instance_name = 'doomed-1'",
            &[],
        )
        .unwrap();
    let failed_after = state.get::<_, i64>(0) + state.get::<_, i64>(1) + 7500;

    let text = std::fs::read_to_string(lab.playbook("0s", ""))
        .unwrap()
        .replace(
            "cache-ttl = \"0s\"",
            "cache-ttl = \"0s\"\ndrain-timeout = \"40s\"",
        )
        .replace("databases = [\"restored\"]", "databases = [\"current\"]");
    let pb = lab.dir.join("killed.toml");
    std::fs::write(&pb, text).unwrap();
    let run = lab.dir.join("run");
    let out = run_reentry(&[&"apply", &pb, &"--run-dir", &run, &"--apply"]);
    assert!(
        stdout(&out).contains("did not wait for 2 Quartz run(s) no live scheduler runs"),
        "{}",
        stdout(&out)
    );
    assert_exit(&out, 0);
    let (started, done) = (at(&run, "started", VERIFY), at(&run, "done", VERIFY));
    eprintln!(
        "verify: {} ms, done {} ms after Quartz's failed-after",
        done - started,
        done - failed_after
    );
    assert!(
        done >= failed_after,
        "verify stopped waiting {} ms before Quartz counts doomed-1 failed",
        failed_after - done
    );
    // Watched unchanged for the interval (1 s) + 7.5 s, no less; the drain
    // (40 s) not waited for.
    assert!(
        (8_500..20_000).contains(&(done - started)),
        "verify took {} ms ({} ms past Quartz's failed-after): not the 8.5 s Quartz's rule takes",
        done - started,
        done - failed_after
    );

    let detail = done_detail(&run, VERIFY);
    let ghosts = detail["ghosts"].as_array().unwrap();
    assert_eq!(ghosts.len(), 2, "{detail}");
    for g in ghosts {
        let trigger = g["trigger"].as_str().unwrap();
        assert_eq!(g["database"], "current");
        assert_eq!(g["instance"], "doomed-1");
        assert_eq!(g["job"].as_str(), Some(trigger), "{g}");
        assert_eq!(g["why"]["kind"], "failed", "{g}");
        // The fired time named is the run the job itself logged.
        let logged = runs.iter().find(|r| r.trigger == trigger).unwrap();
        let fired = ms(g["fired"].as_str().unwrap());
        assert!((fired - logged.fired_ms).abs() < 1000, "{g} vs {logged:?}");
    }
    let recoverable = ghosts
        .iter()
        .find(|g| g["trigger"] == "Billing.recoverable-stuck")
        .unwrap();
    assert_eq!(recoverable["requests-recovery"], true);
    // A cutover retires current: its gate stays closed, and so does the
    // recovery group a scheduler there would re-run the job through.
    assert!(
        recoverable["then"]
            .as_str()
            .unwrap()
            .contains("the gates stay closed on current, so that trigger stays paused"),
        "{recoverable}"
    );
    if started < failed_after {
        assert_eq!(
            detail["waited-for"].as_array().unwrap().len(),
            2,
            "while doomed-1's check-in was fresh its runs were waited for: {detail}"
        );
    }
    let report = stdout(&run_reentry(&[&"report", &run]));
    assert!(report.contains("## Quartz runs not waited for"), "{report}");
    assert!(
        report.contains(
            "- quartz-jobs@current: Billing.stuck (job Billing.stuck on doomed-1, fired "
        ),
        "{report}"
    );
    assert!(
        report.contains("is not running: Quartz counts its instance failed: last check-in "),
        "{report}"
    );

    // Nobody ran anything since, and reentry left Quartz's rows as they
    // were: Quartz recovers them, not reentry.
    assert_eq!(quartz::runs(&log).len(), 2, "{:?}", quartz::runs(&log));
    let executing: i64 = cur
        .query_one(
            "SELECT count(*) FROM qrtz_fired_triggers WHERE instance_name = 'doomed-1' AND state = 'EXECUTING'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(executing, 2);
}

/// A restore that caught a job mid-run (a real backup, restore point and
/// PITR): the copy's `FIRED_TRIGGERS` holds the old primary's `EXECUTING`
/// rows, runs that nobody executes there. Verify does not wait for them and
/// names them ghosts of T. When the application's scheduler comes up on the
/// copy (a cutover) with the gate still closed, Quartz recovers the dead
/// instance: the job that requests recovery is re-run through
/// `RECOVERING_JOBS`, which the gate holds, so it runs once, after the
/// re-open; the other job is not re-run at all.
#[test]
fn a_restored_copy_caught_mid_job_has_ghosts_of_t_and_quartz_reruns_the_recoverable_job_once_after_the_reopen(
) {
    let (c, repo) = archiving(Version::V18, "", &[("max_connections", "60")]);
    c.client().batch_execute(&quartz::schema()).unwrap();
    let dir = c.dir("work");
    let prod_log = dir.join("prod.log");
    let mut prod = Scheduler::start_as(
        &jdbc_url(c.port, "postgres"),
        "CaseScheduler",
        "prod-1",
        60_000,
        600_000,
        &prod_log,
    );
    prod.cmd("simple Archive archive 3600000 3600000");
    prod.cmd("simple Billing recoverable-report 3600000");
    prod.cmd("simple Billing plain-report 3600000");
    wait_for_runs(
        &prod_log,
        &["Billing.recoverable-report", "Billing.plain-report"],
    );
    // T falls while both jobs run.
    ok_json(&restored::run(&c, &repo, &["backup"]));
    ok_json(&restored::run(
        &c,
        &repo,
        &["restore-point", "mid_job", "--switch-wal"],
    ));
    switch_and_wait_archived(&c);
    let r = restored::restore(
        &c,
        &repo,
        "restored",
        &[
            "--target-name",
            "mid_job",
            "--action",
            "promote",
            "--listen",
            "127.0.0.1",
        ],
    );
    let executing: i64 = r
        .client()
        .query_one(
            "SELECT count(*) FROM qrtz_fired_triggers WHERE instance_name = 'prod-1' AND state = 'EXECUTING'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(executing, 2, "the copy holds both runs as of T");

    let pb = dir.join("cutover.toml");
    std::fs::write(
        &pb,
        format!(
            r#"[playbook]
name = "quartz-restored"
way-back = "cutover"

[databases.current]
conninfo = "{cur}"

[databases.restored]
conninfo = "{res}"

[recovery-target]
manifest = "{manifest}"

[gates]
cache-ttl = "0s"
drain-timeout = "40s"
reopen-order = ["quartz-jobs"]

[[gates.quartz]]
name = "quartz-jobs"
databases = ["restored"]
scheduler = "CaseScheduler"
groups = ["Billing", "Archive"]

[validation]
invalid-indexes = false
sequences = false
extensions = false
"#,
            cur = c.conninfo(),
            res = r.conninfo(),
            manifest = r.dir.join("reentry-restore.json").display(),
        ),
    )
    .unwrap();
    let run = dir.join("run");
    let out = run_reentry(&[
        &"apply",
        &pb,
        &"--run-dir",
        &run,
        &"--apply",
        &"--until",
        &"settle",
    ]);
    assert!(
        stdout(&out).contains("did not wait for 2 Quartz run(s) no live scheduler runs"),
        "{}",
        stdout(&out)
    );
    assert_exit(&out, 0);
    let took = at(&run, "done", VERIFY) - at(&run, "started", VERIFY);
    assert!(took < 5_000, "verify waited {took} ms for runs nobody runs");
    let detail = done_detail(&run, VERIFY);
    let ghosts = detail["ghosts"].as_array().unwrap();
    assert_eq!(ghosts.len(), 2, "{detail}");
    assert_eq!(
        detail["waited-for"].as_array().unwrap().len(),
        0,
        "{detail}"
    );
    let logged = quartz::runs(&prod_log);
    for g in ghosts {
        assert_eq!(g["database"], "restored");
        assert_eq!(g["instance"], "prod-1");
        assert_eq!(g["why"]["kind"], "fired-before-t", "{g}");
        let run = logged.iter().find(|x| x.trigger == g["trigger"]).unwrap();
        assert!((ms(g["fired"].as_str().unwrap()) - run.fired_ms).abs() < 1000);
    }
    let recoverable = ghosts
        .iter()
        .find(|g| g["trigger"] == "Billing.recoverable-report")
        .unwrap();
    assert_eq!(recoverable["requests-recovery"], true);
    assert!(
        recoverable["then"]
            .as_str()
            .unwrap()
            .contains("so that run comes after the re-open"),
        "{recoverable}"
    );

    // The application comes up on the copy, the gate still closed. Its
    // first check-ins count prod-1 failed and recover it.
    let app_log = dir.join("app.log");
    let port = r.manifest["port"].as_u64().unwrap() as u16;
    let app = Scheduler::start_as(
        &jdbc_url(port, "postgres"),
        "CaseScheduler",
        "app-1",
        60_000,
        20,
        &app_log,
    );
    let mut copy = r.client();
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    loop {
        let left: i64 = copy
            .query_one(
                "SELECT count(*) FROM qrtz_fired_triggers WHERE instance_name = 'prod-1'",
                &[],
            )
            .unwrap()
            .get(0);
        if left == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "Quartz never recovered prod-1 on the copy"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let recovery: Vec<(String, String)> = copy
        .query(
            "SELECT job_group || '.' || job_name, trigger_state FROM qrtz_triggers WHERE trigger_group = 'RECOVERING_JOBS'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|x| (x.get(0), x.get(1)))
        .collect();
    assert_eq!(
        recovery,
        [("Billing.recoverable-report".to_owned(), "PAUSED".to_owned())],
        "Quartz files the re-run in RECOVERING_JOBS, which the gate holds"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        quartz::runs(&app_log).is_empty(),
        "ran while the gate was closed: {:?}",
        quartz::runs(&app_log)
    );

    let out = run_reentry(&[&"apply", &pb, &"--run-dir", &run, &"--apply", &"--resume"]);
    assert_exit(&out, 0);
    let reopened = at(&run, "started", REOPEN);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !quartz::runs(&app_log)
        .iter()
        .any(|x| x.job == "Billing.recoverable-report")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the recoverable job never re-ran after the re-open"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    let runs = app.stop();
    let reruns: Vec<&Run> = runs
        .iter()
        .filter(|x| x.job == "Billing.recoverable-report")
        .collect();
    assert_eq!(reruns.len(), 1, "{runs:?}");
    assert!(
        reruns[0].recovering && reruns[0].group() == "RECOVERING_JOBS",
        "{:?}",
        reruns[0]
    );
    assert!(
        reruns[0].fired_ms > reopened && reruns[0].instance == "app-1",
        "re-run {} ms before the re-open: {:?}",
        reopened - reruns[0].fired_ms,
        reruns[0]
    );
    assert!(
        !runs.iter().any(|x| x.job == "Billing.plain-report"),
        "a job that does not request recovery is not re-run: {runs:?}"
    );

    let report = stdout(&run_reentry(&[&"report", &run]));
    assert!(report.contains("## Quartz runs not waited for"), "{report}");
    assert!(
        report.contains("- quartz-jobs@restored: Billing.plain-report (job Billing.plain-report on prod-1, fired "),
        "{report}"
    );
    assert!(
        report.contains("is not running: a ghost of T: fired before T"),
        "{report}"
    );
    assert!(
        report.contains("Job Billing.recoverable-report requests recovery: Quartz re-runs it once"),
        "{report}"
    );
    assert!(report.contains("also holds RECOVERING_JOBS"), "{report}");
    drop(prod);
}

/// Two gates on one scheduler: `billing-jobs` holds Billing, `archive-jobs`
/// holds Archive, and both hold `RECOVERING_JOBS`, the one group Quartz
/// files every recovery trigger in. A scheduler dies mid-run of an Archive
/// job that requests recovery; the application's scheduler recovers it
/// while the gates are closed. `billing-jobs` re-opens, `archive-jobs` is
/// held by its health check: the Archive job's re-run stays paused (in
/// Quartz's own tables, and not in the run log) until `archive-jobs`
/// re-opens, the last gate on the scheduler, and then runs once.
#[test]
fn one_gates_reopen_leaves_the_recovery_of_another_still_closed_gates_job_paused() {
    let lab = Lab::new();
    let mut res = lab.cluster.db_client("res");
    res.batch_execute(
        "CREATE TABLE archive_hold (reason text);
         INSERT INTO archive_hold VALUES ('archive index rebuilding')",
    )
    .unwrap();
    let doomed_log = lab.dir.join("doomed.log");
    let mut doomed = Scheduler::start_as(
        &jdbc_url(lab.cluster.port, "res"),
        "CaseScheduler",
        "doomed-1",
        60_000,
        600_000,
        &doomed_log,
    );
    doomed.cmd("simple Billing invoice 3600000 3600000");
    doomed.cmd("simple Archive recoverable-export 3600000");
    wait_for_runs(&doomed_log, &["Archive.recoverable-export"]);
    doomed.kill();

    let pb = lab.dir.join("two-gates.toml");
    std::fs::write(
        &pb,
        format!(
            r#"[playbook]
name = "quartz-two-gates"
way-back = "cutover"

[databases.current]
conninfo = "{cur}"

[databases.restored]
conninfo = "{res}"

[recovery-target]
time = "2026-11-25T12:00:00Z"

[gates]
cache-ttl = "0s"
drain-timeout = "40s"
reopen-order = ["billing-jobs", "archive-jobs"]

[[gates.quartz]]
name = "billing-jobs"
databases = ["restored"]
scheduler = "CaseScheduler"
groups = ["Billing"]

[[gates.quartz]]
name = "archive-jobs"
databases = ["restored"]
scheduler = "CaseScheduler"
groups = ["Archive"]
health-check = {{ database = "restored", sql = "SELECT reason FROM archive_hold" }}

[validation]
invalid-indexes = false
sequences = false
extensions = false
"#,
            cur = lab.cluster.db_conninfo("cur"),
            res = lab.cluster.db_conninfo("res"),
        ),
    )
    .unwrap();
    let plan = stdout(&run_reentry(&[&"plan", &pb]));
    assert!(
        plan.contains("Quartz gates `archive-jobs`, `billing-jobs` share a scheduler on restored"),
        "{plan}"
    );
    let run = lab.dir.join("run");
    let out = run_reentry(&[
        &"apply",
        &pb,
        &"--run-dir",
        &run,
        &"--apply",
        &"--until",
        &"settle",
    ]);
    assert_exit(&out, 0);

    // The application's scheduler comes up, the gates closed, and Quartz
    // recovers doomed-1 once it counts it failed.
    let app_log = lab.dir.join("app.log");
    let app = Scheduler::start_as(
        &jdbc_url(lab.cluster.port, "res"),
        "CaseScheduler",
        "app-1",
        60_000,
        20,
        &app_log,
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    let recovery = loop {
        let rows = res
            .query(
                "SELECT trigger_name, trigger_state FROM qrtz_triggers
                  WHERE trigger_group = 'RECOVERING_JOBS' AND job_group = 'Archive'",
                &[],
            )
            .unwrap();
        if let Some(r) = rows.first() {
            break (r.get::<_, String>(0), r.get::<_, String>(1));
        }
        assert!(
            std::time::Instant::now() < deadline,
            "Quartz never recovered doomed-1"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(recovery.1, "PAUSED", "Quartz files it paused: {recovery:?}");

    // billing-jobs re-opens; archive-jobs' health check holds it.
    let out = run_reentry(&[&"apply", &pb, &"--run-dir", &run, &"--apply", &"--resume"]);
    assert_ne!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("health check failed"),
        "{}",
        stdout(&out)
    );
    at(&run, "done", "reopen:billing-jobs@restored");
    assert_eq!(lab.trigger_state("Billing", "invoice"), "WAITING");
    std::thread::sleep(Duration::from_secs(3));
    let state: String = res
        .query_one(
            "SELECT trigger_state FROM qrtz_triggers WHERE trigger_group = 'RECOVERING_JOBS' AND trigger_name = $1",
            &[&recovery.0],
        )
        .unwrap()
        .get(0);
    let paused: Vec<String> = res
        .query(
            "SELECT trigger_group FROM qrtz_paused_trigger_grps WHERE sched_name = 'CaseScheduler' ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let early: Vec<Run> = quartz::runs(&app_log)
        .into_iter()
        .filter(|r| r.job == "Archive.recoverable-export")
        .collect();
    assert!(
        early.is_empty(),
        "the re-run of archive-jobs' job ran while archive-jobs was closed: {early:?}; RECOVERING_JOBS trigger {state}, paused groups {paused:?}"
    );
    assert_eq!(state, "PAUSED");
    assert_eq!(paused, ["Archive", "RECOVERING_JOBS"]);

    // The hold lifts; archive-jobs, the last gate on the scheduler,
    // re-opens and resumes RECOVERING_JOBS: the job re-runs once.
    res.batch_execute("DELETE FROM archive_hold").unwrap();
    let out = run_reentry(&[&"apply", &pb, &"--run-dir", &run, &"--apply", &"--resume"]);
    assert_exit(&out, 0);
    let reopened = at(&run, "started", "reopen:archive-jobs@restored");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !quartz::runs(&app_log)
        .iter()
        .any(|x| x.job == "Archive.recoverable-export")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the recoverable job never re-ran after the last re-open"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    let runs = app.stop();
    let reruns: Vec<&Run> = runs
        .iter()
        .filter(|x| x.job == "Archive.recoverable-export")
        .collect();
    assert_eq!(reruns.len(), 1, "{runs:?}");
    assert!(
        reruns[0].recovering && reruns[0].group() == "RECOVERING_JOBS",
        "{:?}",
        reruns[0]
    );
    assert!(reruns[0].fired_ms > reopened, "{:?}", reruns[0]);
    let left: i64 = res
        .query_one(
            "SELECT count(*) FROM qrtz_paused_trigger_grps WHERE sched_name = 'CaseScheduler'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "every group the run paused is resumed");
}

/// The database's clock two minutes ahead of the application's hosts,
/// without touching any clock: a trigger on `qrtz_scheduler_state` takes
/// two minutes off every check-in the live scheduler writes, so each lands
/// as a JVM two minutes behind would write it. By the database's clock
/// alone the instance is long failed; its check-in still advances every
/// second. Verify waits for its running job, and passes only once Quartz's
/// own `FIRED_TRIGGERS` no longer lists it executing.
#[test]
fn a_live_scheduler_whose_clock_is_behind_the_databases_is_waited_for_because_its_check_in_advances(
) {
    let lab = Lab::new();
    let mut cur = lab.cluster.db_client("cur");
    cur.batch_execute(
        "CREATE FUNCTION jvm_behind() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN NEW.last_checkin_time := NEW.last_checkin_time - 120000; RETURN NEW; END $$;
         CREATE TRIGGER jvm_behind BEFORE INSERT OR UPDATE ON qrtz_scheduler_state
            FOR EACH ROW EXECUTE FUNCTION jvm_behind();",
    )
    .unwrap();
    let log = lab.dir.join("live.log");
    let mut s = Scheduler::start_as(
        &jdbc_url(lab.cluster.port, "cur"),
        "CaseScheduler",
        "lab-1",
        60_000,
        8_000,
        &log,
    );
    s.cmd("simple Archive archive 3600000 3600000");
    s.cmd("simple Billing slow 3600000");
    wait_for_runs(&log, &["Billing.slow"]);
    let behind: i64 = cur
        .query_one(
            "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint
                    - (last_checkin_time + checkin_interval + 7500)
               FROM qrtz_scheduler_state WHERE instance_name = 'lab-1'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        behind > 100_000,
        "the check-in looks failed by the database's clock: {behind}"
    );

    let text = std::fs::read_to_string(lab.playbook("0s", ""))
        .unwrap()
        .replace(
            "cache-ttl = \"0s\"",
            "cache-ttl = \"0s\"\ndrain-timeout = \"40s\"",
        )
        .replace("databases = [\"restored\"]", "databases = [\"current\"]");
    let pb = lab.dir.join("clock.toml");
    std::fs::write(&pb, text).unwrap();
    let run = lab.dir.join("run");
    let out = run_reentry(&[
        &"apply",
        &pb,
        &"--run-dir",
        &run,
        &"--apply",
        &"--until",
        &"settle",
    ]);
    assert_exit(&out, 0);
    // Quartz's own record, read as verify returns: the run is over.
    let executing: Vec<String> = cur
        .query(
            "SELECT trigger_group || '.' || trigger_name FROM qrtz_fired_triggers WHERE state = 'EXECUTING'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let detail = done_detail(&run, VERIFY);
    assert!(
        executing.is_empty(),
        "verify passed while Quartz still runs {executing:?}: {detail}"
    );
    assert!(detail.get("ghosts").is_none(), "{detail}");
    let waited: Vec<&str> = detail["waited-for"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap())
        .collect();
    assert!(
        waited.len() == 1 && waited[0].contains("Billing.slow (job Billing.slow on lab-1"),
        "{detail}"
    );
    let fired = quartz::runs(&log)
        .into_iter()
        .find(|r| r.trigger == "Billing.slow")
        .unwrap()
        .fired_ms;
    assert!(at(&run, "done", VERIFY) >= fired + 8_000, "{detail}");
    drop(s);
}
