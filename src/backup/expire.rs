//! `reentry backup expire`: retention by the number of full backups and/or
//! their age. The plan is a pure function of the labels, the archive listing
//! and the clock; `--apply` carries out exactly that plan. A backup that a
//! kept backup depends on is kept, and so is all WAL from the start of the
//! oldest kept backup on: its consistency and its PITR window need it.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::backup::archive::{Archive, ArchiveError};
use crate::backup::label::{BackupLabel, BackupStatus, BackupType};
use crate::backup::packed;
use crate::backup::repo::{io_err, Refused, Repo, RepoError, BACKUP_DIR};
use crate::fsutil;
use crate::pg::wal::{SegmentName, WalFileName};

#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub retain_full: Option<usize>,
    pub retain_days: Option<f64>,
    /// Grandfather-father-son: the newest backup of each of the last N
    /// days, ISO weeks, months and years (UTC) that have one.
    pub keep_daily: Option<usize>,
    pub keep_weekly: Option<usize>,
    pub keep_monthly: Option<usize>,
    pub keep_yearly: Option<usize>,
    /// With classes: every WAL file of the newest N days is kept, so that
    /// any moment of them can be restored [default: keep_daily, else 0:
    /// from the newest backup on]. Older WAL is kept only from each kept
    /// backup's start to its stop.
    pub pitr_days: Option<f64>,
    /// On object storage: a backup's objects with no label, none written
    /// for this long, are from a backup, copy or expire that died.
    pub abandoned_after: Option<Duration>,
}

impl Policy {
    fn has_classes(&self) -> bool {
        self.keep_daily.is_some()
            || self.keep_weekly.is_some()
            || self.keep_monthly.is_some()
            || self.keep_yearly.is_some()
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Decision {
    pub id: String,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExpirePlan {
    pub keep: Vec<Decision>,
    pub expire: Vec<Decision>,
    /// WAL files to delete, oldest first.
    pub expire_wal: Vec<String>,
    /// The first segment kept: the start of the oldest kept backup.
    pub wal_kept_from: Option<String>,
    /// Which WAL is deleted, in words.
    pub wal_rule: String,
    /// WAL files the plan would delete that the bucket's Object Lock still
    /// holds: left for a later run.
    pub wal_locked: usize,
    pub wal_locked_until: Option<String>,
    /// The bucket's versioning and Object Lock, on object storage.
    pub protection: Option<crate::storage::Protection>,
    /// On object storage: objects of backups that never got their label,
    /// or lost it to an expire that died; deleted with the plan.
    pub abandoned: Vec<Abandoned>,
    /// Labels no verify key vouches for: not written by the backup host
    /// as far as this host can tell (or written before it signed labels).
    /// Left alone: neither deleted nor counted; their WAL is kept
    /// (`ignored_wal`).
    pub ignored: Vec<Refused>,
    /// The WAL kept for each ignored label: from the first segment it
    /// needs on. Not vouched for, but deleting WAL cannot be undone, and
    /// it may be a genuine backup's taken before labels were signed; a
    /// planted label can only make expire keep more, never delete more.
    pub ignored_wal: Vec<IgnoredWal>,
    pub applied: bool,
}

/// The WAL kept for a label that is ignored.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct IgnoredWal {
    /// Where the label is.
    pub key: String,
    /// The first segment its backup needs: it and every later one are
    /// kept. None when its text does not read as a label at all: no
    /// reentry could restore it.
    pub kept_from: Option<String>,
}

/// A backup's objects without its label: invisible to every command, and
/// never to be completed.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Abandoned {
    pub id: String,
    pub objects: usize,
    pub bytes: u64,
    /// When the newest of them was written.
    pub last_written: Option<String>,
    /// Object Lock still holds one of them until then: kept until it ends.
    pub locked_until: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExpireError {
    #[error(
        "no retention policy: pass --retain-full N, --retain-days D, or classes \
         (--keep-daily, --keep-weekly, --keep-monthly, --keep-yearly)"
    )]
    NoPolicy,
    #[error(
        "refusing to expire anything: {} in {repo} cannot be trusted, and retention \
         computed with {} could delete genuine backups and their WAL:{}\n\
         nothing was deleted; a person must look at each (it may have been planted), \
         then remove or fix it and run expire again",
        if refused.len() == 1 { "a backup label".to_owned() } else { format!("{} backup labels", refused.len()) },
        if refused.len() == 1 { "it" } else { "them" },
        refused.iter().map(|r| format!("\n  {r}")).collect::<String>()
    )]
    Untrusted { repo: String, refused: Vec<Refused> },
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error(transparent)]
    Pack(#[from] crate::backup::packed::PackError),
}

