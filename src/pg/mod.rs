//! PostgreSQL facts the tool reads without a connection: WAL file names, WAL
//! page headers and the identity of a data directory.

pub mod cluster;
pub mod wal;
