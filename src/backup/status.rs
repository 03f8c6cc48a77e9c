//! `reentry status` (the archive's and the backups' health in one report,
//! as JSON or Prometheus text) and `reentry check` (a forced segment switch that must
//! reach the archive, like `pgbackrest check`).

use std::fmt::Write as _;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::backup::archive::ArchiveError;
use crate::backup::drill::{self, Evidence, Outcome};
use crate::backup::label::VerifyStatus;
use crate::backup::repo::{Repo, RepoError};
use crate::pg::conn::{Db, PgError};
use crate::pg::wal::WalFileName;

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error("archive_mode is off on {target}: nothing is archived. Set archive_mode = on and archive_command = 'reentry --repo {repo} wal push %p', then restart")]
    ArchiveOff { target: String, repo: String },
    #[error("the archive in {repo} belongs to system {archive}, but {target} is system {server}: archive_command points at another cluster's repository")]
    WrongCluster {
        repo: String,
        target: String,
        archive: String,
        server: String,
    },
    #[error("{repo} overwrote an object on a create-only write (If-None-Match: *): its second write of {key} succeeded. The store does not honour conditional writes, so WAL and backups could be overwritten unnoticed; use a store or gateway that does (AWS S3, current MinIO or Ceph RGW)")]
    Overwrites { repo: String, key: String },
    #[error("{segment} did not reach the archive in {repo} within {secs} s{archiver}")]
    NotArchived {
        segment: String,
        repo: String,
        secs: u64,
        archiver: String,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct ServerStatus {
    pub version: String,
    pub system_identifier: String,
    pub timeline: u32,
    pub current_lsn: String,
    pub current_segment: String,
    pub in_recovery: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ArchiverStatus {
    pub archive_mode: String,
    pub archived_count: i64,
    pub failed_count: i64,
    pub last_archived_wal: Option<String>,
    pub last_archived_age_seconds: Option<f64>,
    pub last_failed_wal: Option<String>,
    pub last_failed_age_seconds: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WalStatus {
    pub bytes_total: f64,
    /// Average since the WAL statistics were last reset.
    pub bytes_per_second: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SlotStatus {
    pub name: String,
    pub slot_type: String,
    pub active: bool,
    pub retained_bytes: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DatabaseSize {
    pub name: String,
    pub bytes: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ArchiveStatus {
    pub repo: String,
    pub system_identifier: Option<String>,
    pub newest_segment: Option<String>,
    /// Complete segments the server has written that the archive lacks.
    pub lag_segments: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NewestBackup {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub stop_time: Option<String>,
    pub age_seconds: Option<f64>,
    pub verification: Option<VerifyStatus>,
    pub verified_age_seconds: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BackupsStatus {
    pub count: usize,
    pub usable: usize,
    pub newest: Option<NewestBackup>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DrillSummary {
    pub id: String,
    pub finished_at: String,
    pub age_seconds: Option<f64>,
    pub validation_status: Outcome,
    pub rto_seconds: f64,
    pub rpo_seconds: Option<f64>,
}

impl DrillSummary {
    fn of(e: &Evidence) -> DrillSummary {
        DrillSummary {
            id: e.dr_drill_id.clone(),
            finished_at: e.restore_finished_at.clone(),
            age_seconds: age_of(Some(&e.restore_finished_at)),
            validation_status: e.validation_status,
            rto_seconds: e.rto_observed_seconds,
            rpo_seconds: e.rpo_observed_seconds,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DrillsStatus {
    pub last: Option<DrillSummary>,
    pub last_passed: Option<DrillSummary>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub server: ServerStatus,
    pub archiver: ArchiverStatus,
    pub wal: WalStatus,
    pub replication_slots: Vec<SlotStatus>,
    pub databases: Vec<DatabaseSize>,
    pub archive: ArchiveStatus,
    pub backups: BackupsStatus,
    pub drills: DrillsStatus,
    /// Second copies made by `repo copy`, as their last run left them.
    pub copies: Vec<CopyStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CopyStatus {
    pub to: String,
    pub at: String,
    pub age_seconds: Option<f64>,
    pub newest_segment: Option<String>,
    /// Segments archived here after the newest one there.
    pub segments_behind: Option<i64>,
    pub backups: usize,
    pub problems: usize,
}

fn age_of(rfc3339: Option<&str>) -> Option<f64> {
    let t = humantime::parse_rfc3339(rfc3339?).ok()?;
    Some(
        SystemTime::now()
            .duration_since(t)
            .unwrap_or(Duration::ZERO)
            .as_secs_f64(),
    )
}

pub fn status(repo: &Repo, conninfo: Option<&str>) -> Result<Status, StatusError> {
    let mut db = Db::connect(conninfo)?;
    let r = db.query_one(
        "read the server's state",
        "SELECT current_setting('server_version'),
                (SELECT system_identifier::text FROM pg_control_system()),
                pg_is_in_recovery(),
                CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END::text,
                CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_walfile_name(pg_current_wal_lsn()) END,
                (SELECT timeline_id FROM pg_control_checkpoint()),
                current_setting('archive_mode'),
                pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END, '0/0')::float8",
        &[],
    )?;
    let current_segment: Option<String> = r.get(4);
    let server = ServerStatus {
        version: r.get(0),
        system_identifier: r.get(1),
        in_recovery: r.get(2),
        current_lsn: r.get(3),
        current_segment: current_segment.clone().unwrap_or_default(),
        timeline: r.get::<_, i32>(5) as u32,
    };
    let a = db.query_one(
        "read pg_stat_archiver",
        "SELECT archived_count, failed_count, last_archived_wal,
                extract(epoch FROM now() - last_archived_time)::float8,
                last_failed_wal, extract(epoch FROM now() - last_failed_time)::float8
           FROM pg_stat_archiver",
        &[],
    )?;
    let archiver = ArchiverStatus {
        archive_mode: r.get(6),
        archived_count: a.get(0),
        failed_count: a.get(1),
        last_archived_wal: a.get(2),
        last_archived_age_seconds: a.get(3),
        last_failed_wal: a.get(4),
        last_failed_age_seconds: a.get(5),
    };
    let w = db.query_one(
        "read pg_stat_wal",
        "SELECT wal_bytes::float8 / nullif(extract(epoch FROM now() - stats_reset), 0)::float8 FROM pg_stat_wal",
        &[],
    )?;
    let wal = WalStatus {
        bytes_total: r.get(7),
        bytes_per_second: w.get(0),
    };
    let replication_slots = db
        .query(
            "read pg_replication_slots",
            "SELECT slot_name::text, slot_type, active,
                    pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END, restart_lsn)::float8
               FROM pg_replication_slots ORDER BY slot_name",
            &[],
        )?
        .iter()
        .map(|s| SlotStatus { name: s.get(0), slot_type: s.get(1), active: s.get(2), retained_bytes: s.get(3) })
        .collect();
    let databases = db
        .query(
            "read database sizes",
            "SELECT datname::text, pg_database_size(oid) FROM pg_database WHERE datallowconn ORDER BY 2 DESC",
            &[],
        )?
        .iter()
        .map(|d| DatabaseSize { name: d.get(0), bytes: d.get(1) })
        .collect();

    let archive = repo.archive();
    let info = archive.info()?;
    let seg_size = info
        .as_ref()
        .and_then(|i| i.wal_segment_size)
        .unwrap_or(16 << 20);
    let newest = archive
        .list()?
        .files
        .into_iter()
        .filter_map(|f| f.segment_with_header())
        .max();
    let lag_segments = match (&current_segment, newest) {
        (Some(cur), Some(newest)) => WalFileName::parse(cur)
            .ok()
            .and_then(|c| c.segment_with_header())
            .map(|c| c.segno(seg_size) as i64 - newest.segno(seg_size) as i64 - 1),
        _ => None,
    };
    let labels = repo.backups()?;
    let newest_backup = labels
        .iter()
        .rev()
        .find(|l| l.is_usable())
        .map(|l| NewestBackup {
            id: l.id.clone(),
            kind: format!("{:?}", l.kind).to_lowercase(),
            stop_time: l.stop_time.clone(),
            age_seconds: age_of(l.stop_time.as_deref()),
            verification: l.verification.as_ref().map(|v| v.status),
            verified_age_seconds: l.verification.as_ref().and_then(|v| age_of(Some(&v.at))),
        });
    Ok(Status {
        server,
        archiver,
        wal,
        replication_slots,
        databases,
        archive: ArchiveStatus {
            repo: repo.location(),
            system_identifier: info.map(|i| i.system_identifier),
            newest_segment: newest.map(|n| n.to_string()),
            lag_segments,
        },
        backups: BackupsStatus {
            count: labels.len(),
            usable: labels.iter().filter(|l| l.is_usable()).count(),
            newest: newest_backup,
        },
        drills: {
            let (last, passed) = drill::recorded(repo);
            DrillsStatus {
                last: last.as_ref().map(DrillSummary::of),
                last_passed: passed.as_ref().map(DrillSummary::of),
            }
        },
        copies: crate::backup::copy::records(repo.store())
            .into_iter()
            .map(|c| {
                let there = c
                    .newest_wal
                    .as_deref()
                    .and_then(|w| WalFileName::parse(w).ok())
                    .and_then(|w| w.segment_with_header());
                CopyStatus {
                    segments_behind: match (newest, there) {
                        (Some(here), Some(there)) => {
                            Some(here.segno(seg_size) as i64 - there.segno(seg_size) as i64)
                        }
                        (Some(_), None) => None,
                        (None, _) => Some(0),
                    },
                    age_seconds: age_of(Some(&c.at)),
                    to: c.to,
                    at: c.at,
                    newest_segment: c.newest_wal,
                    backups: c.backups.len(),
                    problems: c.problems,
                }
            })
            .collect(),
    })
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The Prometheus text exposition format; every metric is prefixed
/// `reentry_`.
pub fn prometheus(s: &Status) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(
            out,
            "# HELP reentry_{name} {help}\n# TYPE reentry_{name} {kind}"
        );
        for (labels, v) in samples {
            let _ = writeln!(out, "reentry_{name}{labels} {v}");
        }
    };
    let one = |v: f64| vec![(String::new(), v)];
    let opt = |v: Option<f64>| v.map(one).unwrap_or_default();
    metric("up", "gauge", "1 when the server answered.", &one(1.0));
    metric(
        "in_recovery",
        "gauge",
        "1 when the server is in recovery.",
        &one(f64::from(u8::from(s.server.in_recovery))),
    );
    metric(
        "archiver_archived_total",
        "counter",
        "WAL files archived (pg_stat_archiver).",
        &one(s.archiver.archived_count as f64),
    );
    metric(
        "archiver_failed_total",
        "counter",
        "Failed archive attempts (pg_stat_archiver).",
        &one(s.archiver.failed_count as f64),
    );
    metric(
        "archiver_last_archived_age_seconds",
        "gauge",
        "Seconds since the last WAL file was archived.",
        &opt(s.archiver.last_archived_age_seconds),
    );
    metric(
        "wal_bytes_total",
        "counter",
        "WAL written since initdb (current LSN).",
        &one(s.wal.bytes_total),
    );
    metric(
        "wal_bytes_per_second",
        "gauge",
        "Average WAL generation rate since pg_stat_wal was reset.",
        &opt(s.wal.bytes_per_second),
    );
    let slots: Vec<_> = s
        .replication_slots
        .iter()
        .filter_map(|x| {
            x.retained_bytes
                .map(|b| (format!("{{slot=\"{}\"}}", escape_label(&x.name)), b))
        })
        .collect();
    metric(
        "replication_slot_retained_bytes",
        "gauge",
        "WAL held back by each replication slot.",
        &slots,
    );
    let dbs: Vec<_> = s
        .databases
        .iter()
        .map(|d| {
            (
                format!("{{database=\"{}\"}}", escape_label(&d.name)),
                d.bytes as f64,
            )
        })
        .collect();
    metric(
        "database_size_bytes",
        "gauge",
        "Size of each database.",
        &dbs,
    );
    metric(
        "archive_lag_segments",
        "gauge",
        "Complete WAL segments the archive does not have yet.",
        &opt(s.archive.lag_segments.map(|l| l as f64)),
    );
    metric(
        "backups",
        "gauge",
        "Backups in the repository that are usable.",
        &one(s.backups.usable as f64),
    );
    let newest = s.backups.newest.as_ref();
    metric(
        "backup_newest_age_seconds",
        "gauge",
        "Age of the newest usable backup.",
        &opt(newest.and_then(|n| n.age_seconds)),
    );
    metric(
        "backup_newest_verified_age_seconds",
        "gauge",
        "Seconds since the newest usable backup was verified.",
        &opt(newest.and_then(|n| n.verified_age_seconds)),
    );
    metric(
        "backup_newest_verified_ok",
        "gauge",
        "1 when the newest usable backup's last verification passed.",
        &opt(newest
            .and_then(|n| n.verification)
            .map(|v| f64::from(u8::from(v == VerifyStatus::Ok)))),
    );
    let drills = &s.drills;
    metric(
        "drill_last_passed_age_seconds",
        "gauge",
        "Seconds since the last restore drill that passed.",
        &opt(drills.last_passed.as_ref().and_then(|d| d.age_seconds)),
    );
    metric(
        "drill_last_ok",
        "gauge",
        "1 when the last restore drill passed.",
        &opt(drills
            .last
            .as_ref()
            .map(|d| f64::from(u8::from(d.validation_status == Outcome::Passed)))),
    );
    metric(
        "drill_last_rto_seconds",
        "gauge",
        "Observed RTO of the last restore drill.",
        &opt(drills.last.as_ref().map(|d| d.rto_seconds)),
    );
    out
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub segment: String,
    pub seconds: f64,
    /// The bucket's versioning and Object Lock, on object storage.
    pub protection: Option<crate::storage::Protection>,
    /// What about them does not fit the retention policy.
    pub warnings: Vec<String>,
}

/// How long the retention policy keeps what it keeps longest, in days:
/// the oldest period of its classes, or its PITR window.
pub fn retention_span(r: &crate::config::RetentionConfig) -> Option<f64> {
    [
        r.pitr_days,
        r.keep_daily.map(|n| n as f64),
        r.keep_weekly.map(|n| n as f64 * 7.0),
        r.keep_monthly.map(|n| n as f64 * 31.0),
        r.keep_yearly.map(|n| n as f64 * 366.0),
    ]
    .into_iter()
    .flatten()
    .reduce(f64::max)
}

/// What a bucket's protection lacks, or where it and the retention policy
/// (`span` days) disagree.
pub fn protection_warnings(p: &crate::storage::Protection, span: Option<f64>) -> Vec<String> {
    let mut w = Vec::new();
    if p.versioning.as_deref() != Some("Enabled") {
        w.push(
            "versioning is off: an object deleted or overwritten with the bucket's credentials is gone"
                .to_owned(),
        );
    }
    match (&p.default_retention, span) {
        (None, _) => w.push(
            "no Object Lock default retention: a compromised host with the bucket's credentials can delete backups and WAL"
                .to_owned(),
        ),
        (Some(r), Some(days)) if (r.days as f64) > days => w.push(format!(
            "Object Lock keeps every object {} days, longer than the retention policy's {days} days: \
             expire will keep what it would delete until the lock ends",
            r.days
        )),
        (Some(r), Some(days)) if (r.days as f64) < days => w.push(format!(
            "the retention policy keeps backups up to {days} days, but Object Lock protects them only {} days: \
             older ones can be deleted with the bucket's credentials",
            r.days
        )),
        _ => {}
    }
    w
}

/// Forces a WAL switch and waits for the finished segment to reach the
/// archive intact.
pub fn check(
    repo: &Repo,
    conninfo: Option<&str>,
    timeout: Duration,
) -> Result<CheckReport, StatusError> {
    let started = Instant::now();
    let mut db = Db::connect(conninfo)?;
    let target = db.target().to_owned();
    let r = db.query_one(
        "read the server's settings",
        "SELECT current_setting('archive_mode'), (SELECT system_identifier::text FROM pg_control_system())",
        &[],
    )?;
    let (mode, sysid): (String, String) = (r.get(0), r.get(1));
    let repo_s = repo.location();
    if mode == "off" {
        return Err(StatusError::ArchiveOff {
            target,
            repo: repo_s,
        });
    }
    // On object storage, the never-overwrite rule rests on the store
    // refusing a second create (a local repository publishes with link(2),
    // which refuses by itself).
    let probe = format!(
        "check/create-only-probe-{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    );
    if repo.local_root().is_none()
        && !crate::storage::probe_create_only(repo.store(), &probe).map_err(RepoError::from)?
    {
        return Err(StatusError::Overwrites {
            repo: repo_s,
            key: probe,
        });
    }
    let archive = repo.archive();
    if let Some(info) = archive.info()?.filter(|i| i.system_identifier != sysid) {
        return Err(StatusError::WrongCluster {
            repo: repo_s,
            target,
            archive: info.system_identifier,
            server: sysid,
        });
    }
    let failed_before: i64 = db
        .query_one(
            "read pg_stat_archiver",
            "SELECT failed_count FROM pg_stat_archiver",
            &[],
        )?
        .get(0);
    // A record first: with no WAL since the last switch, a switch does nothing
    // and the check would only find an old segment. pg_walfile_name of the
    // switch point names the segment the switch completed.
    db.query(
        "write a WAL record",
        "SELECT pg_logical_emit_message(false, 'reentry', 'check')",
        &[],
    )?;
    let segment: String = db
        .query_one("switch WAL", "SELECT pg_walfile_name(pg_switch_wal())", &[])?
        .get(0);
    let name = WalFileName::parse(&segment).expect("PostgreSQL names its segments");
    let deadline = Instant::now() + timeout;
    loop {
        match archive.verify(&name) {
            Ok(_) => {
                return Ok(CheckReport {
                    segment,
                    seconds: started.elapsed().as_secs_f64(),
                    protection: None,
                    warnings: Vec::new(),
                })
            }
            Err(ArchiveError::NotFound { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(ArchiveError::NotFound { .. }) => break,
            Err(e) => return Err(e.into()),
        }
    }
    let a = db.query_one(
        "read pg_stat_archiver",
        "SELECT failed_count, coalesce(last_failed_wal, ''), coalesce(last_failed_time::text, '') FROM pg_stat_archiver",
        &[],
    )?;
    let (failed, last_failed, when): (i64, String, String) = (a.get(0), a.get(1), a.get(2));
    let archiver = if failed > failed_before {
        format!(
            ": archive_command failed {} times meanwhile, last on {last_failed} at {when}; its error is in the server log",
            failed - failed_before
        )
    } else {
        ": the archiver reported no failure; is archive_command pointing at this repository?"
            .to_owned()
    };
    Err(StatusError::NotArchived {
        segment,
        repo: repo_s,
        secs: timeout.as_secs(),
        archiver,
    })
}

#[cfg(test)]
mod protection_tests {
    use super::*;
    use crate::storage::{Protection, Retention};

    #[test]
    fn a_bucket_without_versioning_or_lock_and_a_lock_shorter_or_longer_than_retention_warn() {
        let none = protection_warnings(&Protection::default(), Some(7.0));
        assert_eq!(none.len(), 2, "{none:?}");
        assert!(none[0].contains("versioning is off"));
        assert!(none[1].contains("no Object Lock"));
        let locked = |days| Protection {
            versioning: Some("Enabled".into()),
            object_lock: true,
            default_retention: Some(Retention {
                mode: "GOVERNANCE".into(),
                days,
            }),
        };
        assert!(protection_warnings(&locked(30), Some(7.0))[0].contains("longer than"));
        assert!(protection_warnings(&locked(3), Some(7.0))[0].contains("only 3 days"));
        assert!(protection_warnings(&locked(7), Some(7.0)).is_empty());
        let r = crate::config::RetentionConfig {
            keep_daily: Some(7),
            keep_monthly: Some(2),
            ..Default::default()
        };
        assert_eq!(retention_span(&r), Some(62.0));
    }
}