fn age_days(label: &BackupLabel, now: SystemTime) -> f64 {
    let when = label.stop_time.as_deref().unwrap_or(&label.start_time);
    humantime::parse_rfc3339(when)
        .ok()
        .and_then(|t| now.duration_since(t).ok())
        .unwrap_or(Duration::ZERO)
        .as_secs_f64()
        / 86_400.0
}

/// The full backup at the bottom of `l`'s chain.
fn root_of(by_id: &BTreeMap<&str, &BackupLabel>, l: &BackupLabel) -> String {
    let mut cur = l;
    while let Some(p) = cur.parent.as_deref().and_then(|p| by_id.get(p)) {
        cur = p;
    }
    cur.id.clone()
}

pub fn plan(
    labels: &[BackupLabel],
    wal: &[WalFileName],
    seg_size: u32,
    policy: &Policy,
    now: SystemTime,
) -> Result<ExpirePlan, ExpireError> {
    if policy.retain_full.is_none() && policy.retain_days.is_none() && !policy.has_classes() {
        return Err(ExpireError::NoPolicy);
    }
    let by_id: BTreeMap<&str, &BackupLabel> = labels.iter().map(|l| (l.id.as_str(), l)).collect();
    let root = |l: &BackupLabel| root_of(&by_id, l);

    let mut keep: BTreeMap<String, String> = BTreeMap::new();
    let mut fulls: Vec<&BackupLabel> = labels
        .iter()
        .filter(|l| l.is_usable() && l.kind == BackupType::Full)
        .collect();
    // Start LSNs order a cluster's backups strictly; clocks do not.
    fulls.sort_by_key(|f| std::cmp::Reverse(f.start_lsn));
    for (i, full) in fulls.iter().enumerate() {
        let reason = if i == 0 {
            Some("the newest full backup".to_owned())
        } else if policy.retain_full.is_some_and(|n| i < n) {
            Some(format!(
                "one of the {} newest full backups",
                policy.retain_full.unwrap()
            ))
        } else if policy.retain_days.is_some_and(|d| age_days(full, now) <= d) {
            Some(format!("younger than {} days", policy.retain_days.unwrap()))
        } else {
            None
        };
        if let Some(r) = reason {
            keep.insert(full.id.clone(), r);
        }
    }
    let classes = policy.has_classes();
    if classes {
        for (id, why) in gfs(labels, policy) {
            keep.entry(id)
                .and_modify(|r| {
                    r.push_str("; ");
                    r.push_str(&why)
                })
                .or_insert(why);
        }
    }
    // Anything newer than the oldest kept full backup is kept too: retention
    // counts full backups, it does not delete what was taken after them.
    // Classes pick backups one by one instead.
    let oldest_kept = fulls
        .iter()
        .filter(|f| keep.contains_key(&f.id))
        .filter_map(|f| f.start_lsn)
        .min();
    for l in labels
        .iter()
        .filter(|l| !classes && l.is_usable() && l.kind == BackupType::Incremental)
    {
        if oldest_kept.is_some_and(|o| l.start_lsn >= Some(o)) {
            keep.insert(
                l.id.clone(),
                "newer than the oldest kept full backup".to_owned(),
            );
        }
    }
    // Whatever a kept backup depends on stays, however the chain was built.
    let kept_ids: Vec<String> = keep.keys().cloned().collect();
    for id in kept_ids {
        let mut cur = by_id[id.as_str()];
        while let Some(p) = cur.parent.as_deref().and_then(|p| by_id.get(p)) {
            keep.entry(p.id.clone())
                .or_insert_with(|| format!("kept backup {id} depends on it"));
            cur = p;
        }
    }
    let newest_usable = labels
        .iter()
        .filter(|l| l.is_usable())
        .map(|l| l.start_time.as_str())
        .max();
    let mut expire = Vec::new();
    for l in labels {
        if keep.contains_key(&l.id) {
            continue;
        }
        let reason = match l.status {
            BackupStatus::Complete if l.kind == BackupType::Incremental => {
                format!(
                    "older than the oldest kept full backup; its chain starts at {}",
                    root(l)
                )
            }
            BackupStatus::Complete => match (policy.retain_full, policy.retain_days) {
                (Some(n), Some(d)) => {
                    format!("not one of the {n} newest full backups, and older than {d} days")
                }
                (Some(n), None) => format!("not one of the {n} newest full backups"),
                (None, Some(d)) => format!("older than {d} days"),
                (None, None) => "kept by no class".to_owned(),
            },
            // An attempt newer than every usable backup may still be running.
            _ if newest_usable.is_none_or(|n| l.start_time.as_str() > n) => {
                keep.insert(
                    l.id.clone(),
                    "the newest attempt, maybe still running".into(),
                );
                continue;
            }
            BackupStatus::Failed => format!(
                "failed: {}",
                l.failure.as_deref().unwrap_or("no reason recorded")
            ),
            BackupStatus::Running => "never completed, and a newer backup did".to_owned(),
        };
        expire.push(Decision {
            id: l.id.clone(),
            reason,
        });
    }

    let first_kept = labels
        .iter()
        .filter(|l| l.is_usable() && keep.contains_key(&l.id))
        .flat_map(|l| l.wal_ranges.iter().map(|r| r.start_lsn.segno(seg_size)))
        .min();
    let segno = |w: &WalFileName| {
        w.segment_with_header().or(match w {
            WalFileName::Backup(s, _) => Some(*s),
            _ => None,
        })
    };
    // With classes, continuous WAL starts at the newest kept backup that
    // stopped before the PITR window opened; before it, only each kept
    // backup's own stretch is kept.
    let mut pitr_days = 0.0;
    let (continuous_from, stretches) = if classes {
        let days = policy
            .pitr_days
            .or(policy.keep_daily.map(|d| d as f64))
            .unwrap_or(0.0);
        pitr_days = days;
        let kept: Vec<&BackupLabel> = labels
            .iter()
            .filter(|l| l.is_usable() && keep.contains_key(&l.id))
            .collect();
        let base = kept
            .iter()
            .filter(|l| age_days(l, now) >= days)
            .max_by_key(|l| l.start_lsn)
            .or_else(|| kept.iter().min_by_key(|l| l.start_lsn));
        let from = base.and_then(|b| {
            b.wal_ranges
                .iter()
                .map(|r| r.start_lsn.segno(seg_size))
                .min()
        });
        let stretches: Vec<(u64, u64)> = kept
            .iter()
            .flat_map(|l| {
                l.wal_ranges
                    .iter()
                    .map(|r| (r.start_lsn.segno(seg_size), r.end_lsn.segno(seg_size)))
            })
            .collect();
        (from, stretches)
    } else {
        (first_kept, Vec::new())
    };
    let expire_wal = match continuous_from {
        // Without a kept backup no WAL is useful, but none is deleted either:
        // that is a decision for a person.
        None => Vec::new(),
        Some(first) => wal
            .iter()
            .filter(|w| {
                segno(w).is_some_and(|s| {
                    let n = s.segno(seg_size);
                    n < first && !stretches.iter().any(|(a, b)| (*a..=*b).contains(&n))
                })
            })
            .map(|w| w.to_string())
            .collect(),
    };
    let first_kept = continuous_from;
    let wal_kept_from = first_kept.map(|n| {
        let tli = labels
            .iter()
            .filter(|l| keep.contains_key(&l.id))
            .filter_map(|l| l.timeline)
            .min()
            .unwrap_or(1);
        crate::pg::wal::SegmentName::from_segno(tli, n, seg_size).to_string()
    });
    let from = wal_kept_from.as_deref().unwrap_or("?");
    let wal_rule = if classes {
        format!(
            "before {from}, where continuous PITR for the newest {pitr_days} days starts, \
             except each kept backup's own WAL from its start to its stop"
        )
    } else {
        format!("before {from}, the start of the oldest kept backup")
    };
    let keep = labels
        .iter()
        .filter_map(|l| {
            keep.get(&l.id).map(|r| Decision {
                id: l.id.clone(),
                reason: r.clone(),
            })
        })
        .collect();
    Ok(ExpirePlan {
        abandoned: Vec::new(),
        ignored: Vec::new(),
        ignored_wal: Vec::new(),
        keep,
        expire,
        expire_wal,
        wal_kept_from,
        wal_rule,
        wal_locked: 0,
        wal_locked_until: None,
        protection: None,
        applied: false,
    })
}

