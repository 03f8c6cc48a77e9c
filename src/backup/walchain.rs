//! `reentry wal verify`: what the archive can restore. Per timeline, the
//! contiguous ranges of archived segments and the gaps between them; for
//! each backup, whether the WAL it needs is all there and how far past its
//! consistency point recovery can go, following timeline switches recorded
//! in history files. Every file's checksum is read, not only its name.

use crate::progress::Progress;
use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::backup::archive::{Archive, ArchiveError, Listing};
use crate::backup::label::BackupLabel;
use crate::pg::lsn::Lsn;
use crate::pg::wal::{SegmentName, WalFileName};

/// A temporary file older than this was left by a push that died.
const STALE_TEMP: std::time::Duration = std::time::Duration::from_secs(600);

#[derive(Debug, Clone, Serialize)]
pub struct SegRange {
    pub first: String,
    pub last: String,
    pub segments: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TimelineReport {
    pub timeline: u32,
    pub ranges: Vec<SegRange>,
    pub gaps: Vec<SegRange>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Reach {
    pub timeline: u32,
    pub until_lsn: Lsn,
}

#[derive(Debug, Clone, Serialize)]
pub struct BackupWindow {
    pub id: String,
    pub timeline: u32,
    /// The backup is consistent from here (its stop LSN).
    pub consistent_lsn: Lsn,
    /// Required segments that are missing or corrupt.
    pub missing: Vec<String>,
    /// How far recovery from this backup can go, per timeline it can follow.
    pub reachable: Vec<Reach>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CorruptFile {
    pub name: String,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct WalReport {
    pub ok: bool,
    pub files_checked: usize,
    pub timelines: Vec<TimelineReport>,
    pub history_files: Vec<String>,
    pub corrupt: Vec<CorruptFile>,
    pub temp_files: Vec<String>,
    pub unknown_files: Vec<String>,
    pub backups: Vec<BackupWindow>,
}

/// A timeline's parent and the LSN where it branched off, from its history
/// file's last line.
fn parse_history(text: &str) -> Option<(u32, Lsn)> {
    let line = text
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && !l.starts_with('#'))?;
    let mut fields = line.split_whitespace();
    let parent = fields.next()?.parse().ok()?;
    let switch = fields.next()?.parse().ok()?;
    Some((parent, switch))
}

/// What the archive holds, indexed for "how far can recovery go from here".
pub struct ChainIndex {
    pub seg_size: u32,
    good: BTreeMap<u32, BTreeSet<u64>>,
    children: BTreeMap<u32, Vec<(u32, Lsn)>>,
    pub corrupt: Vec<CorruptFile>,
    pub history_files: Vec<String>,
    pub files: usize,
}

impl ChainIndex {
    /// Indexes the archive. With `verify`, every file is read and checked,
    /// and corrupt ones count as missing; without, names are trusted (a
    /// restore checks each file as it fetches it). History files are always
    /// read: they say where timelines branch.
    pub fn build(
        archive: &Archive,
        listing: &Listing,
        verify: bool,
        progress: &dyn Progress,
    ) -> Result<ChainIndex, ArchiveError> {
        let seg_size = archive
            .info()?
            .and_then(|i| i.wal_segment_size)
            .unwrap_or(16 << 20);
        let total = listing.files.len();
        if verify {
            progress.stage("checking archived files", Some(total as u64));
        }
        let mut index = ChainIndex {
            seg_size,
            good: BTreeMap::new(),
            children: BTreeMap::new(),
            corrupt: Vec::new(),
            history_files: Vec::new(),
            files: total,
        };
        for (i, name) in listing.files.iter().enumerate() {
            if verify && i % 16 == 0 {
                progress.advance(i as u64, &format!("{i}/{total} archived files"));
            }
            let mut content = Vec::new();
            let checked = match name {
                WalFileName::History(_) => archive.read(name, &mut content).map(|_| ()),
                _ if verify => archive.verify(name).map(|_| ()),
                _ => Ok(()),
            };
            match checked {
                Ok(()) => {}
                Err(ArchiveError::Corrupt { detail, .. }) => {
                    index.corrupt.push(CorruptFile {
                        name: name.to_string(),
                        detail,
                    });
                    continue;
                }
                Err(e) => return Err(e),
            }
            match name {
                WalFileName::Segment(s) => {
                    index
                        .good
                        .entry(s.timeline)
                        .or_default()
                        .insert(s.segno(seg_size));
                }
                WalFileName::History(tli) => {
                    index.history_files.push(name.to_string());
                    if let Some((parent, switch)) =
                        parse_history(&String::from_utf8_lossy(&content))
                    {
                        index
                            .children
                            .entry(parent)
                            .or_default()
                            .push((*tli, switch));
                    }
                }
                WalFileName::Partial(_) | WalFileName::Backup(..) => {}
            }
        }
        if verify {
            progress.finish();
        }
        Ok(index)
    }

    pub fn has(&self, tli: u32, segno: u64) -> bool {
        self.good.get(&tli).is_some_and(|s| s.contains(&segno))
    }

    /// How far contiguous WAL goes from segment `from` on timeline `tli`,
    /// then on every child timeline that branched off inside that stretch.
    pub fn reach(&self, tli: u32, from: u64) -> Vec<Reach> {
        let mut out = Vec::new();
        self.follow(tli, from, &mut out);
        out
    }

    fn follow(&self, tli: u32, from: u64, out: &mut Vec<Reach>) {
        if !self.has(tli, from) {
            return;
        }
        let mut last = from;
        while self.has(tli, last + 1) {
            last += 1;
        }
        let until = Lsn((last + 1) * u64::from(self.seg_size));
        out.push(Reach {
            timeline: tli,
            until_lsn: until,
        });
        for &(child, switch) in self.children.get(&tli).into_iter().flatten() {
            if switch.segno(self.seg_size) >= from && switch <= until {
                self.follow(child, switch.segno(self.seg_size), out);
            }
        }
    }

    /// Required segments of `b` that the archive lacks (or holds corrupt).
    pub fn missing_for(&self, b: &BackupLabel) -> Vec<String> {
        b.required_segments()
            .into_iter()
            .filter(|s| !self.has(s.timeline, s.segno(self.seg_size)))
            .map(|s| s.to_string())
            .collect()
    }
}

pub fn verify(
    archive: &Archive,
    backups: &[BackupLabel],
    progress: &dyn Progress,
) -> Result<WalReport, ArchiveError> {
    let listing = archive.list()?;
    let index = ChainIndex::build(archive, &listing, true, progress)?;
    let seg_size = index.seg_size;
    let name = |tli: u32, segno: u64| SegmentName::from_segno(tli, segno, seg_size).to_string();
    let timelines = index
        .good
        .iter()
        .map(|(&tli, segs)| {
            let mut ranges: Vec<(u64, u64)> = Vec::new();
            for &s in segs {
                match ranges.last_mut() {
                    Some((_, last)) if *last + 1 == s => *last = s,
                    _ => ranges.push((s, s)),
                }
            }
            let gaps = ranges
                .windows(2)
                .map(|w| SegRange {
                    first: name(tli, w[0].1 + 1),
                    last: name(tli, w[1].0 - 1),
                    segments: w[1].0 - w[0].1 - 1,
                })
                .collect();
            let ranges = ranges
                .iter()
                .map(|&(a, b)| SegRange {
                    first: name(tli, a),
                    last: name(tli, b),
                    segments: b - a + 1,
                })
                .collect();
            TimelineReport {
                timeline: tli,
                ranges,
                gaps,
            }
        })
        .collect();

    let windows: Vec<BackupWindow> = backups
        .iter()
        .filter(|b| b.is_usable())
        .filter_map(|b| {
            let (tli, stop) = (b.timeline?, b.stop_lsn?);
            Some(BackupWindow {
                id: b.id.clone(),
                timeline: tli,
                consistent_lsn: stop,
                missing: index.missing_for(b),
                reachable: index.reach(tli, stop.segno(seg_size)),
            })
        })
        .collect();

    let ok = index.corrupt.is_empty() && windows.iter().all(|w| w.missing.is_empty());
    // A push in flight has a temporary file too; only old ones are leftovers.
    let stale: Vec<String> = listing
        .temp_files
        .iter()
        .filter(|t| {
            t.modified
                .and_then(|m| m.elapsed().ok())
                .is_some_and(|age| age > STALE_TEMP)
        })
        .map(|t| t.shown.clone())
        .collect();
    Ok(WalReport {
        ok,
        files_checked: index.files,
        timelines,
        history_files: index.history_files,
        corrupt: index.corrupt,
        temp_files: stale,
        unknown_files: listing.unknown,
        backups: windows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_branch_point_from_the_last_history_line() {
        let text = "1\t0/3000000\tno recovery target specified\n\n2\t0/5000108\tbefore 2026-11-25 12:00:00+00\n";
        assert_eq!(parse_history(text), Some((2, "0/5000108".parse().unwrap())));
        assert_eq!(parse_history(""), None);
    }
}
