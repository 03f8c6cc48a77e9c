use std::time::Duration;

use crate::backup::basebackup::{self, BackupOptions};
use crate::backup::expire::{self, Policy};
use crate::backup::label::{BackupLabel, VerifyStatus};
use crate::backup::repo::Repo;
use crate::backup::stored::Algorithm;
use crate::backup::{catalog, verify};
use crate::cli::{human_bytes, ConnectOpts, Context, PgBinOpts};
use crate::exit::Exit;
use crate::Error;

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BackupArgs {
    #[command(subcommand)]
    pub command: Option<BackupCommand>,
    #[command(flatten)]
    pub take: TakeArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum BackupCommand {
    /// The backups in the repository (the catalog).
    List(ListArgs),
    /// pg_verifybackup on a backup and its chain, plus the WAL it needs.
    Verify(VerifyArgs),
    /// Retention: what would be deleted and why; --apply deletes.
    Expire(ExpireArgs),
}

#[derive(Debug, clap::Args)]
pub struct TakeArgs {
    #[command(flatten)]
    pub connect: ConnectOpts,
    #[command(flatten)]
    pub pg_bin: PgBinOpts,
    /// Incremental on the newest backup (PostgreSQL 17+, summarize_wal = on).
    #[arg(long)]
    pub incremental: bool,
    /// The parent of an incremental backup [default: the newest backup].
    #[arg(long, value_name = "ID", requires = "incremental")]
    pub parent: Option<String>,
    /// Name to record [default: the server's cluster_name, else "default"].
    #[arg(long, value_name = "NAME")]
    pub cluster_name: Option<String>,
    /// How long to wait for the backup's WAL to reach the archive.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub archive_timeout: u64,
    #[command(flatten)]
    pub objects: ObjectOpts,
    /// On object storage: the zstd level of the backup's objects.
    #[arg(long, value_name = "LEVEL", default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
    pub compress_level: i32,
    /// On object storage: the checksum its objects record [default:
    /// checksum in the config, else blake3].
    #[arg(long, value_enum)]
    pub checksum: Option<Algorithm>,
    /// Where a backup that is packed (object storage, or a local repository
    /// with recipients) is written in plain before it is packed: a private
    /// directory is made in DIR and removed after. It must hold the whole
    /// cluster [default: the temporary directory, $TMPDIR or /tmp].
    #[arg(long, value_name = "DIR")]
    pub scratch: Option<std::path::PathBuf>,
}

/// How a backup on object storage moves.
#[derive(Debug, Clone, clap::Args)]
pub struct ObjectOpts {
    /// On object storage: objects compressed and uploaded, or downloaded,
    /// at once [default: the number of CPUs, at least 4].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub jobs: Option<u16>,
}

impl ObjectOpts {
    pub fn jobs(&self) -> usize {
        self.jobs.map(usize::from).unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .max(4)
        })
    }
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Also mirror the list into a backup_catalog table on this server.
    #[arg(long, value_name = "CONNINFO")]
    pub sync_catalog: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The backup [default: the newest complete one].
    pub id: Option<String>,
    #[command(flatten)]
    pub pg_bin: PgBinOpts,
    /// On object storage: also download the backup into a scratch directory
    /// and run pg_verifybackup there. Without it, every object is read and
    /// checked against its checksum, and nothing is written.
    #[arg(long)]
    pub materialise: bool,
    #[command(flatten)]
    pub objects: ObjectOpts,
}

#[derive(Debug, clap::Args)]
pub struct ExpireArgs {
    /// Keep this many of the newest full backups (and what depends on them).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub retain_full: Option<u64>,
    /// Keep full backups younger than this many days.
    #[arg(long, value_name = "DAYS")]
    pub retain_days: Option<f64>,
    /// Keep the newest backup of each of the last N days (UTC) that have
    /// one [default: retention.keep-daily in the config].
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<usize>,
    /// ... of each of the last N ISO weeks.
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<usize>,
    /// ... of each of the last N months.
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<usize>,
    /// ... of each of the last N years.
    #[arg(long, value_name = "N")]
    pub keep_yearly: Option<usize>,
    /// With classes: keep every WAL file of the newest N days, so any moment
    /// of them can be restored [default: --keep-daily]. Older WAL is kept
    /// from each kept backup's start to its stop.
    #[arg(long, value_name = "DAYS")]
    pub pitr_days: Option<f64>,
    /// On object storage: delete a backup's objects that have no label and
    /// of which none was written for this long (a backup, copy or expire
    /// that died).
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
    pub abandoned_after: std::time::Duration,
    /// Delete; without it, only print the plan.
    #[arg(long)]
    pub apply: bool,
}

