//! The repository's storage layer against a real S3 API: moto in server
//! mode, which `scripts/services` starts (`REENTRY_TEST_S3`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Barrier;

use reentry::storage::{Cloud, Put, S3Config, Store};

use serde_json::Value;

use crate::common::archiving::{archiving, switch_and_wait_archived};
use crate::common::pg::{Cluster, Version};
use crate::common::restored::{command, ok_json, Restored};
use crate::common::s3proxy::{Fault, S3Proxy};
use crate::common::services::address;
use crate::common::{
    assert_exit, bucket_name, pushes_that_stored, reentry_bin, run_concurrently, stderr, stdout,
};

fn endpoint() -> String {
    address("REENTRY_TEST_S3", "moto, an S3 API")
}

/// A new bucket of this test's own, and a store on `prefix` in it.
fn bucket(test: &str, prefix: &str) -> (String, Cloud) {
    let name = bucket_name(test);
    let r = reqwest::blocking::Client::new()
        .put(format!("{}/{name}", endpoint()))
        .send()
        .expect("create a bucket on moto");
    assert!(
        r.status().is_success(),
        "create bucket {name}: {}",
        r.status()
    );
    (name.clone(), store(&name, prefix))
}

fn store(bucket: &str, prefix: &str) -> Cloud {
    Cloud::s3(
        bucket,
        prefix,
        &S3Config {
            endpoint: Some(endpoint()),
            region: Some("us-east-1".into()),
            access_key_id: Some("reentry-test".into()),
            secret_access_key: Some("reentry-test-secret".into()),
        },
    )
    .expect("an S3 store on moto")
}

#[test]
fn s3_put_if_absent_is_create_only_and_a_second_put_learns_what_is_there() {
    let (_, s) = bucket("create-only", "repo/one");
    let key = "archive/0000000100000000/000000010000000000000001";
    assert_eq!(s.put_if_absent(key, b"first").unwrap(), Put::Created);
    assert_eq!(s.put_if_absent(key, b"second").unwrap(), Put::Exists);
    assert_eq!(s.get(key).unwrap().unwrap(), b"first");
    assert_eq!(s.get("archive/missing").unwrap(), None);
    assert!(s.location().ends_with("/repo/one"), "{}", s.location());
}

