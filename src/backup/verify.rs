//! `reentry backup verify`: pg_verifybackup on a backup and on every backup
//! it depends on, each with its WAL fetched from the archive so the WAL is
//! parsed too; the result is recorded in each label.

use serde::Serialize;

use crate::backup::archive::ArchiveError;
use crate::backup::basebackup::{now_rfc3339, BackupError};
use crate::backup::label::{BackupLabel, Verification, VerifyStatus};
use crate::backup::packed;
use crate::backup::repo::{io_err, Repo, RepoError};
use crate::fsutil::ScratchDir;
use crate::pg::tools::{PgBin, ToolError};
use crate::pg::wal::WalFileName;
use crate::progress::Reporter;
use std::fs;

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub id: String,
    pub status: VerifyStatus,
    pub at: String,
    /// The backups checked, the full one first.
    pub chain: Vec<String>,
    pub wal_segments: usize,
    pub problems: Vec<String>,
}

/// Verifies backup `id`, or the newest complete one.
/// How to verify a backup on object storage.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Also download it into a scratch directory and run pg_verifybackup
    /// there; without it, every object is read and checked against its
    /// checksum, and nothing is written.
    pub materialise: bool,
    pub jobs: usize,
    pub progress: Reporter,
}

/// Verifies backup `id`, or the newest complete one. A local backup is
/// checked by pg_verifybackup in place; one on object storage object by
/// object (and by pg_verifybackup with `materialise`).
pub fn verify(
    repo: &Repo,
    id: Option<&str>,
    pg_bin: &PgBin,
    opts: &VerifyOptions,
) -> Result<VerifyReport, BackupError> {
    let id = match id {
        Some(id) => id.to_owned(),
        None => repo
            .backups()?
            .into_iter()
            .rev()
            .find(BackupLabel::is_usable)
            .map(|b| b.id)
            .ok_or_else(|| RepoError::UnknownBackup {
                id: "(newest complete)".into(),
                repo: repo.location(),
            })?,
    };
    let chain = repo.chain(&id)?;
    let at = now_rfc3339();
    let mut all = Vec::new();
    let mut wal_segments = 0;
    for mut label in chain.clone() {
        let (problems, segments) = verify_one(repo, &label, pg_bin, opts)?;
        wal_segments += segments;
        label.verification = Some(Verification {
            status: if problems.is_empty() {
                VerifyStatus::Ok
            } else {
                VerifyStatus::Failed
            },
            at: at.clone(),
            problems: problems.clone(),
        });
        repo.save_verification(&label)?;
        all.extend(problems);
    }
    Ok(VerifyReport {
        id,
        status: if all.is_empty() {
            VerifyStatus::Ok
        } else {
            VerifyStatus::Failed
        },
        at,
        chain: chain.into_iter().map(|b| b.id).collect(),
        wal_segments,
        problems: all,
    })
}

fn verify_one(
    repo: &Repo,
    label: &BackupLabel,
    pg_bin: &PgBin,
    opts: &VerifyOptions,
) -> Result<(Vec<String>, usize), BackupError> {
    let id = &label.id;
    if !label.is_usable() {
        let why = label.failure.as_deref().unwrap_or("it never completed");
        return Ok((vec![format!("backup {id} is not usable: {why}")], 0));
    }
    let mut problems = Vec::new();
    let scratch = ScratchDir::new("reentry-verify").map_err(io_err(
        "create a scratch directory in",
        &std::env::temp_dir(),
    ))?;
    let archive = repo.archive();
    let segments = label.required_segments();
    // pg_verifybackup parses the WAL it is given; checked only against
    // the archive's checksums, the WAL is not fetched (nor decrypted).
    let parse_wal = repo.backup_data(label)?.is_some() || opts.materialise;
    for seg in &segments {
        let name = WalFileName::Segment(*seg).to_string();
        let got = match parse_wal {
            true => archive.fetch(&name, &scratch.path().join(&name)).map(drop),
            false => archive.verify(&WalFileName::Segment(*seg)).map(drop),
        };
        match got {
            Ok(_) => {}
            Err(ArchiveError::NotFound { .. }) => problems.push(format!(
                "backup {id}: WAL segment {name} is missing from the archive (needed from {} to {})",
                label.start_lsn.unwrap_or_default(),
                label.stop_lsn.unwrap_or_default()
            )),
            Err(ArchiveError::Corrupt { detail, .. }) => {
                problems.push(format!("backup {id}: WAL segment {name} is corrupt: {detail}"))
            }
            Err(e) => return Err(e.into()),
        }
    }
    let data = match repo.backup_data(label)? {
        Some(d) => d,
        None => {
            let checked =
                packed::check(repo.store(), label, repo.keys(), opts.jobs, &*opts.progress)?;
            if !opts.materialise || !checked.problems.is_empty() {
                problems.extend(checked.problems);
                return Ok((problems, segments.len()));
            }
            let d = scratch.path().join("data");
            fs::create_dir(&d).map_err(io_err("create", &d))?;
            packed::materialise(
                repo.store(),
                label,
                &d,
                None,
                repo.keys(),
                opts.jobs,
                &*opts.progress,
            )?;
            d
        }
    };
    let mut cmd = pg_bin.command("pg_verifybackup");
    if problems.is_empty() {
        cmd.arg("--wal-directory").arg(scratch.path());
    } else {
        // The WAL is already known bad; still check every file of the backup.
        cmd.arg("--no-parse-wal");
    }
    cmd.arg(&data);
    let out = cmd.output().map_err(|source| ToolError::Spawn {
        program: pg_bin.program("pg_verifybackup"),
        source,
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<_> = stderr
            .lines()
            .map(|l| l.trim_start_matches("pg_verifybackup: ").trim())
            .filter(|l| !l.is_empty() && !l.starts_with("hint:"))
            .map(|l| format!("backup {id}: {}", l.trim_start_matches("error: ")))
            .collect();
        if lines.is_empty() {
            problems.push(format!(
                "backup {id}: pg_verifybackup failed ({})",
                out.status
            ));
        }
        problems.extend(lines);
    }
    Ok((problems, segments.len()))
}
