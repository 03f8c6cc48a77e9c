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
//!
//! Whoever can write into the repository (the database host, which
//! archives there, or a credential that can only put objects) can plant a
//! label. So a label is trusted only when its id is the key it was read
//! from and has the shape of a generated id, it is of the archive's
//! cluster, and it is not dated in the future; any other is refused and
//! named, never used. Where the host is set up for an encrypted
//! repository, or has a verify key, a label must also carry a signature
//! that one of its verify keys verifies (sign.rs): a principal without the
//! signing key cannot make one.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::backup::archive::Archive;
use crate::backup::label::{self, is_backup_id, BackupLabel, LabelProblem, LABEL_FILE};
use crate::backup::vouched::Vouched;
use crate::crypt::Keys;
use crate::fsutil;
use crate::pg::lsn::Lsn;
use crate::storage::{Local, Location, Put, Store, StoreError};

pub const BACKUP_DIR: &str = "backup";
pub const RESTORE_POINTS_FILE: &str = "restore-points.json";
pub const RESTORE_POINTS_DIR: &str = "restore-points";
/// How far ahead of this host's clock a label may be dated: clocks of the
/// hosts that back up and that read differ a little; a label further ahead
/// would take retention's "newest" slots from every genuine backup.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

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
    #[error("{id:?} is not a backup id: ids look like 20261125-125301F; `reentry backup list` shows those in {repo}")]
    BadBackupId { id: String, repo: String },
    #[error(
        "{repo}: label {refused}; refused: a person must look, as it may have been \
         planted to steer retention or restore; remove it if it is not a genuine backup"
    )]
    Untrusted { repo: String, refused: Refused },
    #[error(
        "{repo}: this host encrypts or decrypts the repository, so its backup labels must be \
         signed, and no key to verify them is set: set signing.verify-keys in the config \
         (or --verify-key, or REENTRY_VERIFY_KEYS) to the public key(s) that \
         `reentry repo keygen` printed on the backup host"
    )]
    NeedVerifyKey { repo: String },
    #[error(
        "{location}: {detail}; refused: a person must look, as it may have been planted \
         to be restored in place of the backup"
    )]
    NotVouched { location: String, detail: String },
    #[error(
        "{}: backup {id}'s signed label records no checksum of its backup_manifest (it was \
         taken before reentry recorded one), so nothing vouches for the files beside it, and \
         reentry neither restores nor copies it. Take a new full backup (`reentry backup`) and \
         use that one. To judge this one by hand before you decide: `pg_verifybackup \
         --no-parse-wal {}` checks the files its manifest lists, but not postgresql.auto.conf, \
         pg_wal/ or *.signal, which a restore would use: compare those with the source yourself",
        data.display(),
        data.display()
    )]
    Unvouched { id: String, data: PathBuf },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Archive(#[from] Box<crate::backup::archive::ArchiveError>),
}

impl RepoError {
    /// Whether it refuses a backup's files (`Repo::plain_backup`, and the
    /// checks against a vouched manifest): a backup to leave out, not a
    /// repository that cannot be read.
    pub fn refuses_files(&self) -> bool {
        matches!(
            self,
            RepoError::NotVouched { .. } | RepoError::Unvouched { .. }
        )
    }
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

/// A label that does not check out, and why: `key` is where it was read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refused {
    pub key: String,
    pub problem: String,
    /// No verify key vouches for it: unsigned, signed by another key,
    /// changed after it was signed, or signed under another key. Nothing
    /// the backup host wrote: ignored (never deleted) rather than a stop.
    pub unsigned: bool,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.problem)
    }
}

/// A local plain backup: its data directory, and with a signed label the
/// manifest the label vouches for, read once.
pub struct PlainBackup {
    pub data: PathBuf,
    /// None: the label is not signed, and nobody vouches for the files.
    /// Some: every file used is checked against it as it is read.
    pub vouched: Option<Vouched>,
}

/// Every label of a repository, those that check out apart from those
/// that do not.
#[derive(Debug, Default)]
pub struct Survey {
    /// Oldest first.
    pub labels: Vec<BackupLabel>,
    pub refused: Vec<Refused>,
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

