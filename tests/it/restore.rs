//! Point-in-time restore, drills and preflight against real PostgreSQL 18
//! and 15. Everything runs as the server's OS user: PostgreSQL will not run
//! a restored cluster as root.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

use crate::common::archiving::{archiving, switch_and_wait_archived};
use crate::common::pg::{Cluster, Version};
use crate::common::restored::{command, ok_json, restore, run, Restored};
use crate::common::{as_server_user, assert_exit, reentry_bin, stderr, stdout};

fn sql_one(c: &Cluster, sql: &str) -> String {
    c.client().query_one(sql, &[]).unwrap().get(0)
}

fn seed_lab(version: Version) {
    let (c, repo) = archiving(version, "", &[]);
    c.client()
        .batch_execute("CREATE TABLE lab_orders AS SELECT g AS id, 'order ' || g AS note FROM generate_series(1, 10000) g")
        .unwrap();
    ok_json(&run(&c, &repo, &["backup"]));
    ok_json(&run(
        &c,
        &repo,
        &["restore-point", "before_delete", "--switch-wal"],
    ));
    c.client().batch_execute("DELETE FROM lab_orders").unwrap();
    switch_and_wait_archived(&c);

    let r = restore(&c, &repo, "restored", &["--target-name", "before_delete"]);
    assert_eq!(r.count("lab_orders"), 10000, "the deleted rows are back");
    let m = &r.manifest;
    assert_eq!(
        m["target"],
        serde_json::json!({"type": "name", "value": "before_delete"})
    );
    assert_eq!(m["timeline"], 1);
    assert_eq!(
        m["system_identifier"],
        sql_one(
            &c,
            "SELECT system_identifier::text FROM pg_control_system()"
        )
        .as_str()
    );
    assert!(m["wal_segments_replayed"].as_u64().unwrap() >= 1, "{m}");
    assert!(m["durations"]["copy_seconds"].as_f64().unwrap() > 0.0);
    let on_disk: Value =
        serde_json::from_str(&std::fs::read_to_string(r.dir.join("reentry-restore.json")).unwrap())
            .unwrap();
    assert_eq!(&on_disk, m, "the manifest is written beside the data");
    let in_recovery: bool = r
        .client()
        .query_one("SELECT pg_is_in_recovery()", &[])
        .unwrap()
        .get(0);
    assert!(
        in_recovery,
        "the default action pauses at the target, read-only"
    );
}

#[test]
fn pg18_seed_lab_restore_to_a_named_point_brings_back_deleted_rows() {
    seed_lab(Version::V18);
}

#[test]
fn pg15_seed_lab_restore_to_a_named_point_brings_back_deleted_rows() {
    seed_lab(Version::V15);
}

#[test]
fn pg18_time_lsn_and_xid_targets_land_where_they_should() {
    time_lsn_and_xid_targets(Version::V18);
}

#[test]
fn pg15_time_lsn_and_xid_targets_land_where_they_should() {
    time_lsn_and_xid_targets(Version::V15);
}

fn time_lsn_and_xid_targets(version: Version) {
    let (c, repo) = archiving(version, "", &[]);
    let mut db = c.client();
    db.batch_execute("CREATE TABLE t (batch text, id int)")
        .unwrap();
    ok_json(&run(&c, &repo, &["backup"]));
    let insert = |db: &mut postgres::Client, batch: &str| {
        db.batch_execute(&format!(
            "INSERT INTO t SELECT '{batch}', g FROM generate_series(1, 100) g"
        ))
        .unwrap()
    };
    insert(&mut db, "a");
    let t1 = sql_one(
        &c,
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    );
    std::thread::sleep(Duration::from_millis(1100));
    insert(&mut db, "b");
    let l2 = sql_one(&c, "SELECT pg_current_wal_insert_lsn()::text");
    let mut tx = db.transaction().unwrap();
    tx.batch_execute("INSERT INTO t SELECT 'c', g FROM generate_series(1, 100) g")
        .unwrap();
    let x3: String = tx
        .query_one(
            "SELECT (pg_current_xact_id()::text::bigint % 4294967296)::text",
            &[],
        )
        .unwrap()
        .get(0);
    tx.commit().unwrap();
    insert(&mut db, "d");
    switch_and_wait_archived(&c);

    let by_time = restore(&c, &repo, "by-time", &["--target-time", &t1]);
    assert_eq!(
        by_time.count("t"),
        100,
        "only batch a committed before {t1}"
    );
    let by_lsn = restore(&c, &repo, "by-lsn", &["--target-lsn", &l2]);
    assert_eq!(by_lsn.count("t"), 200, "a and b are before {l2}");
    let by_xid = restore(&c, &repo, "by-xid", &["--target-xid", &x3]);
    assert_eq!(
        by_xid.count("t"),
        300,
        "up to and including transaction {x3}"
    );
    assert_eq!(by_xid.manifest["target"]["type"], "xid");

    let stopped = restore(
        &c,
        &repo,
        "stopped",
        &["--target-lsn", &l2, "--action", "shutdown"],
    );
    assert!(
        !stopped.dir.join("postmaster.pid").exists(),
        "shut down at the target"
    );
    assert!(
        stopped.manifest["reached_lsn"].as_str().unwrap() != "0/0",
        "{}",
        stopped.manifest
    );
    assert!(stopped.manifest["wal_segments_replayed"].as_u64().unwrap() >= 1);
}