#[test]
fn s3_racing_creators_of_one_key_leave_exactly_one_object() {
    let (name, _) = bucket("race", "p");
    let barrier = Barrier::new(8);
    let results: Vec<(u8, Put)> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..8u8)
            .map(|i| {
                let (name, barrier) = (&name, &barrier);
                sc.spawn(move || {
                    let s = store(name, "p");
                    barrier.wait();
                    (i, s.put_if_absent("seg", &[i; 65536]).unwrap())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let winners: Vec<u8> = results
        .iter()
        .filter(|(_, p)| *p == Put::Created)
        .map(|(i, _)| *i)
        .collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    let stored = store(&name, "p").get("seg").unwrap().unwrap();
    assert_eq!(stored, vec![winners[0]; 65536]);
}

#[test]
fn s3_lists_by_key_prefix_under_the_repository_prefix_and_deletes() {
    let (name, s) = bucket("list", "repo");
    for k in ["backup/a/label", "backup/ab/label", "archive/x"] {
        s.put(k, k.as_bytes()).unwrap();
    }
    // Another repository in the same bucket is not listed.
    store(&name, "other").put("backup/a/label", b"no").unwrap();
    let keys = |p: &str| -> Vec<String> { s.list(p).unwrap().into_iter().map(|o| o.key).collect() };
    assert_eq!(keys("backup/a"), ["backup/a/label", "backup/ab/label"]);
    assert_eq!(keys("backup/a/"), ["backup/a/label"]);
    assert_eq!(keys("").len(), 3);
    assert_eq!(s.list("archive/").unwrap()[0].size, 9);
    s.delete("archive/x").unwrap();
    s.delete("archive/x").unwrap();
    assert!(keys("archive/").is_empty());
}

#[test]
fn s3_an_unreachable_endpoint_is_an_error_naming_the_store() {
    let s = Cloud::s3(
        "nowhere",
        "repo",
        &S3Config {
            endpoint: Some("http://127.0.0.1:9".into()),
            region: Some("us-east-1".into()),
            access_key_id: Some("k".into()),
            secret_access_key: Some("topsecret".into()),
        },
    )
    .unwrap();
    let e = s.put_if_absent("k", b"x").unwrap_err().to_string();
    assert!(e.contains("s3://nowhere/repo"), "{e}");
    assert!(!e.contains("topsecret"), "{e}");
}

const FIRST_SEGMENT: &str = "000000010000000000000001";

/// `reentry --repo s3://BUCKET/repo ARGS` with moto as the endpoint.
fn reentry_s3(bucket: &str, endpoint: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(reentry_bin());
    cmd.args(["--repo", &format!("s3://{bucket}/repo")])
        .args(args)
        .env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_ACCESS_KEY_ID", "reentry-test")
        .env("AWS_SECRET_ACCESS_KEY", "reentry-test-secret")
        .env("AWS_REGION", "us-east-1")
        .env_remove("REENTRY_REPO")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// `wal fetch NAME DEST` from `s3://BUCKET/repo`.
fn s3_fetch(bucket: &str, name: &str, dest: &Path) -> std::process::Output {
    reentry_s3(
        bucket,
        &endpoint(),
        &["wal", "fetch", name, dest.to_str().unwrap()],
    )
    .output()
    .unwrap()
}

/// The first WAL segment of a fresh PostgreSQL 18 `initdb`.
fn real_segment(dir: &std::path::Path) -> PathBuf {
    let c = Cluster::init(Version::V18);
    let seg = dir.join(FIRST_SEGMENT);
    std::fs::copy(c.data().join("pg_wal").join(FIRST_SEGMENT), &seg).unwrap();
    seg
}

#[test]
fn s3_wal_racing_pushes_store_once_and_different_content_is_refused() {
    let (name, s) = bucket("wal-push", "repo");
    let tmp = tempfile::tempdir().unwrap();
    let seg = real_segment(tmp.path());
    let seg_s = seg.to_str().unwrap();
    let outputs = run_concurrently(
        (0..6).map(|_| reentry_s3(&name, &endpoint(), &["--json", "wal", "push", seg_s])),
    );
    assert_eq!(
        pushes_that_stored(&outputs),
        1,
        "one push stores, the others find it archived"
    );
    // What S3 holds is the stored format of the segment, and nothing else.
    let keys: Vec<String> = s.list("").unwrap().into_iter().map(|o| o.key).collect();
    assert_eq!(
        keys,
        [
            format!("archive/0000000100000000/{FIRST_SEGMENT}"),
            "archive/archive.json".to_owned()
        ]
    );

    // Fetched back, byte for byte.
    let back = tmp.path().join("back");
    let o = s3_fetch(&name, FIRST_SEGMENT, &back);
    assert_exit(&o, 0);
    assert_eq!(std::fs::read(&back).unwrap(), std::fs::read(&seg).unwrap());

    // Same name, other content: refused, and the stored object is kept.
    let before = s.get(&keys[0]).unwrap().unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[1 << 20] ^= 0x10;
    std::fs::write(&seg, &bytes).unwrap();
    let o = reentry_s3(&name, &endpoint(), &["wal", "push", seg_s])
        .output()
        .unwrap();
    assert_exit(&o, 3);
    assert!(
        stderr(&o).contains("already archived with different content"),
        "{}",
        stderr(&o)
    );
    assert_eq!(s.get(&keys[0]).unwrap().unwrap(), before);

    let o = reentry_s3(&name, &endpoint(), &["wal", "verify"])
        .output()
        .unwrap();
    assert_exit(&o, 0);
    assert!(
        stdout(&o).contains("1 archived files checked"),
        "{}",
        stdout(&o)
    );
}

/// A 64 MiB segment goes in parts of 16 MiB, published by a manifest
/// written create-only and last: racing pushes leave one set of parts, a
/// damaged part is named and repaired by a push, a push killed before its
/// manifest leaves nothing visible, and other content is refused.
#[test]
fn s3_64_mib_segments_go_in_parts_published_last_and_racing_damaged_and_killed_pushes_settle() {
    let (name, s) = bucket("wal-parts", "repo");
    let tmp = tempfile::tempdir().unwrap();
    let c = Cluster::init_with(Version::V18, &["--wal-segsize=64"]);
    let seg = tmp.path().join(FIRST_SEGMENT);
    std::fs::copy(c.data().join("pg_wal").join(FIRST_SEGMENT), &seg).unwrap();
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), 64 << 20);
    let seg_s = seg.to_str().unwrap();
    let key = format!("archive/0000000100000000/{FIRST_SEGMENT}");
    let push = |flags: &[&str]| {
        let mut args = vec!["--json", "wal", "push"];
        args.extend(flags);
        args.push(seg_s);
        reentry_s3(&name, &endpoint(), &args).output().unwrap()
    };
    let fetch = || {
        let back = tmp.path().join("back");
        let _ = std::fs::remove_file(&back);
        (s3_fetch(&name, FIRST_SEGMENT, &back), back)
    };
    let parts = || -> Vec<(String, u64)> {
        s.list(&format!("{key}.parts/"))
            .unwrap()
            .into_iter()
            .map(|o| (o.key, o.size))
            .collect()
    };
    let push_ids = |parts: &[(String, u64)]| -> BTreeSet<String> {
        parts
            .iter()
            .map(|(k, _)| k.split('/').nth_back(1).unwrap().to_owned())
            .collect()
    };

    let outputs = run_concurrently((0..4).map(|_| {
        reentry_s3(
            &name,
            &endpoint(),
            &["--json", "wal", "push", "--compress", "zstd", seg_s],
        )
    }));
    assert_eq!(pushes_that_stored(&outputs), 1, "one push stores");
    let first = parts();
    assert_eq!(
        first.len(),
        4,
        "one push's four parts; the others removed theirs: {first:?}"
    );
    assert_eq!(push_ids(&first).len(), 1, "{first:?}");
    assert!(
        first.iter().all(|(_, size)| *size <= (16 << 20) + 128),
        "{first:?}"
    );
    assert!(s.get(&key).unwrap().unwrap().starts_with(b"RNTRYPRT\n"));
    let (o, back) = fetch();
    assert_exit(&o, 0);
    assert!(
        std::fs::read(&back).unwrap() == std::fs::read(&seg).unwrap(),
        "byte for byte"
    );

    // A damaged part: fetch refuses naming it; a push of the content the
    // manifest records repairs it with parts of its own.
    s.put(&first[2].0, b"RNTRYWAL garbage").unwrap();
    let (o, back) = fetch();
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains(&first[2].0), "{}", stderr(&o));
    assert!(!back.exists(), "nothing half-written at the destination");
    let o = push(&[]);
    assert_exit(&o, 0);
    assert!(
        stdout(&o).contains(r#""outcome":"repaired""#),
        "{}",
        stdout(&o)
    );
    let repaired = parts();
    assert_eq!(
        repaired.len(),
        4,
        "the damaged copy's parts went: {repaired:?}"
    );
    assert!(push_ids(&repaired).is_disjoint(&push_ids(&first)));
    let (o, _) = fetch();
    assert_exit(&o, 0);

    // A push killed after its parts and before its manifest: its parts are
    // there, nothing names them, and the file is not visible.
    let manifest = s.get(&key).unwrap().unwrap();
    s.delete(&key).unwrap();
    let (o, _) = fetch();
    assert_exit(&o, 1);
    let archive = reentry::backup::archive::Archive::on(std::sync::Arc::new(store(&name, "repo")));
    assert!(archive.list().unwrap().files.is_empty());
    s.put_if_absent(&key, &manifest).unwrap();
    assert!(
        archive.list().unwrap().temp_files.is_empty(),
        "all named again"
    );
    s.delete(&key).unwrap();
    assert_exit(&push(&[]), 0);
    let listing = archive.list().unwrap();
    assert_eq!(listing.files.len(), 1);
    assert_eq!(
        listing.temp_files.len(),
        4,
        "the killed push's parts are leftovers"
    );

    // Copied to a directory, parts and manifest, and fetched from there.
    let copy = tmp.path().join("copy");
    let o = reentry_s3(
        &name,
        &endpoint(),
        &["repo", "copy", "--to", copy.to_str().unwrap()],
    )
    .output()
    .unwrap();
    assert_exit(&o, 0);
    let back = tmp.path().join("from-copy");
    let o = crate::common::reentry(
        false,
        &[
            "--repo",
            copy.to_str().unwrap(),
            "wal",
            "fetch",
            FIRST_SEGMENT,
            back.to_str().unwrap(),
        ],
    );
    assert_exit(&o, 0);
    assert!(
        std::fs::read(&back).unwrap() == std::fs::read(&seg).unwrap(),
        "byte for byte"
    );

    // Other content under the name: refused, and this push's parts removed.
    let before = parts();
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[40 << 20] ^= 0x10;
    std::fs::write(&seg, &bytes).unwrap();
    let o = push(&[]);
    assert_exit(&o, 3);
    assert!(stderr(&o).contains("different content"), "{}", stderr(&o));
    assert_eq!(parts(), before);

    // Expired, the file goes with every part, named or not.
    archive
        .remove(&reentry::pg::wal::WalFileName::parse(FIRST_SEGMENT).unwrap())
        .unwrap();
    assert!(parts().is_empty());
}

#[test]
fn s3_wal_push_to_a_server_that_is_down_fails_with_exit_2_naming_the_repository() {
    let tmp = tempfile::tempdir().unwrap();
    let seg = real_segment(tmp.path());
    let o = reentry_s3(
        "down",
        "http://127.0.0.1:9",
        &["wal", "push", seg.to_str().unwrap()],
    )
    .output()
    .unwrap();
    assert_exit(&o, 2);
    let err = stderr(&o);
    assert!(err.contains("s3://down/repo"), "{err}");
    assert!(!err.contains("reentry-test-secret"), "{err}");
}

#[test]
fn s3_backup_list_of_an_empty_repository_says_so_and_writes_nothing_locally() {
    let (name, s) = bucket("empty-list", "repo");
    let cwd = tempfile::tempdir().unwrap();
    let o = reentry_s3(&name, &endpoint(), &["backup", "list"])
        .current_dir(cwd.path())
        .output()
        .unwrap();
    assert_exit(&o, 0);
    assert_eq!(stdout(&o).trim(), format!("no backups in s3://{name}/repo"));
    assert_eq!(std::fs::read_dir(cwd.path()).unwrap().count(), 0);
    assert!(s.list("").unwrap().is_empty());
}

/// `reentry --repo s3://BUCKET/repo --json ARGS…` as the server user,
/// pointed at `c`, with moto's endpoint and test credentials.
fn s3_at(c: &Cluster, bucket: &str, args: &[&str]) -> Command {
    let mut cmd = command(c, Path::new(&format!("s3://{bucket}/repo")), args);
    for (k, v) in s3_env() {
        cmd.env(k, v);
    }
    cmd
}

fn s3_env() -> [(&'static str, String); 4] {
    [
        ("AWS_ENDPOINT_URL", endpoint()),
        ("AWS_ACCESS_KEY_ID", "reentry-test".into()),
        ("AWS_SECRET_ACCESS_KEY", "reentry-test-secret".into()),
        ("AWS_REGION", "us-east-1".into()),
    ]
}

/// A PostgreSQL 18 cluster archiving to `s3://BUCKET/repo`, with WAL
/// summaries for incremental backups. The credentials reach
/// `archive_command` through its own environment, as a unit file's
/// `Environment=` would give them to the server.
fn archiving_to_s3(bucket: &str) -> Cluster {
    archiving_to_s3_with(bucket, &[])
}

/// `archiving_to_s3`, with more of `archive_command`'s environment.
fn archiving_to_s3_with(bucket: &str, more: &[(&str, &str)]) -> Cluster {
    let c = Cluster::init(Version::V18);
    let env: Vec<String> = s3_env()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .chain(more.iter().map(|(k, v)| format!("{k}={v}")))
        .collect();
    c.append_conf(&[
        ("archive_mode", "on".to_string()),
        (
            "archive_command",
            format!(
                "'{} {} --repo s3://{bucket}/repo wal push %p'",
                env.join(" "),
                reentry_bin().display()
            ),
        ),
        ("summarize_wal", "on".to_string()),
    ]);
    let mut c = c;
    c.start();
    c
}

#[test]
fn s3_pg18_encrypted_backup_chain_verify_restore_and_drill_entirely_from_s3() {
    let (name, s) = bucket("pg-backup", "repo");
    // Encrypted throughout: the server archives with the public key, every
    // command below reads with the identity.
    let (secret, public) = age_key();
    let c = archiving_to_s3_with(&name, &[("REENTRY_AGE_RECIPIENTS", &public)]);
    let identity = c.dir("keys").join("identity");
    crate::common::write_secret(&identity, &secret);
    crate::common::give_to_server_user(&identity);
    // Labels signed with a key of the backup host's own.
    let (signing, _) = crate::common::signing_key(&c.dir("keys"));
    let s3_at = |c: &Cluster, name: &str, args: &[&str]| {
        let mut cmd = s3_at(c, name, args);
        cmd.env("REENTRY_AGE_RECIPIENTS", &public)
            .env("REENTRY_AGE_IDENTITY_FILE", &identity)
            .env("REENTRY_SIGNING_KEY_FILE", &signing);
        cmd
    };
    // A table of more than one 16 MiB piece, and small files beside it.
    c.client()
        .batch_execute(
            "CREATE TABLE t AS SELECT g AS id, repeat('x', 200) AS note FROM generate_series(1, 100000) g",
        )
        .unwrap();
    let full = ok_json(
        &s3_at(&c, &name, &["backup", "--jobs", "3"])
            .output()
            .unwrap(),
    );
    let full_id = full["id"].as_str().unwrap().to_owned();
    assert_eq!(full["status"], "complete", "{full}");
    assert!(
        full["stored_bytes"].as_u64().unwrap() < full["size_bytes"].as_u64().unwrap() / 2,
        "the objects are compressed: {full}"
    );
    c.client()
        .batch_execute("INSERT INTO t SELECT g, 'after the full backup' FROM generate_series(100001, 100500) g")
        .unwrap();
    let inc = ok_json(
        &s3_at(&c, &name, &["backup", "--incremental"])
            .output()
            .unwrap(),
    );
    let inc_id = inc["id"].as_str().unwrap().to_owned();
    assert_eq!(inc["parent"], full_id.as_str());
    assert_eq!(inc["encryption"]["recipients"][0], public.as_str());

    // A restore point is an object of its own, written once; a second of
    // the same name is refused.
    ok_json(
        &s3_at(&c, &name, &["restore-point", "after-incremental"])
            .output()
            .unwrap(),
    );
    assert_eq!(s.list("restore-points/").unwrap().len(), 1);
    let again = s3_at(&c, &name, &["restore-point", "after-incremental"])
        .output()
        .unwrap();
    assert_exit(&again, 3);

    // What the bucket holds: per backup its label, index, manifest and
    // pieces; nothing was written locally.
    let keys: Vec<String> = s
        .list("backup/")
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    for id in [&full_id, &inc_id] {
        for f in [
            "backup.json",
            "files.json",
            "backup_manifest",
            "pack/000000",
        ] {
            assert!(
                keys.contains(&format!("backup/{id}/{f}")),
                "backup/{id}/{f} not in {keys:?}"
            );
        }
    }
    assert!(
        keys.iter()
            .any(|k| k == &format!("backup/{full_id}/pack/000001")),
        "the full backup has more than one piece: {keys:?}"
    );
    assert!(!c.dir("work").join("s3:").exists());

    let list = ok_json(&s3_at(&c, &name, &["backup", "list"]).output().unwrap());
    let listed: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [full_id.as_str(), inc_id.as_str()]);

    let v = ok_json(
        &s3_at(&c, &name, &["backup", "verify", &inc_id])
            .output()
            .unwrap(),
    );
    assert_eq!(v["status"], "ok", "{v}");
    assert_eq!(v["chain"], serde_json::json!([full_id, inc_id]));
    let v = ok_json(
        &s3_at(&c, &name, &["backup", "verify", "--materialise", &inc_id])
            .output()
            .unwrap(),
    );
    assert_eq!(v["status"], "ok", "pg_verifybackup on the download: {v}");
    let list = ok_json(&s3_at(&c, &name, &["backup", "list"]).output().unwrap());
    assert_eq!(
        list[1]["verification"]["status"], "ok",
        "the verification is recorded: {list}"
    );

    // A restore combines the chain from S3 and replays WAL from S3.
    c.client()
        .batch_execute("INSERT INTO t VALUES (0, 'after the incremental')")
        .unwrap();
    switch_and_wait_archived(&c);
    let dir = c.root().join("restored");
    let out = s3_at(
        &c,
        &name,
        &["restore", "--latest", "--to", dir.to_str().unwrap()],
    )
    .output()
    .unwrap();
    let mut r = Restored {
        manifest: Value::Null,
        dir,
        bin: c.version.bin_dir(),
    };
    r.manifest = ok_json(&out);
    assert_eq!(
        r.manifest["backup_chain"],
        serde_json::json!([full_id, inc_id])
    );
    assert_eq!(r.manifest["repo"], format!("s3://{name}/repo"));
    assert_eq!(r.count("t"), 100501, "every row, the last from WAL on S3");
    drop(r);

    // A drill from S3 records its evidence there.
    let evidence = c.dir("work").join("drill.json");
    let d = ok_json(
        &s3_at(
            &c,
            &name,
            &["drill", "--evidence", evidence.to_str().unwrap()],
        )
        .output()
        .unwrap(),
    );
    assert_eq!(d["validation_status"], "passed", "{d}");
    let drills: Vec<String> = s
        .list("drills/")
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(drills.len(), 1, "{drills:?}");

    // A damaged piece is found by verify, named, without a restore.
    let key = format!("backup/{full_id}/pack/000001");
    let mut body = s.get(&key).unwrap().unwrap();
    let at = body.len() / 2;
    body[at] ^= 0xff;
    s.put(&key, &body).unwrap();
    let o = s3_at(&c, &name, &["backup", "verify", &inc_id])
        .output()
        .unwrap();
    assert_exit(&o, 1);
    assert!(
        stdout(&o).contains(&format!("s3://{name}/repo/{key}")),
        "{}",
        stdout(&o)
    );
}

/// A new age key pair: the identity file's text and the recipient.
fn age_key() -> (String, String) {
    use age::secrecy::ExposeSecret;
    let id = age::x25519::Identity::generate();
    (
        id.to_string().expose_secret().to_owned(),
        id.to_public().to_string(),
    )
}

#[test]
fn s3_encrypted_backups_and_wal_need_only_the_public_key_and_a_wrong_key_fails_before_writing() {
    let (name, s) = bucket("pg-crypt", "repo");
    let (old_secret, old_public) = age_key();
    let (new_secret, new_public) = age_key();
    let (stranger_secret, _) = age_key();
    // The server archives with the old public key only.
    let c = Cluster::init(Version::V18);
    let env: Vec<String> = s3_env().iter().map(|(k, v)| format!("{k}={v}")).collect();
    c.append_conf(&[
        ("archive_mode", "on".to_string()),
        (
            "archive_command",
            format!(
                "'{} REENTRY_AGE_RECIPIENTS={old_public} {} --repo s3://{name}/repo wal push %p'",
                env.join(" "),
                reentry_bin().display()
            ),
        ),
    ]);
    let mut c = c;
    c.start();
    c.client()
        .batch_execute("CREATE TABLE secret_notes AS SELECT g AS id, 'plaintext-marker-' || g AS note FROM generate_series(1, 20000) g")
        .unwrap();
    // The backup host signs labels with its own key; every other command
    // here verifies them with the public key alone.
    let (signing, verify) = crate::common::signing_key(&c.dir("keys"));
    let s3_at = |c: &Cluster, name: &str, args: &[&str]| {
        let mut cmd = s3_at(c, name, args);
        cmd.env("REENTRY_VERIFY_KEYS", &verify);
        if args.last() == Some(&"backup") {
            cmd.env("REENTRY_SIGNING_KEY_FILE", &signing);
        }
        cmd
    };
    let b1 = ok_json(
        &s3_at(&c, &name, &["--encrypt-to", &old_public, "backup"])
            .output()
            .unwrap(),
    );
    let key_id = b1["encryption"]["key_id"].as_str().unwrap().to_owned();
    assert_eq!(b1["encryption"]["algorithm"], "age-x25519");
    assert_eq!(b1["encryption"]["recipients"][0], old_public.as_str());
    // What is stored is not the plaintext, and its header names the key.
    for o in s.list("").unwrap() {
        let body = s.get(&o.key).unwrap().unwrap();
        assert!(
            !body
                .windows(b"plaintext-marker-".len())
                .any(|w| w == b"plaintext-marker-"),
            "{} holds the plaintext",
            o.key
        );
        if o.key.contains("/pack/") || o.key.starts_with("archive/0") {
            // Format 3, encrypted (byte 10), with BLAKE3 (byte 11).
            assert_eq!(&body[..9], b"RNTRYWAL\x03", "{}", o.key);
            assert_eq!(&body[10..12], [1, 2], "{}", o.key);
        }
    }
    // Verified without any private key: each object against its checksum.
    let v = ok_json(&s3_at(&c, &name, &["backup", "verify"]).output().unwrap());
    assert_eq!(v["status"], "ok", "{v}");

    // Rotation: the next backup goes to the new key.
    c.client()
        .batch_execute("INSERT INTO secret_notes VALUES (0, 'after rotation')")
        .unwrap();
    let b2 = ok_json(
        &s3_at(&c, &name, &["--encrypt-to", &new_public, "backup"])
            .output()
            .unwrap(),
    );
    assert_ne!(b2["encryption"]["key_id"], key_id.as_str());
    switch_and_wait_archived(&c);

    let keys = c.dir("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let file = |n: &str, text: &str| {
        let p = keys.join(n);
        crate::common::write_secret(&p, text);
        crate::common::give_to_server_user(&p);
        p
    };
    let stranger = file("stranger", &stranger_secret);
    let only_new = file("new", &new_secret);
    let both = file(
        "both",
        &format!("# old\n{old_secret}\n# new\n{new_secret}\n"),
    );
    let dir = c.root().join("restored");
    let restore = |identity: Option<&Path>| {
        let mut args = vec![];
        if let Some(p) = identity {
            args.extend(["--identity", p.to_str().unwrap()]);
        }
        args.extend(["restore", "--latest", "--to", dir.to_str().unwrap()]);
        s3_at(&c, &name, &args).output().unwrap()
    };
    // No key, a stranger's key: refused before anything is written.
    let o = restore(None);
    assert_exit(&o, 78);
    assert!(
        stderr(&o).contains("no identity was given"),
        "{}",
        stderr(&o)
    );
    assert!(!dir.exists());
    let o = restore(Some(&stranger));
    assert_exit(&o, 78);
    assert!(
        stderr(&o).contains("none of the identities")
            && stderr(&o).contains(b2["encryption"]["key_id"].as_str().unwrap()),
        "{}",
        stderr(&o)
    );
    assert!(!dir.exists());
    // The new key alone reads the new backup, but not the WAL archived to
    // the old one; both keys restore everything.
    let o = restore(Some(&only_new));
    assert_exit(&o, 78);
    assert!(
        stderr(&o).contains(&format!("s3://{name}/repo/archive/")),
        "the WAL archived to the old key is named: {}",
        stderr(&o)
    );
    assert!(!dir.exists());
    // As restore_command, `wal fetch` of such a segment exits 200, which
    // stops recovery, not 78, which PostgreSQL would read as the end of
    // the archive.
    let dest = c.root().join("RECOVERYXLOG");
    let o = s3_at(
        &c,
        &name,
        &[
            "--identity",
            only_new.to_str().unwrap(),
            "wal",
            "fetch",
            FIRST_SEGMENT,
            dest.to_str().unwrap(),
        ],
    )
    .output()
    .unwrap();
    assert_exit(&o, 200);
    assert!(
        stderr(&o).contains("none of the identities"),
        "{}",
        stderr(&o)
    );
    assert!(!dest.exists());
    let out = restore(Some(&both));
    let r = Restored::from_output(&c, dir.clone(), &out);
    assert_eq!(r.manifest["backup_id"], b2["id"]);
    assert_eq!(r.count("secret_notes"), 20001);
    drop(r);

    // Classes on S3: one daily backup kept; the dry run says which class
    // keeps it and deletes nothing, --apply deletes the other's objects,
    // label first.
    let b1_id = b1["id"].as_str().unwrap();
    let dry = ok_json(
        &s3_at(&c, &name, &["backup", "expire", "--keep-daily", "1"])
            .output()
            .unwrap(),
    );
    assert_eq!(dry["keep"][0]["id"], b2["id"], "{dry}");
    assert!(
        dry["keep"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("daily 20"),
        "{dry}"
    );
    assert_eq!(dry["expire"][0]["id"], b1_id, "{dry}");
    assert!(!s.list(&format!("backup/{b1_id}/")).unwrap().is_empty());
    ok_json(
        &s3_at(
            &c,
            &name,
            &["backup", "expire", "--keep-daily", "1", "--apply"],
        )
        .output()
        .unwrap(),
    );
    assert!(s.list(&format!("backup/{b1_id}/")).unwrap().is_empty());
    let list = ok_json(&s3_at(&c, &name, &["backup", "list"]).output().unwrap());
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
}

#[test]
fn s3_repo_copy_to_a_second_bucket_resumes_after_kills_and_restores_from_there_and_from_a_local_copy(
) {
    let (name, _) = bucket("copy-src", "repo");
    let (second, s2) = bucket("copy-dst", "repo");
    let c = archiving_to_s3(&name);
    c.client()
        .batch_execute("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 50000) g")
        .unwrap();
    let b = ok_json(&s3_at(&c, &name, &["backup"]).output().unwrap());
    c.client()
        .batch_execute("INSERT INTO t VALUES (0)")
        .unwrap();
    switch_and_wait_archived(&c);
    let to = format!("s3://{second}/repo");

    let dry = ok_json(
        &s3_at(&c, &name, &["repo", "copy", "--to", &to, "--dry-run"])
            .output()
            .unwrap(),
    );
    assert!(dry["missing"].as_u64().unwrap() > 5, "{dry}");
    assert!(s2.list("").unwrap().is_empty(), "a dry run copies nothing");

    // Killed after its first object, then before the labels: the backup is
    // not visible there half-copied.
    crate::common::kill_at_pause(
        s3_at(&c, &name, &["repo", "copy", "--to", &to]),
        "copy:object",
    );
    assert!(!s2.list("").unwrap().is_empty());
    crate::common::kill_at_pause(
        s3_at(&c, &name, &["repo", "copy", "--to", &to]),
        "copy:labels",
    );
    let at_dst = |args: &[&str]| s3_at(&c, &second, args).output().unwrap();
    let list = ok_json(&at_dst(&["backup", "list"]));
    assert_eq!(list.as_array().unwrap().len(), 0, "{list}");
    // The run that finishes copies the rest, and a second finds nothing.
    let done = ok_json(
        &s3_at(&c, &name, &["repo", "copy", "--to", &to])
            .output()
            .unwrap(),
    );
    assert!(done["copied"].as_u64().unwrap() >= 1, "{done}");
    assert!(done["problems"].as_array().unwrap().is_empty(), "{done}");
    let again = ok_json(
        &s3_at(&c, &name, &["repo", "copy", "--to", &to, "--dry-run"])
            .output()
            .unwrap(),
    );
    assert_eq!(again["missing"], 0, "{again}");
    // The source records the copy; status shows it.
    let st = ok_json(&s3_at(&c, &name, &["status"]).output().unwrap());
    assert_eq!(st["copies"][0]["to"], to.as_str(), "{st}");
    assert_eq!(st["copies"][0]["segments_behind"], 0, "{st}");

    // The copy stands alone: verified and restored from the second bucket.
    let v = ok_json(&at_dst(&["backup", "verify", "--materialise"]));
    assert_eq!(v["status"], "ok", "{v}");
    let dir = c.root().join("from-copy");
    let mut r = Restored {
        manifest: Value::Null,
        dir: dir.clone(),
        bin: c.version.bin_dir(),
    };
    r.manifest = ok_json(&at_dst(&[
        "restore",
        "--latest",
        "--to",
        dir.to_str().unwrap(),
    ]));
    assert_eq!(r.manifest["backup_id"], b["id"]);
    assert_eq!(r.count("t"), 50001);
    drop(r);

    // To a local directory: the packed backup restores from there too.
    let local = c.dir("second-copy");
    crate::common::give_to_server_user(&local);
    ok_json(
        &s3_at(
            &c,
            &name,
            &["repo", "copy", "--to", local.to_str().unwrap()],
        )
        .output()
        .unwrap(),
    );
    let dir = c.root().join("from-local-copy");
    let mut r = Restored {
        manifest: Value::Null,
        dir: dir.clone(),
        bin: c.version.bin_dir(),
    };
    r.manifest = ok_json(
        &command(
            &c,
            &local,
            &["restore", "--latest", "--to", dir.to_str().unwrap()],
        )
        .output()
        .unwrap(),
    );
    assert_eq!(r.count("t"), 50001);
}

#[test]
fn s3_wal_push_also_stores_in_both_and_a_second_repository_that_fails_only_warns() {
    let (a, sa) = bucket("also-a", "repo");
    let (b, sb) = bucket("also-b", "repo");
    let tmp = tempfile::tempdir().unwrap();
    let seg = real_segment(tmp.path());
    let key = format!("archive/0000000100000000/{FIRST_SEGMENT}");
    let o = reentry_s3(
        &a,
        &endpoint(),
        &[
            "--json",
            "wal",
            "push",
            seg.to_str().unwrap(),
            "--also",
            &format!("s3://{b}/repo"),
        ],
    )
    .output()
    .unwrap();
    assert_exit(&o, 0);
    let r: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(r["outcome"], "stored", "{r}");
    assert_eq!(r["also"]["outcome"], "stored", "{r}");
    assert_eq!(sa.get(&key).unwrap(), sb.get(&key).unwrap());
    assert!(sb.get(&key).unwrap().is_some());

    // The second repository cannot be written: the first push stands, a
    // warning names the gap and the command that closes it.
    let (c, sc) = bucket("also-c", "repo");
    let o = reentry_s3(
        &c,
        &endpoint(),
        &[
            "--json",
            "wal",
            "push",
            seg.to_str().unwrap(),
            "--also",
            "/proc/reentry-nowhere",
        ],
    )
    .output()
    .unwrap();
    assert_exit(&o, 0);
    let r: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(r["also"]["error"].as_str().is_some(), "{r}");
    assert!(
        stderr(&o).contains("repo copy --to /proc/reentry-nowhere"),
        "{}",
        stderr(&o)
    );
    assert!(sc.get(&key).unwrap().is_some());
}

/// A new bucket with Object Lock on and a default retention of `days`
/// (GOVERNANCE), as `aws s3api create-bucket --object-lock-enabled-for-bucket`
/// and `put-object-lock-configuration` make one.
fn locked_bucket(test: &str, days: u32) -> (String, Cloud) {
    let name = bucket_name(test);
    let http = reqwest::blocking::Client::new();
    let r = http
        .put(format!("{}/{name}", endpoint()))
        .header("x-amz-bucket-object-lock-enabled", "true")
        .send()
        .unwrap();
    assert!(r.status().is_success(), "create {name}: {}", r.status());
    let r = http
        .put(format!("{}/{name}?object-lock", endpoint()))
        .body(format!(
            "<ObjectLockConfiguration><ObjectLockEnabled>Enabled</ObjectLockEnabled><Rule>\
             <DefaultRetention><Mode>GOVERNANCE</Mode><Days>{days}</Days></DefaultRetention>\
             </Rule></ObjectLockConfiguration>"
        ))
        .send()
        .unwrap();
    assert!(r.status().is_success(), "lock {name}: {}", r.status());
    (name.clone(), store(&name, "repo"))
}

/// A backup killed while uploading leaves objects no label makes visible;
/// so does an expire killed after deleting a label. Once none has been
/// written for `--abandoned-after` (default 1 hour, so a backup uploading
/// now is safe), expire deletes them with its plan.
#[test]
fn s3_expire_deletes_the_objects_of_a_backup_that_never_got_its_label() {
    let (name, s) = bucket("abandoned", "repo");
    let id = "20261101-000000F";
    for k in ["pack/000000", "pack/000001", "files.json"] {
        s.put_if_absent(&format!("backup/{id}/{k}"), b"left behind")
            .unwrap();
    }
    let expire = |more: &[&str]| {
        let mut args = vec!["--json", "backup", "expire", "--retain-full", "1"];
        args.extend(more);
        let o = reentry_s3(&name, &endpoint(), &args).output().unwrap();
        assert_exit(&o, 0);
        serde_json::from_slice::<Value>(&o.stdout).unwrap()
    };
    // Written just now: perhaps a backup still uploading.
    let p = expire(&["--apply"]);
    assert_eq!(p["abandoned"], serde_json::json!([]), "{p}");
    assert_eq!(s.list("backup/").unwrap().len(), 3);

    let p = expire(&["--abandoned-after", "0s"]);
    assert_eq!(p["abandoned"][0]["id"], id, "{p}");
    assert_eq!(p["abandoned"][0]["objects"], 3, "{p}");
    assert_eq!(
        s.list("backup/").unwrap().len(),
        3,
        "a dry run deletes nothing"
    );
    let text = reentry_s3(
        &name,
        &endpoint(),
        &[
            "backup",
            "expire",
            "--retain-full",
            "1",
            "--abandoned-after",
            "0s",
        ],
    )
    .output()
    .unwrap();
    assert!(
        stdout(&text).contains(&format!("delete  {id}")) && stdout(&text).contains("with no label"),
        "{}",
        stdout(&text)
    );

    expire(&["--abandoned-after", "0s", "--apply"]);
    assert!(s.list("backup/").unwrap().is_empty());
}

#[test]
fn s3_object_lock_expire_plans_around_retention_and_check_reports_the_bucket() {
    let (name, s) = locked_bucket("locked", 1);
    let c = archiving_to_s3(&name);
    let b1 = ok_json(&s3_at(&c, &name, &["backup"]).output().unwrap());
    switch_and_wait_archived(&c);
    let b2 = ok_json(&s3_at(&c, &name, &["backup"]).output().unwrap());
    let b1_id = b1["id"].as_str().unwrap();
    // Objects of a backup that died before its label: locked too.
    s.put_if_absent("backup/20200101-000000F/pack/000000", b"piece")
        .unwrap();
    let before = s.list("").unwrap().len();

    // Classes alone would expire the older backup and its WAL; the lock
    // holds both for a day, and expire does not try.
    let p = ok_json(
        &s3_at(
            &c,
            &name,
            &[
                "backup",
                "expire",
                "--keep-daily",
                "1",
                "--abandoned-after",
                "0s",
                "--apply",
            ],
        )
        .output()
        .unwrap(),
    );
    assert_eq!(p["abandoned"][0]["id"], "20200101-000000F", "{p}");
    assert!(p["abandoned"][0]["locked_until"].is_string(), "{p}");
    assert!(p["expire"].as_array().unwrap().is_empty(), "{p}");
    let kept = p["keep"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == b1_id)
        .unwrap_or_else(|| panic!("{b1_id} kept: {p}"));
    assert!(
        kept["reason"]
            .as_str()
            .unwrap()
            .contains("under Object Lock until"),
        "{kept}"
    );
    assert!(p["wal_locked"].as_u64().unwrap() >= 1, "{p}");
    assert!(p["expire_wal"].as_array().unwrap().is_empty(), "{p}");
    assert_eq!(s.list("").unwrap().len(), before, "nothing was deleted");
    assert_eq!(p["protection"]["default_retention"]["days"], 1, "{p}");
    let _ = b2;

    // check reports the bucket, and a policy that outlives the lock.
    std::fs::write(
        c.dir("work").join("reentry.toml"),
        "[retention]\nkeep-daily = 7\n",
    )
    .unwrap();
    let o = ok_json(&s3_at(&c, &name, &["check"]).output().unwrap());
    assert_eq!(o["protection"]["object_lock"], true, "{o}");
    assert_eq!(o["protection"]["versioning"], "Enabled", "{o}");
    let warnings = o["warnings"].to_string();
    assert!(warnings.contains("protects them only 1 days"), "{o}");
    std::fs::remove_file(c.dir("work").join("reentry.toml")).unwrap();
}

#[test]
fn s3_restore_refuses_a_tampered_index_and_writes_nothing_outside_its_target() {
    let (name, s) = bucket("tampered-index", "repo");
    let c = archiving_to_s3(&name);
    c.client()
        .batch_execute("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 1000) g")
        .unwrap();
    let b = ok_json(&s3_at(&c, &name, &["backup"]).output().unwrap());
    switch_and_wait_archived(&c);
    let key = format!("backup/{}/files.json", b["id"].as_str().unwrap());
    let genuine: Value = serde_json::from_slice(&s.get(&key).unwrap().unwrap()).unwrap();
    let raw_len = genuine["pieces"][0]["raw_len"].as_u64().unwrap();
    // Nothing is signed here, so whoever plants an index rewrites the label
    // too, without the index's checksum it records: what is left to stop
    // the index is its own check.
    let label_key = format!("backup/{}/backup.json", b["id"].as_str().unwrap());
    let mut label: Value = serde_json::from_slice(&s.get(&label_key).unwrap().unwrap()).unwrap();
    assert!(label["objects"]["files.json"].is_string(), "{label}");
    label.as_object_mut().unwrap().remove("objects");
    s.put(&label_key, &serde_json::to_vec_pretty(&label).unwrap())
        .unwrap();

    let restores = c.dir("restores");
    let outside = c.dir("outside");
    let escape = restores.join("escape");
    let absolute = restores.join("abs-escape");
    let file = |path: &str| serde_json::json!({"kind": "file", "path": path, "mode": 0o600, "size": 1, "parts": [{"piece": 0, "offset": 0, "len": 1}]});
    let link = |path: &str, target: &str| serde_json::json!({"kind": "link", "path": path, "target": target});
    let first_file = |index: &mut Value| -> usize {
        index["entries"]
            .as_array()
            .unwrap()
            .iter()
            .position(|e| e["kind"] == "file" && e["size"].as_u64() > Some(0))
            .unwrap()
    };
    type Tamper = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Tamper, String)> = vec![
        (
            "a path up and out",
            Box::new(move |i| i["entries"].as_array_mut().unwrap().push(file("../escape"))),
            r#"entry "../escape" is not a plain relative path"#.into(),
        ),
        (
            "an absolute path",
            {
                let a = absolute.to_str().unwrap().to_owned();
                Box::new(move |i| i["entries"].as_array_mut().unwrap().push(file(&a)))
            },
            format!(
                r#"entry "{}" is not a plain relative path"#,
                absolute.display()
            ),
        ),
        (
            "a link, then a file through it",
            {
                let o = outside.to_str().unwrap().to_owned();
                Box::new(move |i| {
                    let e = i["entries"].as_array_mut().unwrap();
                    e.push(link("l", &o));
                    e.push(file("l/evil"));
                })
            },
            format!(r#"entry "l" is a link (to "{}")"#, outside.display()),
        ),
        (
            "a tablespace link out of the target, then a file through it",
            {
                let o = outside.to_str().unwrap().to_owned();
                Box::new(move |i| {
                    let e = i["entries"].as_array_mut().unwrap();
                    e.push(link("pg_tblspc/99999", &o));
                    e.push(file("pg_tblspc/99999/evil"));
                })
            },
            format!(
                r#"entry "pg_tblspc/99999" is a link (to "{}")"#,
                outside.display()
            ),
        ),
        (
            "a piece out of range",
            Box::new(move |i| {
                let f = first_file(i);
                i["entries"][f]["parts"][0]["piece"] = 9999.into();
            }),
            "has a part in piece 9999, and the index has".into(),
        ),
        (
            "an offset past the end of its piece",
            Box::new(move |i| {
                let f = first_file(i);
                i["entries"][f]["parts"][0]["offset"] = raw_len.into();
            }),
            format!("which holds {raw_len} bytes"),
        ),
    ];
    // Every case is tried, and what went wrong in each is shown at once.
    let mut failures = Vec::new();
    for (n, (what, tamper, says)) in cases.iter().enumerate() {
        let mut index = genuine.clone();
        tamper(&mut index);
        s.put(&key, &serde_json::to_vec(&index).unwrap()).unwrap();
        let to = restores.join(format!("r{n}"));
        // Stops a server that a restore which should have been refused started.
        let _guard = Restored {
            manifest: Value::Null,
            dir: to.clone(),
            bin: c.version.bin_dir(),
        };
        let out = s3_at(
            &c,
            &name,
            &["restore", "--latest", "--to", to.to_str().unwrap()],
        )
        .output()
        .unwrap();
        let err = stderr(&out);
        let mut wrong = Vec::new();
        if out.status.code() != Some(3) {
            wrong.push(format!("exit {:?}, not 3", out.status.code()));
        }
        for needle in [
            format!("s3://{name}/repo/{key}: "),
            says.clone(),
            "refusing to restore from this index".into(),
        ] {
            if !err.contains(&needle) {
                wrong.push(format!("stderr lacks {needle:?}"));
            }
        }
        for p in [&escape, &absolute] {
            if p.exists() {
                wrong.push(format!("{} was written", p.display()));
            }
        }
        if std::fs::read_dir(&outside).unwrap().count() != 0 {
            wrong.push("something was written through the link".into());
        }
        if std::fs::read_dir(&to).is_ok_and(|mut d| d.next().is_some()) {
            wrong.push("the restore wrote into its target".into());
        }
        if !wrong.is_empty() {
            failures.push(format!("{what}: {}\nstderr: {err}", wrong.join("; ")));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));

    // The genuine index restores.
    s.put(&key, &serde_json::to_vec(&genuine).unwrap()).unwrap();
    let dir = restores.join("genuine");
    let mut r = Restored {
        manifest: Value::Null,
        dir: dir.clone(),
        bin: c.version.bin_dir(),
    };
    r.manifest = ok_json(
        &s3_at(
            &c,
            &name,
            &["restore", "--latest", "--to", dir.to_str().unwrap()],
        )
        .output()
        .unwrap(),
    );
    assert_eq!(r.count("t"), 1000);
}

/// Security review H1: a local repository with recipients holds its base
/// backups packed and encrypted, as object storage does: a marker in a
/// table is nowhere in the repository's bytes, and restore still works.
#[test]
fn a_local_encrypted_repository_holds_no_plaintext_and_restores() {
    let (secret, public) = age_key();
    let mut c = Cluster::init(Version::V18);
    let repo = c.dir("repo");
    c.append_conf(&[
        ("archive_mode", "on".to_string()),
        (
            "archive_command",
            format!(
                "'REENTRY_AGE_RECIPIENTS={public} {} --repo {} wal push %p'",
                reentry_bin().display(),
                repo.display()
            ),
        ),
    ]);
    c.start();
    c.client()
        .batch_execute("CREATE TABLE secret_notes AS SELECT g AS id, 'plaintext-marker-' || g AS note FROM generate_series(1, 20000) g")
        .unwrap();
    let identity = c.dir("keys").join("identity");
    crate::common::write_secret(&identity, &secret);
    crate::common::give_to_server_user(&identity);
    let (signing, _) = crate::common::signing_key(&c.dir("keys"));
    let reentry = |args: &[&str]| {
        let mut cmd = command(&c, &repo, args);
        cmd.env("REENTRY_AGE_RECIPIENTS", &public)
            .env("REENTRY_AGE_IDENTITY_FILE", &identity)
            .env("REENTRY_SIGNING_KEY_FILE", &signing);
        cmd.output().unwrap()
    };
    let b = ok_json(&reentry(&["backup"]));
    assert_eq!(b["encryption"]["algorithm"], "age-x25519", "{b}");
    switch_and_wait_archived(&c);
    let marker = b"plaintext-marker-";
    let mut files = 0;
    let mut stack = vec![repo.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files += 1;
                let body = std::fs::read(&p).unwrap();
                assert!(
                    !body.windows(marker.len()).any(|w| w == marker),
                    "{} holds the plaintext",
                    p.display()
                );
            }
        }
    }
    assert!(
        files > 10,
        "the repository holds the backup ({files} files)"
    );
    let v = ok_json(&reentry(&["backup", "verify"]));
    assert_eq!(v["status"], "ok", "{v}");
    let dir = c.root().join("restored");
    let out = reentry(&["restore", "--latest", "--to", dir.to_str().unwrap()]);
    let r = Restored::from_output(&c, dir, &out);
    assert_eq!(
        r.count("secret_notes WHERE note LIKE 'plaintext-marker-%'"),
        20000
    );
}

/// Review #1: in a local encrypted repository, whoever can write removes a
/// backup's `files.json` and puts a plain `data/` of another cluster (with
/// its own `backup_manifest`) beside its signed label. The label says the
/// backup is packed: restore, verify and copy each refuse the planted
/// directory, naming it, and nothing of it is restored or copied.
#[test]
fn a_planted_plain_data_directory_beside_an_encrypted_backups_label_is_refused() {
    let (secret, public) = age_key();
    let mut c = Cluster::init(Version::V18);
    let repo = c.dir("repo");
    c.append_conf(&[
        ("archive_mode", "on".to_string()),
        (
            "archive_command",
            format!(
                "'REENTRY_AGE_RECIPIENTS={public} {} --repo {} wal push %p'",
                reentry_bin().display(),
                repo.display()
            ),
        ),
    ]);
    c.start();
    c.client()
        .batch_execute("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 1000) g")
        .unwrap();
    let identity = c.dir("keys").join("identity");
    crate::common::write_secret(&identity, &secret);
    crate::common::give_to_server_user(&identity);
    let (signing, _) = crate::common::signing_key(&c.dir("keys"));
    let reentry = |args: &[&str]| {
        let mut cmd = command(&c, &repo, args);
        cmd.env("REENTRY_AGE_RECIPIENTS", &public)
            .env("REENTRY_AGE_IDENTITY_FILE", &identity)
            .env("REENTRY_SIGNING_KEY_FILE", &signing);
        cmd.output().unwrap()
    };
    let b = ok_json(&reentry(&["backup"]));
    let id = b["id"].as_str().unwrap().to_owned();
    switch_and_wait_archived(&c);

    // Another cluster's plain backup, with its own manifest, planted.
    let mut other = Cluster::init(Version::V18);
    other.start();
    other
        .client()
        .batch_execute("CREATE TABLE planted AS SELECT 1 AS id")
        .unwrap();
    let dir = repo.join("backup").join(&id);
    std::fs::remove_file(dir.join("files.json")).unwrap();
    let data = dir.join("data");
    other.run_ok(
        other
            .cmd("pg_basebackup")
            .args(["-X", "stream", "-c", "fast", "-D"])
            .arg(&data),
    );
    assert!(data.join("backup_manifest").is_file());
    let names = format!("{}: backup {id} is packed", data.display());

    let to = c.root().join("restored");
    let out = reentry(&["restore", "--latest", "--to", to.to_str().unwrap()]);
    assert_exit(&out, 3);
    assert!(stderr(&out).contains(&names), "{}", stderr(&out));
    assert!(
        !to.exists() || std::fs::read_dir(&to).unwrap().next().is_none(),
        "restore wrote into its target"
    );
    let out = reentry(&[
        "restore",
        "--backup",
        &id,
        "--latest",
        "--to",
        to.to_str().unwrap(),
    ]);
    assert_exit(&out, 3);

    let label_before = std::fs::read(dir.join("backup.json")).unwrap();
    let out = reentry(&["backup", "verify", &id]);
    assert_exit(&out, 3);
    assert!(stderr(&out).contains(&names), "{}", stderr(&out));
    assert_eq!(
        std::fs::read(dir.join("backup.json")).unwrap(),
        label_before,
        "verify recorded a verification"
    );

    let second = c.dir("second");
    let out = reentry(&["repo", "copy", "--to", second.to_str().unwrap()]);
    assert_exit(&out, 3);
    assert!(stderr(&out).contains(&names), "{}", stderr(&out));
    assert!(
        !second.join("backup").exists(),
        "copy wrote a backup: {:?}",
        std::fs::read_dir(second.join("backup")).map(|d| d
            .filter_map(Result::ok)
            .map(|e| e.path())
            .collect::<Vec<_>>())
    );
}

/// `repo copy` to object storage packs a signed plain local backup anew,
/// its files' checksums in a new signed index: each file is checked
/// against the manifest the label vouches for in the read that packs it.
/// A byte changed in a relation file that spans pieces, or a file the
/// manifest does not list, is refused (exit 3, naming it), and nothing of
/// the backup is left in the bucket. The genuine backup is copied without
/// what a writer put in its `pg_wal/` (restore fetches WAL from the
/// archive), and restores from the bucket.
#[test]
fn s3_repo_copy_checks_a_signed_plain_backups_files_in_the_read_that_packs_them() {
    let (name, s) = bucket("plain-copy", "repo");
    let (c, repo) = archiving(Version::V18, "", &[]);
    c.client()
        .batch_execute(
            "CREATE TABLE t AS SELECT g AS id, repeat('x', 100) AS pad \
             FROM generate_series(1, 250000) g",
        )
        .unwrap();
    let file: String = c
        .client()
        .query_one("SELECT pg_relation_filepath('t')", &[])
        .unwrap()
        .get(0);
    let (signing, verify) = crate::common::signing_key(&c.dir("keys"));
    let reentry = |args: &[&str]| {
        let mut cmd = command(&c, &repo, args);
        cmd.env("REENTRY_SIGNING_KEY_FILE", &signing)
            .env("REENTRY_VERIFY_KEYS", &verify);
        for (k, v) in s3_env() {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let b = ok_json(&reentry(&["backup"]));
    let id = b["id"].as_str().unwrap().to_owned();
    switch_and_wait_archived(&c);
    let data = repo.join("backup").join(&id).join("data");
    let relation = data.join(&file);
    let genuine = std::fs::read(&relation).unwrap();
    assert!(
        genuine.len() > 16 << 20,
        "the table spans pieces: {} bytes",
        genuine.len()
    );
    let to = format!("s3://{name}/repo");
    let backup_keys = || -> Vec<String> {
        bucket_keys(&name)
            .into_iter()
            .filter(|k| k.starts_with("backup/"))
            .collect()
    };

    // One byte near the end, in the file's last piece.
    let mut changed = genuine.clone();
    let at = changed.len() - 100;
    changed[at] ^= 0x20;
    std::fs::write(&relation, &changed).unwrap();
    let out = reentry(&["repo", "copy", "--to", &to]);
    assert_exit(&out, 3);
    assert!(
        stderr(&out).contains(&format!("{}: its SHA-256 is", relation.display())),
        "{}",
        stderr(&out)
    );
    assert_eq!(backup_keys(), Vec::<String>::new(), "the backup was copied");
    std::fs::write(&relation, &genuine).unwrap();

    let planted = data.join("base").join("planted");
    std::fs::write(&planted, "x").unwrap();
    let out = reentry(&["repo", "copy", "--to", &to]);
    assert_exit(&out, 3);
    assert!(
        stderr(&out).contains(&format!("{}: the manifest", planted.display()))
            && stderr(&out).contains("does not list it"),
        "{}",
        stderr(&out)
    );
    assert_eq!(backup_keys(), Vec::<String>::new(), "the backup was copied");
    std::fs::remove_file(&planted).unwrap();

    // Genuine, with a timeline history planted in pg_wal/.
    std::fs::write(
        data.join("pg_wal").join("00000009.history"),
        "1\t0/1000000\tplanted\n",
    )
    .unwrap();
    let done = ok_json(&reentry(&["repo", "copy", "--to", &to]));
    assert_eq!(done["packed"][0], id.as_str(), "{done}");
    let index: Value =
        serde_json::from_slice(&s.get(&format!("backup/{id}/files.json")).unwrap().unwrap())
            .unwrap();
    let wal: Vec<&Value> = index["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "file" && e["path"].as_str().unwrap().starts_with("pg_wal/"))
        .collect();
    assert_eq!(wal, Vec::<&Value>::new(), "pg_wal/ was packed");
    let dir = c.root().join("from-copy");
    let mut cmd = s3_at(
        &c,
        &name,
        &["restore", "--latest", "--to", dir.to_str().unwrap()],
    );
    cmd.env("REENTRY_VERIFY_KEYS", &verify);
    let r = Restored::from_output(&c, dir, &cmd.output().unwrap());
    assert_eq!(r.manifest["backup_id"], id.as_str());
    assert_eq!(r.count("t"), 250000);
}

#[test]
fn s3_check_fails_on_a_store_that_overwrites_a_create_only_write() {
    let (name, s) = bucket("probe", "repo");
    let c = archiving_to_s3(&name);
    // moto honours If-None-Match: *: check passes, and leaves no probe.
    ok_json(&s3_at(&c, &name, &["check"]).output().unwrap());
    assert!(
        s.list("check/").unwrap().is_empty(),
        "{:?}",
        s.list("check/")
    );
    // The same bucket behind a gateway that drops the header: a second
    // create overwrites the first, and check says so.
    let proxy = S3Proxy::start(&endpoint(), Fault::IgnoreIfNoneMatch);
    let out = s3_at(&c, &name, &["check"])
        .env("AWS_ENDPOINT_URL", &proxy.url)
        .output()
        .unwrap();
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains("overwrote an object on a create-only write"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn s3_a_backup_whose_creates_lose_their_answers_finds_its_own_objects_and_succeeds() {
    let (name, s) = bucket("lost-answers", "repo");
    let c = archiving_to_s3(&name);
    c.client()
        .batch_execute("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g")
        .unwrap();
    // Every first create under backup/ is written, and its answer lost: the
    // client's retry finds the object it wrote.
    let proxy = S3Proxy::start(&endpoint(), Fault::LoseFirstCreateOf("/backup/"));
    let out = s3_at(&c, &name, &["backup"])
        .env("AWS_ENDPOINT_URL", &proxy.url)
        .output()
        .unwrap();
    let b = ok_json(&out);
    let lost = proxy.lost.lock().unwrap().clone();
    let id = b["id"].as_str().unwrap();
    assert!(
        lost.iter()
            .any(|p| p.ends_with(&format!("/backup/{id}/backup.json"))),
        "{lost:?}"
    );
    assert!(lost.iter().any(|p| p.contains("/pack/")), "{lost:?}");
    // Each object once, as written: the backup verifies from moto itself.
    assert!(s
        .get(&format!("backup/{id}/backup.json"))
        .unwrap()
        .is_some());
    ok_json(
        &s3_at(&c, &name, &["backup", "verify", id])
            .output()
            .unwrap(),
    );
}

/// Every key in `bucket`, listed with S3's own ListObjectsV2 on the
/// services' endpoint, not through reentry; relative to the repository's
/// prefix, `repo/`, which holds them all.
fn bucket_keys(bucket: &str) -> BTreeSet<String> {
    let http = reqwest::blocking::Client::new();
    let mut keys = BTreeSet::new();
    let mut token: Option<String> = None;
    loop {
        let mut url = format!("{}/{bucket}?list-type=2", endpoint());
        if let Some(t) = &token {
            url.push_str(&format!(
                "&continuation-token={}",
                t.replace('+', "%2B")
                    .replace('/', "%2F")
                    .replace('=', "%3D")
            ));
        }
        let body = http.get(url).send().unwrap().text().unwrap();
        let tag = |name: &str, text: &str| -> Vec<String> {
            text.split(&format!("<{name}>"))
                .skip(1)
                .filter_map(|p| p.split(&format!("</{name}>")).next())
                .map(str::to_owned)
                .collect()
        };
        for key in tag("Key", &body) {
            let k = key.strip_prefix("repo/");
            keys.insert(
                k.unwrap_or_else(|| panic!("{key} is outside repo/"))
                    .to_owned(),
            );
        }
        token = tag("NextContinuationToken", &body).into_iter().next();
        if token.is_none() {
            return keys;
        }
    }
}

/// The name of the timeline 1 segment (16 MiB) that holds `lsn` (`X/Y`).
fn segment_of(lsn: &str) -> String {
    let (hi, lo) = lsn.split_once('/').unwrap();
    let lsn = (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap();
    let segno = lsn >> 24;
    format!("{:08X}{:08X}{:08X}", 1, segno >> 8, segno & 0xff)
}

/// A backup id of the generated shape for `t`, as `reentry backup` names
/// one taken then.
fn id_at(t: std::time::SystemTime, kind: char) -> String {
    let digits: String = humantime::format_rfc3339_seconds(t)
        .to_string()
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    format!("{}-{}{kind}", &digits[..8], &digits[8..14])
}

/// Issue 27, point 4: on an encrypted repository a principal that can
/// only put objects (a leaked credential, the bucket's other writers) can
/// plant a label dated now, of the right cluster, its id its key, with an
/// index and pieces of its choosing. Labels are signed by the backup host,
/// so: restore refuses to choose (and restores the genuine backup asked
/// for by id), expire deletes nothing genuine (counted by S3's own
/// listing), copy does not spread it, a changed byte of the genuine index
/// is refused, and no key is ever printed.
#[test]
fn s3_signed_labels_planted_ones_steer_neither_restore_nor_expire_and_no_key_is_printed() {
    let (name, s) = bucket("signed", "repo");
    let (second, _) = bucket("signed-copy", "repo");
    let (secret, public) = age_key();
    let c = archiving_to_s3_with(&name, &[("REENTRY_AGE_RECIPIENTS", &public)]);
    let keys = c.dir("keys");
    let identity = keys.join("identity");
    crate::common::write_secret(&identity, &secret);
    crate::common::give_to_server_user(&identity);
    let (signing, verify) = crate::common::signing_key(&keys);
    let outputs = std::cell::RefCell::new(Vec::new());
    let run = |mut cmd: Command| {
        let o = cmd.output().unwrap();
        outputs.borrow_mut().push(o.clone());
        o
    };
    // The backup host: recipients and the signing key. Everyone else: the
    // verify key (and the identity where data is read).
    let backup_host = |args: &[&str]| {
        let mut cmd = s3_at(&c, &name, args);
        cmd.env("REENTRY_AGE_RECIPIENTS", &public)
            .env("REENTRY_SIGNING_KEY_FILE", &signing);
        run(cmd)
    };
    let reader = |bucket: &str, args: &[&str]| {
        let mut cmd = s3_at(&c, bucket, args);
        cmd.env("REENTRY_AGE_IDENTITY_FILE", &identity)
            .env("REENTRY_VERIFY_KEYS", &verify);
        run(cmd)
    };
    c.client()
        .batch_execute("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 3000) g")
        .unwrap();

    // Encrypted without a signing key: refused before anything is written.
    let mut cmd = s3_at(&c, &name, &["backup"]);
    cmd.env("REENTRY_AGE_RECIPIENTS", &public);
    let o = run(cmd);
    assert_exit(&o, 78);
    assert!(
        stderr(&o).contains("no signing key") && stderr(&o).contains("repo keygen"),
        "{}",
        stderr(&o)
    );
    assert!(bucket_keys(&name).iter().all(|k| !k.contains("backup/")));

    let genuine = ok_json(&backup_host(&["backup"]));
    let gid = genuine["id"].as_str().unwrap().to_owned();
    assert_eq!(genuine["signature"]["algorithm"], "ed25519", "{genuine}");
    assert!(genuine["objects"]["files.json"].is_string(), "{genuine}");
    switch_and_wait_archived(&c);
    switch_and_wait_archived(&c);
    // Reading without a verify key, on a host that decrypts: refused.
    let mut cmd = s3_at(&c, &name, &["backup", "list"]);
    cmd.env("REENTRY_AGE_IDENTITY_FILE", &identity);
    let o = run(cmd);
    assert_exit(&o, 78);
    assert!(stderr(&o).contains("signing.verify-keys"), "{}", stderr(&o));

    // Two planted labels, copies of the genuine one dated now, their WAL
    // further on, with objects of the planter's choosing (the genuine
    // ones, copied): one keeps the genuine signature, one has none.
    let lsn: String = c
        .client()
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .unwrap()
        .get(0);
    let now = std::time::SystemTime::now();
    let (kept_sig, no_sig) = (
        id_at(now, 'F'),
        id_at(now + std::time::Duration::from_secs(1), 'F'),
    );
    let label_key = |id: &str| format!("backup/{id}/backup.json");
    let genuine_label: Value =
        serde_json::from_slice(&s.get(&label_key(&gid)).unwrap().unwrap()).unwrap();
    for id in [&kept_sig, &no_sig] {
        let mut l = genuine_label.clone();
        let when = humantime::format_rfc3339_millis(now).to_string();
        l["id"] = id.as_str().into();
        l["start_time"] = when.clone().into();
        l["stop_time"] = when.into();
        l["start_lsn"] = lsn.as_str().into();
        l["stop_lsn"] = lsn.as_str().into();
        l["wal_ranges"] = serde_json::json!([{"timeline": 1, "start_lsn": lsn, "end_lsn": lsn}]);
        if id == &no_sig {
            l.as_object_mut().unwrap().remove("signature");
        }
        for o in s.list(&format!("backup/{gid}/")).unwrap() {
            if o.key.ends_with("/backup.json") {
                continue;
            }
            let to = o.key.replace(&gid, id);
            s.put(&to, &s.get(&o.key).unwrap().unwrap()).unwrap();
        }
        s.put(&label_key(id), &serde_json::to_vec_pretty(&l).unwrap())
            .unwrap();
    }

    // Listed: the genuine backup only; the planted labels marked.
    let list = ok_json(&reader(&name, &["backup", "list"]));
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["id"], gid.as_str());
    let mut plain = reentry_s3(&name, &endpoint(), &["backup", "list"]);
    plain.env("REENTRY_VERIFY_KEYS", &verify);
    let text = run(plain);
    assert_exit(&text, 0);
    for id in [&kept_sig, &no_sig] {
        assert!(
            stdout(&text).contains(&format!("UNSIGNED {}", label_key(id))),
            "{}",
            stdout(&text)
        );
    }

    // Restore does not choose for itself while they are there…
    let restores = c.dir("restores");
    let to = restores.join("latest");
    let o = reader(
        &name,
        &["restore", "--latest", "--to", to.to_str().unwrap()],
    );
    let _guard = Restored {
        manifest: Value::Null,
        dir: to.clone(),
        bin: c.version.bin_dir(),
    };
    assert_exit(&o, 3);
    let err = stderr(&o);
    assert!(err.contains("refusing to choose a backup"), "{err}");
    assert!(
        err.contains(&format!(
            "{}: its signature does not verify",
            label_key(&kept_sig)
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("{}: it is not signed", label_key(&no_sig))),
        "{err}"
    );
    assert!(!to.exists(), "the refused restore wrote its target");
    // …refuses each planted one by id, naming it…
    for (id, says) in [
        (&kept_sig, "its signature does not verify"),
        (&no_sig, "it is not signed"),
    ] {
        let to = restores.join(id);
        let o = reader(
            &name,
            &[
                "restore",
                "--latest",
                "--backup",
                id,
                "--to",
                to.to_str().unwrap(),
            ],
        );
        assert_exit(&o, 3);
        assert!(
            stderr(&o).contains(&format!("{}: {says}", label_key(id))),
            "{}",
            stderr(&o)
        );
        assert!(!to.exists());
    }
    // …and restores the genuine one asked for by id, with the identity
    // and the verify key alone.
    let dir = restores.join("genuine");
    let out = reader(
        &name,
        &[
            "restore",
            "--latest",
            "--backup",
            &gid,
            "--to",
            dir.to_str().unwrap(),
        ],
    );
    let r = Restored::from_output(&c, dir, &out);
    assert_eq!(r.manifest["backup_id"], gid.as_str());
    assert_eq!(r.count("t"), 3000);
    drop(r);

    // Expire keeps the genuine backup and its WAL: the planted labels are
    // ignored, neither counted nor deleted. Only the WAL from before the
    // genuine backup goes, as retention has it.
    let before = bucket_keys(&name);
    let p = ok_json(&reader(
        &name,
        &["backup", "expire", "--retain-full", "1", "--apply"],
    ));
    assert_eq!(p["keep"][0]["id"], gid.as_str(), "{p}");
    assert_eq!(p["expire"], serde_json::json!([]), "{p}");
    let ignored: Vec<&str> = p["ignored"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["key"].as_str().unwrap())
        .collect();
    assert_eq!(ignored, [label_key(&kept_sig), label_key(&no_sig)], "{p}");
    let after = bucket_keys(&name);
    let first_needed = segment_of(genuine["wal_ranges"][0]["start_lsn"].as_str().unwrap());
    let wrongly: Vec<&String> = before
        .difference(&after)
        .filter(|k| {
            let file = k.rsplit('/').next().unwrap();
            !(k.starts_with("archive/0") && file.len() >= 24 && file[..24] < *first_needed)
        })
        .collect();
    assert!(
        wrongly.is_empty(),
        "expire deleted what the genuine backup needs (it starts in {first_needed}): {wrongly:?}"
    );
    assert!(after.contains(&label_key(&gid)) && after.contains(&label_key(&kept_sig)));

    // Copy spreads the genuine backup, signature and all, not the planted.
    let o = reader(
        &name,
        &["repo", "copy", "--to", &format!("s3://{second}/repo")],
    );
    assert_exit(&o, 1);
    let copied = bucket_keys(&second);
    assert!(copied.contains(&label_key(&gid)), "{copied:?}");
    for id in [&kept_sig, &no_sig] {
        assert!(
            copied.iter().all(|k| !k.contains(id.as_str())),
            "{id} spread: {copied:?}"
        );
        assert!(stdout(&o).contains(&label_key(id)), "{}", stdout(&o));
    }
    let there = ok_json(&reader(&second, &["backup", "list"]));
    assert_eq!(there[0]["id"], gid.as_str(), "{there}");

    // One byte of the genuine index changed, the JSON and its layout still
    // valid: refused, by restore and by verify.
    let index_key = format!("backup/{gid}/files.json");
    let index = s.get(&index_key).unwrap().unwrap();
    let at = index
        .windows(b"PG_VERSION".len())
        .position(|w| w == b"PG_VERSION")
        .unwrap();
    let mut changed = index.clone();
    changed[at + 9] = b'M';
    s.put(&index_key, &changed).unwrap();
    let to = restores.join("changed-index");
    let o = reader(
        &name,
        &[
            "restore",
            "--latest",
            "--backup",
            &gid,
            "--to",
            to.to_str().unwrap(),
        ],
    );
    assert_exit(&o, 3);
    assert!(
        stderr(&o).contains(&format!(
            "s3://{name}/repo/{index_key} is not what its backup's label vouches for"
        )),
        "{}",
        stderr(&o)
    );
    assert!(!to.exists() || std::fs::read_dir(&to).unwrap().next().is_none());
    let o = reader(&name, &["backup", "verify", &gid]);
    assert_exit(&o, 1);
    assert!(stdout(&o).contains("vouches for"), "{}", stdout(&o));
    s.put(&index_key, &index).unwrap();

    // No output of any command holds a private key.
    let secrets: Vec<String> = crate::common::private_key_lines(&signing)
        .into_iter()
        .chain([secret.clone()])
        .collect();
    for o in outputs.borrow().iter() {
        for secret in &secrets {
            assert!(
                !stdout(o).contains(secret) && !stderr(o).contains(secret),
                "a private key was printed:\n{}\n{}",
                stdout(o),
                stderr(o)
            );
        }
    }
}
