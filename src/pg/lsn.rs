//! Log sequence numbers as PostgreSQL writes them (`16/B374D848`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::pg::wal::SegmentName;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    pub fn segno(self, seg_size: u32) -> u64 {
        self.0 / u64::from(seg_size)
    }

    /// The segment that holds this LSN on `timeline`.
    pub fn segment(self, timeline: u32, seg_size: u32) -> SegmentName {
        SegmentName::from_segno(timeline, self.segno(seg_size), seg_size)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an LSN (expected two hex numbers like 16/B374D848)")]
pub struct BadLsn(pub String);

impl FromStr for Lsn {
    type Err = BadLsn;
    fn from_str(s: &str) -> Result<Lsn, BadLsn> {
        let bad = || BadLsn(s.to_owned());
        let (hi, lo) = s.trim().split_once('/').ok_or_else(bad)?;
        let hex = |x: &str| {
            (!x.is_empty() && x.len() <= 8)
                .then(|| u32::from_str_radix(x, 16).ok())
                .flatten()
        };
        Ok(Lsn(
            (u64::from(hex(hi).ok_or_else(bad)?) << 32) | u64::from(hex(lo).ok_or_else(bad)?)
        ))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 as u32)
    }
}

impl Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Lsn, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_like_postgres() {
        let l: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(l.0, 0x16_B374_D848);
        assert_eq!(l.to_string(), "16/B374D848");
        assert_eq!("0/0".parse::<Lsn>().unwrap(), Lsn(0));
        for bad in ["", "16", "/1", "1/", "x/1", "1/123456789", "1/2/3"] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad}");
        }
    }

    #[test]
    fn knows_its_segment() {
        let l: Lsn = "1/2000028".parse().unwrap();
        assert_eq!(
            l.segment(3, 16 << 20).to_string(),
            "000000030000000100000002"
        );
    }
}
