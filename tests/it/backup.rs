//! Base backups, the catalog, verification, `wal verify`, retention,
//! restore points, `status` and `check`, against real PostgreSQL 18 and 15.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use serde_json::Value;

use crate::common::archiving::{archiving, switch_and_wait_archived};
use crate::common::pg::{Cluster, Version};
use crate::common::{assert_exit, reentry, stderr, stdout};

/// `reentry --repo REPO --json ARGS…` against `c`, with its version's tools.
fn run(c: &Cluster, repo: &Path, args: &[&str]) -> Output {
    let conninfo = c.conninfo();
    let bin = c.version.bin_dir();
    let mut all = vec!["--repo", repo.to_str().unwrap(), "--json"];
    all.extend_from_slice(args);
    let takes_db = matches!(
        args.first(),
        Some(&"status") | Some(&"check") | Some(&"restore-point")
    ) || (args.first() == Some(&"backup")
        && !matches!(
            args.get(1),
            Some(&"list") | Some(&"verify") | Some(&"expire")
        ));
    if takes_db {
        all.extend_from_slice(&["--db", &conninfo]);
    }
    let uses_tools =
        args.first() == Some(&"backup") && !matches!(args.get(1), Some(&"list") | Some(&"expire"));
    let bin_s = bin.to_str().unwrap().to_owned();
    if uses_tools {
        all.extend_from_slice(&["--pg-bin", &bin_s]);
    }
    reentry(false, &all)
}

#[track_caller]
fn json(o: &Output) -> Value {
    serde_json::from_str(&stdout(o))
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", stdout(o), stderr(o)))
}

#[track_caller]
fn backup(c: &Cluster, repo: &Path, args: &[&str]) -> Value {
    let mut all = vec!["backup"];
    all.extend_from_slice(args);
    let out = run(c, repo, &all);
    assert_exit(&out, 0);
    json(&out)
}

fn write_rows(c: &Cluster, n: i32) {
    c.client()
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS t (id int, note text);
             INSERT INTO t SELECT g, repeat('x', 100) FROM generate_series(1, {n}) g"
        ))
        .unwrap();
}

fn ids(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn pg18_full_backup_and_an_incremental_chain_of_two_are_labelled_listed_verified_and_catalogued() {
    let (c, repo) = archiving(Version::V18, "", &[("summarize_wal", "on")]);
    write_rows(&c, 10_000);
    let full = backup(&c, &repo, &[]);
    write_rows(&c, 1_000);
    let i1 = backup(&c, &repo, &["--incremental"]);
    write_rows(&c, 1_000);
    let i2 = backup(&c, &repo, &["--incremental"]);

    assert_eq!(full["type"], "full");
    assert_eq!(full["parent"], Value::Null);
    assert_eq!(
        (i1["type"].as_str(), i1["parent"].as_str()),
        (Some("incremental"), full["id"].as_str())
    );
    assert_eq!(i2["parent"], i1["id"]);
    for b in [&full, &i1, &i2] {
        assert_eq!(b["status"], "complete");
        assert_eq!(b["pg_version"], 18);
        assert_eq!(b["timeline"], 1);
        assert!(b["start_lsn"].is_string() && b["stop_lsn"].is_string());
        assert!(b["size_bytes"].as_u64().unwrap() > 0);
        let sysid: String = c
            .client()
            .query_one(
                "SELECT system_identifier::text FROM pg_control_system()",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(b["system_identifier"], sysid.as_str());
    }
    assert!(
        i2["size_bytes"].as_u64() < full["size_bytes"].as_u64(),
        "an incremental copies less"
    );

    let list = json(&run(&c, &repo, &["backup", "list"]));
    assert_eq!(
        ids(&list),
        [&full, &i1, &i2].map(|b| b["id"].as_str().unwrap().to_owned())
    );

    let out = run(&c, &repo, &["backup", "verify", i2["id"].as_str().unwrap()]);
    assert_exit(&out, 0);
    let report = json(&out);
    assert_eq!(report["status"], "ok");
    assert_eq!(
        report["chain"].as_array().unwrap().len(),
        3,
        "the whole chain is verified"
    );
    let relisted = json(&run(&c, &repo, &["backup", "list"]));
    assert!(
        relisted
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["verification"]["status"] == "ok"),
        "{relisted}"
    );

    // The catalog mirror, in the backup_catalog table.
    let out = run(
        &c,
        &repo,
        &["backup", "list", "--sync-catalog", &c.conninfo()],
    );
    assert_exit(&out, 0);
    let rows = c
        .client()
        .query("SELECT backup_id, backup_type, wal_end_lsn::text, verified_at IS NOT NULL FROM backup_catalog ORDER BY started_at, backup_id", &[])
        .unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[1].get::<_, String>(1), "base_incremental");
    assert_eq!(
        rows[2].get::<_, String>(2),
        i2["stop_lsn"].as_str().unwrap()
    );
    assert!(rows.iter().all(|r| r.get::<_, bool>(3)));
}

