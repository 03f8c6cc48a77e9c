//! `reentry repo copy --to LOCATION`: a second copy of the repository, in
//! another bucket or region or on a local disk. It copies what the
//! destination lacks, checks every object before it leaves (a damaged one
//! is reported, not spread) and after it arrives (read back and compared
//! by BLAKE3), and writes each backup's label last, so a backup appears
//! at the destination whole or not at all.
//!
//! It resumes by itself: a killed copy leaves whole objects, which the next
//! run finds there and skips. A backup taken in a local directory goes to
//! object storage packed (packed.rs); the objects of one whose copy was
//! killed before its label are removed and packed again.
//!
//! Only labels that check out at the source are copied (`trusted_label`,
//! signature included): a planted one is named as a problem, not spread.
//! A label goes as it is, its signature with it; one packed on the way
//! is signed again, which needs the signing key.
//!
//! Each run is recorded in the source (`copies/<destination>.json`), which
//! `status` reads to show how far the copy is behind.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::backup::basebackup::now_rfc3339;
use crate::backup::label::LABEL_FILE;
use crate::backup::packed::{self, PackError};
use crate::backup::parts::{self, Manifest};
use crate::backup::repo::{Repo, RepoError, BACKUP_DIR, RESTORE_POINTS_DIR, RESTORE_POINTS_FILE};
use crate::backup::stored::{self, Algorithm, Checksum, Compression, Form};
use crate::backup::vouched::Vouched;
use crate::fsutil::TEMP_PREFIX;
use crate::progress::Progress;
use crate::reentry::steps::pause_point;
use crate::storage::{Put, Store, StoreError};

pub const COPIES_DIR: &str = "copies";

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Pack(#[from] PackError),
    #[error(transparent)]
    Repo(#[from] crate::backup::repo::RepoError),
    #[error(
        "backup {id} is packed on its way to {to}, which changes its label, and no signing key \
         is set to sign it again: pass --signing-key (or set signing.key-file); nothing was copied"
    )]
    NeedSigningKey { id: String, to: String },
    #[error("{to} is {from} itself: copy to another bucket, prefix or directory")]
    SameRepository { from: String, to: String },
    #[error("{location} arrived different from what was sent ({got}, sent {sent})")]
    Arrival {
        location: String,
        got: Checksum,
        sent: Checksum,
    },
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CopyReport {
    pub from: String,
    pub to: String,
    pub copied: usize,
    pub bytes: u64,
    /// Already at the destination with the same content.
    pub present: usize,
    /// Local backups packed into objects on the way.
    pub packed: Vec<String>,
    /// Objects not copied, and why: damaged at the source, or different
    /// content under the same key at the destination.
    pub problems: Vec<String>,
    /// What a run would copy (`--dry-run`), or what it did.
    pub dry_run: bool,
    pub missing: usize,
    pub missing_bytes: u64,
}

/// A copy run as the source records it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CopyRecord {
    pub to: String,
    pub at: String,
    /// The newest WAL segment at the destination after the run.
    pub newest_wal: Option<String>,
    pub backups: Vec<String>,
    pub problems: usize,
}

fn sha(b: &[u8]) -> Checksum {
    Checksum::of(Algorithm::Blake3, b)
}

/// Whether `key` holds the stored format (stored.rs) and can be checked.
fn is_stored(key: &str) -> bool {
    (key.starts_with("archive/") && !key.ends_with(".json"))
        || key.contains("/pack/")
        || key.ends_with(&format!("/{}", packed::MANIFEST_FILE))
}

/// The id of the backup `key` is under, if any.
fn backup_of(key: &str) -> Option<&str> {
    key.strip_prefix(&format!("{BACKUP_DIR}/"))?
        .split('/')
        .next()
}

/// The backup `key` is in the data directory of, and its path there.
fn data_path(key: &str) -> Option<(&str, PathBuf)> {
    let id = backup_of(key)?;
    let rel = key.strip_prefix(&Repo::backup_key(id, "data/"))?;
    Some((id, PathBuf::from(rel)))
}

pub fn record_key(to: &str) -> String {
    let name: String = to
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{COPIES_DIR}/{name}.json")
}

