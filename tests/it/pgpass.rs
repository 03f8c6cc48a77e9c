//! Passwords from libpq's password file, so that none is on a command
//! line (`ps` shows those): a role with a SCRAM password on PostgreSQL 18
//! is reached with `--db` naming no password, as psql reaches it, and a
//! password file others can read is ignored, as libpq ignores it.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use crate::common::pg::{Cluster, Version};
use crate::common::{reentry_bin, stderr, stdout};

const SECRET: &str = "pgpass-sekrit:4471";

#[test]
fn a_password_comes_from_the_password_file_as_libpq_takes_it() {
    let mut cluster = Cluster::init(Version::V18);
    std::fs::write(
        cluster.data().join("pg_hba.conf"),
        "local all all trust\nhost all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n",
    )
    .unwrap();
    cluster.start();
    cluster
        .client()
        .batch_execute(&format!(
            "CREATE ROLE app LOGIN PASSWORD '{SECRET}'; GRANT pg_monitor TO app"
        ))
        .unwrap();
    let dir = cluster.dir("work");
    let passfile = dir.join("pgpass");
    // Another line first, and the secret's colon escaped as libpq wants.
    std::fs::write(
        &passfile,
        format!(
            "127.0.0.1:{port}:postgres:other:nope\n127.0.0.1:{port}:*:app:{}\n",
            SECRET.replace(':', "\\:"),
            port = cluster.port
        ),
    )
    .unwrap();
    let status = |mode: u32| {
        std::fs::set_permissions(&passfile, std::fs::Permissions::from_mode(mode)).unwrap();
        Command::new(reentry_bin())
            .args(["--repo"])
            .arg(dir.join("repo"))
            .args(["--json", "status", "--db"])
            .arg(format!(
                "host=127.0.0.1 port={} user=app dbname=postgres",
                cluster.port
            ))
            .env("PGPASSFILE", &passfile)
            .env_remove("PGPASSWORD")
            .output()
            .unwrap()
    };

    let out = status(0o600);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", stdout(&out), stderr(&out)));
    assert!(
        v["server"]["version"]
            .as_str()
            .is_some_and(|s| s.starts_with("18")),
        "{v:#}\n{}",
        stderr(&out)
    );
    // (pg_hba.conf admits `app` over TCP only with its SCRAM password.)

    // Readable by others: ignored, with libpq's warning, and the login fails.
    let out = status(0o644);
    let err = stderr(&out);
    assert!(
        err.contains("has group or world access and is ignored") && err.contains("cannot connect"),
        "{err}"
    );
    for o in [&out, &status(0o600)] {
        assert!(!stdout(o).contains(SECRET) && !stderr(o).contains(SECRET));
    }
}
