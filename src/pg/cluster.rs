//! The identity of a data directory, read from its files: what a WAL archive
//! binds to when a file carries no page header of its own.

use std::fs;
use std::io::{self, Read};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataDirIdentity {
    pub system_identifier: u64,
    pub pg_major: u32,
}

/// Reads `PG_VERSION` and the system identifier at the start of
/// `global/pg_control`. `Ok(None)` when `dir` is not a data directory.
pub fn read_identity(dir: &Path) -> io::Result<Option<DataDirIdentity>> {
    let version = match fs::read_to_string(dir.join("PG_VERSION")) {
        Ok(v) => v,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let pg_major = version.trim().parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("PG_VERSION holds {:?}, not a major version", version.trim()),
        )
    })?;
    let mut control = fs::File::open(dir.join("global/pg_control"))?;
    let mut sysid = [0u8; 8];
    control.read_exact(&mut sysid)?;
    Ok(Some(DataDirIdentity {
        system_identifier: u64::from_le_bytes(sysid),
        pg_major,
    }))
}
