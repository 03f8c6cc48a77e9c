//! The fence around a restored copy, against real PostgreSQL 18 and 15:
//! none of the source's code runs on the restore host, no background job
//! of the source starts unless the operator says so, nothing is written
//! through a link the backup carries, and the copy is private from the
//! moment its directory exists.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::common::archiving::{archiving, archiving_with, switch_and_wait_archived};
use crate::common::pg::{Cluster, Version};
use crate::common::restored::{command, ok_json, restore, run, Restored};
use crate::common::tls::{ca, cert, chmod, openssl};
use crate::common::{assert_exit, give_to_server_user, reentry_bin, stderr, write_secret};

fn show(r: &Restored, setting: &str) -> String {
    r.client()
        .query_one(&format!("SHOW {setting}"), &[])
        .unwrap()
        .get(0)
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A restore that is refused: exit 3, `expect` in what it says, and no
/// target left (so nothing started in it).
#[track_caller]
fn refused(c: &Cluster, repo: &Path, name: &str, args: &[&str], expect: &[&str]) {
    let to = c.root().join(name);
    let mut all = vec!["restore", "--to", to.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = run(c, repo, &all);
    if out.status.success() {
        // Stop what it started before failing.
        drop(Restored::from_output(c, to.clone(), &out));
    }
    assert_exit(&out, 3);
    for e in expect {
        assert!(stderr(&out).contains(e), "{e:?} not in: {}", stderr(&out));
    }
    assert!(!to.exists(), "{} was left behind", to.display());
}

/// A source with TLS on a passphrase-protected key, a passphrase command,
/// its own log directory and pid file, and library settings pointing at
/// paths: the copy, on the host that holds the identity, runs none of it.
fn none_of_the_sources_code_runs(version: Version) {
    let mut c = Cluster::init(version);
    let certs = c.dir("certs");
    ca(&certs, "ca");
    cert(&certs, "server", "ca", "localhost", Some("DNS:localhost"));
    openssl(
        &certs,
        &[
            "pkey",
            "-in",
            "server.key",
            "-aes256",
            "-passout",
            "pass:key-secret",
            "-out",
            "server-enc.key",
        ],
    );
    let data = c.data();
    std::fs::copy(certs.join("server.crt"), data.join("server.crt")).unwrap();
    std::fs::copy(certs.join("server-enc.key"), data.join("server.key")).unwrap();
    for f in ["server.crt", "server.key"] {
        give_to_server_user(&data.join(f));
    }
    chmod(&data.join("server.key"), 0o600);
    let marks = c.dir("marks");
    let asked = marks.join("passphrase-asked");
    let pid_file = marks.join("source.pid");
    let logs = c.dir("source-logs");
    let repo = c.dir("repo");
    c.append_conf(&[
        ("archive_mode", "on".to_string()),
        (
            "archive_command",
            crate::common::archiving::archive_command(&repo, ""),
        ),
        ("ssl", "on".into()),
        ("ssl_cert_file", "'server.crt'".into()),
        ("ssl_key_file", "'server.key'".into()),
        (
            "ssl_passphrase_command",
            format!("'touch {} && echo key-secret'", asked.display()),
        ),
        ("logging_collector", "on".into()),
        ("log_directory", format!("'{}'", logs.display())),
        ("external_pid_file", format!("'{}'", pid_file.display())),
        ("session_preload_libraries", "'auto_explain'".into()),
        (
            "dynamic_library_path",
            format!("'{}:$libdir'", c.dir("libs").display()),
        ),
        ("jit", "on".into()),
    ]);
    c.start();
    assert!(asked.exists(), "the source asked its passphrase command");
    assert!(pid_file.exists(), "the source wrote its pid file");
    std::fs::remove_file(&asked).unwrap();
    std::fs::remove_file(&pid_file).unwrap();
    c.client()
        .batch_execute("CREATE TABLE t AS SELECT 1 AS x")
        .unwrap();
    ok_json(&run(&c, &repo, &["backup"]));
    switch_and_wait_archived(&c);
    let source_logs = files_in(&logs);

    let r = restore(&c, &repo, "copy", &["--immediate"]);
    assert!(
        !asked.exists(),
        "the source's ssl_passphrase_command ran on the restore host"
    );
    assert!(!pid_file.exists(), "the copy wrote the source's pid file");
    assert_eq!(
        files_in(&logs),
        source_logs,
        "the copy logged into the source's log directory"
    );
    assert_eq!(r.count("t"), 1);
    for (setting, fenced) in [
        ("ssl", "off"),
        ("ssl_passphrase_command", ""),
        ("logging_collector", "off"),
        ("log_destination", "stderr"),
        ("external_pid_file", ""),
        ("session_preload_libraries", ""),
        ("local_preload_libraries", ""),
        ("dynamic_library_path", "$libdir"),
        ("jit", "off"),
        ("jit_provider", "llvmjit"),
    ] {
        assert_eq!(show(&r, setting), fenced, "{setting} on the copy");
    }
    if version.major() >= 17 {
        assert_eq!(show(&r, "event_triggers"), "off");
    }
    // Switches of extensions the source does not load are kept as
    // placeholders: the copy started with them.
    assert_eq!(show(&r, "timescaledb.max_background_workers"), "0");
    assert_eq!(show(&r, "cron.launch_active_jobs"), "off");
}

#[test]
fn pg18_a_restored_copy_runs_no_passphrase_command_log_collector_or_library_path_of_the_source() {
    none_of_the_sources_code_runs(Version::V18Ssl);
}

#[test]
fn pg15_a_restored_copy_runs_no_passphrase_command_log_collector_or_library_path_of_the_source() {
    none_of_the_sources_code_runs(Version::V15);
}

/// What no setting can fence is refused before the copy starts, and the
/// target is left as it was: a preloaded library named by a path, a
/// library with background workers the operator did not allow, a
/// data_directory that points at another cluster, `--listen` without the
/// source's pg_hba.conf.
fn refusals(version: Version) {
    let (mut c, repo) = archiving(version, "", &[]);
    // The source keeps its rules outside its data directory, as Debian does.
    let hba = c.dir("etc").join("pg_hba.conf");
    std::fs::rename(c.data().join("pg_hba.conf"), &hba).unwrap();
    c.append_conf(&[("hba_file", format!("'{}'", hba.display()))]);
    c.stop();
    c.start();
    let backup = |c: &Cluster| -> String {
        ok_json(&run(c, &repo, &["backup"]))["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    // ALTER SYSTEM writes it; the source is not restarted (it could not
    // load ./x either), but its backups carry it.
    c.client()
        .batch_execute("ALTER SYSTEM SET shared_preload_libraries = './x'")
        .unwrap();
    let by_path = backup(&c);
    c.client()
        .batch_execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements', 'basebackup_to_shell'")
        .unwrap();
    let unknown = backup(&c);
    c.client()
        .batch_execute("ALTER SYSTEM RESET shared_preload_libraries")
        .unwrap();
    c.append_conf(&[("data_directory", format!("'{}'", c.data().display()))]);
    let elsewhere = backup(&c);
    switch_and_wait_archived(&c);
    let source_pid = std::fs::read_to_string(c.data().join("postmaster.pid")).unwrap();

    refused(
        &c,
        &repo,
        "by-path",
        &["--backup", &by_path, "--immediate"],
        &["shared_preload_libraries", "\"./x\"", "Nothing was started"],
    );
    refused(
        &c,
        &repo,
        "unknown",
        &["--backup", &unknown, "--immediate", "--action", "promote"],
        &["basebackup_to_shell", "--allow-preload"],
    );
    refused(
        &c,
        &repo,
        "elsewhere",
        &["--backup", &elsewhere, "--immediate"],
        &["data_directory", c.data().to_str().unwrap()],
    );
    assert_eq!(
        std::fs::read_to_string(c.data().join("postmaster.pid")).unwrap(),
        source_pid,
        "the source runs on, untouched"
    );
    refused(
        &c,
        &repo,
        "listen",
        &[
            "--backup",
            &unknown,
            "--immediate",
            "--listen",
            "127.0.0.1",
            "--allow-preload",
            "basebackup_to_shell",
        ],
        &["no pg_hba.conf", "--listen"],
    );
    // An existing empty target is emptied, not removed.
    let kept = c.dir("kept-empty");
    let out = run(
        &c,
        &repo,
        &[
            "restore",
            "--to",
            kept.to_str().unwrap(),
            "--backup",
            &by_path,
            "--immediate",
        ],
    );
    assert_exit(&out, 3);
    assert_eq!(files_in(&kept), Vec::<String>::new());

    // Named by the operator, the library is loaded; fenced, the copy
    // serves its own rules on its socket.
    let r = restore(
        &c,
        &repo,
        "allowed",
        &[
            "--backup",
            &unknown,
            "--immediate",
            "--allow-preload",
            "basebackup_to_shell",
        ],
    );
    assert_eq!(
        show(&r, "shared_preload_libraries"),
        "pg_stat_statements, basebackup_to_shell"
    );
}

#[test]
fn pg18_a_library_path_unknown_background_workers_or_another_data_directory_are_refused_before_start(
) {
    refusals(Version::V18);
}

#[test]
fn pg15_a_library_path_unknown_background_workers_or_another_data_directory_are_refused_before_start(
) {
    refusals(Version::V15);
}

/// Debian's pg_cron for PostgreSQL 15 is 1.4: it has no
/// cron.launch_active_jobs, and keeps the copy's `off` as a placeholder it
/// never reads. Its jobs would run once the copy is promoted: refused
/// unless the operator lets them.
#[test]
fn pg15_a_pg_cron_without_its_switch_is_refused_unless_allowed() {
    let (c, repo) = archiving(
        Version::V15,
        "",
        &[
            ("shared_preload_libraries", "'pg_cron'"),
            ("cron.database_name", "'postgres'"),
            ("cron.launch_active_jobs", "off"),
        ],
    );
    let mut db = c.client();
    db.batch_execute(
        "CREATE EXTENSION pg_cron; SELECT cron.schedule('tick', '* * * * *', 'SELECT 1')",
    )
    .unwrap();
    // What a check of current_setting() would be fooled by: the
    // placeholder answers `off`; pg_settings has no such setting.
    let placeholder: Option<String> = db
        .query_one(
            "SELECT current_setting('cron.launch_active_jobs', true)",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(placeholder.as_deref(), Some("off"));
    // The check a started copy gets, against this very server.
    let mut probe = reentry::pg::conn::Db::connect(Some(&c.conninfo())).unwrap();
    let e = reentry::backup::fence::check_running(
        &mut probe,
        &reentry::backup::fence::Checked { cron: true },
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("does not define cron.launch_active_jobs"),
        "{e}"
    );
    ok_json(&run(&c, &repo, &["backup"]));
    switch_and_wait_archived(&c);

    refused(
        &c,
        &repo,
        "copy",
        &["--immediate", "--action", "promote"],
        &[
            "pg_cron",
            "cron.launch_active_jobs",
            "/usr/lib/postgresql/15/lib/pg_cron.so",
        ],
    );
    let r = restore(
        &c,
        &repo,
        "allowed",
        &[
            "--immediate",
            "--action",
            "promote",
            "--allow-preload",
            "pg_cron",
        ],
    );
    assert_eq!(show(&r, "shared_preload_libraries"), "pg_cron");
}

/// A plain local backup whose files were replaced by links (to a file of
/// the host's, and to one that does not exist yet) is refused before
/// anything is copied, and nothing is written through them.
#[test]
fn a_link_planted_in_a_plain_backup_is_refused_and_nothing_is_written_through_it() {
    let (c, repo) = archiving(Version::V18, "", &[]);
    let b = ok_json(&run(&c, &repo, &["backup"]));
    switch_and_wait_archived(&c);
    let victims = c.dir("victims");
    let victim = victims.join("precious.conf");
    std::fs::write(&victim, "precious\n").unwrap();
    give_to_server_user(&victim);
    let absent = victims.join("absent");
    let data = repo
        .join("backup")
        .join(b["id"].as_str().unwrap())
        .join("data");
    std::fs::remove_file(data.join("postgresql.auto.conf")).unwrap();
    std::os::unix::fs::symlink(&victim, data.join("postgresql.auto.conf")).unwrap();
    std::fs::remove_file(data.join("pg_hba.conf")).unwrap();
    std::os::unix::fs::symlink(&absent, data.join("pg_hba.conf")).unwrap();

    let to = c.root().join("copy");
    let out = run(
        &c,
        &repo,
        &["restore", "--to", to.to_str().unwrap(), "--immediate"],
    );
    if out.status.success() {
        drop(Restored::from_output(&c, to.clone(), &out));
    }
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        "precious\n",
        "the restore wrote through the planted link"
    );
    assert!(
        !absent.exists(),
        "the restore created a file through a dangling link"
    );
    assert_exit(&out, 3);
    assert!(stderr(&out).contains("symbolic link"), "{}", stderr(&out));
    assert!(!to.exists(), "nothing was copied");
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

/// Runs `cmd` (a restore, under umask 022) to the test hook's pause
/// point after the backup is laid out in `to`, and returns what is there
/// that the owner's group or others could read then; the restore is
/// killed there.
#[track_caller]
fn readable_by_others_while_copying(mut cmd: Command, to: &Path) -> Vec<String> {
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0o022);
            Ok(())
        });
    }
    let mut child = cmd
        .env("REENTRY_PAUSE_AT", "restore:copied")
        .env("REENTRY_TEST_HOOKS", "hang-at-pause-points")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = String::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("paused at") {
            let mut open = Vec::new();
            let mut count = 0;
            let mut stack = vec![to.to_owned()];
            while let Some(p) = stack.pop() {
                let meta = std::fs::symlink_metadata(&p).unwrap();
                count += 1;
                if meta.permissions().mode() & 0o077 != 0 {
                    open.push(format!(
                        "{} {:o}",
                        p.strip_prefix(to).unwrap().display(),
                        meta.permissions().mode() & 0o7777
                    ));
                }
                if meta.is_dir() {
                    stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
                }
            }
            child.kill().unwrap();
            child.wait().unwrap();
            assert!(count > 100, "the backup is laid out ({count} entries)");
            return open;
        }
    }
    let status = child.wait().unwrap();
    panic!("the restore never reached its pause point ({status}): {seen}");
}