#[test]
fn pg15_full_backup_verifies_and_incremental_is_refused_with_what_to_change() {
    let (c, repo) = archiving(Version::V15, "", &[]);
    write_rows(&c, 5_000);
    let full = backup(&c, &repo, &[]);
    assert_eq!(full["pg_version"], 15);
    // Taken as root here; the repository's owner (the server user, who
    // restores) must be able to read every file.
    use std::os::unix::fs::MetadataExt;
    let owner = std::fs::metadata(&repo).unwrap().uid();
    let data = repo
        .join("backup")
        .join(full["id"].as_str().unwrap())
        .join("data");
    for f in [
        data.join("PG_VERSION"),
        data.join("global/pg_control"),
        data.join("backup_manifest"),
    ] {
        assert_eq!(
            std::fs::metadata(&f).unwrap().uid(),
            owner,
            "{}",
            f.display()
        );
    }
    let out = run(&c, &repo, &["backup", "verify"]);
    assert_exit(&out, 0);
    assert_eq!(json(&out)["id"], full["id"]);

    let out = run(&c, &repo, &["backup", "--incremental"]);
    assert_exit(&out, 78);
    assert!(stderr(&out).contains("17 or later"), "{}", stderr(&out));
    assert_eq!(
        ids(&json(&run(&c, &repo, &["backup", "list"]))).len(),
        1,
        "nothing recorded"
    );
}

#[test]
fn pg18_incremental_without_wal_summaries_is_refused() {
    let (c, repo) = archiving(Version::V18, "", &[]);
    backup(&c, &repo, &[]);
    let out = run(&c, &repo, &["backup", "--incremental"]);
    assert_exit(&out, 78);
    assert!(stderr(&out).contains("summarize_wal"), "{}", stderr(&out));
}

