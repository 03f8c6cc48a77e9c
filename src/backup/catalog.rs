//! Mirrors the repository's usable backups into a `backup_catalog` table
//! (sql/backup_catalog.sql) for teams that query their inventory with SQL.

use crate::backup::archive::ArchiveError;
use crate::backup::label::{BackupLabel, BackupType};
use crate::backup::repo::{Repo, RepoError, BACKUP_DIR};
use crate::pg::conn::{Db, PgError};

pub const SCHEMA: &str = include_str!("../../sql/backup_catalog.sql");

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// A mistyped --repo looks like a repository whose backups all expired:
    /// syncing it would delete every row.
    #[error(
        "the repository at {location} has {why}: is --repo right? backup_catalog was left as it is"
    )]
    NotARepository { location: String, why: &'static str },
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error(transparent)]
    Repo(#[from] RepoError),
}

/// What a sync did.
#[derive(Debug, Default)]
pub struct Synced {
    /// Rows written.
    pub written: usize,
    /// Backups of this repository whose row is another repository's (a
    /// copy's, `repo copy`, with the same ids): the backup id and where
    /// the row points. Left as they are: a row names one place.
    pub elsewhere: Vec<(String, String)>,
    /// Backups whose files their label does not vouch for (a plain
    /// directory changed or planted, or a signed label that records no
    /// manifest checksum): the backup id and why. No row: restore would
    /// refuse them, and the table lists what can be restored; a row a
    /// sync wrote before goes.
    pub refused: Vec<(String, String)>,
}

/// Upserts every usable backup and deletes rows of this repository's
/// backups it no longer has, in one transaction; other repositories' rows
/// are left alone, those of backups this repository also has included.
pub fn sync(repo: &Repo, labels: &[BackupLabel], conninfo: &str) -> Result<Synced, CatalogError> {
    let location = repo.location();
    if repo.archive().info()?.is_none() {
        return Err(CatalogError::NotARepository {
            location,
            why: "no archive.json",
        });
    }
    if labels.is_empty() {
        return Err(CatalogError::NotARepository {
            location,
            why: "no backups",
        });
    }
    let mut db = Db::connect(Some(conninfo))?;
    db.batch("create backup_catalog", SCHEMA)?;
    db.batch("begin", "BEGIN")?;
    // Rows are this repository's by where they point: its backups as
    // plain directories (file://ROOT/backup/…) or as objects (LOCATION/backup/…).
    let (as_files, as_objects) = (
        match repo.local_root() {
            Some(root) => format!("file://{}/", root.join(BACKUP_DIR).display()),
            None => format!("{location}/{BACKUP_DIR}/"),
        },
        format!("{location}/{BACKUP_DIR}/"),
    );
    let mut synced = Synced::default();
    let usable: Vec<&BackupLabel> = labels.iter().filter(|l| l.is_usable()).collect();
    for l in &usable {
        // The labels checked out (`Repo::label`): their ids are well formed.
        let (storage, manifest) = match repo.backup_data(l) {
            Ok(Some(data)) => (
                format!("file://{}", data.display()),
                format!("file://{}", data.join("backup_manifest").display()),
            ),
            Err(e) if e.refuses_files() => {
                synced.refused.push((l.id.clone(), e.to_string()));
                continue;
            }
            Err(e) => return Err(e.into()),
            Ok(None) => {
                let dir = format!("{}/{}", repo.location(), Repo::backup_key(&l.id, ""));
                let manifest = format!("{dir}{}", crate::backup::packed::MANIFEST_FILE);
                (dir, manifest)
            }
        };
        let kind = match l.kind {
            BackupType::Full => "base_full",
            BackupType::Incremental => "base_incremental",
        };
        let (start, stop) = (
            l.start_lsn.map(|x| x.to_string()),
            l.stop_lsn.map(|x| x.to_string()),
        );
        let verified = l.verification.as_ref().map(|v| v.at.clone());
        let written = db.query(
            "upsert into backup_catalog",
            "INSERT INTO backup_catalog (backup_id, cluster_name, backup_type, started_at, finished_at,
                                         base_lsn, wal_start_lsn, wal_end_lsn, storage_uri, manifest_uri, verified_at)
             VALUES ($1, $2, $3, $4::text::timestamptz, $5::text::timestamptz,
                     $6::text::pg_lsn, $6::text::pg_lsn, $7::text::pg_lsn, $8, $9, $10::text::timestamptz)
             ON CONFLICT (backup_id) DO UPDATE SET
                 cluster_name = excluded.cluster_name, backup_type = excluded.backup_type,
                 started_at = excluded.started_at, finished_at = excluded.finished_at,
                 base_lsn = excluded.base_lsn, wal_start_lsn = excluded.wal_start_lsn,
                 wal_end_lsn = excluded.wal_end_lsn, storage_uri = excluded.storage_uri,
                 manifest_uri = excluded.manifest_uri, verified_at = excluded.verified_at
             WHERE left(backup_catalog.storage_uri, length($11)) = $11
                OR left(backup_catalog.storage_uri, length($12)) = $12
             RETURNING true",
            &[&l.id, &l.cluster_name, &kind, &l.start_time, &l.stop_time, &start, &stop, &storage, &manifest, &verified, &as_files, &as_objects],
        )?;
        if written.is_empty() {
            let row = db.query_one(
                "read a backup_catalog row",
                "SELECT storage_uri FROM backup_catalog WHERE backup_id = $1",
                &[&l.id],
            )?;
            synced.elsewhere.push((l.id.clone(), row.get(0)));
        } else {
            synced.written += 1;
        }
    }
    let ids: Vec<String> = usable
        .iter()
        .filter(|l| synced.refused.iter().all(|(id, _)| *id != l.id))
        .map(|l| l.id.clone())
        .collect();
    db.query(
        "delete expired rows from backup_catalog",
        "DELETE FROM backup_catalog WHERE NOT backup_id = ANY($1)
             AND (left(storage_uri, length($2)) = $2 OR left(storage_uri, length($3)) = $3)",
        &[&ids, &as_files, &as_objects],
    )?;
    db.batch("commit", "COMMIT")?;
    Ok(synced)
}