/// Under umask 022, from a source initialised with group access
/// (`initdb -g`: its files 0640, its directories 0750), nothing under
/// the target is readable by anyone but its owner while the backup is
/// laid out: copied (plain), combined (an incremental chain) or
/// decrypted (packed).
#[test]
fn the_target_is_private_while_the_backup_is_laid_out_in_it() {
    let (c, repo) = archiving_with(Version::V18, &["-g"], "", &[("summarize_wal", "on")]);
    c.client()
        .batch_execute("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g")
        .unwrap();
    let full = ok_json(&run(&c, &repo, &["backup"]))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    c.client()
        .batch_execute("INSERT INTO t SELECT g FROM generate_series(1, 1000) g")
        .unwrap();
    ok_json(&run(&c, &repo, &["backup", "--incremental"]));
    switch_and_wait_archived(&c);
    for (name, args) in [
        ("plain", vec!["--backup", full.as_str()]),
        ("combined", vec![]),
    ] {
        let to = c.root().join(name);
        let mut all = vec!["restore", "--to", to.to_str().unwrap(), "--immediate"];
        all.extend(args);
        let open = readable_by_others_while_copying(command(&c, &repo, &all), &to);
        assert_eq!(open, Vec::<String>::new(), "{name}: readable by others");
    }

    // Packed and encrypted, in a local repository with a recipient.
    let (secret, public) = age_key();
    let mut e = Cluster::init_with(Version::V18, &["-g"]);
    let erepo = e.dir("repo");
    e.append_conf(&[
        ("archive_mode", "on".to_string()),
        (
            "archive_command",
            format!(
                "'REENTRY_AGE_RECIPIENTS={public} {} --repo {} wal push %p'",
                reentry_bin().display(),
                erepo.display()
            ),
        ),
    ]);
    e.start();
    let identity = e.dir("keys").join("identity");
    write_secret(&identity, &secret);
    give_to_server_user(&identity);
    let (signing, _) = crate::common::signing_key(&e.dir("keys"));
    let encrypted = |args: &[&str]| {
        let mut cmd = command(&e, &erepo, args);
        cmd.env("REENTRY_AGE_RECIPIENTS", &public)
            .env("REENTRY_AGE_IDENTITY_FILE", &identity)
            .env("REENTRY_SIGNING_KEY_FILE", &signing);
        cmd
    };
    ok_json(&encrypted(&["backup"]).output().unwrap());
    switch_and_wait_archived(&e);
    let to = e.root().join("packed");
    let open = readable_by_others_while_copying(
        encrypted(&["restore", "--to", to.to_str().unwrap(), "--immediate"]),
        &to,
    );
    assert_eq!(open, Vec::<String>::new(), "packed: readable by others");
}

