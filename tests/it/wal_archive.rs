//! `reentry wal push` / `wal fetch` as PostgreSQL's archive_command and
//! restore_command, against real PostgreSQL 18 and 15.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use reentry::backup::archive::Archive;
use reentry::backup::stored::Compression;
use reentry::pg::wal::{LongPageHeader, WalFileName};

use crate::common::archiving::{
    archiving, archiving_with, restore_command, switch_and_wait_archived,
};
use crate::common::pg::{Cluster, Version};
use crate::common::{
    assert_exit, pushes_that_stored, reentry, reentry_bin, run_concurrently, stderr, stdout,
};

const FIRST_SEGMENT: &str = "000000010000000000000001";

fn segment_name(timeline: u32, segno: u64) -> String {
    format!("{timeline:08X}{:08X}{:08X}", segno / 256, segno % 256)
}

fn archives_every_segment_under_pgbench_load(version: Version, extra: &str) {
    let (c, repo) = archiving(version, extra, &[]);
    c.run_ok(c.cmd("pgbench").args(["-i", "-q", "-s", "10"]));
    c.run_ok(
        c.cmd("pgbench")
            .args(["-n", "-c", "4", "-j", "2", "-t", "400"]),
    );
    let last = switch_and_wait_archived(&c);

    let failed: i64 = c
        .client()
        .query_one("SELECT failed_count FROM pg_stat_archiver", &[])
        .unwrap()
        .get(0);
    assert_eq!(failed, 0);
    let archive = Archive::new(&repo);
    let last_segno = WalFileName::parse(&last)
        .unwrap()
        .segment_with_header()
        .unwrap()
        .segno(16 << 20);
    assert!(
        last_segno >= 6,
        "pgbench wrote only {last_segno} segments: the load is too small to mean anything"
    );
    for segno in 1..=last_segno {
        let name = WalFileName::parse(&segment_name(1, segno)).unwrap();
        let header = archive
            .verify(&name)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(header.raw_len, 16 << 20, "{name}");
    }
    let info = archive
        .info()
        .unwrap()
        .expect("archive.json written at the first push");
    assert_eq!(info.pg_version, Some(version.major()));
}

#[test]
fn pg18_archives_every_segment_under_pgbench_load() {
    archives_every_segment_under_pgbench_load(Version::V18, "");
}

#[test]
fn pg15_archives_every_segment_under_pgbench_load_with_zstd() {
    archives_every_segment_under_pgbench_load(Version::V15, "--compress zstd --compress-level 3");
}

/// The first WAL segment of a fresh `initdb`, copied into a temporary
/// directory beside an empty repository: what the archive tests push.
struct Fixture {
    tmp: tempfile::TempDir,
    seg: PathBuf,
    repo: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let c = Cluster::init(Version::V18);
        let tmp = tempfile::tempdir().unwrap();
        let seg = tmp.path().join(FIRST_SEGMENT);
        std::fs::copy(c.data().join("pg_wal").join(FIRST_SEGMENT), &seg).unwrap();
        Fixture {
            repo: tmp.path().join("repo"),
            seg,
            tmp,
        }
    }

    /// With the segment already archived.
    fn pushed() -> Fixture {
        let f = Fixture::new();
        assert_exit(&push(&f.repo, &f.seg), 0);
        f
    }

    fn stored(&self) -> PathBuf {
        stored_path(&self.repo, FIRST_SEGMENT)
    }

    fn subdir(&self, name: &str) -> PathBuf {
        let d = self.tmp.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}

/// The file's checksum as the archive shows it by default, computed here
/// by the blake3 crate itself.
fn blake3_of(path: &Path) -> String {
    format!(
        "blake3:{}",
        blake3::hash(&std::fs::read(path).unwrap()).to_hex()
    )
}

