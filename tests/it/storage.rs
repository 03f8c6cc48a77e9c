//! The repository's storage layer against a real S3 API: moto in server
//! mode, which `scripts/services` starts (`REENTRY_TEST_S3`).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Barrier;

use reentry::storage::{Put, S3Config, Store, S3};

use crate::common::pg::{Cluster, Version};
use crate::common::services::address;
use crate::common::{
    assert_exit, pushes_that_stored, reentry_bin, run_concurrently, stderr, stdout, unique,
};

fn endpoint() -> String {
    address("REENTRY_TEST_S3", "moto, an S3 API")
}

/// A new bucket of this test's own, and a store on `prefix` in it.
fn bucket(test: &str, prefix: &str) -> (String, S3) {
    let name = unique(test).to_lowercase().replace(['_', '.'], "-");
    let name: String = name.chars().take(60).collect();
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

fn store(bucket: &str, prefix: &str) -> S3 {
    S3::new(
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
    let s = S3::new(
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
    let o = reentry_s3(
        &name,
        &endpoint(),
        &["wal", "fetch", FIRST_SEGMENT, back.to_str().unwrap()],
    )
    .output()
    .unwrap();
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
fn s3_commands_not_on_object_storage_yet_refuse_it_and_write_nothing_locally() {
    let cwd = tempfile::tempdir().unwrap();
    let o = reentry_s3("b", &endpoint(), &["backup", "list"])
        .current_dir(cwd.path())
        .output()
        .unwrap();
    assert_exit(&o, 78);
    assert!(
        stderr(&o).contains("s3://b/repo is on object storage"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read_dir(cwd.path()).unwrap().count(), 0);
}
