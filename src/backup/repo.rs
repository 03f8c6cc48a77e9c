//! The repository's layout and its metadata files:
//!
//! ```text
//! REPO/archive/…                    the WAL archive (see archive.rs)
//! REPO/backup/<id>/backup.json      a base backup's label
//! REPO/backup/<id>/data/            local: the backup itself, as pg_basebackup wrote it
//! REPO/backup/<id>/files.json       object storage: the backup packed into
//! REPO/backup/<id>/pack/NNNNNN        compressed objects (see packed.rs)
//! REPO/restore-points.json          named restore points
//! ```
//!
//! On object storage the label is written once, create-only, when the
//! backup ends (complete or failed), after everything it names: a backup
//! is visible whole or not at all.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::backup::archive::Archive;
use crate::backup::label::{BackupLabel, LABEL_FILE};
use crate::crypt::Keys;
use crate::fsutil;
use crate::pg::lsn::Lsn;
use crate::storage::{Local, Location, Put, Store, StoreError};

pub const BACKUP_DIR: &str = "backup";
pub const RESTORE_POINTS_FILE: &str = "restore-points.json";
pub const RESTORE_POINTS_DIR: &str = "restore-points";

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("cannot {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{location} is damaged: {detail}")]
    BadObject { location: String, detail: String },
    #[error("no backup {id} in {repo}; `reentry backup list` shows the backups there")]
    UnknownBackup { id: String, repo: String },
    #[error("backup {id} already exists in {repo}")]
    BackupExists { id: String, repo: String },
    #[error(transparent)]
    Store(#[from] StoreError),
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
    store: Arc<dyn Store>,
    /// The repository's directory when it is a local one.
    local: Option<PathBuf>,
    keys: Keys,
}

impl Repo {
    /// A repository in a local directory.
    pub fn new(root: impl Into<PathBuf>) -> Repo {
        let root = root.into();
        Repo {
            store: Arc::new(Local::new(root.clone())),
            local: Some(root),
            keys: Keys::default(),
        }
    }

    /// The repository at `location`: a local directory or object storage.
    pub fn open(location: &Location) -> Result<Repo, StoreError> {
        Ok(match location {
            Location::Local(p) => Repo::new(p.clone()),
            remote => Repo {
                store: Arc::from(remote.open()?),
                local: None,
                keys: Keys::default(),
            },
        })
    }

    /// The repository an archive is in.
    pub fn on_archive(archive: &Archive) -> Repo {
        Repo {
            store: archive.store(),
            local: archive.local_root().map(Path::to_owned),
            keys: archive.keys().clone(),
        }
    }