fn sha256_of(path: &Path) -> String {
    use sha2::Digest;
    let hex: String = sha2::Sha256::digest(std::fs::read(path).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

fn push(repo: &Path, file: &Path) -> Output {
    push_with(repo, file, &[])
}

fn push_with(repo: &Path, file: &Path, flags: &[&str]) -> Output {
    let mut args = vec!["--repo", repo.to_str().unwrap(), "--json", "wal", "push"];
    args.extend(flags);
    args.push(file.to_str().unwrap());
    reentry(false, &args)
}

fn fetch(repo: &Path, name: &str, dest: &Path) -> Output {
    fetch_as(false, repo, name, dest)
}

/// `wal fetch`, as the server user when `as_server` (as restore_command runs).
fn fetch_as(as_server: bool, repo: &Path, name: &str, dest: &Path) -> Output {
    let (repo, dest) = (repo.to_str().unwrap(), dest.to_str().unwrap());
    reentry(as_server, &["--repo", repo, "wal", "fetch", name, dest])
}

fn stored_path(repo: &Path, name: &str) -> PathBuf {
    Archive::new(repo)
        .path_of(&WalFileName::parse(name).unwrap())
        .expect("a local archive")
}

#[track_caller]
fn assert_outcome(o: &Output, outcome: &str) {
    assert_exit(o, 0);
    let want = format!(r#""outcome":"{outcome}""#);
    assert!(
        stdout(o).contains(&want),
        "expected {want} in {}",
        stdout(o)
    );
}

fn flip_byte(path: &Path, at: usize) {
    let mut b = std::fs::read(path).unwrap();
    b[at] ^= 0x10;
    std::fs::write(path, b).unwrap();
}

fn inode(path: &Path) -> u64 {
    std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).unwrap())
}

#[test]
fn the_same_content_pushed_again_succeeds_without_rewriting() {
    let f = Fixture::new();
    assert_outcome(&push(&f.repo, &f.seg), "stored");
    let before = inode(&f.stored());
    assert_outcome(&push(&f.repo, &f.seg), "already-archived");
    assert_eq!(inode(&f.stored()), before);
}

#[test]
fn different_content_under_an_archived_name_is_refused_and_the_stored_copy_is_kept() {
    let f = Fixture::pushed();
    let stored_before = std::fs::read(f.stored()).unwrap();
    let original = blake3_of(&f.seg);
    // Same name, same cluster, one byte different past the page header.
    flip_byte(&f.seg, 1 << 20);
    let changed = blake3_of(&f.seg);

    let out = push(&f.repo, &f.seg);
    assert_exit(&out, 3);
    let err = stderr(&out);
    assert!(
        err.contains(&original) && err.contains(&changed),
        "both checksums named: {err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(
        std::fs::read(f.stored()).unwrap(),
        stored_before,
        "stored copy untouched"
    );
}

#[test]
fn concurrent_pushes_of_one_segment_all_succeed_and_leave_one_intact_copy() {
    let f = Fixture::new();
    let outputs = run_concurrently((0..8).map(|_| {
        let mut c = Command::new(reentry_bin());
        c.args([
            "--repo",
            f.repo.to_str().unwrap(),
            "--json",
            "wal",
            "push",
            f.seg.to_str().unwrap(),
        ]);
        c
    }));
    assert_eq!(
        pushes_that_stored(&outputs),
        1,
        "exactly one push stores, the rest find it archived"
    );

    let header = Archive::new(&f.repo)
        .verify(&WalFileName::parse(FIRST_SEGMENT).unwrap())
        .unwrap();
    assert_eq!(header.checksum.to_string(), blake3_of(&f.seg));
    let names: Vec<_> = std::fs::read_dir(f.stored().parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, [FIRST_SEGMENT], "no temporary files left behind");
}

#[test]
fn a_segment_from_another_cluster_is_refused_naming_both_identifiers() {
    let (a, b) = (Fixture::pushed(), Fixture::new());
    let out = push(&a.repo, &b.seg);
    assert_exit(&out, 3);
    let sysid = |p: &Path| {
        LongPageHeader::parse(&std::fs::read(p).unwrap())
            .unwrap()
            .system_identifier
            .to_string()
    };
    let err = stderr(&out);
    assert!(
        err.contains(&sysid(&a.seg)) && err.contains(&sysid(&b.seg)),
        "{err}"
    );
    assert_eq!(
        blake3_of(&a.seg),
        Archive::new(&a.repo)
            .verify(&WalFileName::parse(FIRST_SEGMENT).unwrap())
            .unwrap()
            .checksum
            .to_string()
    );
}

#[test]
fn a_file_that_is_not_what_its_name_says_is_refused() {
    let f = Fixture::new();
    // Segment 1's bytes under segment 2's name.
    let renamed = f.subdir("renamed").join("000000010000000000000002");
    std::fs::copy(&f.seg, &renamed).unwrap();
    let out = push(&f.repo, &renamed);
    assert_exit(&out, 3);
    assert!(stderr(&out).contains("wrong name"), "{}", stderr(&out));

    // A segment cut short.
    let short = f.subdir("cut").join(FIRST_SEGMENT);
    std::fs::write(&short, &std::fs::read(&f.seg).unwrap()[..1 << 20]).unwrap();
    let out = push(&f.repo, &short);
    assert_exit(&out, 3);
    assert!(
        stderr(&out).contains("incomplete segment"),
        "{}",
        stderr(&out)
    );

    // Not WAL at all.
    let junk = f.subdir("junk").join(FIRST_SEGMENT);
    std::fs::write(&junk, vec![0u8; 16 << 20]).unwrap();
    assert_exit(&push(&f.repo, &junk), 3);

    // A name PostgreSQL never archives.
    let odd = f.subdir("odd").join("pg_control");
    std::fs::write(&odd, b"x").unwrap();
    assert_exit(&push(&f.repo, &odd), 64);
    assert!(!f.stored().exists(), "nothing was archived");
}

/// Where the repository comes from: --repo, else REENTRY_REPO, else the
/// config file; with none, a configuration error that says what to set.
#[test]
fn the_repository_comes_from_the_flag_the_environment_or_the_config_file() {
    let f = Fixture::new();
    let run = |args: &[&str], env: Option<&Path>| {
        let mut cmd = Command::new(reentry_bin());
        cmd.args(args)
            .arg("wal")
            .arg("push")
            .arg(&f.seg)
            .arg("--json")
            .env_remove("REENTRY_REPO");
        cmd.current_dir(f.tmp.path());
        if let Some(repo) = env {
            cmd.env("REENTRY_REPO", repo);
        }
        cmd.output().unwrap()
    };
    let out = run(&[], None);
    assert_exit(&out, 78);
    assert!(stderr(&out).contains("REENTRY_REPO"), "{}", stderr(&out));

    let from_env = f.subdir("from-env");
    assert_outcome(&run(&[], Some(&from_env)), "stored");
    assert!(stored_path(&from_env, FIRST_SEGMENT).exists());

    std::fs::write(
        f.tmp.path().join("reentry.toml"),
        "repo = \"from-config\"\n[wal]\ncompress = \"zstd\"\n",
    )
    .unwrap();
    assert_outcome(&run(&[], None), "stored");
    let header = Archive::new(f.tmp.path().join("from-config"))
        .verify(&WalFileName::parse(FIRST_SEGMENT).unwrap())
        .unwrap();
    assert_eq!(
        header.compression,
        Compression::Zstd,
        "settings from the config file apply"
    );

    let from_flag = f.subdir("from-flag");
    assert_outcome(
        &run(&["--repo", from_flag.to_str().unwrap()], Some(&from_env)),
        "stored",
    );
    assert!(
        stored_path(&from_flag, FIRST_SEGMENT).exists(),
        "the flag wins over the environment"
    );

    std::fs::write(
        f.tmp.path().join("reentry.toml"),
        "repo = \"x\"\nrepository = \"y\"\n",
    )
    .unwrap();
    let out = run(&[], None);
    assert_exit(&out, 78);
    assert!(
        stderr(&out).contains("reentry.toml") && stderr(&out).contains("line 2"),
        "{}",
        stderr(&out)
    );
}

fn damaged_stored_file_is_refused_on_fetch(damage: impl Fn(&Path)) {
    let f = Fixture::pushed();
    damage(&f.stored());
    let dest_dir = f.subdir("pg_wal");
    let out = fetch(&f.repo, FIRST_SEGMENT, &dest_dir.join("RECOVERYXLOG"));
    // Above 125: PostgreSQL stops recovery rather than ending it here.
    assert_exit(&out, 200);
    assert!(stderr(&out).contains("corrupt"), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_dir(&dest_dir).unwrap().count(),
        0,
        "nothing written, no temporary left"
    );
}

#[test]
fn fetch_refuses_a_stored_file_with_a_flipped_byte() {
    damaged_stored_file_is_refused_on_fetch(|p| flip_byte(p, 5_000_000));
}

#[test]
fn fetch_refuses_a_truncated_stored_file() {
    damaged_stored_file_is_refused_on_fetch(|p| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(p)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
    });
}

