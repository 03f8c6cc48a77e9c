//! `reentry`: backup and point-in-time recovery for PostgreSQL as a tested
//! capability, and the return of the applications around it after a restore.

pub mod backup;
pub mod cache;
pub mod cli;
pub mod config;
pub mod crypt;
pub mod diag;
pub mod exit;
pub mod fsutil;
pub mod kafka;
pub mod pg;
pub mod progress;
pub mod reentry;
pub mod search;
pub mod sign;
pub mod storage;
pub mod time;
pub mod tls_files;

use exit::Exit;

/// Every error the library returns, by phase. Each knows its exit code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Archive(#[from] backup::archive::ArchiveError),
    /// `wal fetch`'s own, for its exit status (Exit::StopRecovery).
    #[error(transparent)]
    Fetch(backup::archive::ArchiveError),
    #[error(transparent)]
    Backup(#[from] backup::basebackup::BackupError),
    #[error(transparent)]
    Expire(#[from] backup::expire::ExpireError),
    #[error(transparent)]
    Status(#[from] backup::status::StatusError),
    #[error(transparent)]
    Repo(#[from] backup::repo::RepoError),
    #[error(transparent)]
    Pg(#[from] pg::conn::PgError),
    #[error(transparent)]
    Catalog(#[from] backup::catalog::CatalogError),
    #[error(transparent)]
    Restore(#[from] backup::restore::RestoreError),
    #[error(transparent)]
    Drill(#[from] backup::drill::DrillError),
    #[error(transparent)]
    Copy(#[from] backup::copy::CopyError),
    #[error(transparent)]
    Plan(Box<reentry::plan::PlanError>),
    #[error(transparent)]
    Run(Box<reentry::run::RunError>),
    #[error(transparent)]
    Report(#[from] reentry::report::ReportError),
    /// A step's work run by hand (`cache invalidate`).
    #[error("{what}")]
    Step {
        what: &'static str,
        #[source]
        source: Box<reentry::steps::StepError>,
    },
    #[error("cannot write output: {0}")]
    Output(std::io::Error),
}

impl From<reentry::plan::PlanError> for Error {
    fn from(e: reentry::plan::PlanError) -> Error {
        Error::Plan(Box::new(e))
    }
}

impl From<reentry::run::RunError> for Error {
    fn from(e: reentry::run::RunError) -> Error {
        Error::Run(Box::new(e))
    }
}

impl Error {
    pub fn exit(&self) -> Exit {
        match self {
            Error::Config(_) => Exit::Config,
            Error::Archive(e) => e.exit(),
            Error::Fetch(
                backup::archive::ArchiveError::Corrupt { .. }
                | backup::archive::ArchiveError::Key(_),
            ) => Exit::StopRecovery,
            Error::Fetch(e) => e.exit(),
            Error::Backup(e) => backup_exit(e),
            Error::Expire(backup::expire::ExpireError::NoPolicy) => Exit::Usage,
            Error::Expire(backup::expire::ExpireError::Untrusted { .. }) => Exit::Refused,
            Error::Expire(backup::expire::ExpireError::Repo(e)) | Error::Repo(e) => repo_exit(e),
            Error::Expire(backup::expire::ExpireError::Archive(e)) => e.exit(),
            Error::Expire(backup::expire::ExpireError::Pack(_)) => Exit::Failure,
            Error::Status(e) => status_exit(e),
            Error::Pg(e) => pg_exit(e),
            Error::Catalog(backup::catalog::CatalogError::NotARepository { .. }) => Exit::Refused,
            Error::Catalog(backup::catalog::CatalogError::Archive(e)) => e.exit(),
            Error::Catalog(backup::catalog::CatalogError::Repo(e)) => repo_exit(e),
            Error::Catalog(backup::catalog::CatalogError::Pg(e)) => pg_exit(e),
            Error::Restore(e) => restore_exit(e),
            Error::Drill(backup::drill::DrillError::Restore(e)) => restore_exit(e),
            Error::Drill(backup::drill::DrillError::Repo(e)) => repo_exit(e),
            Error::Drill(backup::drill::DrillError::Pg(e)) => pg_exit(e),
            Error::Drill(backup::drill::DrillError::Archive(e)) => e.exit(),
            Error::Drill(backup::drill::DrillError::Checks { .. }) => Exit::Config,
            Error::Copy(backup::copy::CopyError::SameRepository { .. }) => Exit::Usage,
            Error::Copy(backup::copy::CopyError::NeedSigningKey { .. }) => Exit::Config,
            Error::Copy(backup::copy::CopyError::Repo(e)) => repo_exit(e),
            Error::Copy(_) => Exit::Failure,
            Error::Plan(e) => e.exit(),
            Error::Run(e) => e.exit(),
            Error::Report(_) => Exit::Failure,
            Error::Output(_) => Exit::Failure,
            Error::Step { source, .. } => match **source {
                reentry::steps::StepError::Config(_) | reentry::steps::StepError::Input { .. } => {
                    Exit::Config
                }
                _ => Exit::Failure,
            },
        }
    }
}

fn pg_exit(e: &pg::conn::PgError) -> Exit {
    match e {
        pg::conn::PgError::BadConninfo(_) => Exit::Config,
        _ => Exit::Failure,
    }
}

fn repo_exit(e: &backup::repo::RepoError) -> Exit {
    match e {
        backup::repo::RepoError::UnknownBackup { .. } => Exit::Usage,
        backup::repo::RepoError::BackupExists { .. }
        | backup::repo::RepoError::Untrusted { .. }
        | backup::repo::RepoError::NotVouched { .. }
        | backup::repo::RepoError::Unvouched { .. } => Exit::Refused,
        backup::repo::RepoError::BadBackupId { .. } => Exit::Usage,
        backup::repo::RepoError::NeedVerifyKey { .. } => Exit::Config,
        backup::repo::RepoError::Archive(e) => e.exit(),
        _ => Exit::Failure,
    }
}

fn backup_exit(e: &backup::basebackup::BackupError) -> Exit {
    use backup::basebackup::BackupError as B;
    match e {
        B::Pg(e) => pg_exit(e),
        B::Repo(e) => repo_exit(e),
        B::Archive(e) => e.exit(),
        B::Pack(backup::packed::PackError::Key(_)) | B::NeedSigningKey { .. } => Exit::Config,
        B::Pack(backup::packed::PackError::NotVouched { .. }) => Exit::Refused,
        B::Tool(_)
        | B::Pack(_)
        | B::WalTimeout { .. }
        | B::BadBackupFiles { .. }
        | B::RestorePointNotArchived { .. } => Exit::Failure,
        B::IncrementalUnsupported { .. } | B::SummarizeWalOff { .. } | B::ArchiveOff { .. } => {
            Exit::Config
        }
        B::Tablespaces { .. } => Exit::Refused,
        B::NoParent { .. }
        | B::BadParent { .. }
        | B::WrongCluster { .. }
        | B::DuplicateRestorePoint { .. } => Exit::Refused,
        B::BadRestorePointName { .. } => Exit::Usage,
    }
}

/// `check` is a check: what it finds wrong is exit 1, not a malfunction.
fn status_exit(e: &backup::status::StatusError) -> Exit {
    use backup::status::StatusError as S;
    match e {
        S::Pg(e) => pg_exit(e),
        S::Repo(e) => repo_exit(e),
        S::Archive(e) => e.exit(),
        S::ArchiveOff { .. }
        | S::WrongCluster { .. }
        | S::NotArchived { .. }
        | S::Overwrites { .. } => Exit::Negative,
    }
}

fn restore_exit(e: &backup::restore::RestoreError) -> Exit {
    use backup::restore::RestoreError as R;
    match e {
        R::Repo(e) => repo_exit(e),
        R::Archive(e) => e.exit(),
        R::Pg(e) => pg_exit(e),
        R::Pack(backup::packed::PackError::Key(_)) => Exit::Config,
        R::Pack(
            backup::packed::PackError::BadIndex { .. }
            | backup::packed::PackError::NotVouched { .. },
        ) => Exit::Refused,
        R::Unsigned { .. } => Exit::Refused,
        R::Tool(_) | R::Pack(_) | R::RecoveryFailed { .. } | R::Timeout { .. } => Exit::Failure,
        R::RunningAsRoot | R::NotEmpty { .. } | R::PortInUse { .. } | R::BadTarget { .. } => {
            Exit::Usage
        }
        R::UnknownRestorePoint { .. } | R::NoBackup { .. } | R::Unreachable { .. } => {
            Exit::Negative
        }
        R::Tablespaces { .. } => Exit::Refused,
        R::Fence(e) if e.is_refusal() => Exit::Refused,
        R::Fence(backup::fence::FenceError::Pg(e)) => pg_exit(e),
        R::Fence(_) => Exit::Failure,
    }
}