    /// With `keys` to encrypt what it stores and decrypt what it reads.
    pub fn with_keys(mut self, keys: Keys) -> Repo {
        self.keys = keys;
        self
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Where it is, as it may be shown: no credential.
    pub fn location(&self) -> String {
        self.store.location()
    }

    /// The repository's directory, when it is local.
    pub fn local_root(&self) -> Option<&Path> {
        self.local.as_deref()
    }

    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    pub fn archive(&self) -> Archive {
        match &self.local {
            Some(root) => Archive::new(root),
            None => Archive::on(self.store.clone()),
        }
        .with_keys(self.keys.clone())
    }

    /// The key of `name` in backup `id`'s objects.
    pub fn backup_key(id: &str, name: &str) -> String {
        format!("{BACKUP_DIR}/{id}/{name}")
    }

    /// A local backup's directory. Only for a local repository.
    pub fn backup_dir(&self, id: &str) -> PathBuf {
        self.local
            .as_ref()
            .expect("a backup directory is of a local repository")
            .join(BACKUP_DIR)
            .join(id)
    }

    /// A local backup's data directory, as pg_basebackup wrote it; none
    /// on object storage, or for a packed backup copied from there.
    pub fn backup_data(&self, id: &str) -> Option<PathBuf> {
        self.local.as_ref()?;
        let dir = self.backup_dir(id);
        if dir.join(crate::backup::packed::INDEX_FILE).exists() {
            return None;
        }
        Some(dir.join("data"))
    }

    /// Whether anything of backup `id` is stored.
    pub fn has_backup(&self, id: &str) -> Result<bool, RepoError> {
        Ok(match &self.local {
            Some(_) => self.backup_dir(id).exists(),
            None => !self.store.list(&Repo::backup_key(id, ""))?.is_empty(),
        })
    }

    /// Every backup label, oldest first.
    pub fn backups(&self) -> Result<Vec<BackupLabel>, RepoError> {
        let mut labels = Vec::new();
        match &self.local {
            Some(root) => {
                let dir = root.join(BACKUP_DIR);
                let entries = match fs::read_dir(&dir) {
                    Ok(e) => e,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
                    Err(e) => return Err(io_err("list", &dir)(e)),
                };
                for entry in entries {
                    let entry = entry.map_err(io_err("list", &dir))?;
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if name.starts_with('.') || !entry.path().join(LABEL_FILE).exists() {
                        continue;
                    }
                    labels.push(self.label(&name)?);
                }
            }
            None => {
                let under = format!("{BACKUP_DIR}/");
                for o in self.store.list(&under)? {
                    let Some(id) = o.key[under.len()..].strip_suffix(&format!("/{LABEL_FILE}"))
                    else {
                        continue;
                    };
                    if !id.contains('/') {
                        labels.push(self.label(id)?);
                    }
                }
            }
        }
        labels.sort_by(|a, b| a.sort_key().cmp(&b.sort_key()));
        Ok(labels)
    }

    pub fn label(&self, id: &str) -> Result<BackupLabel, RepoError> {
        let key = Repo::backup_key(id, LABEL_FILE);
        let text = match self.store.get(&key)? {
            Some(t) => t,
            None => {
                return Err(RepoError::UnknownBackup {
                    id: id.to_owned(),
                    repo: self.location(),
                })
            }
        };
        let mut label: BackupLabel =
            serde_json::from_slice(&text).map_err(|e| RepoError::BadObject {
                location: format!("{}/{key}", self.location()),
                detail: e.to_string(),
            })?;
        if self.local.is_none() {
            // Verifications are objects of their own beside the label,
            // which is never rewritten: the newest one counts.
            let under = Repo::backup_key(id, "verified/");
            if let Some(o) = self.store.list(&under)?.last() {
                if let Some(v) = self.store.get(&o.key)? {
                    label.verification =
                        Some(
                            serde_json::from_slice(&v).map_err(|e| RepoError::BadObject {
                                location: format!("{}/{}", self.location(), o.key),
                                detail: e.to_string(),
                            })?,
                        );
                }
            }
        }
        Ok(label)
    }

    /// Records the label. Locally it is rewritten as the backup goes; on
    /// object storage it is written once, when the backup has ended.
    pub fn save_label(&self, label: &BackupLabel) -> Result<(), RepoError> {
        match &self.local {
            Some(_) => {
                let dir = self.backup_dir(&label.id);
                fsutil::create_dir_all_durable(&dir).map_err(io_err("create directory", &dir))?;
                write_json(&dir.join(LABEL_FILE), label)
            }
            None => {
                let mut label = label.clone();
                label.verification = None;
                let key = Repo::backup_key(&label.id, LABEL_FILE);
                match self.store.put_if_absent(&key, &json_bytes(&label))? {
                    Put::Created => Ok(()),
                    Put::Exists => Err(RepoError::BackupExists {
                        id: label.id.clone(),
                        repo: self.location(),
                    }),
                }
            }
        }
    }

    /// Records a verification of backup `label`: in its label locally,
    /// as an object of its own on object storage.
    pub fn save_verification(&self, label: &BackupLabel) -> Result<(), RepoError> {
        match (&self.local, &label.verification) {
            (Some(_), _) => self.save_label(label),
            (None, Some(v)) => {
                let key = Repo::backup_key(
                    &label.id,
                    &format!("verified/{}.json", v.at.replace(':', "")),
                );
                self.store.put_if_absent(&key, &json_bytes(v))?;
                Ok(())
            }
            (None, None) => Ok(()),
        }
    }

    /// The backup and every backup it depends on, the full one first.
    pub fn chain(&self, id: &str) -> Result<Vec<BackupLabel>, RepoError> {
        let mut chain = vec![self.label(id)?];
        while let Some(parent) = chain.last().and_then(|l| l.parent.clone()) {
            if chain.iter().any(|l| l.id == parent) {
                return Err(RepoError::BadObject {
                    location: format!("{}/{}", self.location(), Repo::backup_key(id, LABEL_FILE)),
                    detail: format!("its parents loop through {parent}"),
                });
            }
            chain.push(self.label(&parent)?);
        }
        chain.reverse();
        Ok(chain)
    }

    /// Every named restore point, oldest first: those in
    /// `restore-points.json` (a local repository's file) and those written
    /// one object each under `restore-points/` (object storage, where
    /// nothing is rewritten, and their copies).
    pub fn restore_points(&self) -> Result<Vec<RestorePoint>, RepoError> {
        let bad = |key: &str, e: serde_json::Error| RepoError::BadObject {
            location: format!("{}/{key}", self.location()),
            detail: e.to_string(),
        };
        let mut points: Vec<RestorePoint> = match self.store.get(RESTORE_POINTS_FILE)? {
            Some(t) => serde_json::from_slice(&t).map_err(|e| bad(RESTORE_POINTS_FILE, e))?,
            None => Vec::new(),
        };
        for o in self.store.list(&format!("{RESTORE_POINTS_DIR}/"))? {
            if let Some(t) = self.store.get(&o.key)? {
                let p: RestorePoint = serde_json::from_slice(&t).map_err(|e| bad(&o.key, e))?;
                if !points.contains(&p) {
                    points.push(p);
                }
            }
        }
        points.sort_by(|a, b| a.time.cmp(&b.time));
        Ok(points)
    }

    /// Records a new restore point: locally in `restore-points.json`, on
    /// object storage as an object of its own, written once.
    pub fn add_restore_point(&self, point: &RestorePoint) -> Result<(), RepoError> {
        match &self.local {
            Some(root) => {
                let file = root.join(RESTORE_POINTS_FILE);
                let mut points: Vec<RestorePoint> = match fs::read(&file) {
                    Ok(t) => serde_json::from_slice(&t).map_err(|e| RepoError::BadObject {
                        location: file.display().to_string(),
                        detail: e.to_string(),
                    })?,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
                    Err(e) => return Err(io_err("read", &file)(e)),
                };
                points.push(point.clone());
                fsutil::create_dir_all_durable(root).map_err(io_err("create directory", root))?;
                write_json(&file, &points)
            }
            None => {
                let digest = sha2::Sha256::digest(point.name.as_bytes());
                let key = format!(
                    "{RESTORE_POINTS_DIR}/{}-{:02x}{:02x}{:02x}{:02x}.json",
                    point.time.replace(':', ""),
                    digest[0],
                    digest[1],
                    digest[2],
                    digest[3]
                );
                self.store.put_if_absent(&key, &json_bytes(point))?;
                Ok(())
            }
        }
    }
}

fn json_bytes<T: Serialize>(value: &T) -> Vec<u8> {
    let mut text = serde_json::to_string_pretty(value).expect("metadata serializes");
    text.push('\n');
    text.into_bytes()
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), RepoError> {
    fsutil::write_atomic(path, &json_bytes(value)).map_err(io_err("write", path))
}