#[test]
fn fetch_of_a_missing_file_fails_at_once_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("RECOVERYXLOG");
    let out = fetch(&tmp.path().join("repo"), "00000002.history", &dest);
    assert_exit(&out, 1);
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("00000002.history is not in the archive"));
    assert!(!dest.exists());
}

/// Damages the stored copy; a push of the content it recorded repairs it,
/// and a fetch gives that content back.
fn repaired_by_a_push(f: &Fixture) {
    flip_byte(&f.stored(), 9_000_000);
    assert_outcome(&push(&f.repo, &f.seg), "repaired");
    let dest = f.subdir("back").join(FIRST_SEGMENT);
    assert_exit(&fetch(&f.repo, FIRST_SEGMENT, &dest), 0);
    assert_eq!(
        std::fs::read(&dest).unwrap(),
        std::fs::read(&f.seg).unwrap()
    );
}

#[test]
fn a_damaged_stored_copy_is_repaired_by_a_push_of_the_content_it_recorded() {
    let f = Fixture::pushed();
    repaired_by_a_push(&f);
}

/// A copy stored under SHA-256 (an earlier build, or `checksum = "sha256"`)
/// is compared under SHA-256 by a BLAKE3 push: the same content is already
/// archived, a damaged copy is repaired, and different content is refused
/// naming both SHA-256 checksums.
#[test]
fn a_copy_stored_under_sha256_is_settled_by_a_blake3_push_under_its_own_algorithm() {
    let f = Fixture::new();
    let sha = ["--checksum", "sha256"];
    let stored = push_with(&f.repo, &f.seg, &sha);
    assert_outcome(&stored, "stored");
    assert!(
        stdout(&stored).contains(&sha256_of(&f.seg)),
        "{}",
        stdout(&stored)
    );
    assert_eq!(std::fs::read(f.stored()).unwrap()[8], 1, "format version 1");
    let before = inode(&f.stored());
    assert_outcome(&push(&f.repo, &f.seg), "already-archived");
    assert_eq!(inode(&f.stored()), before);

    repaired_by_a_push(&f);
    assert_eq!(
        std::fs::read(f.stored()).unwrap()[8],
        3,
        "the repair is BLAKE3's"
    );

    // The repaired copy is BLAKE3's now; a SHA-256 push of other content
    // is refused naming both checksums under BLAKE3.
    let original = blake3_of(&f.seg);
    flip_byte(&f.seg, 1 << 20);
    let out = push_with(&f.repo, &f.seg, &sha);
    assert_exit(&out, 3);
    let err = stderr(&out);
    assert!(
        err.contains(&original) && err.contains(&blake3_of(&f.seg)),
        "{err}"
    );
}

