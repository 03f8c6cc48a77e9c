//! Labels the repository does not vouch for: whoever can write into the
//! repository (the database host archives there) can plant a `backup.json`.
//! One that does not check out is refused, by name, and `expire` then
//! changes nothing, against a real PostgreSQL 18 archiving into a local
//! repository.

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

use crate::common::archiving::{archiving, switch_and_wait_archived};
use crate::common::pg::{Cluster, Version};
use crate::common::{assert_exit, reentry, stderr, stdout};

/// Exit 3: refused to protect data; a person must look.
const REFUSED: i32 = 3;

fn run(repo: &Path, args: &[&str]) -> Output {
    let mut all = vec!["--repo", repo.to_str().unwrap(), "--json"];
    all.extend_from_slice(args);
    reentry(false, &all)
}

/// A cluster archiving into a local repository with one full backup whose
/// WAL is archived: the cluster, the repository and the backup's label.
fn one_backup() -> (Cluster, PathBuf, Value) {
    let (c, repo) = archiving(Version::V18, "", &[]);
    c.client()
        .batch_execute("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 1000) g")
        .unwrap();
    let conninfo = c.conninfo();
    let bin = c.version.bin_dir();
    let out = reentry(
        false,
        &[
            "--repo",
            repo.to_str().unwrap(),
            "--json",
            "backup",
            "--db",
            &conninfo,
            "--pg-bin",
            bin.to_str().unwrap(),
        ],
    );
    assert_exit(&out, 0);
    let label: Value = serde_json::from_str(&stdout(&out)).unwrap();
    switch_and_wait_archived(&c);
    (c, repo, label)
}

/// Writes `label` at `backup/KEY/backup.json`, as a planted label is.
fn plant(repo: &Path, key: &str, label: &Value) {
    let dir = repo.join("backup").join(key);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("backup.json"),
        serde_json::to_vec_pretty(label).unwrap(),
    )
    .unwrap();
}

/// Every file under `dir`, relative to it, sorted.
fn files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// `expire --retain-full 1 --apply` is refused with exit 3, names the
/// label and says what is wrong with it, and deletes nothing: no backup,
/// no WAL file.
#[track_caller]
fn expire_is_refused(repo: &Path, genuine: &str, names: &str) -> String {
    let before = files(repo);
    let out = run(repo, &["backup", "expire", "--retain-full", "1", "--apply"]);
    assert_exit(&out, REFUSED);
    let err = stderr(&out);
    assert!(err.contains("refusing to expire anything"), "{err}");
    assert!(err.contains(names), "{err}");
    assert!(err.contains("nothing was deleted"), "{err}");
    assert_eq!(files(repo), before, "expire changed the repository");
    assert!(repo.join("backup").join(genuine).join("data").is_dir());
    // The dry run is refused the same way: its plan would be steered too.
    let dry = run(repo, &["backup", "expire", "--retain-full", "1"]);
    assert_exit(&dry, REFUSED);
    err
}

#[test]
fn a_planted_label_whose_id_is_a_victims_path_is_refused_and_expire_deletes_nothing() {
    let (c, repo, genuine) = one_backup();
    let gid = genuine["id"].as_str().unwrap().to_owned();
    // The review's reproduction: a copy of a real label at backup/zz whose
    // id is a directory outside the repository, dated long ago, with the
    // directories the rename aside would need.
    let victim = c.dir("victim");
    std::fs::write(victim.join("precious"), "keep me").unwrap();
    let mut planted = genuine.clone();
    planted["id"] = victim.to_str().unwrap().into();
    planted["start_time"] = "2000-01-01T00:00:00Z".into();
    planted["stop_time"] = "2000-01-01T00:00:00Z".into();
    planted["status"] = "complete".into();
    plant(&repo, "zz", &planted);
    std::fs::create_dir_all(
        repo.join("backup")
            .join(format!(".expiring-{}", victim.parent().unwrap().display())),
    )
    .unwrap();

    expire_is_refused(
        &repo,
        &gid,
        &format!(
            r#"backup/zz/backup.json: id "{}" does not match its key "zz""#,
            victim.display()
        ),
    );
    assert_eq!(
        std::fs::read_to_string(victim.join("precious")).unwrap(),
        "keep me"
    );

    // Listed as refused, never as a backup.
    let list = run(&repo, &["backup", "list"]);
    assert_exit(&list, 0);
    let ids: Vec<Value> = serde_json::from_str::<Vec<Value>>(&stdout(&list))
        .unwrap()
        .into_iter()
        .map(|b| b["id"].clone())
        .collect();
    assert_eq!(ids, [genuine["id"].clone()]);
    assert!(
        stderr(&list).contains("backup/zz/backup.json"),
        "{}",
        stderr(&list)
    );
}

