//! The repository on Azure Blob Storage, by the code S3 goes through:
//! against Azurite, Microsoft's own emulator (npm), which
//! `scripts/services` starts (`REENTRY_TEST_AZURE`). The credentials are
//! Azurite's well-known development account, set as a user would set
//! `AZURE_*` variables.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::common::archiving::switch_and_wait_archived;
use crate::common::pg::{Cluster, Version};
use crate::common::restored::{command, ok_json, Restored};
use crate::common::services::address;
use crate::common::{
    assert_exit, bucket_name, pushes_that_stored, reentry_bin, run_concurrently, stderr, stdout,
};

const FIRST_SEGMENT: &str = "000000010000000000000001";
const ACCOUNT: &str = "devstoreaccount1";
/// Azurite's published development key (not a secret).
const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

fn endpoint() -> String {
    address("REENTRY_TEST_AZURE", "Azurite, an Azure Blob Storage API")
}

fn azure_env() -> [(&'static str, String); 2] {
    [
        ("AZURE_STORAGE_USE_EMULATOR", "true".into()),
        ("AZURITE_BLOB_STORAGE_URL", endpoint()),
    ]
}

/// A new container of this test's own, created with a request signed by
/// the account key (Shared Key), as the Azure CLI would.
fn container(test: &str) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let name = bucket_name(test);
    let date = httpdate();
    let version = "2021-08-06";
    let to_sign = format!(
        "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n\
         /{ACCOUNT}/{ACCOUNT}/{name}\nrestype:container"
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &b64.decode(KEY).unwrap());
    let signature = b64.encode(ring::hmac::sign(&key, to_sign.as_bytes()).as_ref());
    let r = reqwest::blocking::Client::new()
        .put(format!("{}/{ACCOUNT}/{name}?restype=container", endpoint()))
        .header("x-ms-date", &date)
        .header("x-ms-version", version)
        .header("Content-Length", "0")
        .header("Authorization", format!("SharedKey {ACCOUNT}:{signature}"))
        .send()
        .expect("create a container on Azurite");
    assert!(
        r.status().is_success(),
        "create container {name}: {} {}",
        r.status(),
        r.text().unwrap_or_default()
    );
    name
}

/// Now as an HTTP date (RFC 1123), which Shared Key signs.
fn httpdate() -> String {
    let now = jiff::Timestamp::now();
    now.strftime("%a, %d %b %Y %H:%M:%S GMT").to_string()
}

fn reentry_az(container: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(reentry_bin());
    cmd.args(["--repo", &format!("az://{container}/repo")])
        .args(args)
        .env_remove("REENTRY_REPO")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in azure_env() {
        cmd.env(k, v);
    }
    cmd
}

#[test]
fn azure_wal_racing_pushes_store_once_fetch_gives_back_the_bytes_and_other_content_is_refused() {
    let name = container("azure-wal");
    let tmp = tempfile::tempdir().unwrap();
    let c = Cluster::init(Version::V18);
    let seg = tmp.path().join(FIRST_SEGMENT);
    std::fs::copy(c.data().join("pg_wal").join(FIRST_SEGMENT), &seg).unwrap();
    let seg_s = seg.to_str().unwrap();

    let outputs = run_concurrently((0..6).map(|_| {
        reentry_az(
            &name,
            &["--json", "wal", "push", "--compress", "zstd", seg_s],
        )
    }));
    assert_eq!(
        pushes_that_stored(&outputs),
        1,
        "one push stores, the others find it archived"
    );

    let back = tmp.path().join("back");
    let o = reentry_az(
        &name,
        &["wal", "fetch", FIRST_SEGMENT, back.to_str().unwrap()],
    )
    .output()
    .unwrap();
    assert_exit(&o, 0);
    assert!(std::fs::read(&back).unwrap() == std::fs::read(&seg).unwrap());

    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[1 << 20] ^= 0x10;
    std::fs::write(&seg, &bytes).unwrap();
    let o = reentry_az(&name, &["wal", "push", seg_s]).output().unwrap();
    assert_exit(&o, 3);
    assert!(
        stderr(&o).contains("already archived with different content")
            && stderr(&o).contains(&format!("az://{name}/repo/archive/")),
        "{}",
        stderr(&o)
    );

    let o = reentry_az(&name, &["wal", "verify"]).output().unwrap();
    assert_exit(&o, 0);
    assert!(
        stdout(&o).contains("1 archived files checked"),
        "{}",
        stdout(&o)
    );

    // A missing file is exit 1, as on every repository.
    let o = reentry_az(
        &name,
        &[
            "wal",
            "fetch",
            "000000010000000000000009",
            back.to_str().unwrap(),
        ],
    )
    .output()
    .unwrap();
    assert_exit(&o, 1);
}

/// Archive, backup, verify and restore on `az://`, the server archiving
/// through `archive_command` with the `AZURE_*` variables in its own
/// environment.
#[test]
fn azure_pg18_backup_verify_and_restore_entirely_from_azurite() {
    let name = container("azure-pg");
    let repo = format!("az://{name}/repo");
    let c = Cluster::init(Version::V18);
    let env: Vec<String> = azure_env()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    c.append_conf(&[
        ("archive_mode", "on".to_string()),
        (
            "archive_command",
            format!(
                "'{} {} --repo {repo} wal push %p'",
                env.join(" "),
                reentry_bin().display()
            ),
        ),
    ]);
    let mut c = c;
    c.start();
    let az = |args: &[&str]| {
        let mut cmd = command(&c, Path::new(&repo), args);
        for (k, v) in azure_env() {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    c.client()
        .batch_execute(
            "CREATE TABLE t AS SELECT g AS id, repeat('x', 200) AS note FROM generate_series(1, 100000) g",
        )
        .unwrap();
    let b = ok_json(&az(&["backup", "--jobs", "3"]));
    assert_eq!(b["status"], "complete", "{b}");
    let v = ok_json(&az(&["backup", "verify"]));
    assert_eq!(v["status"], "ok", "{v}");
    c.client()
        .batch_execute(
            "INSERT INTO t SELECT g, 'after the backup' FROM generate_series(100001, 100100) g",
        )
        .unwrap();
    ok_json(&az(&["restore-point", "after-insert"]));
    switch_and_wait_archived(&c);

    let dir = c.root().join("restored");
    let out = az(&[
        "restore",
        "--to",
        dir.to_str().unwrap(),
        "--target-name",
        "after-insert",
    ]);
    let r = Restored::from_output(&c, dir, &out);
    assert_eq!(r.manifest["backup_id"], b["id"]);
    assert_eq!(r.count("t"), 100100, "WAL replayed from Azure");
}
