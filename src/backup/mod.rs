//! The repository: the WAL archive, base backups and their labels, the
//! checks of both, retention, and restore points.

pub mod archive;
pub mod basebackup;
pub mod catalog;
pub mod copy;
pub mod drill;
pub mod expire;
pub mod fence;
pub mod label;
pub mod packed;
pub mod parts;
pub mod preflight;
pub mod repo;
pub mod restore;
pub mod restore_point;
pub mod status;
pub mod stored;
pub mod verify;
pub mod vouched;
pub mod walchain;