fn dumpall(r: &Restored) -> String {
    let out = as_server_user(r.bin.join("pg_dumpall"))
        .args([
            "-h",
            r.socket_dir(),
            "-p",
            &r.manifest["port"].to_string(),
            "-U",
            "postgres",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The dump's header names the restrict key, random per run.
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn pg18_an_incremental_chain_restores_to_the_same_state_as_the_full_backup() {
    let (c, repo) = archiving(Version::V18, "", &[("summarize_wal", "on")]);
    let mut db = c.client();
    db.batch_execute(
        "CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 20000) g",
    )
    .unwrap();
    let full = ok_json(&run(&c, &repo, &["backup"]));
    db.batch_execute("UPDATE t SET v = 'one' WHERE id % 7 = 0; CREATE TABLE u AS SELECT 1 AS x")
        .unwrap();
    ok_json(&run(&c, &repo, &["backup", "--incremental"]));
    db.batch_execute("DELETE FROM t WHERE id % 11 = 0; INSERT INTO u VALUES (2)")
        .unwrap();
    ok_json(&run(&c, &repo, &["backup", "--incremental"]));
    db.batch_execute("UPDATE t SET v = 'three' WHERE id % 13 = 0")
        .unwrap();
    let lsn = sql_one(&c, "SELECT pg_current_wal_insert_lsn()::text");
    switch_and_wait_archived(&c);

    let from_full = restore(
        &c,
        &repo,
        "from-full",
        &[
            "--target-lsn",
            &lsn,
            "--backup",
            full["id"].as_str().unwrap(),
        ],
    );
    let from_chain = restore(&c, &repo, "from-chain", &["--target-lsn", &lsn]);
    assert_eq!(
        from_chain.manifest["backup_chain"]
            .as_array()
            .unwrap()
            .len(),
        3,
        "{}",
        from_chain.manifest
    );
    assert!(
        from_chain.manifest["durations"]["combine_seconds"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert_eq!(
        from_full.manifest["reached_lsn"],
        from_chain.manifest["reached_lsn"]
    );
    let (a, b) = (dumpall(&from_full), dumpall(&from_chain));
    assert!(a.contains("CREATE TABLE public.u"), "the dump has the data");
    assert!(
        a == b,
        "pg_dumpall differs between the full restore and the incremental chain"
    );
}

#[test]
fn an_unreachable_target_is_refused_before_anything_is_copied() {
    let (c, repo) = archiving(Version::V18, "", &[]);
    c.client()
        .batch_execute("CREATE TABLE t AS SELECT 1 AS x")
        .unwrap();
    ok_json(&run(&c, &repo, &["backup"]));
    let mut closed = Vec::new();
    for _ in 0..3 {
        c.client()
            .batch_execute("INSERT INTO t SELECT 1 FROM generate_series(1, 1000)")
            .unwrap();
        closed.push(switch_and_wait_archived(&c));
    }
    let beyond = sql_one(&c, "SELECT pg_current_wal_insert_lsn()::text");
    let cut = &closed[1];
    std::fs::remove_file(repo.join("archive").join(&cut[..16]).join(cut)).unwrap();

    let dir = c.root().join("never");
    let out = run(
        &c,
        &repo,
        &[
            "restore",
            "--to",
            dir.to_str().unwrap(),
            "--target-lsn",
            &beyond,
        ],
    );
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains("contiguous WAL ends at")
            && stderr(&out).contains("Nothing was copied"),
        "{}",
        stderr(&out)
    );
    assert!(!dir.exists(), "nothing was created");

    let future = "2099-01-01T00:00:00Z";
    let out = run(
        &c,
        &repo,
        &[
            "restore",
            "--to",
            dir.to_str().unwrap(),
            "--target-time",
            future,
        ],
    );
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("committed at"), "{}", stderr(&out));
    assert!(!dir.exists());

    let out = run(
        &c,
        &repo,
        &[
            "restore",
            "--to",
            dir.to_str().unwrap(),
            "--target-name",
            "nope",
        ],
    );
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains("no restore point \"nope\""),
        "{}",
        stderr(&out)
    );
}

fn archive_files(repo: &Path) -> Vec<String> {
    let mut all = Vec::new();
    for e in walk(&repo.join("archive")) {
        all.push(e.strip_prefix(repo).unwrap().display().to_string());
    }
    all.sort();
    all
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_restored_cluster_is_fenced_from_the_production_archive_and_port() {
    let (c, repo) = archiving(Version::V18, "", &[]);
    c.client()
        .batch_execute("CREATE TABLE t AS SELECT 1 AS x")
        .unwrap();
    ok_json(&run(&c, &repo, &["backup"]));
    switch_and_wait_archived(&c);
    let before = archive_files(&repo);

    // Refusals first: a port in use, a directory with something in it.
    let busy = c.root().join("busy");
    let out = run(
        &c,
        &repo,
        &[
            "restore",
            "--to",
            busy.to_str().unwrap(),
            "--immediate",
            "--port",
            &c.port.to_string(),
        ],
    );
    assert_exit(&out, 64);
    assert!(stderr(&out).contains("in use"), "{}", stderr(&out));
    let full = c.dir("occupied");
    std::fs::write(full.join("keep.me"), "x").unwrap();
    let out = run(
        &c,
        &repo,
        &["restore", "--to", full.to_str().unwrap(), "--immediate"],
    );
    assert_exit(&out, 64);
    assert!(stderr(&out).contains("not empty"), "{}", stderr(&out));
    assert_eq!(std::fs::read_dir(&full).unwrap().count(), 1);

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let r = restore(
        &c,
        &repo,
        "fenced",
        &[
            "--immediate",
            "--action",
            "promote",
            "--port",
            &port.to_string(),
        ],
    );
    assert_eq!(r.manifest["port"], port);
    let mut db = r.client();
    let timeline: i32 = db
        .query_one("SELECT timeline_id FROM pg_control_checkpoint()", &[])
        .unwrap()
        .get(0);
    db.batch_execute("INSERT INTO t SELECT g FROM generate_series(1, 50000) g; CHECKPOINT")
        .unwrap();
    db.query_one("SELECT pg_switch_wal()", &[]).unwrap();
    let archive_mode: String = db.query_one("SHOW archive_mode", &[]).unwrap().get(0);
    assert_eq!(archive_mode, "off");
    let listen: String = db.query_one("SHOW listen_addresses", &[]).unwrap().get(0);
    assert_eq!(listen, "", "a fenced copy listens on no TCP address");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nothing answers on 127.0.0.1:{port}"
    );
    // The source's pg_hba.conf (trust for every local TCP client here) is
    // kept aside, not served.
    let hba: String = db.query_one("SHOW hba_file", &[]).unwrap().get(0);
    let rules = std::fs::read_to_string(&hba).unwrap();
    let served: Vec<&str> = rules
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .collect();
    assert_eq!(served, ["local all all trust"], "{hba}");
    assert!(r.dir.join("pg_hba.conf.source").exists());

    // Archiving turned back on by hand (L6): the copy's WAL, on its own
    // timeline under its source's system identifier, is refused by
    // `wal push` run as archive_command runs it, from the data directory.
    let segment = std::fs::read_dir(r.dir.join("pg_wal"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 24 && !n.starts_with("00000001"))
        .min()
        .expect("a segment of the copy's own timeline");
    let pushed = command(&c, &repo, &["wal", "push", &format!("pg_wal/{segment}")])
        .current_dir(&r.dir)
        .output()
        .unwrap();
    assert_exit(&pushed, 3);
    assert!(
        stderr(&pushed).contains("comes from a fenced copy")
            && stderr(&pushed).contains("reentry-restore.json out of its data directory"),
        "{}",
        stderr(&pushed)
    );
    assert_eq!(
        archive_files(&repo),
        before,
        "the refused push stored something"
    );

    // Opened by the operator (a cutover): TCP, with the source's rules.
    let open = restore(
        &c,
        &repo,
        "opened",
        &["--immediate", "--listen", "127.0.0.1"],
    );
    assert_eq!(open.manifest["listen"], "127.0.0.1");
    let tcp = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        open.manifest["port"]
    );
    let x: i32 = postgres::Client::connect(&tcp, postgres::NoTls)
        .unwrap()
        .query_one("SELECT x FROM t", &[])
        .unwrap()
        .get(0);
    assert_eq!(x, 1);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        archive_files(&repo),
        before,
        "the restored cluster (timeline {timeline}+) wrote nothing into the repository"
    );
}

fn drill(c: &Cluster, repo: &Path, evidence: &Path, checks: &Path) -> Output {
    let (evidence, checks) = (evidence.to_str().unwrap(), checks.to_str().unwrap());
    run(
        c,
        repo,
        &["drill", "--evidence", evidence, "--checks", checks],
    )
}

#[test]
fn drill_writes_evidence_and_a_failing_check_fails_it() {
    let (c, repo) = archiving(Version::V18, "", &[]);
    c.client()
        .batch_execute("CREATE TABLE orders AS SELECT g AS id FROM generate_series(1, 500) g")
        .unwrap();
    ok_json(&run(&c, &repo, &["backup"]));
    c.client()
        .batch_execute("INSERT INTO orders SELECT g FROM generate_series(501, 600) g")
        .unwrap();
    switch_and_wait_archived(&c);

    let work = c.dir("work");
    std::fs::write(
        work.join("good.sql"),
        "-- name: all orders restored\nSELECT 1 WHERE (SELECT count(*) FROM orders) <> 600;\n",
    )
    .unwrap();
    let evidence = work.join("evidence.json");
    let out = drill(&c, &repo, &evidence, &work.join("good.sql"));
    let e = ok_json(&out);
    let on_disk: Value =
        serde_json::from_str(&std::fs::read_to_string(&evidence).unwrap()).unwrap();
    assert_eq!(on_disk, e);
    for field in [
        "dr_drill_id",
        "backup_id",
        "target_time",
        "restore_started_at",
        "restore_finished_at",
        "rto_observed_seconds",
        "rpo_observed_seconds",
        "wal_segments_replayed",
        "validation_status",
    ] {
        assert!(e.get(field).is_some(), "evidence lacks {field}: {e}");
    }
    assert_eq!(e["validation_status"], "passed");
    assert!(e["rto_observed_seconds"].as_f64().unwrap() > 0.0);
    assert!(
        e["rpo_observed_seconds"].as_f64().is_some(),
        "a transaction was replayed, so RPO is known"
    );
    assert!(e["checks"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["name"] == "all orders restored" && c["status"] == "passed"));
    assert!(e["databases"]
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d == "postgres"));
    let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|d| {
            d.file_name()
                .to_string_lossy()
                .contains(e["dr_drill_id"].as_str().unwrap())
        })
        .collect();
    assert!(left.is_empty(), "the drill cleaned up");

    // A random target lands inside the backup's PITR window, and says where.
    let random = ok_json(&run(
        &c,
        &repo,
        &[
            "drill",
            "--random-target",
            "--evidence",
            work.join("random.json").to_str().unwrap(),
        ],
    ));
    let target = random["target_time"]
        .as_str()
        .expect("a random drill records its target time")
        .to_owned();
    let backup = ok_json(&run(&c, &repo, &["backup", "list"]))[0].clone();
    assert!(
        target.as_str() > backup["stop_time"].as_str().unwrap(),
        "{target} after the backup: {backup}"
    );
    assert!(target.as_str() <= random["restore_started_at"].as_str().unwrap());
    assert_eq!(random["restore"]["target"]["type"], "time");

    let status = ok_json(&run(&c, &repo, &["status"]));
    assert_eq!(status["drills"]["last_passed"]["id"], random["dr_drill_id"]);

    std::fs::write(
        work.join("bad.sql"),
        "-- name: no orders at all\nSELECT id FROM orders ORDER BY id LIMIT 3\n",
    )
    .unwrap();
    let out = drill(&c, &repo, &work.join("bad.json"), &work.join("bad.sql"));
    assert_exit(&out, 1);
    let bad: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(bad["validation_status"], "failed");
    let failed = bad["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "no orders at all")
        .unwrap()
        .clone();
    assert_eq!(
        (failed["status"].as_str(), failed["rows"].as_u64()),
        (Some("failed"), Some(3))
    );
    assert_eq!(failed["sample"][0], "1");

    std::fs::write(work.join("broken.sql"), "SELECT 1;\n").unwrap();
    let out = drill(&c, &repo, &work.join("x.json"), &work.join("broken.sql"));
    assert_exit(&out, 78);
    assert!(stderr(&out).contains("broken.sql:1:"), "{}", stderr(&out));
    assert!(!work.join("x.json").exists());
}

