use std::path::PathBuf;
use std::time::Duration;

use crate::backup::drill::{self, DrillOptions, DrillTarget, Outcome};
use crate::backup::preflight::{self, PreflightOptions};
use crate::backup::restore::{self, Action, RestoreOptions, Target};
use crate::cli::{ConnectOpts, Context, PgBinOpts};
use crate::exit::Exit;
use crate::pg::lsn::Lsn;
use crate::Error;

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["target_time", "target_lsn", "target_xid", "target_name", "immediate", "latest"])))]
pub struct RestoreArgs {
    /// New or empty directory for the restored cluster.
    #[arg(long, value_name = "DIR")]
    pub to: PathBuf,
    /// Recover to this time (RFC 3339, or `YYYY-MM-DD HH:MM:SS` in UTC).
    #[arg(long, value_name = "TIME")]
    pub target_time: Option<String>,
    /// Recover to this LSN.
    #[arg(long, value_name = "LSN")]
    pub target_lsn: Option<Lsn>,
    /// Recover up to and including this transaction.
    #[arg(long, value_name = "XID")]
    pub target_xid: Option<u32>,
    /// Recover to a restore point recorded by `reentry restore-point`.
    #[arg(long, value_name = "NAME")]
    pub target_name: Option<String>,
    /// Stop as soon as the backup is consistent.
    #[arg(long)]
    pub immediate: bool,
    /// Replay everything archived, then promote.
    #[arg(long)]
    pub latest: bool,
    /// The backup to start from [default: the newest that can reach the target].
    #[arg(long, value_name = "ID")]
    pub backup: Option<String>,
    /// Port for the restored cluster [default: one free on 127.0.0.1].
    #[arg(long)]
    pub port: Option<u16>,
    /// Open the copy on these TCP addresses, with the source's pg_hba.conf
    /// (a cutover, where applications connect to it). Without it the copy
    /// is fenced: only its Unix socket, in a directory only the server's
    /// OS user can enter, accepts connections.
    #[arg(long, value_name = "ADDRESSES")]
    pub listen: Option<String>,
    /// What to do at the target.
    #[arg(long, value_enum, default_value_t = Action::Pause)]
    pub action: Action,
    /// A library of the source's shared_preload_libraries to load on the
    /// copy although its background workers may act (repeat for each).
    /// Without it a source preloading anything but a few passive
    /// libraries, or a pg_cron older than 1.6, is refused (README: "What a
    /// fenced copy is").
    #[arg(long, value_name = "NAME")]
    pub allow_preload: Vec<String>,
    #[command(flatten)]
    pub pg_bin: PgBinOpts,
    /// Give up on recovery after this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 3600)]
    pub timeout: u64,
    #[command(flatten)]
    pub objects: crate::cli::backup::ObjectOpts,
}

#[derive(Debug, clap::Args)]
pub struct DrillArgs {
    /// Where to write the evidence (JSON).
    #[arg(long, value_name = "FILE")]
    pub evidence: PathBuf,
    /// Recover to this time [default: everything archived].
    #[arg(long, value_name = "TIME", conflicts_with = "random_target")]
    pub target_time: Option<String>,
    /// Recover to a random time in the newest backup's PITR window.
    #[arg(long)]
    pub random_target: bool,
    /// SQL checks: blocks of `-- name: NAME` [`-- database: DB`] and a query that must return no rows.
    #[arg(long, value_name = "FILE")]
    pub checks: Option<PathBuf>,
    /// Restore under this directory instead of a temporary one.
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    /// Keep the restored cluster (stopped) instead of removing it.
    #[arg(long, requires = "work_dir")]
    pub keep: bool,
    /// A library of the source's shared_preload_libraries to load on the
    /// copy although its background workers may act (repeat for each).
    /// Without it a source preloading anything but a few passive
    /// libraries, or a pg_cron older than 1.6, is refused (README: "What a
    /// fenced copy is").
    #[arg(long, value_name = "NAME")]
    pub allow_preload: Vec<String>,
    #[command(flatten)]
    pub pg_bin: PgBinOpts,
    #[arg(long, value_name = "SECONDS", default_value_t = 3600)]
    pub timeout: u64,
    #[command(flatten)]
    pub objects: crate::cli::backup::ObjectOpts,
}

#[derive(Debug, clap::Args)]
pub struct PreflightArgs {
    /// The restore point to create when every check passes.
    #[arg(long, value_name = "NAME")]
    pub restore_point: String,
    /// Longest acceptable time since the last archived WAL file.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
    pub max_archive_lag: Duration,
    /// Oldest acceptable verified backup.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = humantime::parse_duration)]
    pub max_backup_age: Duration,
    #[command(flatten)]
    pub connect: ConnectOpts,
}