/// The backups each class keeps, and why: the newest usable backup in
/// each of the newest N periods (UTC days, ISO weeks, months, years) that
/// have one.
fn gfs(labels: &[BackupLabel], policy: &Policy) -> Vec<(String, String)> {
    use jiff::tz::TimeZone;
    let mut dated: Vec<(&BackupLabel, jiff::civil::Date)> = labels
        .iter()
        .filter(|l| l.is_usable())
        .filter_map(|l| {
            let when = l.stop_time.as_deref().unwrap_or(&l.start_time);
            let t: jiff::Timestamp = when.parse().ok()?;
            Some((l, t.to_zoned(TimeZone::UTC).date()))
        })
        .collect();
    // Newest first: start LSNs order a cluster's backups strictly.
    dated.sort_by_key(|(l, _)| std::cmp::Reverse(l.start_lsn));
    let mut out = Vec::new();
    type Period = fn(jiff::civil::Date) -> String;
    let classes: [(&str, Option<usize>, Period); 4] = [
        ("daily", policy.keep_daily, |d| d.to_string()),
        ("weekly", policy.keep_weekly, |d| {
            let w = d.iso_week_date();
            format!("{}-W{:02}", w.year(), w.week())
        }),
        ("monthly", policy.keep_monthly, |d| {
            format!("{}-{:02}", d.year(), d.month())
        }),
        ("yearly", policy.keep_yearly, |d| d.year().to_string()),
    ];
    for (name, n, period) in classes {
        let Some(n) = n else { continue };
        let mut seen: Vec<String> = Vec::new();
        for (l, date) in &dated {
            let p = period(*date);
            if seen.contains(&p) {
                continue;
            }
            if seen.len() == n {
                break;
            }
            seen.push(p.clone());
            out.push((l.id.clone(), format!("{name} {p}")));
        }
    }
    out
}

