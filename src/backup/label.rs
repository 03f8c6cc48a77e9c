//! `backup.json`, the label beside each base backup: what it is, where its
//! WAL starts and stops, and whether it was verified. The repository is the source of truth; the catalog table is a
//! mirror.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::backup::repo::CLOCK_SKEW;
use crate::backup::stored::Checksum;
use crate::pg::lsn::Lsn;
use crate::pg::wal::SegmentName;

pub const LABEL_FILE: &str = "backup.json";
pub const LABEL_FORMAT: u32 = 1;
/// The most WAL segments a label may say its backup needs: 16 TiB of WAL
/// written during one base backup, at the default segment size. Its list
/// is built whole (`required_segments`).
pub const MAX_WAL_SEGMENTS: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupType {
    Full,
    Incremental,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupStatus {
    /// pg_basebackup is running, or the process died while it did.
    Running,
    /// Copied, and the WAL that makes it consistent is in the archive.
    Complete,
    /// Not usable; `failure` says why.
    Failed,
}

/// One timeline's stretch of WAL that the backup needs to be consistent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalRange {
    pub timeline: u32,
    pub start_lsn: Lsn,
    pub end_lsn: Lsn,
}

impl WalRange {
    pub fn segments(&self, seg_size: u32) -> impl Iterator<Item = SegmentName> + '_ {
        let (a, b) = (self.start_lsn.segno(seg_size), self.end_lsn.segno(seg_size));
        (a..=b).map(move |n| SegmentName::from_segno(self.timeline, n, seg_size))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyStatus {
    Ok,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verification {
    pub status: VerifyStatus,
    pub at: String,
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupLabel {
    pub format: u32,
    pub id: String,
    pub cluster_name: String,
    pub pg_version: u32,
    pub system_identifier: String,
    #[serde(rename = "type")]
    pub kind: BackupType,
    pub parent: Option<String>,
    pub status: BackupStatus,
    pub failure: Option<String>,
    pub start_lsn: Option<Lsn>,
    pub stop_lsn: Option<Lsn>,
    pub timeline: Option<u32>,
    pub wal_ranges: Vec<WalRange>,
    pub wal_segment_size: u32,
    pub start_time: String,
    pub stop_time: Option<String>,
    pub size_bytes: u64,
    pub file_count: u64,
    /// On object storage: the bytes its compressed objects hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_bytes: Option<u64>,
    /// How its objects are encrypted; none when they are not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<crate::crypt::Encryption>,
    pub tool_version: String,
    pub verification: Option<Verification>,
    /// The SHA-256 of each object beside the label that a restore trusts
    /// (`files.json`, `backup_manifest`), as stored, checked on every read;
    /// a signature covers them (sign.rs).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub objects: BTreeMap<String, Checksum>,
    /// By the backup host's signing key; none when it had none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<crate::sign::Signature>,
}

/// Whether `s` has the shape `basebackup::new_id` gives a backup id:
/// `20261125-125301F`, eight digits, a dash, six digits, then `F` (full)
/// or `I` (incremental). Nothing else may name a backup: an id becomes a
/// directory name and an object key.
pub fn is_backup_id(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 16
        && b[..8].iter().all(u8::is_ascii_digit)
        && b[8] == b'-'
        && b[9..15].iter().all(u8::is_ascii_digit)
        && matches!(b[15], b'F' | b'I')
}

impl BackupLabel {
    pub fn is_usable(&self) -> bool {
        self.status == BackupStatus::Complete
    }

    /// The order backups were taken in: start time (to the millisecond),
    /// then start LSN, which is strict within a cluster.
    pub fn sort_key(&self) -> (&str, Option<Lsn>, &str) {
        (&self.start_time, self.start_lsn, &self.id)
    }

    /// Every WAL segment the backup needs to reach consistency.
    pub fn required_segments(&self) -> Vec<SegmentName> {
        self.wal_ranges
            .iter()
            .flat_map(|r| r.segments(self.wal_segment_size))
            .collect()
    }
}

/// Why a label is not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelProblem {
    /// The bytes are not a label: the JSON does not read as one.
    Damaged(String),
    /// A label, but not one to trust: the reason, for a person.
    Untrusted(String),
}

/// The label stored under key `id` (its directory name under `backup/`),
/// refused unless its `id` is that key, the key has the shape of a
/// generated id whose letter is the label's kind, and its parent (if any)
/// is a backup id. What `Repo::label` reads; the fuzz target `label`
/// calls it.
pub fn parse(id: &str, text: &[u8]) -> Result<BackupLabel, LabelProblem> {
    let label: BackupLabel =
        serde_json::from_slice(text).map_err(|e| LabelProblem::Damaged(e.to_string()))?;
    let untrusted = |problem: String| Err(LabelProblem::Untrusted(problem));
    if label.id != id {
        return untrusted(format!("id {:?} does not match its key {id:?}", label.id));
    }
    if !is_backup_id(id) {
        return untrusted(format!(
            "its key {id:?} is not a backup id (ids look like 20261125-125301F)"
        ));
    }
    let suffix = match label.kind {
        BackupType::Full => 'F',
        BackupType::Incremental => 'I',
    };
    if !id.ends_with(suffix) {
        return untrusted(format!(
            "it says {:?}, and its id {id} ends in the other kind's letter",
            label.kind
        ));
    }
    if let Some(p) = label.parent.as_deref().filter(|p| !is_backup_id(p)) {
        return untrusted(format!(
            "its parent {p:?} is not a backup id (ids look like 20261125-125301F)"
        ));
    }
    // What its required segments are reckoned from (status, verify, restore).
    let seg_size = label.wal_segment_size;
    if !(seg_size.is_power_of_two() && (1 << 20..=1 << 30).contains(&seg_size)) {
        return untrusted(format!(
            "its wal_segment_size {seg_size} is not one PostgreSQL allows \
             (a power of two from 1 MiB to 1 GiB)"
        ));
    }
    let mut segments: u64 = 0;
    for r in &label.wal_ranges {
        if r.end_lsn < r.start_lsn {
            return untrusted(format!(
                "its WAL range on timeline {} ends before it starts ({} to {})",
                r.timeline, r.start_lsn, r.end_lsn
            ));
        }
        let n = r.end_lsn.segno(seg_size) - r.start_lsn.segno(seg_size) + 1;
        segments = segments.saturating_add(n);
    }
    if segments > MAX_WAL_SEGMENTS {
        return untrusted(format!(
            "its wal_ranges span {segments} WAL segments, more than the \
             {MAX_WAL_SEGMENTS} any base backup needs"
        ));
    }
    Ok(label)
}

/// Whether `label` is of cluster `cluster` (the archive's, when it has
/// one) and not dated later than `now` allows; why not, for a person.
pub fn vet(label: &BackupLabel, cluster: Option<&str>, now: SystemTime) -> Result<(), String> {
    if let Some(c) = cluster.filter(|c| *c != label.system_identifier) {
        return Err(format!(
            "it is of system identifier {}, the archive (archive.json) of {c}: \
             a backup of another cluster",
            label.system_identifier
        ));
    }
    let latest = now + CLOCK_SKEW;
    for (field, value) in [
        ("start_time", Some(&label.start_time)),
        ("stop_time", label.stop_time.as_ref()),
    ] {
        let Some(value) = value else { continue };
        match humantime::parse_rfc3339(value) {
            Err(_) => return Err(format!("its {field} {value:?} is not a time")),
            Ok(t) if t > latest => {
                return Err(format!(
                    "its {field} {value} is in the future (now is {}; {} minutes of \
                     clock skew are allowed)",
                    humantime::format_rfc3339_seconds(now),
                    CLOCK_SKEW.as_secs() / 60
                ))
            }
            Ok(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real label (of a backup taken by hand), its WAL fields replaced.
    fn label_json(seg_size: u32, ranges: &[(&str, &str)]) -> Vec<u8> {
        let ranges: Vec<String> = ranges
            .iter()
            .map(|(a, b)| format!(r#"{{"timeline":1,"start_lsn":"{a}","end_lsn":"{b}"}}"#))
            .collect();
        format!(
            r#"{{"format":1,"id":"20261207-095504F","cluster_name":"default","pg_version":18,
            "system_identifier":"7716498431432468742","type":"full","parent":null,
            "status":"complete","failure":null,"start_lsn":"0/2000028","stop_lsn":"0/2000120",
            "timeline":1,"wal_ranges":[{}],"wal_segment_size":{seg_size},
            "start_time":"2026-12-07T09:55:04.410Z","stop_time":"2026-12-07T09:55:06.101Z",
            "size_bytes":40050888,"file_count":1000,"tool_version":"reentry 0.1.0",
            "verification":null}}"#,
            ranges.join(",")
        )
        .into_bytes()
    }

    #[test]
    fn labels_whose_wal_cannot_be_reckoned_are_refused_before_it_is() {
        let id = "20261207-095504F";
        let good = parse(id, &label_json(16 << 20, &[("0/2000028", "0/2000120")])).unwrap();
        assert_eq!(good.required_segments().len(), 1);
        // Seen writing the fuzz target `label`: a segment size of 0 divided by
        // zero in `required_segments` (status, verify, restore), and a
        // range of every LSN there is listed 2^40 segments.
        for (seg_size, ranges, want) in [
            (0, vec![("0/2000028", "0/2000120")], "wal_segment_size 0"),
            (
                3 << 20,
                vec![("0/2000028", "0/2000120")],
                "wal_segment_size 3145728",
            ),
            (
                1 << 31,
                vec![("0/2000028", "0/2000120")],
                "wal_segment_size 2147483648",
            ),
            (
                16 << 20,
                vec![("0/3000000", "0/2000000")],
                "ends before it starts",
            ),
            (
                16 << 20,
                vec![("0/0", "FFFFFFFF/FFFFFFFF")],
                "1099511627776 WAL segments",
            ),
            (
                1 << 20,
                vec![("0/0", "FF/FFFFFFFF"), ("100/0", "100/1")],
                "1048577 WAL segments",
            ),
        ] {
            match parse(id, &label_json(seg_size, &ranges)) {
                Err(LabelProblem::Untrusted(p)) => assert!(p.contains(want), "{p}"),
                other => panic!("{seg_size} {ranges:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn only_ids_of_the_generated_shape_are_backup_ids() {
        assert!(is_backup_id("20261125-125301F"));
        assert!(is_backup_id("20261125-125301I"));
        for bad in [
            "",
            "zz",
            "/tmp/victim",
            "../../../x",
            "..",
            "20261125-125301",
            "20261125-125301X",
            "20261125-125301FF",
            "20261125_125301F",
            "2026112-1253011F",
            "20261125-12530aF",
            "20261125-125301f",
            "2026112\u{0}-125301F",
            "20261125-125301F/",
            "/20261125-125301F",
            "２0261125-125301F",
        ] {
            assert!(!is_backup_id(bad), "{bad:?}");
        }
    }
}