/// A standby restores through `wal fetch`, is promoted, and archives the new
/// timeline's history file through `wal push`; fetching that file gives back
/// exactly what the server wrote.
#[test]
fn pg18_history_file_of_a_promotion_is_archived_and_fetched() {
    let (mut c, repo) = archiving(Version::V18, "", &[]);
    c.client()
        .batch_execute("CREATE TABLE t AS SELECT generate_series(1, 1000) AS id")
        .unwrap();
    switch_and_wait_archived(&c);
    c.stop();
    std::fs::write(c.data().join("standby.signal"), "").unwrap();
    c.append_conf(&[("restore_command", restore_command(&repo))]);
    c.start();
    c.run_ok(c.cmd("pg_ctl").args(["promote", "-w", "-D"]).arg(c.data()));
    c.wait_for(
        "00000002.history in the archive",
        Duration::from_secs(60),
        || {
            stored_path(&repo, "00000002.history")
                .exists()
                .then_some(())
        },
    );

    let dest = c.dir("fetched").join("00000002.history");
    let out = fetch_as(true, &repo, "00000002.history", &dest);
    assert_exit(&out, 0);
    let written = std::fs::read(c.data().join("pg_wal/00000002.history")).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), written);
    assert!(
        String::from_utf8_lossy(&written).starts_with("1\t"),
        "history names timeline 1 as parent"
    );
}