/// Plans against the repository as it is now.
pub fn plan_for(repo: &Repo, policy: &Policy) -> Result<ExpirePlan, ExpireError> {
    let archive = repo.archive();
    let seg_size = archive
        .info()?
        .and_then(|i| i.wal_segment_size)
        .unwrap_or(16 << 20);
    let now = SystemTime::now();
    // Retention decides from the labels alone: one that does not check
    // out stops it before it plans anything. One no verify key vouches
    // for was not written by the backup host: it is left out, and left
    // alone.
    let survey = repo.survey(now)?;
    let (ignored, refused): (Vec<Refused>, Vec<Refused>) =
        survey.refused.into_iter().partition(|r| r.unsigned);
    if !refused.is_empty() {
        return Err(ExpireError::Untrusted {
            repo: repo.location(),
            refused,
        });
    }
    for r in &ignored {
        tracing::warn!(repo = %repo.location(), label = %r.key, problem = %r.problem,
            "backup label ignored: no verify key vouches for it; not counted, not deleted, its WAL kept; a person must look");
    }
    let mut p = plan(
        &survey.labels,
        &archive.list()?.files,
        seg_size,
        policy,
        now,
    )?;
    keep_wal_of_ignored(repo, &mut p, &ignored, seg_size);
    p.ignored = ignored;
    let protection = repo.store().protection().map_err(RepoError::from)?;
    if repo.local_root().is_none() {
        p.abandoned = abandoned(repo, policy, protection.as_ref(), now)?;
    }
    let Some(protection) = protection else {
        return Ok(p);
    };
    // Under Object Lock, an object cannot be deleted until its retention
    // ends: plan around it rather than try. A backup stays whole until all
    // of its objects may go; WAL files go one by one.
    let show = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    if protection.default_retention.is_some() {
        let store = repo.store();
        let mut still = Vec::new();
        for d in std::mem::take(&mut p.expire) {
            let until = store
                .list(&Repo::backup_key(&d.id, ""))
                .map_err(RepoError::from)?
                .iter()
                .filter_map(|o| protection.locked_until(o.modified, now))
                .max();
            match until {
                Some(t) => p.keep.push(Decision {
                    id: d.id,
                    reason: format!(
                        "{}; but under Object Lock until {}, so kept until then",
                        d.reason,
                        show(t)
                    ),
                }),
                None => still.push(d),
            }
        }
        p.expire = still;
        let modified: BTreeMap<String, Option<SystemTime>> = store
            .list("archive/")
            .map_err(RepoError::from)?
            .into_iter()
            .filter_map(|o| {
                let name = o.key.rsplit('/').next()?.to_owned();
                Some((name, o.modified))
            })
            .collect();
        let mut latest = None;
        p.expire_wal.retain(|w| {
            match protection.locked_until(modified.get(w).copied().flatten(), now) {
                Some(t) => {
                    latest = latest.max(Some(t));
                    p.wal_locked += 1;
                    false
                }
                None => true,
            }
        });
        p.wal_locked_until = latest.map(show);
    }
    p.protection = Some(protection);
    Ok(p)
}