#[test]
fn a_label_dated_in_the_future_does_not_take_retentions_newest_slot() {
    let (_c, repo, genuine) = one_backup();
    let gid = genuine["id"].as_str().unwrap().to_owned();
    // A well-formed, later id at its own key, dated far ahead, its WAL
    // further on: without the check it is "the newest full backup" and
    // the genuine one, with the WAL before the fake start, is expired.
    let fake = "29990101-000000F";
    let mut planted = genuine.clone();
    planted["id"] = fake.into();
    planted["start_time"] = "2999-01-01T00:00:00.000Z".into();
    planted["stop_time"] = "2999-01-01T00:01:00.000Z".into();
    planted["start_lsn"] = "FF/1000028".into();
    planted["stop_lsn"] = "FF/1000100".into();
    planted["wal_ranges"] =
        serde_json::json!([{"timeline": 1, "start_lsn": "FF/1000028", "end_lsn": "FF/1000100"}]);
    plant(&repo, fake, &planted);

    let err = expire_is_refused(
        &repo,
        &gid,
        &format!(
            "backup/{fake}/backup.json: its start_time 2999-01-01T00:00:00.000Z is in the future"
        ),
    );
    assert!(err.contains("5 minutes of clock skew"), "{err}");
}

#[test]
fn a_label_of_another_system_identifier_is_refused() {
    let (_c, repo, genuine) = one_backup();
    let gid = genuine["id"].as_str().unwrap().to_owned();
    let other = "20000101-000000F";
    let mut planted = genuine.clone();
    planted["id"] = other.into();
    planted["system_identifier"] = "1234567890123456789".into();
    planted["start_lsn"] = "FF/1000028".into();
    planted["stop_lsn"] = "FF/1000100".into();
    planted["wal_ranges"] =
        serde_json::json!([{"timeline": 1, "start_lsn": "FF/1000028", "end_lsn": "FF/1000100"}]);
    plant(&repo, other, &planted);

    let err = expire_is_refused(
        &repo,
        &gid,
        &format!("backup/{other}/backup.json: it is of system identifier 1234567890123456789"),
    );
    assert!(
        err.contains(&format!(
            "the archive (archive.json) of {}",
            genuine["system_identifier"].as_str().unwrap()
        )),
        "{err}"
    );
}

