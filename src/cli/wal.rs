use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backup::archive::{Archive, ArchiveError, PushOptions, PushOutcome};
use crate::backup::repo::Repo;
use crate::backup::stored::{Algorithm, Compression};
use crate::backup::walchain;
use crate::cli::Context;
use crate::exit::Exit;
use crate::storage::Location;
use crate::Error;

#[derive(Debug, clap::Subcommand)]
pub enum WalCommand {
    /// Archive one WAL file: archive_command = 'reentry --repo DIR wal push %p'.
    Push(PushArgs),
    /// Restore one WAL file: restore_command = 'reentry --repo DIR wal fetch %f %p'.
    Fetch(FetchArgs),
    /// Check every archived file and report ranges, gaps and each backup's PITR window.
    Verify,
}

#[derive(Debug, clap::Args)]
pub struct PushArgs {
    /// The file to archive (%p); its name must be a WAL file name.
    pub path: PathBuf,
    /// Compression [default: wal.compress in the config, else none].
    #[arg(long, value_enum)]
    pub compress: Option<Compression>,
    /// zstd level, 1 to 22 [default: wal.compress-level, else 1].
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..=22))]
    pub compress_level: Option<i32>,
    /// The checksum to record [default: checksum in the config, else
    /// blake3]. Either is read back whatever is set.
    #[arg(long, value_enum)]
    pub checksum: Option<Algorithm>,
    /// Data directory whose identity to use for .history and .backup files
    /// [default: the working directory, as under archive_command].
    #[arg(long, value_name = "DIR")]
    pub pg_data: Option<PathBuf>,
    /// Also push to this second repository (s3://… or a directory), after
    /// the first succeeded. The first decides the exit status: when only
    /// the second push fails, a warning says so, the exit is 0, and
    /// `reentry repo copy --to LOCATION` fills the gap. A stalled second
    /// repository must not stop archiving and fill pg_wal.
    #[arg(long, value_name = "LOCATION")]
    pub also: Option<String>,
}

/// The second push of `wal push --also`.
#[derive(Debug, serde::Serialize)]
pub struct AlsoReport {
    pub to: String,
    pub outcome: Option<PushOutcome>,
    pub error: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct FetchArgs {
    /// The WAL file name PostgreSQL asks for (%f).
    pub name: String,
    /// Where to write it (%p).
    pub dest: PathBuf,
}

pub fn run(ctx: &Context, cmd: WalCommand) -> Result<Exit, Error> {
    let archive = archive_of(&ctx.repo()?)?.with_keys(ctx.keys()?);
    match cmd {
        WalCommand::Push(args) => {
            let opts = PushOptions {
                compression: args.compress.unwrap_or(ctx.config.wal.compress),
                level: args.compress_level.unwrap_or(ctx.config.wal.compress_level),
                checksum: args.checksum.unwrap_or(ctx.config.checksum),
                pg_data: args.pg_data,
            };
            let report = archive.push(&args.path, &opts)?;
            let also = args.also.as_deref().map(|to| {
                let pushed = archive_of(Path::new(to))
                    .map(|a| a.with_keys(archive.keys().clone()))
                    .and_then(|a| Ok(a.push(&args.path, &opts)?));
                match pushed {
                    Ok(r) => AlsoReport {
                        to: to.to_owned(),
                        outcome: Some(r.outcome),
                        error: None,
                    },
                    Err(e) => {
                        tracing::warn!(
                            "{} is archived in {} but not in {to}: {e}; \
                             `reentry repo copy --to {to}` copies it later",
                            report.name,
                            archive.location()
                        );
                        AlsoReport {
                            to: to.to_owned(),
                            outcome: None,
                            error: Some(e.to_string()),
                        }
                    }
                }
            });
            #[derive(serde::Serialize)]
            struct Both<'a> {
                #[serde(flatten)]
                report: &'a crate::backup::archive::PushReport,
                #[serde(skip_serializing_if = "Option::is_none")]
                also: Option<AlsoReport>,
            }
            let both = Both {
                report: &report,
                also,
            };
            ctx.emit(&both, || {
                (report.outcome != PushOutcome::Stored).then(|| match report.outcome {
                    PushOutcome::AlreadyArchived => {
                        format!("{} already archived with the same content", report.name)
                    }
                    _ => format!("{} replaced a damaged stored copy", report.name),
                })
            })?;
        }
        WalCommand::Fetch(args) => {
            let report = archive
                .fetch(&args.name, &args.dest)
                .map_err(Error::Fetch)?;
            ctx.emit(&report, || None)?;
        }
        WalCommand::Verify => return verify(ctx, &archive),
    }
    Ok(Exit::Ok)
}

/// The archive of `--repo`: a local directory or `s3://bucket/prefix`.
pub fn archive_of(repo: &Path) -> Result<Archive, Error> {
    let shown = repo.to_string_lossy();
    let location = Location::parse(&shown).map_err(ArchiveError::from)?;
    Ok(match &location {
        Location::Local(root) => Archive::new(root.clone()),
        remote => Archive::on(Arc::from(remote.open().map_err(ArchiveError::from)?)),
    })
}

fn verify(ctx: &Context, archive: &Archive) -> Result<Exit, Error> {
    let backups = Repo::on_archive(archive).backups()?;
    let report = walchain::verify(archive, &backups, &*ctx.reporter())?;
    ctx.emit(&report, || {
        let mut out = format!("{} archived files checked\n", report.files_checked);
        for t in &report.timelines {
            for r in &t.ranges {
                out.push_str(&format!(
                    "timeline {}: {} .. {} ({} segments)\n",
                    t.timeline, r.first, r.last, r.segments
                ));
            }
            for g in &t.gaps {
                out.push_str(&format!(
                    "timeline {}: GAP {} .. {} ({} missing)\n",
                    t.timeline, g.first, g.last, g.segments
                ));
            }
        }
        if !report.history_files.is_empty() {
            out.push_str(&format!("history: {}\n", report.history_files.join(", ")));
        }
        for c in &report.corrupt {
            out.push_str(&format!("CORRUPT {}: {}\n", c.name, c.detail));
        }
        for t in &report.temp_files {
            out.push_str(&format!(
                "leftover temporary file {t} (from a push that died; safe to delete)\n"
            ));
        }
        for u in &report.unknown_files {
            out.push_str(&format!("unknown file {u}\n"));
        }
        for b in &report.backups {
            if b.missing.is_empty() {
                let reach: Vec<String> = b
                    .reachable
                    .iter()
                    .map(|r| format!("{} on timeline {}", r.until_lsn, r.timeline))
                    .collect();
                out.push_str(&format!(
                    "backup {}: consistent at {}, recoverable to {}\n",
                    b.id,
                    b.consistent_lsn,
                    reach.join(", ")
                ));
            } else {
                out.push_str(&format!(
                    "backup {}: UNUSABLE, missing {}\n",
                    b.id,
                    b.missing.join(", ")
                ));
            }
        }
        out.push_str(if report.ok { "ok" } else { "FAILED" });
        Some(out)
    })?;
    Ok(if report.ok { Exit::Ok } else { Exit::Negative })
}