/// Keeps the WAL each ignored label needs: every segment from its start
/// on (whatever the timeline: more is kept, never less). Its text is
/// read as a label, unvouched, only for where its WAL starts.
fn keep_wal_of_ignored(repo: &Repo, p: &mut ExpirePlan, ignored: &[Refused], seg_size: u32) {
    let mut floor: Option<SegmentName> = None;
    for r in ignored {
        let start = repo.unvouched_label(&r.key).and_then(|l| {
            let ranges = l.wal_ranges.iter().map(|w| (w.timeline, w.start_lsn));
            let start = l.timeline.zip(l.start_lsn);
            ranges
                .chain(start)
                .map(|(tli, lsn)| SegmentName::from_segno(tli, lsn.segno(seg_size), seg_size))
                .min_by_key(|s| s.segno(seg_size))
        });
        if let Some(s) = start {
            if floor.is_none_or(|f| s.segno(seg_size) < f.segno(seg_size)) {
                floor = Some(s);
            }
        }
        p.ignored_wal.push(IgnoredWal {
            key: r.key.clone(),
            kept_from: start.map(|s| s.to_string()),
        });
    }
    let Some(floor) = floor else { return };
    let n = floor.segno(seg_size);
    p.expire_wal.retain(|name| {
        let Ok(w) = WalFileName::parse(name) else {
            return false;
        };
        let s = w.segment_with_header().or(match w {
            WalFileName::Backup(s, _) => Some(s),
            _ => None,
        });
        s.is_some_and(|s| s.segno(seg_size) < n)
    });
    let lower = p.wal_kept_from.as_deref().and_then(|k| {
        let k = WalFileName::parse(k).ok()?.segment_with_header()?;
        Some(k.segno(seg_size) > n)
    });
    if !lower.unwrap_or(true) {
        return;
    }
    p.wal_kept_from = Some(floor.to_string());
    p.wal_rule = format!(
        "{}; none from {floor} on, the start of the oldest ignored label's WAL: it is not \
         vouched for, but deleting WAL cannot be undone (a planted label can only make \
         expire keep more, never delete more)",
        p.wal_rule
    );
}