/// A local repository with a recipient stages the plain backup in
/// `--scratch DIR`, not in $TMPDIR (often a small tmpfs), and leaves
/// nothing there.
#[test]
fn an_encrypted_local_backup_stages_in_the_scratch_directory_it_is_given() {
    let (_, public) = age_key();
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
    let no_tmp = c.root().join("no-such-tmp");
    let (signing, _) = crate::common::signing_key(&c.dir("keys"));
    let backup = |extra: &[&str]| -> Output {
        let mut args = vec!["backup"];
        args.extend_from_slice(extra);
        command(&c, &repo, &args)
            .env("REENTRY_AGE_RECIPIENTS", &public)
            .env("REENTRY_SIGNING_KEY_FILE", &signing)
            .env("TMPDIR", &no_tmp)
            .output()
            .unwrap()
    };
    let out = backup(&[]);
    assert_exit(&out, 2);
    assert!(
        stderr(&out).contains(no_tmp.to_str().unwrap()),
        "{}",
        stderr(&out)
    );
    let scratch = c.dir("big-disk");
    let b = ok_json(&backup(&["--scratch", scratch.to_str().unwrap()]));
    assert_eq!(b["encryption"]["algorithm"], "age-x25519", "{b}");
    assert_eq!(
        files_in(&scratch),
        Vec::<String>::new(),
        "scratch left behind"
    );
}