#[test]
fn a_backup_of_a_cluster_that_does_not_archive_is_refused() {
    let mut c = Cluster::init(Version::V18);
    c.start();
    let repo = c.dir("repo");
    let out = run(&c, &repo, &["backup"]);
    assert_exit(&out, 78);
    assert!(
        stderr(&out).contains("archive_mode is off"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_backup_whose_wal_never_reaches_the_archive_is_marked_failed() {
    let (c, repo) = archiving(Version::V18, "", &[]);
    let good = backup(&c, &repo, &[]);
    let mut db = c.client();
    db.batch_execute("ALTER SYSTEM SET archive_command = '/bin/false'")
        .unwrap();
    db.batch_execute("SELECT pg_reload_conf()").unwrap();

    let out = run(&c, &repo, &["backup", "--archive-timeout", "3"]);
    assert_exit(&out, 2);
    assert!(
        stderr(&out).contains("did not reach the archive within 3 s"),
        "{}",
        stderr(&out)
    );
    let list = json(&run(&c, &repo, &["backup", "list"]));
    let failed = &list.as_array().unwrap()[1];
    assert_eq!(failed["status"], "failed", "{list}");
    assert!(failed["failure"]
        .as_str()
        .unwrap()
        .contains("did not reach the archive"));
    let newest = run(&c, &repo, &["backup", "verify"]);
    assert_eq!(
        json(&newest)["id"],
        good["id"],
        "verify without an id picks the newest usable backup"
    );
}

/// A relation file of the backup with some bytes in it.
fn some_data_file(backup_data: &Path) -> PathBuf {
    let base = backup_data.join("base");
    for db in std::fs::read_dir(&base).unwrap() {
        for f in std::fs::read_dir(db.unwrap().path()).unwrap() {
            let f = f.unwrap();
            let name = f.file_name().to_string_lossy().into_owned();
            if name.bytes().all(|b| b.is_ascii_digit()) && f.metadata().unwrap().len() >= 8192 {
                return f.path();
            }
        }
    }
    panic!("no relation file under {}", base.display());
}

fn backup_data(repo: &Path, id: &Value) -> PathBuf {
    repo.join("backup").join(id.as_str().unwrap()).join("data")
}

#[track_caller]
fn verify_fails_naming(c: &Cluster, repo: &Path, id: &Value, needle: &str) {
    let out = run(c, repo, &["backup", "verify", id.as_str().unwrap()]);
    assert_exit(&out, 1);
    let report = json(&out);
    assert_eq!(report["status"], "failed");
    let problems = report["problems"].to_string();
    assert!(
        problems.contains(needle),
        "{needle} not named in {problems}"
    );
}

#[test]
fn verify_catches_a_deleted_file_a_corrupted_file_and_a_missing_wal_segment() {
    let (c, repo) = archiving(Version::V18, "", &[]);
    write_rows(&c, 20_000);

    let deleted = backup(&c, &repo, &[])["id"].clone();
    let victim = some_data_file(&backup_data(&repo, &deleted));
    std::fs::remove_file(&victim).unwrap();
    let rel = victim
        .strip_prefix(backup_data(&repo, &deleted))
        .unwrap()
        .display()
        .to_string();
    verify_fails_naming(&c, &repo, &deleted, &rel);

    let corrupted = backup(&c, &repo, &[])["id"].clone();
    let victim = some_data_file(&backup_data(&repo, &corrupted));
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[4000] ^= 0xFF;
    std::fs::write(&victim, bytes).unwrap();
    let rel = victim
        .strip_prefix(backup_data(&repo, &corrupted))
        .unwrap()
        .display()
        .to_string();
    verify_fails_naming(&c, &repo, &corrupted, &rel);

    let walless = backup(&c, &repo, &[]);
    let first = walless["wal_ranges"][0]["start_lsn"].as_str().unwrap();
    let segment: String = c
        .client()
        .query_one("SELECT pg_walfile_name($1::text::pg_lsn)", &[&first])
        .unwrap()
        .get(0);
    std::fs::remove_file(repo.join("archive").join(&segment[..16]).join(&segment)).unwrap();
    verify_fails_naming(&c, &repo, &walless["id"], &segment);

    let list = json(&run(&c, &repo, &["backup", "list"]));
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .all(|b| b["verification"]["status"] == "failed"),
        "results recorded: {list}"
    );
}

#[test]
fn wal_verify_reports_ranges_a_gap_and_a_backup_whose_wal_is_cut() {
    let (c, repo) = archiving(Version::V18, "", &[]);
    let mut closed = Vec::new();
    for _ in 0..4 {
        write_rows(&c, 2_000);
        closed.push(switch_and_wait_archived(&c));
    }
    let b = backup(&c, &repo, &[]);
    write_rows(&c, 2_000);
    switch_and_wait_archived(&c);

    let out = run(&c, &repo, &["wal", "verify"]);
    assert_exit(&out, 0);
    let report = json(&out);
    assert_eq!(
        report["timelines"][0]["ranges"].as_array().unwrap().len(),
        1,
        "{report}"
    );
    assert_eq!(report["backups"][0]["missing"].as_array().unwrap().len(), 0);
    let until = report["backups"][0]["reachable"][0]["until_lsn"]
        .as_str()
        .unwrap();
    let stop = b["stop_lsn"].as_str().unwrap();
    let later: bool = c
        .client()
        .query_one(
            "SELECT $1::text::pg_lsn > $2::text::pg_lsn",
            &[&until, &stop],
        )
        .unwrap()
        .get(0);
    assert!(
        later,
        "the PITR window reaches past the consistency point: {until} vs {stop}"
    );

    // A gap before the backup: reported, but no backup needs it.
    let cut = &closed[1];
    std::fs::remove_file(repo.join("archive").join(&cut[..16]).join(cut)).unwrap();
    let out = run(&c, &repo, &["wal", "verify"]);
    assert_exit(&out, 0);
    let gaps = &json(&out)["timelines"][0]["gaps"];
    assert_eq!(gaps[0]["first"], cut.as_str(), "{gaps}");
    assert_eq!(gaps[0]["segments"], 1);

    // A segment the backup needs: the archive no longer restores it.
    let first = b["wal_ranges"][0]["start_lsn"].as_str().unwrap();
    let needed: String = c
        .client()
        .query_one("SELECT pg_walfile_name($1::text::pg_lsn)", &[&first])
        .unwrap()
        .get(0);
    let path = repo.join("archive").join(&needed[..16]).join(&needed);
    let saved = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let out = run(&c, &repo, &["wal", "verify"]);
    assert_exit(&out, 1);
    assert_eq!(json(&out)["backups"][0]["missing"][0], needed.as_str());

    // Put it back corrupted: the checksum, not the name, decides.
    let mut bad = saved;
    let at = bad.len() - 10;
    bad[at] ^= 0x01;
    std::fs::write(&path, bad).unwrap();
    let out = run(&c, &repo, &["wal", "verify"]);
    assert_exit(&out, 1);
    assert_eq!(json(&out)["corrupt"][0]["name"], needed.as_str());
}

#[test]
fn expire_keeps_a_chain_whose_full_is_past_the_count_and_the_wal_it_needs() {
    let (c, repo) = archiving(Version::V18, "", &[("summarize_wal", "on")]);
    write_rows(&c, 5_000);
    let f1 = backup(&c, &repo, &[])["id"].clone();
    write_rows(&c, 500);
    let i1 = backup(&c, &repo, &["--incremental"])["id"].clone();
    write_rows(&c, 500);
    let f2 = backup(&c, &repo, &[])["id"].clone();
    write_rows(&c, 500);
    // An incremental on the older chain, taken after the newer full backup.
    let i2 = backup(
        &c,
        &repo,
        &["--incremental", "--parent", i1.as_str().unwrap()],
    )["id"]
        .clone();
    switch_and_wait_archived(&c);

    let plan = json(&run(&c, &repo, &["backup", "expire", "--retain-full", "1"]));
    let kept = ids(&plan["keep"]);
    assert_eq!(
        kept.len(),
        4,
        "F1 is past the count, but I2 needs I1 and F1: {plan}"
    );
    assert!(plan["expire"].as_array().unwrap().is_empty(), "{plan}");
    let f1_reason = plan["keep"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == f1)
        .unwrap()["reason"]
        .to_string();
    assert!(f1_reason.contains("depends on it"), "{f1_reason}");

    // A newer full backup: now the whole older chain and its WAL can go.
    write_rows(&c, 500);
    let f3 = backup(&c, &repo, &[]);
    let plan = json(&run(&c, &repo, &["backup", "expire", "--retain-full", "1"]));
    let expired = ids(&plan["expire"]);
    for id in [&f1, &i1, &f2, &i2] {
        assert!(
            expired.contains(&id.as_str().unwrap().to_owned()),
            "{id} expires: {plan}"
        );
    }
    assert!(!plan["expire_wal"].as_array().unwrap().is_empty());
    assert_eq!(plan["applied"], false);
    assert!(
        repo.join("backup").join(f1.as_str().unwrap()).exists(),
        "a dry run deletes nothing"
    );

    let out = run(
        &c,
        &repo,
        &["backup", "expire", "--retain-full", "1", "--apply"],
    );
    assert_exit(&out, 0);
    assert_eq!(
        ids(&json(&run(&c, &repo, &["backup", "list"]))),
        [f3["id"].as_str().unwrap()]
    );
    let wal = json(&run(&c, &repo, &["wal", "verify"]));
    assert_eq!(
        wal["ok"], true,
        "everything the kept backup needs is still there: {wal}"
    );
    assert_exit(&run(&c, &repo, &["backup", "verify"]), 0);
}

#[test]
fn pg15_restore_point_is_recorded_with_lsn_timeline_and_time() {
    let (c, repo) = archiving(Version::V15, "", &[]);
    let out = run(
        &c,
        &repo,
        &["restore-point", "before-migration-42", "--switch-wal"],
    );
    assert_exit(&out, 0);
    let point = json(&out);
    assert_eq!(point["name"], "before-migration-42");
    assert_eq!(point["timeline"], 1);
    let lsn = point["lsn"].as_str().unwrap();
    let before_now: bool = c
        .client()
        .query_one("SELECT $1::text::pg_lsn <= pg_current_wal_lsn()", &[&lsn])
        .unwrap()
        .get(0);
    assert!(before_now);
    let recorded: Value =
        serde_json::from_str(&std::fs::read_to_string(repo.join("restore-points.json")).unwrap())
            .unwrap();
    assert_eq!(recorded[0], point);

    let again = run(&c, &repo, &["restore-point", "before-migration-42"]);
    assert_exit(&again, 3);
    assert!(
        stderr(&again).contains("already recorded"),
        "{}",
        stderr(&again)
    );
}

#[test]
fn status_reports_as_json_and_as_prometheus_text() {
    let (c, repo) = archiving(Version::V18, "", &[]);
    write_rows(&c, 1_000);
    backup(&c, &repo, &[]);
    switch_and_wait_archived(&c);

    let out = run(&c, &repo, &["status"]);
    assert_exit(&out, 0);
    let s = json(&out);
    let sysid: String = c
        .client()
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(s["server"]["system_identifier"], sysid.as_str());
    assert_eq!(s["archiver"]["failed_count"], 0);
    assert!(s["archiver"]["archived_count"].as_i64().unwrap() >= 2);
    assert_eq!(s["archive"]["lag_segments"], 0, "{s}");
    assert_eq!(s["backups"]["usable"], 1);
    assert!(s["databases"]
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["name"] == "postgres"));

    let out = reentry(
        false,
        &[
            "--repo",
            repo.to_str().unwrap(),
            "status",
            "--prometheus",
            "--db",
            &c.conninfo(),
        ],
    );
    assert_exit(&out, 0);
    let text = stdout(&out);
    let mut samples = std::collections::HashMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample: {line:?}"));
        assert!(name.starts_with("reentry_"), "{line}");
        samples.insert(
            name.to_owned(),
            value
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("not a number: {line:?}")),
        );
    }
    assert_eq!(samples["reentry_up"], 1.0);
    assert_eq!(samples["reentry_archiver_failed_total"], 0.0);
    assert_eq!(samples["reentry_backups"], 1.0);
    assert!(
        samples.contains_key("reentry_database_size_bytes{database=\"postgres\"}"),
        "{text}"
    );
    for help in text.lines().filter(|l| l.starts_with("# TYPE")) {
        assert!(
            help.ends_with(" gauge") || help.ends_with(" counter"),
            "{help}"
        );
    }
}

