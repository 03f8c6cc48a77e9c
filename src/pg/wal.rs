//! WAL file names and the long page header at the start of every segment.

use std::fmt;

/// What PostgreSQL hands `archive_command` / asks `restore_command` for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalFileName {
    /// `TTTTTTTTLLLLLLLLSSSSSSSS`: a full segment.
    Segment(SegmentName),
    /// `TTTTTTTTLLLLLLLLSSSSSSSS.partial`: the last, incomplete segment of an
    /// old timeline, archived at promotion.
    Partial(SegmentName),
    /// `TTTTTTTTLLLLLLLLSSSSSSSS.OOOOOOOO.backup`: a backup history file.
    Backup(SegmentName, u32),
    /// `TTTTTTTT.history`: a timeline history file.
    History(u32),
}

/// The three 8-hex-digit fields of a segment file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentName {
    pub timeline: u32,
    pub log: u32,
    pub seg: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{name:?} is not a WAL file name: expected a segment (24 hex digits), \
     SEGMENT.partial, SEGMENT.OFFSET.backup or TIMELINE.history"
)]
pub struct BadWalName {
    pub name: String,
}

fn hex8(s: &str) -> Option<u32> {
    // PostgreSQL always writes upper-case hex; accepting lower case would let
    // two names denote one file.
    if s.len() == 8
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
    {
        u32::from_str_radix(s, 16).ok()
    } else {
        None
    }
}

impl SegmentName {
    fn parse(s: &str) -> Option<SegmentName> {
        // ASCII first: slicing at bytes 8 and 16 must not cut a character.
        if s.len() != 24 || !s.is_ascii() {
            return None;
        }
        Some(SegmentName {
            timeline: hex8(&s[0..8])?,
            log: hex8(&s[8..16])?,
            seg: hex8(&s[16..24])?,
        })
    }

    /// The directory that groups the segments of one timeline and log id,
    /// as pgBackRest and PostgreSQL's own pg_wal naming suggest.
    pub fn dir_name(&self) -> String {
        format!("{:08X}{:08X}", self.timeline, self.log)
    }

    pub fn from_segno(timeline: u32, segno: u64, seg_size: u32) -> SegmentName {
        let per_log = 0x1_0000_0000u64 / u64::from(seg_size.max(1));
        SegmentName {
            timeline,
            log: (segno / per_log) as u32,
            seg: (segno % per_log) as u32,
        }
    }

    /// Segment number counted from LSN 0 for a given segment size.
    pub fn segno(&self, seg_size: u32) -> u64 {
        let per_log = 0x1_0000_0000u64 / u64::from(seg_size.max(1));
        u64::from(self.log) * per_log + u64::from(self.seg)
    }
}

impl fmt::Display for SegmentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08X}{:08X}{:08X}", self.timeline, self.log, self.seg)
    }
}

impl WalFileName {
    pub fn parse(name: &str) -> Result<WalFileName, BadWalName> {
        let bad = || BadWalName {
            name: name.to_owned(),
        };
        if let Some(seg) = SegmentName::parse(name) {
            return Ok(WalFileName::Segment(seg));
        }
        if let Some(stem) = name.strip_suffix(".partial") {
            return SegmentName::parse(stem)
                .map(WalFileName::Partial)
                .ok_or_else(bad);
        }
        if let Some(stem) = name.strip_suffix(".backup") {
            let (seg, off) = stem.split_at_checked(24).ok_or_else(bad)?;
            let off = off.strip_prefix('.').and_then(hex8).ok_or_else(bad)?;
            return SegmentName::parse(seg)
                .map(|s| WalFileName::Backup(s, off))
                .ok_or_else(bad);
        }
        if let Some(stem) = name.strip_suffix(".history") {
            return hex8(stem).map(WalFileName::History).ok_or_else(bad);
        }
        Err(bad())
    }

    /// The segment whose page header this file starts with, if it has one.
    pub fn segment_with_header(&self) -> Option<SegmentName> {
        match self {
            WalFileName::Segment(s) | WalFileName::Partial(s) => Some(*s),
            WalFileName::Backup(..) | WalFileName::History(_) => None,
        }
    }

    pub fn timeline(&self) -> u32 {
        match self {
            WalFileName::Segment(s) | WalFileName::Partial(s) | WalFileName::Backup(s, _) => {
                s.timeline
            }
            WalFileName::History(tli) => *tli,
        }
    }
}

impl fmt::Display for WalFileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalFileName::Segment(s) => write!(f, "{s}"),
            WalFileName::Partial(s) => write!(f, "{s}.partial"),
            WalFileName::Backup(s, off) => write!(f, "{s}.{off:08X}.backup"),
            WalFileName::History(tli) => write!(f, "{tli:08X}.history"),
        }
    }
}

/// Size of `XLogLongPageHeaderData`, the header of a segment's first page.
pub const LONG_PAGE_HEADER_LEN: usize = 40;
const XLP_LONG_HEADER: u16 = 0x0002;

