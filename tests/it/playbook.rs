//! `reentry playbook check` against real PostgreSQL 18: the example
//! playbook's tables exist, and what does not is reported at the playbook
//! line that named it, without ever printing a secret.

use std::path::Path;
use std::process::{Command, Output};

use crate::common::pg::{Cluster, Version};
use crate::common::{assert_exit, reentry_bin, stderr, stdout};

const SECRET: &str = "pb-sekrit-4711";

/// The case-management example, pointed at `current` and `restored` on `c`.
fn playbook_for(c: &Cluster, dir: &Path, restored_conninfo: &str) -> std::path::PathBuf {
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/playbooks/case-management.toml"
    ))
    .unwrap();
    let mut n = 0;
    let text: Vec<String> = example
        .lines()
        .map(|l| {
            if l.starts_with("conninfo = ") {
                n += 1;
                if n == 1 {
                    format!("conninfo = \"host=127.0.0.1 port={} user=postgres dbname=cases_current password=${{CASES_DB_PASSWORD}}\"", c.port)
                } else {
                    format!("conninfo = \"{restored_conninfo}\"")
                }
            } else {
                l.to_owned()
            }
        })
        .collect();
    let path = dir.join("cases.toml");
    std::fs::write(&path, text.join("\n")).unwrap();
    path
}

fn check(path: &Path, extra: &[&str]) -> Output {
    Command::new(reentry_bin())
        .args(["playbook", "check"])
        .arg(path)
        .args(extra)
        .env("CASES_DB_PASSWORD", SECRET)
        .env("CASES_KAFKA", "127.0.0.1:1")
        .env("CASES_REDIS", "redis://127.0.0.1:1")
        .env("CASES_SEARCH", "http://127.0.0.1:1")
        .output()
        .unwrap()
}

fn line_of(path: &Path, needle: &str) -> usize {
    line_after(path, "", needle)
}

/// The line of `needle`'s first occurrence after the line holding `after`.
fn line_after(path: &Path, after: &str, needle: &str) -> usize {
    let text = std::fs::read_to_string(path).unwrap();
    let start = text.lines().position(|l| l.contains(after)).unwrap();
    text.lines()
        .enumerate()
        .skip(start)
        .find(|(_, l)| l.contains(needle))
        .unwrap()
        .0
        + 1
}

#[test]
fn playbook_check_finds_every_table_and_reports_what_is_missing_where_it_was_named() {
    let mut c = Cluster::init(Version::V18);
    c.start();
    let mut admin = c.client();
    for db in ["cases_current", "cases_restored"] {
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .unwrap();
        let mut d = postgres::Client::connect(
            &format!("host=127.0.0.1 port={} user=postgres dbname={db}", c.port),
            postgres::NoTls,
        )
        .unwrap();
        d.batch_execute(include_str!("../../sql/system_gate.sql"))
            .unwrap();
        d.batch_execute(include_str!("../../sql/case-management.sql"))
            .unwrap();
        // Quartz's tables, as a scheduler that has run leaves them.
        d.batch_execute(&crate::common::quartz::schema()).unwrap();
        d.batch_execute(
            "INSERT INTO qrtz_locks VALUES ('CaseScheduler', 'TRIGGER_ACCESS');
             INSERT INTO qrtz_job_details (sched_name, job_name, job_group, job_class_name, is_durable,
                                           is_nonconcurrent, is_update_data, requests_recovery)
             VALUES ('CaseScheduler', 'remind-owners', 'case-jobs', 'QuartzLab$LogJob', false, false, false, false);
             INSERT INTO qrtz_triggers (sched_name, trigger_name, trigger_group, job_name, job_group,
                                        trigger_state, trigger_type, start_time, next_fire_time, misfire_instr)
             VALUES ('CaseScheduler', 'remind-owners', 'case-jobs', 'remind-owners', 'case-jobs',
                     'WAITING', 'SIMPLE', 0, 4102444800000, 0)",
        )
        .unwrap();
    }
    let restored = format!(
        "host=127.0.0.1 port={} user=postgres dbname=cases_restored",
        c.port
    );
    let dir = c.dir("work");
    let path = playbook_for(&c, &dir, &restored);

    let out = check(&path, &[]);
    assert_exit(&out, 0);
    assert!(
        stdout(&out).contains("parse, meaning, databases"),
        "{}",
        stdout(&out)
    );

    // A column the outbox step needs is gone, and the invariant's column too.
    let current = format!(
        "host=127.0.0.1 port={} user=postgres dbname=cases_current",
        c.port
    );
    let mut d = postgres::Client::connect(&current, postgres::NoTls).unwrap();
    d.batch_execute(
        "ALTER TABLE outbox_event DROP COLUMN published_at; ALTER TABLE cases DROP COLUMN owner_id",
    )
    .unwrap();
    let out = check(&path, &["--json"]);
    assert_exit(&out, 78);
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let errors = report["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 3, "{report}");
    let outbox = errors
        .iter()
        .find(|e| e["message"].as_str().unwrap().contains("published_at"))
        .expect("the outbox column");
    assert_eq!(
        outbox["line"],
        line_after(&path, "[[outbox]]", "table = \"outbox_event\"")
    );
    assert!(outbox["message"]
        .as_str()
        .unwrap()
        .contains("databases.current"));
    // The invariant and the search index's documents both read owner_id.
    let lines: Vec<&serde_json::Value> = errors
        .iter()
        .filter(|e| e["message"].as_str().unwrap().contains("does not run"))
        .map(|e| &e["line"])
        .collect();
    assert_eq!(
        lines,
        [
            line_of(&path, "owner_id IS NULL"),
            line_of(&path, "documents = ")
        ],
        "{report}"
    );

    // A database that does not answer: named, located, and its password kept.
    let dead =
        "host=127.0.0.1 port=1 user=postgres dbname=cases_restored password=${CASES_DB_PASSWORD}";
    let path = playbook_for(&c, &dir, dead);
    let out = check(&path, &[]);
    assert_exit(&out, 78);
    let err = stderr(&out);
    assert!(err.contains("databases.restored: cannot connect"), "{err}");
    assert!(
        !err.contains(SECRET) && !stdout(&out).contains(SECRET),
        "the password leaked: {err}"
    );

    // --offline stops before connecting: the same file passes.
    assert_exit(&check(&path, &["--offline"]), 0);
}

/// Application teams lint playbooks in their own CI, before an incident,
/// where no production secret is set: offline, an unset `${VAR}` is a note;
/// wherever the value is needed it is an error, at its place.
#[test]
fn the_example_playbooks_lint_offline_without_their_secrets() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/playbooks");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        // Beside the playbooks: the templates and exports they name.
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let lint = |extra: &[&str]| {
            Command::new(reentry_bin())
                .args(["playbook", "check"])
                .arg(&path)
                .args(extra)
                .env_remove("CASES_DB_PASSWORD")
                .env_remove("LEDGER_DB_PASSWORD")
                .output()
                .unwrap()
        };
        let out = lint(&["--offline"]);
        assert_exit(&out, 0);
        let text = stdout(&out);
        assert!(text.starts_with("ok: "), "{}: {text}", path.display());
        assert!(
            text.contains(": note: `conninfo` in [databases.current]: environment variable")
                && text.contains("is not set"),
            "{}: {text}",
            path.display()
        );
        let json: serde_json::Value =
            serde_json::from_str(&stdout(&lint(&["--offline", "--json"]))).unwrap();
        assert_eq!(json["ok"], true);
        assert!(json["notes"][0]["line"].as_u64().is_some(), "{json}");

        // Online, and for plan and apply, the value is needed: exit 78.
        let out = lint(&[]);
        assert_exit(&out, 78);
        assert!(stderr(&out).contains("is not set"), "{}", stderr(&out));
        let out = Command::new(reentry_bin())
            .arg("plan")
            .arg(&path)
            .env_remove("CASES_DB_PASSWORD")
            .env_remove("LEDGER_DB_PASSWORD")
            .output()
            .unwrap();
        assert_exit(&out, 78);
    }
}