/// On object storage, the backups whose objects have no label and none
/// of which was written within `policy.abandoned_after` (default 1 hour:
/// a backup uploads its pieces one after another, and its label right
/// after the last).
fn abandoned(
    repo: &Repo,
    policy: &Policy,
    protection: Option<&crate::storage::Protection>,
    now: SystemTime,
) -> Result<Vec<Abandoned>, ExpireError> {
    let after = policy.abandoned_after.unwrap_or(Duration::from_secs(3600));
    let under = format!("{BACKUP_DIR}/");
    let mut by_id: BTreeMap<String, Vec<crate::storage::ObjectInfo>> = BTreeMap::new();
    for o in repo.store().list(&under).map_err(RepoError::from)? {
        let Some(id) = o.key[under.len()..].split('/').next() else {
            continue;
        };
        by_id.entry(id.to_owned()).or_default().push(o);
    }
    let show = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    let mut out = Vec::new();
    for (id, objects) in by_id {
        let label = Repo::backup_key(&id, crate::backup::label::LABEL_FILE);
        if objects.iter().any(|o| o.key == label) {
            continue;
        }
        let newest = objects.iter().filter_map(|o| o.modified).max();
        let quiet = newest
            .and_then(|t| now.duration_since(t).ok())
            .is_some_and(|age| age >= after);
        if !quiet {
            continue;
        }
        let locked_until = protection.and_then(|p| {
            objects
                .iter()
                .filter_map(|o| p.locked_until(o.modified, now))
                .max()
        });
        out.push(Abandoned {
            id,
            objects: objects.len(),
            bytes: objects.iter().map(|o| o.size).sum(),
            last_written: newest.map(show),
            locked_until: locked_until.map(show),
        });
    }
    Ok(out)
}

/// Deletes what `plan` expires. A backup is first renamed aside, so a crash
/// never leaves a half-deleted backup that looks usable; leftovers of an
/// earlier crash are removed first.
pub fn apply(repo: &Repo, plan: &mut ExpirePlan) -> Result<(), ExpireError> {
    let Some(root) = repo.local_root() else {
        // On object storage the label goes first: the backup stops being
        // visible before any of its objects is deleted.
        for d in &plan.expire {
            packed::delete(repo.store(), &d.id)?;
            tracing::info!(id = %d.id, reason = %d.reason, "backup expired");
        }
        for a in plan.abandoned.iter().filter(|a| a.locked_until.is_none()) {
            packed::delete(repo.store(), &a.id)?;
            tracing::info!(id = %a.id, objects = a.objects, "abandoned objects deleted");
        }
        return apply_wal(repo, plan);
    };
    let backups = root.join(BACKUP_DIR);
    if let Ok(entries) = std::fs::read_dir(&backups) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(".expiring-") {
                std::fs::remove_dir_all(e.path()).map_err(io_err("remove", &e.path()))?;
            }
        }
    }
    for d in &plan.expire {
        let dir = repo.backup_dir(&d.id)?;
        let aside = backups.join(format!(".expiring-{}", d.id));
        std::fs::rename(&dir, &aside).map_err(io_err("rename", &dir))?;
        fsutil::sync_dir(&backups).map_err(io_err("fsync", &backups))?;
        std::fs::remove_dir_all(&aside).map_err(io_err("remove", &aside))?;
        tracing::info!(id = %d.id, reason = %d.reason, "backup expired");
    }
    apply_wal(repo, plan)
}