/// A drill whose copy's path is too long for a socket puts the socket in
/// a private directory of `$TMPDIR`: reached even where that path holds a
/// quote, and removed with the copy.
#[test]
fn a_drill_reaches_its_socket_in_a_tmpdir_with_a_quote_and_removes_it() {
    let (c, repo) = archiving(Version::V18, "", &[]);
    c.client()
        .batch_execute("CREATE TABLE t AS SELECT 1 AS x")
        .unwrap();
    ok_json(&run(&c, &repo, &["backup"]));
    switch_and_wait_archived(&c);
    let root_len = c.root().as_os_str().len();
    let name = format!(
        "it's tmp{}",
        "x".repeat(50usize.saturating_sub(root_len + 9))
    );
    let tmp: PathBuf = c.dir(&name);
    let evidence = c.dir("evidence").join("drill.json");
    let e = ok_json(
        &command(
            &c,
            &repo,
            &[
                "drill",
                "--evidence",
                evidence.to_str().unwrap(),
                "--timeout",
                "120",
            ],
        )
        .env("TMPDIR", &tmp)
        .output()
        .unwrap(),
    );
    assert_eq!(e["validation_status"], "passed", "{e}");
    let socket = e["restore"]["socket_dir"].as_str().unwrap();
    assert!(
        socket.starts_with(tmp.to_str().unwrap()),
        "the copy's path was long enough to need a socket directory of its own: {socket}"
    );
    assert_eq!(files_in(&tmp), Vec::<String>::new(), "left in $TMPDIR");
}