    /// A local backup's directory. Only for a local repository, and only
    /// for an id of the generated shape: never an absolute path or `..`,
    /// which `join` would follow out of the repository.
    pub fn backup_dir(&self, id: &str) -> Result<PathBuf, RepoError> {
        if !is_backup_id(id) {
            return Err(self.bad_id(id));
        }
        Ok(self
            .local
            .as_ref()
            .expect("a backup directory is of a local repository")
            .join(BACKUP_DIR)
            .join(id))
    }

    fn bad_id(&self, id: &str) -> RepoError {
        RepoError::BadBackupId {
            id: id.to_owned(),
            repo: self.location(),
        }
    }

    /// A local backup's data directory, as pg_basebackup wrote it; none
    /// on object storage, or for a packed backup. See `plain_backup`.
    pub fn backup_data(&self, label: &BackupLabel) -> Result<Option<PathBuf>, RepoError> {
        Ok(self.plain_backup(label)?.map(|p| p.data))
    }

    /// A local plain backup, as its label has it; none on object storage,
    /// or for a packed backup (encrypted, or copied from object storage).
    /// The label decides which, not what is on disk: beside a label that
    /// records a packed backup (its encryption, its stored bytes, or the
    /// checksum of its `files.json`), a `data/` directory is refused, as
    /// whoever can write into the repository may have put it there after
    /// removing `files.json`. A plain backup's `backup_manifest` is read
    /// once, and refused unless it is the one the label records; a signed
    /// label's is kept (`PlainBackup::vouched`), to check each file against
    /// as it is read (vouched.rs), and a signed label that records none is
    /// refused. Only a label that is not signed, and records neither, is
    /// judged by its directory: nobody vouches for it.
    pub fn plain_backup(&self, label: &BackupLabel) -> Result<Option<PlainBackup>, RepoError> {
        use crate::backup::packed::{INDEX_FILE, MANIFEST_FILE};
        if self.local.is_none() {
            return Ok(None);
        }
        let dir = self.backup_dir(&label.id)?;
        let data = dir.join("data");
        let refuse = |location: &Path, detail: String| RepoError::NotVouched {
            location: location.display().to_string(),
            detail,
        };
        let packed = packed_by_label(label).or_else(|| {
            (label.signature.is_none() && label.objects.is_empty() && dir.join(INDEX_FILE).exists())
                .then(|| format!("its label, unsigned, records nothing of it, and a {INDEX_FILE} is beside it"))
        });
        if let Some(what) = packed {
            if fs::symlink_metadata(&data).is_ok() {
                return Err(refuse(
                    &data,
                    format!(
                        "backup {} is packed ({what}), so a plain data directory beside it is \
                         none of the backup's",
                        label.id
                    ),
                ));
            }
            return Ok(None);
        }
        let manifest = data.join(MANIFEST_FILE);
        let mut vouched = None;
        match label.objects.get(MANIFEST_FILE) {
            Some(want) => {
                let bytes = match fs::read(&manifest) {
                    Ok(b) => b,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        return Err(refuse(
                            &manifest,
                            "it is missing, and the label records its checksum".into(),
                        ))
                    }
                    Err(e) => return Err(io_err("read", &manifest)(e)),
                };
                let got = crate::backup::stored::Checksum::of(want.algorithm, &bytes);
                if got != *want {
                    return Err(refuse(
                        &manifest,
                        format!("its checksum is {got}, and the label records {want}"),
                    ));
                }
                if label.signature.is_some() {
                    vouched = Some(Vouched::parse(&label.id, &data, bytes)?);
                }
            }
            None if label.signature.is_some() => {
                return Err(RepoError::Unvouched {
                    id: label.id.clone(),
                    data,
                })
            }
            None => {}
        }
        Ok(Some(PlainBackup { data, vouched }))
    }

    /// Whether anything of backup `id` is stored.
    pub fn has_backup(&self, id: &str) -> Result<bool, RepoError> {
        Ok(match &self.local {
            Some(_) => self.backup_dir(id)?.exists(),
            None => !self.store.list(&Repo::backup_key(id, ""))?.is_empty(),
        })
    }

    /// Every backup label that checks out, oldest first. Those that do
    /// not are left out and logged; `survey` returns them.
    pub fn backups(&self) -> Result<Vec<BackupLabel>, RepoError> {
        let survey = self.survey(SystemTime::now())?;
        for r in &survey.refused {
            tracing::warn!(repo = %self.location(), label = %r.key, problem = %r.problem,
                "backup label refused: not used; a person must look");
        }
        Ok(survey.labels)
    }

    /// Every backup label, those that check out (oldest first) apart from
    /// those that do not, judged against the archive's cluster and `now`.
    pub fn survey(&self, now: SystemTime) -> Result<Survey, RepoError> {
        let cluster = self.archive().info().map_err(Box::new)?;
        let cluster = cluster.map(|i| i.system_identifier);
        let mut survey = Survey::default();
        for id in self.label_keys()? {
            let checked = self
                .label(&id)
                .and_then(|l| self.vet(l, cluster.as_deref(), now));
            match checked {
                Ok(l) => survey.labels.push(l),
                Err(RepoError::Untrusted { refused, .. }) => survey.refused.push(refused),
                Err(e) => return Err(e),
            }
        }
        survey
            .labels
            .sort_by(|a, b| a.sort_key().cmp(&b.sort_key()));
        Ok(survey)
    }

    /// The keys (directory names) under `backup/` that hold a label.
    fn label_keys(&self) -> Result<Vec<String>, RepoError> {
        let mut ids = Vec::new();
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
                    ids.push(name);
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
                        ids.push(id.to_owned());
                    }
                }
            }
        }
        Ok(ids)
    }

    fn untrusted(&self, id: &str, problem: String) -> RepoError {
        self.refuse(id, problem, false)
    }

    fn refuse(&self, id: &str, problem: String, unsigned: bool) -> RepoError {
        RepoError::Untrusted {
            repo: self.location(),
            refused: Refused {
                key: Repo::backup_key(id, LABEL_FILE),
                problem,
                unsigned,
            },
        }
    }

    /// Refuses label `text`, read from `key` of backup `id`, unless a
    /// verify key vouches for it. With none set, a host that encrypts or
    /// decrypts cannot tell a planted label: an error, before anything.
    fn check_signature(&self, id: &str, key: &str, text: &[u8]) -> Result<(), RepoError> {
        let trust = &self.keys.trust;
        if !trust.verifies() {
            if self.keys.encrypted() {
                return Err(RepoError::NeedVerifyKey {
                    repo: self.location(),
                });
            }
            return Ok(());
        }
        let value: serde_json::Value = serde_json::from_slice(text).map_err(|e| {
            self.refuse(id, format!("it is not JSON ({e}), let alone signed"), true)
        })?;
        crate::sign::check(trust, key, &value).map_err(|problem| self.refuse(id, problem, true))
    }

    /// `label` as it is to be stored: signed, when this host has a signing
    /// key; else as it is (a verification recorded in a local label keeps
    /// the signature, which does not cover it).
    pub(crate) fn signed(&self, label: &BackupLabel) -> BackupLabel {
        let mut label = label.clone();
        if let Some(signer) = self.keys.trust.signer.as_deref() {
            label.signature = None;
            let value = serde_json::to_value(&label).expect("a label serializes");
            label.signature = Some(crate::sign::sign(
                signer,
                &Repo::backup_key(&label.id, LABEL_FILE),
                &value,
            ));
        }
        label
    }

    /// `label` when it is of cluster `cluster` (the archive's, when it has
    /// one) and not dated later than `now` allows (`label::vet`).
    fn vet(
        &self,
        label: BackupLabel,
        cluster: Option<&str>,
        now: SystemTime,
    ) -> Result<BackupLabel, RepoError> {
        match label::vet(&label, cluster, now) {
            Ok(()) => Ok(label),
            Err(problem) => Err(self.untrusted(&label.id, problem)),
        }
    }

    /// Backup `id`'s label when it checks out against the archive's
    /// cluster and the clock, as `survey` judges every label.
    pub fn trusted_label(&self, id: &str) -> Result<BackupLabel, RepoError> {
        let cluster = self.archive().info().map_err(Box::new)?;
        let label = self.label(id)?;
        self.vet(
            label,
            cluster.as_ref().map(|i| i.system_identifier.as_str()),
            SystemTime::now(),
        )
    }

    /// Backup `id`'s label, refused unless its `id` is the key it was read
    /// from and it (and its parent) has the shape of a generated id.
    pub fn label(&self, id: &str) -> Result<BackupLabel, RepoError> {
        // Keys come from listings (one path component) or from a user;
        // neither may climb out of `backup/`.
        if id.is_empty() || id.starts_with('.') || id.contains(['/', '\0']) {
            return Err(self.bad_id(id));
        }
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
        // First: whatever else is wrong with a label no key vouches for
        // (an id that is not its key, say), nobody this host trusts wrote it.
        self.check_signature(id, &key, &text)?;
        let mut label = label::parse(id, &text).map_err(|p| match p {
            LabelProblem::Damaged(detail) => RepoError::BadObject {
                location: format!("{}/{key}", self.location()),
                detail,
            },
            LabelProblem::Untrusted(problem) => self.untrusted(id, problem),
        })?;
        if let Some(e) = label
            .encryption
            .as_ref()
            .filter(|_| !self.keys.trust.verifies())
        {
            // Here only when this host has no key at all: its labels
            // cannot be told from planted ones.
            return Err(self.refuse(
                id,
                format!(
                    "it records encryption (key id {}), so it must be signed, and no verify \
                     key is set here to check it: set signing.verify-keys (or --verify-key)",
                    e.key_id
                ),
                true,
            ));
        }
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

    /// The label at `key` (`backup/ID/backup.json`) read as it is, vouched
    /// for by nobody: only for what expire keeps for a label it ignores.
    /// None when it does not read as a label of its key.
    pub fn unvouched_label(&self, key: &str) -> Option<BackupLabel> {
        let id = key
            .strip_prefix(&format!("{BACKUP_DIR}/"))?
            .strip_suffix(&format!("/{LABEL_FILE}"))?;
        let text = self.store.get(key).ok()??;
        label::parse(id, &text).ok()
    }

    /// Records the label, signed when this host has a signing key, and
    /// returns it as recorded. Locally it is rewritten as the backup goes;
    /// on object storage it is written once, when the backup has ended.
    pub fn save_label(&self, label: &BackupLabel) -> Result<BackupLabel, RepoError> {
        let mut label = self.signed(label);
        match &self.local {
            Some(_) => {
                let dir = self.backup_dir(&label.id)?;
                fsutil::create_dir_all_durable(&dir).map_err(io_err("create directory", &dir))?;
                write_json(&dir.join(LABEL_FILE), &label)?;
            }
            None => {
                label.verification = None;
                let key = Repo::backup_key(&label.id, LABEL_FILE);
                if self.store.put_new_or_same(&key, &json_bytes(&label))? == Put::Exists {
                    return Err(RepoError::BackupExists {
                        id: label.id.clone(),
                        repo: self.location(),
                    });
                }
            }
        }
        Ok(label)
    }

    /// Records a verification of backup `label`: in its label locally,
    /// as an object of its own on object storage. Its signature does not
    /// cover it: a host that verifies holds no signing key.
    pub fn save_verification(&self, label: &BackupLabel) -> Result<(), RepoError> {
        match (&self.local, &label.verification) {
            (Some(_), _) => {
                let dir = self.backup_dir(&label.id)?;
                write_json(&dir.join(LABEL_FILE), label)
            }
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
        let mut chain = vec![self.trusted_label(id)?];
        while let Some(parent) = chain.last().and_then(|l| l.parent.clone()) {
            if chain.iter().any(|l| l.id == parent) {
                return Err(RepoError::BadObject {
                    location: format!("{}/{}", self.location(), Repo::backup_key(id, LABEL_FILE)),
                    detail: format!("its parents loop through {parent}"),
                });
            }
            chain.push(self.trusted_label(&parent)?);
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

/// Why `label` is of a packed backup, by what it records; none when it
/// records nothing of one.
pub fn packed_by_label(label: &BackupLabel) -> Option<String> {
    use crate::backup::packed::INDEX_FILE;
    if let Some(e) = &label.encryption {
        Some(format!("its label records encryption, key id {}", e.key_id))
    } else if label.objects.contains_key(INDEX_FILE) {
        Some(format!(
            "its label records the checksum of its {INDEX_FILE}"
        ))
    } else {
        label
            .stored_bytes
            .map(|b| format!("its label records {b} bytes stored in objects"))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::label::{BackupStatus, BackupType, LABEL_FORMAT};
    use crate::fsutil::ScratchDir;

    fn label(id: &str, parent: Option<&str>) -> BackupLabel {
        BackupLabel {
            format: LABEL_FORMAT,
            id: id.into(),
            cluster_name: "c".into(),
            pg_version: 18,
            system_identifier: "7000000000000000001".into(),
            kind: if parent.is_some() {
                BackupType::Incremental
            } else {
                BackupType::Full
            },
            parent: parent.map(Into::into),
            status: BackupStatus::Complete,
            failure: None,
            start_lsn: None,
            stop_lsn: None,
            timeline: Some(1),
            wal_ranges: Vec::new(),
            wal_segment_size: 16 << 20,
            start_time: "2026-01-02T03:04:05.678Z".into(),
            stop_time: Some("2026-01-02T03:05:05.678Z".into()),
            size_bytes: 1,
            file_count: 1,
            stored_bytes: None,
            encryption: None,
            tool_version: "t".into(),
            verification: None,
            objects: Default::default(),
            signature: None,
        }
    }

    /// Writes `label` under key `key`, as a planted label would be.
    fn plant(root: &Path, key: &str, label: &BackupLabel) {
        let dir = root.join(BACKUP_DIR).join(key);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(LABEL_FILE), json_bytes(label)).unwrap();
    }

    fn refusal(e: RepoError) -> Refused {
        match e {
            RepoError::Untrusted { refused, .. } => refused,
            e => panic!("not a refusal: {e}"),
        }
    }

    #[test]
    fn a_label_whose_id_is_not_its_key_is_refused_naming_both() {
        let dir = ScratchDir::new("reentry-repo-test").unwrap();
        let repo = Repo::new(dir.path());
        plant(dir.path(), "zz", &label("/tmp/victim", None));
        let r = refusal(repo.label("zz").unwrap_err());
        assert_eq!(
            r.to_string(),
            r#"backup/zz/backup.json: id "/tmp/victim" does not match its key "zz""#
        );
        plant(dir.path(), "20260102-030405F", &label("../../x", None));
        let r = refusal(repo.label("20260102-030405F").unwrap_err());
        assert!(r.problem.contains(r#"id "../../x" does not match"#), "{r}");
    }

    #[test]
    fn keys_parents_and_kind_letters_must_have_the_generated_shape() {
        let dir = ScratchDir::new("reentry-repo-test").unwrap();
        let repo = Repo::new(dir.path());
        plant(dir.path(), "zz", &label("zz", None));
        assert!(refusal(repo.label("zz").unwrap_err())
            .problem
            .contains(r#"its key "zz" is not a backup id"#));
        plant(
            dir.path(),
            "20260102-030405I",
            &label("20260102-030405I", Some("/etc")),
        );
        assert!(refusal(repo.label("20260102-030405I").unwrap_err())
            .problem
            .contains(r#"its parent "/etc" is not a backup id"#));
        plant(
            dir.path(),
            "20260102-030406I",
            &label("20260102-030406I", None),
        );
        assert!(refusal(repo.label("20260102-030406I").unwrap_err())
            .problem
            .contains("other kind's letter"));
        plant(
            dir.path(),
            "20260102-030407F",
            &label("20260102-030407F", None),
        );
        repo.label("20260102-030407F").unwrap();
        // A key from a user that would climb out of backup/ is not read.
        for bad in ["../x", "/tmp/victim", ".expiring-x", ""] {
            assert!(
                matches!(repo.label(bad), Err(RepoError::BadBackupId { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn backup_dir_joins_only_backup_ids() {
        let repo = Repo::new("/srv/r");
        assert_eq!(
            repo.backup_dir("20260102-030405F").unwrap(),
            Path::new("/srv/r/backup/20260102-030405F")
        );
        for bad in ["/tmp/victim", "..", "../../x", "a/b", "zz"] {
            assert!(repo.backup_dir(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_survey_refuses_labels_dated_beyond_the_allowed_clock_skew() {
        let dir = ScratchDir::new("reentry-repo-test").unwrap();
        let repo = Repo::new(dir.path());
        let now = humantime::parse_rfc3339("2026-01-02T04:00:00Z").unwrap();
        plant(
            dir.path(),
            "20260102-030405F",
            &label("20260102-030405F", None),
        );
        let mut skewed = label("20260102-040400F", None);
        skewed.start_time = "2026-01-02T04:04:00.000Z".into();
        skewed.stop_time = Some("2026-01-02T04:04:30.000Z".into());
        plant(dir.path(), "20260102-040400F", &skewed);
        let mut ahead = label("29990101-000000F", None);
        ahead.start_time = "2999-01-01T00:00:00.000Z".into();
        plant(dir.path(), "29990101-000000F", &ahead);
        let s = repo.survey(now).unwrap();
        let ids: Vec<&str> = s.labels.iter().map(|l| l.id.as_str()).collect();
        assert_eq!(ids, ["20260102-030405F", "20260102-040400F"]);
        assert_eq!(s.refused.len(), 1, "{:?}", s.refused);
        assert_eq!(s.refused[0].key, "backup/29990101-000000F/backup.json");
        assert!(
            s.refused[0].problem.contains("in the future"),
            "{}",
            s.refused[0]
        );
    }

    #[test]
    fn with_a_verify_key_only_signed_labels_are_read_and_others_are_refused_as_unsigned() {
        use crate::sign::{keygen, SigningKey, Trust};
        let dir = ScratchDir::new("reentry-repo-test").unwrap();
        let public = keygen(&dir.path().join("k.pem")).unwrap();
        let signer = Arc::new(SigningKey::from_file(&dir.path().join("k.pem")).unwrap());
        let with = |trust: Trust| {
            Repo::new(dir.path()).with_keys(Keys {
                trust,
                ..Keys::default()
            })
        };
        let writer = with(Trust {
            signer: Some(signer),
            verify: vec![],
        });
        let reader = with(Trust {
            signer: None,
            verify: vec![public],
        });
        let id = "20260102-030405F";
        writer.save_label(&label(id, None)).unwrap();
        let read = reader.label(id).unwrap();
        assert!(read.signature.is_some());
        // A verification recorded later, by a host with no signing key.
        let mut verified = read.clone();
        verified.verification = Some(crate::backup::label::Verification {
            status: crate::backup::label::VerifyStatus::Ok,
            at: "2026-01-03T00:00:00Z".into(),
            problems: vec![],
        });
        reader.save_verification(&verified).unwrap();
        assert_eq!(
            reader.label(id).unwrap().verification,
            verified.verification
        );

        // Unsigned; the signed label verbatim under another key; changed.
        plant(
            dir.path(),
            "20260102-030406F",
            &label("20260102-030406F", None),
        );
        let replayed = dir.path().join(BACKUP_DIR).join("20260102-030407F");
        fs::create_dir_all(&replayed).unwrap();
        let text = fs::read(dir.path().join(BACKUP_DIR).join(id).join(LABEL_FILE)).unwrap();
        fs::write(replayed.join(LABEL_FILE), &text).unwrap();
        let changed = String::from_utf8(text)
            .unwrap()
            .replace("\"size_bytes\": 1", "\"size_bytes\": 2");
        fs::write(
            dir.path().join(BACKUP_DIR).join(id).join(LABEL_FILE),
            changed,
        )
        .unwrap();
        for (key, says) in [
            ("20260102-030406F", "it is not signed"),
            ("20260102-030407F", "its signature does not verify"),
            (id, "its signature does not verify"),
        ] {
            let r = refusal(reader.label(key).unwrap_err());
            assert!(r.unsigned && r.problem.contains(says), "{key}: {r}");
        }
        // Without a key, an unencrypted repository reads them all as before.
        assert!(Repo::new(dir.path()).label("20260102-030406F").is_ok());
    }

    #[test]
    fn a_host_that_encrypts_or_decrypts_needs_a_verify_key_to_read_labels() {
        let dir = ScratchDir::new("reentry-repo-test").unwrap();
        let id = "20260102-030405F";
        plant(dir.path(), id, &label(id, None));
        let age = age::x25519::Identity::generate().to_public().to_string();
        let repo = Repo::new(dir.path()).with_keys(Keys {
            to: Some(crate::crypt::Recipients::parse(&[age], "test").unwrap()),
            ..Keys::default()
        });
        let e = repo.label(id).unwrap_err();
        assert!(matches!(e, RepoError::NeedVerifyKey { .. }), "{e}");
        assert!(e.to_string().contains("signing.verify-keys"), "{e}");
        // And with no key at all, a label that records encryption is not
        // taken on trust.
        let mut l = label(id, None);
        l.encryption = Some(crate::crypt::Encryption {
            algorithm: "age-x25519".into(),
            key_id: "0011223344556677".into(),
            recipients: vec![],
        });
        plant(dir.path(), id, &l);
        let r = refusal(Repo::new(dir.path()).label(id).unwrap_err());
        assert!(
            r.unsigned && r.problem.contains("records encryption"),
            "{r}"
        );
    }
}
