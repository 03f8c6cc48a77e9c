//! A cluster restored by a real `reentry restore`, run as the server's OS
//! user (PostgreSQL will not run a restored cluster as root), and stopped
//! when the test ends however it ends.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use crate::common::pg::Cluster;
use crate::common::{as_server_user, assert_exit, reentry_bin, stdout};

/// `reentry --repo REPO --json ARGS…` as the server user, pointed at `c`.
pub fn command(c: &Cluster, repo: &Path, args: &[&str]) -> Command {
    let mut cmd = as_server_user(reentry_bin());
    cmd.args(["--repo", repo.to_str().unwrap(), "--json"])
        .args(args)
        .env_remove("REENTRY_REPO")
        .env("REENTRY_PG_BIN", c.version.bin_dir())
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", c.port.to_string())
        .env("PGUSER", "postgres")
        .env("PGDATABASE", "postgres")
        .current_dir(c.dir("work"));
    cmd
}

pub fn run(c: &Cluster, repo: &Path, args: &[&str]) -> Output {
    command(c, repo, args).output().expect("run reentry")
}

#[track_caller]
pub fn ok_json(o: &Output) -> Value {
    assert_exit(o, 0);
    serde_json::from_str(&stdout(o)).unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(o)))
}

/// A restored cluster, stopped when the test ends however it ends.
pub struct Restored {
    pub manifest: Value,
    pub dir: PathBuf,
    pub bin: PathBuf,
}

impl Restored {
    /// A client on the copy's socket: a fenced copy listens on no TCP port.
    pub fn client(&self) -> postgres::Client {
        postgres::Client::connect(&self.conninfo(), postgres::NoTls).unwrap()
    }

    pub fn socket_dir(&self) -> &str {
        self.manifest["socket_dir"].as_str().unwrap()
    }

    pub fn count(&self, table: &str) -> i64 {
        self.client()
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .unwrap()
            .get(0)
    }
}

impl Drop for Restored {
    fn drop(&mut self) {
        let _ = as_server_user(self.bin.join("pg_ctl"))
            .args(["stop", "-m", "immediate", "-D"])
            .arg(&self.dir)
            .output();
    }
}

#[track_caller]
pub fn restore(c: &Cluster, repo: &Path, name: &str, args: &[&str]) -> Restored {
    let dir = c.root().join(name);
    let mut all = vec!["restore", "--to", dir.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = run(c, repo, &all);
    Restored::from_output(c, dir, &out)
}

impl Restored {
    /// What `reentry restore --to DIR` printed, as a guard on the cluster.
    /// The guard exists before the result is read, so a server that started
    /// is stopped even when the restore's output is not what the test expects.
    #[track_caller]
    pub fn from_output(c: &Cluster, dir: PathBuf, out: &Output) -> Restored {
        let mut restored = Restored {
            manifest: Value::Null,
            dir,
            bin: c.version.bin_dir(),
        };
        restored.manifest = ok_json(out);
        restored
    }
}

impl Restored {
    /// Its conninfo, for a playbook.
    pub fn conninfo(&self) -> String {
        format!(
            "host='{}' port={} user=postgres dbname=postgres",
            self.socket_dir().replace('\\', "\\\\").replace('\'', "\\'"),
            self.manifest["port"]
        )
    }
}
