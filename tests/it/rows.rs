//! Rows against real PostgreSQL 18, the restored copy made by a real
//! `reentry restore`: the seed's practice task 4 (corrupt 100 rows, PITR,
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

/// The seed's practice task 4: a bad job zeroes 100 balances after T;
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
