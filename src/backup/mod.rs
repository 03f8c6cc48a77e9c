//! The repository: the WAL archive now; base backups, the catalog, retention
//! and restores build on it.

pub mod archive;
pub mod stored;
