//! `reentry`: backup and point-in-time recovery for PostgreSQL as a tested
//! capability, and the return of the applications around it after a restore.

pub mod backup;
pub mod cli;
pub mod config;
pub mod exit;
pub mod fsutil;
pub mod pg;

use exit::Exit;

/// Every error the library returns, by phase. Each knows its exit code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Archive(#[from] backup::archive::ArchiveError),
    #[error("cannot write output: {0}")]
    Output(std::io::Error),
}

impl Error {
    pub fn exit(&self) -> Exit {
        match self {
            Error::Config(_) => Exit::Config,
            Error::Archive(e) => e.exit(),
            Error::Output(_) => Exit::Failure,
        }
    }
}