pub fn run(ctx: &Context, args: BackupArgs) -> Result<Exit, Error> {
    let repo = ctx.open_repo()?;
    match args.command {
        None => take(ctx, &repo, args.take),
        Some(BackupCommand::List(a)) => list(ctx, &repo, a),
        Some(BackupCommand::Verify(a)) => verify_cmd(ctx, &repo, a),
        Some(BackupCommand::Expire(a)) => expire_cmd(ctx, &repo, a),
    }
}

fn take(ctx: &Context, repo: &Repo, a: TakeArgs) -> Result<Exit, Error> {
    let opts = BackupOptions {
        conninfo: a.connect.db,
        incremental: a.incremental,
        parent: a.parent,
        cluster_name: a.cluster_name,
        pg_bin: a.pg_bin.pg_bin(),
        archive_timeout: Duration::from_secs(a.archive_timeout),
        progress: ctx.progress(),
        jobs: a.objects.jobs(),
        level: a.compress_level,
        checksum: a.checksum.unwrap_or(ctx.config.checksum),
        reporter: ctx.reporter(),
        scratch: a.scratch,
    };
    let label = basebackup::take(repo, &opts)?;
    ctx.emit(&label, || {
        Some(format!(
            "backup {} ({}) complete: {}, WAL {} to {} on timeline {} archived",
            label.id,
            kind(&label),
            human_bytes(label.size_bytes as f64),
            label.start_lsn.unwrap_or_default(),
            label.stop_lsn.unwrap_or_default(),
            label.timeline.unwrap_or_default()
        ))
    })?;
    Ok(Exit::Ok)
}

fn kind(l: &BackupLabel) -> String {
    match &l.parent {
        Some(p) => format!("incremental on {p}"),
        None => "full".into(),
    }
}

fn list(ctx: &Context, repo: &Repo, a: ListArgs) -> Result<Exit, Error> {
    let survey = repo.survey(std::time::SystemTime::now())?;
    let labels = survey.labels;
    // Refused labels are no backups: only named, never listed as one.
    for r in &survey.refused {
        tracing::warn!(repo = %repo.location(), label = %r.key, problem = %r.problem,
            "backup label refused: not a usable backup; a person must look");
    }
    if let Some(conninfo) = &a.sync_catalog {
        let synced = catalog::sync(repo, &labels, conninfo)?;
        for (id, why) in &synced.refused {
            tracing::warn!(backup = %id, problem = %why,
                "backup refused: backup_catalog has no row of it; a person must look");
        }
        for (id, at) in &synced.elsewhere {
            tracing::warn!(backup = %id, row = %at,
                "backup_catalog's row of this backup is another repository's (a copy's?): left as it is");
        }
        tracing::info!(rows = synced.written, "backup_catalog synced");
    }
    ctx.emit(&labels, || {
        let mut out = format!(
            "{:<18} {:<12} {:<9} {:<18} {:<12} {:<12} {:>3} {:>10}  {}",
            "ID", "TYPE", "STATUS", "PARENT", "START LSN", "STOP LSN", "TL", "SIZE", "VERIFIED"
        );
        for l in &labels {
            let verified = match &l.verification {
                Some(v) if v.status == VerifyStatus::Ok => format!("ok {}", v.at),
                Some(v) => format!("FAILED {} ({} problems)", v.at, v.problems.len()),
                None => "never".into(),
            };
            out.push_str(&format!(
                "\n{:<18} {:<12} {:<9} {:<18} {:<12} {:<12} {:>3} {:>10}  {}",
                l.id,
                format!("{:?}", l.kind).to_lowercase(),
                format!("{:?}", l.status).to_lowercase(),
                l.parent.as_deref().unwrap_or("-"),
                l.start_lsn
                    .map(|x| x.to_string())
                    .unwrap_or_else(|| "-".into()),
                l.stop_lsn
                    .map(|x| x.to_string())
                    .unwrap_or_else(|| "-".into()),
                l.timeline
                    .map(|x| x.to_string())
                    .unwrap_or_else(|| "-".into()),
                human_bytes(l.size_bytes as f64),
                verified
            ));
        }
        if labels.is_empty() {
            out = format!("no backups in {}", repo.location());
        }
        for r in &survey.refused {
            let mark = if r.unsigned { "UNSIGNED" } else { "REFUSED" };
            out.push_str(&format!("\n{mark} {r}"));
        }
        Some(out)
    })?;
    Ok(Exit::Ok)
}

