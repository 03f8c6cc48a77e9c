//! The repository's layout and its metadata files:
//!
//! ```text
//! REPO/archive/…                    the WAL archive (see archive.rs)
//! REPO/backup/<id>/backup.json      a base backup's label
//! REPO/backup/<id>/data/            the backup itself, as pg_basebackup wrote it
//! REPO/restore-points.json          named restore points
//! ```

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backup::archive::Archive;
use crate::backup::label::{BackupLabel, LABEL_FILE};
use crate::fsutil;
use crate::pg::lsn::Lsn;

pub const BACKUP_DIR: &str = "backup";
pub const RESTORE_POINTS_FILE: &str = "restore-points.json";

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("cannot {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is damaged: {detail}", path.display())]
    BadMetadata { path: PathBuf, detail: String },
    #[error("no backup {id} in {}; `reentry backup list` shows the backups there", repo.display())]
    UnknownBackup { id: String, repo: PathBuf },
}

pub fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> RepoError + 'a {
    move |source| RepoError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestorePoint {
    pub name: String,
    pub lsn: Lsn,
    pub timeline: u32,
    pub time: String,
    pub system_identifier: String,
}

pub struct Repo {
    root: PathBuf,
}

impl Repo {
    pub fn new(root: impl Into<PathBuf>) -> Repo {
        Repo { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn archive(&self) -> Archive {
        Archive::new(&self.root)
    }

    pub fn backup_dir(&self, id: &str) -> PathBuf {
        self.root.join(BACKUP_DIR).join(id)
    }

    pub fn backup_data(&self, id: &str) -> PathBuf {
        self.backup_dir(id).join("data")
    }

    /// Every backup label, oldest first.
    pub fn backups(&self) -> Result<Vec<BackupLabel>, RepoError> {
        let dir = self.root.join(BACKUP_DIR);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("list", &dir)(e)),
        };
        let mut labels = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err("list", &dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !entry.path().join(LABEL_FILE).exists() {
                continue;
            }
            labels.push(self.label(&name)?);
        }
        labels.sort_by(|a, b| a.sort_key().cmp(&b.sort_key()));
        Ok(labels)
    }

    pub fn label(&self, id: &str) -> Result<BackupLabel, RepoError> {
        let path = self.backup_dir(id).join(LABEL_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(RepoError::UnknownBackup {
                    id: id.to_owned(),
                    repo: self.root.clone(),
                })
            }
            Err(e) => return Err(io_err("read", &path)(e)),
        };
        serde_json::from_str(&text).map_err(|e| RepoError::BadMetadata {
            path,
            detail: e.to_string(),
        })
    }

    pub fn save_label(&self, label: &BackupLabel) -> Result<(), RepoError> {
        let dir = self.backup_dir(&label.id);
        fsutil::create_dir_all_durable(&dir).map_err(io_err("create directory", &dir))?;
        let path = dir.join(LABEL_FILE);
        write_json(&path, label)
    }

    /// The backup and every backup it depends on, the full one first.
    pub fn chain(&self, id: &str) -> Result<Vec<BackupLabel>, RepoError> {
        let mut chain = vec![self.label(id)?];
        while let Some(parent) = chain.last().and_then(|l| l.parent.clone()) {
            if chain.iter().any(|l| l.id == parent) {
                let path = self.backup_dir(id).join(LABEL_FILE);
                return Err(RepoError::BadMetadata {
                    path,
                    detail: format!("its parents loop through {parent}"),
                });
            }
            chain.push(self.label(&parent)?);
        }
        chain.reverse();
        Ok(chain)
    }

    pub fn restore_points(&self) -> Result<Vec<RestorePoint>, RepoError> {
        let path = self.root.join(RESTORE_POINTS_FILE);
        match fs::read_to_string(&path) {
            Ok(t) => serde_json::from_str(&t).map_err(|e| RepoError::BadMetadata {
                path,
                detail: e.to_string(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(io_err("read", &path)(e)),
        }
    }

    pub fn save_restore_points(&self, points: &[RestorePoint]) -> Result<(), RepoError> {
        fsutil::create_dir_all_durable(&self.root)
            .map_err(io_err("create directory", &self.root))?;
        write_json(&self.root.join(RESTORE_POINTS_FILE), &points)
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), RepoError> {
    let mut text = serde_json::to_string_pretty(value).expect("metadata serializes");
    text.push('\n');
    fsutil::write_atomic(path, text.as_bytes()).map_err(io_err("write", path))
}