fn apply_wal(repo: &Repo, plan: &mut ExpirePlan) -> Result<(), ExpireError> {
    let archive: Archive = repo.archive();
    for name in &plan.expire_wal {
        let wal = WalFileName::parse(name).expect("planned from parsed names");
        archive.remove(&wal)?;
    }
    plan.applied = true;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::label::{WalRange, LABEL_FORMAT};
    use crate::pg::lsn::Lsn;
    use crate::pg::wal::SegmentName;

    const SEG: u32 = 16 << 20;
    const DAY: u64 = 86_400;

    fn now() -> SystemTime {
        humantime::parse_rfc3339("2026-11-25T12:00:00Z").unwrap()
    }

    /// A backup taken `days_ago`, whose WAL starts in segment `segno`.
    fn label(id: &str, parent: Option<&str>, days_ago: u64, segno: u64) -> BackupLabel {
        let at = humantime::format_rfc3339_seconds(now() - Duration::from_secs(days_ago * DAY))
            .to_string();
        let start = Lsn(segno * u64::from(SEG) + 40);
        BackupLabel {
            format: LABEL_FORMAT,
            id: id.into(),
            cluster_name: "c".into(),
            pg_version: 18,
            system_identifier: "1".into(),
            kind: if parent.is_some() {
                BackupType::Incremental
            } else {
                BackupType::Full
            },
            parent: parent.map(Into::into),
            status: BackupStatus::Complete,
            failure: None,
            start_lsn: Some(start),
            stop_lsn: Some(Lsn(start.0 + 1000)),
            timeline: Some(1),
            wal_ranges: vec![WalRange {
                timeline: 1,
                start_lsn: start,
                end_lsn: Lsn(start.0 + 1000),
            }],
            wal_segment_size: SEG,
            start_time: at.clone(),
            stop_time: Some(at),
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

    fn wal(segnos: std::ops::Range<u64>) -> Vec<WalFileName> {
        segnos
            .map(|n| WalFileName::Segment(SegmentName::from_segno(1, n, SEG)))
            .collect()
    }

    fn ids(d: &[Decision]) -> Vec<&str> {
        d.iter().map(|d| d.id.as_str()).collect()
    }

    fn full(n: usize) -> Policy {
        Policy {
            retain_full: Some(n),
            ..Policy::default()
        }
    }

    #[test]
    fn without_a_policy_nothing_is_planned() {
        assert!(matches!(
            plan(&[], &[], SEG, &Policy::default(), now()),
            Err(ExpireError::NoPolicy)
        ));
    }

    #[test]
    fn keeps_the_newest_full_backups_and_the_wal_from_the_oldest_kept_start() {
        let labels = [
            label("F1", None, 30, 2),
            label("F2", None, 20, 10),
            label("F3", None, 10, 20),
        ];
        let p = plan(&labels, &wal(1..30), SEG, &full(2), now()).unwrap();
        assert_eq!(ids(&p.keep), ["F2", "F3"]);
        assert_eq!(ids(&p.expire), ["F1"]);
        assert_eq!(
            p.expire_wal,
            wal(1..10).iter().map(|w| w.to_string()).collect::<Vec<_>>()
        );
        assert_eq!(p.wal_kept_from.as_deref(), Some("00000001000000000000000A"));
    }

    #[test]
    fn an_incremental_expires_with_its_old_chain_but_a_newer_one_keeps_that_chain() {
        let mut labels = vec![
            label("F1", None, 30, 2),
            label("I1", Some("F1"), 25, 5),
            label("F2", None, 20, 10),
        ];
        let p = plan(&labels, &wal(1..30), SEG, &full(1), now()).unwrap();
        assert_eq!(ids(&p.expire), ["F1", "I1"]);

        labels.push(label("I2", Some("I1"), 5, 25));
        let p = plan(&labels, &wal(1..30), SEG, &full(1), now()).unwrap();
        assert!(p.expire.is_empty(), "{:?}", p.expire);
        assert!(p
            .keep
            .iter()
            .any(|d| d.id == "F1" && d.reason.contains("depends on it")));
        assert!(p
            .expire_wal
            .iter()
            .all(|w| w.as_str() < "000000010000000000000002"));
    }

    #[test]
    fn backups_taken_in_the_same_second_are_ordered_by_their_start_lsn() {
        let mut i2 = label("I2", Some("F1"), 1, 25);
        let mut f3 = label("F3", None, 1, 26);
        f3.start_time = i2.start_time.clone();
        i2.stop_time = f3.stop_time.clone();
        let labels = [label("F1", None, 30, 2), i2, f3];
        let p = plan(&labels, &[], SEG, &full(1), now()).unwrap();
        assert_eq!(ids(&p.keep), ["F3"]);
        assert_eq!(ids(&p.expire), ["F1", "I2"]);
    }

    #[test]
    fn age_keeps_young_full_backups_and_never_the_last_one_away() {
        let labels = [
            label("F1", None, 30, 2),
            label("F2", None, 10, 10),
            label("F3", None, 3, 20),
        ];
        let days = Policy {
            retain_full: None,
            retain_days: Some(7.0),
            ..Policy::default()
        };
        assert_eq!(
            ids(&plan(&labels, &[], SEG, &days, now()).unwrap().expire),
            ["F1", "F2"]
        );
        let zero = Policy {
            retain_full: None,
            retain_days: Some(0.0),
            ..Policy::default()
        };
        assert_eq!(
            ids(&plan(&labels, &[], SEG, &zero, now()).unwrap().keep),
            ["F3"],
            "the newest full stays"
        );
        let either = Policy {
            retain_full: Some(2),
            retain_days: Some(7.0),
            ..Policy::default()
        };
        assert_eq!(
            ids(&plan(&labels, &[], SEG, &either, now()).unwrap().keep),
            ["F2", "F3"]
        );
    }

    #[test]
    fn failed_attempts_go_once_a_newer_backup_succeeded_and_the_newest_attempt_stays() {
        let mut old_fail = label("X1", None, 15, 5);
        old_fail.status = BackupStatus::Failed;
        let mut new_try = label("X2", None, 1, 30);
        new_try.status = BackupStatus::Running;
        let labels = [
            label("F1", None, 20, 2),
            old_fail,
            label("F2", None, 10, 10),
            new_try,
        ];
        let p = plan(&labels, &[], SEG, &full(2), now()).unwrap();
        assert_eq!(ids(&p.expire), ["X1"]);
        assert!(p
            .keep
            .iter()
            .any(|d| d.id == "X2" && d.reason.contains("running")));
    }

    #[test]
    fn classes_keep_the_newest_backup_of_each_period_and_only_its_wal_before_the_pitr_window() {
        // A backup a day for 60 days (now is Wednesday 2026-11-25), WAL
        // segment 10 * age apart, newest at segment 10.
        let labels: Vec<BackupLabel> = (0..60u64)
            .rev()
            .map(|d| label(&format!("B{d:02}"), None, d, 10 + (59 - d) * 10))
            .collect();
        let policy = Policy {
            keep_daily: Some(3),
            keep_weekly: Some(2),
            keep_monthly: Some(2),
            pitr_days: Some(2.0),
            ..Policy::default()
        };
        let all_wal = wal(0..10 + 60 * 10);
        let p = plan(&labels, &all_wal, SEG, &policy, now()).unwrap();
        let kept = ids(&p.keep);
        // Daily: the 25th, 24th, 23rd. Weekly: this ISO week's newest (the
        // 25th) and last week's (Sunday the 22nd). Monthly: November's
        // newest (the 25th) and October's (the 31st, 25 days ago).
        assert_eq!(kept, ["B25", "B03", "B02", "B01", "B00"], "{:?}", p.keep);
        let reason = |id: &str| p.keep.iter().find(|d| d.id == id).unwrap().reason.clone();
        assert!(
            reason("B00").contains("daily 2026-11-25"),
            "{}",
            reason("B00")
        );
        assert!(
            reason("B00").contains("weekly 2026-W48"),
            "{}",
            reason("B00")
        );
        assert!(
            reason("B00").contains("monthly 2026-11"),
            "{}",
            reason("B00")
        );
        assert_eq!(reason("B03"), "weekly 2026-W47");
        assert_eq!(reason("B25"), "monthly 2026-10");
        // WAL: continuous from B02 (the newest kept backup at least 2 days
        // old); before it, only B25's and B03's own segments.
        let start = |id: &str| 10 + (59 - id[1..].parse::<u64>().unwrap()) * 10;
        let kept_wal: Vec<u64> = all_wal
            .iter()
            .filter(|w| !p.expire_wal.contains(&w.to_string()))
            .map(|w| w.segment_with_header().unwrap().segno(SEG))
            .collect();
        assert_eq!(kept_wal[0], start("B25"));
        assert_eq!(kept_wal[1], start("B03"));
        assert_eq!(kept_wal[2], start("B02"));
        assert_eq!(*kept_wal.last().unwrap(), 10 + 60 * 10 - 1);
        assert_eq!(kept_wal.len(), 2 + (10 + 60 * 10 - start("B02")) as usize);
    }
}