#[test]
fn preflight_creates_the_restore_point_only_when_every_check_passes() {
    let (c, repo) = archiving(Version::V18, "", &[]);
    c.client()
        .batch_execute("CREATE TABLE t AS SELECT 1 AS x")
        .unwrap();
    switch_and_wait_archived(&c);

    let out = run(
        &c,
        &repo,
        &["preflight", "--restore-point", "pre-migration-7"],
    );
    assert_exit(&out, 1);
    let report: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let failed: Vec<_> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ok"] == false)
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(failed, ["recent verified backup"], "{report}");
    assert!(
        !repo.join("restore-points.json").exists(),
        "nothing created"
    );

    ok_json(&run(&c, &repo, &["backup"]));
    ok_json(&run(&c, &repo, &["backup", "verify"]));
    let report = ok_json(&run(
        &c,
        &repo,
        &["preflight", "--restore-point", "pre-migration-7"],
    ));
    assert_eq!(report["restore_point"]["name"], "pre-migration-7");
    let r = restore(&c, &repo, "at-point", &["--target-name", "pre-migration-7"]);
    assert_eq!(
        r.count("t"),
        1,
        "the preflight's restore point is restorable at once"
    );
}

/// A PITR copy shares its system identifier with the cluster it came from:
/// a playbook with `current` and `restored` swapped must be told apart by
/// the timeline the restore opened, the LSN it reached and the port it
/// used, and refused before anything is planned.
#[test]
fn a_playbook_with_current_and_restored_swapped_is_refused() {
    let (c, repo) = archiving(Version::V18, "", &[]);
    c.client()
        .batch_execute(include_str!("../../sql/system_gate.sql"))
        .unwrap();
    c.client()
        .batch_execute("INSERT INTO system_gate (gate_name, enabled) VALUES ('api-writes', true)")
        .unwrap();
    ok_json(&run(&c, &repo, &["backup"]));
    ok_json(&run(
        &c,
        &repo,
        &["restore-point", "before_incident", "--switch-wal"],
    ));
    c.client()
        .batch_execute("UPDATE system_gate SET updated_at = now()")
        .unwrap();
    switch_and_wait_archived(&c);
    let r = restore(
        &c,
        &repo,
        "restored",
        &["--target-name", "before_incident", "--action", "promote"],
    );
    let restored = r.conninfo();
    let playbook = |current: &str, restored: &str| {
        let text = format!(
            r#"[playbook]
name = "swap"
way-back = "cutover"
[databases.current]
conninfo = "{current}"
[databases.restored]
conninfo = "{restored}"
[recovery-target]
manifest = "{}"
[gates]
reopen-order = ["api-writes"]
[[gates.system-gate]]
name = "api-writes"
databases = ["current", "restored"]
"#,
            r.dir.join("reentry-restore.json").display()
        );
        let path = c.dir("work").join("swap.toml");
        std::fs::write(&path, text).unwrap();
        path
    };
    let plan = |pb: &Path| {
        Command::new(reentry_bin())
            .arg("plan")
            .arg(pb)
            .output()
            .unwrap()
    };

    let right = playbook(&c.conninfo(), &restored);
    assert_exit(&plan(&right), 1);

    let swapped = playbook(&restored, &c.conninfo());
    let out = plan(&swapped);
    assert_exit(&out, 3);
    let err = stderr(&out);
    assert!(
        err.contains("databases.restored is not the cluster the restore manifest"),
        "{err}"
    );
    assert!(err.contains("databases.restored is on timeline 1"), "{err}");
    assert!(
        err.contains("older than timeline 2 that the restore opened"),
        "{err}"
    );
    assert!(
        err.contains("current and restored look swapped in the playbook"),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "where the manifest put the restored cluster (port {})",
            r.manifest["port"]
        )),
        "{err}"
    );
}

