use std::time::Duration;

use crate::backup::{restore_point as rp, status as st};
use crate::cli::{human_age, human_bytes, print_line, ConnectOpts, Context};
use crate::exit::Exit;
use crate::Error;

#[derive(Debug, clap::Args)]
pub struct RestorePointArgs {
    /// The name a restore can target (`--target-name`).
    pub name: String,
    #[command(flatten)]
    pub connect: ConnectOpts,
    /// Switch to a new WAL segment afterwards, so the point is archived now.
    #[arg(long)]
    pub switch_wal: bool,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub connect: ConnectOpts,
    /// Print the Prometheus text exposition format.
    #[arg(long, conflicts_with = "json")]
    pub prometheus: bool,
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub connect: ConnectOpts,
    /// How long to wait for the segment to reach the archive.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub timeout: u64,
}

pub fn restore_point(ctx: &Context, a: RestorePointArgs) -> Result<Exit, Error> {
    let repo = ctx.open_repo()?;
    let point = rp::create(&repo, a.connect.db.as_deref(), &a.name, a.switch_wal)?;
    ctx.emit(&point, || {
        Some(format!(
            "restore point {:?} at LSN {} on timeline {} ({})",
            point.name, point.lsn, point.timeline, point.time
        ))
    })?;
    Ok(Exit::Ok)
}

pub fn status(ctx: &Context, a: StatusArgs) -> Result<Exit, Error> {
    let repo = ctx.open_repo()?;
    let s = st::status(&repo, a.connect.db.as_deref())?;
    if a.prometheus {
        print_line(st::prometheus(&s).trim_end())?;
        return Ok(Exit::Ok);
    }
    ctx.emit(&s, || {
        let ar = &s.archiver;
        let age = |v: Option<f64>| v.map(human_age).unwrap_or_else(|| "never".into());
        let mut out = format!(
            "server    PostgreSQL {}, system {}, timeline {}, at {}{}\n",
            s.server.version,
            s.server.system_identifier,
            s.server.timeline,
            s.server.current_lsn,
            if s.server.in_recovery {
                " (in recovery)"
            } else {
                ""
            }
        );
        out.push_str(&format!(
            "archiver  archive_mode {}, {} archived, {} failed; last archived {} ({} ago){}\n",
            ar.archive_mode,
            ar.archived_count,
            ar.failed_count,
            ar.last_archived_wal.as_deref().unwrap_or("-"),
            age(ar.last_archived_age_seconds),
            match (&ar.last_failed_wal, ar.last_failed_age_seconds) {
                (Some(w), Some(t)) => format!("; last failure {w} ({} ago)", human_age(t)),
                _ => String::new(),
            }
        ));
        out.push_str(&format!(
            "wal       {} written, {} on average\n",
            human_bytes(s.wal.bytes_total),
            s.wal
                .bytes_per_second
                .map(|b| format!("{}/s", human_bytes(b)))
                .unwrap_or_else(|| "no rate".into())
        ));
        out.push_str(&format!(
            "archive   {}: newest {}, {}\n",
            s.archive.repo,
            s.archive.newest_segment.as_deref().unwrap_or("-"),
            match s.archive.lag_segments {
                Some(0) => "up to date".to_owned(),
                Some(n) => format!("{n} segments behind the server"),
                None => "lag unknown".to_owned(),
            }
        ));
        match &s.backups.newest {
            Some(n) => out.push_str(&format!(
                "backups   {} usable of {}; newest {} ({}, {} ago), verified: {}\n",
                s.backups.usable,
                s.backups.count,
                n.id,
                n.kind,
                age(n.age_seconds),
                match (n.verification, n.verified_age_seconds) {
                    (Some(v), Some(t)) =>
                        format!("{} {} ago", format!("{v:?}").to_lowercase(), human_age(t)),
                    _ => "never".into(),
                }
            )),
            None => out.push_str("backups   none usable\n"),
        }
        match (&s.drills.last, &s.drills.last_passed) {
            (Some(l), p) => out.push_str(&format!(
                "drills    last {} {} ago ({:?}, RTO {:.0} s); last passed: {}\n",
                l.id,
                age(l.age_seconds),
                l.validation_status,
                l.rto_seconds,
                p.as_ref()
                    .map(|p| format!("{} ago", age(p.age_seconds)))
                    .unwrap_or_else(|| "never".into())
            )),
            (None, _) => out.push_str("drills    never\n"),
        }
        for c in &s.copies {
            out.push_str(&format!(
                "copy      {}: {} behind, {} backups, last run {} ago{}\n",
                c.to,
                match c.segments_behind {
                    Some(n) => format!("{n} segment(s)"),
                    None => "all WAL".into(),
                },
                c.backups,
                age(c.age_seconds),
                match c.problems {
                    0 => String::new(),
                    n => format!(", {n} problem(s)"),
                }
            ));
        }
        for slot in &s.replication_slots {
            out.push_str(&format!(
                "slot      {} ({}, {}) holds {}\n",
                slot.name,
                slot.slot_type,
                if slot.active { "active" } else { "inactive" },
                slot.retained_bytes
                    .map(human_bytes)
                    .unwrap_or_else(|| "-".into())
            ));
        }
        for db in &s.databases {
            out.push_str(&format!(
                "database  {} {}\n",
                db.name,
                human_bytes(db.bytes as f64)
            ));
        }
        Some(out.trim_end().to_owned())
    })?;
    Ok(Exit::Ok)
}

pub fn check(ctx: &Context, a: CheckArgs) -> Result<Exit, Error> {
    let repo = ctx.open_repo()?;
    let mut report = st::check(
        &repo,
        a.connect.db.as_deref(),
        Duration::from_secs(a.timeout),
    )?;
    if let Some(p) = repo
        .store()
        .protection()
        .map_err(crate::backup::repo::RepoError::from)?
    {
        report.warnings = st::protection_warnings(&p, st::retention_span(&ctx.config.retention));
        report.protection = Some(p);
    }
    ctx.emit(&report, || {
        let mut out = format!(
            "ok: {} reached the archive in {:.1} s",
            report.segment, report.seconds
        );
        if let Some(p) = &report.protection {
            out.push_str(&format!(
                "\nbucket: versioning {}, Object Lock {}",
                p.versioning.as_deref().unwrap_or("never enabled"),
                match &p.default_retention {
                    Some(r) => format!("{} {} days by default", r.mode, r.days),
                    None if p.object_lock => "enabled, no default retention".into(),
                    None => "off".into(),
                }
            ));
        }
        for w in &report.warnings {
            out.push_str(&format!("\nwarning: {w}"));
        }
        Some(out)
    })?;
    Ok(Exit::Ok)
}