/// The fields of the long page header that identify where a segment came
/// from (PostgreSQL's `xlog_internal.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LongPageHeader {
    pub magic: u16,
    pub timeline: u32,
    pub page_addr: u64,
    pub system_identifier: u64,
    pub seg_size: u32,
    pub block_size: u32,
}

impl LongPageHeader {
    /// Parses the header; `None` when the bytes are not a long page header
    /// (a zeroed, truncated or foreign file).
    pub fn parse(b: &[u8]) -> Option<LongPageHeader> {
        if b.len() < LONG_PAGE_HEADER_LEN {
            return None;
        }
        let u16le = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32le = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64le = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let magic = u16le(0);
        let info = u16le(2);
        // Every WAL page magic PostgreSQL has used since 9.0 is 0xD0xx/0xD1xx.
        if magic & 0xFE00 != 0xD000 || info & XLP_LONG_HEADER == 0 {
            return None;
        }
        let h = LongPageHeader {
            magic,
            timeline: u32le(4),
            page_addr: u64le(8),
            system_identifier: u64le(24),
            seg_size: u32le(32),
            block_size: u32le(36),
        };
        let valid_seg = h.seg_size.is_power_of_two() && (1 << 20..=1 << 30).contains(&h.seg_size);
        (valid_seg && h.block_size.is_power_of_two()).then_some(h)
    }

    /// The PostgreSQL major version that writes this page magic, where known.
    pub fn pg_major(&self) -> Option<u32> {
        pg_major_for_magic(self.magic)
    }
}

/// `XLOG_PAGE_MAGIC` by major version. Only used to name versions in
/// messages: the archive binds to the magic itself, so an unlisted version
/// still works.
pub fn pg_major_for_magic(magic: u16) -> Option<u32> {
    Some(match magic {
        0xD106 => 13,
        0xD10D => 14,
        0xD110 => 15,
        0xD113 => 16,
        0xD116 => 17,
        0xD118 => 18,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_kind_of_wal_file_name_and_round_trips() {
        for name in [
            "000000010000000000000001",
            "0000000200000003000000FF.partial",
            "000000010000000000000002.00000028.backup",
            "00000002.history",
        ] {
            assert_eq!(WalFileName::parse(name).unwrap().to_string(), name);
        }
        let seg = WalFileName::parse("0000000200000003000000FE").unwrap();
        assert_eq!(
            seg,
            WalFileName::Segment(SegmentName {
                timeline: 2,
                log: 3,
                seg: 0xFE
            })
        );
        assert_eq!(
            seg.segment_with_header().unwrap().segno(16 << 20),
            3 * 256 + 0xFE
        );
    }

    #[test]
    fn rejects_names_postgres_never_writes() {
        for name in [
            "",
            "00000001000000000000001",
            "0000000100000000000000001",
            "00000001000000000000000g",
            "000000010000000000000001.gz",
            "archive_status",
            "00000001000000000000000a",
            "0000001.history",
            "000000010000000000000002.0028.backup",
            "../../etc/passwd",
            "RECOVERYXLOG",
        ] {
            assert!(WalFileName::parse(name).is_err(), "{name:?} was accepted");
        }
    }

    #[test]
    fn names_of_24_bytes_with_characters_of_several_are_refused_not_a_panic() {
        // Found by the fuzz target `wal`: byte slicing at 8 and 16 cut a
        // character in two. Object keys in a repository are anyone's.
        for name in [
            "0000000\u{e9}000000000000001",
            "000000010000000\u{e9}0000001",
            "00000001000000000000000\u{e9}",
            "0000000\u{1F600}00000000000001",
            "0000000\u{e9}000000000000001.partial",
            "0000000\u{e9}000000000000001.00000028.backup",
            "000000010000000000000001.0000002\u{e9}.backup",
            "0000000\u{e9}.history",
        ] {
            assert!(WalFileName::parse(name).is_err(), "{name:?} was accepted");
        }
    }

    #[test]
    fn reads_the_long_page_header_of_a_pg18_segment() {
        let mut page = [0u8; 40];
        page[0..2].copy_from_slice(&0xD118u16.to_le_bytes());
        page[2..4].copy_from_slice(&2u16.to_le_bytes());
        page[4..8].copy_from_slice(&1u32.to_le_bytes());
        page[8..16].copy_from_slice(&(16u64 << 20).to_le_bytes());
        page[24..32].copy_from_slice(&0x6B06_D4B3_155F_920Fu64.to_le_bytes());
        page[32..36].copy_from_slice(&(16u32 << 20).to_le_bytes());
        page[36..40].copy_from_slice(&8192u32.to_le_bytes());
        let h = LongPageHeader::parse(&page).unwrap();
        assert_eq!(h.system_identifier, 0x6B06_D4B3_155F_920F);
        assert_eq!(h.pg_major(), Some(18));
        assert_eq!((h.timeline, h.page_addr), (1, 16 << 20));

        page[2] = 0; // short header: not the first page of a segment
        assert!(LongPageHeader::parse(&page).is_none());
        assert!(LongPageHeader::parse(&[0u8; 40]).is_none());
        assert!(LongPageHeader::parse(&page[..39]).is_none());
    }
}
