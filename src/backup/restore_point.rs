//! `reentry restore-point NAME`: `pg_create_restore_point`, recorded in the
//! repository with its LSN, timeline and time so a restore can target it by
//! name.

use std::time::{Duration, Instant, UNIX_EPOCH};

use crate::backup::archive::ArchiveError;
use crate::backup::basebackup::BackupError;
use crate::backup::repo::{Repo, RestorePoint};
use crate::pg::conn::Db;
use crate::pg::wal::WalFileName;

/// PostgreSQL keeps restore point names in a 64-byte field.
const MAX_NAME: usize = 63;

pub fn create(
    repo: &Repo,
    conninfo: Option<&str>,
    name: &str,
    switch_wal: bool,
) -> Result<RestorePoint, BackupError> {
    let bad = |why| BackupError::BadRestorePointName {
        name: name.to_owned(),
        why,
    };
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if name.len() > MAX_NAME {
        return Err(bad("longer than PostgreSQL's 63 bytes"));
    }
    let points = repo.restore_points()?;
    if let Some(p) = points.iter().find(|p| p.name == name) {
        return Err(BackupError::DuplicateRestorePoint {
            name: name.to_owned(),
            lsn: p.lsn.to_string(),
            time: p.time.clone(),
        });
    }
    let mut db = Db::connect(conninfo)?;
    let row = db.query_one(
        "create the restore point",
        "SELECT lsn::text, ('x' || substr(pg_walfile_name(lsn), 1, 8))::bit(32)::int,
                extract(epoch FROM now())::float8,
                (SELECT system_identifier::text FROM pg_control_system())
           FROM pg_create_restore_point($1) AS lsn",
        &[&name],
    )?;
    let lsn: String = row.get(0);
    let epoch: f64 = row.get(2);
    let point = RestorePoint {
        name: name.to_owned(),
        lsn: lsn.parse().expect("PostgreSQL prints LSNs"),
        timeline: row.get::<_, i32>(1) as u32,
        time: humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_secs_f64(epoch))
            .to_string(),
        system_identifier: row.get(3),
    };
    repo.add_restore_point(&point)?;
    if switch_wal {
        // Makes the point restorable now rather than at the next segment
        // switch: the segment that holds it must reach the archive.
        let segment: String = db
            .query_one("switch WAL", "SELECT pg_walfile_name(pg_switch_wal())", &[])?
            .get(0);
        wait_archived(repo, name, &segment, Duration::from_secs(60))?;
    }
    Ok(point)
}

fn wait_archived(
    repo: &Repo,
    point: &str,
    segment: &str,
    timeout: Duration,
) -> Result<(), BackupError> {
    let name = WalFileName::parse(segment).expect("PostgreSQL names its segments");
    let deadline = Instant::now() + timeout;
    loop {
        match repo.archive().verify(&name) {
            Ok(_) => return Ok(()),
            Err(ArchiveError::NotFound { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(ArchiveError::NotFound { .. }) => {
                return Err(BackupError::RestorePointNotArchived {
                    name: point.into(),
                    segment: segment.into(),
                    secs: timeout.as_secs(),
                })
            }
            Err(e) => return Err(e.into()),
        }
    }
}