#[test]
fn check_passes_and_then_fails_when_archive_command_is_broken() {
    let (c, repo) = archiving(Version::V18, "", &[]);
    let out = run(&c, &repo, &["check"]);
    assert_exit(&out, 0);
    let segment = json(&out)["segment"].as_str().unwrap().to_owned();
    assert!(repo
        .join("archive")
        .join(&segment[..16])
        .join(&segment)
        .exists());

    let mut db = c.client();
    db.batch_execute("ALTER SYSTEM SET archive_command = '/bin/false'")
        .unwrap();
    db.batch_execute("SELECT pg_reload_conf()").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let out = run(&c, &repo, &["check", "--timeout", "5"]);
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains("did not reach the archive")
            && stderr(&out).contains("archive_command failed"),
        "{}",
        stderr(&out)
    );
}

/// Tablespaces are not supported yet: a backup refuses, naming them, and
/// writes nothing (pg_basebackup would write them to their production paths).
#[test]
fn a_backup_of_a_cluster_with_a_tablespace_is_refused_and_writes_nothing() {
    let (c, repo) = archiving(Version::V18, "", &[]);
    let location = c.dir("ts1");
    let mut db = c.client();
    db.batch_execute(&format!(
        "CREATE TABLESPACE ts1 LOCATION '{}'",
        location.display()
    ))
    .unwrap();
    db.batch_execute("CREATE TABLE kept (x int) TABLESPACE ts1")
        .unwrap();
    let out = run(&c, &repo, &["backup"]);
    assert_exit(&out, 3);
    let err = stderr(&out);
    assert!(
        err.contains(&format!("ts1 ({})", location.display())) && err.contains("tablespaces"),
        "{err}"
    );
    assert!(
        !repo.join("backup").exists()
            || std::fs::read_dir(repo.join("backup")).unwrap().count() == 0
    );
}

