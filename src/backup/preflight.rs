//! `reentry preflight`: the gate before a risky migration. The archiver is healthy and current, a verified backup is
//! recent enough, and only then a named restore point is created. Every check
//! is run and reported; if any fails, nothing is created.

use std::time::Duration;

use serde::Serialize;

use crate::backup::basebackup::BackupError;
use crate::backup::label::VerifyStatus;
use crate::backup::repo::{Repo, RestorePoint};
use crate::backup::restore_point;
use crate::pg::conn::Db;

#[derive(Debug, Clone)]
pub struct PreflightOptions {
    pub conninfo: Option<String>,
    pub restore_point: String,
    pub max_archive_lag: Duration,
    pub max_backup_age: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct PreflightCheck {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct PreflightReport {
    pub ok: bool,
    pub checks: Vec<PreflightCheck>,
    /// Created only when every check passed.
    pub restore_point: Option<RestorePoint>,
}

fn secs(d: f64) -> String {
    humantime::format_duration(Duration::from_secs(d.max(0.0) as u64)).to_string()
}

pub fn preflight(repo: &Repo, opts: &PreflightOptions) -> Result<PreflightReport, BackupError> {
    let mut checks = Vec::new();
    let mut check = |name: &str, ok: bool, detail: String| {
        checks.push(PreflightCheck {
            name: name.into(),
            ok,
            detail,
        })
    };

    let mut db = Db::connect(opts.conninfo.as_deref())?;
    let r = db.query_one(
        "read pg_stat_archiver",
        "SELECT current_setting('archive_mode'), failed_count, coalesce(last_archived_wal, ''),
                extract(epoch FROM now() - last_archived_time)::float8,
                coalesce(last_failed_wal, ''),
                coalesce(last_failed_time > coalesce(last_archived_time, '-infinity'), false),
                (SELECT system_identifier::text FROM pg_control_system())
           FROM pg_stat_archiver",
        &[],
    )?;
    let (mode, failed, last, age, last_failed, failing, sysid): (
        String,
        i64,
        String,
        Option<f64>,
        String,
        bool,
        String,
    ) = (
        r.get(0),
        r.get(1),
        r.get(2),
        r.get(3),
        r.get(4),
        r.get(5),
        r.get(6),
    );
    let archiver_ok = mode != "off" && !failing;
    check(
        "archiver healthy",
        archiver_ok,
        if mode == "off" {
            "archive_mode is off".into()
        } else if failing {
            format!("archiving {last_failed} failed after the last success ({failed} failures in all); see the server log")
        } else {
            format!("no failure since the last archived file ({failed} failures in all)")
        },
    );
    let lag_ok = age.is_some_and(|a| a <= opts.max_archive_lag.as_secs_f64());
    check(
        "archive current",
        lag_ok,
        match age {
            Some(a) => format!(
                "last archived {last} {} ago (limit {})",
                secs(a),
                humantime::format_duration(opts.max_archive_lag)
            ),
            None => "nothing archived yet".into(),
        },
    );
    let archive_sysid = repo.archive().info()?.map(|i| i.system_identifier);
    check(
        "archive is this cluster's",
        archive_sysid.as_deref() == Some(sysid.as_str()),
        match &archive_sysid {
            Some(a) if *a == sysid => {
                format!("{} holds WAL of system {sysid}", repo.location())
            }
            Some(a) => format!(
                "{} holds WAL of system {a}, the server is {sysid}",
                repo.location()
            ),
            None => format!("{} has no archived WAL", repo.location()),
        },
    );

    let labels = repo.backups()?;
    let verified = labels.iter().rev().find(|b| {
        b.is_usable()
            && b.system_identifier == sysid
            && b.verification
                .as_ref()
                .is_some_and(|v| v.status == VerifyStatus::Ok)
    });
    let backup_age = verified
        .and_then(|b| b.stop_time.as_deref())
        .and_then(|t| humantime::parse_rfc3339(t).ok())
        .and_then(|t| t.elapsed().ok());
    check(
        "recent verified backup",
        backup_age.is_some_and(|a| a <= opts.max_backup_age),
        match (verified, backup_age) {
            (Some(b), Some(a)) => format!(
                "{} verified, taken {} ago (limit {})",
                b.id,
                secs(a.as_secs_f64()),
                humantime::format_duration(opts.max_backup_age)
            ),
            _ => "no verified backup of this cluster; run reentry backup and reentry backup verify"
                .into(),
        },
    );
    let taken = repo
        .restore_points()?
        .into_iter()
        .find(|p| p.name == opts.restore_point);
    check(
        "restore point name free",
        taken.is_none() && !opts.restore_point.is_empty() && opts.restore_point.len() <= 63,
        match taken {
            Some(p) => format!("{:?} is already recorded at {}", p.name, p.lsn),
            None => format!("{:?}", opts.restore_point),
        },
    );

    let ok = checks.iter().all(|c| c.ok);
    let restore_point = if ok {
        Some(restore_point::create(
            repo,
            opts.conninfo.as_deref(),
            &opts.restore_point,
            true,
        )?)
    } else {
        None
    };
    Ok(PreflightReport {
        ok,
        checks,
        restore_point,
    })
}
