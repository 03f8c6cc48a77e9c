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
            "SELECT _status FROM reentry_repair.accounts WHERE id = 500",
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
        one_i64(&mut cur, "SELECT count(*) FROM reentry_repair.accounts WHERE owner IS NOT NULL AND _status = 'not-applied'"),
        990,
        "the lost owners are kept in staging: {text}"
    );
    let note: String = cur
        .query_one(
            "SELECT DISTINCT _note FROM reentry_repair.accounts WHERE _status = 'not-applied'",
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
            "SELECT count(*) FROM reentry_repair.accounts WHERE _status = 'conflict'"
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
    let out = lab.apply(&scoped, "run2", &[]);
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
            "SELECT id FROM reentry_repair.items ORDER BY id COLLATE \"C\"",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(staged, [BACKSLASH, CRAFTED, "plain"]);
}