#[test]
fn sync_catalog_deletes_only_its_own_repositorys_rows_and_nothing_for_a_wrong_repo() {
    let (c, repo) = archiving(Version::V18, "", &[]);
    let full = backup(&c, &repo, &[]);
    assert_exit(
        &run(
            &c,
            &repo,
            &["backup", "list", "--sync-catalog", &c.conninfo()],
        ),
        0,
    );
    // Another repository's backup, and one of this repository's that it no
    // longer has.
    let mine = format!("file://{}/backup/gone/data", repo.display());
    c.client()
        .execute(
            "INSERT INTO backup_catalog (backup_id, cluster_name, backup_type, started_at, finished_at, storage_uri)
             VALUES ('other-1', 'other', 'base_full', now(), now(), 's3://other-bucket/repo/backup/other-1/'),
                    ('other-2', 'other', 'base_full', now(), now(), 'file:///srv/other-repo/backup/other-2/data'),
                    ('gone', 'mine', 'base_full', now(), now(), $1)",
            &[&mine],
        )
        .unwrap();
    let rows = || -> Vec<String> {
        c.client()
            .query(
                "SELECT backup_id FROM backup_catalog ORDER BY backup_id",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    let out = run(
        &c,
        &repo,
        &["backup", "list", "--sync-catalog", &c.conninfo()],
    );
    assert_exit(&out, 0);
    let id = full["id"].as_str().unwrap().to_owned();
    let mut want = vec![id, "other-1".to_owned(), "other-2".to_owned()];
    want.sort();
    assert_eq!(
        rows(),
        want,
        "the other repository's rows stay; its own gone row goes"
    );

    // A copy of this repository (`repo copy`) synced first: the row of a
    // backup both hold is the copy's, and stays the copy's.
    let copy = format!("s3://copy-bucket/repo/backup/{}/", want[0]);
    c.client()
        .execute(
            "UPDATE backup_catalog SET storage_uri = $1 WHERE backup_id = $2",
            &[&copy, &want[0]],
        )
        .unwrap();
    let out = run(
        &c,
        &repo,
        &["backup", "list", "--sync-catalog", &c.conninfo()],
    );
    assert_exit(&out, 0);
    let at: String = c
        .client()
        .query_one(
            "SELECT storage_uri FROM backup_catalog WHERE backup_id = $1",
            &[&want[0]],
        )
        .unwrap()
        .get(0);
    assert_eq!(at, copy, "the copy's row was taken over");
    assert!(
        stderr(&out).contains("another repository's") && stderr(&out).contains(&copy),
        "{}",
        stderr(&out)
    );

    // A mistyped --repo: nothing deleted, and why.
    let typo = repo.with_file_name("no-such-repo");
    let out = run(
        &c,
        &typo,
        &["backup", "list", "--sync-catalog", &c.conninfo()],
    );
    assert_exit(&out, 3);
    assert!(
        stderr(&out)
            .contains("has no archive.json: is --repo right? backup_catalog was left as it is"),
        "{}",
        stderr(&out)
    );
    assert_eq!(rows(), want);
}

/// The kernel's own view of reentry's connection (`ss -o`): TCP
/// keepalives on, first probe after 30 s idle, not the system's 2 h, so a
/// half-open connection cannot hang a step for hours.
#[test]
fn a_postgresql_connection_probes_its_peer_after_30_seconds_idle() {
    let mut c = Cluster::init(Version::V18);
    c.start();
    let mut db = reentry::pg::conn::Db::connect(Some(&c.conninfo())).unwrap();
    db.query_one("probe", "SELECT 1", &[]).unwrap();
    let out = std::process::Command::new("ss")
        .args([
            "-tno",
            "state",
            "established",
            "dport",
            "=",
            &format!(":{}", c.port),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let timers: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split("timer:(").nth(1))
        .collect();
    assert_eq!(timers.len(), 1, "one connection of ours: {text}");
    let (kind, rest) = timers[0].split_once(',').unwrap();
    assert_eq!(kind, "keepalive", "{text}");
    let secs: f64 = rest
        .split([',', ')'])
        .next()
        .unwrap()
        .trim_end_matches("sec")
        .parse()
        .unwrap_or_else(|_| panic!("a keepalive timer in seconds: {text}"));
    assert!(secs <= 30.0, "{text}");
    drop(db);
}
