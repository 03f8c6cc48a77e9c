//! Rows against real PostgreSQL 18, the restored copy made by a real
//! `reentry restore`: the classic drill (corrupt 100 rows, PITR,
//! stage, repair, an audit row that says 100), a bad migration that
//! dropped a column, a cutover carrying later writes forward, a writer
//! racing the repair, a parent and child under a foreign key, composite
//! keys, exact comparison of awkward types, a run killed inside a batch,
//! and a second apply that changes nothing. Counts come from the
//! databases themselves, not from reentry's word.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use crate::common::archiving::{archiving, switch_and_wait_archived};
use crate::common::pg::{Cluster, Version};
use crate::common::restored::{ok_json, restore, run, Restored};
use crate::common::{assert_exit, reentry_bin, stderr, stdout};
use reentry::reentry::steps::rows::staging;

/// Production with its repository; the schema and rows made by `setup`,
/// a backup, the restore point `before_incident`, then `damage`, archived.
/// The restored copy comes back paused at the point (a hot standby)
/// unless `promote`.
struct Lab {
    c: Cluster,
    r: Restored,
    dir: PathBuf,
}

impl Lab {
    fn new(setup: &str, damage: &str, promote: bool) -> Lab {
        let (c, repo) = archiving(Version::V18, "", &[]);
        c.client()
            .batch_execute(include_str!("../../sql/system_gate.sql"))
            .unwrap();
        c.client()
            .batch_execute(
                "INSERT INTO system_gate (gate_name, enabled) VALUES ('api-writes', true)",
            )
            .unwrap();
        c.client().batch_execute(setup).unwrap();
        ok_json(&run(&c, &repo, &["backup"]));
        ok_json(&run(
            &c,
            &repo,
            &["restore-point", "before_incident", "--switch-wal"],
        ));
        c.client().batch_execute(damage).unwrap();
        switch_and_wait_archived(&c);
        let mut args = vec!["--target-name", "before_incident"];
        if promote {
            args.extend(["--action", "promote"]);
        }
        let r = restore(&c, &repo, "restored", &args);
        let dir = c.dir("work");
        Lab { c, r, dir }
    }

    fn playbook(&self, name: &str, way: &str, repairs: &str) -> PathBuf {
        let text = format!(
            r#"[playbook]
name = "{name}"
way-back = "{way}"
[databases.current]
conninfo = "{current}"
[databases.restored]
conninfo = "{restored}"
[recovery-target]
manifest = "{manifest}"
[gates]
reopen-order = ["api-writes"]
[[gates.system-gate]]
name = "api-writes"
databases = ["{gated}"]
{repairs}
"#,
            current = self.c.conninfo(),
            restored = self.r.conninfo(),
            manifest = self.r.dir.join("reentry-restore.json").display(),
            // The retired side is not written to: a paused hot standby
            // could not take it.
            gated = if way == "cutover" {
                "restored"
            } else {
                "current"
            },
        );
        let path = self.dir.join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn current(&self) -> postgres::Client {
        self.c.client()
    }

    fn restored(&self) -> postgres::Client {
        self.r.client()
    }

    fn apply(&self, pb: &Path, run: &str, extra: &[&str]) -> Output {
        Command::new(reentry_bin())
            .arg("apply")
            .arg(pb)
            .arg("--run-dir")
            .arg(self.dir.join(run))
            .arg("--apply")
            .args(extra)
            .output()
            .unwrap()
    }
}

impl Lab {
    /// An apply that stops dead at `point` (the test hook), once it says
    /// so; the caller kills it.
    #[track_caller]
    fn paused_at(&self, pb: &Path, run: &str, point: &str) -> std::process::Child {
        use std::io::BufRead;
        let mut child = Command::new(reentry_bin())
            .arg("apply")
            .arg(pb)
            .arg("--run-dir")
            .arg(self.dir.join(run))
            .arg("--apply")
            .env("REENTRY_PAUSE_AT", point)
            .env("REENTRY_TEST_HOOKS", "hang-at-pause-points")
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let paused = std::io::BufReader::new(child.stderr.take().unwrap())
            .lines()
            .any(|l| l.unwrap().contains("paused at"));
        assert!(paused, "the run never reached {point}");
        child
    }
}

fn diff_json(pb: &Path) -> (Output, Value) {
    let out = Command::new(reentry_bin())
        .args(["--json", "rows", "diff"])
        .arg(pb)
        .output()
        .unwrap();
    let v = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}{}", stdout(&out), stderr(&out)));
    (out, v)
}

fn one_i64(c: &mut postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).unwrap().get(0)
}

const ACCOUNTS: &str = "CREATE TABLE accounts (id bigint PRIMARY KEY, owner text NOT NULL,
        balance numeric(12,2) NOT NULL, updated_at timestamptz NOT NULL DEFAULT now());
    INSERT INTO accounts SELECT g, 'owner ' || g, g * 10.5, '2026-11-01 00:00:00+00' FROM generate_series(1, 1000) g;";