/// Copies what `to` lacks from `from`, `jobs` objects at a time. A local
/// backup is packed for object storage with `checksum`.
pub fn copy(
    from: &Repo,
    to: &Repo,
    jobs: usize,
    checksum: Algorithm,
    dry_run: bool,
    progress: &dyn Progress,
) -> Result<CopyReport, CopyError> {
    let (src, dst) = (from.store(), to.store());
    if src.location() == dst.location() {
        return Err(CopyError::SameRepository {
            from: src.location(),
            to: dst.location(),
        });
    }
    let mut report = CopyReport {
        from: src.location(),
        to: dst.location(),
        dry_run,
        ..CopyReport::default()
    };
    let there: BTreeSet<String> = dst.list("")?.into_iter().map(|o| o.key).collect();
    let labelled = |id: &str| there.contains(&Repo::backup_key(id, LABEL_FILE));

    // A local backup directory goes to object storage packed.
    let pack = from.local_root().is_some() && to.local_root().is_none();
    let mut objects = Vec::new();
    let mut labels = Vec::new();
    let mut to_pack = Vec::new();
    // The files of each local backup's data directory, and their sizes.
    let mut data_files: BTreeMap<String, Vec<(PathBuf, u64)>> = BTreeMap::new();
    for o in src.list("")? {
        let name = o.key.rsplit('/').next().unwrap_or_default();
        if name.starts_with(TEMP_PREFIX)
            || o.key.starts_with(&format!("{COPIES_DIR}/"))
            || o.key == RESTORE_POINTS_FILE
            || o.key.starts_with(&format!("{RESTORE_POINTS_DIR}/"))
        {
            continue;
        }
        let backup = backup_of(&o.key).map(str::to_owned);
        if let Some(id) = &backup {
            if o.key.ends_with(&format!("/{LABEL_FILE}")) && o.key.matches('/').count() == 2 {
                if !labelled(id) {
                    labels.push(o);
                }
                continue;
            }
            if labelled(id) && !o.key.contains("/verified/") {
                // The backup is there whole.
                continue;
            }
            if let Some(rel) = o.key.strip_prefix(&Repo::backup_key(id, "data/")) {
                data_files
                    .entry(id.clone())
                    .or_default()
                    .push((PathBuf::from(rel), o.size));
            }
            if pack && o.key.starts_with(&Repo::backup_key(id, "data/")) {
                if !to_pack.contains(id) {
                    to_pack.push(id.clone());
                }
                continue;
            }
        }
        if !there.contains(&o.key) {
            objects.push(o);
        }
    }
    // Labels only of backups that are complete at the source, and that
    // check out there: a planted one is named, never spread.
    let mut ready = Vec::new();
    let mut trusted = BTreeMap::new();
    for l in labels {
        let id = backup_of(&l.key).unwrap_or_default().to_owned();
        match from.trusted_label(&id) {
            Ok(b) if b.is_usable() => {
                trusted.insert(id, b);
                ready.push(l);
            }
            Ok(_) => {}
            Err(crate::backup::repo::RepoError::Untrusted { refused, .. }) => {
                report.problems.push(format!(
                    "{}/{} not copied: refused: {}",
                    src.location(),
                    refused.key,
                    refused.problem
                ));
            }
            Err(e) => return Err(e.into()),
        }
    }
    to_pack.retain(|id| ready.iter().any(|l| backup_of(&l.key) == Some(id)));
    // A local backup's data is what its label says: a plain directory
    // beside a packed backup's label, or a manifest it does not record,
    // stops the copy before anything is sent (or packed and signed anew).
    // A signed plain backup's manifest is read once, here: each of its
    // files is checked against it in the read that packs or sends it
    // (vouched.rs), and its pg_wal/ stays behind, as restore leaves it.
    let mut plains = BTreeMap::new();
    if from.local_root().is_some() {
        for (id, label) in &trusted {
            if let Some(p) = from.plain_backup(label)? {
                plains.insert(id.clone(), p);
            }
        }
    }
    // Sent as they are (to a local directory): no file the manifest does
    // not list, none it lists missing, before anything is sent.
    let checked: BTreeMap<&str, &Vouched> = plains
        .iter()
        .filter(|(id, _)| !to_pack.contains(*id))
        .filter_map(|(id, p)| Some((id.as_str(), p.vouched.as_ref()?)))
        .collect();
    for (id, v) in &checked {
        let mut seen = BTreeSet::new();
        for (rel, size) in data_files.get(*id).into_iter().flatten() {
            if Vouched::left_out(rel) || rel == Path::new(packed::MANIFEST_FILE) {
                continue;
            }
            v.size(rel, *size).map_err(RepoError::from)?;
            seen.insert(rel.clone());
        }
        v.all_present(&seen).map_err(RepoError::from)?;
    }
    objects.retain(|o| {
        !data_path(&o.key)
            .is_some_and(|(id, rel)| checked.contains_key(id) && Vouched::left_out(&rel))
    });
    // Nothing of a backup still being taken, or left by one that died.
    let copying = |id: &str| ready.iter().any(|l| backup_of(&l.key) == Some(id));
    objects.retain(|o| backup_of(&o.key).is_none_or(|id| labelled(id) || copying(id)));
    report.missing = objects.len() + ready.len() + to_pack.len();
    report.missing_bytes = objects.iter().chain(&ready).map(|o| o.size).sum::<u64>()
        + to_pack
            .iter()
            .filter_map(|id| trusted.get(id))
            .map(|l| l.size_bytes)
            .sum::<u64>();
    if dry_run {
        return Ok(report);
    }
    // A packed backup's label changes (its objects, its size): signed
    // again, or not at all where it must be.
    if to.keys().trust.signer.is_none() {
        if let Some(id) = to_pack
            .iter()
            .find(|id| to.keys().to.is_some() || trusted[*id].signature.is_some())
        {
            return Err(CopyError::NeedSigningKey {
                id: id.clone(),
                to: dst.location(),
            });
        }
    }

    progress.stage("copying", Some(report.missing_bytes));
    let done = AtomicU64::new(0);
    let problems = Mutex::new(Vec::new());
    let copied = AtomicU64::new(0);
    let present = AtomicU64::new(0);
    let send = |key: &str| -> Result<(), PackError> {
        let location = format!("{}/{key}", src.location());
        let Some(body) = src.get(key)? else {
            // Gone since the listing (expired): nothing to copy.
            return Ok(());
        };
        if let Some((v, rel)) = data_path(key).and_then(|(id, rel)| Some((*checked.get(id)?, rel)))
        {
            v.check_whole(&rel, &body).map_err(RepoError::from)?;
        }
        if is_stored(key) {
            // A manifest of parts is checked as one; its parts, which went
            // before it, each as a stored file.
            let checked = if parts::is_manifest(&body) {
                Manifest::decode(&body)
                    .map(|_| ())
                    .map_err(stored::ReadError::Corrupt)
            } else {
                stored::check(body.as_slice()).map(|_| ())
            };
            if let Err(e) = checked {
                let why = match e {
                    stored::ReadError::Corrupt(d) => d,
                    stored::ReadError::Io(e) => e.to_string(),
                    stored::ReadError::Key(e) => e.to_string(),
                };
                problems
                    .lock()
                    .expect("no panic holding it")
                    .push(format!("{location} is damaged, not copied: {why}"));
                return Ok(());
            }
        }
        let sent = sha(&body);
        match dst.put_if_absent(key, &body)? {
            Put::Created => {
                if copied.fetch_add(1, Ordering::Relaxed) == 0 {
                    pause_point("copy", "object");
                }
            }
            Put::Exists => {
                present.fetch_add(1, Ordering::Relaxed);
            }
        }
        let back = dst.get(key)?.unwrap_or_default();
        let got = sha(&back);
        if got != sent {
            problems.lock().expect("no panic holding it").push(
                CopyError::Arrival {
                    location: format!("{}/{key}", dst.location()),
                    got,
                    sent,
                }
                .to_string(),
            );
        }
        let n = done.fetch_add(body.len() as u64, Ordering::Relaxed) + body.len() as u64;
        progress.advance(n, key);
        Ok(())
    };
    // Everything not of a backup first (WAL parts before the manifests that
    // publish them, as a push writes them); then backup by backup, its
    // objects and then its label. A backup is visible at the destination
    // only whole, and its objects never wait long for their label: expire
    // takes a backup's objects that have had no label for an hour as
    // abandoned.
    let (backup_objects, objects): (Vec<_>, Vec<_>) = objects
        .into_iter()
        .partition(|o| backup_of(&o.key).is_some());
    let (part_objects, objects): (Vec<_>, Vec<_>) = objects
        .into_iter()
        .partition(|o| parts::owner(&o.key).is_some());
    packed::parallel(part_objects.len(), jobs, |i| send(&part_objects[i].key))?;
    packed::parallel(objects.len(), jobs, |i| send(&objects[i].key))?;
    // Restore points, in whichever form each side keeps them.
    let have = to.restore_points()?;
    for p in from.restore_points()? {
        if !have.contains(&p) {
            to.add_restore_point(&p)?;
            copied.fetch_add(1, Ordering::Relaxed);
        }
    }
    let form = Form {
        compression: Compression::Zstd,
        level: 3,
        checksum,
    };
    // New objects of backups already there (verifications) go as they are.
    let loose: Vec<_> = backup_objects
        .iter()
        .filter(|o| !copying(backup_of(&o.key).unwrap_or_default()))
        .collect();
    packed::parallel(loose.len(), jobs, |i| send(&loose[i].key))?;
    let mut first_label = true;
    for l in &ready {
        let id = backup_of(&l.key).unwrap_or_default();
        if to_pack.iter().any(|p| p == id) {
            // A copy killed before this backup's label left some of its
            // objects: nothing shows them; start the backup again.
            for o in dst.list(&Repo::backup_key(id, ""))? {
                dst.delete(&o.key)?;
            }
            let plain = &plains[id];
            let up = packed::upload(
                dst,
                id,
                &plain.data,
                plain.vouched.as_ref(),
                form,
                to.keys(),
                jobs,
                progress,
            )
            .map_err(|e| refused(dst, id, e))?;
            report.bytes += up.index.stored_bytes();
            report.packed.push(id.to_owned());
            let label = trusted.get_mut(id).expect("a ready backup's label");
            label.stored_bytes = Some(up.index.stored_bytes());
            label.objects = up.objects;
        } else {
            let mine: Vec<_> = backup_objects
                .iter()
                .filter(|o| backup_of(&o.key) == Some(id))
                .collect();
            packed::parallel(mine.len(), jobs, |i| send(&mine[i].key))
                .map_err(|e| refused(dst, id, e))?;
        }
        if std::mem::take(&mut first_label) {
            pause_point("copy", "labels");
        }
        if to_pack.iter().any(|p| p == id) {
            let mut label = trusted[id].clone();
            label.encryption = to.keys().to.as_ref().map(|r| r.describe());
            label.verification = None;
            label.signature = None;
            let label = to.signed(&label);
            let mut text = serde_json::to_vec_pretty(&label).expect("a label serializes");
            text.push(b'\n');
            if dst.put_if_absent(&l.key, &text)? == Put::Created {
                copied.fetch_add(1, Ordering::Relaxed);
            }
        } else {
            send(&l.key)?;
        }
    }
    report.copied = copied.into_inner() as usize;
    report.present = present.into_inner() as usize;
    report.bytes += done.into_inner();
    report
        .problems
        .extend(problems.into_inner().expect("no panic holding it"));
    progress.finish();

    let newest_wal = to.archive().list().ok().and_then(|l| {
        l.files
            .iter()
            .map(|f| f.to_string())
            .filter(|f| f.len() == 24)
            .max()
    });
    let record = CopyRecord {
        to: dst.location(),
        at: now_rfc3339(),
        newest_wal,
        backups: to
            .backups()
            .map(|b| b.into_iter().map(|l| l.id).collect())
            .unwrap_or_default(),
        problems: report.problems.len(),
    };
    let mut text = serde_json::to_vec_pretty(&record).expect("a record serializes");
    text.push(b'\n');
    src.put(&record_key(&dst.location()), &text)?;
    Ok(report)
}

/// A refusal of backup `id`'s files (vouched.rs) removes what of the
/// backup reached `dst`: without its label none of it is of use, and
/// nothing of a refused backup is left to be taken for one.
fn refused(dst: &dyn Store, id: &str, e: PackError) -> CopyError {
    match e {
        PackError::Repo(e) if e.refuses_files() => {
            if let Ok(objects) = dst.list(&Repo::backup_key(id, "")) {
                for o in objects {
                    let _ = dst.delete(&o.key);
                }
            }
            CopyError::Repo(e)
        }
        e => e.into(),
    }
}

/// The copies recorded in `repo`, newest run of each destination.
pub fn records(store: &dyn Store) -> Vec<CopyRecord> {
    store
        .list(&format!("{COPIES_DIR}/"))
        .unwrap_or_default()
        .into_iter()
        .filter_map(|o| serde_json::from_slice(&store.get(&o.key).ok()??).ok())
        .collect()
}