fn verify_cmd(ctx: &Context, repo: &Repo, a: VerifyArgs) -> Result<Exit, Error> {
    let opts = verify::VerifyOptions {
        materialise: a.materialise,
        jobs: a.objects.jobs(),
        progress: ctx.reporter(),
    };
    let report = verify::verify(repo, a.id.as_deref(), &a.pg_bin.pg_bin(), &opts)?;
    ctx.emit(&report, || {
        let mut out = match report.status {
            VerifyStatus::Ok => format!(
                "backup {} verified: {} (with {} WAL segments)",
                report.id,
                report.chain.join(" <- "),
                report.wal_segments
            ),
            VerifyStatus::Failed => format!("backup {} FAILED verification:", report.id),
        };
        for p in &report.problems {
            out.push_str(&format!("\n  {p}"));
        }
        Some(out)
    })?;
    Ok(match report.status {
        VerifyStatus::Ok => Exit::Ok,
        VerifyStatus::Failed => Exit::Negative,
    })
}

fn expire_cmd(ctx: &Context, repo: &Repo, a: ExpireArgs) -> Result<Exit, Error> {
    let r = &ctx.config.retention;
    let policy = Policy {
        retain_full: a.retain_full.map(|n| n as usize),
        retain_days: a.retain_days,
        keep_daily: a.keep_daily.or(r.keep_daily),
        keep_weekly: a.keep_weekly.or(r.keep_weekly),
        keep_monthly: a.keep_monthly.or(r.keep_monthly),
        keep_yearly: a.keep_yearly.or(r.keep_yearly),
        pitr_days: a.pitr_days.or(r.pitr_days),
        abandoned_after: Some(a.abandoned_after),
    };
    let mut plan = expire::plan_for(repo, &policy)?;
    if a.apply {
        expire::apply(repo, &mut plan)?;
    }
    ctx.emit(&plan, || {
        let mut out = String::new();
        for d in &plan.keep {
            out.push_str(&format!("keep    {:<18} {}\n", d.id, d.reason));
        }
        for d in &plan.expire {
            out.push_str(&format!("expire  {:<18} {}\n", d.id, d.reason));
        }
        match (plan.expire_wal.first(), plan.expire_wal.last()) {
            (Some(first), Some(last)) => out.push_str(&format!(
                "expire  WAL {first} .. {last} ({} files): {}\n",
                plan.expire_wal.len(),
                plan.wal_rule
            )),
            _ => out.push_str("keep    all WAL\n"),
        }
        for r in &plan.ignored {
            out.push_str(&format!(
                "ignore  {r} (no verify key vouches for it: not counted, not deleted, its WAL \
                 kept; a person must look)\n"
            ));
        }
        for w in &plan.ignored_wal {
            match &w.kept_from {
                Some(from) => out.push_str(&format!(
                    "keep    WAL from {from} on, for ignored label {}: not vouched for, but \
                     deleting WAL cannot be undone, and it may be a backup taken before labels \
                     were signed (a planted label can only make expire keep more, never \
                     delete more)\n",
                    w.key
                )),
                None => out.push_str(&format!(
                    "keep    no WAL for ignored label {}: it does not read as a label\n",
                    w.key
                )),
            }
        }
        for a in &plan.abandoned {
            let what = format!(
                "{} objects ({}) with no label, none written since {}: a backup, copy or expire that died",
                a.objects,
                human_bytes(a.bytes as f64),
                a.last_written.as_deref().unwrap_or("?")
            );
            match &a.locked_until {
                Some(t) => out.push_str(&format!(
                    "keep    {:<18} {what}; under Object Lock until {t}\n",
                    a.id
                )),
                None => out.push_str(&format!("delete  {:<18} {what}\n", a.id)),
            }
        }
        if plan.wal_locked > 0 {
            out.push_str(&format!(
                "keep    {} WAL file(s) under Object Lock until {}\n",
                plan.wal_locked,
                plan.wal_locked_until.as_deref().unwrap_or("?")
            ));
        }
        out.push_str(if plan.applied {
            "deleted."
        } else if plan.expire.is_empty()
            && plan.expire_wal.is_empty()
            && plan.abandoned.iter().all(|a| a.locked_until.is_some())
        {
            "nothing to delete."
        } else {
            "dry run: nothing deleted; pass --apply to delete."
        });
        Some(out)
    })?;
    Ok(Exit::Ok)
}