#[test]
fn a_command_given_a_playbook_without_the_section_it_needs_says_where_with_exit_78() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gates-only.toml");
    std::fs::write(
        &path,
        "[playbook]\nname = \"g\"\nway-back = \"cutover\"\n[databases.current]\nconninfo = \"host=a\"\n[databases.restored]\nconninfo = \"host=b\"\n[recovery-target]\ntime = \"2026-11-25 12:00:00+00\"\n[gates]\nreopen-order = []\n",
    )
    .unwrap();
    let out = Command::new(reentry_bin())
        .args(["outbox", "diff"])
        .arg(&path)
        .output()
        .unwrap();
    assert_exit(&out, 78);
    assert!(
        stderr(&out).contains("gates-only.toml:1:1: has no [[outbox]]"),
        "{}",
        stderr(&out)
    );
}

/// A `${VAR}` password with a space and `=` in a conninfo is one value: the
/// role that has it connects, and a wrong one is refused without any piece
/// of it in the error (unquoted, `x y=z` read as `password=x` and an
/// unknown option `y`, which the error quoted).
#[test]
fn a_conninfo_password_from_the_environment_is_quoted_and_never_echoed() {
    let mut c = Cluster::init(Version::V18);
    let hba = c.data().join("pg_hba.conf");
    let rules = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("host all pw_role 127.0.0.1/32 scram-sha-256\n{rules}"),
    )
    .unwrap();
    c.start();
    c.client()
        .batch_execute("CREATE ROLE pw_role LOGIN PASSWORD 'x y=z'")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pw.toml");
    let conninfo = format!(
        "host=127.0.0.1 port={} user=pw_role dbname=postgres password=${{DB_PW}}",
        c.port
    );
    std::fs::write(
        &path,
        format!("[playbook]\nname = \"pw\"\nway-back = \"cutover\"\n[databases.current]\nconninfo = \"{conninfo}\"\n[databases.restored]\nconninfo = \"{conninfo}\"\n[recovery-target]\ntime = \"2026-11-25 12:00:00+00\"\n[gates]\nreopen-order = []\n"),
    )
    .unwrap();
    let run = |pw: &str| {
        Command::new(reentry_bin())
            .args(["playbook", "check"])
            .arg(&path)
            .env("DB_PW", pw)
            .output()
            .unwrap()
    };
    let out = run("x y=z");
    assert_exit(&out, 0);

    let out = run("wr0ng k3y=v4l");
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(text.contains("password authentication failed"), "{text}");
    for fragment in ["wr0ng", "k3y", "v4l"] {
        assert!(!text.contains(fragment), "`{fragment}` leaked: {text}");
    }
}
