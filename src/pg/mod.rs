//! PostgreSQL: connections, LSNs, WAL file names and page headers, the
//! identity of a data directory, and the server tools the tool drives.

pub mod cluster;
pub mod conn;
pub mod lsn;
pub mod tls;
pub mod tools;
pub mod wal;