/// Settings of a database or role (`ALTER DATABASE … SET`) outrank the
/// copy's configuration, and `postgres -C` does not see them: a session
/// of the copy would load a library from wherever they point. reentry's
/// own sessions override them at connection start, and a copy whose
/// databases or roles set one is stopped and refused.
#[test]
fn a_library_that_database_or_role_settings_preload_is_refused_and_never_loaded() {
    let (c, repo) = archiving(Version::V18, "", &[]);
    let evil = "/nonexistent/reentry-test-evil.so";
    let mut db = c.client();
    // One statement each: CREATE DATABASE runs outside a transaction.
    for sql in [
        "CREATE DATABASE app".to_owned(),
        format!("ALTER DATABASE app SET session_preload_libraries = '{evil}'"),
        "CREATE ROLE jobs LOGIN".to_owned(),
        "ALTER ROLE jobs SET dynamic_library_path = '/srv/app/lib'".to_owned(),
    ] {
        db.batch_execute(&sql).unwrap();
    }
    // A plain session of `app` tries to load it (and fails: it does not
    // exist); one with reentry's startup options does not.
    let plain = postgres::Client::connect(&c.db_conninfo("app"), postgres::NoTls);
    let err = format!(
        "{:?}",
        plain.err().expect("a plain session loads the library")
    );
    assert!(err.contains("reentry-test-evil"), "{err}");
    let mut guarded = postgres::Client::connect(
        &format!(
            "{} {}",
            c.db_conninfo("app"),
            reentry::backup::fence::SESSION_OPTIONS
        ),
        postgres::NoTls,
    )
    .expect("reentry's session loads nothing");
    let loaded: String = guarded
        .query_one("SHOW session_preload_libraries", &[])
        .unwrap()
        .get(0);
    assert_eq!(loaded, "");

    ok_json(&run(&c, &repo, &["backup"]));
    switch_and_wait_archived(&c);
    let to = c.root().join("copy");
    let out = run(
        &c,
        &repo,
        &["restore", "--to", to.to_str().unwrap(), "--immediate"],
    );
    assert_exit(&out, 3);
    let said = stderr(&out);
    assert!(
        // PostgreSQL stores a list setting's entries quoted.
        said.contains(&format!("app/*: session_preload_libraries=\"{evil}\""))
            && said.contains("*/jobs: dynamic_library_path=/srv/app/lib")
            && said.contains("the copy was stopped"),
        "{said}"
    );
    assert!(
        !to.join("postmaster.pid").exists(),
        "the refused copy is still running"
    );
}
