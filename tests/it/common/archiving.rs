//! Clusters that archive through `reentry wal push`, and waiting for their
//! WAL to arrive.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::pg::{Cluster, Version};
use super::reentry_bin;

pub fn archive_command(repo: &Path, extra: &str) -> String {
    format!(
        "'{} --repo {} wal push %p {extra}'",
        reentry_bin().display(),
        repo.display()
    )
}

pub fn restore_command(repo: &Path) -> String {
    format!(
        "'{} --repo {} wal fetch %f %p'",
        reentry_bin().display(),
        repo.display()
    )
}

/// A running cluster archiving into `repo` through `reentry wal push`
/// (with `extra` arguments), with `settings` in its configuration.
pub fn archiving(version: Version, extra: &str, settings: &[(&str, &str)]) -> (Cluster, PathBuf) {
    archiving_with(version, &[], extra, settings)
}

/// `archiving`, with more `initdb` arguments.
pub fn archiving_with(
    version: Version,
    initdb: &[&str],
    extra: &str,
    settings: &[(&str, &str)],
) -> (Cluster, PathBuf) {
    let c = Cluster::init_with(version, initdb);
    let repo = c.dir("repo");
    c.append_conf(&[
        ("archive_mode", "on".to_string()),
        ("archive_command", archive_command(&repo, extra)),
    ]);
    c.append_conf(settings);
    let mut c = c;
    c.start();
    (c, repo)
}

/// Switches to a new segment and waits until the one just closed is
/// archived. Fails at once if the archiver reports a failure. A WAL record is
/// written first: with none since the last switch, a switch does nothing.
pub fn switch_and_wait_archived(c: &Cluster) -> String {
    let mut db = c.client();
    let closed: String = db
        .query_one(
            "SELECT pg_walfile_name(pg_logical_emit_message(false, 'reentry-test', 'switch'))",
            &[],
        )
        .unwrap()
        .get(0);
    db.execute("SELECT pg_switch_wal()", &[]).unwrap();
    wait_archived(c, &closed);
    closed
}

pub fn wait_archived(c: &Cluster, name: &str) {
    let mut db = c.client();
    c.wait_for(
        &format!("{name} to be archived"),
        Duration::from_secs(120),
        || {
            let row = db
                .query_one(
                    "SELECT coalesce(last_archived_wal, ''), failed_count FROM pg_stat_archiver",
                    &[],
                )
                .unwrap();
            let (last, failed): (String, i64) = (row.get(0), row.get(1));
            assert_eq!(
                failed,
                0,
                "archive_command failed; last failed: see server log\n{}",
                c.log()
            );
            // Compare segments only: after a promotion the last archived file
            // may be a history file.
            (last.len() >= 24 && last[..24] >= *name).then_some(())
        },
    )
}
