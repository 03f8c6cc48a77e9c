//! PostgreSQL's own programs (pg_basebackup, pg_verifybackup, …): where to
//! find them and how a failure of one is reported.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[derive(Debug, Clone, Default)]
pub struct PgBin {
    /// Directory of the binaries; `None` searches PATH.
    pub dir: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("cannot run {} (pass --pg-bin DIR or set REENTRY_PG_BIN to PostgreSQL's bin directory)", program.display())]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
    #[error("{tool} failed ({status}): {stderr}")]
    Failed {
        tool: String,
        status: String,
        stderr: String,
    },
}

impl PgBin {
    pub fn new(dir: Option<PathBuf>) -> PgBin {
        PgBin { dir }
    }

    pub fn program(&self, name: &str) -> PathBuf {
        match &self.dir {
            Some(d) => d.join(name),
            None => PathBuf::from(name),
        }
    }

    /// A PostgreSQL program, run in the C locale and UTC: reentry reads
    /// what they print (pg_controldata's labels, pg_waldump's times), and
    /// a translated or local-time line would not parse.
    pub fn command(&self, name: &str) -> Command {
        let mut cmd = Command::new(self.program(name));
        cmd.env("LC_ALL", "C")
            .env("LC_MESSAGES", "C")
            .env("LANG", "C")
            .env("TZ", "UTC");
        cmd
    }

    /// `NAME --version`, e.g. "pg_basebackup (PostgreSQL) 18.6".
    pub fn version(&self, name: &str) -> Result<String, ToolError> {
        let out = run(self.command(name).arg("--version"))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

/// Runs `cmd` to completion; a non-zero exit is an error carrying the last
/// lines of its stderr.
pub fn run(cmd: &mut Command) -> Result<Output, ToolError> {
    let program = Path::new(cmd.get_program()).to_owned();
    let out = cmd.output().map_err(|source| ToolError::Spawn {
        program: program.clone(),
        source,
    })?;
    if out.status.success() {
        return Ok(out);
    }
    Err(failed(&program, &out.status, &out.stderr))
}

pub fn failed(program: &Path, status: &std::process::ExitStatus, stderr: &[u8]) -> ToolError {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    ToolError::Failed {
        tool: program
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        status: status.to_string(),
        stderr: lines[lines.len().saturating_sub(5)..].join(" / "),
    }
}