/// Signing is optional on an unencrypted repository, and checked wherever
/// a verify key is set: a local backup signed by the backup host, then a
/// well-formed label dated now with its WAL further on, unsigned. Without
/// the signature check, `expire --retain-full 1 --apply` would keep it as
/// the newest full backup and delete the genuine one with its WAL; with
/// the verify key it is ignored and left alone, and the genuine backup and
/// its WAL stay.
#[test]
fn with_a_verify_key_an_unsigned_label_is_ignored_by_expire_and_deletes_nothing_genuine() {
    let (c, repo) = archiving(Version::V18, "", &[]);
    c.client()
        .batch_execute("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 1000) g")
        .unwrap();
    let (signing, verify) = crate::common::signing_key(&c.dir("keys"));
    let (conninfo, bin) = (c.conninfo(), c.version.bin_dir());
    let out = run(
        &repo,
        &[
            "--signing-key",
            signing.to_str().unwrap(),
            "backup",
            "--db",
            &conninfo,
            "--pg-bin",
            bin.to_str().unwrap(),
        ],
    );
    assert_exit(&out, 0);
    let genuine: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let gid = genuine["id"].as_str().unwrap().to_owned();
    assert_eq!(genuine["signature"]["algorithm"], "ed25519", "{genuine}");
    switch_and_wait_archived(&c);
    switch_and_wait_archived(&c);
    let lsn: String = c
        .client()
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .unwrap()
        .get(0);
    // The planted label's id is the second it is made in: not the genuine
    // backup's second, which it would overwrite on a fast machine.
    let (now, fake) = loop {
        let now = std::time::SystemTime::now();
        let digits: String = humantime::format_rfc3339_seconds(now)
            .to_string()
            .chars()
            .filter(char::is_ascii_digit)
            .collect();
        let fake = format!("{}-{}F", &digits[..8], &digits[8..14]);
        if fake != gid {
            break (now, fake);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let mut planted = genuine.clone();
    planted.as_object_mut().unwrap().remove("signature");
    let when = humantime::format_rfc3339_millis(now).to_string();
    planted["id"] = fake.as_str().into();
    planted["start_time"] = when.clone().into();
    planted["stop_time"] = when.into();
    planted["start_lsn"] = lsn.as_str().into();
    planted["stop_lsn"] = lsn.as_str().into();
    planted["wal_ranges"] = serde_json::json!([{"timeline": 1, "start_lsn": lsn, "end_lsn": lsn}]);
    plant(&repo, &fake, &planted);
    let first_needed = {
        let start = genuine["wal_ranges"][0]["start_lsn"].as_str().unwrap();
        let (hi, lo) = start.split_once('/').unwrap();
        let segno = ((u64::from_str_radix(hi, 16).unwrap() << 32)
            | u64::from_str_radix(lo, 16).unwrap())
            >> 24;
        format!("{:08X}{:08X}{:08X}", 1, segno >> 8, segno & 0xff)
    };
    let wal_from_backup: Vec<String> = files(&repo.join("archive"))
        .into_iter()
        .filter(|f| {
            let name = f.rsplit('/').next().unwrap();
            name.len() >= 24 && name[..24] >= *first_needed
        })
        .collect();
    assert!(!wal_from_backup.is_empty());

    let out = run(
        &repo,
        &[
            "--verify-key",
            &verify,
            "backup",
            "expire",
            "--retain-full",
            "1",
            "--apply",
        ],
    );
    assert_exit(&out, 0);
    let p: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(p["keep"][0]["id"], gid.as_str(), "{p}");
    assert_eq!(p["expire"], serde_json::json!([]), "{p}");
    assert_eq!(
        p["ignored"][0]["key"],
        format!("backup/{fake}/backup.json"),
        "{p}"
    );
    assert!(
        p["ignored"][0]["problem"]
            .as_str()
            .unwrap()
            .contains("it is not signed"),
        "{p}"
    );
    assert!(stderr(&out).contains(&format!("backup/{fake}/backup.json")));
    assert!(repo.join("backup").join(&gid).join("data").is_dir());
    assert!(repo
        .join("backup")
        .join(&fake)
        .join("backup.json")
        .is_file());
    let after = files(&repo.join("archive"));
    for f in &wal_from_backup {
        assert!(after.contains(f), "{f} was deleted");
    }
}

/// `reentry --repo REPO --json --verify-key KEY ARGS…` as the server user
/// (restore refuses to run as root).
fn as_server(c: &Cluster, repo: &Path, verify: &str, args: &[&str]) -> Output {
    let mut all = vec!["--verify-key", verify];
    all.extend_from_slice(args);
    crate::common::restored::run(c, repo, &all)
}

/// Review #1, a plain local backup: its signed label records the SHA-256
/// of its `backup_manifest`. A changed manifest is refused by restore,
/// verify and copy, naming it, and a catalog sync records no row of the
/// refused backup; a changed file that the manifest still lists as it was
/// is refused by restore and by copy, in the read that copies it, naming
/// the file. Nothing is restored or copied.
#[test]
fn a_signed_plain_backups_changed_manifest_or_file_is_refused() {
    let (c, repo) = archiving(Version::V18, "", &[]);
    c.client()
        .batch_execute("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 1000) g")
        .unwrap();
    let (signing, verify) = crate::common::signing_key(&c.dir("keys"));
    let out = crate::common::restored::run(
        &c,
        &repo,
        &["--signing-key", signing.to_str().unwrap(), "backup"],
    );
    assert_exit(&out, 0);
    let b: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let id = b["id"].as_str().unwrap().to_owned();
    assert!(
        b["objects"]["backup_manifest"]
            .as_str()
            .is_some_and(|c| c.starts_with("sha256:")),
        "{b}"
    );
    switch_and_wait_archived(&c);
    let data = repo.join("backup").join(&id).join("data");
    let manifest = data.join("backup_manifest");
    let genuine = std::fs::read(&manifest).unwrap();
    // The manifest of a changed backup: one byte more.
    let mut changed = genuine.clone();
    changed.push(b'\n');
    std::fs::write(&manifest, &changed).unwrap();
    let names = format!("{}: its checksum is", manifest.display());
    let to = c.root().join("restored");
    let empty = |d: &Path| !d.exists() || std::fs::read_dir(d).unwrap().next().is_none();
    for args in [
        vec!["restore", "--latest", "--to", to.to_str().unwrap()],
        vec!["backup", "verify", &id],
    ] {
        let out = as_server(&c, &repo, &verify, &args);
        assert_exit(&out, REFUSED);
        assert!(stderr(&out).contains(&names), "{args:?}: {}", stderr(&out));
    }
    assert!(empty(&to), "restore wrote into its target");
    let second = c.dir("second");
    let out = as_server(
        &c,
        &repo,
        &verify,
        &[
            "--signing-key",
            signing.to_str().unwrap(),
            "repo",
            "copy",
            "--to",
            second.to_str().unwrap(),
        ],
    );
    assert_exit(&out, REFUSED);
    assert!(stderr(&out).contains(&names), "{}", stderr(&out));
    assert!(!second.join("backup").exists(), "copy wrote a backup");
    // A catalog sync names the refused backup and records no row of it.
    let out = as_server(
        &c,
        &repo,
        &verify,
        &["backup", "list", "--sync-catalog", &c.conninfo()],
    );
    assert_exit(&out, 0);
    assert!(stderr(&out).contains(&names), "{}", stderr(&out));
    let rows: i64 = c
        .client()
        .query_one(
            "SELECT count(*) FROM backup_catalog WHERE backup_id = $1",
            &[&id],
        )
        .unwrap()
        .get(0);
    assert_eq!(rows, 0, "a refused backup was catalogued");

    // The manifest as signed, a file changed under it (same size): each
    // file is checked as it is copied.
    std::fs::write(&manifest, &genuine).unwrap();
    let version = data.join("PG_VERSION");
    let mut text = std::fs::read(&version).unwrap();
    text[0] = if text[0] == b'9' { b'8' } else { b'9' };
    std::fs::write(&version, &text).unwrap();
    let names = format!("{}: its SHA-256 is", version.display());
    let out = as_server(
        &c,
        &repo,
        &verify,
        &["restore", "--latest", "--to", to.to_str().unwrap()],
    );
    assert_exit(&out, REFUSED);
    let err = stderr(&out);
    assert!(
        err.contains(&names) && err.contains(&format!("backup {id}'s signed label vouches for")),
        "{err}"
    );
    assert!(empty(&to), "restore wrote into its target");
    let out = as_server(
        &c,
        &repo,
        &verify,
        &[
            "--signing-key",
            signing.to_str().unwrap(),
            "repo",
            "copy",
            "--to",
            second.to_str().unwrap(),
        ],
    );
    assert_exit(&out, REFUSED);
    assert!(stderr(&out).contains(&names), "{}", stderr(&out));
    let there = second.join("backup");
    assert!(
        !there.exists() || files(&there).is_empty(),
        "copy left the refused backup's files: {:?}",
        files(&there)
    );
}

/// The brief: a signed plain backup, against PostgreSQL 18. What restore
/// copies is checked file by file against the manifest the signed label
/// vouches for, with no ignore list: a recovery target planted in
/// `postgresql.auto.conf` (which pg_verifybackup skips, and reentry's own
/// settings are appended to) is refused, naming the file, and never
/// reaches a running copy; so is a `standby.signal` the manifest does not
/// list. Nothing of `pg_wal/` is copied: WAL comes from the archive only,
/// and the untampered backup restores to the latest WAL through it.
#[test]
fn a_setting_planted_in_a_signed_plain_backup_never_reaches_a_copy_and_its_pg_wal_is_not_copied() {
    let (c, repo) = archiving(Version::V18, "", &[]);
    c.client()
        .batch_execute("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 1000) g")
        .unwrap();
    let (signing, verify) = crate::common::signing_key(&c.dir("keys"));
    let out = crate::common::restored::run(
        &c,
        &repo,
        &["--signing-key", signing.to_str().unwrap(), "backup"],
    );
    assert_exit(&out, 0);
    let b: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let id = b["id"].as_str().unwrap().to_owned();
    let stop: String = c
        .client()
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .unwrap()
        .get(0);
    c.client()
        .batch_execute("INSERT INTO t SELECT g FROM generate_series(1001, 2000) g")
        .unwrap();
    switch_and_wait_archived(&c);
    let data = repo.join("backup").join(&id).join("data");
    let manifest = std::fs::read_to_string(data.join("backup_manifest")).unwrap();
    assert!(
        manifest.contains("\"Path\": \"postgresql.auto.conf\""),
        "reentry's backups list postgresql.auto.conf in their manifest"
    );
    let to = c.root().join("restored");
    let empty = |d: &Path| !d.exists() || std::fs::read_dir(d).unwrap().next().is_none();
    let restore = || {
        let out = as_server(
            &c,
            &repo,
            &verify,
            &["restore", "--latest", "--to", to.to_str().unwrap()],
        );
        // Stops a copy that started, whatever the test finds.
        let guard = crate::common::restored::Restored {
            manifest: Value::Null,
            dir: to.clone(),
            bin: c.version.bin_dir(),
        };
        (out, guard)
    };

    // Stop just after the backup and open there: without the check the
    // copy has 1000 rows, not 2000, and is promoted where the planter chose.
    let auto = data.join("postgresql.auto.conf");
    let genuine = std::fs::read(&auto).unwrap();
    let mut planted = genuine.clone();
    planted.extend(
        format!("recovery_target_lsn = '{stop}'\nrecovery_target_action = 'promote'\n").bytes(),
    );
    std::fs::write(&auto, &planted).unwrap();
    let (out, guard) = restore();
    assert_exit(&out, REFUSED);
    let err = stderr(&out);
    assert!(
        err.contains(&format!("{}: ", auto.display()))
            && err.contains(&format!("backup {id}'s signed label vouches for")),
        "{err}"
    );
    assert!(empty(&to), "restore wrote into its target");
    drop(guard);
    std::fs::write(&auto, &genuine).unwrap();

    // A signal file the manifest does not list.
    let signal = data.join("standby.signal");
    std::fs::write(&signal, "").unwrap();
    let (out, guard) = restore();
    assert_exit(&out, REFUSED);
    let err = stderr(&out);
    assert!(
        err.contains(&format!("{}: the manifest", signal.display()))
            && err.contains("does not list it"),
        "{err}"
    );
    assert!(empty(&to), "restore wrote into its target");
    drop(guard);
    std::fs::remove_file(&signal).unwrap();

    // A timeline history planted in pg_wal/: not copied, not used.
    let history = data.join("pg_wal").join("00000009.history");
    std::fs::write(&history, "1\t0/1000000\tplanted\n").unwrap();
    let (out, mut r) = restore();
    assert_exit(&out, 0);
    r.manifest = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(r.count("t"), 2000);
    assert_eq!(r.manifest["timeline"], 2, "{}", r.manifest);
    let copied: Vec<String> = std::fs::read_dir(to.join("pg_wal"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !copied.iter().any(|f| f == "00000009.history"),
        "the planted history was copied: {copied:?}"
    );
    assert!(
        r.manifest["wal_segments_replayed"].as_u64().unwrap() >= 1,
        "WAL came from the archive: {}",
        r.manifest
    );
}

/// An incremental chain of signed plain backups (PostgreSQL 18) is
/// combined from copies checked as they were made, never from the
/// repository: it restores, and a setting planted in the incremental
/// backup's `postgresql.auto.conf` is refused, naming it.
#[test]
fn a_signed_plain_incremental_chain_is_combined_from_checked_copies() {
    let (c, repo) = archiving(Version::V18, "", &[("summarize_wal", "on")]);
    c.client()
        .batch_execute("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 1000) g")
        .unwrap();
    let (signing, verify) = crate::common::signing_key(&c.dir("keys"));
    let backup = |more: &[&str]| {
        let mut args = vec!["--signing-key", signing.to_str().unwrap(), "backup"];
        args.extend_from_slice(more);
        let out = crate::common::restored::run(&c, &repo, &args);
        assert_exit(&out, 0);
        serde_json::from_str::<Value>(&stdout(&out)).unwrap()
    };
    backup(&[]);
    c.client()
        .batch_execute("INSERT INTO t SELECT g FROM generate_series(1001, 1500) g")
        .unwrap();
    let inc = backup(&["--incremental"]);
    let iid = inc["id"].as_str().unwrap().to_owned();
    c.client()
        .batch_execute("INSERT INTO t SELECT g FROM generate_series(1501, 2000) g")
        .unwrap();
    switch_and_wait_archived(&c);

    let to = c.root().join("restored");
    let auto = repo
        .join("backup")
        .join(&iid)
        .join("data")
        .join("postgresql.auto.conf");
    let genuine = std::fs::read(&auto).unwrap();
    let mut planted = genuine.clone();
    planted.extend(
        format!(
            "recovery_target_lsn = '{}'\nrecovery_target_action = 'promote'\n",
            inc["stop_lsn"].as_str().unwrap()
        )
        .bytes(),
    );
    std::fs::write(&auto, &planted).unwrap();
    let out = as_server(
        &c,
        &repo,
        &verify,
        &["restore", "--latest", "--to", to.to_str().unwrap()],
    );
    let guard = crate::common::restored::Restored {
        manifest: Value::Null,
        dir: to.clone(),
        bin: c.version.bin_dir(),
    };
    assert_exit(&out, REFUSED);
    assert!(
        stderr(&out).contains(&format!("{}: ", auto.display())),
        "{}",
        stderr(&out)
    );
    assert!(
        !to.exists() || std::fs::read_dir(&to).unwrap().next().is_none(),
        "restore wrote into its target"
    );
    drop(guard);

    std::fs::write(&auto, &genuine).unwrap();
    let out = as_server(
        &c,
        &repo,
        &verify,
        &["restore", "--latest", "--to", to.to_str().unwrap()],
    );
    let r = crate::common::restored::Restored::from_output(&c, to.clone(), &out);
    assert_eq!(r.manifest["backup_chain"].as_array().unwrap().len(), 2);
    assert_eq!(r.count("t"), 2000);
}

/// Review #4: a backup taken before labels were signed is ignored once a
/// verify key is set, yet its WAL is kept: `expire --retain-full 1
/// --apply` after a signed backup deletes none of the WAL from the older
/// backup's start on (counted in the archive on disk), and says which WAL
/// it keeps for which ignored label.
#[test]
fn expire_keeps_the_wal_of_a_backup_taken_before_labels_were_signed() {
    let (c, repo) = archiving(Version::V18, "", &[]);
    c.client()
        .batch_execute("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 1000) g")
        .unwrap();
    let (conninfo, bin) = (c.conninfo(), c.version.bin_dir());
    let backup = |more: &[&str]| {
        let mut args: Vec<&str> = more.to_vec();
        args.extend([
            "backup",
            "--db",
            &conninfo,
            "--pg-bin",
            bin.to_str().unwrap(),
        ]);
        let out = run(&repo, &args);
        assert_exit(&out, 0);
        serde_json::from_str::<Value>(&stdout(&out)).unwrap()
    };
    let old = backup(&[]);
    let oid = old["id"].as_str().unwrap().to_owned();
    assert!(old.get("signature").is_none(), "{old}");
    switch_and_wait_archived(&c);
    switch_and_wait_archived(&c);
    let (signing, verify) = crate::common::signing_key(&c.dir("keys"));
    // Ids are to the second.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let new = backup(&["--signing-key", signing.to_str().unwrap()]);
    let nid = new["id"].as_str().unwrap().to_owned();
    switch_and_wait_archived(&c);
    let segment = |lsn: &str| {
        let (hi, lo) = lsn.split_once('/').unwrap();
        let segno = ((u64::from_str_radix(hi, 16).unwrap() << 32)
            | u64::from_str_radix(lo, 16).unwrap())
            >> 24;
        format!("{:08X}{:08X}{:08X}", 1, segno >> 8, segno & 0xff)
    };
    let old_first = segment(old["wal_ranges"][0]["start_lsn"].as_str().unwrap());
    let new_first = segment(new["wal_ranges"][0]["start_lsn"].as_str().unwrap());
    assert!(old_first < new_first, "{old_first} {new_first}");
    let segments = |from: &str| -> Vec<String> {
        files(&repo.join("archive"))
            .into_iter()
            .filter(|f| {
                let name = f.rsplit('/').next().unwrap();
                name.len() >= 24
                    && name[..24].chars().all(|ch| ch.is_ascii_hexdigit())
                    && name[..24] >= *from
            })
            .collect()
    };
    let old_wal = segments(&old_first);
    let between: Vec<&String> = old_wal
        .iter()
        .filter(|f| f.rsplit('/').next().unwrap()[..24] < *new_first)
        .collect();
    assert!(
        !between.is_empty(),
        "the older backup's WAL before the newer"
    );

    let dry = reentry(
        false,
        &[
            "--repo",
            repo.to_str().unwrap(),
            "--verify-key",
            &verify,
            "backup",
            "expire",
            "--retain-full",
            "1",
        ],
    );
    assert_exit(&dry, 0);
    let text = stdout(&dry);
    assert!(
        text.contains(&format!(
            "keep    WAL from {old_first} on, for ignored label backup/{oid}/backup.json"
        )),
        "{text}"
    );
    let out = run(
        &repo,
        &[
            "--verify-key",
            &verify,
            "backup",
            "expire",
            "--retain-full",
            "1",
            "--apply",
        ],
    );
    assert_exit(&out, 0);
    let p: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(p["keep"][0]["id"], nid.as_str(), "{p}");
    assert_eq!(
        p["ignored"][0]["key"],
        format!("backup/{oid}/backup.json"),
        "{p}"
    );
    assert_eq!(
        p["ignored_wal"],
        serde_json::json!([{"key": format!("backup/{oid}/backup.json"), "kept_from": old_first}]),
        "{p}"
    );
    let after = segments(&old_first);
    for f in &old_wal {
        assert!(after.contains(f), "{f} was deleted: {p}");
    }
    assert!(repo.join("backup").join(&oid).join("data").is_dir());
}