/// The classic drill: a bad job zeroes 100 balances after T;
/// one legitimate write after T touches an account outside the damage.
#[test]
fn task_4_corrupt_100_rows_pitr_stage_repair_and_an_audit_row_says_100() {
    let lab = Lab::new(
        ACCOUNTS,
        "UPDATE accounts SET balance = 0 WHERE id <= 100;
         UPDATE accounts SET owner = 'moved', updated_at = now() WHERE id = 500;",
        false,
    );
    let in_recovery: bool = lab
        .restored()
        .query_one("SELECT pg_is_in_recovery()", &[])
        .unwrap()
        .get(0);
    assert!(in_recovery, "the restored copy is a paused hot standby");
    let pb = lab.playbook(
        "task4",
        "selective-repair",
        "[[repair]]\ntable = \"accounts\"\nupdated-at = \"updated_at\"\n",
    );

    let (out, v) = diff_json(&pb);
    assert_exit(&out, 1);
    assert_eq!(v[0]["counts"]["update"], 100, "{v}");
    assert_eq!(v[0]["counts"]["conflict"], 1, "{v}");
    assert_eq!(v[0]["sample"]["conflict"][0][0], "500", "{v}");
    assert_eq!(v[0]["stats"]["source-rows"], 1000, "{v}");

    let out = lab.apply(&pb, "run1", &[]);
    assert_exit(&out, 0);
    let mut cur = lab.current();
    assert_eq!(
        one_i64(&mut cur, "SELECT count(*) FROM accounts WHERE balance = 0"),
        0,
        "every zeroed balance is back"
    );
    assert_eq!(
        one_i64(
            &mut cur,
            "SELECT count(*) FROM accounts WHERE id <= 100 AND balance = id * 10.5"
        ),
        100
    );
    let owner: String = cur
        .query_one("SELECT owner FROM accounts WHERE id = 500", &[])
        .unwrap()
        .get(0);
    assert_eq!(owner, "moved", "a write after T is not clobbered");
    let audit: Vec<(String, i64)> = cur
        .query(
            "SELECT class, row_count FROM reentry_repair.repair_audit_log WHERE table_name = 'accounts'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(audit, [("update".to_owned(), 100)]);
    let conflict: String = cur
        .query_one(
            &format!(
                "SELECT \"reentry$status\" FROM {} WHERE id = 500",
                staging("accounts")
            ),
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        conflict, "review",
        "left for a person, in the staging table"
    );
    // Every key the diff found is recorded as changed around T.
    let changed =
        std::fs::read_to_string(lab.dir.join("run1").join("changed-entities.jsonl")).unwrap();
    assert_eq!(changed.lines().count(), 101, "{changed}");
    assert!(
        changed.contains(r#"{"table":"accounts","key":["500"],"class":"update","by":"rows"}"#),
        "{changed}"
    );
    // The report shows the table's counts and its audit rows.
    let report = Command::new(reentry_bin())
        .arg("report")
        .arg(lab.dir.join("run1"))
        .output()
        .unwrap();
    assert_exit(&report, 0);
    let md = stdout(&report);
    assert!(md.contains("## Rows staged"), "{md}");
    assert!(
        md.contains("| accounts | restored → current | 1000 | 0 | 100 | 0 | 1 |"),
        "{md}"
    );
    assert!(
        md.contains("| accounts | current | 100 | 0 | 1 | 0 | 0 | 1 |"),
        "{md}"
    );
    assert!(md.contains("- accounts: update 100 row(s) at "), "{md}");

    // Again: nothing left to do but the conflict, and nothing changes.
    let before = one_i64(
        &mut cur,
        "SELECT count(*) FROM reentry_repair.repair_audit_log",
    );
    let sum_before: String = cur
        .query_one(
            "SELECT md5(string_agg(a::text, '' ORDER BY id)) FROM accounts a",
            &[],
        )
        .unwrap()
        .get(0);
    let out = lab.apply(&pb, "run2", &[]);
    assert_exit(&out, 0);
    assert_eq!(
        one_i64(
            &mut cur,
            "SELECT count(*) FROM reentry_repair.repair_audit_log"
        ),
        before
    );
    let sum_after: String = cur
        .query_one(
            "SELECT md5(string_agg(a::text, '' ORDER BY id)) FROM accounts a",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(sum_before, sum_after, "a second apply changes nothing");
    let (_, v) = diff_json(&pb);
    assert_eq!(v[0]["counts"], serde_json::json!({"conflict": 1}), "{v}");
}

/// A bad migration: a column dropped on current after T.
/// Every row's lost values are staged; none can be applied while the
/// column is missing; once it is back, a new run applies them.
#[test]
fn a_dropped_column_is_staged_not_applied_and_applied_once_it_exists_again() {
    let lab = Lab::new(
        ACCOUNTS,
        "ALTER TABLE accounts DROP COLUMN owner; UPDATE accounts SET balance = 0 WHERE id <= 10;",
        false,
    );
    let pb = lab.playbook(
        "migration",
        "selective-repair",
        "[[repair]]\ntable = \"accounts\"\n",
    );
    let (out, v) = diff_json(&pb);
    assert_exit(&out, 1);
    assert_eq!(v[0]["source-only"], serde_json::json!(["owner"]), "{v}");
    assert_eq!(
        v[0]["counts"]["update"], 1000,
        "every row's owner is lost: {v}"
    );
    assert!(stdout(
        &Command::new(reentry_bin())
            .args(["rows", "diff"])
            .arg(&pb)
            .output()
            .unwrap()
    )
    .contains("column(s) missing on current: owner (staged, not applied)"));

    let out = lab.apply(&pb, "run1", &[]);
    assert_exit(&out, 0);
    let text = stdout(&out) + &stderr(&out);
    let mut cur = lab.current();
    assert_eq!(
        one_i64(&mut cur, "SELECT count(*) FROM accounts WHERE balance = 0"),
        0,
        "the balances are repaired"
    );
    assert_eq!(
        one_i64(&mut cur, &format!("SELECT count(*) FROM {} WHERE owner IS NOT NULL AND \"reentry$status\" = 'not-applied'", staging("accounts"))),
        990,
        "the lost owners are kept in staging: {text}"
    );
    let note: String = cur
        .query_one(
            &format!(
                "SELECT DISTINCT \"reentry$note\" FROM {} WHERE \"reentry$status\" = 'not-applied'",
                staging("accounts")
            ),
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(note, "staged, not applied: column missing on target: owner");

    cur.batch_execute("ALTER TABLE accounts ADD COLUMN owner text")
        .unwrap();
    let out = lab.apply(&pb, "run2", &[]);
    assert_exit(&out, 0);
    assert_eq!(
        one_i64(
            &mut cur,
            "SELECT count(*) FROM accounts WHERE owner = 'owner ' || id"
        ),
        1000,
        "every owner is back once the column is"
    );
}

/// A cutover: the restored copy (promoted) takes traffic, and the writes
/// made on current after T are carried to it first.
#[test]
fn a_cutover_carries_the_writes_made_after_t_forward() {
    let lab = Lab::new(
        &format!(
            "{ACCOUNTS}
             CREATE TABLE notes (id bigserial PRIMARY KEY, body text, updated_at timestamptz NOT NULL DEFAULT now());
             INSERT INTO notes (body) SELECT 'note ' || g FROM generate_series(1, 20) g;"
        ),
        "UPDATE accounts SET balance = balance + 1, updated_at = now() WHERE id IN (7, 8, 9);
         INSERT INTO accounts VALUES (1001, 'new', 1, now()), (1002, 'new', 2, now());
         UPDATE accounts SET balance = -1 WHERE id = 20;
         INSERT INTO notes (body) SELECT 'later ' || g FROM generate_series(1, 5) g;",
        true,
    );
    let pb = lab.playbook(
        "cutover",
        "cutover",
        "[[repair]]\ntable = \"accounts\"\nupdated-at = \"updated_at\"\n\n[[repair]]\ntable = \"notes\"\nupdated-at = \"updated_at\"\n",
    );
    let (out, v) = diff_json(&pb);
    assert_exit(&out, 1);
    assert_eq!(v[0]["source"], "current");
    assert_eq!(v[0]["target"], "restored");
    assert_eq!(
        v[0]["counts"],
        serde_json::json!({"insert": 2, "update": 3}),
        "{v}"
    );
    let out = lab.apply(&pb, "run1", &[]);
    assert_exit(&out, 0);
    let mut res = lab.restored();
    assert_eq!(
        one_i64(&mut res, "SELECT count(*) FROM accounts WHERE id > 1000"),
        2
    );
    assert_eq!(
        one_i64(
            &mut res,
            "SELECT sum(balance - id * 10.5)::bigint FROM accounts WHERE id IN (7, 8, 9)"
        ),
        3
    );
    assert_eq!(
        one_i64(
            &mut res,
            "SELECT balance::bigint FROM accounts WHERE id = 20"
        ),
        210,
        "a change on current without a newer updated_at is not carried"
    );
    let carried: String = res
        .query_one("SELECT updated_at::text FROM accounts WHERE id = 1001", &[])
        .unwrap()
        .get(0);
    let on_current: String = lab
        .current()
        .query_one("SELECT updated_at::text FROM accounts WHERE id = 1001", &[])
        .unwrap()
        .get(0);
    assert_eq!(carried, on_current, "a carried row keeps its own time");
    // The restored copy's sequence was behind the carried ids: the
    // validation step, after the repair, advanced it.
    assert_eq!(one_i64(&mut res, "SELECT max(id) FROM notes"), 25);
    let next = one_i64(&mut res, "SELECT nextval('notes_id_seq')");
    assert!(next > 25, "the next note would collide: {next}");
    let (out, v) = diff_json(&pb);
    assert_exit(&out, 0);
    assert_eq!(v[0]["counts"], serde_json::json!({}));
    assert_eq!(v[1]["counts"], serde_json::json!({}));
}

/// A writer changes 10 staged rows on the target between the stage and
/// the apply: those 10 are conflicts, not overwritten. The run is killed
/// while paused there and resumed.
#[test]
fn rows_changed_between_stage_and_apply_are_conflicts_not_overwritten() {
    let lab = Lab::new(
        ACCOUNTS,
        "UPDATE accounts SET balance = 0 WHERE id <= 100;",
        false,
    );
    let pb = lab.playbook(
        "race",
        "selective-repair",
        "[[repair]]\ntable = \"accounts\"\nupdated-at = \"updated_at\"\n",
    );
    let mut child = lab.paused_at(&pb, "run", "rows-apply:accounts:started");
    lab.current()
        .batch_execute("UPDATE accounts SET balance = 99 WHERE id BETWEEN 41 AND 50")
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let out = lab.apply(&pb, "run", &["--resume"]);
    assert_exit(&out, 0);
    let mut cur = lab.current();
    assert_eq!(
        one_i64(&mut cur, "SELECT count(*) FROM accounts WHERE balance = 99"),
        10,
        "the racing writes stand"
    );
    assert_eq!(
        one_i64(
            &mut cur,
            "SELECT count(*) FROM accounts WHERE id <= 100 AND balance = id * 10.5"
        ),
        90
    );
    assert_eq!(
        one_i64(
            &mut cur,
            &format!(
                "SELECT count(*) FROM {} WHERE \"reentry$status\" = 'conflict'",
                staging("accounts")
            )
        ),
        10
    );
    assert_eq!(
        one_i64(
            &mut cur,
            "SELECT sum(row_count)::bigint FROM reentry_repair.repair_audit_log"
        ),
        90
    );
    let summary = stdout(&out);
    assert!(
        summary.contains("10 changed on the target since the diff, not overwritten"),
        "{summary}"
    );
}

/// Killed inside a batch (after its writes, before its commit): the
/// resumed run applies every row once.
#[test]
fn a_run_killed_inside_a_batch_resumes_and_applies_each_row_once() {
    let lab = Lab::new(
        ACCOUNTS,
        "UPDATE accounts SET balance = 0 WHERE id <= 100;",
        false,
    );
    let pb = lab.playbook(
        "killed",
        "selective-repair",
        "[[repair]]\ntable = \"accounts\"\nbatch-size = 10\n",
    );
    let mut child = lab.paused_at(&pb, "run", "rows-apply:accounts:batch");
    // Inside the batch: its writes are not visible.
    assert_eq!(
        one_i64(
            &mut lab.current(),
            "SELECT count(*) FROM accounts WHERE balance = 0"
        ),
        100
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let out = lab.apply(&pb, "run", &["--resume"]);
    assert_exit(&out, 0);
    let mut cur = lab.current();
    assert_eq!(
        one_i64(&mut cur, "SELECT count(*) FROM accounts WHERE balance = 0"),
        0
    );
    let audit: Vec<i64> = cur
        .query(
            "SELECT row_count FROM reentry_repair.repair_audit_log ORDER BY executed_at",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(audit, vec![10; 10], "ten batches of ten, none twice");
}

/// A parent and its child under a foreign key, both deleted on current
/// after T: inserts go parents first. Listed children first, the playbook
/// is refused at the child's line.
#[test]
fn parents_are_repaired_before_children_and_a_child_listed_first_is_refused() {
    let lab = Lab::new(
        "CREATE TABLE owners (id int PRIMARY KEY, name text);
         CREATE TABLE cars (id int PRIMARY KEY, owner_id int NOT NULL REFERENCES owners (id), plate text);
         INSERT INTO owners SELECT g, 'o' || g FROM generate_series(1, 20) g;
         INSERT INTO cars SELECT g, g, 'P-' || g FROM generate_series(1, 20) g;",
        "DELETE FROM cars WHERE owner_id <= 5; DELETE FROM owners WHERE id <= 5;",
        true,
    );
    let wrong = lab.playbook(
        "fk-wrong",
        "selective-repair",
        "[[repair]]\ntable = \"cars\"\n\n[[repair]]\ntable = \"owners\"\n",
    );
    let out = Command::new(reentry_bin())
        .args(["playbook", "check"])
        .arg(&wrong)
        .output()
        .unwrap();
    assert_exit(&out, 78);
    let err = stderr(&out);
    assert!(
        err.contains("`cars` references `owners`, which is listed after it"),
        "{err}"
    );
    assert!(
        err.contains("fk-wrong.toml:16:"),
        "located at the child's table: {err}"
    );

    let pb = lab.playbook(
        "fk",
        "selective-repair",
        "[[repair]]\ntable = \"owners\"\n\n[[repair]]\ntable = \"cars\"\n",
    );
    let out = lab.apply(&pb, "run", &[]);
    assert_exit(&out, 0);
    let mut cur = lab.current();
    assert_eq!(one_i64(&mut cur, "SELECT count(*) FROM owners"), 20);
    assert_eq!(one_i64(&mut cur, "SELECT count(*) FROM cars"), 20);
}

/// A composite key, text first, and values PostgreSQL prints in ways that
/// are easy to confuse: each damaged row found, the rest left alone, and
/// every value back exactly.
#[test]
fn composite_keys_and_awkward_types_compare_exactly() {
    let lab = Lab::new(
        "CREATE TABLE things (tenant text, id int, n numeric, j jsonb, b bytea, a int[], ts timestamptz,
                              t text, z text, PRIMARY KEY (tenant, id));
         INSERT INTO things SELECT 'T' || (g % 3), g, 1.0, '{\"a\": 1}', '\\x00', '{1,2}',
                                   '2026-11-01 10:00:00.123456+00', 'a', '' FROM generate_series(1, 30) g;",
        "UPDATE things SET n = 1.00 WHERE id = 1;
         UPDATE things SET j = '{\"a\": 1.0}' WHERE id = 2;
         UPDATE things SET b = '\\x0000' WHERE id = 3;
         UPDATE things SET a = '{1,2,NULL}' WHERE id = 4;
         UPDATE things SET ts = ts + interval '1 microsecond' WHERE id = 5;
         UPDATE things SET t = 'A' WHERE id = 6;
         UPDATE things SET z = NULL WHERE id = 7;
         UPDATE things SET t = 'a ' WHERE id = 8;
         INSERT INTO things VALUES ('t0', 100, 1, '{}', '', '{}', now(), 'x', 'x');",
        false,
    );
    let pb = lab.playbook(
        "types",
        "selective-repair",
        "[[repair]]\ntable = \"things\"\nallow-delete = true\n",
    );
    let (out, v) = diff_json(&pb);
    assert_exit(&out, 1);
    assert_eq!(
        v[0]["counts"],
        serde_json::json!({"update": 8, "delete": 1}),
        "{v}"
    );
    assert_eq!(v[0]["stats"]["mode"], "segments (key hashes)", "{v}");
    let out = lab.apply(&pb, "run", &[]);
    assert_exit(&out, 0);
    let dump = |c: &mut postgres::Client| -> String {
        c.query_one(
            "SELECT string_agg(ROW(t.*)::text, E'\\n' ORDER BY tenant COLLATE \"C\", id) FROM things t",
            &[],
        )
        .unwrap()
        .get(0)
    };
    assert_eq!(dump(&mut lab.current()), dump(&mut lab.restored()));
    let (out, v) = diff_json(&pb);
    assert_eq!(v[0]["counts"], serde_json::json!({}), "{v}");
    assert_exit(&out, 0);
}

/// The damage's scope: `ids` (keys from current, where the damage shows)
/// and `where` (on the restored side). Rows outside it are not compared,
/// and with triggers disabled the table's own trigger does not fire.
#[test]
fn a_scope_by_ids_or_where_compares_only_its_rows_and_triggers_can_be_disabled() {
    let lab = Lab::new(
        &format!(
            "{ACCOUNTS}
             CREATE TABLE touched (id bigint);
             CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN INSERT INTO touched VALUES (NEW.id); RETURN NEW; END $$;
             CREATE TRIGGER touch AFTER UPDATE ON accounts FOR EACH ROW EXECUTE FUNCTION touch();"
        ),
        "UPDATE accounts SET balance = 0 WHERE id <= 100;
         UPDATE accounts SET owner = 'elsewhere' WHERE id BETWEEN 901 AND 910;
         DELETE FROM touched;",
        false,
    );
    let ids = lab.playbook(
        "ids",
        "selective-repair",
        "[[repair]]\ntable = \"accounts\"\nids = \"SELECT id FROM accounts WHERE balance = 0\"\ntriggers = \"disable\"\n",
    );
    let (out, v) = diff_json(&ids);
    assert_exit(&out, 1);
    assert_eq!(v[0]["counts"], serde_json::json!({"update": 100}), "{v}");
    assert_eq!(v[0]["stats"]["mode"], "keys");
    assert_eq!(v[0]["stats"]["source-rows"], 100, "{v}");
    let plan = Command::new(reentry_bin())
        .arg("plan")
        .arg(&ids)
        .output()
        .unwrap();
    assert!(
        stdout(&plan).contains("triggers disabled (session_replication_role = replica)"),
        "{}",
        stdout(&plan)
    );
    let out = lab.apply(&ids, "run", &[]);
    assert_exit(&out, 0);
    let mut cur = lab.current();
    assert_eq!(
        one_i64(&mut cur, "SELECT count(*) FROM accounts WHERE balance = 0"),
        0
    );
    assert_eq!(
        one_i64(
            &mut cur,
            "SELECT count(*) FROM accounts WHERE owner = 'elsewhere'"
        ),
        10,
        "outside the scope: left alone"
    );
    assert_eq!(
        one_i64(&mut cur, "SELECT count(*) FROM touched"),
        0,
        "the repair's writes did not fire the table's trigger"
    );

    let scoped = lab.playbook(
        "where",
        "selective-repair",
        "[[repair]]\ntable = \"accounts\"\nwhere = \"id BETWEEN 901 AND 905\"\n",
    );
    let (out, v) = diff_json(&scoped);
    assert_exit(&out, 1);
    assert_eq!(v[0]["counts"], serde_json::json!({"update": 5}), "{v}");
    // The trigger's function names `touched` without its schema: under
    // reentry's pinned search path it finds nothing. The plan says so
    // first, and the batch stops, rolled back, naming the function and
    // what to do.
    let plan = Command::new(reentry_bin())
        .arg("plan")
        .arg(&scoped)
        .output()
        .unwrap();
    assert!(
        stdout(&plan).contains(
            "its triggers run under reentry's search path (pg_catalog, pg_temp), and public.touch() has no path of its own"
        ),
        "{}",
        stdout(&plan)
    );
    let out = lab.apply(&scoped, "run2", &[]);
    assert_exit(&out, 2);
    assert!(
        stdout(&out).contains("relation \"touched\" does not exist")
            && stdout(&out).contains("in PL/pgSQL function public.touch() line 2 at SQL statement, which ran under reentry's search path (pg_catalog, pg_temp)")
            && stdout(&out).contains("ALTER FUNCTION … SET search_path = …"),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        one_i64(
            &mut cur,
            "SELECT count(*) FROM accounts WHERE owner = 'elsewhere'"
        ),
        10
    );
    cur.batch_execute("ALTER FUNCTION touch() SET search_path = public")
        .unwrap();
    let plan = Command::new(reentry_bin())
        .arg("plan")
        .arg(&scoped)
        .output()
        .unwrap();
    assert!(
        !stdout(&plan).contains("no path of its own"),
        "{}",
        stdout(&plan)
    );
    let out = lab.apply(&scoped, "run2", &["--resume"]);
    assert_exit(&out, 0);
    assert_eq!(
        one_i64(
            &mut cur,
            "SELECT count(*) FROM accounts WHERE owner = 'elsewhere'"
        ),
        5
    );
    assert_eq!(
        one_i64(&mut cur, "SELECT count(*) FROM touched"),
        5,
        "triggers are kept by default"
    );
}

/// Key text is application data. With `standard_conforming_strings = off`
/// (legacy applications still set it), a key ending in `\` would escape
/// the closing quote of a spliced literal and make the next key SQL that
/// runs in the stage's read-write transaction. Here that next key would
/// advance the sequence `injected`; both keys are only keys: found,
/// repaired, and nothing else runs.
#[test]
fn keys_that_look_like_sql_are_keys_whatever_standard_conforming_strings_says() {
    const BACKSLASH: &str = r"!\";
    const CRAFTED: &str = "), (nextval($$injected$$)::text)) AS v(v0)) --";
    let lab = Lab::new(
        &format!(
            "ALTER DATABASE postgres SET standard_conforming_strings = off;
             CREATE SEQUENCE injected;
             CREATE TABLE items (id text PRIMARY KEY, v int NOT NULL);
             INSERT INTO items VALUES ($k${BACKSLASH}$k$, 1), ($k${CRAFTED}$k$, 2), ('plain', 3);"
        ),
        "UPDATE items SET v = 0;",
        false,
    );
    let mut cur = lab.current();
    let scs: String = cur
        .query_one("SHOW standard_conforming_strings", &[])
        .unwrap()
        .get(0);
    assert_eq!(scs, "off", "the database's own setting");
    let pb = lab.playbook("scs", "selective-repair", "[[repair]]\ntable = \"items\"\n");
    let (out, v) = diff_json(&pb);
    assert_exit(&out, 1);
    assert_eq!(v[0]["counts"], serde_json::json!({"update": 3}), "{v}");

    let out = lab.apply(&pb, "run", &[]);
    // First what the database says: a sequence is advanced even by a
    // transaction that rolled back.
    let called: bool = cur
        .query_one("SELECT is_called FROM injected", &[])
        .unwrap()
        .get(0);
    assert!(!called, "a key ran as SQL: {}", stderr(&out));
    assert_exit(&out, 0);
    let rows: Vec<(String, i32)> = cur
        .query("SELECT id, v FROM items ORDER BY v", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        rows,
        [
            (BACKSLASH.to_owned(), 1),
            (CRAFTED.to_owned(), 2),
            ("plain".to_owned(), 3)
        ],
        "every row repaired by its own key"
    );
    let staged: Vec<String> = cur
        .query(
            &format!(
                "SELECT id FROM {} ORDER BY id COLLATE \"C\"",
                staging("items")
            ),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(staged, [BACKSLASH, CRAFTED, "plain"]);
}

/// Two databases of one cluster as current (`cur`) and restored (`res`),
/// with no restore between them: for what needs only their rows. A
/// selective repair takes rows from `res` to `cur`.
struct Pair {
    c: Cluster,
    dir: PathBuf,
}

impl Pair {
    /// `both` runs on each database, then `res` and `cur` on theirs.
    fn new(both: &str, res: &str, cur: &str) -> Pair {
        let mut c = Cluster::init(Version::V18);
        c.start();
        for db in ["cur", "res"] {
            c.client()
                .batch_execute(&format!("CREATE DATABASE {db}"))
                .unwrap();
            let mut d = c.db_client(db);
            d.batch_execute(include_str!("../../sql/system_gate.sql"))
                .unwrap();
            d.batch_execute(
                "INSERT INTO system_gate (gate_name, enabled) VALUES ('api-writes', true)",
            )
            .unwrap();
            d.batch_execute(both).unwrap();
        }
        c.db_client("res").batch_execute(res).unwrap();
        c.db_client("cur").batch_execute(cur).unwrap();
        let dir = c.dir("work");
        Pair { c, dir }
    }

    fn client(&self, db: &str) -> postgres::Client {
        self.c.db_client(db)
    }

    /// A selective repair, reentry connecting as `user`.
    fn playbook(&self, name: &str, user: &str, repairs: &str) -> PathBuf {
        let conn = |db: &str| {
            format!(
                "host=127.0.0.1 port={} user={user} dbname={db}",
                self.c.port
            )
        };
        let text = format!(
            r#"[playbook]
name = "{name}"
way-back = "selective-repair"
[databases.current]
conninfo = "{cur}"
[databases.restored]
conninfo = "{res}"
[recovery-target]
time = "2026-11-25T12:00:00Z"
[gates]
reopen-order = ["api-writes"]
[[gates.system-gate]]
name = "api-writes"
databases = ["current"]
{repairs}
"#,
            cur = conn("cur"),
            res = conn("res"),
        );
        let path = self.dir.join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn apply(&self, pb: &Path, run: &str) -> Output {
        Command::new(reentry_bin())
            .arg("apply")
            .arg(pb)
            .arg("--run-dir")
            .arg(self.dir.join(run))
            .arg("--apply")
            .output()
            .unwrap()
    }

    /// Each row of `sql` on `db`, its columns as text joined by `|`.
    fn rows(&self, db: &str, sql: &str) -> Vec<String> {
        self.client(db)
            .query(sql, &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }
}

/// Review M12: the staging table's own columns were `_run_id`, `_status`,
/// … and the apply wrote only the staged columns not starting with `_`.
/// An application's `_tenant` was never written, and its `_status` was
/// the bookkeeping column itself.
#[test]
fn columns_starting_with_an_underscore_are_repaired_and_none_collides_with_reentrys_own() {
    let p = Pair::new(
        "CREATE TABLE ledger (id bigint PRIMARY KEY, _tenant int, _status text, amount numeric(12,2) NOT NULL);",
        "INSERT INTO ledger SELECT g, g * 10, CASE WHEN g % 2 = 0 THEN 'open' ELSE 'closed' END, g * 1.5
           FROM generate_series(1, 10) g;",
        // Damage: five rows lost, five with the wrong tenant and status.
        "INSERT INTO ledger SELECT g, 0, 'damaged', g * 1.5 FROM generate_series(1, 5) g;",
    );
    let pb = p.playbook("underscore", "postgres", "[[repair]]\ntable = \"ledger\"\n");
    let out = p.apply(&pb, "run");
    assert_exit(&out, 0);
    let want = p.rows(
        "res",
        "SELECT concat_ws('|', id, _tenant, _status, amount) FROM ledger ORDER BY id",
    );
    assert_eq!(want.len(), 10);
    assert_eq!(want[0], "1|10|closed|1.50");
    assert_eq!(
        p.rows(
            "cur",
            "SELECT concat_ws('|', id, _tenant, _status, amount) FROM ledger ORDER BY id"
        ),
        want,
        "inserted and updated rows carry the source's _tenant and _status: {}",
        stdout(&out)
    );
}

/// Review L12: the staging table was `reentry_repair."<table as the
/// playbook names it>"`; PostgreSQL keeps 63 bytes of a name, so two
/// long names alike in those shared one table.
#[test]
fn two_tables_whose_names_share_a_60_byte_prefix_are_staged_apart() {
    let common = "t".repeat(60);
    let (a, b) = (format!("{common}_ab"), format!("{common}_cd"));
    let p = Pair::new(
        &format!(
            "CREATE TABLE {a} (id int PRIMARY KEY, v text);
             CREATE TABLE {b} (id int PRIMARY KEY, w int, x text);"
        ),
        &format!(
            "INSERT INTO {a} SELECT g, 'a' || g FROM generate_series(1, 20) g;
             INSERT INTO {b} SELECT g, g * 7, 'b' || g FROM generate_series(1, 30) g;"
        ),
        &format!(
            "INSERT INTO {a} SELECT g, 'wrong' FROM generate_series(1, 10) g;
             INSERT INTO {b} SELECT g, 0, 'wrong' FROM generate_series(1, 10) g;"
        ),
    );
    // Schema-qualified, as a playbook may name them: 70 bytes each.
    let pb = p.playbook(
        "long",
        "postgres",
        &format!("[[repair]]\ntable = \"public.{a}\"\n\n[[repair]]\ntable = \"public.{b}\"\n"),
    );
    let out = p.apply(&pb, "run");
    assert_exit(&out, 0);
    for (t, cols) in [(&a, "id, v"), (&b, "id, w, x")] {
        let sql = format!("SELECT concat_ws('|', {cols}) FROM {t} ORDER BY id");
        assert_eq!(
            p.rows("cur", &sql),
            p.rows("res", &sql),
            "{t}: {}",
            stdout(&out)
        );
    }
    let staging: Vec<String> = p.rows(
        "cur",
        "SELECT relname::text FROM pg_class WHERE relnamespace = 'reentry_repair'::regnamespace
            AND relkind = 'r' AND relname NOT IN ('repair_audit_log', 'stage') ORDER BY 1",
    );
    assert_eq!(staging.len(), 2, "{staging:?}");
}

/// Review M11: a chunk of 2000 whole source rows was read into memory
/// before it was staged; with rows of megabytes that is gigabytes.
#[test]
fn rows_of_megabytes_are_streamed_into_staging_and_memory_stays_bounded() {
    // 200 rows of 4 MiB of jsonb each: 800 MiB to stage.
    let p = Pair::new(
        "CREATE TABLE docs (id int PRIMARY KEY, body jsonb NOT NULL);",
        "INSERT INTO docs SELECT g, jsonb_build_object('v', repeat(md5(g::text), 131072))
           FROM generate_series(1, 200) g;",
        "",
    );
    let pb = p.playbook("wide", "postgres", "[[repair]]\ntable = \"docs\"\n");
    let rss = p.dir.join("rss");
    let out = Command::new("/usr/bin/time")
        .arg("-f")
        .arg("%M")
        .arg("-o")
        .arg(&rss)
        .arg(reentry_bin())
        .arg("apply")
        .arg(&pb)
        .arg("--run-dir")
        .arg(p.dir.join("run"))
        .arg("--apply")
        .output()
        .unwrap();
    assert_exit(&out, 0);
    let sql = "SELECT id || '|' || md5(body::text) FROM docs ORDER BY id";
    let repaired = p.rows("cur", sql);
    assert_eq!(repaired.len(), 200);
    assert_eq!(repaired, p.rows("res", sql));
    // Peak resident memory of reentry, in KiB, as the kernel counted it.
    let kib: u64 = std::fs::read_to_string(&rss)
        .unwrap()
        .trim()
        .lines()
        .last()
        .unwrap()
        .parse()
        .unwrap();
    eprintln!("reentry's peak RSS: {} MiB", kib / 1024);
    assert!(
        kib < 256 * 1024,
        "reentry's peak RSS was {} MiB staging 800 MiB of rows",
        kib / 1024
    );
}

/// Review M11: a table never analysed has `reltuples = -1`; the diff took
/// it for one row and made the whole table one segment, read whole into
/// memory on both sides.
#[test]
fn a_table_never_analysed_is_diffed_in_many_segments_and_exactly() {
    let create = "CREATE TABLE big WITH (autovacuum_enabled = false) AS
                    SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 200000) g;";
    let p = Pair::new(
        create,
        "",
        // On current: 200 rows changed, 40 lost, 10 extra.
        "UPDATE big SET v = 'changed' WHERE id % 1000 = 0;
         DELETE FROM big WHERE id % 5000 = 1;
         INSERT INTO big SELECT g, 'extra' FROM generate_series(200001, 200010) g;",
    );
    for db in ["cur", "res"] {
        let never: Vec<String> = p.rows(
            db,
            "SELECT reltuples::text FROM pg_class WHERE oid = 'big'::regclass",
        );
        assert_eq!(never, ["-1"], "{db}: the table was never analysed");
    }
    let pb = p.playbook(
        "big",
        "postgres",
        "[[repair]]\ntable = \"big\"\nkey = [\"id\"]\n",
    );
    let (out, v) = diff_json(&pb);
    assert_exit(&out, 1);
    let segments = v[0]["stats"]["segments"].as_u64().unwrap();
    assert!(segments >= 100, "{segments} segment(s): {v}");
    // What was planted, as both databases say.
    let read = |db: &str| -> std::collections::BTreeMap<i32, String> {
        p.client(db)
            .query("SELECT id, v FROM big", &[])
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    };
    let (res, cur) = (read("res"), read("cur"));
    let inserts = res.keys().filter(|k| !cur.contains_key(k)).count() as u64;
    let deletes = cur.keys().filter(|k| !res.contains_key(k)).count() as u64;
    let updates = res
        .iter()
        .filter(|(k, v)| cur.get(k).is_some_and(|c| c != *v))
        .count() as u64;
    assert_eq!((inserts, updates, deletes), (40, 200, 10));
    assert_eq!(v[0]["counts"]["insert"], inserts, "{v}");
    assert_eq!(v[0]["counts"]["update"], updates, "{v}");
    assert_eq!(v[0]["counts"]["delete"], deletes, "{v}");
}

/// Whether role `app` is a superuser now.
fn app_is_superuser(p: &Pair) -> bool {
    p.client("cur")
        .query_one("SELECT rolsuper FROM pg_roles WHERE rolname = 'app'", &[])
        .unwrap()
        .get(0)
}

const LEDGER: (&str, &str, &str) = (
    "CREATE TABLE ledger (id bigint PRIMARY KEY, amount numeric(12,2) NOT NULL);",
    "INSERT INTO ledger SELECT g, g * 1.5 FROM generate_series(1, 10) g;",
    "INSERT INTO ledger SELECT g, 0 FROM generate_series(1, 5) g;",
);

/// Review M13: reentry adopted `reentry_repair` and its audit log with
/// `IF NOT EXISTS`, whoever made them. An application role that can create
/// a schema made them with a trigger, which then ran with reentry's
/// rights (here a superuser's) on the first audit row: `ALTER ROLE app
/// SUPERUSER`.
#[test]
fn a_schema_of_reentrys_that_another_role_made_or_put_a_trigger_on_is_refused() {
    let p = Pair::new(LEDGER.0, LEDGER.1, LEDGER.2);
    p.client("cur")
        .batch_execute(
            "CREATE ROLE app LOGIN;
             GRANT CREATE ON DATABASE cur TO app;
             CREATE SCHEMA appfn AUTHORIZATION app;",
        )
        .unwrap();
    // What the application role plants: the schema, the audit log as
    // reentry makes it, and a trigger that makes it a superuser.
    let plant = r#"
        CREATE FUNCTION appfn.escalate() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN EXECUTE 'ALTER ROLE app SUPERUSER'; RETURN NEW; END $$;"#;
    let mut app = p.c.db_client_as("cur", "app");
    app.batch_execute(&format!(
        "{plant}
         CREATE SCHEMA reentry_repair;
         CREATE TABLE reentry_repair.repair_audit_log (repair_id text NOT NULL, table_name text NOT NULL,
             class text NOT NULL, row_count bigint NOT NULL, executed_at timestamptz NOT NULL DEFAULT clock_timestamp());
         CREATE TRIGGER escalate BEFORE INSERT ON reentry_repair.repair_audit_log
             FOR EACH ROW EXECUTE FUNCTION appfn.escalate();"
    ))
    .unwrap();
    let before = p.rows(
        "cur",
        "SELECT concat_ws('|', id, amount) FROM ledger ORDER BY id",
    );
    let pb = p.playbook("planted", "postgres", "[[repair]]\ntable = \"ledger\"\n");
    let out = p.apply(&pb, "run1");
    assert_exit(&out, 3);
    assert!(
        stderr(&out).contains(
            "databases.current: reentry will not use schema reentry_repair: schema reentry_repair is owned by role app, not by postgres"
        ),
        "{}",
        stderr(&out)
    );
    assert!(!app_is_superuser(&p), "the planted trigger ran");
    assert_eq!(
        p.rows(
            "cur",
            "SELECT concat_ws('|', id, amount) FROM ledger ORDER BY id"
        ),
        before,
        "nothing changed"
    );
    assert_eq!(
        p.rows("cur", "SELECT enabled::text FROM system_gate"),
        ["true"],
        "no gate closed"
    );

    // Gone, reentry makes its own and repairs.
    p.client("cur")
        .batch_execute("DROP SCHEMA reentry_repair CASCADE")
        .unwrap();
    assert_exit(&p.apply(&pb, "run2"), 0);
    assert!(!app_is_superuser(&p));
    assert_eq!(
        p.rows(
            "cur",
            "SELECT pg_get_userbyid(nspowner)::text FROM pg_namespace WHERE nspname = 'reentry_repair'"
        ),
        ["postgres"]
    );
    // A trigger the application may put on reentry's own table (the
    // TRIGGER privilege lets it) is refused too.
    p.client("cur")
        .batch_execute("GRANT USAGE ON SCHEMA reentry_repair TO app; GRANT TRIGGER ON reentry_repair.repair_audit_log TO app;")
        .unwrap();
    app.batch_execute(
        "CREATE TRIGGER escalate BEFORE INSERT ON reentry_repair.repair_audit_log
             FOR EACH ROW EXECUTE FUNCTION appfn.escalate();",
    )
    .unwrap();
    p.client("cur")
        .batch_execute("UPDATE ledger SET amount = 0 WHERE id = 7")
        .unwrap();
    let out = p.apply(&pb, "run3");
    assert_exit(&out, 3);
    assert!(
        stderr(&out).contains("reentry_repair.repair_audit_log has trigger(s) escalate"),
        "{}",
        stderr(&out)
    );
    assert!(!app_is_superuser(&p), "the trigger ran");
    assert_eq!(
        p.rows("cur", "SELECT amount::text FROM ledger WHERE id = 7"),
        ["0.00"]
    );
}

/// Review M13: reentry's sessions kept the role's search path. With a
/// schema the application owns first on it, a function there that
/// matches reentry's call better than the catalog's (`unnest(text[])`
/// against `unnest(anyarray)`) ran in reentry's place, with its rights.
#[test]
fn an_application_schema_first_on_the_search_path_captures_none_of_reentrys_calls() {
    let p = Pair::new(LEDGER.0, LEDGER.1, LEDGER.2);
    p.client("cur")
        .batch_execute(
            "CREATE ROLE app LOGIN;
             CREATE SCHEMA app AUTHORIZATION app;
             ALTER ROLE postgres IN DATABASE cur SET search_path = app, public;",
        )
        .unwrap();
    p.c.db_client_as("cur", "app")
        .batch_execute(
            "CREATE TABLE app.captured (what text);
             GRANT INSERT ON app.captured TO PUBLIC;
             CREATE FUNCTION app.unnest(text[]) RETURNS SETOF text LANGUAGE sql AS $$
               INSERT INTO app.captured VALUES ('unnest');
               SELECT pg_catalog.unnest($1);
             $$;",
        )
        .unwrap();
    // The trap is armed: a session on that path calls it.
    let mut probe = p.client("cur");
    probe
        .batch_execute("SELECT * FROM unnest(ARRAY['x']::text[])")
        .unwrap();
    assert_eq!(p.rows("cur", "SELECT what FROM app.captured"), ["unnest"]);
    probe.batch_execute("TRUNCATE app.captured").unwrap();

    // An unqualified table and `where` SQL still resolve on the
    // application's path.
    let pb = p.playbook(
        "path",
        "postgres",
        "[[repair]]\ntable = \"ledger\"\nwhere = \"amount > 0\"\nbatch-size = 3\n",
    );
    let out = p.apply(&pb, "run");
    assert_exit(&out, 0);
    let sql = "SELECT concat_ws('|', id, amount) FROM ledger ORDER BY id";
    assert_eq!(p.rows("cur", sql), p.rows("res", sql), "{}", stdout(&out));
    assert!(
        p.rows("cur", "SELECT what FROM app.captured").is_empty(),
        "the application's unnest ran in reentry's place"
    );
}

/// Review M13: `triggers = "disable"` runs the repair with
/// `session_replication_role = replica`, which skips foreign-key checks
/// too; a child whose parent the target lacks went in, and nothing said.
#[test]
fn a_repair_with_triggers_disabled_that_orphans_a_child_fails_the_foreign_key_check() {
    let p = Pair::new(
        "CREATE TABLE parents (id int PRIMARY KEY);
         CREATE TABLE children (id int PRIMARY KEY, parent_id int REFERENCES parents (id), note text);",
        "INSERT INTO parents VALUES (1), (2), (3);
         INSERT INTO children VALUES (1, 1, 'a'), (2, 2, 'b'), (3, 3, 'c');",
        "INSERT INTO parents VALUES (1), (2);
         INSERT INTO children VALUES (1, 1, 'a'), (2, 2, 'b');",
    );
    let pb = p.playbook(
        "fk",
        "postgres",
        "[[repair]]\ntable = \"children\"\ntriggers = \"disable\"\n",
    );
    let plan = Command::new(reentry_bin())
        .arg("plan")
        .arg(&pb)
        .output()
        .unwrap();
    let text = stdout(&plan);
    assert!(text.contains("rows-foreign-keys:children"), "{text}");
    assert!(
        text.contains("databases.current: reentry connects as `postgres`, a superuser"),
        "{text}"
    );
    let out = p.apply(&pb, "run");
    assert_exit(&out, 2);
    let text = stdout(&out);
    assert!(
        text.contains("stopped: rows-foreign-keys:children: foreign keys broken on databases.current")
            && text.contains("1 row(s) of public.children break foreign key \"children_parent_id_fkey\" (parent_id) → public.parents"),
        "{text}"
    );
    // PostgreSQL's own count: the orphan is there, and the gate closed.
    assert_eq!(
        p.rows(
            "cur",
            "SELECT c.id::text FROM children c WHERE NOT EXISTS (SELECT FROM parents p WHERE p.id = c.parent_id)"
        ),
        ["3"]
    );
    assert_eq!(
        p.rows("cur", "SELECT enabled::text FROM system_gate"),
        ["false"]
    );
}