/// A base backup plus the archive, replayed through `wal fetch`, gives back
/// every row committed after the backup.
/// Sets `copy` (a base backup without WAL) to recover from `repo` through
/// `wal fetch` and promote at the end of the archive.
fn recover_from(copy: &Cluster, repo: &Path) {
    copy.append_conf(&copy.local_settings());
    copy.append_conf(&[
        ("archive_mode", "off".to_string()),
        ("restore_command", restore_command(repo)),
        ("recovery_target_action", "'promote'".to_string()),
    ]);
    std::fs::write(copy.data().join("recovery.signal"), "").unwrap();
    crate::common::give_to_server_user(&copy.data().join("recovery.signal"));
}

fn a_copy_replays_archived_wal_through_wal_fetch(version: Version) {
    a_copy_replays_archived_wal_with(version, &[], |_| {});
}

/// The replay, from a cluster `initdb` made with these arguments; `then`
/// looks at the repository afterwards.
fn a_copy_replays_archived_wal_with(version: Version, initdb: &[&str], then: impl FnOnce(&Path)) {
    let (c, repo) = archiving_with(version, initdb, "--compress zstd", &[]);
    let mut db = c.client();
    db.batch_execute("CREATE TABLE orders (id bigint PRIMARY KEY, note text)")
        .unwrap();
    let copy = Cluster::empty(version);
    c.run_ok(
        c.cmd("pg_basebackup")
            .args(["-X", "none", "-c", "fast", "-D"])
            .arg(copy.data()),
    );
    db.batch_execute(
        "INSERT INTO orders SELECT g, repeat('x', 200) FROM generate_series(1, 50000) g",
    )
    .unwrap();
    switch_and_wait_archived(&c);
    let expected: i64 = db
        .query_one("SELECT count(*) FROM orders", &[])
        .unwrap()
        .get(0);

    // The backup history file the server archived for pg_basebackup.
    let backup_file = std::fs::read_dir(repo.join("archive/0000000100000000"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .find(|n| n.ends_with(".backup"))
        .expect("a .backup file archived");
    let restored = copy.dir("b").join(&backup_file);
    let out = fetch_as(true, &repo, &backup_file, &restored);
    assert_exit(&out, 0);
    assert!(std::fs::read_to_string(&restored)
        .unwrap()
        .contains("START WAL LOCATION"));

    let mut copy = copy;
    recover_from(&copy, &repo);
    copy.start();
    let mut restored_db = copy.client();
    copy.wait_for("recovery to finish", Duration::from_secs(120), || {
        let in_recovery: bool = restored_db
            .query_one("SELECT pg_is_in_recovery()", &[])
            .unwrap()
            .get(0);
        (!in_recovery).then_some(())
    });
    let got: i64 = restored_db
        .query_one("SELECT count(*) FROM orders", &[])
        .unwrap()
        .get(0);
    assert_eq!(got, expected);
    assert!(
        copy.log().contains("restored log file"),
        "WAL came from the archive"
    );
    then(&repo);
}

#[test]
fn pg18_a_copy_replays_archived_wal_through_wal_fetch() {
    a_copy_replays_archived_wal_through_wal_fetch(Version::V18);
}

#[test]
fn pg15_a_copy_replays_archived_wal_through_wal_fetch() {
    a_copy_replays_archived_wal_through_wal_fetch(Version::V15);
}

/// A corrupt segment in the middle of the archive stops recovery: `wal
/// fetch` exits 200, which PostgreSQL takes as fatal, instead of an exit it
/// reads as the end of the archive, after which it would promote a server
/// lacking everything past that segment.
#[test]
fn pg18_a_corrupt_segment_stops_recovery_instead_of_promoting_early() {
    let (c, repo) = archiving(Version::V18, "", &[]);
    let mut db = c.client();
    db.batch_execute("CREATE TABLE orders (id bigint PRIMARY KEY)")
        .unwrap();
    let copy = Cluster::empty(Version::V18);
    c.run_ok(
        c.cmd("pg_basebackup")
            .args(["-X", "none", "-c", "fast", "-D"])
            .arg(copy.data()),
    );
    let mut segments = Vec::new();
    for i in 0..3 {
        db.execute(
            "INSERT INTO orders SELECT g FROM generate_series($1::bigint * 1000 + 1, $1::bigint * 1000 + 1000) g",
            &[&i64::from(i)],
        )
        .unwrap();
        segments.push(switch_and_wait_archived(&c));
    }
    flip_byte(&stored_path(&repo, &segments[1]), 5_000_000);

    let mut copy = copy;
    recover_from(&copy, &repo);
    copy.try_start();
    let pid_file = copy.data().join("postmaster.pid");
    copy.wait_for(
        "recovery to stop, or to end in a promotion",
        Duration::from_secs(120),
        || (!pid_file.exists() || copy.log().contains("selected new timeline ID")).then_some(()),
    );
    let log = copy.log();
    assert!(
        log.contains("FATAL") && log.contains(&segments[1]) && log.contains("exit code 200"),
        "recovery stopped at the corrupt segment:\n{log}"
    );
    assert!(
        !log.contains("selected new timeline ID"),
        "not promoted:\n{log}"
    );
}

/// 64 MiB segments go in parts of 16 MiB published by a manifest, and
/// replay through `wal fetch` as any segment does.
#[test]
fn pg18_64_mib_segments_go_in_parts_and_a_copy_replays_them_through_wal_fetch() {
    a_copy_replays_archived_wal_with(Version::V18, &["--wal-segsize=64"], |repo| {
        let dir = repo.join("archive/0000000100000000");
        let mut segments = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            if name.len() != 24 {
                continue;
            }
            segments += 1;
            let manifest = std::fs::read(dir.join(&name)).unwrap();
            assert!(manifest.starts_with(b"RNTRYPRT\n"), "{name} is a manifest");
            let pushes: Vec<_> = std::fs::read_dir(dir.join(format!("{name}.parts")))
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            assert_eq!(pushes.len(), 1, "{name}: one push's parts");
            let parts = std::fs::read_dir(&pushes[0]).unwrap().count();
            assert_eq!(parts, 4, "{name}: 64 MiB in 16 MiB parts");
        }
        assert!(segments >= 1, "segments archived");
        let o = reentry(false, &["--repo", repo.to_str().unwrap(), "wal", "verify"]);
        assert_exit(&o, 0);
        assert!(!stdout(&o).contains("leftover"), "{}", stdout(&o));
    });
}
