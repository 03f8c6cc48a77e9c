//! Command-line interface: argument types and the dispatch to the library.
//! Each subcommand module owns its `Args` and its `run`.

mod wal;

use std::io::{self, Write};
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use serde::Serialize;

use crate::config::{Config, ConfigError};
use crate::exit::Exit;
use crate::Error;

#[derive(Debug, Parser)]
#[command(
    name = "reentry",
    version,
    about = "PostgreSQL backup, point-in-time recovery and application re-entry"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalOpts,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every subcommand takes.
#[derive(Debug, clap::Args)]
pub struct GlobalOpts {
    /// Repository directory (else REENTRY_REPO, else `repo` in the config file).
    #[arg(long, global = true, env = "REENTRY_REPO", value_name = "DIR")]
    pub repo: Option<PathBuf>,
    /// Config file [default: ./reentry.toml if present].
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print machine-readable JSON on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// More log output on stderr (-v info, -vv debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The WAL archive: PostgreSQL's archive_command and restore_command.
    #[command(subcommand)]
    Wal(wal::WalCommand),
}

/// What a command needs from the environment it runs in.
pub struct Context {
    pub global: GlobalOpts,
    pub config: Config,
}

impl Context {
    pub fn repo(&self) -> Result<PathBuf, Error> {
        self.global
            .repo
            .clone()
            .or_else(|| self.config.repo.clone())
            .ok_or(Error::Config(ConfigError::NoRepo))
    }

    /// Prints a result as JSON when `--json` was given, else the human text.
    pub fn emit<T: Serialize>(
        &self,
        value: &T,
        human: impl FnOnce() -> Option<String>,
    ) -> Result<(), Error> {
        let text = if self.global.json {
            Some(serde_json::to_string(value).expect("reports serialize"))
        } else {
            human()
        };
        match text {
            Some(t) => print_line(&t),
            None => Ok(()),
        }
    }
}

/// Writes one line to stdout. A closed pipe (`reentry … | head`) is not an
/// error.
pub fn print_line(line: &str) -> Result<(), Error> {
    let mut out = io::stdout().lock();
    match writeln!(out, "{line}").and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        r => r.map_err(Error::Output),
    }
}

pub fn init_logging(opts: &GlobalOpts) {
    use tracing::Level;
    let level = match (opts.quiet, opts.verbose) {
        (true, _) => Level::ERROR,
        (false, 0) => Level::WARN,
        (false, 1) => Level::INFO,
        _ => Level::DEBUG,
    };
    tracing_subscriber::fmt()
        .with_writer(io::stderr)
        .with_max_level(level)
        .with_target(false)
        .without_time()
        .with_ansi(io::IsTerminal::is_terminal(&io::stderr()))
        .init();
}

pub fn run(cli: Cli) -> Result<Exit, Error> {
    let config = Config::load(cli.global.config.as_deref())?;
    let ctx = Context {
        global: cli.global,
        config,
    };
    match cli.command {
        Command::Wal(cmd) => wal::run(&ctx, cmd),
    }
}