/// `reentry` with `args` as the server user, with a German locale in its
/// environment: every PostgreSQL program it runs and every server log it
/// reads must still parse.
fn run_german(c: &Cluster, repo: &Path, args: &[&str]) -> Output {
    command(c, repo, args)
        .env("LANG", "de_DE.UTF-8")
        .env("LC_ALL", "de_DE.UTF-8")
        .output()
        .expect("run reentry")
}

/// The `recovery_target_time` form people write by hand, `2026-07-01 14:36:00+00`,
/// and a cluster whose server and tools speak German (PostgreSQL 15 from
/// Debian ships the translations; `scripts/setup` generates the locale).
#[test]
fn a_restore_and_a_drill_work_in_german_with_the_seeds_time_form() {
    let locales = Command::new("locale").arg("-a").output().unwrap();
    assert!(
        String::from_utf8_lossy(&locales.stdout)
            .lines()
            .any(|l| l.eq_ignore_ascii_case("de_DE.utf8")),
        "the de_DE.UTF-8 locale is missing: run scripts/setup"
    );
    let (c, repo) = archiving(
        Version::V15,
        "",
        &[
            ("lc_messages", "'de_DE.UTF-8'"),
            ("log_min_messages", "'info'"),
        ],
    );
    c.client()
        .batch_execute("CREATE TABLE cases AS SELECT g AS id, 'open' AS status FROM generate_series(1, 1000) g;
                        CREATE TABLE idempotency_key (idem_key text PRIMARY KEY, created_at timestamptz NOT NULL DEFAULT now())")
        .unwrap();
    ok_json(&run_german(&c, &repo, &["backup"]));
    c.client()
        .batch_execute("INSERT INTO cases SELECT g, 'open' FROM generate_series(1001, 1100) g")
        .unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    // That form: a space, whole seconds, the offset as +00.
    let t: String = c
        .client()
        .query_one(
            "SELECT to_char(date_trunc('second', now() AT TIME ZONE 'UTC'), 'YYYY-MM-DD HH24:MI:SS') || '+00'",
            &[],
        )
        .unwrap()
        .get(0);
    std::thread::sleep(Duration::from_millis(1100));
    c.client()
        .batch_execute("UPDATE cases SET status = 'closed'")
        .unwrap();
    switch_and_wait_archived(&c);

    let dir = c.root().join("restored");
    let out = run_german(
        &c,
        &repo,
        &[
            "restore",
            "--to",
            dir.to_str().unwrap(),
            "--target-time",
            &t,
        ],
    );
    let mut restored = Restored {
        manifest: Value::Null,
        dir,
        bin: c.version.bin_dir(),
    };
    let m = ok_json(&out);
    restored.manifest = m.clone();
    assert_eq!(m["target"]["type"], "time");
    assert_eq!(
        m["target"]["value"].as_str().unwrap(),
        format!("{}.000Z", t.trim_end_matches("+00").replacen(' ', "T", 1))
    );
    assert!(
        m["wal_segments_replayed"].as_u64().unwrap() >= 1,
        "the German server log was read: {m}"
    );
    assert_eq!(restored.count("cases WHERE status = 'open'"), 1100);

    // The copy is paused in recovery: a plan whose idempotency step would
    // write tombstones there is refused up front, before any step.
    let pb = c.dir("work").join("in-recovery.toml");
    std::fs::write(
        &pb,
        format!(
            r#"[playbook]
name = "paused"
way-back = "cutover"
[databases.current]
conninfo = "{}"
[databases.restored]
conninfo = "{}"
[recovery-target]
time = "{t}"
[gates]
reopen-order = []
[[idempotency]]
name = "keys"
database = "restored"
table = "idempotency_key"
key-column = "idem_key"
created-at-column = "created_at"
action = "tombstone"
from-current = true
"#,
            c.conninfo(),
            restored.conninfo()
        ),
    )
    .unwrap();
    let out = Command::new(reentry_bin())
        .arg("plan")
        .arg(&pb)
        .output()
        .unwrap();
    assert_exit(&out, 3);
    assert!(
        stderr(&out)
            .contains("databases.restored is in recovery (read-only), but the plan changes it"),
        "{}",
        stderr(&out)
    );
    drop(restored);

    // A drill, with an offset other than Z in the target.
    let work = c.dir("work");
    std::fs::write(
        work.join("checks.sql"),
        "-- name: every case is open\nSELECT 1 WHERE EXISTS (SELECT FROM cases WHERE status <> 'open');\n",
    )
    .unwrap();
    let seven: String = c
        .client()
        .query_one(
            &format!(
                "SELECT to_char(('{t}'::timestamptz AT TIME ZONE 'UTC') + interval '7 hours', 'YYYY-MM-DD\"T\"HH24:MI:SS') || '+07:00'"
            ),
            &[],
        )
        .unwrap()
        .get(0);
    let evidence = work.join("evidence.json");
    let e = ok_json(&run_german(
        &c,
        &repo,
        &[
            "drill",
            "--evidence",
            evidence.to_str().unwrap(),
            "--checks",
            work.join("checks.sql").to_str().unwrap(),
            "--target-time",
            &seven,
        ],
    ));
    assert_eq!(e["validation_status"], "passed", "{e}");
    assert!(e["wal_segments_replayed"].as_u64().unwrap() >= 1, "{e}");
}

/// The source's shell commands and its subscriptions stay with the source:
/// a restored copy runs no `recovery_end_command` or
/// `archive_cleanup_command`, and no subscription worker takes the
/// publisher's slot, even once promoted. The cleanup command runs at a
/// restartpoint, which an `--immediate` recovery never makes: the copy
/// pauses past a checkpoint of the source's and is told to make one.
#[test]
fn a_restored_copy_runs_none_of_the_sources_commands_and_starts_no_subscription() {
    let mut publisher = Cluster::init(Version::V18);
    publisher.append_conf(&[("wal_level", "logical")]);
    publisher.start();
    publisher
        .client()
        .batch_execute("CREATE TABLE s (x int PRIMARY KEY); CREATE PUBLICATION pub FOR TABLE s")
        .unwrap();

    let ended = publisher.dir("marks").join("recovery-ended");
    let cleaned = publisher.dir("marks").join("archive-cleaned");
    let end_command = format!("'touch {}'", ended.display());
    let cleanup_command = format!("'touch {}'", cleaned.display());
    let (c, repo) = archiving(
        Version::V18,
        "",
        &[
            ("recovery_end_command", &end_command),
            ("archive_cleanup_command", &cleanup_command),
        ],
    );
    let mut db = c.client();
    db.batch_execute("CREATE TABLE s (x int PRIMARY KEY)")
        .unwrap();
    db.batch_execute(&format!(
        "CREATE SUBSCRIPTION sub CONNECTION 'host=127.0.0.1 port={} user=postgres dbname=postgres' PUBLICATION pub",
        publisher.port
    ))
    .unwrap();
    ok_json(&run(&c, &repo, &["backup"]));
    // The source lets go of the slot: a copy's worker would be free to take it.
    db.batch_execute("ALTER SUBSCRIPTION sub DISABLE").unwrap();
    let slot_active = || -> bool {
        publisher
            .client()
            .query_one(
                "SELECT active FROM pg_replication_slots WHERE slot_name = 'sub'",
                &[],
            )
            .unwrap()
            .get(0)
    };
    publisher.wait_for(
        "the source to let go of the slot",
        Duration::from_secs(30),
        || (!slot_active()).then_some(()),
    );
    // A checkpoint past the backup's, for the copy to restart from.
    db.batch_execute("CHECKPOINT").unwrap();
    ok_json(&run(
        &c,
        &repo,
        &["restore-point", "past_checkpoint", "--switch-wal"],
    ));
    switch_and_wait_archived(&c);

    let r = restore(&c, &repo, "copy", &["--target-name", "past_checkpoint"]);
    let mut copy = r.client();
    let redo = || -> String {
        r.client()
            .query_one("SELECT redo_lsn::text FROM pg_control_checkpoint()", &[])
            .unwrap()
            .get(0)
    };
    let before = redo();
    copy.batch_execute("CHECKPOINT").unwrap();
    assert_ne!(redo(), before, "the copy made a restartpoint");
    assert!(
        !cleaned.exists(),
        "the source's archive_cleanup_command ran at the restartpoint"
    );
    let promoted: bool = copy.query_one("SELECT pg_promote()", &[]).unwrap().get(0);
    assert!(promoted);
    publisher
        .client()
        .batch_execute("INSERT INTO s VALUES (1)")
        .unwrap();
    // A worker starts within a second of promotion where it may: give it
    // five, then look at both sides.
    std::thread::sleep(Duration::from_secs(5));
    let workers: i64 = copy
        .query_one("SELECT count(pid) FROM pg_stat_subscription", &[])
        .unwrap()
        .get(0);
    assert_eq!(workers, 0, "no subscription worker runs on the copy");
    assert!(!slot_active(), "the publisher's slot is not taken");
    assert_eq!(r.count("s"), 0, "nothing was applied from the publisher");
    for setting in ["recovery_end_command", "archive_cleanup_command"] {
        let v: String = copy
            .query_one(&format!("SHOW {setting}"), &[])
            .unwrap()
            .get(0);
        assert_eq!(v, "", "{setting} is cleared on the copy");
    }
    assert!(!ended.exists(), "the source's recovery_end_command ran");
    assert!(
        !cleaned.exists(),
        "the source's archive_cleanup_command ran"
    );
}

/// A backup that links to tablespace directories (taken before backups
/// refused them) is refused by restore: the copy would write into the
/// source's own files.
#[test]
fn a_backup_linking_to_a_tablespace_is_refused_before_anything_is_copied() {
    let (c, repo) = archiving(Version::V18, "", &[]);
    let b = ok_json(&run(&c, &repo, &["backup"]));
    let production = c.dir("production-ts");
    std::fs::write(production.join("PG_18_marker"), "live").unwrap();
    let tblspc = repo
        .join("backup")
        .join(b["id"].as_str().unwrap())
        .join("data/pg_tblspc");
    std::fs::create_dir_all(&tblspc).unwrap();
    std::os::unix::fs::symlink(&production, tblspc.join("16400")).unwrap();
    switch_and_wait_archived(&c);
    let to = c.root().join("copy");
    let out = run(
        &c,
        &repo,
        &["restore", "--to", to.to_str().unwrap(), "--immediate"],
    );
    assert_exit(&out, 3);
    assert!(
        stderr(&out).contains(&format!("pg_tblspc/16400 -> {}", production.display())),
        "{}",
        stderr(&out)
    );
    assert!(!to.exists(), "nothing was written");
    assert_eq!(
        std::fs::read_dir(&production).unwrap().count(),
        1,
        "the tablespace is untouched"
    );
}

/// Starts `cmd`, waits for a `postmaster.pid` in the directory `data`
/// yields (it may not exist yet), then makes the restore manifest's path a
/// directory so that the write after replay fails: a late failure, with
/// the server up. The postmaster's pid and the command's output.
fn fail_after_start(
    mut cmd: Command,
    data: impl Fn() -> Option<PathBuf>,
) -> (i32, PathBuf, Output) {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let (pid, dir) = loop {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the server never started"
        );
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "it ended before the server started: {}{}",
                stdout(&out),
                stderr(&out)
            );
        }
        if let Some(dir) = data() {
            if let Ok(text) = std::fs::read_to_string(dir.join("postmaster.pid")) {
                if let Some(pid) = text.lines().next().and_then(|l| l.trim().parse().ok()) {
                    std::fs::create_dir(dir.join("reentry-restore.json")).unwrap();
                    break (pid, dir);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    (pid, dir, child.wait_with_output().unwrap())
}

fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[test]
fn a_restore_or_drill_that_fails_after_the_server_started_leaves_no_server_running() {
    let (c, repo) = archiving(Version::V18, "", &[]);
    c.client()
        .batch_execute("CREATE TABLE t AS SELECT g FROM generate_series(1, 100000) g")
        .unwrap();
    ok_json(&run(&c, &repo, &["backup"]));
    // Some WAL to replay: the server runs a while before recovery ends.
    for _ in 0..4 {
        c.client()
            .batch_execute("INSERT INTO t SELECT g FROM generate_series(1, 100000) g")
            .unwrap();
        switch_and_wait_archived(&c);
    }

    let to = c.root().join("late");
    let (pid, _, out) = fail_after_start(
        command(
            &c,
            &repo,
            &["restore", "--to", to.to_str().unwrap(), "--latest"],
        ),
        || Some(to.clone()),
    );
    assert_exit(&out, 2);
    assert!(
        stderr(&out).contains("reentry-restore.json"),
        "{}",
        stderr(&out)
    );
    assert!(!alive(pid), "the restore left postmaster {pid} running");
    assert!(!to.join("postmaster.pid").exists());

    // A drill in a scratch directory of its own: the server is stopped
    // before that directory is deleted.
    let tmp = c.dir("tmp");
    let mut cmd = command(
        &c,
        &repo,
        &[
            "drill",
            "--evidence",
            c.dir("work").join("e.json").to_str().unwrap(),
        ],
    );
    cmd.env("TMPDIR", &tmp);
    let scratch = || {
        std::fs::read_dir(&tmp)
            .ok()?
            .flatten()
            .find(|e| e.file_name().to_string_lossy().contains("reentry-drill"))
            .map(|e| e.path().join("data"))
    };
    let (pid, dir, out) = fail_after_start(cmd, scratch);
    assert_exit(&out, 2);
    assert!(!alive(pid), "the drill left postmaster {pid} running");
    assert!(!dir.exists(), "the drill left its scratch directory");
}

#[test]
fn a_repository_whose_path_holds_a_quote_and_percent_signs_restores_through_restore_command() {
    let (c, repo) = archiving(Version::V18, "", &[]);
    c.client()
        .batch_execute("CREATE TABLE t AS SELECT g FROM generate_series(1, 100) g")
        .unwrap();
    ok_json(&run(&c, &repo, &["backup"]));
    // Rows only the WAL after the backup holds.
    c.client()
        .batch_execute("INSERT INTO t SELECT g FROM generate_series(101, 150) g")
        .unwrap();
    switch_and_wait_archived(&c);
    // The same repository under a name the shell and PostgreSQL's %-escapes
    // would both misread.
    let weird = repo.with_file_name("it's a %f %p %r repo");
    std::fs::rename(&repo, &weird).unwrap();
    let r = restore(&c, &weird, "copy", &["--latest"]);
    assert_eq!(r.count("t"), 150, "the WAL after the backup was replayed");
    assert!(
        r.manifest["wal_segments_replayed"].as_u64().unwrap() >= 1,
        "{}",
        r.manifest
    );
}
