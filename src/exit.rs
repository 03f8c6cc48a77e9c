//! The exit-code contract (also in the README). Scripts and PostgreSQL's
//! archiver branch on these, so they only ever grow.

use std::process::ExitCode;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Success, or nothing to do.
    Ok = 0,
    /// A negative answer, not a malfunction: a check found problems, a plan
    /// has changes, `wal fetch` was asked for a file the archive lacks.
    Negative = 1,
    /// A runtime failure: I/O, a server, a corrupt file. Retrying may help
    /// once the cause is fixed.
    Failure = 2,
    /// Refused to protect data: different content under an archived name, a
    /// file from another cluster. Retrying will not help; a person must look.
    Refused = 3,
    /// Bad command-line usage.
    Usage = 64,
    /// `wal fetch` only: the file is in the archive but cannot be given
    /// back, because it is corrupt or no identity decrypts it. PostgreSQL
    /// reads any exit up to 125 as "not in the archive" and ends recovery
    /// there, promoting early; above 125 it stops recovery (FATAL), so the
    /// cause can be fixed and the server started again. Not 126 or 127,
    /// which it logs as "command not executable" and "not found".
    StopRecovery = 200,
    /// Invalid configuration (config file, playbook).
    Config = 78,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e as u8)
    }
}
