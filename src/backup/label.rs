//! `backup.json`, the label beside each base backup: what it is, where its
//! WAL starts and stops, and whether it was verified. The repository is the source of truth; the catalog table is a
//! mirror.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::backup::stored::Checksum;

use crate::pg::lsn::Lsn;
use crate::pg::wal::SegmentName;

pub const LABEL_FILE: &str = "backup.json";
pub const LABEL_FORMAT: u32 = 1;

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

#[cfg(test)]
mod tests {
    use super::*;

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