pub fn restore(ctx: &Context, a: RestoreArgs) -> Result<Exit, Error> {
    let repo = ctx.open_repo()?;
    let target = if let Some(t) = &a.target_time {
        Target::parse_time(t)?
    } else if let Some(l) = a.target_lsn {
        Target::Lsn(l)
    } else if let Some(x) = a.target_xid {
        Target::Xid(x)
    } else if let Some(n) = a.target_name {
        Target::Name(n)
    } else if a.immediate {
        Target::Immediate
    } else {
        Target::Latest
    };
    let opts = RestoreOptions {
        to: a.to,
        target,
        backup: a.backup,
        port: a.port,
        listen: a.listen,
        action: a.action,
        pg_bin: a.pg_bin.pg_bin(),
        timeout: Duration::from_secs(a.timeout),
        progress: ctx.reporter(),
        jobs: a.objects.jobs(),
        allow_preload: a.allow_preload,
    };
    let m = restore::restore(&repo, &opts)?;
    ctx.emit(&m, || {
        Some(format!(
            "restored {} from {} to {} (timeline {}, last transaction {}), {} WAL segments replayed in {:.1} s; \
             {} on {} port {} ({})",
            m.data_dir,
            m.backup_chain.join(" + "),
            m.reached_lsn,
            m.timeline,
            m.reached_time.as_deref().unwrap_or("-"),
            m.wal_segments_replayed,
            m.durations.total_seconds,
            match m.action {
                Action::Shutdown => "stopped",
                _ => "running",
            },
            match &m.listen {
                Some(a) => format!("{a} (opened with the source's pg_hba.conf)"),
                None => format!("its socket in {} only (fenced)", m.socket_dir),
            },
            m.port,
            match m.action {
                Action::Pause => "paused at the target, read-only",
                Action::Promote => "promoted, read-write",
                Action::Shutdown => "shut down at the target",
            }
        ))
    })?;
    Ok(Exit::Ok)
}

pub fn drill(ctx: &Context, a: DrillArgs) -> Result<Exit, Error> {
    let repo = ctx.open_repo()?;
    let checks = match &a.checks {
        Some(path) => drill::parse_checks(path)?,
        None => Vec::new(),
    };
    let target = match (&a.target_time, a.random_target) {
        (Some(t), _) => match Target::parse_time(t)? {
            Target::Time(t) => DrillTarget::Time(t),
            _ => unreachable!("parse_time makes time targets"),
        },
        (None, true) => DrillTarget::Random,
        (None, false) => DrillTarget::Latest,
    };
    let opts = DrillOptions {
        target,
        checks,
        evidence: a.evidence,
        pg_bin: a.pg_bin.pg_bin(),
        work_dir: a.work_dir,
        keep: a.keep,
        timeout: Duration::from_secs(a.timeout),
        progress: ctx.reporter(),
        jobs: a.objects.jobs(),
        allow_preload: a.allow_preload,
    };
    let e = drill::drill(&repo, &opts)?;
    ctx.emit(&e, || {
        let mut out = format!(
            "drill {}: {} from backup {}, {} WAL segments replayed\n  RTO observed {:.1} s, RPO observed {}\n",
            e.dr_drill_id,
            match e.validation_status {
                Outcome::Passed => "PASSED",
                Outcome::Failed => "FAILED",
            },
            e.backup_id,
            e.wal_segments_replayed,
            e.rto_observed_seconds,
            e.rpo_observed_seconds.map(|r| format!("{r:.1} s")).unwrap_or_else(|| "unknown (no transaction replayed)".into())
        );
        for c in &e.checks {
            out.push_str(&format!(
                "  {} {} ({}){}\n",
                if c.status == Outcome::Passed { "ok  " } else { "FAIL" },
                c.name,
                c.database,
                match (&c.error, c.rows) {
                    (Some(err), _) => format!(": {err}"),
                    (None, 0) => String::new(),
                    (None, n) => format!(": {n} rows, e.g. {}", c.sample.join(" | ")),
                }
            ));
        }
        Some(out.trim_end().to_owned())
    })?;
    Ok(match e.validation_status {
        Outcome::Passed => Exit::Ok,
        Outcome::Failed => Exit::Negative,
    })
}

pub fn preflight(ctx: &Context, a: PreflightArgs) -> Result<Exit, Error> {
    let repo = ctx.open_repo()?;
    let opts = PreflightOptions {
        conninfo: a.connect.db,
        restore_point: a.restore_point,
        max_archive_lag: a.max_archive_lag,
        max_backup_age: a.max_backup_age,
    };
    let r = preflight::preflight(&repo, &opts)?;
    ctx.emit(&r, || {
        let mut out = String::new();
        for c in &r.checks {
            out.push_str(&format!(
                "{} {:<26} {}\n",
                if c.ok { "ok  " } else { "FAIL" },
                c.name,
                c.detail
            ));
        }
        out.push_str(&match &r.restore_point {
            Some(p) => format!(
                "restore point {:?} created at {} on timeline {}",
                p.name, p.lsn, p.timeline
            ),
            None => "not ready: no restore point created".into(),
        });
        Some(out)
    })?;
    Ok(if r.ok { Exit::Ok } else { Exit::Negative })
}
